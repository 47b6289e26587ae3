"""Scores that mean what they say: expected calibration error and temperature scaling.

The daemon's thresholds and capture rules read a score as confidence, so a model that says
0.99 should be right 99 times in 100. Networks trained to low loss are usually overconfident.
Temperature scaling (Guo et al. 2017) divides the logits by one number T fitted on the
validation split by minimising the negative log-likelihood: the ranking, so the accuracy, is
unchanged, only the scores move. T is stored in the checkpoint (`meta.temperature`) and every
runtime and export applies it (`TorchClassifier`, `ExportModule`).

ECE is top-label with 15 equal-width confidence bins: sum over bins of
(bin size / n) * |accuracy in the bin - mean confidence in the bin|.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from visiond.data.manifest import Sample
from visiond.models.checkpoint import TEMPERATURE_RANGE, Checkpoint, load_checkpoint, save_checkpoint
from visiond.models.runtime import resolve_device
from visiond.preprocess import Normalizer
from visiond.train.data import ImageDataset

log = logging.getLogger(__name__)
ECE_BINS = 15
MIN_CALIBRATION_IMAGES = 20  # fewer and the fitted T is noise; keep 1.0


def _as_arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probabilities {probs.shape} and labels {labels.shape}: expected N x classes and N")
    return probs, labels


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin (lo, hi]: count, mean confidence, accuracy (None when empty)."""
    probs, labels = _as_arrays(probs, labels)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    correct_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
            "confidence": [float(c / n) if n else None for c, n in zip(conf_sum, count)],
            "accuracy": [float(a / n) if n else None for a, n in zip(correct_sum, count)]}


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """Top-label ECE with `bins` equal-width bins; 0.0 for no samples."""
    r = reliability_bins(probs, labels, bins)
    n = sum(r["count"])
    if not n:
        return 0.0
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return float(torch.nn.functional.cross_entropy(z, y))


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_RANGE, iters: int = 80) -> float:
    """The T in `bounds` minimising the NLL of softmax(logits / T).

    The NLL is convex in 1/T (log-sum-exp of a linear function minus a linear function), so a
    golden-section search over 1/T finds the minimum deterministically, bounds included.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or not len(y):
        raise ValueError(f"logits {tuple(z.shape)} and labels {tuple(y.shape)}: expected N x classes and N, N > 0")

    def f(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(z * beta, y))

    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    g = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    candidates = [(f(x), x) for x in (1.0 / bounds[1], 1.0 / bounds[0], (lo + hi) / 2)]
    beta = min(candidates)[1]
    return float(min(max(1.0 / beta, bounds[0]), bounds[1]))


def calibration_summary(logits, labels, temperature: float, bins: int = ECE_BINS) -> dict:
    """ECE and NLL at T = 1 and at `temperature` (what the report and the checkpoint say)."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {"temperature": float(temperature), "bins": bins, "images": int(len(labels)),
            "ece_before": expected_calibration_error(before, labels, bins),
            "ece_after": expected_calibration_error(after, labels, bins),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature)}


def dataset_logits(ckpt: Checkpoint, root: Path, samples: list[Sample], device: str | torch.device = "cpu",
                   batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """fp32 logits (before temperature) and labels of the readable samples, preprocessed as the daemon does."""
    ds = ImageDataset(root, samples, list(ckpt.classes), ckpt.spec)
    dev = resolve_device(str(device))
    net, norm = ckpt.build().to(dev), Normalizer(ckpt.spec).to(dev)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ds), batch_size):
            batch = np.stack([ds.image_hwc(i) for i in range(start, min(start + batch_size, len(ds)))])
            out.append(net(norm(torch.from_numpy(batch).to(dev))).float().cpu().numpy())
    logits = np.concatenate(out) if out else np.zeros((0, len(ckpt.classes)), np.float32)
    return logits, ds.labels


def write_temperature(checkpoint: str | Path, temperature: float, summary: dict | None = None) -> Checkpoint:
    """Re-save the checkpoint with meta['temperature'] (and how it was fitted): a new content hash, a new version."""
    ckpt = load_checkpoint(checkpoint)
    meta = dict(ckpt.meta)
    meta["temperature"] = float(temperature)
    if summary is not None:
        meta["calibration"] = summary
    return save_checkpoint(checkpoint, arch=ckpt.arch, classes=ckpt.classes, spec=ckpt.spec,
                           state_dict=ckpt.state_dict, arch_args=ckpt.arch_args, meta=meta, name=ckpt.name)


def calibrate_checkpoint(checkpoint: str | Path, root: Path, val: list[Sample],
                         device: str | torch.device = "cpu") -> dict | None:
    """Fit T on the validation samples and store it in the checkpoint; the summary, or None when not fitted.

    Not fitted (T stays as it is) when the validation split is missing or tiny, or when the model
    makes no mistake on it: then the NLL falls all the way to T -> 0 and the scores would all become 1.
    """
    path = Path(checkpoint)
    if not path.exists():
        log.warning("calibration: %s not written, no temperature fitted", path)
        return None
    if len(val) < MIN_CALIBRATION_IMAGES:
        log.warning("calibration: %d validation image(s), fewer than %d: temperature not fitted (scores stay "
                    "uncalibrated, T = 1)", len(val), MIN_CALIBRATION_IMAGES)
        return None
    ckpt = load_checkpoint(path)
    logits, labels = dataset_logits(ckpt, root, val, device)
    if len(labels) < MIN_CALIBRATION_IMAGES:
        log.warning("calibration: only %d readable validation image(s): temperature not fitted", len(labels))
        return None
    if bool((logits.argmax(1) == labels).all()):
        log.warning("calibration: the model makes no mistake on the %d validation images, nothing to calibrate "
                    "against: temperature stays 1.0", len(labels))
        return None
    t = fit_temperature(logits, labels)
    summary = {**calibration_summary(logits, labels, t), "split": "val"}
    if t in TEMPERATURE_RANGE:
        log.warning("calibration: the fitted temperature hit its bound %g", t)
    saved = write_temperature(path, t, summary)
    log.info("calibration: temperature %.3f fitted on %d validation images: ECE %.4f -> %.4f, NLL %.4f -> %.4f "
             "(%s, version %s)", t, len(labels), summary["ece_before"], summary["ece_after"], summary["nll_before"],
             summary["nll_after"], path, saved.version)
    return summary
