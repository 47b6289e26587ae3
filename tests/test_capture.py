"""Capture: the inbox format, `visiond dataset capture` from real sources, and the daemon's capture sink."""

from __future__ import annotations

import errno
import json
import logging
import time
from collections import Counter

import cv2
import numpy as np
import pytest

from daemon_helpers import Daemon, line_cfg, metric_value, schema_validator, wait_offline
from loop_helpers import epoch as _epoch, frame_truth, pixel_hash, publish, visiond, wait_until
from visiond.config import CameraConfig, CaptureConfig, CaptureRules
from visiond.data import phash as ph
from visiond.data.inbox import (
    accept_inbox_item,
    discard_inbox_item,
    list_inbox,
    prediction_dict,
    read_inbox_item,
    return_to_inbox,
    validate_item_id,
    write_inbox_item,
)
from visiond.data.manifest import read_manifest
from visiond.errors import UserError
from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.serve.metrics import Metrics
from visiond.serve.sinks.capture import CaptureSink


def _img(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _meta(i: int = 0, **kw) -> dict:
    meta = {"camera": "line1", "captured_at": 1_700_000_000.25 + i, "source": "rtsp://inspect:hunter2@10.0.0.5/s1",
            "rule": "low_score", "prediction": prediction_dict("ok", 0.55, [("ok", 0.55), ("spot", 0.4)], "line", "v1")}
    meta.update(kw)
    return meta


# ---------------------------------------------------------------- the inbox format


def test_inbox_item_has_image_and_sidecar_and_accept_moves_it_into_the_dataset(tmp_path):
    # given a frame written to the inbox
    item = write_inbox_item(tmp_path, _img(1), _meta())
    # then the image and its sidecar are there, the sidecar says everything, the password is not in it
    side = json.loads(item.sidecar_path.read_text())
    schema_validator("inbox.schema.json").validate(side)
    assert item.image_path.read_bytes()[:4] == b"\x89PNG"
    assert side["id"] == item.id and side["camera"] == "line1" and side["rule"] == "low_score"
    assert side["captured_at"] == "2023-11-14T22:13:20.250000Z"
    assert side["source"] == "rtsp://inspect:***@10.0.0.5/s1" and "hunter2" not in item.sidecar_path.read_text()
    assert len(side["sha256"]) == 64 and len(side["phash"]) == 16
    assert side["prediction"] == {"label": "ok", "score": 0.55, "top": [{"label": "ok", "score": 0.55},
                                                                        {"label": "spot", "score": 0.4}],
                                  "model": {"name": "line", "version": "v1"}}
    assert np.array_equal(cv2.imread(str(item.image_path)), _img(1))
    assert not [p for p in item.image_path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    # when it is accepted as "spot"
    sample = accept_inbox_item(tmp_path, item.id, "spot")
    # then the image moved to images/spot/, the manifest has its row with the model's guess, the inbox is empty
    assert sample.path.startswith("images/spot/") and (tmp_path / sample.path).is_file()
    rows = read_manifest(tmp_path)
    assert [(r.path, r.label) for r in rows] == [(sample.path, "spot")]
    assert rows[0].extra["predicted_label"] == "ok" and rows[0].extra["camera"] == "line1"
    assert rows[0].extra["rule"] == "low_score" and rows[0].sha256 == side["sha256"]
    assert list_inbox(tmp_path) == []
    # and accepting it again is refused with a clear message
    with pytest.raises(UserError, match="not in"):
        accept_inbox_item(tmp_path, item.id, "spot")


def test_list_is_oldest_first_and_ignores_temp_files_and_images_without_sidecar(tmp_path):
    # given items written out of time order, a half-written temp file and an image whose sidecar never came
    late = write_inbox_item(tmp_path, _img(1), _meta(10))
    early = write_inbox_item(tmp_path, _img(2), _meta(1))
    inbox = tmp_path / "inbox"
    (inbox / ".20240101_x.png.abc.tmp").write_bytes(b"\x89PNG half")
    cv2.imwrite(str(inbox / "20200101T000000000000Z_line1_deadbeef.png"), _img(3))
    (inbox / "20200101T000000000000Z_line1_cafe.json").write_text("{not json")
    # when the inbox is listed
    items = list_inbox(tmp_path)
    # then only the two complete items come back, the oldest first
    assert [i.id for i in items] == [early.id, late.id]
    assert read_inbox_item(tmp_path, late.id).captured_at == late.captured_at


def test_return_to_inbox_undoes_an_accept_and_discard_removes_an_item(tmp_path):
    a = write_inbox_item(tmp_path, _img(1), _meta(1))
    b = write_inbox_item(tmp_path, _img(2), _meta(2))
    accept_inbox_item(tmp_path, a.id, "scratch")
    # when the accept is undone
    back = return_to_inbox(tmp_path, a.id)
    # then the row and the file left the dataset and the item is back with the model's guess
    assert read_manifest(tmp_path) == []
    assert not list((tmp_path / "images" / "scratch").iterdir())
    assert [i.id for i in list_inbox(tmp_path)] == [a.id, b.id]
    assert back.predicted_label == "ok" and back.sha256 == a.sha256
    # when the other one is discarded, it is gone
    discard_inbox_item(tmp_path, b.id)
    assert [i.id for i in list_inbox(tmp_path)] == [a.id]


@pytest.mark.parametrize("bad", ["../manifest", "a/b", "", ".hidden", "x" * 200, "a\x00b", "..", "%2e%2e"])
def test_item_ids_that_could_leave_the_inbox_are_refused(tmp_path, bad):
    with pytest.raises(UserError):
        validate_item_id(bad)
    with pytest.raises(UserError):
        accept_inbox_item(tmp_path, bad, "ok")


def test_perceptual_hash_tells_near_duplicates_from_different_frames():
    from tools.synthline import SyntheticLine, crop

    line = SyntheticLine(7, frames=120)
    frame = crop(line.frame(10), line.roi)
    noisy = cv2.add(frame, np.random.default_rng(0).integers(0, 4, frame.shape, dtype=np.uint8))
    brighter = cv2.convertScaleAbs(frame, alpha=1.0, beta=6)
    other = crop(line.frame(60), line.roi)
    h = ph.phash(frame)
    assert ph.hamming(h, ph.phash(frame.copy())) == 0
    assert ph.hamming(h, ph.phash(noisy)) <= 4 and ph.hamming(h, ph.phash(brighter)) <= 4
    assert ph.hamming(h, ph.phash(other)) > 12
    assert ph.hamming(ph.to_hex(h), ph.to_hex(ph.phash(noisy))) == ph.hamming(h, ph.phash(noisy))
    assert 0 <= ph.dhash(frame) < 2**64


# ---------------------------------------------------------------- visiond dataset capture


def test_capture_every_n_frames_from_a_video_file_with_roi(tmp_path, synth_video):
    # when every 30th frame of the 300-frame line video is captured, ROI cut, at most 5
    roi = ",".join(map(str, synth_video.roi))
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "ds"), "--every-frames", "30",
                "--max", "5", "--roi", roi, "--dedupe-bits", "-1", "--camera", "line1", "--no-progress")
    assert r.returncode == 0, r.stderr
    # then frames 0, 30, ..., 120 are in the inbox, exactly the pixels the daemon would see
    items = list_inbox(tmp_path / "ds")
    truth = frame_truth(synth_video.path, synth_video.roi)
    frames = [truth[pixel_hash(cv2.imread(str(i.image_path)))] for i in items]
    assert frames == [0, 30, 60, 90, 120]
    assert all(i.rule == "every_frames" and i.camera == "line1" and (i.width, i.height) == (320, 320) for i in items)
    assert "saved 5 frame(s)" in r.stdout


