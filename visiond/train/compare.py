"""Two checkpoints on the same split of the same dataset: per-class figures side by side.

Used before a promote: "does the new model fix the class we retrained for without
breaking the others?". Both models go through the serving runtime on the daemon's own
resize (`visiond.train.evaluate.predict_dataset`). Their class lists may differ (a
retrain that learnt a new defect): the table runs over the union, and a class one model
does not know counts as never predicted by it, so its recall there is 0, as in service.

A model scored on images it was trained on looks better than it is, so the evaluated
images are first checked against each checkpoint's training set (`membership`): any
overlap is refused unless asked for, and then reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiond.errors import UserError
from visiond.fsutil import atomic_write_text
from visiond.models.checkpoint import Checkpoint, load_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.train.data import ImageDataset, load_splits
from visiond.train.evaluate import SPLIT_CHOICES, predict_dataset
from visiond.train.membership import members, sample_digest
from visiond.train.metrics import classification_metrics

log = logging.getLogger(__name__)
FIGURES = ("precision", "recall", "f1")


@dataclass
class ClassDiff:
    label: str
    support: int
    old: dict  # precision, recall, f1 (None when the model does not know the class)
    new: dict

    def delta(self, key: str) -> float | None:
        a, b = self.old.get(key), self.new.get(key)
        return None if a is None or b is None else b - a


@dataclass
class CompareReport:
    split: str
    classes: list[str]
    rows: list[ClassDiff]
    old: dict   # accuracy, macro_f1, version, name, checkpoint
    new: dict
    overlap: dict[str, int | None] = field(default_factory=dict)  # old/new -> evaluated images it trained on
    warnings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"split": self.split, "classes": self.classes, "old": self.old, "new": self.new,
                "overlap": self.overlap, "warnings": self.warnings,
                "per_class": {r.label: {"support": r.support, "old": r.old, "new": r.new,
                                        "delta": {k: r.delta(k) for k in FIGURES}} for r in self.rows}}


def _predict_union(ckpt: Checkpoint, root: Path, samples, union: list[str], device: str) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) as indices into `union`, for the samples this model can read."""
    ds = ImageDataset(root, samples, union, ckpt.spec)
    if len(ds) == 0:
        raise UserError(f"{root}: no readable images in the split")
    clf = TorchClassifier(ckpt, device=device, precision="fp32", threads=0)
    probs = predict_dataset(clf, ds)
    to_union = np.array([union.index(c) for c in ckpt.classes], dtype=np.int64)
    return ds.labels, to_union[probs.argmax(1)]


def _summary(ckpt: Checkpoint, path: Path, m: dict) -> dict:
    return {"checkpoint": str(path), "name": ckpt.name, "version": ckpt.version, "classes": list(ckpt.classes),
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "support": m["support"]}


def check_overlap(models: dict[str, tuple[Checkpoint, Path]], root: Path, samples, split: str,
                  allow: bool) -> tuple[dict[str, int | None], list[str]]:
    """(role -> how many evaluated images that model trained on, None when it does not say; warnings).

    Any overlap is refused unless `allow`, or unless the train split itself is what is evaluated.
    """
    digests = [d for d in (sample_digest(root, s) for s in samples) if d is not None]
    of = f"of {len(samples)} " + ("images" if split == "all" else f"{split} images")
    overlap, flattered, notes, seen = {}, [], [], set()
    for role, (ckpt, path) in models.items():
        train = members(ckpt.meta, "train")
        if train is None:
            overlap[role] = None
            notes.append(f"{role.upper()} {path} does not list its training images (trained before they were "
                         f"recorded): could not check that none of them is in the {split} split")
            continue
        overlap[role] = sum(d in train for d in digests)
        seen |= train
        if overlap[role]:
            flattered.append(f"{overlap[role]} {of} were in the training set of "
                             f"{role.upper()} {path}: its figures are flattered")
        val = members(ckpt.meta, "val") or set()
        in_val = sum(d in val for d in digests)
        if in_val and split != "val":
            notes.append(f"{in_val} {of} were in the validation set of "
                         f"{role.upper()} {path} (seen in training to score it, not learnt from)")
    if flattered and not allow and split != "train":
        counts = ", ".join(f"{role.upper()} {models[role][1]}: {n}" for role, n in overlap.items() if n)
        raise UserError(
            f"compare: {sum(d in seen for d in digests)} {of} were in a model's "
            f"training set ({counts}), so the comparison would flatter the model that saw them; compare on images "
            f"neither model trained on (the split they were trained with: `visiond dataset split` without "
            f"--reshuffle keeps it; or retrain on this one), or pass --allow-overlap to compare anyway")
    return overlap, flattered + notes


