"""A burst's verdicts folded per ROI and per part; the inspection payload's schema (DESIGN.md, "Inspecting parts")."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import pytest

from visiond.config import DecideConfig
from visiond.serve.decide import Decider
from visiond.serve.inspect.aggregate import AGGREGATES, RoiOutcome, aggregate_roi, part_verdict

CLASSES = ("ok", "scratch", "spot")


def decider(threshold: float = 0.5, defect_classes=("scratch",)) -> Decider:
    return Decider(CLASSES, DecideConfig(defect_classes=list(defect_classes), threshold=threshold))


def burst(*rows) -> np.ndarray:
    return np.array(rows, np.float32)


# one scratch frame in three; the mean scratch (0.3) stays under the threshold
ONE_WEAK = burst([0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.7, 0.2, 0.1])
# one strong scratch frame in three; the mean scratch (0.533) crosses the threshold
ONE_STRONG = burst([0.55, 0.35, 0.1], [0.05, 0.9, 0.05], [0.55, 0.35, 0.1])


def test_worst_calls_the_roi_a_defect_when_any_frame_is():
    out = aggregate_roi("screw_left", ONE_WEAK, decider(), "worst")
    assert out.defect is True
    assert (out.label, out.score) == ("scratch", pytest.approx(0.6))  # the frame that showed it
    assert out.top[0] == ("scratch", pytest.approx(0.6))
    assert [v.label for v in out.frames] == ["ok", "scratch", "ok"]
    assert [v.defect for v in out.frames] == [False, True, False]


def test_majority_needs_more_than_half_the_frames():
    out = aggregate_roi("screw_left", ONE_WEAK, decider(), "majority")
    assert out.defect is False
    assert (out.label, out.score) == ("ok", pytest.approx(0.75))  # mean of the two "ok" frames
    assert out.top[0] == ("ok", pytest.approx(0.6))  # the mean probabilities' ranking
    # two of three frames are
    two = burst([0.3, 0.6, 0.1], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1])
    out = aggregate_roi("screw_left", two, decider(), "majority")
    assert out.defect is True and (out.label, out.score) == ("scratch", pytest.approx(0.65))


def test_majority_one_of_two_is_ok_and_a_label_tie_goes_to_the_higher_mean_score():
    out = aggregate_roi("screw_left", burst([0.6, 0.3, 0.1], [0.2, 0.7, 0.1]), decider(), "majority")
    assert out.defect is False
    assert (out.label, out.score) == ("scratch", pytest.approx(0.7))
    out = aggregate_roi("screw_left", burst([0.9, 0.05, 0.05], [0.3, 0.6, 0.1]), decider(), "majority")
    assert out.defect is False
    assert (out.label, out.score) == ("ok", pytest.approx(0.9))


def test_mean_depends_on_the_averaged_probabilities():
    weak = aggregate_roi("screw_left", ONE_WEAK, decider(), "mean")
    assert weak.defect is False and (weak.label, weak.score) == ("ok", pytest.approx(0.6))
    strong = aggregate_roi("screw_left", ONE_STRONG, decider(), "mean")
    assert strong.defect is True and (strong.label, strong.score) == ("scratch", pytest.approx(1.6 / 3))
    assert [label for label, _ in strong.top] == ["scratch", "ok", "spot"]
    # the same strong burst is OK by majority and NG by worst
    assert aggregate_roi("screw_left", ONE_STRONG, decider(), "majority").defect is False
    assert aggregate_roi("screw_left", ONE_STRONG, decider(), "worst").defect is True


def test_worst_reports_the_strongest_defect_class_not_the_highest_top_score():
    probs = burst([0.05, 0.55, 0.40],   # scratch 0.55: a defect
                  [0.0, 0.2, 0.8],      # spot is not a defect class here, however sure
                  [0.0, 0.7, 0.3])      # scratch 0.7: the clearest defect
    out = aggregate_roi("screw_left", probs, decider(), "worst")
    assert out.defect is True and (out.label, out.score) == ("scratch", pytest.approx(0.7))
    # a defect frame whose top label is "ok" still wins over a clean frame with a big top score
    probs = burst([0.95, 0.03, 0.02], [0.45, 0.40, 0.15])
    out = aggregate_roi("screw_left", probs, decider(threshold=0.35), "worst")
    assert out.defect is True and (out.label, out.score) == ("ok", pytest.approx(0.45))


def test_worst_without_a_defect_reports_the_closest_call():
    probs = burst([0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.7, 0.2, 0.1])
    out = aggregate_roi("screw_left", probs, decider(), "worst")
    assert out.defect is False and (out.label, out.score) == ("ok", pytest.approx(0.5))
    # with no defect classes at all, frame 0 stands for the burst
    out = aggregate_roi("screw_left", probs, decider(defect_classes=()), "worst")
    assert out.defect is False and (out.label, out.score) == ("ok", pytest.approx(0.9))


def test_each_roi_applies_its_own_threshold():
    probs = burst([0.5, 0.45, 0.05], [0.6, 0.35, 0.05], [0.8, 0.15, 0.05])  # mean scratch 0.317
    low, high = decider(threshold=0.3), decider(threshold=0.7)
    assert [aggregate_roi("label", probs, low, how).defect for how in AGGREGATES] == [True, True, True]
    assert [aggregate_roi("label", probs, high, how).defect for how in AGGREGATES] == [False, False, False]


def test_the_part_is_ng_when_any_roi_is():
    ok = aggregate_roi("screw_left", ONE_WEAK, decider(), "mean")
    ng = aggregate_roi("screw_right", ONE_WEAK, decider(), "worst")
    assert part_verdict([ok, ok]) == "OK"
    assert part_verdict([ok, ng]) == "NG"
    assert part_verdict((ng,)) == "NG"
    with pytest.raises(ValueError, match="at least one ROI"):
        part_verdict([])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown aggregate 'best': expected one of worst, majority, mean"):
        aggregate_roi("screw_left", ONE_WEAK, decider(), "best")
    with pytest.raises(ValueError, match=r"ROI 'screw_left': expected F x 3 probabilities .* got shape \(3, 2\)"):
        aggregate_roi("screw_left", ONE_WEAK[:, :2], decider(), "worst")
    with pytest.raises(ValueError, match=r"got shape \(0, 3\)"):
        aggregate_roi("screw_left", ONE_WEAK[:0], decider(), "worst")


# ---------------------------------------------------------------- visiond.inspection/1


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("visiond").joinpath("schemas", "inspection.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


MODEL = {"name": "smallcnn", "version": "3f9a1c"}


def roi_doc(out: RoiOutcome) -> dict:
    return {"name": out.name, "label": out.label, "score": round(out.score, 6), "defect": out.defect,
            "top": [{"label": k, "score": round(s, 6)} for k, s in out.top],
            "frames": [{"label": v.label, "score": round(v.score, 6), "defect": v.defect} for v in out.frames],
            "model": MODEL}


def ng_payload() -> dict:
    rois = [aggregate_roi("screw_left", ONE_WEAK, decider(), "worst"),
            aggregate_roi("label", ONE_WEAK, decider(threshold=0.7), "worst")]
    return {
        "schema": "visiond.inspection/1", "id": "0b8e5c1e-2f4a-4c3b-9d1e-7a6f5e4d3c2b", "job_id": "j-20240501-000042",
        "node": "line1-box", "camera": "station1", "seq": 42, "part_id": "P-0001234", "trigger_id": "plc-77",
        "door": "mqtt", "recipe": "part-a", "verdict": part_verdict(rois), "reason": None, "detail": None,
        "rois": [roi_doc(r) for r in rois],
        "frames": [{"captured_at": f"2024-05-01T12:00:00.{us:06d}Z", "index": i}
                   for i, us in enumerate((100000, 130000, 160000))],
        "models": {"screw_left": MODEL, "label": MODEL},
        "triggered_at": "2024-05-01T12:00:00.090000Z", "decided_at": "2024-05-01T12:00:00.201000Z",
        "latency_ms": {"burst": 70.0, "inference": 12.5, "total": 111.0},
        "evidence": ["2024-05-01/station1/j-20240501-000042/screw_left.jpg"],
    }


def error_payload() -> dict:
    return {
        "schema": "visiond.inspection/1", "id": "9a1d3e5f-7b2c-4d6e-8f01-23456789abcd", "job_id": "j-20240501-000043",
        "node": "line1-box", "camera": "station1", "seq": 43, "part_id": "P-0001235", "trigger_id": None,
        "door": "modbus", "recipe": None, "verdict": "ERROR", "reason": "deadline",
        "detail": "no frame within deadline_ms=2000 (camera last seen 3.1 s ago)",
        "rois": [], "frames": [], "models": {},
        "triggered_at": "2024-05-01T12:00:01.000000Z", "decided_at": "2024-05-01T12:00:03.000500Z",
        "latency_ms": {"burst": 2000.5, "inference": 0.0, "total": 2000.5}, "evidence": None,
    }


def test_inspection_payloads_match_the_schema():
    check = validator()
    ng = ng_payload()
    assert ng["verdict"] == "NG" and [r["defect"] for r in ng["rois"]] == [True, False]
    assert [len(r["frames"]) for r in ng["rois"]] == [3, 3]
    check.validate(ng)
    check.validate(error_payload())


@pytest.mark.parametrize("what, where, change", [
    ("an ERROR without a reason", "$.reason", lambda d: d.update(reason=None)),
    ("an ERROR with a sentence for a reason", "$.reason", lambda d: d.update(reason="Camera down")),
    ("an OK with a reason", "$.reason", lambda d: d.update(verdict="OK", reason="deadline")),
    ("an NG with a reason", "$.reason", lambda d: d.update(verdict="NG", reason="busy")),
    ("a reason key left out", "$", lambda d: d.pop("reason")),
    ("an evidence path with '..'", "$.evidence[0]", lambda d: d.update(evidence=["2024-05-01/../../etc/passwd"])),
    ("an evidence path that is only '..'", "$.evidence[0]", lambda d: d.update(evidence=[".."])),
    ("an absolute evidence path", "$.evidence[0]", lambda d: d.update(evidence=["/var/lib/visiond/evidence/a.jpg"])),
    ("a multi-line detail", "$.detail", lambda d: d.update(detail="one\ntwo")),
    ("an unknown door", "$.door", lambda d: d.update(door="serial")),
    ("a timestamp without microseconds", "$.decided_at", lambda d: d.update(decided_at="2024-05-01T12:00:03Z")),
    ("an extra key", "$", lambda d: d.update(extra=1)),
])
def test_the_schema_rejects(what, where, change):
    doc = error_payload()
    change(doc)
    assert [e.json_path for e in validator().iter_errors(doc)] == [where], what


def test_an_ng_with_a_parent_segment_in_its_evidence_is_rejected_but_dots_in_names_are_fine():
    check = validator()
    doc = ng_payload()
    doc["evidence"] = ["2024-05-01/station1/..hidden/x.jpg", "a/b.c/d..e.jpg"]
    check.validate(doc)
    doc["evidence"] = ["2024-05-01/station1/../x.jpg"]
    with pytest.raises(jsonschema.ValidationError):
        check.validate(doc)
