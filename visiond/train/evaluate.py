"""Evaluation of a checkpoint on a dataset split: figures, plots, misclassified images, report.

Probabilities come from `TorchClassifier`, the daemon's own runtime, on images that went
through the daemon's own resize, so the report describes the model as it will be served.
Defect thresholds are chosen for a target recall (missing a defect costs more than a
false alarm) and can be written into the checkpoint, where the daemon's `Decider` reads them.
Calibration is measured twice: the raw scores (T = 1) and the served ones (the checkpoint's
fitted temperature), as expected calibration error and a reliability diagram. `tta` runs the
model through the same test-time augmentation wrapper the daemon uses (`model.tta`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiond.data.augment import PRESETS
from visiond.errors import UserError
from visiond.fsutil import atomic_write_text
from visiond.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.models.tta import TTA_MODES, with_tta
from visiond.train import calibrate
from visiond.train.data import ImageDataset, load_splits
from visiond.train.metrics import classification_metrics, precision_recall_curve, threshold_for_recall

__all__ = ["EvaluateOptions", "EvaluationReport", "evaluate_checkpoint", "classification_metrics",
           "precision_recall_curve", "threshold_for_recall", "write_thresholds"]

log = logging.getLogger(__name__)
SPLIT_CHOICES = ("train", "val", "test", "all")
MAX_MISCLASSIFIED = 64


@dataclass
class EvaluateOptions:
    checkpoint: Path
    dataset: Path
    out: Path
    split: str = "test"
    defect_classes: tuple[str, ...] = ()   # empty: the checkpoint's meta["defect_classes"]
    target_recall: float = 0.99
    write_threshold: bool = False
    device: str = "cpu"
    batch_size: int = 64
    tta: str = "none"   # none | flip | flip+crop


@dataclass
class EvaluationReport:
    metrics: dict
    thresholds: dict[str, dict]
    files: dict[str, Path] = field(default_factory=dict)
    new_version: str | None = None


def predict_dataset(clf, ds: ImageDataset, batch_size: int = 64) -> np.ndarray:
    """N x classes probabilities, in the dataset's order, through the serving runtime."""
    out = []
    for start in range(0, len(ds), batch_size):
        batch = np.stack([ds.image_hwc(i) for i in range(start, min(start + batch_size, len(ds)))])
        out.append(clf.predict(batch))
    return np.concatenate(out) if out else np.zeros((0, len(clf.classes)), np.float32)


def _samples(opts: EvaluateOptions, ckpt: Checkpoint):
    if opts.split not in SPLIT_CHOICES:
        raise UserError(f"--split {opts.split!r}: expected one of {', '.join(SPLIT_CHOICES)}")
    splits = load_splits(opts.dataset, classes=list(ckpt.classes))
    samples = splits.train + splits.val + splits.test if opts.split == "all" else getattr(splits, opts.split)
    if not samples:
        raise UserError(f"{opts.dataset}: no samples in split {opts.split!r}")
    return splits.root, samples


def _defect_classes(opts: EvaluateOptions, ckpt: Checkpoint) -> list[str]:
    chosen = list(opts.defect_classes) or list(ckpt.meta.get("defect_classes") or [])
    unknown = [c for c in chosen if c not in ckpt.classes]
    if unknown:
        raise UserError(f"--defect-classes {unknown}: not among the model's classes {list(ckpt.classes)}")
    return chosen


def _misclassified_sheet(ds: ImageDataset, y_true, probs, classes, path: Path) -> Path | None:
    from visiond.data.stats import contact_sheet_images

    y_pred = probs.argmax(1)
    wrong = np.nonzero(y_pred != y_true)[0]
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:MAX_MISCLASSIFIED]  # surest first
    if not len(wrong):
        return None
    tiles = []
    for i in wrong:
        img = ds.image_hwc(int(i))
        bgr = img[:, :, ::-1] if img.shape[2] == 3 else img
        tiles.append((np.ascontiguousarray(bgr), f"{classes[y_true[i]]}>{classes[y_pred[i]]} {probs[i, y_pred[i]]:.2f}"))
    return contact_sheet_images(tiles, path, columns=8, tile=128)


