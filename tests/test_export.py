"""Exports: ONNX (run by onnxruntime) and TorchScript agree with the PyTorch runtime and carry the metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import save_checkpoint
from visiond.models.export import export_checkpoint, read_onnx_metadata, read_torchscript_metadata
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec

CLASSES = ["good", "scratch", "spot"]


def make_checkpoint(path: Path, arch: str, size: int, color: str = "rgb") -> Path:
    torch.manual_seed(0)
    spec = PreprocessSpec.for_color(size, color, imagenet=arch != "smallcnn" and color == "rgb")
    net = build_model(arch, len(CLASSES), spec.channels, size)
    save_checkpoint(path, arch=arch, classes=CLASSES, spec=spec, state_dict=net.state_dict(),
                    arch_args={"in_channels": spec.channels, "image_size": size}, meta={"thresholds": {"spot": 0.3}})
    return path


@pytest.mark.parametrize("arch,size,color", [("smallcnn", 48, "rgb"), ("smallcnn", 32, "gray"),
                                             pytest.param("mobilenet_v3_small", 64, "rgb", marks=pytest.mark.slow)])
def test_onnx_export_matches_pytorch_and_carries_metadata(tmp_path, arch, size, color):
    # given a checkpoint
    ckpt = make_checkpoint(tmp_path / "m.ckpt", arch, size, color)
    # when it is exported to ONNX
    result = export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx")
    # then onnxruntime, fed uint8 NHWC at a batch size the export never saw, agrees with the runtime
    channels = 1 if color == "gray" else 3
    x = np.random.default_rng(1).integers(0, 256, (5, size, size, channels), dtype=np.uint8)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = sess.run(["probs"], {"pixels": x})[0]
    want = TorchClassifier.from_file(ckpt, device="cpu", precision="fp32", threads=0).predict(x)
    assert np.abs(got - want).max() < 1e-4 and result.max_abs_diff < 1e-4
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    # and the metadata names the classes and the preprocessing
    meta = read_onnx_metadata(result.path)
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["preprocess"])["height"] == size
    assert json.loads(meta["visiond"])["thresholds"] == {"spot": 0.3}
    assert meta["version"] and meta["name"] == "m"


def test_torchscript_export_matches_pytorch_and_carries_metadata(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", "smallcnn", 40)
    # when exported to TorchScript
    result = export_checkpoint(ckpt, "torchscript", tmp_path / "m.pt")
    # then the loaded module agrees with the runtime at a new batch size
    x = np.random.default_rng(2).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still loadable
        module = torch.jit.load(str(result.path))
        got = module(torch.from_numpy(x)).numpy()
    want = TorchClassifier.from_file(ckpt, device="cpu", precision="fp32", threads=0).predict(x)
    assert np.abs(got - want).max() < 1e-4
    # and the extra files hold the metadata
    meta = read_torchscript_metadata(result.path)
    assert meta["classes"] == CLASSES and meta["preprocess"]["width"] == 40 and meta["input_layout"] == "NHWC uint8"


def test_unknown_format_or_tolerance_failure_writes_nothing(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", "smallcnn", 32)
    with pytest.raises(UserError, match="expected one of onnx, torchscript"):
        export_checkpoint(ckpt, "coreml", tmp_path / "m.mlmodel")
    # a tolerance below any float difference cannot be met: nothing half-written is left behind
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx", tolerance=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]
