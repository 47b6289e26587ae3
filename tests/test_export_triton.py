"""`visiond export --format triton`: a model repository Triton loads (config.pbtxt checked with Triton's own
protobuf schema, the labels file, `1/model.onnx` agreeing with the torch runtime on real images)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from typer.testing import CliRunner

from shapes import draw_shape
from visiond.cli.app import app
from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.models.export import export_triton
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec, stack_uint8


def make_checkpoint(path: Path, classes: list[str], size: int, color: str = "rgb") -> Path:
    torch.manual_seed(0)
    spec = PreprocessSpec.for_color(size, color)
    net = build_model("smallcnn", len(classes), spec.channels, size)
    save_checkpoint(path, arch="smallcnn", classes=classes, spec=spec, state_dict=net.state_dict(),
                    arch_args={"in_channels": spec.channels, "image_size": size})
    return path


@functools.cache
def triton_model_config():
    """Triton's `inference.ModelConfig`, from the model_config_pb2 tritonclient ships.

    It sits in `tritonclient/grpc/`, whose package import needs grpcio; the module itself needs only protobuf.
    """
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError):  # tritonclient[http] only: load the generated module by its path
        import tritonclient

        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
        model_config_pb2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model_config_pb2)
    return model_config_pb2


def parse_config(folder: Path):
    schema = triton_model_config()
    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), schema.ModelConfig()), schema


def line_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """BGR crops of every size a camera ROI gives, drawn shapes on varied backgrounds."""
    rng = np.random.default_rng(seed)
    kinds = ("circle", "square", "triangle")
    return [draw_shape(kinds[i % 3], int(rng.integers(24, 160)), rng) for i in range(n)]


def test_the_cli_writes_a_repository_triton_parses_and_its_model_agrees_with_torch(tmp_path):
    # given a checkpoint
    classes = ["good", "scratch", "spot"]
    ckpt = make_checkpoint(tmp_path / "line.ckpt", classes, 48)
    # when it is exported as a Triton model repository from the command line
    out = CliRunner().invoke(app, ["export", str(ckpt), "--format", "triton", "--out", str(tmp_path / "repo"),
                                   "--max-batch", "32"], terminal_width=200)
    assert out.exit_code == 0, out.output
    folder = tmp_path / "repo" / "line"
    assert "tritonserver --model-repository" in out.output and str(folder) in out.output
    # then the folder is Triton's layout, and config.pbtxt parses with Triton's own schema
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    cfg, schema = parse_config(folder)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("line", "onnxruntime_onnx", 32)
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0  # greedy, as the daemon's own batcher
    [inp], [outp] = cfg.input, cfg.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixels", schema.TYPE_UINT8, [48, 48, 3])
    assert (outp.name, outp.data_type, list(outp.dims)) == ("probs", schema.TYPE_FP32, [3])
    # and the output's label file holds the classes in index order (Triton's classification extension)
    assert (folder / outp.label_filename).read_text().splitlines() == classes
    loaded = load_checkpoint(ckpt)
    assert cfg.parameters["visiond_version"].string_value == loaded.version
    assert json.loads(cfg.parameters["visiond_classes"].string_value) == classes
    # and the ONNX model has exactly the tensors the config names (what Triton's ONNX backend checks),
    # with a batch axis for the dynamic batcher
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    [si], [so] = sess.get_inputs(), sess.get_outputs()
    assert (si.name, si.type, si.shape[1:]) == ("pixels", "tensor(uint8)", [48, 48, 3])
    assert (so.name, so.type, so.shape[1:]) == ("probs", "tensor(float)", [3])
    assert isinstance(si.shape[0], str) and isinstance(so.shape[0], str)
    # and on real images, preprocessed as a box preprocesses them, it agrees with the torch runtime
    images = line_images(20)
    got = sess.run(["probs"], {"pixels": stack_uint8(images, loaded.spec)})[0]
    want = TorchClassifier(loaded, device="cpu", precision="fp32", threads=0).predict_images(images)
    assert np.abs(got - want).max() < 1e-4


def test_a_grey_model_with_awkward_class_names_and_its_own_name_round_trips(tmp_path):
    # given a grey checkpoint whose class names need escaping in protobuf text format
    classes = ['ok "clean"', "dent\\deep", "rayure", "ölfleck"]
    ckpt = make_checkpoint(tmp_path / "m.ckpt", classes, 32, color="gray")
    # when it is exported under another name
    result = export_triton(ckpt, tmp_path / "repo", name="station-1.grey", max_batch=8)
    # then the config still parses, with one channel, and every class name comes back intact
    assert result.path == tmp_path / "repo" / "station-1.grey" and result.max_abs_diff < 1e-4
    cfg, _ = parse_config(result.path)
    assert cfg.name == "station-1.grey" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [32, 32, 1] and list(cfg.output[0].dims) == [4]
    assert json.loads(cfg.parameters["visiond_classes"].string_value) == classes
    assert (result.path / "labels.txt").read_text(encoding="utf-8").splitlines() == classes


def test_a_name_triton_cannot_take_or_a_batch_limit_below_one_is_refused_before_anything_is_written(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", ["good", "bad"], 32)
    with pytest.raises(UserError, match="Triton model name '../up'"):
        export_triton(ckpt, tmp_path / "repo", name="../up")
    with pytest.raises(UserError, match="--max-batch 0"):
        export_triton(ckpt, tmp_path / "repo", max_batch=0)
    assert not (tmp_path / "repo").exists()