def compare_checkpoints(old_path: str | Path, new_path: str | Path, dataset: str | Path, *, split: str = "test",
                        out: str | Path | None = None, device: str = "cpu",
                        allow_overlap: bool = False) -> CompareReport:
    """Evaluate both on one split; write compare.json and compare.png into `out` when given.

    Evaluated images that either model trained on are refused (UserError) unless `allow_overlap`.
    """
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    old_path, new_path = Path(old_path), Path(new_path)
    old, new = load_checkpoint(old_path), load_checkpoint(new_path)
    union = list(new.classes) + [c for c in old.classes if c not in new.classes]
    splits = load_splits(dataset, classes=union)  # the split does not depend on the models: both see the same one
    union = splits.classes
    samples = splits.train + splits.val + splits.test if split == "all" else getattr(splits, split)
    if not samples:
        raise UserError(f"{dataset}: no samples in split {split!r}")
    overlap, warnings = check_overlap({"old": (old, old_path), "new": (new, new_path)}, splits.root, samples,
                                      split, allow_overlap)
    y_old_true, y_old = _predict_union(old, splits.root, samples, union, device)
    y_new_true, y_new = _predict_union(new, splits.root, samples, union, device)
    if not np.array_equal(y_old_true, y_new_true):
        raise UserError(f"{dataset}: the two models could not read the same images; check the dataset")
    m_old = classification_metrics(y_old_true, y_old, union)
    m_new = classification_metrics(y_new_true, y_new, union)
    present = [c for c in union if m_old["per_class"][c]["support"] or m_new["per_class"][c]["support"]
               or c in old.classes or c in new.classes]
    rows = []
    for c in present:
        def figures(m, ckpt):
            if c not in ckpt.classes:
                return {"precision": None, "recall": 0.0 if m["per_class"][c]["support"] else None, "f1": None}
            return {k: m["per_class"][c][k] for k in FIGURES}
        rows.append(ClassDiff(c, m_new["per_class"][c]["support"], figures(m_old, old), figures(m_new, new)))
    report = CompareReport(split, union, rows, _summary(old, old_path, m_old), _summary(new, new_path, m_new),
                           overlap, warnings)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", json.dumps(report.to_dict(), indent=1))
        report.files["json"] = out / "compare.json"
        report.files["png"] = compare_png(report, out / "compare.png")
    return report


def compare_png(report: CompareReport, path: Path) -> Path:
    """Grouped bars: precision, recall and F1 per class, old beside new."""
    from visiond.train.plots import _save, plt

    labels = [r.label for r in report.rows]
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.2 * len(labels) * 3), 3.8), sharey=True)
    for ax, key in zip(axes, FIGURES):
        old = [np.nan if r.old.get(key) is None else r.old[key] for r in report.rows]
        new = [np.nan if r.new.get(key) is None else r.new[key] for r in report.rows]
        ax.bar(x - 0.2, old, 0.4, label=f"old {report.old['version'][:8]}", color="#9aa5b1")
        ax.bar(x + 0.2, new, 0.4, label=f"new {report.new['version'][:8]}", color="#2b6cb0")
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title("F1" if key == "f1" else key)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{report.split} split: accuracy {report.old['accuracy']:.3f} -> {report.new['accuracy']:.3f}, "
                 f"macro-F1 {report.old['macro_f1']:.3f} -> {report.new['macro_f1']:.3f}")
    return _save(fig, path)