def test_capture_every_n_seconds_uses_video_time_for_files(tmp_path, synth_video):
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "ds"), "--every-seconds", "2",
                "--dedupe-bits", "-1", "--no-progress")
    assert r.returncode == 0, r.stderr
    truth = frame_truth(synth_video.path, (0, 0, 640, 480))
    frames = [truth[pixel_hash(cv2.imread(str(i.image_path)))] for i in list_inbox(tmp_path / "ds")]
    assert frames == [0, 60, 120, 180, 240]  # 30 fps, 10 s


def test_capture_a_burst_and_one_frame_per_line_on_stdin(tmp_path, synth_video):
    # a burst of 4: four consecutive frames
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "a"), "--burst", "4",
                "--dedupe-bits", "-1", "--no-progress")
    assert r.returncode == 0, r.stderr
    truth = frame_truth(synth_video.path, (0, 0, 640, 480))
    frames = [truth[pixel_hash(cv2.imread(str(i.image_path)))] for i in list_inbox(tmp_path / "a")]
    assert frames == [0, 1, 2, 3]
    # three presses of Enter: three frames, then standard input closes and capture ends
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "b"), "--stdin", "--dedupe-bits", "-1",
                "--no-progress", input="\n\n\n")
    assert r.returncode == 0, r.stderr
    items = list_inbox(tmp_path / "b")
    assert len(items) == 3 and {i.rule for i in items} == {"stdin"}
    assert [truth[pixel_hash(cv2.imread(str(i.image_path)))] for i in items] == [0, 1, 2]  # a file waits for Enter
    assert "standard input closed" in r.stdout


