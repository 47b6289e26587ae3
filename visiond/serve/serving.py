"""What the inference thread serves at one moment: models, each camera's ROIs and their decision rules.

A `ServingSet` is immutable and switched as a whole between two batches (`ModelSlot`), so
a hot reload or a recipe change (product changeover) can never classify one ROI with the
new model and the next with the old one: every prediction and every inspection names the
set that made it (recipe, model versions).

Every camera has at least one ROI: without `rois` it is `full` (the camera's legacy `roi`
crop, which its source applies, or the whole frame). Crops are numpy views of the
full-resolution frame, so a small region keeps its pixels; the runtime resizes each crop
to the model's input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from visiond.config import CameraConfig, Config, DecideConfig, RoiConfig
from visiond.frames import ModelRef
from visiond.models.runtime import Classifier
from visiond.serve.decide import Decider
from visiond.video import RoiError, roi_slices

log = logging.getLogger(__name__)

DEFAULT = "default"  # the key of `model.checkpoint` among a set's models
FULL = "full"  # the ROI of a camera without `rois`


_CLAMPED: dict[tuple, tuple[slice, slice] | str] = {}  # (rect, frame size) -> slices, or why it cannot be cut


@dataclass(frozen=True, slots=True)
class RoiPlan:
    """One inspection point: where to crop, which model, which rules."""

    name: str
    rect: tuple[int, int, int, int] | None  # None: the whole frame
    model: str  # key into ServingSet.models
    decider: Decider

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The ROI of a full frame (a view); RoiError when it lies outside the frame."""
        if self.rect is None:
            return image
        x, y, w, h = self.rect
        height, width = image.shape[:2]
        if x + w <= width and y + h <= height:  # the common case: no clamping, no warning
            return image[y:y + h, x:x + w]
        key = (self.rect, image.shape[:2])
        cut = _CLAMPED.get(key)
        if cut is None:
            try:
                cut = roi_slices(self.rect, image.shape)  # logs the clamping once per rect and frame size
            except RoiError:
                cut = f"ROI {self.name} [{x}, {y}, {w}, {h}] lies outside the {width}x{height} frame; fix its rect"
            if len(_CLAMPED) < 4096:
                _CLAMPED[key] = cut
        if isinstance(cut, str):
            raise RoiError(cut)
        return image[cut]


@dataclass(frozen=True)
class ServingSet:
    recipe: str | None
    models: Mapping[str, Classifier]
    decider: Decider  # the default model's rules (ROIs without their own model or threshold)
    rois: Mapping[str, tuple[RoiPlan, ...]]  # camera -> its ROIs; a camera not listed gets one `full` ROI
    paths: Mapping[str, str] = field(default_factory=dict)  # model key -> checkpoint path it was loaded from
    max_batch: int = 16  # the largest batch the worker hands these models (`model.max_batch`, auto resolved)
    _full: tuple[RoiPlan, ...] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_full", (RoiPlan(FULL, None, DEFAULT, self.decider),))

    @property
    def classifier(self) -> Classifier:
        """The default model (`model.checkpoint`, or the recipe's `model`)."""
        return self.models[DEFAULT]

    def plans(self, camera: str) -> tuple[RoiPlan, ...]:
        return self.rois.get(camera) or self._full

    def model_ref(self, key: str) -> ModelRef:
        clf = self.models[key]
        return ModelRef(clf.name, clf.version)

    def versions(self) -> dict[str, dict[str, str]]:
        """Model key -> {name, version}: what `status/detail` and the inspection payload show."""
        return {k: {"name": c.name, "version": c.version} for k, c in self.models.items()}


def single(classifier: Classifier, decider: Decider) -> ServingSet:
    """One model, one `full` ROI per camera: the set of a config without ROIs (tests, bench)."""
    return ServingSet(None, {DEFAULT: classifier}, decider, {})