def write_thresholds(checkpoint: Path, thresholds: dict[str, float], target_recall: float) -> Checkpoint:
    """Re-save the checkpoint with meta['thresholds'] updated: a new content hash, so a new version."""
    ckpt = load_checkpoint(checkpoint)
    meta = dict(ckpt.meta)
    meta["thresholds"] = {**meta.get("thresholds", {}), **{k: float(v) for k, v in thresholds.items()}}
    meta["threshold_target_recall"] = target_recall
    return save_checkpoint(checkpoint, arch=ckpt.arch, classes=ckpt.classes, spec=ckpt.spec,
                           state_dict=ckpt.state_dict, arch_args=ckpt.arch_args, meta=meta, name=ckpt.name)


def evaluate_checkpoint(opts: EvaluateOptions) -> EvaluationReport:
    """Run the model over one split and write metrics.json, report.md and the figures into opts.out."""
    from visiond.train import plots

    if not 0 < opts.target_recall <= 1:
        raise UserError(f"--target-recall {opts.target_recall}: expected a fraction in (0, 1]")
    if opts.tta not in TTA_MODES:
        raise UserError(f"--tta {opts.tta!r}: expected one of {', '.join(TTA_MODES)}")
    ckpt = load_checkpoint(opts.checkpoint)
    defects = _defect_classes(opts, ckpt)
    root, samples = _samples(opts, ckpt)
    ds = ImageDataset(root, samples, list(ckpt.classes), ckpt.spec)
    if len(ds) == 0:
        raise UserError(f"{opts.dataset}: no readable images in split {opts.split!r}")
    clf = TorchClassifier(ckpt, device=opts.device, precision="fp32", threads=0)
    model = with_tta(clf, opts.tta, ckpt, PRESETS)
    t0 = time.perf_counter()
    probs = predict_dataset(model, ds, opts.batch_size)  # as served: the checkpoint's temperature applied
    seconds = time.perf_counter() - t0
    classes, y_true = list(ckpt.classes), ds.labels
    metrics = classification_metrics(y_true, probs.argmax(1), classes)
    metrics.update(checkpoint=str(opts.checkpoint), version=ckpt.version, split=opts.split,
                   skipped_unreadable=[s.path for s in ds.skipped], tta=opts.tta,
                   tta_views=list(getattr(model, "views", ("image",))), inference_seconds=round(seconds, 3))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"confusion_matrix_png": plots.confusion_png(metrics["confusion_matrix"]["matrix"], classes,
                                                         out / "confusion_matrix.png")}
    metrics["calibration"] = _calibration(model, clf, ds, probs, opts.batch_size)
    files["reliability_png"] = _reliability_png(metrics["calibration"], out / "reliability.png")
    atomic_write_text(out / "confusion_matrix.json", json.dumps(metrics["confusion_matrix"], indent=1))
    files["confusion_matrix_json"] = out / "confusion_matrix.json"
    sheet = _misclassified_sheet(ds, y_true, probs, classes, out / "misclassified.png")
    if sheet:
        files["misclassified"] = sheet
    thresholds = {}
    for c in defects:
        k = classes.index(c)
        thresholds[c] = threshold_for_recall(probs[:, k], y_true == k, opts.target_recall)
        p, r, _ = precision_recall_curve(probs[:, k], y_true == k)
        files[f"pr_{c}"] = plots.pr_curve_png(c, p, r, thresholds[c], opts.target_recall, out / f"pr_{c}.png")
    metrics["defect_thresholds"] = {"target_recall": opts.target_recall, "classes": thresholds}
    report = EvaluationReport(metrics, thresholds, files)
    if opts.write_threshold:
        usable = {c: t["threshold"] for c, t in thresholds.items() if t["threshold"] is not None}
        if not usable:
            raise UserError("--write-threshold: no defect class with positives in this split "
                            "(name them with --defect-classes)")
        report.new_version = write_thresholds(opts.checkpoint, usable, opts.target_recall).version
        metrics["written_version"] = report.new_version
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    files["metrics"] = out / "metrics.json"
    files["report"] = _write_report(out / "report.md", ckpt, opts, metrics, files)
    return report


