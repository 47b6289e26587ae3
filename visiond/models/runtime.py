"""Inference runtimes behind one Classifier interface.

The daemon hands a uint8 N x H x W x C batch (already resized by the
checkpoint's spec) and gets class probabilities back. Normalisation happens on
the model's device, so only uint8 crosses to a GPU (4x less than float).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from visiond.models.checkpoint import Checkpoint, CheckpointError
from visiond.models.devices import (
    DEVICE_RESIZES,
    Site,
    choose_device,
    model_dtype,
    move_for,
    needs_pinning,
    resize_site,
    same_device,
)
from visiond.preprocess import DeviceFrame, Normalizer, PreprocessSpec, device_tensor_of, gpu_resize_uint8, stack_uint8

log = logging.getLogger(__name__)

# the classical baselines hold training features / support vectors: a cast to half would round them
_FP32_ONLY = ("knn", "svm")


class Classifier(Protocol):
    runtime: str  # "torch" | "onnxruntime" | "openvino" | "remote"
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

    def warmup(self, max_batch: int = 1, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
        """Run each batch size up to `max_batch` once, and frames of `frame_shapes` where the runtime resizes them."""
        ...


def resolve_device(requested: str) -> torch.device:
    """`model.device` -> an indexed torch.device ('auto' and 'cuda' become cuda:<current>), checked against this machine."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    current = torch.cuda.current_device() if count else 0
    return choose_device(requested, cuda_available=available, device_count=count, current=current)


