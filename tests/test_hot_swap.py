"""Hot swap in the running daemon: promote, file watch, SIGHUP, cmd/reload, and checkpoints it must refuse."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import time
from collections import defaultdict

from daemon_helpers import Daemon, line_cfg, metric_value, wait_offline
from loop_helpers import publish, visiond, wait_until
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.preprocess import PreprocessSpec


def resaved(src, dst, note: str):
    """The same weights under a new content hash: a new model version, for telling the two apart."""
    c = load_checkpoint(src)
    return save_checkpoint(dst, arch=c.arch, classes=c.classes, spec=c.spec, state_dict=c.state_dict,
                           arch_args=c.arch_args, meta={**c.meta, "note": note}, name=c.name)


def _serving(tmp_path, line_model, mosquitto, synth_video, **extra):
    """A daemon on the looping line video (100 fps) whose checkpoint is a copy we may replace."""
    ckpt = tmp_path / "serve" / "model.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(line_model, ckpt)
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), "loop": True, "fps": 100}
    cfg = line_cfg(ckpt, mosquitto, [cam], **extra)
    return ckpt, Daemon(tmp_path, cfg)


def _details(rec) -> list[dict]:
    return [json.loads(m.payload) for m in rec.messages("visiond/testbox/status/detail")]


def _preds(rec) -> list[dict]:
    return sorted(rec.json_payloads("/prediction"), key=lambda p: p["seq"])


def test_promote_switches_between_two_batches_without_losing_or_repeating_a_frame(
        tmp_path, mosquitto, mqtt_recorder, line_model, synth_video):
    # given a daemon serving model A, with the audit trail recording frame index, batch and version per verdict
    rec = mqtt_recorder("visiond/#")
    jsonl = tmp_path / "verdicts.jsonl"
    ckpt, d = _serving(tmp_path, line_model, mosquitto, synth_video, jsonl={"path": str(jsonl)})
    a = load_checkpoint(ckpt).version
    b = resaved(line_model, tmp_path / "candidate" / "b.ckpt", "B")
    try:
        rec.wait_for(lambda ms: sum(m.topic.endswith("/prediction") for m in ms) >= 150, 120)
        # when model B is promoted to the watched path
        r = visiond("promote", str(tmp_path / "candidate" / "b.ckpt"), "--to", str(ckpt))
        assert r.returncode == 0, r.stderr
        assert f"now version {b.version}" in r.stdout and f"previous {a}" in r.stdout
        # then predictions from B arrive, and keep coming
        rec.wait_for(lambda ms: sum(b.version.encode() in m.payload for m in ms if m.topic.endswith("/prediction"))
                     >= 150, 120)
        text = d.http("/metrics")[1].decode()
        assert metric_value(text, "visiond_model_info", version=b.version) == 1
        assert d.stop() == 0, d.stderr[-3000:]
    finally:
        d.close()
    wait_offline(rec, 10)  # the subscriber has every prediction the daemon drained at its stop
    preds = _preds(rec)
    # then seq is gapless and no message came twice
    assert [p["seq"] for p in preds] == list(range(1, len(preds) + 1))
    # and the version changes exactly once, from A to B
    versions = [p["model"]["version"] for p in preds]
    switch = versions.index(b.version)
    assert set(versions[:switch]) == {a} and set(versions[switch:]) == {b.version}
    # and the old model kept serving while the new one loaded and warmed (A verdicts on frames captured after
    # the reload began)
    reload_began = _log_time(d.stderr, "reloading model (file change)")
    switched = _log_time(d.stderr, "model switched")
    if switched - reload_began > 0.05:  # at 100 fps: room for frames in between (log times are in ms)
        assert any(p["model"]["version"] == a and _epoch(p["captured_at"]) > reload_began for p in preds)
    # and every captured frame was classified once, in order, and the switch fell between two batches
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(len(records))) and len(records) == len(preds)
    by_batch = defaultdict(set)
    for r in records:
        by_batch[r["batch"]].add(r["model"])
    assert all(len(v) == 1 for v in by_batch.values())
    # and the daemon said so: retained status/detail names B, the old file is kept as .prev
    assert _details(rec)[-1]["model"]["version"] == b.version
    assert _details(rec)[-1]["last_reload"]["result"] == "switched"
    assert load_checkpoint(ckpt.with_name("model.ckpt.prev")).version == a
    log = d.stderr
    assert log.index("loaded and warmed") < log.index("model switched")


def test_sighup_and_cmd_reload_reload_the_checkpoint(tmp_path, mosquitto, mqtt_recorder, line_model, synth_video):
    rec = mqtt_recorder("visiond/#")
    ckpt, d = _serving(tmp_path, line_model, mosquitto, synth_video)
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("/prediction") for m in ms), 120)
        # when the daemon gets SIGHUP, then cmd/reload
        d.send(signal.SIGHUP)
        wait_until(lambda: any(x.get("last_reload", {}).get("result") == "switched" for x in _details(rec)), 60,
                   "a reload after SIGHUP")
        n = len([x for x in _details(rec) if "last_reload" in x])
        publish(mosquitto, "visiond/testbox/cmd/reload", {})
        wait_until(lambda: len({x["last_reload"]["at"] for x in _details(rec) if "last_reload" in x}) >= 2, 60,
                   "a second reload after cmd/reload")
        assert n >= 1
        assert d.stop() == 0
    finally:
        d.close()
    # then both were logged, and predictions never stopped
    assert "reloading model (SIGHUP)" in d.stderr and "reloading model (cmd/reload)" in d.stderr
    preds = _preds(rec)
    assert [p["seq"] for p in preds] == list(range(1, len(preds) + 1))


def _bad_checkpoints(tmp_path, good) -> list[tuple[str, callable]]:
    """(what the refusal must say, how to write it over the served checkpoint)."""
    c = load_checkpoint(good)

    def garbage(path):
        path.write_bytes(b"\x00" * 10 + b"this is not a model" * 50)

    def pickled(path):
        path.write_bytes(pickle.dumps({"state_dict": {}}))

    def without_spot(path):  # the config names spot a defect class: this model cannot serve it
        net = build_model("smallcnn", 3, in_channels=3, image_size=64)
        save_checkpoint(path, arch="smallcnn", classes=["empty", "ok", "scratch"], spec=c.spec,
                        state_dict=net.state_dict(), arch_args={"in_channels": 3, "image_size": 64})

    def tall_input(path):  # a model for 32x64 (w x h) crops, the camera's ROI is square
        net = build_model("mobilenet_v3_small", 4, in_channels=3, image_size=64)
        save_checkpoint(path, arch="mobilenet_v3_small", classes=list(c.classes),
                        spec=PreprocessSpec.for_color((64, 32)), state_dict=net.state_dict())

    def tampered(path):
        raw = bytearray(good.read_bytes())
        raw[-100] ^= 0xFF  # one weight byte: the content hash no longer matches
        path.write_bytes(bytes(raw))

    return [("not a safetensors file", garbage), ("pickle", pickled),
            ("decide.defect_classes: ['spot'] not among the model's classes", without_spot),
            ("does not fit camera line1's roi 320x320", tall_input), ("content hash mismatch", tampered)]


def test_a_checkpoint_that_cannot_load_or_does_not_fit_leaves_the_old_model_serving(
        tmp_path, mosquitto, mqtt_recorder, line_model, synth_video):
    rec = mqtt_recorder("visiond/#")
    ckpt, d = _serving(tmp_path, line_model, mosquitto, synth_video)
    a = load_checkpoint(ckpt).version
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("/prediction") for m in ms), 120)
        for n, (why, write) in enumerate(_bad_checkpoints(tmp_path, line_model), start=1):
            # when a bad file lands at the watched path (a careless deploy, not `visiond promote`)
            staged = tmp_path / f"bad{n}.ckpt"
            write(staged)
            staged.replace(ckpt)
            # then the refusal is reported over MQTT, in the metrics and in the log
            wait_until(lambda: any(why in (x.get("last_error") or "") for x in _details(rec)), 60,
                       f"status/detail last_error saying {why!r}")
            wait_until(lambda: metric_value(d.http("/metrics")[1].decode(),
                                            "visiond_model_reload_failures_total") == n, 30, f"{n} reload failures")
            # and the old model keeps serving
            seen = len(rec.messages())
            rec.wait_for(lambda ms: sum(m.topic.endswith("/prediction") for m in ms[seen:]) >= 20, 60)
        assert {p["model"]["version"] for p in _preds(rec)} == {a}
        assert d.stderr.count("reload refused, old model keeps serving") == 5
        # and a good checkpoint afterwards is still taken
        b = resaved(line_model, tmp_path / "b.ckpt", "B")
        r = visiond("promote", str(tmp_path / "b.ckpt"), "--to", str(ckpt))
        assert r.returncode == 0, r.stderr
        rec.wait_for(lambda ms: any(b.version.encode() in m.payload for m in ms if m.topic.endswith("/prediction")),
                     120)
        assert d.stop() == 0
    finally:
        d.close()
    assert "Traceback" not in d.stderr
    preds = _preds(rec)
    assert [p["seq"] for p in preds] == list(range(1, len(preds) + 1))


def _epoch(text: str) -> float:
    from loop_helpers import epoch

    return epoch(text)


def _log_time(log: str, text: str) -> float:
    """Wall time of the first log line containing `text` (the plain format: local time, milliseconds)."""
    line = next(ln for ln in log.splitlines() if text in ln)
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
