"""From class probabilities to verdicts: top-k, defect thresholds, debounced events."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import islice

import numpy as np

from visiond.config import DecideConfig


@dataclass(frozen=True, slots=True)
class Verdict:
    label: str
    score: float
    top: tuple[tuple[str, float], ...]
    defect: bool


class Decider:
    """Thresholds per defect class: the config's per-class value, else the
    checkpoint's evaluated threshold, else the config's single number.

    A frame is a defect when ANY defect class reaches its threshold, even if it
    is not the top label: a low threshold is how a plant buys recall.
    """

    def __init__(self, classes: tuple[str, ...], cfg: DecideConfig, ckpt_thresholds: dict[str, float] | None = None):
        cfg.check_classes(classes)
        self.classes = classes
        self.top_k = min(cfg.top_k, len(classes))
        self.thresholds = self._thresholds(cfg, ckpt_thresholds or {})
        self._idx = np.array([classes.index(c) for c in self.thresholds], dtype=np.int64)
        self._thr = np.array(list(self.thresholds.values()), dtype=np.float32)

    @staticmethod
    def _thresholds(cfg: DecideConfig, from_ckpt: dict[str, float]) -> dict[str, float]:
        out = {}
        for c in cfg.defect_classes:
            if isinstance(cfg.threshold, dict) and c in cfg.threshold:
                out[c] = float(cfg.threshold[c])
            elif c in from_ckpt:
                out[c] = float(from_ckpt[c])
            else:
                out[c] = float(cfg.threshold) if not isinstance(cfg.threshold, dict) else 0.5
        return out

    def decide(self, probs: np.ndarray) -> list[Verdict]:
        """N x C probabilities -> N verdicts (vectorised; ~µs per frame)."""
        k = self.top_k
        top_idx = np.argsort(-probs, axis=1)[:, :k]
        top_p = np.take_along_axis(probs, top_idx, axis=1)
        if len(self._idx):
            defect = (probs[:, self._idx] >= self._thr).any(axis=1)
        else:
            defect = np.zeros(len(probs), dtype=bool)
        classes = self.classes
        out = []
        for i in range(len(probs)):
            top = tuple((classes[j], float(p)) for j, p in zip(top_idx[i].tolist(), top_p[i].tolist()))
            out.append(Verdict(top[0][0], top[0][1], top, bool(defect[i])))
        return out


class DefectDebouncer:
    """Per key (a camera, or a (camera, roi) pair): a defect 'begins' when at
    least `n` of the last `m` frames were defects and 'ends' when at least
    `end_n` of the last `end_m` were clean, so one noisy frame does not flap a
    PLC. With m == n this is "n in a row"; n < m also rides out a flicker
    inside a real defect. The window is emptied at each transition, so the
    opposite one needs fresh evidence.
    """

    def __init__(self, n: int = 3, m: int | None = None, end_n: int | None = None, end_m: int | None = None):
        m = n if m is None else m
        end_n = n if end_n is None else end_n
        end_m = m if end_m is None else end_m
        if not 1 <= n <= m:
            raise ValueError(f"debounce needs 1 <= n <= m, got n={n}, m={m}")
        if not 1 <= end_n <= end_m:
            raise ValueError(f"debounce needs 1 <= end_n <= end_m, got end_n={end_n}, end_m={end_m}")
        self.n, self.m, self.end_n, self.end_m = n, m, end_n, end_m
        self._size = max(m, end_m)
        self._defect: dict[Hashable, bool] = {}
        self._window: dict[Hashable, deque[bool]] = {}

    def update(self, key: Hashable, defect: bool) -> str | None:
        """Feed one frame's verdict; returns "defect_started", "defect_ended" or None."""
        window = self._window.get(key)
        if window is None:
            window = self._window[key] = deque(maxlen=self._size)
        window.append(bool(defect))
        in_defect = self._defect.get(key, False)
        if in_defect:
            hit = list(islice(reversed(window), self.end_m)).count(False) >= self.end_n
        else:
            hit = list(islice(reversed(window), self.m)).count(True) >= self.n
        if not hit:
            return None
        self._defect[key] = not in_defect
        window.clear()
        return "defect_ended" if in_defect else "defect_started"
