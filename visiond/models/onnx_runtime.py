"""ONNX Runtime on the CPU behind the same Classifier interface as `TorchClassifier`.

Why: on a CPU-only line PC the model is most of the cost per frame, and ONNX
Runtime runs the same network with fewer framework overheads (measured here on
2 cores, smallcnn 64x64, one thread: 1.6x torch eager's throughput at batch 8,
2.7x at batch 1; see README, "Speed").

The checkpoint stays the one source of truth: at load it is exported with
`visiond export`'s own code (uint8 NHWC in, the checkpoint's normalisation and
softmax inside the graph, so preprocessing cannot drift), checked against torch
on sample inputs, and cached as `<cache_dir>/<version>.onnx`, the version being
the checkpoint's content hash. A cache file is trusted only if its embedded
metadata names that same version; the graph holds no code, only operators.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from visiond.models.checkpoint import Checkpoint, CheckpointError
from visiond.preprocess import stack_uint8

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(available: Sequence[str], device: str, *, cuda_devices: int, current: int = 0,
                     cache_dir: str | Path | None = None, tensorrt: bool = True) -> list:
    """ONNX Runtime execution providers for `device`, best first, always ending with the CPU.

    TensorRT and CUDA come from the `visiond[gpu]` extra (onnxruntime-gpu) and are used only
    where they are installed (`available`, from ort.get_available_providers()) and a CUDA GPU
    is present: device auto picks them then, cpu never does. TensorRT builds an engine on the
    first load (a minute for resnet18) and caches it beside the ONNX file.
    """
    want_gpu = device != "cpu" and cuda_devices > 0
    idx = int(device.partition(":")[2]) if device.startswith("cuda:") else current
    chosen: list = []
    if want_gpu and tensorrt and "TensorrtExecutionProvider" in available:
        opts = {"device_id": idx}
        if cache_dir is not None:
            opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(Path(cache_dir) / "tensorrt")}
        chosen.append(("TensorrtExecutionProvider", opts))
    if want_gpu and "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": idx}))
    chosen.append("CPUExecutionProvider")
    return chosen


def _provider_name(p) -> str:
    return p if isinstance(p, str) else p[0]


def warm_host_runtime(clf, max_batch: int, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
    """A runtime that resizes on the CPU (onnxruntime, OpenVINO): each batch size once, then `predict_images`
    with frames of the cameras' sizes."""
    s = clf.spec
    sizes = sorted({1, max_batch})
    for n in sizes:
        clf.predict(np.zeros((n, s.height, s.width, s.channels), np.uint8))
    for shape in dict.fromkeys(tuple(shape) for shape in frame_shapes):
        for n in sizes:
            clf.predict_images([np.zeros(shape, np.uint8)] * n)


def cached_version(path: Path) -> str | None:
    """The model version an ONNX cache file was exported from; None for an unreadable or foreign file."""
    from visiond.models.export import read_onnx_metadata

    try:
        return json.loads(read_onnx_metadata(path).get("visiond", "{}")).get("version")
    except Exception:  # noqa: BLE001 - unreadable or foreign file: export again over it
        return None


class OnnxClassifier:
    """ONNX Runtime (CPU, or CUDA/TensorRT with onnxruntime-gpu); input is the spec-resized uint8 batch."""

    runtime = "onnxruntime"

    def __init__(self, ckpt: Checkpoint, cache_dir: str | Path, threads: int = 1, device: str = "cpu",
                 tensorrt: bool = True):
        import onnxruntime as ort

        from visiond.models.export import INPUT_NAME, OUTPUT_NAME, export_checkpoint

        self.name, self.version, self.arch = ckpt.name, ckpt.version, ckpt.arch
        self.classes, self.spec = ckpt.classes, ckpt.spec
        self.device = "cpu"
        cache = Path(cache_dir)
        path = cache / f"{ckpt.version}.onnx"
        if not path.exists() or cached_version(path) != ckpt.version:
            try:
                result = export_checkpoint(ckpt, "onnx", path)
            except Exception as exc:  # noqa: BLE001 - any exporter failure is reported the same way
                first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise CheckpointError(f"cannot run {ckpt.arch} {ckpt.version} with onnxruntime: {first}") from exc
            log.info("model %s %s exported to ONNX for onnxruntime (%s, max abs diff to torch %.2g)",
                     ckpt.name, ckpt.version, path, result.max_abs_diff)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = onnxruntime's default (all cores)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads must not spin: decoding and publishing share these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=self._providers(ort, device, cache, tensorrt))
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file: say so, the next load re-exports
            path.unlink(missing_ok=True)
            raise CheckpointError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self._input, self._output = INPUT_NAME, OUTPUT_NAME
        used = self._session.get_providers()
        if used and used[0] in _GPU_PROVIDERS:
            opts = self._session.get_provider_options().get(used[0], {})
            self.device = f"cuda:{opts.get('device_id', 0)}"
        log.info("model %s %s: onnxruntime on %s (providers %s)", ckpt.name, ckpt.version, self.device, ", ".join(used))

    @staticmethod
    def _providers(ort, device: str, cache: Path, tensorrt: bool) -> list:
        available = ort.get_available_providers()
        cuda_devices, current = 0, 0
        if device != "cpu" and any(p in available for p in _GPU_PROVIDERS):
            import torch

            cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
            current = torch.cuda.current_device() if cuda_devices else 0
        chosen = choose_providers(available, device, cuda_devices=cuda_devices, current=current, cache_dir=cache,
                                  tensorrt=tensorrt)
        if device.startswith("cuda") and len(chosen) == 1:
            log.warning("onnxruntime: model.device %s asks for a GPU, but %s; running on the CPU", device,
                        "no CUDA GPU is present" if any(p in available for p in _GPU_PROVIDERS)
                        else "onnxruntime-gpu is not installed (pip install 'visiond[gpu]')")
        return chosen

    def warmup(self, max_batch: int = 1, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
        warm_host_runtime(self, max_batch, frame_shapes)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (already resized by the spec) -> float32 N x classes probabilities."""
        return self._session.run([self._output], {self._input: np.ascontiguousarray(pixels)})[0]

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        return self.predict(stack_uint8(images, self.spec))
