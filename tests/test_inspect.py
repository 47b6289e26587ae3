"""Part inspection end to end: a triggered station on the synthetic line, a PLC over MQTT 5, the results store."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter

from daemon_helpers import Daemon, line_cfg, schema_validator, wait_offline
from visiond.harness.requester import Requester

DEFECTS = {"scratch", "spot"}


def station_cfg(line_model, mosquitto, synth_video, **inspect) -> dict:
    x, y, w, h = synth_video.roi
    cam = {"name": "station1", "source": str(synth_video.path), "loop": True, "fps": 60, "mode": "triggered",
           "rois": [{"name": "centre", "rect": [x, y, w, h]},
                    {"name": "centre_strict", "rect": [x, y, w, h], "threshold": 0.3},
                    {"name": "centre_lax", "rect": [x, y, w, h], "threshold": 0.7}],
           "inspect": {"frames": 3, "interval_ms": 0, "deadline_ms": 3000, "queue": 16, **inspect}}
    return line_cfg(line_model, mosquitto, [cam])


def truth_of(payload: dict, truth: list[str]) -> str:
    """The part's ground truth: NG when any burst frame shows a defect (the `worst` rule on the truth)."""
    labels = [truth[f["index"] % len(truth)] for f in payload["frames"]]
    return "NG" if any(label in DEFECTS for label in labels) else "OK"


def test_triggers_with_response_topic_get_one_verdict_each_matching_the_truth(tmp_path, mosquitto, mqtt_recorder,
                                                                            line_model, synth_video):
    # given a triggered station with 3 ROIs, a subscriber and a PLC that asks with Response Topic + Correlation Data
    rec = mqtt_recorder("visiond/testbox/#")
    d = Daemon(tmp_path, station_cfg(line_model, mosquitto, synth_video))
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("station1/ready") and m.payload == b"ready" for m in ms),
                     60, "station1 ready")
        with Requester(mosquitto.host, mosquitto.port, "testbox") as plc:
            # when 40 parts are triggered, one request each
            corrs = {}
            for i in range(40):  # 20 a second, as parts pass a station
                corrs[f"part-{i}"] = plc.inspect("station1", f"part-{i}")
                time.sleep(0.05)
            missing = plc.wait_all(list(corrs.values()), 60)
            assert not missing, f"{len(missing)} triggers unanswered; stderr: {d.stderr[-2000:]}"
            answers = {part: plc.answers(c) for part, c in corrs.items()}
    finally:
        d.stop()
    # (the PLC's answers say nothing of what the subscriber has: its copies arrive by the time `offline` does)
    wait_offline(rec, 10)
    # then every part got exactly one answer, its own, and valid against the schema
    check = schema_validator("inspection.schema.json")
    for part, got in answers.items():
        assert len(got) == 1, (part, got)
        check.validate(got[0])
        assert got[0]["part_id"] == part and got[0]["verdict"] in ("OK", "NG"), (got[0]["reason"], got[0]["detail"])
        assert [r["name"] for r in got[0]["rois"]] == ["centre", "centre_strict", "centre_lax"]
        assert all(len(r["frames"]) == 3 for r in got[0]["rois"])
    # and the verdicts match the line's ground truth
    docs = [a[0] for a in answers.values()]
    right = sum(doc["verdict"] == truth_of(doc, synth_video.truth) for doc in docs)
    assert right / len(docs) >= 0.85, Counter((truth_of(doc, synth_video.truth), doc["verdict"]) for doc in docs)
    # and the inspection topic carries the same verdicts with a gapless seq
    published = rec.json_payloads("/station1/inspection")
    assert sorted(p["seq"] for p in published) == list(range(1, 41))
    assert {p["id"] for p in published} == {doc["id"] for doc in docs}
    # and the results store holds every one of them
    db = sqlite3.connect(tmp_path / "spool" / "results.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 40
    finally:
        db.close()
    ready = [m.payload for m in rec.messages("visiond/testbox/station1/ready")]
    assert b"busy" in ready and ready[-1] in (b"ready", b"error")
    assert json.loads(rec.messages("visiond/testbox/recipe")[-1].payload)["name"] is None


def test_stream_mode_publishes_per_roi_and_keeps_evidence_of_defect_events(tmp_path, mosquitto, mqtt_recorder,
                                                                        line_model, synth_video):
    # given a stream camera with two named ROIs on the same region (one stricter), and evidence of events on
    x, y, w, h = synth_video.roi
    cam = {"name": "line1", "source": str(synth_video.path),
           "rois": [{"name": "centre", "rect": [x, y, w, h]}, {"name": "strict", "rect": [x, y, w, h],
                                                               "threshold": 0.2}]}
    cfg = line_cfg(line_model, mosquitto, [cam], evidence={"stream_events": True},
                   decide={"defect_classes": ["scratch", "spot"], "debounce": {"n": 2, "m": 3}})
    rec = mqtt_recorder("visiond/testbox/#")
    d = Daemon(tmp_path, cfg)
    try:
        assert d.wait(120) == 0, d.stderr[-3000:]
    finally:
        d.close()
    rec.wait_for(lambda ms: any(m.topic.endswith("/status") and m.payload == b"offline" for m in ms), 10, "offline")
    preds = rec.json_payloads("/line1/prediction")
    # then every frame gave one prediction per ROI, in frame order, each naming its ROI
    n = len(synth_video.truth)
    assert len(preds) == 2 * n and [p["roi"] for p in preds[:4]] == ["centre", "strict", "centre", "strict"]
    check = schema_validator("prediction.schema.json")
    for p in preds[:10]:
        check.validate(p)
    # and defect events are per ROI, each start with the image that started it on disk
    events = rec.json_payloads("/line1/event")
    check = schema_validator("event.schema.json")
    started = [e for e in events if e["kind"] == "defect_started"]
    assert started and {e["roi"] for e in started} == {"centre", "strict"}
    for e in events:
        check.validate(e)
    for e in started:
        assert e["evidence"], e
        for rel in e["evidence"]:
            assert (tmp_path / "spool" / "evidence" / rel).is_file(), rel
