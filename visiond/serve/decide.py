"""From class probabilities to verdicts: top-k, defect thresholds, debounced events."""

from __future__ import annotations

from dataclasses import dataclass

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
    """Per camera: a defect 'begins' after `frames` defect frames in a row and
    'ends' after as many clean ones, so one noisy frame does not flap a PLC."""

    def __init__(self, frames: int = 3):
        self.frames = max(1, frames)
        self._state: dict[str, bool] = {}
        self._run: dict[str, int] = {}

    def update(self, camera: str, defect: bool) -> str | None:
        state = self._state.get(camera, False)
        if defect == state:
            self._run[camera] = 0
            return None
        run = self._run.get(camera, 0) + 1
        if run < self.frames:
            self._run[camera] = run
            return None
        self._state[camera], self._run[camera] = defect, 0
        return "defect_started" if defect else "defect_ended"
