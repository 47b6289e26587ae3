"""Inference runtimes behind one Classifier interface.

The daemon hands a uint8 N x H x W x C batch (already resized by the
checkpoint's spec) and gets class probabilities back. Normalisation happens on
the model's device, so only uint8 crosses to a GPU (4x less than float).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from visiond.models.checkpoint import Checkpoint, CheckpointError
from visiond.preprocess import Normalizer, PreprocessSpec, gpu_resize_uint8, stack_uint8

_GPU_RESIZE_MIN_PIXELS = 256 * 256 * 3

log = logging.getLogger(__name__)


class Classifier(Protocol):
    runtime: str  # "torch" | "onnxruntime" | "remote"
    name: str
    version: str
    arch: str
    classes: tuple[str, ...]
    spec: PreprocessSpec
    device: str

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (already resized by the spec) -> float32 N x classes probabilities."""
        ...

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded frames (any size, uint8) -> probabilities; the runtime picks where to resize."""
        ...


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CheckpointError(f"model.device {requested!r}: no CUDA device is available here; use auto or cpu")
        idx = int(requested.split(":")[1]) if ":" in requested else 0
        if idx >= torch.cuda.device_count():
            raise CheckpointError(f"model.device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(requested)


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16  # auto and fp16


class TorchClassifier:
    """torch eager on CPU or CUDA: channels_last, inference_mode, autocast on CUDA."""

    runtime = "torch"

    def __init__(self, ckpt: Checkpoint, device: str = "auto", precision: str = "auto", threads: int = 1,
                 gpu_preprocess: bool = True):
        self.name, self.version, self.arch = ckpt.name, ckpt.version, ckpt.arch
        self.classes, self.spec = ckpt.classes, ckpt.spec
        dev = resolve_device(device)
        self.device = str(dev)
        if dev.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self._dev = dev
        self._amp = _autocast_dtype(dev, precision)
        self._model = ckpt.build().to(dev).to(memory_format=torch.channels_last)
        self._norm = Normalizer(ckpt.spec).to(dev)
        # On CUDA, resizing big frames on the GPU saves the CPU for decoding (a 1080p ROI is
        # ~6 MB to resize on the CPU, a PCIe copy away on the GPU); small inputs stay on the CPU.
        self._gpu_resize = dev.type == "cuda" and gpu_preprocess and ckpt.spec.resize in ("linear", "nearest")

    @classmethod
    def from_file(cls, path, device: str = "auto", precision: str = "auto", threads: int = 1) -> "TorchClassifier":
        from visiond.models.checkpoint import load_checkpoint

        return cls(load_checkpoint(path), device=device, precision=precision, threads=threads)

    def warmup(self, max_batch: int = 1) -> None:
        """Run each batch size once so the first real frames don't pay for lazy init."""
        s = self.spec
        for n in sorted({1, max_batch}):
            self.predict(np.zeros((n, s.height, s.width, s.channels), np.uint8))

    def predict(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
            if x.device != self._dev:
                if self._dev.type == "cuda":
                    x = x.pin_memory().to(self._dev, non_blocking=True)
                else:
                    x = x.to(self._dev)
            x = self._norm(x)  # NHWC uint8 -> channels_last float NCHW
            ctx = torch.autocast(self._dev.type, dtype=self._amp) if self._amp else contextlib.nullcontext()
            with ctx:
                logits = self._model(x)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Frames as decoded (ROI-cropped views, any size) -> probabilities."""
        if self._gpu_resize and images[0].size >= _GPU_RESIZE_MIN_PIXELS:
            return self.predict_frames_on_device(images)
        return self.predict(stack_uint8(images, self.spec))

    def predict_frames_on_device(self, frames: list[np.ndarray]) -> np.ndarray:
        """CUDA path: upload uint8 frames (4x less than float) and resize on the GPU."""
        with torch.inference_mode():
            on_dev = [torch.from_numpy(np.ascontiguousarray(f if f.ndim == 3 else f[:, :, None]))
                      .pin_memory().to(self._dev, non_blocking=True) for f in frames]
            return self.predict(gpu_resize_uint8(on_dev, self.spec))


def make_classifier(ckpt: Checkpoint, *, runtime: str = "torch", device: str = "auto", precision: str = "auto",
                    threads: int = 1, cache_dir: str | Path | None = None, url: str | None = None,
                    remote_model: str | None = None, remote_timeout_s: float = 2.0,
                    remote_token: str | None = None) -> Classifier:
    """The daemon's runtime choice (`model.runtime`).

    `onnxruntime` (CPU) needs the checkpoint exported to ONNX; a network the exporter
    cannot take (or an export that disagrees with torch) is served by torch instead,
    with a warning: the line gets its verdicts either way. `remote` sends the batches to
    the model server at `url` (its model `remote_model`, default the checkpoint's name).
    """
    if runtime == "remote":
        from visiond.models.remote import RemoteClassifier

        if not url:
            raise ValueError("the remote runtime needs model.url (http://host:port or grpc://host:port)")
        return RemoteClassifier(ckpt, url, model=remote_model, timeout_s=remote_timeout_s, token=remote_token)
    if runtime == "onnxruntime":
        from visiond.models.onnx_runtime import OnnxClassifier

        if cache_dir is None:
            raise ValueError("the onnxruntime runtime needs a cache directory for the exported model")
        try:
            return OnnxClassifier(ckpt, cache_dir, threads=threads)
        except CheckpointError as exc:
            log.warning("%s; serving it with torch instead", exc)
    elif runtime != "torch":
        raise ValueError(f"model.runtime {runtime!r}: expected torch, onnxruntime or remote")
    return TorchClassifier(ckpt, device=device, precision=precision, threads=threads)
