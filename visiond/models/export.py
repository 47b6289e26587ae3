"""ONNX and TorchScript exports of a checkpoint, verified against PyTorch.

The exported graph takes what the daemon's runtime takes — uint8 N x H x W x C pixels,
already resized by the checkpoint's spec — and returns probabilities, normalisation and
softmax included (the logits divided by the checkpoint's fitted temperature first), so no
consumer can normalise or calibrate differently. The batch axis is dynamic.
The checkpoint's metadata (classes, preprocessing, name, version) travels inside the file.

`triton` writes that same ONNX file as a Triton model repository entry (`<name>/1/model.onnx`,
`<name>/config.pbtxt` with dynamic batching, `<name>/labels.txt`), so a shared model server
serves exactly what a box would run itself (`model.runtime: remote`).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiond.errors import UserError
from visiond.fsutil import atomic_replace, atomic_write_text
from visiond.models.checkpoint import Checkpoint, load_checkpoint
from visiond.preprocess import Normalizer

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript", "triton", "tflite")  # tflite: visiond.models.tflite_export (extra visiond[tflite])
INPUT_NAME, OUTPUT_NAME = "pixels", "probs"
VERIFY_BATCHES = (1, 3)


class ExportModule(nn.Module):
    """uint8 NHWC -> probabilities: the runtime's Normalizer, the network, the checkpoint's temperature, softmax.

    The temperature (fitted on the validation split at the end of training) is a constant in the graph,
    so every export and every runtime built on one (onnxruntime, OpenVINO, TFLite, Triton) gives the
    same calibrated scores as `TorchClassifier`; at 1.0 the graph has no division at all.
    """

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.normalize, self.net = Normalizer(ckpt.spec), ckpt.build()
        self.temperature = float(ckpt.temperature)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.normalize(pixels)).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


def export_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """String key/values for ONNX metadata_props and TorchScript extra files."""
    info = {"format": "visiond.export/1", "name": ckpt.name, "version": ckpt.version, "arch": ckpt.arch,
            "classes": list(ckpt.classes), "preprocess": ckpt.spec.to_dict(), "input": INPUT_NAME,
            "input_layout": "NHWC uint8", "output": OUTPUT_NAME, "thresholds": ckpt.thresholds,
            "temperature": ckpt.temperature}
    return {"visiond": json.dumps(info, sort_keys=True), "name": ckpt.name, "version": ckpt.version,
            "classes": json.dumps(list(ckpt.classes)), "preprocess": json.dumps(ckpt.spec.to_dict())}


def _sample_inputs(ckpt: Checkpoint, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    s = ckpt.spec
    return [rng.integers(0, 256, (n, s.height, s.width, s.channels), dtype=np.uint8) for n in VERIFY_BATCHES]


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int) -> None:
    import onnx

    try:  # torch.export-based exporter (the default, works offline); dynamic batch axis
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}, opset_version=opset,
                          dynamo=True, verbose=False, external_data=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: fall back to the TorchScript-based exporter
        log.warning("torch.export-based ONNX export failed (%s); using the TorchScript-based exporter",
                    str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "visiond"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _run_onnx(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in inputs]


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still what C++/LibTorch loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{k}.json": v for k, v in meta.items()})


def _run_torch(module: nn.Module, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The reference: the module being exported, run eagerly in fp32 on the CPU."""
    with torch.inference_mode():
        return [module(torch.from_numpy(x)).numpy() for x in inputs]


