"""Retrain with --init-from, compare old and new on one split, promote atomically."""

from __future__ import annotations

import json

import cv2
import pytest
import torch

from loop_helpers import model_without_spot, trained_model, visiond  # noqa: F401 (fixture)
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint
from visiond.train import transfer


@pytest.fixture(scope="session")
def model_with_spot(tmp_path_factory, synth_images, model_without_spot):
    """The no-spot model fine-tuned on the grown dataset (all four classes)."""
    out = tmp_path_factory.getbasetemp() / "model_with_spot" / "with_spot.ckpt"
    return trained_model(out, synth_images, epochs=6, init_from=model_without_spot)


def test_init_from_keeps_known_head_rows_and_adds_the_new_class(model_without_spot):
    old = load_checkpoint(model_without_spot)
    net = build_model("smallcnn", 4, **old.arch_args)
    head = transfer.head_name(net)  # the last Linear layer, whichever smallcnn version
    fresh_row = net.state_dict()[f"{head}.weight"][3].clone()
    transfer.load_from_checkpoint(net, old, ["empty", "ok", "scratch", "spot"])
    w, b = net.state_dict()[f"{head}.weight"], net.state_dict()[f"{head}.bias"]
    assert torch.equal(w[:3], old.state_dict[f"{head}.weight"]) and torch.equal(b[:3], old.state_dict[f"{head}.bias"])
    assert torch.equal(w[3], fresh_row)  # the new class starts from its fresh initialisation
    assert torch.equal(net.state_dict()["features.0.weight"], old.state_dict["features.0.weight"])


def test_train_init_from_on_a_grown_dataset(tmp_path, synth_images, model_without_spot):
    # when the no-spot model is fine-tuned from the command line on a dataset that now has spots
    r = visiond("train", str(synth_images), "--init-from", str(model_without_spot), "--out", str(tmp_path / "new.ckpt"),
                "--epochs", "2", "--augment", "none", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    # then the new checkpoint keeps the old class order, adds spot, and keeps the preprocessing
    old, new = load_checkpoint(model_without_spot), load_checkpoint(tmp_path / "new.ckpt")
    assert new.classes == ("empty", "ok", "scratch", "spot")
    assert new.spec == old.spec and new.arch == old.arch
    assert "new classes ['spot'] start from scratch" in r.stderr


def test_compare_prints_and_plots_per_class_differences(tmp_path, synth_images, model_without_spot, model_with_spot):
    r = visiond("compare", str(model_without_spot), str(model_with_spot), str(synth_images), "--split", "test",
                "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    spot = report["per_class"]["spot"]
    # then the old model, which never knew spot, has recall 0 there and the new one finds a good part of them
    # (12 test crops; 10 epochs on 56 training crops a class)
    assert spot["old"]["recall"] == 0.0 and spot["old"]["f1"] is None
    assert spot["new"]["recall"] >= 0.4 and spot["delta"]["recall"] == pytest.approx(spot["new"]["recall"])
    assert spot["delta"]["f1"] is None  # no F1 for a class the old model could not output
    assert spot["support"] == 12  # 15 % of 80, the same test samples for both models
    assert report["old"]["version"] != report["new"]["version"]
    assert report["new"]["macro_f1"] > report["old"]["macro_f1"]
    # and the table says it in the terminal, and the chart is a real image
    out = r.stdout
    assert "spot" in out and "0.000 →" in out and "precision old → new" in out
    assert cv2.imread(str(tmp_path / "cmp" / "compare.png")) is not None


def test_promote_validates_then_installs_atomically_and_keeps_the_previous(tmp_path, model_without_spot,
                                                                          model_with_spot):
    target = tmp_path / "serve" / "model.ckpt"
    # given nothing installed yet: the first promote installs, with nothing to keep
    r = visiond("promote", str(model_without_spot), "--to", str(target))
    assert r.returncode == 0, r.stderr
    old = load_checkpoint(target).version
    assert not target.with_name("model.ckpt.prev").exists()
    # when a file that is not a model is promoted, it is refused and the served file is untouched
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 64)
    before = target.read_bytes()
    r = visiond("promote", str(bad), "--to", str(target))
    assert r.returncode == 2 and "not a safetensors file" in r.stderr and "Traceback" not in r.stderr
    assert target.read_bytes() == before
    # when a model that lacks a class the daemon config needs is promoted with --config, it is refused
    cfg = tmp_path / "visiond.yaml"
    cfg.write_text(f"cameras: [{{name: c, source: /dev/null}}]\nmodel: {{checkpoint: {target}}}\n"
                   "decide: {defect_classes: [scratch, spot]}\n")
    r = visiond("promote", str(model_without_spot), "--to", str(tmp_path / "other.ckpt"), "--config", str(cfg))
    assert r.returncode == 2 and "decide.defect_classes" in r.stderr and not (tmp_path / "other.ckpt").exists()
    # when the good new model is promoted
    r = visiond("promote", str(model_with_spot), "--to", str(target), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    # then it is served from the target, the previous one is kept, and no temp file is left behind
    assert load_checkpoint(target).version == load_checkpoint(model_with_spot).version
    assert load_checkpoint(target.with_name("model.ckpt.prev")).version == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.ckpt", "model.ckpt.prev"]
    # and promoting the served file onto itself is refused
    r = visiond("promote", str(target), "--to", str(target))
    assert r.returncode == 2 and "nothing to promote" in r.stderr