def _decide_for(base: DecideConfig, named_classes: list[str] | None, named_threshold, roi_threshold: float | None,
                classes: tuple[str, ...]) -> DecideConfig:
    """The rules of one ROI: a named model's own defect classes/threshold, then the ROI's threshold."""
    update: dict = {}
    if named_classes is not None:
        update["defect_classes"] = list(named_classes)
    elif any(c not in classes for c in base.defect_classes):
        update["defect_classes"] = [c for c in base.defect_classes if c in classes]
    if named_threshold is not None:
        update["threshold"] = named_threshold
    if roi_threshold is not None:
        update["threshold"] = float(roi_threshold)
    if isinstance(update.get("threshold", base.threshold), dict):
        keep = update.get("defect_classes", base.defect_classes)
        update["threshold"] = {k: v for k, v in update.get("threshold", base.threshold).items() if k in keep}
    return base.model_copy(update=update) if update else base


class SetBuilder:
    """Builds `ServingSet`s for the base config and for each recipe from loaded classifiers."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def rois_of(self, recipe: str | None) -> dict[str, list[RoiConfig] | None]:
        out: dict[str, list[RoiConfig] | None] = {c.name: c.rois for c in self.cfg.cameras}
        if recipe is not None:
            for cam, rc in self.cfg.recipes[recipe].cameras.items():
                out[cam] = rc.rois
        return out

    def decide_of(self, recipe: str | None) -> DecideConfig:
        if recipe is not None and self.cfg.recipes[recipe].decide is not None:
            return self.cfg.recipes[recipe].decide
        return self.cfg.decide

    def checkpoints(self, recipe: str | None) -> dict[str, tuple]:
        """Model key -> (path, named-model config or None) for every model the set needs."""
        cfg = self.cfg
        named = dict(cfg.models)
        default = cfg.model.checkpoint
        if recipe is not None:
            r = cfg.recipes[recipe]
            named.update(r.models)
            default = r.model or default
        used = {roi.model for rois in self.rois_of(recipe).values() for roi in rois or [] if roi.model}
        out = {DEFAULT: (default, None)}
        for key in sorted(used):
            out[key] = (named[key].checkpoint, named[key])
        return out

    def build(self, recipe: str | None, models: Mapping[str, Classifier],
              ckpt_thresholds: Mapping[str, dict[str, float]], default_decider: Decider | None = None) -> ServingSet:
        """Deciders are checked against each model's classes here: a misfit raises UserError before any switch."""
        decide = self.decide_of(recipe)
        named_cfg = {**self.cfg.models, **(self.cfg.recipes[recipe].models if recipe else {})}
        default = models[DEFAULT]
        decider = default_decider or Decider(default.classes, decide, ckpt_thresholds.get(DEFAULT))
        cache: dict[tuple, Decider] = {}
        cams: dict[str, tuple[RoiPlan, ...]] = {}
        for cam in self.cfg.cameras:
            rois = self.rois_of(recipe)[cam.name]
            cams[cam.name] = tuple(self._plans(cam, rois, decide, named_cfg, models, ckpt_thresholds, decider, cache))
        paths = {k: str(v[0]) for k, v in self.checkpoints(recipe).items()}
        return ServingSet(recipe, dict(models), decider, cams, paths)

    @staticmethod
    def _plans(cam: CameraConfig, rois, decide, named_cfg, models, ckpt_thresholds, decider, cache):
        if not rois:
            return [RoiPlan(FULL, None, DEFAULT, decider)]  # the source has cropped the legacy `roi` already
        plans = []
        for roi in rois:
            key = roi.model or DEFAULT
            if key == DEFAULT and roi.threshold is None:
                plans.append(RoiPlan(roi.name, roi.rect, key, decider))
                continue
            named = named_cfg.get(key) if key != DEFAULT else None
            clf = models[key]
            rules = _decide_for(decide, named.defect_classes if named else None, named.threshold if named else None,
                                roi.threshold, clf.classes)
            ck = (key, rules.model_dump_json())
            if ck not in cache:
                cache[ck] = Decider(clf.classes, rules, ckpt_thresholds.get(key))
            plans.append(RoiPlan(roi.name, roi.rect, key, cache[ck]))
        return plans