def _run_torchscript(path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return [m(torch.from_numpy(x)).numpy() for x in inputs]


def export_checkpoint(checkpoint: str | Path | Checkpoint, fmt: str, out: str | Path, *, tolerance: float = 1e-4,
                      opset: int = 18, **tflite) -> ExportResult:
    """Write the export atomically, then refuse it (and delete it) if it disagrees with PyTorch."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if fmt == "triton":
        return export_triton(ckpt, out, tolerance=tolerance, opset=opset)
    if fmt == "tflite":  # options: batch, int8, calibration, labels, int8_tolerance, progress (see export_tflite)
        from visiond.models.tflite_export import export_tflite

        return export_tflite(ckpt, ExportModule(ckpt), export_metadata(ckpt), out, tolerance=tolerance, **tflite)
    if tflite:
        raise TypeError(f"export_checkpoint: {', '.join(tflite)} only apply to fmt='tflite'")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportModule(ckpt).eval()
    inputs = _sample_inputs(ckpt)
    want = _run_torch(module, inputs)  # before export, so no exporter can have touched the module
    example = torch.from_numpy(inputs[-1])
    meta = export_metadata(ckpt)
    with atomic_replace(out) as tmp:
        if fmt == "onnx":
            _export_onnx(module, example, tmp, meta, opset)
            got = _run_onnx(tmp, inputs)
        else:
            _export_torchscript(module, example, tmp, meta)
            got = _run_torchscript(tmp, inputs)
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        if not diff <= tolerance:
            raise UserError(f"{fmt} export differs from PyTorch by {diff:.3g} in probability "
                            f"(tolerance {tolerance:g}); not written")
    log.info("exported %s to %s (max abs diff %.3g)", getattr(checkpoint, "version", checkpoint), out, diff)
    return ExportResult(out, fmt, diff, VERIFY_BATCHES)


TRITON_PLATFORM, TRITON_VERSION, LABELS_FILE = "onnxruntime_onnx", "1", "labels.txt"
_TRITON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def export_triton(checkpoint: str | Path | Checkpoint, repo: str | Path, *, name: str | None = None,
                  max_batch: int = 64, tolerance: float = 1e-4, opset: int = 18) -> ExportResult:
    """`<repo>/<name>/` for Triton's ONNX Runtime backend; the result's path is that model folder.

    The ONNX file is the `onnx` export (same parity check against PyTorch); config.pbtxt is
    written last, so a server polling the repository never sees a config without its model.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    name = ckpt.name if name is None else name
    if not _TRITON_NAME.fullmatch(name):
        raise UserError(f"Triton model name {name!r}: expected letters, digits, '_', '.' or '-' (a folder name)")
    if not 1 <= max_batch <= 65536:
        raise UserError(f"--max-batch {max_batch}: expected 1..65536")
    folder = Path(repo) / name
    result = export_checkpoint(ckpt, "onnx", folder / TRITON_VERSION / "model.onnx", tolerance=tolerance,
                               opset=opset)
    # a class name is printable (the checkpoint refuses others), so each is one line
    atomic_write_text(folder / LABELS_FILE, "".join(f"{c}\n" for c in ckpt.classes))
    atomic_write_text(folder / "config.pbtxt", triton_config(ckpt, name, max_batch))
    return ExportResult(folder, "triton", result.max_abs_diff, result.batch_sizes)


def _pbtxt(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept, quotes, backslashes and control characters escaped)."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(ch if ch >= " " else f"\\{ord(ch):03o}" for ch in body) + '"'


def triton_config(ckpt: Checkpoint, name: str, max_batch: int) -> str:
    """config.pbtxt: the ONNX export's input and output, greedy dynamic batching, labels, visiond's identity."""
    from visiond import __version__

    s = ckpt.spec
    params = {"visiond_version": ckpt.version, "visiond_arch": ckpt.arch,
              "visiond_classes": json.dumps(list(ckpt.classes)), "visiond_preprocess": json.dumps(s.to_dict())}
    colour = "grey" if s.color == "gray" else "RGB"
    lines = [
        f"# Written by `visiond export --format triton` (visiond {__version__}): model {name}, version {ckpt.version}.",
        "# Serve the folder above this one with `tritonserver --model-repository <it>` and point the boxes at",
        "# the server (model.runtime: remote, model.url). The input is the checkpoint's preprocessed image",
        f"# ({colour} uint8 at {s.height}x{s.width}); normalisation and softmax are inside the model.",
        f"name: {_pbtxt(name)}",
        f"platform: {_pbtxt(TRITON_PLATFORM)}",
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f"    name: {_pbtxt(INPUT_NAME)}",
        "    data_type: TYPE_UINT8",
        f"    dims: [ {s.height}, {s.width}, {s.channels} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_pbtxt(OUTPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {len(ckpt.classes)} ]",
        f"    label_filename: {_pbtxt(LABELS_FILE)}",
        "  }",
        "]",
        "# Greedy: a batch is what is queued when an instance is free, with no added wait.",
        "dynamic_batching { }",
        "version_policy { latest { num_versions: 1 } }",
    ]
    lines += [f"parameters {{ key: {_pbtxt(k)} value {{ string_value: {_pbtxt(v)} }} }}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def read_torchscript_metadata(path: str | Path) -> dict:
    files = {"visiond.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files["visiond.json"])