def test_capture_can_store_a_models_guess_for_pre_labelling(tmp_path, synth_video, line_model):
    roi = ",".join(map(str, synth_video.roi))
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "ds"), "--every-frames", "50",
                "--roi", roi, "--checkpoint", str(line_model), "--no-progress")
    assert r.returncode == 0, r.stderr
    items = list_inbox(tmp_path / "ds")
    assert len(items) == 6
    from visiond.models.checkpoint import load_checkpoint

    version = load_checkpoint(line_model).version
    for item in items:
        p = item.prediction
        assert p["model"]["version"] == version and p["label"] in ("empty", "ok", "scratch", "spot")
        assert p["top"][0] == {"label": p["label"], "score": p["score"]} and len(p["top"]) == 3


def test_capture_skips_near_duplicates(tmp_path):
    # given a folder of the same picture with sensor noise, and one different picture
    from tools.synthline import SyntheticLine, crop

    line = SyntheticLine(7, frames=120)
    folder = tmp_path / "frames"
    folder.mkdir()
    base = crop(line.frame(10), line.roi)
    rng = np.random.default_rng(1)
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), cv2.add(base, rng.integers(0, 3, base.shape, dtype=np.uint8)))
    cv2.imwrite(str(folder / "99.png"), crop(line.frame(60), line.roi))
    # when every frame is captured with the default dedupe threshold
    r = visiond("dataset", "capture", str(folder), str(tmp_path / "ds"), "--every-frames", "1", "--no-progress")
    # then one of the look-alikes and the different one are kept
    assert r.returncode == 0, r.stderr
    assert len(list_inbox(tmp_path / "ds")) == 2
    assert "5 near-duplicate(s) skipped" in r.stdout


def test_capture_from_rtsp_redacts_the_password(tmp_path, rtsp_server):
    url = rtsp_server.url.replace("rtsp://", "rtsp://inspect:hunter2@")
    r = visiond("dataset", "capture", url, str(tmp_path / "ds"), "--every-frames", "5", "--max", "3", "--no-progress",
                timeout=120)
    assert r.returncode == 0, r.stderr
    items = list_inbox(tmp_path / "ds")
    assert len(items) == 3
    assert all(i.source.startswith("rtsp://inspect:***@127.0.0.1") for i in items)
    assert "hunter2" not in r.stdout + r.stderr + "".join(i.sidecar_path.read_text() for i in items)


