"""The one preprocessing spec shared by training and serving, and its implementations.

Training and the daemon call the same `resize_uint8` on every image, and the same
`normalize` on the device; the spec travels inside the checkpoint so the daemon
has no second copy that could drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import cv2
import numpy as np
import torch

_INTERP = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image (after the camera ROI crop) becomes the model's input."""

    height: int = 64
    width: int = 64
    color: Literal["rgb", "gray"] = "rgb"
    resize: Literal["linear", "area", "nearest", "cubic"] = "linear"
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))

    def __post_init__(self):
        if self.height < 8 or self.width < 8 or self.height > 4096 or self.width > 4096:
            raise ValueError(f"preprocess size {self.height}x{self.width}: expected 8..4096 pixels per side")
        if self.color not in ("rgb", "gray"):
            raise ValueError(f"preprocess color {self.color!r}: expected 'rgb' or 'gray'")
        if self.resize not in _INTERP:
            raise ValueError(f"preprocess resize {self.resize!r}: expected one of {sorted(_INTERP)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"preprocess mean/std need {self.channels} values for color {self.color!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError("preprocess std values must be > 0")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        allowed = {"height", "width", "color", "resize", "mean", "std"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"preprocess spec has unknown keys {sorted(unknown)}; expected {sorted(allowed)}")
        kw = dict(d)
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        return cls(**kw)

    @classmethod
    def for_color(cls, size: int | tuple[int, int], color: str = "rgb", imagenet: bool = False) -> "PreprocessSpec":
        h, w = (size, size) if isinstance(size, int) else size
        if color == "gray":
            return cls(h, w, "gray", mean=(0.5,), std=(0.5,))
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.5,) * 3, (0.5,) * 3)
        return cls(h, w, "rgb", mean=mean, std=std)


def resize_uint8(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A decoded BGR/BGRA/grey uint8 image -> uint8 HxWxC in the spec's size and colour."""
    if image.dtype != np.uint8:
        image = to_uint8(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image of shape {image.shape}: expected H x W x (1|3|4) pixels")
    out = cv2.resize(image, (spec.width, spec.height), interpolation=_INTERP[spec.resize])
    if out.ndim == 2:
        out = out[:, :, None]
    c = out.shape[2]
    if spec.color == "gray":
        if c == 1:
            return out
        code = cv2.COLOR_BGR2GRAY if c == 3 else cv2.COLOR_BGRA2GRAY
        return cv2.cvtColor(out, code)[:, :, None]
    if c == 1:
        return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB if c == 3 else cv2.COLOR_BGRA2RGB)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """16-bit and float images (some industrial cameras) scaled into uint8."""
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image * (255.0 if image.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def stack_uint8(images: Sequence[np.ndarray], spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Resize every image into one uint8 N x H x W x C array (`out`, e.g. a pinned staging buffer, if given)."""
    shape = (len(images), spec.height, spec.width, spec.channels)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"stack_uint8 out of shape {out.shape} {out.dtype}: expected {shape} uint8")
    for i, img in enumerate(images):
        out[i] = resize_uint8(img, spec)
    return out


class DeviceFrame(np.ndarray):
    """A decoded frame's host pixels (an ordinary uint8 array) that also knows its copy on the GPU.

    GPU decoders (serve/nvdec.py) hand these over: everything that reads pixels on the host
    (evidence crops, captures, the live page) sees a plain array, while the model reads
    `device_tensor` (uint8 H x W x C on the device) with no upload. Basic slicing (the camera
    ROI, the inspection ROIs) slices both; any other derived array is host-only.
    """

    device_tensor: torch.Tensor | None

    def __new__(cls, host: np.ndarray, device_tensor: torch.Tensor | None):
        obj = np.asarray(host).view(cls)
        if device_tensor is not None and tuple(device_tensor.shape) != obj.shape:
            raise ValueError(f"device copy of shape {tuple(device_tensor.shape)} does not match the host's {obj.shape}")
        obj.device_tensor = device_tensor
        return obj

    def __array_finalize__(self, obj):
        self.device_tensor = None

    def __getitem__(self, key):
        out = super().__getitem__(key)
        t = self.device_tensor
        if isinstance(out, DeviceFrame) and t is not None and _basic_slices(key):
            view = t[key]
            out.device_tensor = view if tuple(view.shape) == out.shape else None
        return out

    def __reduce__(self):  # pickles (and copies across processes) as the plain host array
        return np.asarray(self).view(np.ndarray).__reduce__()


def _basic_slices(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return all(isinstance(k, slice) and (k.step is None or k.step > 0) for k in keys)


def device_tensor_of(image) -> torch.Tensor | None:
    """The GPU copy a `DeviceFrame` carries; None for any other image."""
    return getattr(image, "device_tensor", None)


class Normalizer(torch.nn.Module):
    """uint8 NHWC (or NCHW) on any device -> normalised float NCHW, channels_last in memory."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, x: torch.Tensor, nhwc: bool = True) -> torch.Tensor:
        if nhwc:
            x = x.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
        return (x.float() - self.mean) * self.inv_std


def gpu_resize_uint8(frames: Sequence[torch.Tensor], spec: PreprocessSpec) -> torch.Tensor:
    """The torch twin of `stack_uint8` for frames already on the model's device (uint8 HWC BGR/BGRA/grey).

    Frames of one shape are resized together (one batched interpolate per shape), the
    output keeps the input order. Bilinear with half-pixel centres and no antialias is
    the same sampling as cv2.INTER_LINEAR; values differ by at most rounding (tested
    against the CPU path). Returns uint8 N x H x W x C on the frames' device.
    """
    if spec.resize not in ("linear", "nearest"):
        raise ValueError(f"GPU preprocessing supports resize linear/nearest, the checkpoint asks for {spec.resize!r}")
    if not frames:
        raise ValueError("gpu_resize_uint8: no frames")
    mode = "bilinear" if spec.resize == "linear" else "nearest"
    hwc = [f if f.ndim == 3 else f.unsqueeze(-1) for f in frames]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(hwc):
        groups.setdefault(tuple(f.shape), []).append(i)
    first = hwc[0]
    out = torch.empty((len(hwc), spec.height, spec.width, spec.channels), dtype=torch.uint8, device=first.device)
    for idx in groups.values():
        batch = torch.stack([hwc[i][..., :3] for i in idx])  # BGRA: the alpha is never converted
        x = batch.permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(x, size=(spec.height, spec.width), mode=mode,
                                            align_corners=False if mode == "bilinear" else None)
        if spec.color == "gray" and y.shape[1] == 3:  # BGR weights, as cv2.COLOR_BGR2GRAY
            y = y[:, 0:1] * 0.114 + y[:, 1:2] * 0.587 + y[:, 2:3] * 0.299
        y = y.round_().clamp_(0, 255).to(torch.uint8)  # y is fresh here; the channel moves below run on bytes
        if spec.color != "gray":
            y = y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y.flip(1)  # grey -> 3 channels; BGR -> RGB
        y = y.permute(0, 2, 3, 1)
        if len(idx) == len(frames):
            out.copy_(y)
        else:
            out[torch.tensor(idx, device=first.device)] = y
    return out
