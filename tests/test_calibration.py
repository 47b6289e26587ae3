"""Calibration: ECE by hand, the temperature fitted at the end of training, stored in the checkpoint,
lowering the test split's ECE of an overconfident model, and applied alike by torch, ONNX and TorchScript."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from shapes import make_shapes_dataset
from visiond.data.manifest import read_manifest, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import CheckpointError
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.models.export import export_checkpoint, read_onnx_metadata
from visiond.models.runtime import TorchClassifier, make_classifier
from visiond.preprocess import Normalizer, PreprocessSpec
from visiond.train import calibrate
from visiond.train.data import load_splits
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint
from visiond.train.loop import TrainOptions, train

CLASSES = ["circle", "square", "triangle"]


def test_ece_equals_the_hand_computed_value():
    # given four two-class predictions: two at 0.9 (one right), and 0.6 (right) and 0.55 (wrong) in one bin
    probs = [[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]]
    labels = [0, 1, 1, 1]
    # then ECE = 2/4 * |0.5 - 0.9| + 2/4 * |0.5 - 0.575| over 15 equal-width bins
    assert calibrate.expected_calibration_error(probs, labels) == pytest.approx(0.2 + 0.0375)
    bins = calibrate.reliability_bins(probs, labels)
    assert bins["count"][13] == 2 and bins["count"][8] == 2 and sum(bins["count"]) == 4
    assert bins["accuracy"][13] == 0.5 and bins["confidence"][8] == pytest.approx(0.575)
    assert bins["accuracy"][0] is None  # an empty bin says so, it is not a zero
    # and a perfectly calibrated set scores 0
    assert calibrate.expected_calibration_error([[1.0, 0.0]] * 3, [0, 0, 0]) == 0.0


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with():
    # given labels drawn from softmax(z / 2.5) for random logits z
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (20000, 5))
    p = calibrate.softmax(z, 2.5)
    y = np.array([rng.choice(5, p=row) for row in p])
    # when a temperature is fitted on (z, y)
    t = calibrate.fit_temperature(z, y)
    # then it is the one the labels came from, and no other T has a lower NLL
    assert t == pytest.approx(2.5, rel=0.05)
    assert calibrate.nll(z, y, t) <= min(calibrate.nll(z, y, t * f) for f in (0.9, 1.1))
    # and an extreme case stays inside the allowed range
    assert calibrate.fit_temperature(z * 1000, y) <= 20.0


def _noisy_shapes(root: Path) -> Path:
    """Shapes with a fifth of the labels wrong; few training images (training is the cost), and validation and
    test splits of ~290 images each, so an ECE measured on them is a figure, not noise."""
    make_shapes_dataset(root, per_class=220, size=24, seed=3)
    rng = np.random.default_rng(0)
    samples = [dataclasses.replace(s, label=str(rng.choice([c for c in CLASSES if c != s.label])))
               if rng.random() < 0.2 else s for s in read_manifest(root)]
    write_manifest(root, split_dataset(samples, 0.12, 0.44, 0.44, seed=0))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calib")
    ds = _noisy_shapes(root / "ds")
    train(TrainOptions(data=ds, out=root / "m.ckpt", image_size=24, epochs=3, batch_size=16, augment="light",
                       progress=False, lr=3e-3, seed=0))
    return ds, root / "m.ckpt"


def test_training_ends_by_fitting_a_temperature_on_the_validation_split(trained):
    ds, path = trained
    # when training has finished, the checkpoint carries the temperature and how it was fitted
    ckpt = load_checkpoint(path)
    cal = ckpt.meta["calibration"]
    assert ckpt.temperature == ckpt.meta["temperature"] == cal["temperature"] != 1.0
    assert cal["split"] == "val" and cal["images"] == len(load_splits(ds).val)
    # and the fitted T scores the validation labels at least as well as the raw scores (T = 1)
    assert cal["nll_after"] <= cal["nll_before"]


def _overconfident(src: Path, dst: Path, factor: float = 8.0) -> Path:
    """The trained model with its logits scaled up (a network that learnt to be too sure), no temperature."""
    ckpt = load_checkpoint(src)
    state = dict(ckpt.state_dict)
    head = [name for name, m in ckpt.build().named_modules() if isinstance(m, torch.nn.Linear)][-1]
    for key in (f"{head}.weight", f"{head}.bias"):
        state[key] = state[key] * factor
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("temperature", "calibration")}
    save_checkpoint(dst, arch=ckpt.arch, classes=ckpt.classes, spec=ckpt.spec, state_dict=state,
                    arch_args=ckpt.arch_args, meta=meta, name=ckpt.name)
    return dst


def test_temperature_scaling_lowers_the_test_ece_of_an_overconfident_model(trained, tmp_path):
    ds, path = trained
    # given an overconfident model (logits x8) and a temperature fitted on its validation split
    over = _overconfident(path, tmp_path / "over.ckpt")
    splits = load_splits(ds)
    summary = calibrate.calibrate_checkpoint(over, splits.root, splits.val)
    assert summary["temperature"] > 1.5  # it softens the scores of a model made 8x too sure
    # when the test split is evaluated
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=over, dataset=ds, out=tmp_path / "eval"))
    cal = report.metrics["calibration"]
    # then the scaled scores are better calibrated than the raw ones on images the fit never saw
    assert cal["temperature"] == load_checkpoint(over).temperature
    assert cal["ece_calibrated"] < cal["ece_uncalibrated"], cal
    assert cal["uncalibrated"]["mean_confidence"] > cal["calibrated"]["mean_confidence"]
    # and the report shows both, with the reliability diagram beside its other figures
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["calibration"]
    assert saved["ece_calibrated"] == pytest.approx(cal["ece_calibrated"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Calibration" in md and "reliability.png" in md and f"{cal['ece_uncalibrated']:.4f}" in md


def test_the_temperature_is_applied_alike_by_torch_onnx_and_torchscript(trained, tmp_path):
    _, path = trained
    ckpt = load_checkpoint(path)
    t = ckpt.temperature
    x = np.random.default_rng(2).integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)
    # the raw logits, and what softmax(logits / T) makes of them
    with torch.inference_mode():
        logits = ckpt.build()(Normalizer(ckpt.spec)(torch.from_numpy(x))).numpy()
    want = calibrate.softmax(logits, t)
    assert np.abs(want - calibrate.softmax(logits)).max() > 1e-3  # T visibly moves the scores
    # when the reloaded checkpoint runs in torch, and its ONNX and TorchScript exports run
    torch_probs = TorchClassifier(load_checkpoint(path), device="cpu", precision="fp32", threads=0).predict(x)
    onnx_path = export_checkpoint(path, "onnx", tmp_path / "m.onnx").path
    onnx_probs = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        ["probs"], {"pixels": x})[0]
    served = make_classifier(ckpt, runtime="onnxruntime", cache_dir=tmp_path / "cache").predict(x)
    ts = torch.jit.load(str(export_checkpoint(path, "torchscript", tmp_path / "m.pt").path))
    with torch.inference_mode():
        ts_probs = ts(torch.from_numpy(x)).numpy()
    # then every one gives the same calibrated probabilities
    for got in (torch_probs, onnx_probs, served, ts_probs):
        assert np.abs(got - want).max() < 1e-5
    assert json.loads(read_onnx_metadata(onnx_path)["visiond"])["temperature"] == t


def _write_raw(path: Path, fields: dict, tensors: dict) -> None:
    from visiond.models.checkpoint import _content_hash, _header_json

    fields["version"] = _content_hash(fields, tensors)
    save_file(tensors, str(path), metadata={"visiond": _header_json(fields)})


def test_old_checkpoints_load_at_t1_and_a_bad_temperature_is_refused(tmp_path):
    net = build_model("smallcnn", 3, 3, 24)
    spec = PreprocessSpec.for_color(24)
    kw = dict(arch="smallcnn", classes=CLASSES, spec=spec, state_dict=net.state_dict(),
              arch_args={"in_channels": 3, "image_size": 24})
    # a checkpoint written before temperatures existed reads as T = 1
    old = save_checkpoint(tmp_path / "old.ckpt", meta={"note": "before issue 14"}, **kw)
    assert "temperature" not in old.meta and load_checkpoint(tmp_path / "old.ckpt").temperature == 1.0
    # a temperature outside (0.05, 20) is refused when saving, with one line
    with pytest.raises(CheckpointError, match=r"meta temperature 0: expected a number in \[0.05, 20\]"):
        save_checkpoint(tmp_path / "bad.ckpt", meta={"temperature": 0}, **kw)
    assert not (tmp_path / "bad.ckpt").exists()
    # and a file carrying one (written by hand, hash intact) is refused when loading
    fields = {"format": "visiond.checkpoint/1", "name": "m", "arch": "smallcnn", "arch_args": kw["arch_args"],
              "classes": CLASSES, "preprocess": spec.to_dict(), "meta": {"temperature": "hot"}}
    _write_raw(tmp_path / "hot.ckpt", fields, {k: v.contiguous() for k, v in net.state_dict().items()})
    with pytest.raises(CheckpointError, match="meta temperature 'hot': expected a number"):
        load_checkpoint(tmp_path / "hot.ckpt")


def test_evaluate_cli_prints_ece_before_and_after(trained, tmp_path):
    ds, path = trained
    proc = subprocess.run([sys.executable, "-m", "visiond", "evaluate", str(path), str(ds), "--out",
                           str(tmp_path / "ev"), "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["calibration"]
    assert (f"calibration: ECE {m['ece_uncalibrated']:.4f} at T = 1, {m['ece_calibrated']:.4f} at the checkpoint's "
            f"T = {m['temperature']:.4g}") in proc.stdout
