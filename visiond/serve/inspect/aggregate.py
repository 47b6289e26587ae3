"""From a burst's per-frame verdicts to one outcome per ROI, and one verdict per part.

A triggered inspection classifies every ROI on each of a burst's F frames;
this module folds those F verdicts into one per ROI (`aggregate_roi`) and the
ROIs into the part's OK/NG (`part_verdict`). Three ways to fold:

- worst (the inspection default): the ROI is a defect if ANY frame shows one.
  A part is bad if any view of it shows the defect, and on a line a missed
  defect (a bad part shipped) costs far more than a re-check of a good one,
  so recall wins over precision. Glare or motion that hides a scratch in two
  frames of three must not out-vote the frame that caught it.
- majority: a defect when more than half the frames are; for stations where
  single-frame noise is the bigger problem.
- mean: average the probabilities, then decide once; smooths borderline scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visiond.serve.decide import Decider, Verdict

AGGREGATES = ("worst", "majority", "mean")


@dataclass(frozen=True)
class RoiOutcome:
    name: str
    label: str
    score: float
    defect: bool
    top: tuple[tuple[str, float], ...]
    frames: tuple[Verdict, ...]  # per-frame verdicts, in burst order


def aggregate_roi(name: str, probs: np.ndarray, decider: Decider, how: str) -> RoiOutcome:
    """F x C probabilities of one ROI over a burst -> its outcome, folded the `how` way."""
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}: expected one of {', '.join(AGGREGATES)}")
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] < 1 or probs.shape[1] != len(decider.classes):
        raise ValueError(f"ROI {name!r}: expected F x {len(decider.classes)} probabilities (F >= 1), "
                         f"got shape {probs.shape}")
    frames = tuple(decider.decide(probs))
    if how == "worst":
        return _worst(name, probs, frames, decider)
    if how == "majority":
        return _majority(name, probs, frames, decider)
    v = decider.decide(probs.mean(axis=0, keepdims=True))[0]
    return RoiOutcome(name, v.label, v.score, v.defect, v.top, frames)


def part_verdict(rois: Sequence[RoiOutcome]) -> str:
    """The part is NG when any ROI is a defect, else OK; no ROIs is an error, never a silent OK."""
    if not rois:
        raise ValueError("part_verdict needs at least one ROI outcome")
    return "NG" if any(r.defect for r in rois) else "OK"


def _worst(name: str, probs: np.ndarray, frames: tuple[Verdict, ...], decider: Decider) -> RoiOutcome:
    """Any defect frame makes the ROI a defect; report the frame that shows it most clearly.

    Among defect frames: the highest probability of a defect class at or above
    its threshold. With no defect frame: the closest call, the frame whose
    highest defect-class probability is largest (frame 0 without defect classes).
    """
    defect = any(v.defect for v in frames)
    pick = 0
    if decider.thresholds:
        idx = np.array([decider.classes.index(c) for c in decider.thresholds], dtype=np.int64)
        thr = np.array(list(decider.thresholds.values()), dtype=np.float32)
        p = probs[:, idx]
        if defect:
            strength = np.where(p >= thr, p, -np.inf).max(axis=1)
            strength[[not v.defect for v in frames]] = -np.inf
        else:
            strength = p.max(axis=1)
        pick = int(np.argmax(strength))
    v = frames[pick]
    return RoiOutcome(name, v.label, v.score, defect, v.top, frames)


def _majority(name: str, probs: np.ndarray, frames: tuple[Verdict, ...], decider: Decider) -> RoiOutcome:
    """Defect when strictly more than half the frames are; label by vote, ties to the higher mean score."""
    defect = 2 * sum(v.defect for v in frames) > len(frames)
    scores: dict[str, list[float]] = {}
    for v in frames:
        scores.setdefault(v.label, []).append(v.score)
    label = max(scores, key=lambda k: (len(scores[k]), float(np.mean(scores[k]))))  # first seen wins a full tie
    top = decider.decide(probs.mean(axis=0, keepdims=True))[0].top
    return RoiOutcome(name, label, float(np.mean(scores[label])), defect, top, frames)
