"""OpenVINO on the CPU behind the same Classifier interface as `TorchClassifier` (`model.runtime: openvino`).

Why: most line PCs are Intel, and OpenVINO is Intel's runtime (anomalib's default); on
the CPUs measured here it runs the torchvision networks in fewer CPU-ms per frame than
torch eager (see README, "Speed").

The checkpoint stays the one source of truth, as for onnxruntime: at load it is exported
with `visiond export`'s own code (uint8 NHWC in, normalisation, temperature and softmax
inside the graph) to `<cache_dir>/<version>.onnx` — the same one file onnxruntime uses,
so switching runtimes never exports twice — and OpenVINO reads that ONNX file directly
(reading it costs tens of milliseconds; an IR copy would be a second cache to keep in step).
What OpenVINO computes from it is checked against torch on the export's sample batches at
every load, in fp32 (a CPU with bf16 units would otherwise run the model in bf16 by default):
a cache file that loads but disagrees (bit rot, a hand-copied file of another build) is
said in one line and exported again; one that still disagrees is refused, and the daemon
serves the checkpoint with torch (see `make_classifier`).

Compiled for latency, as the daemon is latency-bound: PERFORMANCE_HINT LATENCY, one
stream, `model.threads` inference threads (0 = OpenVINO's default, all cores), threads not
pinned to cores (decoding, MQTT and the broker share them).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from visiond.models.checkpoint import Checkpoint, CheckpointError
from visiond.models.onnx_runtime import cached_version, warm_host_runtime  # the one ONNX cache both runtimes share
from visiond.preprocess import stack_uint8

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max abs difference in probability to torch, as `visiond export`'s own check


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


def _reference(ckpt: Checkpoint) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The export's check: seeded uint8 batches and torch's fp32 probabilities for them."""
    import torch

    from visiond.models.export import VERIFY_BATCHES, ExportModule

    s = ckpt.spec
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8) for n in VERIFY_BATCHES]
    module = ExportModule(ckpt).eval()
    with torch.inference_mode():
        return inputs, [module(torch.from_numpy(x)).numpy() for x in inputs]


def compile_properties(threads: int) -> dict:
    """compile_model's CPU properties for the latency-bound daemon."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.performance_mode: hints.PerformanceMode.LATENCY, props.num_streams: 1,
              hints.inference_precision: ov.Type.f32, hints.enable_cpu_pinning: False}
    if threads > 0:
        config[props.inference_num_threads] = threads
    return config


class OpenVinoClassifier:
    """OpenVINO, CPU device; input is the spec-resized uint8 batch, output probabilities."""

    runtime = "openvino"

    def __init__(self, ckpt: Checkpoint, cache_dir: str | Path, threads: int = 1):
        try:
            import openvino as ov
        except ImportError as exc:
            raise CheckpointError(f"cannot run {ckpt.arch} {ckpt.version} with openvino: {_first_line(exc)} "
                                  "(pip install openvino)") from None
        self.name, self.version, self.arch = ckpt.name, ckpt.version, ckpt.arch
        self.classes, self.spec = ckpt.classes, ckpt.spec
        self.temperature = getattr(ckpt, "temperature", 1.0)  # inside the exported graph already
        self.device = "cpu"
        self.threads = threads
        self._lock = threading.Lock()  # one infer request: the inference thread and a probe may both call predict
        path = Path(cache_dir) / f"{ckpt.version}.onnx"
        exported = False
        if not path.exists() or cached_version(path) != ckpt.version:
            if path.exists():
                log.warning("model cache %s is not an export of %s %s (unreadable or another model's); "
                            "exporting it again", path, ckpt.name, ckpt.version)
            self._export(ckpt, path)
            exported = True
        inputs, want = _reference(ckpt)
        core = ov.Core()
        try:
            self._compiled, diff = self._compile_checked(core, path, threads, inputs, want)
        except CheckpointError as exc:
            if exported:  # a fresh export OpenVINO cannot run or that it computes differently: torch serves
                raise
            log.warning("model cache %s: %s; exporting it again", path, exc)
            path.unlink(missing_ok=True)
            self._export(ckpt, path)
            self._compiled, diff = self._compile_checked(core, path, threads, inputs, want)
        self._request = self._compiled.create_infer_request()
        log.info("model %s %s on openvino %s (%s, %s thread(s), max abs diff to torch %.2g)", ckpt.name,
                 ckpt.version, ov.get_version().split("-")[0], path, threads or "all", diff)

    @staticmethod
    def _export(ckpt: Checkpoint, path: Path) -> None:
        from visiond.models.export import export_checkpoint

        try:
            result = export_checkpoint(ckpt, "onnx", path)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported the same way
            raise CheckpointError(f"cannot run {ckpt.arch} {ckpt.version} with openvino: {_first_line(exc)}") from exc
        log.info("model %s %s exported to ONNX for openvino (%s, max abs diff to torch %.2g)",
                 ckpt.name, ckpt.version, path, result.max_abs_diff)

    @staticmethod
    def _compile_checked(core, path: Path, threads: int, inputs: list[np.ndarray], want: list[np.ndarray]):
        """Read and compile the ONNX file, then refuse it unless it gives torch's probabilities."""
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", compile_properties(threads))
            request = compiled.create_infer_request()
            got = [request.infer({0: x}, share_inputs=True)[0].copy() for x in inputs]
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for any unreadable graph
            raise CheckpointError(f"openvino cannot run {path.name}: {_first_line(exc)}") from exc
        diff = max(float(np.abs(g - w).max()) if g.shape == w.shape else float("inf") for g, w in zip(got, want))
        if not diff <= TOLERANCE:
            raise CheckpointError(f"openvino's probabilities for {path.name} differ from torch by {diff:.3g} "
                                  f"(tolerance {TOLERANCE:g})")
        return compiled, diff

    def warmup(self, max_batch: int = 1, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
        warm_host_runtime(self, max_batch, frame_shapes)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (already resized by the spec) -> float32 N x classes probabilities."""
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        with self._lock:
            # share_inputs: no copy in, and a batch of another size never meets a stale input tensor;
            # the output is copied out of the request's buffer, which the next call overwrites
            return self._request.infer({0: x}, share_inputs=True)[0].copy()

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        return self.predict(stack_uint8(images, self.spec))


# What `model.runtime: auto` runs on a CPU, chosen from `visiond bench --streams` (README, "Benchmark"): on this
# 2-core AMD EPYC (AVX2, no AVX-512/AMX), mobilenet_v3_small at 224, 30 fps file cameras, the largest N held for
# 20 s was onnxruntime 3 (8.9 daemon + broker CPU-ms per camera-frame), openvino 2 (12.2), torch 2 (19.1), and
# `--model-only` had onnxruntime cost the least CPU for smallcnn, mobilenet_v3_small and resnet18 alike (openvino
# 5-15 % more, torch 1.2-4x). Measured on a shared box: re-measure on a quiet one (and on an Intel one, where
# OpenVINO's kernels have more to use) and change this one constant if openvino wins there.
CPU_AUTO_RUNTIME = "onnxruntime"


def auto_runtime(device: str) -> str:
    """`model.runtime: auto`: torch where the model runs on CUDA, else `CPU_AUTO_RUNTIME`."""
    if device.startswith("cuda"):
        return "torch"
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "torch"
    return CPU_AUTO_RUNTIME
