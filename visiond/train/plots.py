"""The PNG figures of training and evaluation (matplotlib, Agg: no display needed on a server)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss, accuracy and macro-F1 per epoch, train beside validation."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("loss", "accuracy", "macro_f1"), ("loss", "accuracy", "macro F1")):
        for prefix, style in (("train_", "-o"), ("val_", "-s")):
            ys = [h.get(prefix + key) for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], style, ms=3, label=prefix.rstrip("_"))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return _save(fig, path)


def confusion_png(matrix: list[list[int]], labels: list[str], path: Path) -> Path:
    """Counts with row-normalised colour, so a rare class's errors are as visible as a common one's."""
    cm = np.asarray(matrix, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    side = min(2 + 0.6 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    return _save(fig, path)


def pr_curve_png(label: str, precision, recall, point: dict, target_recall: float, path: Path) -> Path:
    """One defect class: the precision-recall curve and the threshold that reaches the target recall."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(recall, precision, where="post")
    if point.get("threshold") is not None:
        ax.plot([point["recall"]], [point["precision"]], "ro")
        ax.annotate(f"t={point['threshold']:.4g}\nP={point['precision']:.3f} R={point['recall']:.3f}",
                    (point["recall"], point["precision"]), textcoords="offset points", xytext=(-110, -30))
    ax.axvline(target_recall, color="grey", ls="--", lw=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{label}: precision-recall")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_png(panels: list[tuple[str, dict, float]], path: Path) -> Path:
    """Reliability diagrams side by side (e.g. before and after temperature scaling).

    Each panel is (title, `calibrate.reliability_bins` result, ECE): bars are the accuracy per
    confidence bin, the diagonal is perfect calibration, red is the gap, and the strip below
    counts the images per bin.
    """
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 5.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (title, r, ece) in enumerate(panels):
        edges = np.asarray(r["edges"])
        width, left = np.diff(edges), edges[:-1]
        acc = np.array([np.nan if a is None else a for a in r["accuracy"]])
        conf = np.array([np.nan if c is None else c for c in r["confidence"]])
        top, bottom = axes[0][col], axes[1][col]
        top.bar(left, np.nan_to_num(acc), width, align="edge", edgecolor="black", lw=0.5, label="accuracy")
        gap = np.where(np.isnan(acc), 0, conf - acc)
        top.bar(left, gap, width, bottom=np.nan_to_num(acc), align="edge", color="red", alpha=0.3,
                edgecolor="red", lw=0.5, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{title}: ECE {ece:.4f}")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(left, r["count"], width, align="edge", color="grey", edgecolor="black", lw=0.5)
        bottom.set_yscale("symlog")
        bottom.set_xlabel("confidence (top-label score)")
        bottom.set_ylabel("images")
        bottom.grid(alpha=0.3)
    return _save(fig, path)
