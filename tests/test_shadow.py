"""Shadow mode: a candidate classifies the same frames, its agreement is published, its labels never are."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import numpy as np
import pytest

from daemon_helpers import Daemon, line_cfg, run_to_end, schema_validator, wait_offline
from loop_helpers import model_without_spot, publish, visiond, wait_until  # noqa: F401 (fixture)
from test_hot_swap import resaved
from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.serve.metrics import Metrics
from visiond.serve.sinks.shadow import ShadowRunner


def _reports(rec) -> list[dict]:
    return rec.json_payloads("/line1/shadow")


def _consistent(r: dict) -> None:
    """A report's figures add up: per class and confusion both account for every frame."""
    assert r["frames"] == sum(c["frames"] for c in r["per_class"].values())
    assert r["frames"] == sum(sum(row.values()) for row in r["confusion"].values())
    assert r["agreed"] == sum(c["agreed"] for c in r["per_class"].values())
    assert r["agreed"] == sum(row.get(served, 0) for served, row in r["confusion"].items())
    if r["frames"]:
        assert r["agreement"] == pytest.approx(r["agreed"] / r["frames"], abs=1e-6)


def test_shadow_of_the_same_weights_agrees_on_every_frame(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                          synth_video):
    # given a candidate with the served model's weights under another version, reporting every second
    rec = mqtt_recorder("visiond/#")
    candidate = resaved(line_model, tmp_path / "candidate.ckpt", "candidate")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), "fps": 100}
    cfg = line_cfg(line_model, mosquitto, [cam],
                   model={"shadow": str(tmp_path / "candidate.ckpt"), "shadow_interval_s": 1})
    # when the 300-frame video has been classified and the daemon has stopped on its own
    run_to_end(tmp_path, cfg)
    wait_offline(rec, 20)
    preds = rec.json_payloads("/prediction")
    reports = _reports(rec)
    # then the plant saw only the served model, once per frame
    served = {p["model"]["version"] for p in preds}
    assert len(preds) == 300 and candidate.version not in served
    # and the comparisons cover every frame (several windows), agree everywhere, and are valid messages
    check = schema_validator("shadow.schema.json")
    for r in reports:
        check.validate(r)
        _consistent(r)
        assert r["candidate"]["version"] == candidate.version and r["serving"]["version"] in served
    assert len(reports) >= 2
    assert [r["seq"] for r in reports] == list(range(1, len(reports) + 1))
    assert sum(r["frames"] + r["skipped_frames"] for r in reports) == 300
    assert all(r["agreement"] == 1.0 for r in reports if r["frames"])
    # and per class, the counts are those of the served labels
    counted = Counter()
    for r in reports:
        counted.update({c: v["frames"] for c, v in r["per_class"].items()})
    if not any(r["skipped_frames"] for r in reports):
        assert counted == Counter(p["label"] for p in preds)


def test_shadow_started_and_stopped_by_command_reports_the_disagreement(
        tmp_path, mosquitto, mqtt_recorder, line_model, model_without_spot, synth_video):
    # given a daemon serving the 4-class model; the candidate (never saw spots) sits beside the served file
    rec = mqtt_recorder("visiond/#")
    serve = tmp_path / "serve"
    serve.mkdir()
    shutil.copy(line_model, serve / "model.ckpt")
    shutil.copy(model_without_spot, serve / "candidate.ckpt")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), "loop": True, "fps": 60}
    cfg = line_cfg(serve / "model.ckpt", mosquitto, [cam], model={"shadow_interval_s": 2})
    d = Daemon(tmp_path, cfg)
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("/prediction") for m in ms), 120)
        # when an operator starts shadow mode over MQTT (a path outside the model directory is refused)
        publish(mosquitto, "visiond/testbox/cmd/shadow", {"checkpoint": "/etc/passwd"})
        wait_until(lambda: any("checkpoint must be in" in (json.loads(m.payload).get("last_error") or "")
                               for m in rec.messages("visiond/testbox/status/detail")), 30, "the refusal")
        publish(mosquitto, "visiond/testbox/cmd/shadow", {"checkpoint": "candidate.ckpt"})
        # then comparisons arrive that cover spots
        wait_until(lambda: sum(r["per_class"].get("spot", {}).get("frames", 0) for r in _reports(rec)) >= 5,
                   90, "shadow reports covering served spots")
        # when it is stopped, a last partial report goes out and then no more
        publish(mosquitto, "visiond/testbox/cmd/shadow", {"checkpoint": None})
        wait_until(lambda: any(json.loads(m.payload).get("shadow", "x") is None
                               for m in rec.messages("visiond/testbox/status/detail")), 30, "shadow stopped")
        time.sleep(0.5)
        n = len(_reports(rec))
        time.sleep(4.5)  # two report intervals
        assert len(_reports(rec)) == n
        assert d.stop() == 0
    finally:
        d.close()
    reports = _reports(rec)
    for r in reports:
        _consistent(r)
    # then where the served model said spot the candidate never could, and the rest mostly agree
    assert all("spot" not in row for row in (r["confusion"].get(s, {}) for r in reports for s in r["confusion"]))
    spot = [r["per_class"]["spot"] for r in reports if "spot" in r["per_class"]]
    assert spot and all(c["agreed"] == 0 for c in spot)
    assert {r["candidate"]["version"] for r in reports} == {
        json.loads(m.payload)["shadow"]["version"] for m in rec.messages("visiond/testbox/status/detail")
        if json.loads(m.payload).get("shadow")}
    assert all(p["model"]["version"] != reports[0]["candidate"]["version"] for p in rec.json_payloads("/prediction"))