class _Slot:
    """One staging slot: host bytes (pinned on CUDA), the device bytes they upload into, the pinned output.

    Two slots alternate (double buffering): a slot is written again only after the event
    recorded behind its last download has completed. Buffers grow to the largest batch
    seen and are then reused, so no pinned allocation happens per frame or per batch.
    """

    def __init__(self, dev: torch.device):
        self.dev, self.cuda = dev, dev.type == "cuda"
        self._host = torch.empty(0, dtype=torch.uint8)
        self._device = torch.empty(0, dtype=torch.uint8, device=dev) if self.cuda else None
        self._out = torch.empty(0, dtype=torch.float32)
        self.done = None  # torch.cuda.Event behind this slot's last download; None on the CPU

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()
            self.done = None

    def host(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._host.numel() < n:
            self._host = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
        return self._host[:n].view(shape)

    def device(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._device.numel() < n:
            self._device = torch.empty(n, dtype=torch.uint8, device=self.dev)
            # allocated for the compute stream, written on the copy stream: let work on the block finish first
            torch.cuda.current_stream(self.dev).synchronize()
        return self._device[:n].view(shape)

    def out(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._out.numel() < n:
            self._out = torch.empty(n, dtype=torch.float32, pin_memory=self.cuda)
        return self._out[:n].view(shape)


class Pending:
    """A submitted batch: `TorchClassifier.collect` waits for it (on the CPU it is already done)."""

    __slots__ = ("probs", "event")

    def __init__(self, probs, event):
        self.probs, self.event = probs, event


class TorchClassifier:
    """torch eager on CPU or CUDA: the model cast once to its dtype, channels_last, inference_mode.

    On CUDA a batch costs one upload (from a reused pinned staging slot, on a copy stream),
    the model on the compute stream and one download into pinned memory; `submit_images` /
    `collect` let a caller prepare the next batch while the GPU runs this one. On the CPU the
    same calls run with no streams, no pinning and no copies. Every placement decision is a
    pure function in `visiond.models.devices` (tested without a GPU).
    """

    runtime = "torch"

    def __init__(self, ckpt: Checkpoint, device: str = "auto", precision: str = "auto", threads: int = 1,
                 gpu_preprocess: bool = True, resize_on: str = "auto"):
        self.name, self.version, self.arch = ckpt.name, ckpt.version, ckpt.arch
        self.classes, self.spec = ckpt.classes, ckpt.spec
        self.temperature = ckpt.temperature  # calib: logits / T before softmax, as every export does
        dev = resolve_device(device)
        self.device = str(dev)  # always indexed on CUDA: "cuda:0"
        if dev.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self._dev = dev
        self._cuda = dev.type == "cuda"
        self._current = dev.index if self._cuda else 0
        self.dtype = model_dtype(dev, precision)
        if ckpt.arch in _FP32_ONLY and self.dtype != torch.float32:
            log.info("model %s: %s keeps fp32 (half-precision distances reorder neighbours)", self.name, ckpt.arch)
            self.dtype = torch.float32
        model = ckpt.build().to(dev).to(memory_format=torch.channels_last)
        self._model = model.to(self.dtype) if self.dtype != torch.float32 else model  # cast once, not per batch
        self._norm = Normalizer(ckpt.spec).to(dev)
        self.resize_on = resize_on if gpu_preprocess else "cpu"
        resize_site(self.resize_on, ckpt.spec.resize, frames_on_device=False)  # a bad value fails at load
        self.measured_site: Site | None = None  # resize_on auto: what warm-up measured faster here
        self._slots = (_Slot(dev), _Slot(dev))
        self._turn = 0
        self._copy_stream = torch.cuda.Stream(dev) if self._cuda else None
        self._lock = threading.RLock()

    @classmethod
    def from_file(cls, path, device: str = "auto", precision: str = "auto", threads: int = 1) -> "TorchClassifier":
        from visiond.models.checkpoint import load_checkpoint

        return cls(load_checkpoint(path), device=device, precision=precision, threads=threads)

    # ---- warm-up -----------------------------------------------------------------
    def warmup(self, max_batch: int = 1, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
        """Run each batch size once, then the exact `predict_images` path with frames of the cameras' sizes.

        On CUDA the frames also go through the device-resident path (what NVDEC hands over),
        and with `resize_on: auto` the CPU and GPU resize are timed on the largest frames and
        the faster one is kept (logged).
        """
        s = self.spec
        sizes = sorted({1, max_batch})
        for n in sizes:
            self.predict(np.zeros((n, s.height, s.width, s.channels), np.uint8))
        shapes = list(dict.fromkeys(tuple(int(v) for v in shape) for shape in frame_shapes))
        for shape in shapes:
            frame = np.zeros(shape, np.uint8)
            for n in sizes:
                self.predict_images([frame] * n)
                if self._cuda and s.resize in DEVICE_RESIZES:
                    on_dev = DeviceFrame(frame, torch.zeros(shape, dtype=torch.uint8, device=self._dev))
                    self.predict_images([on_dev] * n)
        if self._cuda and self.resize_on == "auto" and shapes and s.resize in DEVICE_RESIZES:
            self.measured_site = self._measure_resize(max(shapes, key=math.prod), max_batch)

    def _measure_resize(self, shape: tuple[int, ...], batch: int, reps: int = 5) -> Site:
        frames = [np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)] * batch
        took = {}
        for site in ("host", "device"):
            self.measured_site = site
            self.predict_images(frames)
            t0 = time.perf_counter()
            for _ in range(reps):
                self.predict_images(frames)
            took[site] = (time.perf_counter() - t0) / reps
        best: Site = "device" if took["device"] < took["host"] else "host"
        log.info("model %s: resize_on auto resizes %s frames on the %s (batch %d: %.2f ms on the GPU, %.2f ms on "
                 "the CPU)", self.name, "x".join(map(str, shape)), "GPU" if best == "device" else "CPU", batch,
                 took["device"] * 1e3, took["host"] * 1e3)
        return best

    # ---- inference ---------------------------------------------------------------
    def predict(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 N x H x W x C already in the spec's size, on any device -> float32 N x classes probabilities."""
        with self._lock:
            return self.collect(self.submit(pixels))

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Frames as decoded (ROI-cropped views, any size; `DeviceFrame`s from a GPU decoder) -> probabilities."""
        with self._lock:
            return self.collect(self.submit_images(images))

    def submit(self, pixels: np.ndarray | torch.Tensor) -> Pending:
        x = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        with torch.inference_mode(), self._on_device():
            slot = self._next_slot()
            move = move_for(x.device, self._dev, self._current)
            if move == "upload":
                if needs_pinning(x.device, self._dev, pinned=x.is_pinned(), current=self._current):
                    x = slot.host(tuple(x.shape)).copy_(x)  # into the reused pinned slot, never a fresh pin
                x = self._upload(x, slot)
            elif move != "none":
                x = x.to(self._dev)
            return self._run(x, slot)

    def submit_images(self, images: Sequence[np.ndarray]) -> Pending:
        """Start a batch; `collect` returns its probabilities (the GPU works while the caller prepares the next)."""
        if not len(images):
            raise ValueError("predict_images: no images")
        s = self.spec
        tensors = [device_tensor_of(im) for im in images]
        on_dev = all(t is not None and same_device(t.device, self._dev, self._current) for t in tensors)
        site = resize_site(self.resize_on, s.resize, frames_on_device=on_dev, measured=self.measured_site)
        with torch.inference_mode(), self._on_device():
            slot = self._next_slot()
            if site == "host":
                host = slot.host((len(images), s.height, s.width, s.channels))
                stack_uint8(images, s, out=host.numpy())  # cv2 writes straight into the staging slot
                x = self._upload(host, slot) if self._cuda else host
            elif on_dev:
                x = gpu_resize_uint8(tensors, s)  # decoded on the GPU: no copy at all
            else:
                x = gpu_resize_uint8(self._upload_frames(images, slot), s)
            return self._run(x, slot)

    def collect(self, pending: Pending) -> np.ndarray:
        if pending.event is None:
            return pending.probs
        pending.event.synchronize()
        return pending.probs.numpy().copy()  # the pinned slot is reused by the batch after next

    # ---- internals ---------------------------------------------------------------
    def _on_device(self):
        return torch.cuda.device(self._dev) if self._cuda else contextlib.nullcontext()

    def _next_slot(self) -> _Slot:
        slot = self._slots[self._turn]
        self._turn ^= 1
        slot.wait()
        return slot

    def _upload(self, host: torch.Tensor, slot: _Slot) -> torch.Tensor:
        """One host -> device copy on the copy stream; the compute stream waits for it, the CPU does not."""
        dst = slot.device(tuple(host.shape))
        with torch.cuda.stream(self._copy_stream):
            dst.copy_(host, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self._copy_stream)
        torch.cuda.current_stream(self._dev).wait_event(uploaded)
        return dst

    def _upload_frames(self, images: Sequence[np.ndarray], slot: _Slot) -> list[torch.Tensor]:
        """Full frames for the device resize: packed into the staging slot, then one upload for the batch."""
        arrs = [np.asarray(im) if im.ndim == 3 else np.asarray(im)[:, :, None] for im in images]
        sizes = [a.size for a in arrs]
        flat = slot.host((sum(sizes),))
        flat_np, at = flat.numpy(), 0
        for a, n in zip(arrs, sizes):
            np.copyto(flat_np[at:at + n].reshape(a.shape), a)
            at += n
        dev = self._upload(flat, slot) if self._cuda else flat
        out, at = [], 0
        for a, n in zip(arrs, sizes):
            out.append(dev[at:at + n].view(a.shape))
            at += n
        return out

    def _run(self, x: torch.Tensor, slot: _Slot) -> Pending:
        x = self._norm(x)  # NHWC uint8 -> channels_last float NCHW
        if self.dtype != torch.float32:
            x = x.to(self.dtype)  # inputs cast once, to the dtype the model was cast to at load
        probs = torch.softmax(self._model(x).float() / self.temperature, dim=1)
        if not self._cuda:
            return Pending(probs.numpy(), None)
        out = slot.out(tuple(probs.shape))
        out.copy_(probs, non_blocking=True)
        slot.done = torch.cuda.Event()
        slot.done.record(torch.cuda.current_stream(self._dev))
        return Pending(out, slot.done)


def make_classifier(ckpt: Checkpoint, *, runtime: str = "torch", device: str = "auto", precision: str = "auto",
                    threads: int = 1, cache_dir: str | Path | None = None, url: str | None = None,
                    remote_model: str | None = None, remote_timeout_s: float = 2.0,
                    remote_token: str | None = None, resize_on: str = "auto") -> Classifier:
    """The daemon's runtime choice (`model.runtime`).

    `onnxruntime` (CPU) needs the checkpoint exported to ONNX; a network the exporter
    cannot take (or an export that disagrees with torch) is served by torch instead,
    with a warning: the line gets its verdicts either way. `remote` sends the batches to
    the model server at `url` (its model `remote_model`, default the checkpoint's name).
    `openvino` (CPU) reads the same ONNX export, with the same fall-back to torch; `auto`
    is torch on CUDA and, on a CPU, the runtime `openvino_runtime.auto_runtime` names.
    """
    if runtime == "remote":
        from visiond.models.remote import RemoteClassifier

        if not url:
            raise ValueError("the remote runtime needs model.url (http://host:port or grpc://host:port)")
        return RemoteClassifier(ckpt, url, model=remote_model, timeout_s=remote_timeout_s, token=remote_token)
    if runtime == "auto":  # torch on CUDA; on a CPU the runtime measured fastest there (openvino_runtime)
        from visiond.models.openvino_runtime import auto_runtime

        runtime = auto_runtime(device)
    if runtime in ("onnxruntime", "openvino"):  # both serve the ONNX export cached per model version
        if cache_dir is None:
            raise ValueError(f"the {runtime} runtime needs a cache directory for the exported model")
        try:
            if runtime == "openvino":
                from visiond.models.openvino_runtime import OpenVinoClassifier

                return OpenVinoClassifier(ckpt, cache_dir, threads=threads)
            from visiond.models.onnx_runtime import OnnxClassifier

            return OnnxClassifier(ckpt, cache_dir, threads=threads, device=device)
        except CheckpointError as exc:
            log.warning("%s; serving it with torch instead", exc)
    elif runtime != "torch":
        raise ValueError(f"model.runtime {runtime!r}: expected auto, torch, onnxruntime, openvino or remote")
    return TorchClassifier(ckpt, device=device, precision=precision, threads=threads, resize_on=resize_on)


AUTO_BATCH_CPU, AUTO_BATCH_CUDA = 32, 64  # the largest batch `max_batch: auto` tries
REMOTE_BATCH = 16                           # a model server batches for itself: not timed from here
_SAME_SPEED = 0.95    # a smaller batch this close to the fastest is kept: the same throughput, less latency
_PAST_PEAK = 0.8      # a size this far below the fastest so far ends the timing: larger ones only get slower
_TIME_EACH_S = 0.2    # each batch size is timed for about this long (at least two calls)


def measure_best_batch(clf: Classifier, limit: int, time_each_s: float = _TIME_EACH_S) -> tuple[int, dict[int, float]]:
    """(batch, {batch: images/s}): the power of two up to `limit` at which `clf.predict` classifies the most
    images a second, or the smallest one within 5 % of it. On a CPU throughput peaks early, where a batch
    stops fitting the caches; on CUDA it keeps rising until the device is full."""
    s = clf.spec
    rng = np.random.default_rng(0)
    fps: dict[int, float] = {}
    n = 1
    while n <= limit:
        x = rng.integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)
        clf.predict(x)  # this size's first call (allocations, kernels chosen) is not timed
        calls, t0 = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t0 < time_each_s:
            clf.predict(x)  # returns host probabilities: on CUDA each call has synchronised
            calls += 1
        fps[n] = n * calls / (time.perf_counter() - t0)
        if fps[n] < _PAST_PEAK * max(fps.values()):
            break
        n *= 2
    fastest = max(fps.values())
    return min(b for b, f in fps.items() if f >= _SAME_SPEED * fastest), fps


def warm_up(clf: Classifier, max_batch: int | str, frame_shapes: Sequence[tuple[int, ...]] = ()) -> int:
    """Warm any runtime: every batch size, and the `predict_images` path with the cameras' frame sizes.

    `max_batch` "auto" is first timed (`measure_best_batch`); returns the batch size the model was warmed for.
    """
    if max_batch == "auto":
        if clf.runtime == "remote":
            max_batch = REMOTE_BATCH
        else:
            limit = AUTO_BATCH_CUDA if str(clf.device).startswith("cuda") else AUTO_BATCH_CPU
            max_batch, fps = measure_best_batch(clf, limit)
            log.info("model %s on %s (%s): max_batch auto -> %d (%s images/s by batch size)", clf.name, clf.device,
                     clf.runtime, max_batch, ", ".join(f"{b}: {f:.0f}" for b, f in fps.items()))
    clf.warmup(int(max_batch), frame_shapes=frame_shapes)
    return int(max_batch)
