"""Checkpoints: round trip, content-hash version, and no code ever runs from a file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visiond.models.arch import ARCHITECTURES, build_model
from visiond.models.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec

CLASSES = ["empty", "ok", "scratch", "spot"]


def _save(path: Path, arch: str = "smallcnn", **kw):
    spec = PreprocessSpec.for_color(64)
    args = {"in_channels": 3, "image_size": 64} if arch == "smallcnn" else {"in_channels": 3}
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), **args)
    return save_checkpoint(path, arch=arch, classes=CLASSES, spec=spec, state_dict=model.state_dict(),
                           arch_args=args, **kw)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_round_trip_gives_same_predictions(tmp_path, arch):
    saved = _save(tmp_path / "m.ckpt", arch, meta={"dataset_hash": "abc"})
    loaded = load_checkpoint(tmp_path / "m.ckpt")
    assert loaded.version == saved.version and loaded.classes == tuple(CLASSES)
    assert loaded.spec == saved.spec and loaded.meta["dataset_hash"] == "abc"
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    a = TorchClassifier(saved, "cpu").predict(x)
    b = TorchClassifier(loaded, "cpu").predict(x)
    assert (abs(a - b) < 1e-6).all()


def test_version_is_a_content_hash(tmp_path):
    a = _save(tmp_path / "a.ckpt", meta={"created_at": "t"})
    b = _save(tmp_path / "b.ckpt", meta={"created_at": "t"}, name="a")
    assert a.version == b.version  # same content -> same version
    c = _save(tmp_path / "c.ckpt", meta={"created_at": "t", "thresholds": {"scratch": 0.3}}, name="a")
    assert c.version != a.version and c.thresholds == {"scratch": 0.3}


def test_altered_weights_are_detected(tmp_path):
    _save(tmp_path / "m.ckpt")
    data = bytearray((tmp_path / "m.ckpt").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "m.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(tmp_path / "m.ckpt")


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_payload(path: Path, marker: Path, zip_format: bool) -> None:
    boom = _Boom()
    boom.marker = marker  # type: ignore[attr-defined]
    if zip_format:
        torch.save({"state_dict": boom}, path)
    else:
        path.write_bytes(pickle.dumps({"weights": boom}))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "raw-pickle"])
@pytest.mark.parametrize("force_unsafe", [False, True], ids=["plain-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_pickle_payload_is_refused_without_running(tmp_path, zip_format, force_unsafe):
    # given a checkpoint that would run a shell command when unpickled
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    _pickle_payload(ckpt, marker, zip_format)
    env = dict(os.environ)
    if force_unsafe:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    # when visiond loads it (as the daemon and predict do)
    res = subprocess.run([sys.executable, "-c", "from visiond.models.checkpoint import load_checkpoint;"
                          f"load_checkpoint({str(ckpt)!r})"], capture_output=True, text=True, env=env, timeout=120)
    # then it is refused with a clear message and the payload never ran
    assert res.returncode != 0
    assert "pickle" in res.stderr and "never loaded" in res.stderr
    assert not marker.exists()


def test_predict_cli_refuses_pickle_with_one_line(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    _pickle_payload(ckpt, marker, True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cameras: [{{name: a, source: {tmp_path}}}]\nmodel: {{checkpoint: {ckpt}}}\n"
                   f"spool: {{dir: {tmp_path / 'spool'}}}\nmetrics: {{enabled: false}}\n")
    res = subprocess.run([sys.executable, "-m", "visiond", "run", "--config", str(cfg)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pickle" in res.stderr and not marker.exists()


@pytest.mark.parametrize("content,expected", [
    (b"", "empty"),
    (b"\x10\x00", "truncated"),
    (b"garbage-garbage-garbage", "not a safetensors"),
])
def test_junk_files_get_clear_errors(tmp_path, content, expected):
    p = tmp_path / "j.ckpt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(p)


def test_truncated_checkpoint(tmp_path):
    _save(tmp_path / "m.ckpt")
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "m.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|unreadable"):
        load_checkpoint(tmp_path / "m.ckpt")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    ok = _save(tmp_path / "m.ckpt")
    sd = dict(ok.state_dict)
    sd.pop(next(iter(sd)))
    bad = save_checkpoint(tmp_path / "bad.ckpt", arch="smallcnn", classes=CLASSES, spec=ok.spec, state_dict=sd,
                          arch_args=ok.arch_args)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.ckpt").build()
    assert bad.version != ok.version


def test_header_readable_without_weights(tmp_path):
    saved = _save(tmp_path / "m.ckpt")
    h = read_header(tmp_path / "m.ckpt")
    assert h["version"] == saved.version and h["arch"] == "smallcnn" and h["preprocess"]["height"] == 64


def test_architectures_named_in_the_issue_exist():
    for name in ("smallcnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"):
        assert name in ARCHITECTURES
    with pytest.raises(ValueError, match="expected one of"):
        build_model("alexnet", 3)