def _calibration(model, clf: TorchClassifier, ds: ImageDataset, probs: np.ndarray, batch_size: int) -> dict:
    """ECE (and NLL, reliability bins) of the raw scores (T = 1) and of the served ones (fitted T)."""
    temperature = clf.temperature
    if temperature != 1.0:
        clf.temperature = 1.0  # the same runtime (and TTA views), only the temperature taken out
        try:
            raw = predict_dataset(model, ds, batch_size)
        finally:
            clf.temperature = temperature
    else:
        raw = probs
    y = ds.labels
    result = {"temperature": temperature, "bins": calibrate.ECE_BINS}
    for key, p in (("uncalibrated", raw), ("calibrated", probs)):
        picked = np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)
        result[key] = {"temperature": 1.0 if key == "uncalibrated" else temperature,
                       "ece": calibrate.expected_calibration_error(p, y),
                       "nll": float(-np.log(picked).mean()) if len(y) else 0.0,
                       "mean_confidence": float(p.max(1).mean()) if len(y) else 0.0,
                       "reliability": calibrate.reliability_bins(p, y)}
    result["ece_uncalibrated"], result["ece_calibrated"] = result["uncalibrated"]["ece"], result["calibrated"]["ece"]
    return result


def _reliability_png(cal: dict, path: Path) -> Path:
    from visiond.train import plots

    t = cal["temperature"]
    if t == 1.0:
        panels = [("T = 1 (no temperature fitted)", cal["calibrated"]["reliability"], cal["calibrated"]["ece"])]
    else:
        panels = [("uncalibrated, T = 1", cal["uncalibrated"]["reliability"], cal["uncalibrated"]["ece"]),
                  (f"calibrated, T = {t:.3g}", cal["calibrated"]["reliability"], cal["calibrated"]["ece"])]
    return plots.reliability_png(panels, path)


def _write_report(path: Path, ckpt: Checkpoint, opts: EvaluateOptions, m: dict, files: dict) -> Path:
    lines = [f"# Evaluation of `{ckpt.name}` (version {ckpt.version})", "",
             f"- checkpoint: `{opts.checkpoint}` ({ckpt.arch}, {len(ckpt.classes)} classes, "
             f"input {ckpt.spec.height}x{ckpt.spec.width} {ckpt.spec.color})",
             f"- dataset: `{opts.dataset}`, split **{opts.split}**, {m['support']} images"
             + (f" ({len(m['skipped_unreadable'])} unreadable skipped)" if m["skipped_unreadable"] else ""),
             f"- accuracy **{m['accuracy']:.4f}**, macro-F1 **{m['macro_f1']:.4f}**, "
             f"weighted-F1 {m['weighted_f1']:.4f}", "",
             "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |")
    lines.append(f"| *macro avg* | {m['macro_precision']:.4f} | {m['macro_recall']:.4f} | {m['macro_f1']:.4f} | "
                 f"{m['support']} |")
    lines.append(f"| *weighted avg* | {m['weighted_precision']:.4f} | {m['weighted_recall']:.4f} | "
                 f"{m['weighted_f1']:.4f} | {m['support']} |")
    cal = m["calibration"]
    lines += ["", f"## Calibration ({cal['bins']} equal-width bins, top label)", "",
              "| scores | temperature | ECE | NLL | mean confidence |", "|---|---:|---:|---:|---:|"]
    for key in ("uncalibrated", "calibrated"):
        c = cal[key]
        lines.append(f"| {key} | {c['temperature']:.4g} | {c['ece']:.4f} | {c['nll']:.4f} | "
                     f"{c['mean_confidence']:.4f} |")
    if cal["temperature"] == 1.0:
        lines += ["", "The checkpoint has no fitted temperature (T = 1): its scores are the raw softmax."]
    if m["tta"] != "none":
        lines += ["", f"Test-time augmentation `{m['tta']}`: probabilities averaged over {len(m['tta_views'])} "
                  f"views ({', '.join(m['tta_views'])})."]
    lines += ["", "![reliability](reliability.png)"]
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "", "![confusion](confusion_matrix.png)"]
    lines += ["", "## Misclassified images", ""]
    lines.append("![misclassified](misclassified.png)" if "misclassified" in files else "None: every image is right.")
    thr = m["defect_thresholds"]
    if thr["classes"]:
        lines += ["", f"## Defect thresholds (target recall {thr['target_recall']})", "",
                  "| class | threshold | precision | recall | positives |", "|---|---:|---:|---:|---:|"]
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        for c, t in thr["classes"].items():
            lines.append(f"| {c} | {fmt(t['threshold'])} | {fmt(t['precision'])} | {fmt(t['recall'])} | "
                         f"{t['positives']} |")
        lines += [""] + [f"![pr {c}](pr_{c}.png)" for c in thr["classes"]]
        if m.get("written_version"):
            lines += ["", f"Thresholds written into the checkpoint: new version {m['written_version']}."]
    path.write_text("\n".join(lines) + "\n")
    return path
