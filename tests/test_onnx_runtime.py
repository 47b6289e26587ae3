"""`model.runtime: onnxruntime`: same verdicts as torch, exported once per model version, never a dead end."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from test_export import make_checkpoint
from visiond.config import ConfigError, parse_config
from visiond.models.checkpoint import load_checkpoint
from visiond.models.runtime import TorchClassifier, make_classifier


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("onnxrt") / "m.ckpt", "smallcnn", 48)


def random_frames(n: int, seed: int = 3) -> list[np.ndarray]:
    """n stand-ins for decoded frames, 120 x 90 BGR (any size: every runtime resizes by the checkpoint's spec)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (120, 90, 3), dtype=np.uint8) for _ in range(n)]


def assert_same_verdicts(got: np.ndarray, want: np.ndarray, n: int) -> None:
    """An ONNX runtime's probabilities for n frames against torch's: the export's tolerance, every verdict equal."""
    assert got.shape == (n, want.shape[1]) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def first_export(ckpt, runtime: str, cache):
    """A first load of `ckpt` on `runtime` (an ONNX one), which exports: the cache file and its mtime."""
    make_classifier(ckpt, runtime=runtime, cache_dir=cache)
    exported = cache / f"{ckpt.version}.onnx"
    return exported, exported.stat().st_mtime_ns


def test_onnxruntime_serves_the_same_probabilities_as_torch(ckpt_path, tmp_path):
    # given a checkpoint served by onnxruntime and by torch
    ckpt = load_checkpoint(ckpt_path)
    ort_clf = make_classifier(ckpt, runtime="onnxruntime", cache_dir=tmp_path / "models")
    torch_clf = TorchClassifier(ckpt, device="cpu", precision="fp32")
    assert ort_clf.runtime == "onnxruntime" and ort_clf.version == ckpt.version and ort_clf.device == "cpu"
    # when both classify the same decoded frames (any size: each resizes by the checkpoint's spec)
    frames = random_frames(7)
    got, want = ort_clf.predict_images(frames), torch_clf.predict_images(frames)
    # then the probabilities agree, so every verdict is the same
    assert want.shape == (7, 3)
    assert_same_verdicts(got, want, 7)


@pytest.mark.slow  # three exports
def test_the_export_is_cached_by_model_version_and_a_stale_or_corrupt_cache_is_replaced(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    cache = tmp_path / "models"
    # given a first load, which exports
    exported, stamp = first_export(ckpt, "onnxruntime", cache)
    # when the same version loads again (a restart), then the cached file is used as is, at once
    t0 = time.monotonic()
    make_classifier(ckpt, runtime="onnxruntime", cache_dir=cache)
    assert time.monotonic() - t0 < 2.0 and exported.stat().st_mtime_ns == stamp
    # when the file there is another model's export (copied by hand), then it is exported again over it
    other = load_checkpoint(make_checkpoint(tmp_path / "other.ckpt", "smallcnn", 32))
    make_classifier(other, runtime="onnxruntime", cache_dir=cache)
    exported.write_bytes((cache / f"{other.version}.onnx").read_bytes())
    clf = make_classifier(ckpt, runtime="onnxruntime", cache_dir=cache)
    assert clf.runtime == "onnxruntime"
    x = np.zeros((1, 48, 48, 3), np.uint8)
    assert np.abs(clf.predict(x) - TorchClassifier(ckpt, device="cpu").predict(x)).max() < 1e-4
    # when the cached file is corrupt (a power cut mid-copy), then too
    exported.write_bytes(b"\x08\x07garbage")
    clf = make_classifier(ckpt, runtime="onnxruntime", cache_dir=cache)
    assert clf.runtime == "onnxruntime"
    assert np.abs(clf.predict(x) - TorchClassifier(ckpt, device="cpu").predict(x)).max() < 1e-4


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_when_an_onnx_runtime_cannot_be_used_the_model_is_served_by_torch_with_a_warning(ckpt_path, tmp_path, caplog,
                                                                                       runtime):
    # given a cache location that cannot be written (a file sits where the directory should be)
    blocked = tmp_path / "models"
    blocked.write_text("not a directory")
    # when the daemon asks for onnxruntime or openvino
    with caplog.at_level(logging.WARNING, logger="visiond.models.runtime"):
        clf = make_classifier(load_checkpoint(ckpt_path), runtime=runtime, cache_dir=blocked)
    # then the model is still served, by torch, and the log says why in one line
    assert clf.runtime == "torch"
    assert clf.predict(np.zeros((2, 48, 48, 3), np.uint8)).shape == (2, 3)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "cannot run smallcnn" in said[0] and f"with {runtime}" in said[0]
    assert "serving it with torch" in said[0] and "\n" not in said[0]


def test_onnxruntime_on_a_cuda_device_is_a_config_error(ckpt_path):
    raw = {"cameras": [{"name": "c", "source": "/dev/video0"}],
           "model": {"checkpoint": str(ckpt_path), "runtime": "onnxruntime", "device": "cuda"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert "runtime onnxruntime runs on the CPU, but model.device is 'cuda'" in str(err.value)
    raw["model"]["runtime"] = "tensorrt"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert "model.runtime" in str(err.value) and "tensorrt" in str(err.value)
