"""TensorFlow Lite / LiteRT export of a checkpoint, checked in the LiteRT interpreter against PyTorch.

The `.tflite` runs the same contract as the ONNX export: `pixels`, uint8 N x H x W x C already
resized by the checkpoint's spec, in; `probs`, float32 probabilities (normalisation, temperature
and softmax inside), out. Google's `litert-torch` converts the module (no TensorFlow involved);
its batch axis is fixed (`batch`, default 1: the converter cannot lower the normalisation with a
symbolic batch), which is what a phone or an edge box feeds anyway.

The checkpoint's metadata travels inside the file as TFLite flatbuffer `Model.metadata` entries
(name -> buffer of UTF-8 bytes), the same key/values as the ONNX export's metadata_props, with
the names prefixed `visiond` (`visiond`, `visiond.name`, `visiond.version`, `visiond.classes`,
`visiond.preprocess`); `read_tflite_metadata` reads them back.

`int8=True` quantises weights and activations to int8 with Google's `ai-edge-quantizer` (static
ranges from calibration images the caller loads); the input stays uint8 and the output stays
float32 probabilities (the softmax and the graph output are left in float), so a consumer needs
no dequantisation. An int8 model cannot meet the float tolerance: it is checked against PyTorch
with a looser, stated one on the calibration images and on the random ones: probabilities within
`INT8_TOLERANCE` (0.25) and the top class kept on `INT8_MIN_AGREEMENT` (95 %) of the calibration images.

The converter, the quantizer and the interpreter are the optional extra `visiond[tflite]`,
imported only here and only when asked for; without it the export stops with one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiond.errors import UserError
from visiond.fsutil import atomic_replace
from visiond.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "pixels", "probs"  # the ONNX export's tensor names, as the signature's
EXTRA_HINT = "tflite export needs the optional extra: pip install 'visiond[tflite]'"
SIGNATURE = "serving_default"  # litert-torch's default signature name
META_PREFIX = "visiond"
INT8_TOLERANCE = 0.25  # largest probability difference an int8 model may show against PyTorch
INT8_MIN_AGREEMENT = 0.95  # and the share of calibration images whose top class it must keep
MAX_BATCH = 256


@dataclass(frozen=True)
class TfliteExportResult:
    """models.export's ExportResult fields, plus what int8 quantisation cost (None for a float export)."""

    path: Path
    format: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    quantization: str = "float32"
    tolerance: float = 0.0
    calibration_images: int = 0
    top1_agreement: float | None = None  # int8 vs PyTorch on the calibration images
    accuracy_torch: float | None = None  # against the calibration images' labels, when given
    accuracy_tflite: float | None = None
    size_bytes: int = 0


def _missing_extra() -> UserError:
    return UserError(EXTRA_HINT)


def require_extra() -> None:
    """Fail fast, before any work (calibration images, conversion), when the extra is not installed."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")):
        raise _missing_extra()


@contextmanager
def _quiet():
    """Keep the converter's import-time and progress chatter off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # LiteRT's C++ INFO/WARNING lines
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)  # torchao's deprecation note on import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pytree.setLevel(level)


def _litert_torch():
    try:
        with _quiet():
            import litert_torch
    except ImportError:
        raise _missing_extra() from None
    litert_torch.config.show_progress = False
    return litert_torch


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise _missing_extra() from None
    return Interpreter


class _Named(nn.Module):
    """The export module with the ONNX export's tensor names: signature input `pixels`, output `probs`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT_NAME: self.module(pixels)}


def convert_module(module: nn.Module, example: torch.Tensor) -> bytes:
    """The float32 .tflite flatbuffer of `module` at the example's (fixed) shape."""
    litert_torch = _litert_torch()
    try:
        with _quiet(), torch.no_grad():
            edge = litert_torch.convert(_Named(module).eval(), sample_kwargs={INPUT_NAME: example})
    except Exception as exc:  # noqa: BLE001 - a converter failure (unsupported op, ...) is one line for the user
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"tflite conversion failed ({exc.__class__.__name__}: {first})") from None
    return bytes(edge.model_content())


