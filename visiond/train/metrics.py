"""Classification figures as pure functions of labels and scores, so tests can check them by hand.

Conventions follow scikit-learn: a class never predicted has precision 0, and the
macro/weighted averages run over the classes that occur in the truth or the predictions.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows are the true class, columns the predicted one."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def classification_metrics(y_true, y_pred, classes) -> dict:
    """accuracy, per-class precision/recall/F1/support, macro and weighted averages, confusion matrix."""
    classes = list(classes)
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    per_class = {}
    for i, c in enumerate(classes):
        p, r = _ratio(tp[i], predicted[i]), _ratio(tp[i], support[i])
        per_class[c] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": int(support[i])}
    present = [c for i, c in enumerate(classes) if support[i] or predicted[i]]
    total = int(support.sum())

    def macro(key: str) -> float:
        return float(np.mean([per_class[c][key] for c in present])) if present else 0.0

    def weighted(key: str) -> float:
        return _ratio(sum(per_class[c][key] * per_class[c]["support"] for c in classes), total)

    return {
        "accuracy": _ratio(tp.sum(), total),
        "macro_precision": macro("precision"), "macro_recall": macro("recall"), "macro_f1": macro("f1"),
        "weighted_precision": weighted("precision"), "weighted_recall": weighted("recall"),
        "weighted_f1": weighted("f1"),
        "support": total,
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "matrix": cm.tolist()},
    }


def precision_recall_curve(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at every distinct score, highest threshold first.

    A sample counts as flagged when its score >= threshold, the same rule as the daemon's
    `Decider`.
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, pos = scores[order], positive[order]
    tp, fp = np.cumsum(pos), np.cumsum(~pos)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    n_pos = max(int(positive.sum()), 1)
    precision = tp[last] / np.maximum(tp[last] + fp[last], 1)
    return precision, tp[last] / n_pos, s[last]


def threshold_for_recall(scores, positive, target_recall: float = 0.99) -> dict:
    """The highest score threshold whose recall reaches the target, with its precision.

    The highest such threshold keeps the most precision; None when the class has no
    positives to measure recall on.
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return {"threshold": None, "precision": None, "recall": None, "positives": 0}
    need = math.ceil(target_recall * n_pos - 1e-9)
    threshold = float(np.sort(scores[positive])[::-1][max(need, 1) - 1])
    flagged = scores >= threshold
    tp = int((flagged & positive).sum())
    return {"threshold": threshold, "precision": tp / int(flagged.sum()), "recall": tp / n_pos, "positives": n_pos}
