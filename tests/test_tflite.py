"""`visiond export --format tflite`: a .tflite the LiteRT interpreter runs like the torch runtime, metadata inside.

The conversions need the optional extra `visiond[tflite]` (litert-torch, ai-edge-litert); `make test`
installs it. The error paths (bad format, extra missing, --int8 without images) need nothing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shapes import CLASSES as SHAPES, draw_shape, make_shapes_dataset
from visiond.cli.app import app
from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec, stack_uint8

CLASSES = ["good", "scratch", "spot"]
HINT = "tflite export needs the optional extra: pip install 'visiond[tflite]'"
HAVE_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert",
                                                                  "ai_edge_quantizer"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="the optional extra visiond[tflite] is not installed "
                                                        "(pip install 'visiond[tflite]'; `make test` installs it)")


def make_checkpoint(path: Path, size: int, color: str = "rgb") -> Path:
    torch.manual_seed(0)
    spec = PreprocessSpec.for_color(size, color)
    net = build_model("smallcnn", len(CLASSES), spec.channels, size)
    save_checkpoint(path, arch="smallcnn", classes=CLASSES, spec=spec, state_dict=net.state_dict(),
                    arch_args={"in_channels": spec.channels, "image_size": size}, meta={"thresholds": {"spot": 0.3}})
    return path


def shape_images(n: int, size: int, spec: PreprocessSpec) -> np.ndarray:
    """Real-looking frames (shapes on a background, BGR), preprocessed exactly as the daemon does."""
    rng = np.random.default_rng(7)
    return stack_uint8([draw_shape(k, size * 2, rng) for k in ("circle", "square", "triangle") * n][:n], spec)


def run_litert(path: Path, x: np.ndarray) -> tuple[np.ndarray, dict]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    runner = interp.get_signature_runner("serving_default")
    got = np.concatenate([runner(pixels=x[i:i + 1])["probs"] for i in range(len(x))])
    return got, runner.get_input_details()["pixels"]


@pytest.mark.slow  # two conversions
@needs_extra
def test_tflite_export_runs_in_litert_like_torch_and_carries_the_metadata(tmp_path):
    from visiond.models.tflite_export import read_tflite_metadata

    ckpt = make_checkpoint(tmp_path / "line.ckpt", 40)
    # a tolerance below any float difference cannot be met: nothing half-written is left behind
    bad = CliRunner().invoke(app, ["export", str(ckpt), "-f", "tflite", "-o", str(tmp_path / "bad.tflite"),
                                   "--tolerance", "-1"], terminal_width=200)
    assert bad.exit_code != 0 and isinstance(bad.exception, UserError)
    assert "tflite export differs from PyTorch by" in str(bad.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line.ckpt"]
    # when the checkpoint is exported to TFLite from the command line
    out = CliRunner().invoke(app, ["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "tflite float32, batch 1" in out.output and "in the LiteRT interpreter" in out.output
    # then LiteRT's interpreter, fed the daemon's uint8 NHWC frames, agrees with the torch runtime
    spec = load_checkpoint(ckpt).spec
    x = shape_images(6, 40, spec)
    got, inp = run_litert(tmp_path / "m.tflite", x)
    want = TorchClassifier.from_file(ckpt, device="cpu", precision="fp32", threads=0).predict(x)
    assert np.abs(got - want).max() < 1e-4
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 40, 40, 3]
    # and the file names its classes, preprocessing and version (the checkpoint's content hash)
    meta = read_tflite_metadata(tmp_path / "m.tflite")
    info = json.loads(meta["visiond"])
    assert json.loads(meta["classes"]) == CLASSES and info["classes"] == CLASSES
    assert meta["version"] == info["version"] == load_checkpoint(ckpt).version
    assert json.loads(meta["preprocess"]) == spec.to_dict() and info["thresholds"] == {"spot": 0.3}
    assert (info["input_layout"], info["input_shape"], info["quantization"]) == ("NHWC uint8", [1, 40, 40, 3],
                                                                                 "float32")


def make_trained_checkpoint(path: Path, dataset: Path, size: int = 32, steps: int = 80) -> Path:
    """A smallcnn fitted in a few seconds to a shapes dataset: confident, mostly right, like a real model."""
    from visiond.preprocess import Normalizer
    from visiond.train.data import ImageDataset, load_splits

    make_shapes_dataset(dataset, per_class=40, size=size, seed=3, classes=SHAPES)
    spec = PreprocessSpec.for_color(size, "rgb")
    splits = load_splits(dataset, classes=list(SHAPES))
    ds = ImageDataset(splits.root, splits.train, list(SHAPES), spec)
    x, y = torch.from_numpy(np.stack([ds.image_hwc(i) for i in range(len(ds))])), torch.from_numpy(ds.labels)
    torch.manual_seed(0)
    net, norm = build_model("smallcnn", len(SHAPES), 3, size), Normalizer(spec)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(net(norm(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, arch="smallcnn", classes=list(SHAPES), spec=spec, state_dict=net.state_dict(),
                    arch_args={"in_channels": 3, "image_size": size})
    return path


@pytest.mark.slow  # a conversion and a quantisation
@needs_extra
def test_int8_export_is_calibrated_on_a_dataset_split_and_keeps_the_verdicts(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from visiond.models.tflite_export import read_tflite_metadata
    from visiond.train.data import ImageDataset, load_splits

    ckpt = make_trained_checkpoint(tmp_path / "shapes.ckpt", tmp_path / "shapes")
    # when it is exported to int8, calibrated on the dataset's validation images
    out = CliRunner().invoke(app, ["export", str(ckpt), "-f", "tflite", "-o", str(tmp_path / "q.tflite"),
                                   "--int8", "--calibration", str(tmp_path / "shapes"), "--calibration-split", "val",
                                   "--calibration-images", "40", "--batch", "2"], terminal_width=300)
    assert out.exit_code == 0, out.output
    assert "tflite int8, batch 2" in out.output and "top-1 agreement" in out.output and "accuracy" in out.output
    # then it is int8 inside, still uint8 in and float32 probabilities out, and under a third of the float size
    interp = Interpreter(model_path=str(tmp_path / "q.tflite"))
    runner = interp.get_signature_runner("serving_default")
    assert runner.get_input_details()["pixels"]["dtype"] == np.uint8
    assert runner.get_output_details()["probs"]["dtype"] == np.float32
    assert any(t["dtype"] == np.int8 for t in interp.get_tensor_details())
    params = sum(t.numel() for t in load_checkpoint(ckpt).state_dict.values())
    assert (tmp_path / "q.tflite").stat().st_size < 4 * params / 3
    # and on the test images (never seen in calibration) it keeps the torch runtime's verdicts, within tolerance
    splits = load_splits(tmp_path / "shapes", classes=list(SHAPES))
    ds = ImageDataset(splits.root, splits.test, list(SHAPES), load_checkpoint(ckpt).spec)
    x = np.stack([ds.image_hwc(i) for i in range(len(ds) // 2 * 2)])
    got = np.concatenate([runner(pixels=x[i:i + 2])["probs"] for i in range(0, len(x), 2)])
    want = TorchClassifier.from_file(ckpt, device="cpu", precision="fp32", threads=0).predict(x)
    assert (want.argmax(1) == ds.labels[:len(x)]).mean() >= 0.6  # the model learnt something to keep
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert np.abs(got - want).max() < 0.25  # the stated int8 tolerance (float: 1e-4)
    print(out.output)  # the figures: top-1 agreement and accuracy before/after on the calibration images
    assert json.loads(read_tflite_metadata(tmp_path / "q.tflite")["visiond"])["quantization"] == "int8"


def visiond_cli(*args: str, block_extra: bool = False) -> subprocess.CompletedProcess:
    """`visiond ARGS` in a child; with block_extra the tflite packages fail to import, as on a base install."""
    block = "import sys\nfor m in ('litert_torch', 'ai_edge_litert', 'ai_edge_quantizer'): sys.modules[m] = None\n"
    code = (block if block_extra else "import sys\n") + f"sys.argv = ['visiond', *{list(args)!r}]\n" \
        "from visiond.cli.app import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_without_the_extra_the_export_says_which_extra_in_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", 32)
    proc = visiond_cli("export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite"),
                       block_extra=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"visiond: error: {HINT}"]
    assert not (tmp_path / "m.tflite").exists()


def test_a_bad_format_or_int8_without_images_is_refused_in_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", 32)
    cases = [
        (["--format", "coreml"], "--format 'coreml': expected one of onnx, torchscript, triton, tflite"),
        (["--format", "tflite", "--int8"], "--int8 needs --calibration DATASET"),
        (["--format", "onnx", "--int8"], "--int8/--calibration: only for --format tflite, not 'onnx'"),
        (["--format", "tflite", "--batch", "0"], "--batch 0: expected 1..256"),
    ]
    for extra, message in cases:
        out = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "m.x"), *extra])
        assert out.exit_code != 0 and isinstance(out.exception, UserError), (extra, out.output)
        assert message in str(out.exception) and "\n" not in str(out.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]