class _SlowClassifier:
    """A candidate far slower than the line: 0.2 s a batch."""

    name, version, classes = "slow", "s1", ("ok", "spot")

    def predict_images(self, images):
        time.sleep(0.2)
        return np.tile(np.array([[0.9, 0.1]], np.float32), (len(images), 1))


def test_a_slow_candidate_never_delays_the_served_model():
    # given a shadow runner whose candidate needs 0.2 s per batch
    published = []
    runner = ShadowRunner(_SlowClassifier(), lambda cam, r: published.append(r), Metrics(process=False), 60,
                          queue_batches=2)
    runner.start()
    frame = Frame("line1", 0, time.time(), time.monotonic(), np.zeros((8, 8, 3), np.uint8))
    pred = Prediction(frame, "ok", 0.9, (("ok", 0.9),), False, ModelRef("m", "v"), Timings(0, 0, 0))
    # when 50 batches of 4 arrive at once
    t0 = time.perf_counter()
    for _ in range(50):
        runner.submit([pred] * 4)
    elapsed = time.perf_counter() - t0
    runner.stop(timeout=10)
    # then handing them over took no time, what did not fit was skipped and counted, and nothing was lost track of
    assert elapsed < 0.2  # 0.2 s is one candidate batch: nothing waited for it
    assert len(published) == 1
    r = published[0]
    assert r["frames"] + r["skipped_frames"] == 200 and r["skipped_frames"] >= 180 and r["agreement"] == 1.0


def test_shadow_ends_with_a_final_report_once_its_candidate_is_promoted(
        tmp_path, mosquitto, mqtt_recorder, line_model, synth_video):
    # given a daemon serving A with candidate B (same weights, another version) in shadow beside it
    rec = mqtt_recorder("visiond/#")
    serve = tmp_path / "serve"
    serve.mkdir()
    shutil.copy(line_model, serve / "model.ckpt")
    candidate = resaved(line_model, serve / "candidate.ckpt", "candidate")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), "loop": True, "fps": 60}
    d = Daemon(tmp_path, line_cfg(serve / "model.ckpt", mosquitto, [cam], model={"shadow_interval_s": 1}))
    details = lambda: [json.loads(m.payload) for m in rec.messages("visiond/testbox/status/detail")]  # noqa: E731
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("/prediction") for m in ms), 120)
        # (a shadow of the served model itself is refused: it could only agree with itself)
        publish(mosquitto, "visiond/testbox/cmd/shadow", {"checkpoint": "model.ckpt"})
        wait_until(lambda: any("is the served model" in (x.get("last_error") or "") for x in details()), 60,
                   "the refusal of a shadow of the served model")
        publish(mosquitto, "visiond/testbox/cmd/shadow", {"checkpoint": "candidate.ckpt"})
        wait_until(lambda: len(_reports(rec)) >= 2, 60, "shadow reports")
        # when B is promoted into service
        r = visiond("promote", str(serve / "candidate.ckpt"), "--to", str(serve / "model.ckpt"))
        assert r.returncode == 0, r.stderr
        # then shadow stops by itself: the detail says so and reports end
        wait_until(lambda: any(x.get("shadow", "x") is None for x in details()), 60, "shadow stopped")
        time.sleep(0.5)
        n = len(_reports(rec))
        time.sleep(2.5)
        assert len(_reports(rec)) == n
        last = details()[-1]
        assert d.stop() == 0
    finally:
        d.close()
    assert "shadow mode ends with a final report" in d.stderr
    assert all(r["candidate"]["version"] == candidate.version for r in _reports(rec))
    # and the success superseded the earlier error; every time in the detail is RFC 3339 UTC
    assert last["model"]["version"] == candidate.version
    assert last["last_error"] is None and last["last_error_at"] is None
    for t in (last["at"], last["last_reload_at"], last["last_reload"]["at"]):
        assert isinstance(t, str) and t.endswith("Z") and "T" in t
