"""Test-time augmentation: classify a few transformed views of each image and average the probabilities.

The views are made at the uint8 image level, on the spec-sized batch a runtime takes, so the
wrapper sits in front of any `Classifier` (torch, onnxruntime, OpenVINO, remote) and the
runtime, its temperature and its export stay untouched. Only transformations the model met in
training are used: a horizontal flip only when the training augmentation flipped horizontally,
a vertical one only when it flipped vertically (a part upside down can be a different part),
crops only when it zoomed or shifted. The checkpoint names its preset (`meta.train_options.augment`);
the caller passes the preset table (`visiond.data.augment.PRESETS`) since models sit below data.

Modes: `none`; `flip` = the image and its allowed flips; `flip+crop` = those plus four corner
crops (90 % of each side, resized back). All views of a batch go through the runtime as one
batch of N x views, so the cost is the runtime's at that batch size (`views` x the images).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import cv2
import numpy as np

from visiond.models.checkpoint import Checkpoint
from visiond.preprocess import stack_uint8

log = logging.getLogger(__name__)
TTA_MODES = ("none", "flip", "flip+crop")
CROP_SIDE = 0.9  # fraction of each side a corner crop keeps


def allowed_transforms(augment: object | None) -> frozenset[str]:
    """'hflip', 'vflip', 'crop': what a training augmentation config (fields hflip, vflip, zoom, translate) did."""
    if augment is None:
        return frozenset()
    found = set()
    if getattr(augment, "hflip", 0):
        found.add("hflip")
    if getattr(augment, "vflip", 0):
        found.add("vflip")
    zoom = tuple(getattr(augment, "zoom", (1.0, 1.0)) or (1.0, 1.0))
    if min(zoom) < 1.0 or getattr(augment, "translate", 0):
        found.add("crop")
    return frozenset(found)


def training_transforms(ckpt: Checkpoint, presets: Mapping[str, object]) -> frozenset[str]:
    """The transforms the checkpoint's training augmentation used; none when the preset is unknown."""
    options = ckpt.meta.get("train_options")
    name = options.get("augment") if isinstance(options, dict) else None
    cfg = presets.get(name) if isinstance(name, str) else None
    if cfg is None:
        log.warning("test-time augmentation: %s does not name a known augmentation preset (%r); no flip or crop "
                    "is assumed safe for it", ckpt.name, name)
    return allowed_transforms(cfg)


_CROPS = {"crop_tl": (0, 0), "crop_tr": (0, 1), "crop_bl": (1, 0), "crop_br": (1, 1)}  # (from the bottom, from the right)


def _crop_into(dst: np.ndarray, x: np.ndarray, name: str) -> None:
    """One corner crop (CROP_SIDE of each side) of every image of x, resized back to H x W, written into dst."""
    n, h, w, c = x.shape
    ch, cw = max(1, round(h * CROP_SIDE)), max(1, round(w * CROP_SIDE))
    bottom, right = _CROPS[name]
    top, left = (h - ch) * bottom, (w - cw) * right
    for i in range(n):
        dst[i] = cv2.resize(x[i, top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c)


def _fill_views(buf: np.ndarray, n: int, names: tuple[str, ...]) -> np.ndarray:
    """buf[:n] holds the images (view 0, 'image'); write every other view into its own n rows of buf, in place."""
    x = buf[:n]
    for k, name in enumerate(names[1:], start=1):
        dst = buf[k * n:(k + 1) * n]
        if name == "hflip":
            np.copyto(dst, x[:, :, ::-1])
        elif name == "vflip":
            np.copyto(dst, x[:, ::-1])
        else:
            _crop_into(dst, x, name)
    return buf


def view_names(mode: str, allowed: frozenset[str]) -> tuple[str, ...]:
    """The views a mode makes under what training allowed, the image itself first."""
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation {mode!r}: expected one of {', '.join(TTA_MODES)}")
    names = ["image"]
    if mode != "none":
        names += [t for t in ("hflip", "vflip") if t in allowed]
    if mode == "flip+crop" and "crop" in allowed:
        names += ["crop_tl", "crop_tr", "crop_bl", "crop_br"]
    return tuple(names)


def make_views(pixels: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """uint8 N x H x W x C -> uint8 (views * N) x H x W x C, view-major (all images of view 0 first)."""
    x = np.asarray(pixels)
    if len(names) == 1:
        return x
    buf = np.empty((len(names) * len(x), *x.shape[1:]), np.uint8)
    buf[:len(x)] = x
    return _fill_views(buf, len(x), names)


class TTAClassifier:
    """Any Classifier with its views averaged; name, version, runtime, device... are the inner one's.

    Only the Classifier interface is offered (no pass-through of other attributes), so no caller can
    reach the inner runtime's own batch calls and skip the views by accident.
    """

    def __init__(self, inner, mode: str, allowed: frozenset[str]):
        self.inner, self.tta = inner, mode
        self.views = view_names(mode, allowed)
        self.runtime, self.name, self.version, self.arch = inner.runtime, inner.name, inner.version, inner.arch
        self.classes, self.spec, self.device = inner.classes, inner.spec, inner.device

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        if n == 0 or len(self.views) == 1:
            return self.inner.predict(pixels)
        return self._average(make_views(pixels, self.views), n)

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """The frames resized once, straight into the views batch (view 0), every other view written beside them."""
        n, s = len(images), self.spec
        buf = np.empty((len(self.views) * n, s.height, s.width, s.channels), np.uint8)
        stack_uint8(images, s, out=buf[:n])
        return self._average(_fill_views(buf, n, self.views), n)

    def _average(self, views: np.ndarray, n: int) -> np.ndarray:
        probs = np.asarray(self.inner.predict(views), np.float32)
        return probs.reshape(len(self.views), n, -1).mean(0)

    def warmup(self, max_batch: int = 1, frame_shapes=()) -> None:
        """The runtime meets batches of `views` x the frames: warm those sizes (frames are resized on the CPU
        here, before the views, so the runtime's own frame path is not used and `frame_shapes` changes nothing)."""
        self.inner.warmup(max_batch * len(self.views))
        if max_batch > 1:
            s = self.spec
            self.predict(np.zeros((1, s.height, s.width, s.channels), np.uint8))


def with_tta(clf, mode: str, ckpt: Checkpoint, presets: Mapping[str, object]):
    """`clf` itself for mode none, else wrapped; says when training allowed no extra view."""
    if mode == "none":
        view_names(mode, frozenset())
        return clf
    wrapped = TTAClassifier(clf, mode, training_transforms(ckpt, presets))
    if len(wrapped.views) == 1:
        log.warning("test-time augmentation %s: the training augmentation of %s used none of its transforms; "
                    "predictions are the plain model's", mode, ckpt.name)
    else:
        log.info("test-time augmentation %s on %s: %d views (%s), about %dx the inference cost", mode, ckpt.name,
                 len(wrapped.views), ", ".join(wrapped.views), len(wrapped.views))
    return wrapped
