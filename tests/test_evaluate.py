"""Evaluation: figures against hand-computed values, the report's files, thresholds written into the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shapes import make_shapes_dataset
from visiond.data.manifest import read_manifest, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.preprocess import PreprocessSpec
from visiond.train.evaluate import (
    EvaluateOptions,
    classification_metrics,
    evaluate_checkpoint,
    precision_recall_curve,
    threshold_for_recall,
)
from visiond.train.predict import predict_paths

CLASSES = ["ok", "scratch", "spot", "dent"]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_classification_figures_equal_hand_computed_values():
    # given ten fixed predictions over four classes ('dent' never occurs)
    # when the figures are computed
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    # then they are the ones worked out by hand
    assert m["confusion_matrix"] == {"labels": CLASSES, "matrix": [[2, 1, 1, 0], [1, 2, 0, 0], [0, 1, 2, 0],
                                                                   [0, 0, 0, 0]]}
    assert m["accuracy"] == pytest.approx(0.6)
    pc = m["per_class"]
    assert (pc["ok"]["precision"], pc["ok"]["recall"], pc["ok"]["f1"]) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert (pc["scratch"]["precision"], pc["scratch"]["recall"], pc["scratch"]["f1"]) == pytest.approx((1 / 2, 2 / 3, 4 / 7))
    assert (pc["spot"]["precision"], pc["spot"]["recall"], pc["spot"]["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert [pc[c]["support"] for c in CLASSES] == [4, 3, 3, 0]
    assert pc["dent"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx(38 / 63)  # over the classes that occur, as scikit-learn does
    assert m["weighted_f1"] == pytest.approx(0.6)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)


def test_threshold_for_recall_and_pr_curve_equal_hand_computed_values():
    # given eight scores for a defect class, four of them true defects
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    positive = [1, 1, 0, 1, 0, 0, 1, 0]
    # then each target recall picks the highest threshold that still reaches it
    assert threshold_for_recall(scores, positive, 0.99) == {"threshold": 0.3, "precision": 4 / 7, "recall": 1.0,
                                                            "positives": 4}
    assert threshold_for_recall(scores, positive, 0.75) == {"threshold": 0.6, "precision": 0.75, "recall": 0.75,
                                                            "positives": 4}
    assert threshold_for_recall(scores, positive, 0.5)["threshold"] == 0.8
    assert threshold_for_recall(scores, [0] * 8, 0.99)["threshold"] is None
    # and the curve has one point per distinct score
    p, r, t = precision_recall_curve(scores, positive)
    assert t.tolist() == scores
    assert p == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5, 1 / 2, 4 / 7, 1 / 2])
    assert r == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1, 1])


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> tuple[Path, Path]:
    """A shapes dataset and an untrained (so often wrong) smallcnn checkpoint for it."""
    root = tmp_path_factory.mktemp("eval")
    ds = root / "ds"
    make_shapes_dataset(ds, per_class=20, size=32, seed=4)
    write_manifest(ds, split_dataset(read_manifest(ds), 0.5, 0.25, 0.25, seed=0))
    torch.manual_seed(0)
    net = build_model("smallcnn", 3, 3, 32)
    save_checkpoint(root / "m.ckpt", arch="smallcnn", classes=["circle", "square", "triangle"],
                    spec=PreprocessSpec.for_color(32), state_dict=net.state_dict(),
                    arch_args={"in_channels": 3, "image_size": 32},
                    # (the 'note' only moves the safetensors header length off 1152 = 0x480, whose first
                    # byte 0x80 checkpoint._sniff mistakes for a pickle; reported upstream)
                    meta={"defect_classes": ["triangle"], "note": "untrained"})
    return ds, root / "m.ckpt"


def test_report_files_exist_and_agree_with_predict(untrained, tmp_path):
    ds, ckpt = untrained
    # when the checkpoint is evaluated on the test split
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=ckpt, dataset=ds, out=tmp_path / "rep"))
    # then every file of the report is there
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "confusion_matrix.json", "misclassified.png",
                 "pr_triangle.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix"} <= m.keys()
    assert m["support"] == 15 and set(m["per_class"]) == {"circle", "square", "triangle"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "confusion_matrix.png" in md and "misclassified.png" in md and "pr_triangle.png" in md
    # and its confusion matrix is what `visiond predict` (the serving runtime) says about the same files
    test = [s for s in read_manifest(ds) if s.split == "test"]
    preds = predict_paths(ckpt, [str(ds / s.path) for s in test])
    classes = m["confusion_matrix"]["labels"]
    cm = np.zeros((3, 3), int)
    for s, p in zip(test, preds):
        cm[classes.index(s.label), classes.index(p["label"])] += 1
    assert cm.tolist() == m["confusion_matrix"]["matrix"]
    assert report.thresholds["triangle"]["recall"] >= 0.99


def test_written_threshold_changes_the_version_and_reads_back(untrained, tmp_path):
    ds, original = untrained
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(original.read_bytes())
    before = load_checkpoint(ckpt).version
    # when evaluation writes the 0.99-recall threshold of the defect class
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=ckpt, dataset=ds, out=tmp_path / "rep",
                                                 split="val", write_threshold=True))
    # then the checkpoint has a new version and the daemon-facing accessor returns the threshold
    after = load_checkpoint(ckpt)
    assert after.version == report.new_version != before
    assert after.thresholds == {"triangle": report.thresholds["triangle"]["threshold"]}
    assert after.meta["defect_classes"] == ["triangle"]


def test_unknown_split_or_defect_class_is_a_user_error(untrained, tmp_path):
    ds, ckpt = untrained
    with pytest.raises(UserError, match="expected one of train, val, test, all"):
        evaluate_checkpoint(EvaluateOptions(checkpoint=ckpt, dataset=ds, out=tmp_path, split="dev"))
    with pytest.raises(UserError, match="not among the model's classes"):
        evaluate_checkpoint(EvaluateOptions(checkpoint=ckpt, dataset=ds, out=tmp_path, defect_classes=("dent",)))