def quantize_int8(float_model: bytes, calibration: np.ndarray, batch: int) -> bytes:
    """Static int8 (weights and activations) with ranges from `calibration` (uint8 N x H x W x C).

    The softmax and the graph output stay float32, so the file still answers probabilities.
    """
    try:
        with _quiet():
            from ai_edge_quantizer import qtyping, quantizer, recipe_manager
            from ai_edge_quantizer.algorithm_manager import AlgorithmName
    except ImportError:
        raise _missing_extra() from None
    ops = qtyping.TFLOperationName
    recipe = recipe_manager.RecipeManager()
    recipe.add_static_config(regex=".*", operation_name=ops.ALL_SUPPORTED, activation_num_bits=8,
                             weight_num_bits=8, algorithm_key=AlgorithmName.MIN_MAX_UNIFORM_QUANT)
    for op in (ops.SOFTMAX, ops.OUTPUT):
        recipe.add_quantization_config(regex=".*", operation_name=op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    q = quantizer.Quantizer(bytearray(float_model), recipe.get_quantization_recipe())
    samples = [{INPUT_NAME: chunk} for chunk in _chunks(calibration, batch)]
    with _quiet():
        ranges = q.calibrate({SIGNATURE: samples}, num_threads=min(4, os.cpu_count() or 1))
        result = q.quantize(ranges, enable_progress_report=False)
    return bytes(result.quantized_model)


def _chunks(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """`images` in chunks of exactly `batch` (the model's fixed batch); the last one padded by repetition."""
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(np.ascontiguousarray(chunk))
    return out


def run_tflite(model: bytes | str | Path, images: np.ndarray, threads: int = 1) -> np.ndarray:
    """Probabilities for uint8 N x H x W x C `images`, run by the LiteRT interpreter (XNNPACK on the CPU)."""
    Interpreter = _interpreter_class()
    kw = {"model_path": str(model)} if isinstance(model, (str, Path)) else {"model_content": bytes(model)}
    interpreter = Interpreter(num_threads=threads, **kw)
    runner = interpreter.get_signature_runner(SIGNATURE)
    batch = int(runner.get_input_details()[INPUT_NAME]["shape"][0])
    probs = [runner(**{INPUT_NAME: chunk})[OUTPUT_NAME] for chunk in _chunks(images, batch)]
    return np.concatenate(probs)[:len(images)]


def _meta_name(key: str) -> str:
    return META_PREFIX if key == META_PREFIX else f"{META_PREFIX}.{key}"


def embed_metadata(model: bytes, meta: dict[str, str]) -> bytes:
    """The flatbuffer with `meta` added as Model.metadata entries (earlier visiond entries replaced)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise _missing_extra() from None
    obj = flatbuffer_utils.read_model_from_bytearray(bytearray(model))  # resolves out-of-line buffers
    names = {_meta_name(k) for k in meta}
    obj.metadata = [m for m in (obj.metadata or []) if _text(m.name) not in names]
    obj.buffers = obj.buffers or []
    for key, value in meta.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(value.encode("utf-8"), dtype=np.uint8)
        obj.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = _meta_name(key), len(obj.buffers) - 1
        obj.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def _text(name: bytes | str | None) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")


def read_tflite_metadata(path: str | Path) -> dict[str, str]:
    """visiond's metadata from a .tflite: the same keys as `read_onnx_metadata` ("visiond" is the JSON of all)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise _missing_extra() from None
    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        out = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            name = _text(entry.Name())
            if name != META_PREFIX and not name.startswith(META_PREFIX + "."):
                continue
            buf = model.Buffers(entry.Buffer())
            raw = (buf.DataAsNumpy().tobytes() if buf.DataLength()
                   else data[buf.Offset():buf.Offset() + buf.Size()] if buf.Offset() > 1 else b"")
            out[name.removeprefix(META_PREFIX + ".") if name != META_PREFIX else name] = raw.decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which
        raise UserError(f"{path}: not a readable .tflite flatbuffer ({exc.__class__.__name__})") from None
    return out


def tflite_metadata(ckpt: Checkpoint, meta: dict[str, str], batch: int, quantization: str) -> dict[str, str]:
    """The ONNX export's key/values, the visiond JSON also naming the fixed input shape and the quantisation."""
    from visiond import __version__

    meta = dict(meta)
    info = json.loads(meta["visiond"])
    s = ckpt.spec
    info.update(input_shape=[batch, s.height, s.width, s.channels], quantization=quantization,
                exporter=f"visiond {__version__}")
    meta["visiond"] = json.dumps(info, sort_keys=True)
    return meta


def _sample_inputs(ckpt: Checkpoint, n: int = 4, seed: int = 0) -> np.ndarray:
    """Random uint8 images of the checkpoint's input shape (the ONNX export checks on the same kind)."""
    s = ckpt.spec
    return np.random.default_rng(seed).integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8)


def _run_torch(module: nn.Module, images: np.ndarray) -> np.ndarray:
    """The reference: the module being exported, run eagerly in fp32 on the CPU."""
    with torch.inference_mode():
        return module(torch.from_numpy(images)).numpy()


def export_tflite(ckpt: Checkpoint, module: nn.Module, meta: dict[str, str], out: str | Path, *,
                  tolerance: float = 1e-4, batch: int = 1, int8: bool = False, calibration: np.ndarray | None = None,
                  labels: np.ndarray | None = None, int8_tolerance: float = INT8_TOLERANCE,
                  progress: bool = False) -> TfliteExportResult:
    """Write the .tflite of `module` atomically, then refuse it (and delete it) if LiteRT disagrees with PyTorch.

    Called by `export_checkpoint(ckpt, "tflite", out, **options)`, which passes its own ExportModule and
    export_metadata, so every format runs one contract. The float model is always checked at `tolerance`
    on random images; with
    `int8`, the quantised model (calibrated on `calibration`) is checked at `int8_tolerance` on
    those and on the calibration images, and top-1 agreement (and accuracy, given `labels`) reported.
    """
    if not 1 <= batch <= MAX_BATCH:
        raise UserError(f"--batch {batch}: expected 1..{MAX_BATCH} (the .tflite's fixed batch size)")
    require_extra()
    s = ckpt.spec
    if int8:
        if calibration is None or len(calibration) == 0:
            raise UserError("--int8 needs calibration images (--calibration DATASET): activation ranges "
                            "come from real images")
        if calibration.dtype != np.uint8 or calibration.shape[1:] != (s.height, s.width, s.channels):
            raise UserError(f"calibration images: expected uint8 N x {s.height} x {s.width} x {s.channels}, "
                            f"got {calibration.dtype} {tuple(calibration.shape)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    inputs = _sample_inputs(ckpt)
    want = _run_torch(module, inputs)  # before conversion, so no exporter can have touched the module
    example = torch.from_numpy(np.ascontiguousarray(inputs[:1].repeat(batch, axis=0)))
    with _status(progress, "converting to TFLite (litert-torch)") as step:
        model = convert_module(module, example)
        step("checking the float model in the LiteRT interpreter")
        diff = float(np.abs(run_tflite(model, inputs) - want).max())
        if not diff <= tolerance:
            raise UserError(f"tflite export differs from PyTorch by {diff:.3g} in probability "
                            f"(tolerance {tolerance:g}); not written")
        stats: dict = {}
        if int8:
            step(f"quantising to int8 ({len(calibration)} calibration images)")
            model = quantize_int8(model, calibration, batch)
            step("checking the int8 model in the LiteRT interpreter")
            diff, stats = _check_int8(module, model, inputs, want, calibration, labels, int8_tolerance)
        model = embed_metadata(model, tflite_metadata(ckpt, meta, batch, "int8" if int8 else "float32"))
        limit = int8_tolerance if int8 else tolerance
        with atomic_replace(out) as tmp:
            tmp.write_bytes(model)
            # what is on disk is what was checked: the written file (metadata added) runs once more
            again = float(np.abs(run_tflite(tmp, inputs) - want).max())
            if not again <= limit:
                raise UserError(f"tflite file as written differs from PyTorch by {again:.3g} "
                                f"(tolerance {limit:g}); not written")
    log.info("exported %s to %s (%s, max abs diff %.3g)", ckpt.version, out, "int8" if int8 else "float32", diff)
    return TfliteExportResult(out, "tflite", diff, (batch,), quantization="int8" if int8 else "float32",
                              tolerance=limit, size_bytes=len(model), **stats)


def _check_int8(module: nn.Module, model: bytes, inputs: np.ndarray, want: np.ndarray, calibration: np.ndarray,
                labels: np.ndarray | None, tolerance: float) -> tuple[float, dict]:
    ref = _run_torch(module, calibration)
    got = run_tflite(model, calibration)
    diff = max(float(np.abs(got - ref).max()), float(np.abs(run_tflite(model, inputs) - want).max()))
    stats = {"calibration_images": len(calibration),
             "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    if labels is not None and len(labels) == len(calibration):
        stats.update(accuracy_torch=float((ref.argmax(1) == labels).mean()),
                     accuracy_tflite=float((got.argmax(1) == labels).mean()))
    if not (diff <= tolerance and stats["top1_agreement"] >= INT8_MIN_AGREEMENT):
        raise UserError(f"tflite int8 export differs from PyTorch by {diff:.3g} in probability and keeps the top "
                        f"class of {stats['top1_agreement']:.1%} of the calibration images (int8 tolerance "
                        f"{tolerance:g}, at least {INT8_MIN_AGREEMENT:.0%}); not written")
    return diff, stats


@contextmanager
def _status(enabled: bool, first: str):
    """A rich spinner naming the current step (conversion takes seconds to minutes); `step(text)` moves it on."""
    if not enabled:
        yield lambda text: log.debug("%s", text)
        return
    from rich.console import Console

    with Console(stderr=True).status(first) as status:
        yield lambda text: status.update(text)