@pytest.mark.parametrize("args, message", [
    ([], "choose how to pick frames"),
    (["--every-frames", "2", "--stdin"], "exclude each other"),
    (["--every-frames", "0"], "--every-frames 0: expected >= 1"),
    (["--burst", "2", "--roi", "1,2,3"], "--roi '1,2,3': expected x,y,w,h"),
])
def test_capture_option_errors_are_one_line_exit_2(tmp_path, synth_video, args, message):
    r = visiond("dataset", "capture", str(synth_video.path), str(tmp_path / "ds"), "--no-progress", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- the capture sink, in process


def _pred(i: int, label: str = "ok", score: float = 0.9, top=None, camera: str = "line1") -> Prediction:
    frame = Frame(camera, i, 1_700_000_000.0 + i, time.monotonic(), _img(1000 + i, 24))
    top = top or ((label, score), ("spot", round(1 - score, 6)))
    return Prediction(frame, label, score, tuple(top), False, ModelRef("line", "v1"), Timings(0, 0, 0))


def _sink(tmp_path, rules: CaptureRules, metrics=None, **kw) -> tuple[CaptureSink, Metrics]:
    metrics = metrics or Metrics(process=False)
    cfg = CaptureConfig(dataset=tmp_path / "ds", rules=rules, queue_size=kw.pop("queue_size", 64),
                        quota_mb=kw.pop("quota_mb", 1024))
    cams = [CameraConfig(name="line1", source="rtsp://u:pw@cam/s")]
    sink = CaptureSink(cfg, cams, metrics, **kw)
    sink.start()
    return sink, metrics


def _value(metrics: Metrics, name: str, **labels) -> float:
    return metric_value(metrics.render().decode(), name, **labels)


def test_sink_rules_low_score_near_threshold_sample_and_command(tmp_path):
    # given rules: top score below 0.6, a defect class within 0.05 of its 0.5 threshold, no random sample
    rules = CaptureRules(low_score_below=0.6, near_threshold=0.05, dedupe_bits=-1, max_per_minute=6000)
    sink, metrics = _sink(tmp_path, rules, thresholds=lambda: {"spot": 0.5})
    preds = [_pred(0, score=0.95, top=(("ok", 0.95), ("spot", 0.05))),   # sure: not captured
             _pred(1, score=0.55, top=(("ok", 0.55), ("spot", 0.45))),   # unsure: low_score
             _pred(2, score=0.7, top=(("ok", 0.7), ("spot", 0.52))),     # spot near its threshold
             _pred(3, score=0.99, top=(("ok", 0.99), ("spot", 0.01)))]
    sink.submit(preds)
    # and a command for two frames of line1, and one for a camera that does not capture
    sink.request("line1", 2)
    with pytest.raises(UserError, match="cameras with capture enabled"):
        sink.request("nope", 1)
    sink.submit([_pred(4, score=0.99), _pred(5, score=0.99), _pred(6, score=0.99)])
    wait_until(lambda: len(list_inbox(sink.dataset)) == 4, 30, "4 captures")
    sink.stop()
    rules_seen = Counter(i.rule for i in list_inbox(sink.dataset))
    assert rules_seen == {"low_score": 1, "near_threshold": 1, "command": 2}
    assert _value(metrics, "visiond_capture_saved_total", camera="line1", rule="command") == 2
    assert all(i.source == "rtsp://u:***@cam/s" for i in list_inbox(sink.dataset))


def test_sink_rate_limit_and_random_sample(tmp_path):
    import random

    rules = CaptureRules(sample_rate=0.5, max_per_minute=3, dedupe_bits=-1)
    sink, metrics = _sink(tmp_path, rules, rng=random.Random(0))
    sink.submit([_pred(i) for i in range(40)])
    wait_until(lambda: len(list_inbox(sink.dataset)) == 3, 30, "3 captures")
    sink.stop()
    # then about half matched the sample rule, and all but the first three were refused by the rate limit
    assert len(list_inbox(sink.dataset)) == 3
    limited = _value(metrics, "visiond_capture_skipped_total", camera="line1", reason="rate_limited")
    assert 10 <= limited + 3 <= 30


def test_a_slow_disk_never_slows_submit_and_drops_are_counted(tmp_path):
    # given a disk that takes 0.3 s per write and a queue of 4
    def slow(dataset, image, meta):
        time.sleep(0.3)
        return write_inbox_item(dataset, image, meta)

    rules = CaptureRules(low_score_below=1.0, max_per_minute=60000, dedupe_bits=-1)
    sink, metrics = _sink(tmp_path, rules, writer=slow, queue_size=4)
    # when 200 frames all match a rule, in batches of 8
    batches = [[_pred(i, score=0.5) for i in range(start, start + 8)] for start in range(0, 200, 8)]
    t0 = time.perf_counter()
    for batch in batches:
        sink.submit(batch)
    elapsed = time.perf_counter() - t0
    # then submitting took far less than one write, and what did not fit was dropped and counted
    assert elapsed < 0.25, elapsed
    dropped = _value(metrics, "visiond_capture_write_failures_total", camera="line1", reason="queue_full")
    assert dropped >= 200 - 4 - 2
    sink.stop(timeout=5)
    assert dropped + sink.saved == 200


def test_a_full_disk_is_counted_and_logged_once_and_never_raises(tmp_path, caplog):
    def full(dataset, image, meta):
        raise OSError(errno.ENOSPC, "No space left on device")

    rules = CaptureRules(low_score_below=1.0, max_per_minute=60000, dedupe_bits=-1)
    sink, metrics = _sink(tmp_path, rules, writer=full)
    with caplog.at_level(logging.ERROR, logger="visiond.serve.sinks.capture"):
        for i in range(10):
            sink.submit([_pred(i, score=0.5)])
        wait_until(lambda: _value(metrics, "visiond_capture_write_failures_total", camera="line1",
                                  reason="disk_full") == 10, 30, "10 failures counted")
        sink.stop()
    lines = [r for r in caplog.records if "disk_full" in r.getMessage()]
    assert len(lines) == 1 and "predictions keep flowing" in lines[0].getMessage()


def test_quota_evicts_the_oldest_items(tmp_path):
    # given a quota of about three items (each ~1.9 kB image + sidecar)
    rules = CaptureRules(low_score_below=1.0, max_per_minute=60000, dedupe_bits=-1)
    sink, _ = _sink(tmp_path, rules, quota_mb=8000 / 2**20)
    for i in range(8):
        sink.submit([_pred(i, score=0.5)])
        wait_until(lambda: sink.saved == i + 1, 30, f"capture {i}")
    sink.stop()
    items = list_inbox(sink.dataset)
    # then only the newest survive, and the inbox is within its quota
    assert 1 <= len(items) <= 3
    assert [i.captured_at for i in items] == sorted(i.captured_at for i in items)
    assert items[-1].captured_at.startswith("2023-11-14T22:13:27")
    assert sum(i.size_bytes() for i in items) <= 8000


# ---------------------------------------------------------------- capture in the running daemon


def test_daemon_captures_unsure_frames_with_the_models_guess_and_on_command(tmp_path, mosquitto, mqtt_recorder,
                                                                            line_model, synth_video):
    # given a daemon on the looping line video that captures frames scoring below 0.9
    rec = mqtt_recorder("visiond/#")
    ds = tmp_path / "ds"
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), "loop": True, "fps": 60,
           "capture": {"low_score_below": 0.9, "max_per_minute": 6000, "dedupe_bits": -1}}
    cfg = line_cfg(line_model, mosquitto, [cam], capture={"dataset": str(ds)})
    d = Daemon(tmp_path, cfg)
    try:
        # when the first pass over the video has been classified
        rec.wait_for(lambda ms: sum(m.topic.endswith("/prediction") for m in ms) >= 300, 120)
        # and an operator asks for 3 frames over MQTT (a command bypasses the rules: 3 items marked "command")
        before = Counter(i.rule for i in list_inbox(ds))
        publish(mosquitto, "visiond/testbox/cmd/capture", {"camera": "line1", "count": 3})
        wait_until(lambda: Counter(i.rule for i in list_inbox(ds))["command"] == 3, 60, "3 command captures")
        # (an item is in the inbox a moment before the writer counts it)
        wait_until(lambda: (d.metric("visiond_capture_saved_total", camera="line1", rule="command") or 0) >= 3, 10,
                   "the 3 command captures counted")
        text = d.http("/metrics")[1].decode()
        assert metric_value(text, "visiond_capture_saved_total", camera="line1", rule="command") == 3
        assert metric_value(text, "visiond_capture_saved_total", camera="line1", rule="low_score") >= before["low_score"]
        assert d.stop() == 0, d.stderr[-2000:]
    finally:
        d.close()
    wait_offline(rec, 10)  # the subscriber has every prediction the daemon drained at its stop
    # then every low-score item carries the verdict the plant received for that very frame
    truth = frame_truth(synth_video.path, synth_video.roi)
    preds = {p["seq"]: p for p in rec.json_payloads("/prediction")}
    low = [i for i in list_inbox(ds) if i.rule == "low_score"]
    assert len(low) >= 10
    check = schema_validator("inbox.schema.json")
    for item in list_inbox(ds):
        check.validate(json.loads(item.sidecar_path.read_text()))
    checked = 0
    for item in low:
        frame = truth[pixel_hash(cv2.imread(str(item.image_path)))]
        same = [p for s, p in preds.items()
                if (s - 1) % 300 == frame and abs(_epoch(p["captured_at"]) - _epoch(item.captured_at)) < 5e-6]
        assert len(same) == 1, item
        p = same[0]
        assert item.prediction["label"] == p["label"] and abs(item.prediction["score"] - p["score"]) < 1e-5
        assert item.prediction["model"] == p["model"] and p["score"] < 0.9
        checked += 1
    assert checked == len(low)


def test_daemon_keeps_classifying_when_the_inbox_cannot_be_written(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                                   synth_video):
    # given a dataset whose inbox path is a file (every write fails), capturing every frame
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "inbox").write_text("not a directory")
    rec = mqtt_recorder("visiond/+/+/prediction")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi),
           "capture": {"sample_rate": 1.0, "max_per_minute": 60000, "dedupe_bits": -1}}
    cfg = line_cfg(line_model, mosquitto, [cam], capture={"dataset": str(ds), "queue_size": 1000},
                   metrics={"port": 0, "enabled": False})
    d = Daemon(tmp_path, cfg)
    try:
        # when the whole video has been read, the daemon ends normally
        assert d.wait(120) == 0, d.stderr[-3000:]
    finally:
        d.close()
    # then every frame was published in order, and the failure was logged once, not 300 times
    rec.wait_for(lambda ms: len(ms) == 300, 20)
    assert [p["seq"] for p in rec.json_payloads("/prediction")] == list(range(1, 301))
    assert d.stderr.count("capture: cannot write") == 1, d.stderr[-3000:]
