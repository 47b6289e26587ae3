"""The daemon end to end: real process, real Mosquitto, real video and RTSP, a model trained here."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest

from conftest import free_port
from daemon_helpers import Daemon, line_cfg, metric_value, run_to_end, schema_validator, wait_offline


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_file_source_gives_one_message_per_frame_in_order_matching_truth(runtime, tmp_path, mosquitto, mqtt_recorder,
                                                                         line_model, synth_video):
    # given a subscriber and the daemon on a 300-frame line video, with either model runtime
    rec = mqtt_recorder("visiond/#")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi)}
    # when the file has been read, the daemon ends on its own
    run_to_end(tmp_path, line_cfg(line_model, mosquitto, [cam], model={"runtime": runtime}))
    wait_offline(rec, 10)
    preds = rec.json_payloads("/prediction")
    # then exactly one message per frame, seq gapless and in order, each valid against the schema
    assert len(preds) == len(synth_video.truth) == 300
    assert [p["seq"] for p in preds] == list(range(1, 301))
    check = schema_validator("prediction.schema.json")
    for p in preds:
        check.validate(p)
    # and the labels match the line's ground truth
    right = sum(p["label"] == t for p, t in zip(preds, synth_video.truth))
    assert right / 300 >= 0.85, Counter((t, p["label"]) for p, t in zip(preds, synth_video.truth)).most_common(8)
    # and defect is set exactly where a defect class won clearly
    for p in preds:
        if p["label"] in ("scratch", "spot") and p["score"] >= 0.5:
            assert p["defect"] is True
    statuses = [m.payload for m in rec.messages("visiond/testbox/status")]
    assert statuses[0] == b"online" and statuses[-1] == b"offline"
    # and the runtime that served is the one configured, and says so
    detail = json.loads(rec.messages("visiond/testbox/status/detail")[-1].payload)
    assert detail["model"]["runtime"] == runtime


def test_seq_survives_a_restart(tmp_path, mosquitto, mqtt_recorder, line_model, tmp_path_factory):
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2
    import numpy as np

    for i in range(5):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    rec = mqtt_recorder("visiond/+/+/prediction")
    for _ in range(2):
        d = Daemon(tmp_path, line_cfg(line_model, mosquitto, [{"name": "c", "source": str(frames)}]))
        try:
            assert d.wait(120) == 0, d.stderr[-2000:]
        finally:
            d.close()
    rec.wait_for(lambda ms: len(ms) == 10, 10)
    assert [p["seq"] for p in rec.json_payloads("/prediction")] == list(range(1, 11))


def test_two_cameras_file_and_rtsp_both_publish_and_share_batches(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                                  synth_video, rtsp_server):
    # given a looping file camera and an RTSP camera, and an audit trail that records batches
    rec = mqtt_recorder("visiond/+/+/prediction")
    cams = [{"name": "file", "source": str(synth_video.path), "loop": True, "roi": list(synth_video.roi)},
            {"name": "rtsp", "source": rtsp_server.url, "roi": list(synth_video.roi)}]
    jsonl = tmp_path / "verdicts.jsonl"
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, cams, jsonl={"path": str(jsonl)}))
    try:
        # when both run for a while (the file source saturates the model: load)
        rec.wait_for(lambda ms: sum(m.topic.endswith("/rtsp/prediction") for m in ms) >= 60, 90)
        assert d.stop() == 0, d.stderr[-2000:]
    finally:
        d.close()
    by_cam = Counter(m.topic.split("/")[2] for m in rec.messages())
    # then both cameras published
    assert by_cam["file"] > 60 and by_cam["rtsp"] >= 60
    # and under load some batch held frames of both cameras
    batches: dict[int, set] = {}
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        batches.setdefault(r["batch"], set()).add(r["camera"])
    assert any(len(cams) == 2 for cams in batches.values())
    assert max(Counter(json.loads(ln)["batch"] for ln in jsonl.read_text().splitlines()).values()) > 1


def test_status_online_then_offline_on_sigterm_and_last_will_on_sigkill(tmp_path, mosquitto, mqtt_recorder,
                                                                        line_model, synth_video):
    rec = mqtt_recorder("visiond/testbox/status")
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 30, "roi": list(synth_video.roi)}
    # given a running daemon
    (tmp_path / "a").mkdir()
    d = Daemon(tmp_path / "a", line_cfg(line_model, mosquitto, [cam]))
    try:
        rec.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 60)
        # when it gets SIGTERM, it exits 0 within a few seconds with a retained offline (not the will)
        t0 = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 8
    finally:
        d.close()
    rec.wait_for(lambda ms: ms and ms[-1].payload == b"offline", 10)
    assert "stopped in" in d.stderr
    # given it runs again, when it is SIGKILLed, the broker delivers the last will
    (tmp_path / "b").mkdir()
    rec2 = mqtt_recorder("visiond/testbox/status")
    d2 = Daemon(tmp_path / "b", line_cfg(line_model, mosquitto, [cam]))
    try:
        rec2.wait_for(lambda ms: ms and ms[-1].payload == b"online", 60)
        d2.send(signal.SIGKILL)
        d2.wait(10)
    finally:
        d2.close()
    rec2.wait_for(lambda ms: ms and ms[-1].payload == b"offline", 30)
    # a late subscriber sees the retained offline
    late = mqtt_recorder("visiond/testbox/status")
    late.wait_for(lambda ms: ms and ms[-1].payload == b"offline" and ms[-1].retain, 10)


def test_metrics_agree_with_messages_and_pass_promtool(tmp_path, mosquitto, mqtt_recorder, line_model, synth_video):
    # given a folder camera of 40 frames and a camera that never answers (so the daemon keeps running)
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    cap = cv2.VideoCapture(str(synth_video.path))
    for i in range(40):
        ok, img = cap.read()
        assert ok
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), img)
    cap.release()
    dead = f"rtsp://user:secret@127.0.0.1:{free_port()}/none"
    rec = mqtt_recorder("visiond/#")
    cams = [{"name": "folder", "source": str(folder), "roi": list(synth_video.roi)},
            {"name": "dead", "source": dead, "open_timeout_s": 1, "read_timeout_s": 1}]
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, cams))
    try:
        d.wait_http()
        rec.wait_for(lambda ms: sum(m.topic.endswith("/folder/prediction") for m in ms) == 40, 60)
        time.sleep(0.5)  # acks of the last messages
        status, body = d.http("/metrics")
        text = body.decode()
        # then the counters agree with what the subscriber received
        assert status == 200
        assert metric_value(text, "visiond_frames_captured_total", camera="folder") == 40
        assert metric_value(text, "visiond_predictions_total", camera="folder") == 40
        assert metric_value(text, "visiond_latency_seconds_count", camera="folder") == 40
        assert metric_value(text, "visiond_mqtt_publish_total", result="acked") >= 40
        assert metric_value(text, "visiond_source_up", camera="dead") == 0
        assert metric_value(text, "visiond_mqtt_connected") == 1
        assert metric_value(text, "visiond_model_info") == 1
        by_label = Counter(p["label"] for p in rec.json_payloads("/folder/prediction"))
        for label, n in by_label.items():
            assert metric_value(text, "visiond_predictions_total", camera="folder", label=label) == n
        # and the page is valid Prometheus exposition
        promtool = shutil.which("promtool")
        assert promtool, "promtool missing: install the Debian package 'prometheus'"
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint
        # and /healthz names the camera that is down, with 503
        code, health = d.http("/healthz")
        detail = json.loads(health)
        assert code == 503 and detail["cameras"]["dead"]["ok"] is False and detail["mqtt_connected"] is True
        # and the camera status says why, without the password (the dead camera's thread reports it on its own
        # time: the folder's predictions say nothing of it)
        rec.wait_for(lambda _ms: rec.messages("visiond/testbox/dead/status"), 10, "dead/status")
        cam_status = [json.loads(m.payload) for m in rec.messages("visiond/testbox/dead/status")]
        assert cam_status and cam_status[-1]["state"] == "offline"
        assert all("secret" not in m.payload.decode(errors="replace") for m in rec.messages())
        assert d.stop() == 0
    finally:
        d.close()
    assert "secret" not in d.stderr


def test_healthz_is_200_when_cameras_and_broker_are_fine(tmp_path, mosquitto, line_model, synth_video):
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 30, "roi": list(synth_video.roi)}
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, [cam]))
    try:
        d.wait_http()
        deadline = time.monotonic() + 30
        code = 0
        while time.monotonic() < deadline and code != 200:
            code, body = d.http("/healthz")
            time.sleep(0.3)
        assert code == 200, body
        assert json.loads(body)["cameras"]["line1"]["ok"] is True
        # when the broker goes away, health says so
        mosquitto.stop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and code == 200:
            code, body = d.http("/healthz")
            time.sleep(0.3)
        assert code == 503 and json.loads(body)["mqtt_connected"] is False
        assert d.stop() == 0
    finally:
        d.close()


def test_missing_model_checkpoint_or_bad_decide_classes_exit_2(tmp_path, mosquitto, line_model, synth_video):
    cam = {"name": "line1", "source": str(synth_video.path)}
    cfg = line_cfg(line_model, mosquitto, [cam])
    cfg["decide"] = {"defect_classes": ["crack"]}
    d = Daemon(tmp_path, cfg)
    try:
        assert d.wait(60) == 2
    finally:
        d.close()
    assert "decide.defect_classes" in d.stderr and "crack" in d.stderr and "Traceback" not in d.stderr
