"""Training: accuracy on generated shapes, exact resume, transfer, the knn baseline, fine-tuning, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from shapes import CLASSES, draw_shape, make_shapes_dataset
from visiond.data.manifest import read_manifest, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint
from visiond.preprocess import IMAGENET_MEAN
from visiond.train import loop, recipe
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint
from visiond.train.loop import TrainOptions, train


def make_split_shapes(root: Path, per_class: int, seed: int = 1, classes=CLASSES) -> Path:
    make_shapes_dataset(root, per_class=per_class, size=32, seed=seed, classes=classes)
    write_manifest(root, split_dataset(read_manifest(root), 0.6, 0.2, 0.2, seed=0))
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_split_shapes(tmp_path_factory.mktemp("shapes"), per_class=150)


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    return make_split_shapes(tmp_path_factory.mktemp("small"), per_class=24)


def quick(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=data, out=out, image_size=32, epochs=2, batch_size=16, augment="light", progress=False)
    return TrainOptions(**(base | kw))


def test_smallcnn_reaches_95_percent_on_shapes(shapes, tmp_path):
    # given generated circles, squares and triangles split 60/20/20
    out = tmp_path / "model.ckpt"
    # when the small CNN trains for a few epochs on the CPU
    result = train(quick(shapes, out, epochs=8, batch_size=32, lr=3e-3, seed=0))
    # then the held-out test split is >= 95 % right, through the daemon's runtime
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=shapes, out=tmp_path / "eval"))
    assert report.metrics["accuracy"] >= 0.95, report.metrics["per_class"]
    # and best, last, history, curves and the resume file sit beside the checkpoint
    run = tmp_path / "model.train"
    for f in (out, tmp_path / "model.last.ckpt", run / "metrics.csv", run / "history.json", run / "curves.png",
              run / "resume.safetensors"):
        assert f.exists(), f
    assert len(result.history) == 8 and (run / "metrics.csv").read_text().count("\n") == 9
    meta = load_checkpoint(out).meta
    assert meta["arch"] == "smallcnn" and meta["seed"] == 0 and meta["epochs"] == result.best_epoch
    assert len(meta["dataset_hash"]) == 64 and meta["class_counts"]["train"] == {c: 90 for c in CLASSES}
    assert meta["val_metrics"]["macro_f1"] == pytest.approx(result.best_metrics["macro_f1"])
    assert "created_at" in meta


def test_resume_after_interruption_ends_with_identical_weights(small_shapes, tmp_path, monkeypatch):
    # given an uninterrupted 3-epoch run (augmentation, AdamW, cosine schedule)
    opts = dict(epochs=3, seed=7, augment="line")
    train(quick(small_shapes, tmp_path / "a" / "m.ckpt", **opts))
    # when a second run with the same seed is interrupted in its third epoch ...
    real, calls = loop.train_one_epoch, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(quick(small_shapes, tmp_path / "b" / "m.ckpt", **opts))
    monkeypatch.setattr(loop, "train_one_epoch", real)
    # ... and resumed from its last checkpoint
    result = train(quick(small_shapes, tmp_path / "b" / "m.ckpt", resume=tmp_path / "b" / "m.last.ckpt", **opts))
    # then both end bit-for-bit equal
    a, b = load_checkpoint(tmp_path / "a" / "m.last.ckpt"), load_checkpoint(tmp_path / "b" / "m.last.ckpt")
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    history_a = json.loads((tmp_path / "a" / "m.train" / "history.json").read_text())
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in history_a]


def _imagenet_file(tmp_path: Path) -> tuple[Path, OrderedDict]:
    torch.manual_seed(3)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    path = tmp_path / "mobilenet_v3_small-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_transfer_from_a_local_imagenet_state_dict(small_shapes, tmp_path):
    # given a torchvision ImageNet-shaped state dict saved locally with torch.save
    weights, state = _imagenet_file(tmp_path)
    out = tmp_path / "tl.ckpt"
    # when training mobilenet_v3_small from it with the backbone frozen
    train(quick(small_shapes, out, arch="mobilenet_v3_small", weights=weights, freeze_backbone=True, epochs=1))
    # then the backbone is the file's (BatchNorm statistics included), the head is new, the spec is ImageNet's
    ckpt = load_checkpoint(out)
    assert ckpt.spec.mean == IMAGENET_MEAN
    for k, v in ckpt.state_dict.items():
        if k.startswith("features."):
            assert torch.equal(v, state[k]), k
    assert ckpt.state_dict["classifier.3.weight"].shape == (3, 1024)
    # and unfreezing after one epoch trains the backbone too
    train(quick(small_shapes, tmp_path / "tl2.ckpt", arch="mobilenet_v3_small", weights=weights,
                freeze_backbone=True, unfreeze_after=1, epochs=2))
    changed = load_checkpoint(tmp_path / "tl2.last.ckpt").state_dict["features.0.0.weight"]
    assert not torch.equal(changed, state["features.0.0.weight"])


def test_weights_that_need_unpickling_or_do_not_fit_are_refused(small_shapes, tmp_path):
    # given a pickle holding an arbitrary object, and a resnet18 state dict
    evil = tmp_path / "evil.pth"
    torch.save({"obj": OrderedDict(a=Path("/etc"))}, evil)
    wrong = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    # when either is used as --weights for mobilenet_v3_small, then a one-line UserError says why
    for path, words in ((evil, "refused"), (wrong, "does not fit --arch mobilenet_v3_small")):
        with pytest.raises(UserError, match=words):
            train(quick(small_shapes, tmp_path / "x.ckpt", arch="mobilenet_v3_small", weights=path))


def test_the_model_name_belongs_to_the_model_line_not_the_output_file(tmp_path):
    data = tmp_path / "press 4 screws"
    data.mkdir()
    # a candidate file does not name the model; the dataset does, cleaned for topics and labels
    assert quick(data, tmp_path / "candidate.ckpt").model_name() == "press-4-screws"
    # an explicit --name wins and is checked
    assert quick(data, tmp_path / "candidate.ckpt", name="screws").model_name() == "screws"
    with pytest.raises(UserError, match="--name"):
        quick(data, tmp_path / "c.ckpt", name="a/b").validate()


def test_knn_baseline_trains_and_evaluates(shapes, tmp_path):
    # given the shapes dataset, when the knn baseline trains with the same command
    out = tmp_path / "knn.ckpt"
    result = train(quick(shapes, out, arch="knn"))
    # then it is a checkpoint like any other, and evaluate scores it better than chance
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=shapes, out=tmp_path / "eval"))
    assert load_checkpoint(out).arch == "knn"
    assert load_checkpoint(out).name == shapes.name != "knn"
    assert report.metrics["accuracy"] > 0.5 and result.best_metrics["accuracy"] > 0.5


def test_init_from_grows_the_classes_and_keeps_the_old_head_rows(tmp_path):
    # given a model trained on circles and squares
    two = make_split_shapes(tmp_path / "two", per_class=20, classes=("circle", "square"))
    train(quick(two, tmp_path / "two.ckpt", epochs=1))
    old = load_checkpoint(tmp_path / "two.ckpt")
    # when it is fine-tuned on a dataset that adds triangles (zero epochs' worth: check the start point)
    three = make_split_shapes(tmp_path / "three", per_class=20)
    net = recipe.build_network(quick(three, tmp_path / "three.ckpt", init_from=tmp_path / "two.ckpt"),
                             ["circle", "square", "triangle"], old.spec, old)[0]
    # then the known classes' head rows and the whole body are copied, the new class is fresh
    sd = net.state_dict()
    assert torch.equal(sd["classifier.4.weight"][:2], old.state_dict["classifier.4.weight"])
    assert torch.equal(sd["features.0.weight"], old.state_dict["features.0.weight"])
    # and a real fine-tuning run ends with three classes
    train(quick(three, tmp_path / "three.ckpt", init_from=tmp_path / "two.ckpt", epochs=1))
    assert load_checkpoint(tmp_path / "three.ckpt").classes == ("circle", "square", "triangle")
    # and the fine-tuned model keeps the model line's name, not its output file's
    assert old.name == "two"
    assert load_checkpoint(tmp_path / "three.ckpt").name == "two"


def test_plain_class_folders_train_and_corrupt_files_are_skipped(tmp_path, caplog):
    # given class subfolders of images without a manifest, one file corrupt
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(tmp_path / "imgs" / c / f"{i}.png"), draw_shape(c, 32, rng))
    (tmp_path / "imgs" / "circle" / "broken.png").write_bytes(b"not a png")
    # when training on the folder
    result = train(quick(tmp_path / "imgs", tmp_path / "f.ckpt", epochs=1))
    # then it trains on a deterministic split of every listed file
    counts = load_checkpoint(result.best).meta["class_counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) + sum(counts["test"].values()) == 37
    # and evaluating all of it names the corrupt file and scores the rest
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=result.best, dataset=tmp_path / "imgs", split="all",
                                                 out=tmp_path / "eval"))
    assert report.metrics["skipped_unreadable"] == ["circle/broken.png"] and report.metrics["support"] == 36
    assert "broken.png" in caplog.text


def test_cli_rejects_a_bad_option_in_one_line(small_shapes, tmp_path):
    # when an unknown optimizer is asked for
    proc = subprocess.run([sys.executable, "-m", "visiond", "train", str(small_shapes), "--out",
                           str(tmp_path / "m.ckpt"), "--optimizer", "adam"], capture_output=True, text=True)
    # then exit 2 with one line naming the valid choices
    assert proc.returncode == 2
    assert proc.stderr.strip() == "visiond: error: --optimizer 'adam': expected one of adamw, sgd"


def test_early_stopping_and_class_balancing_rules():
    # early stopping: patience 2 stops after two epochs without a better figure, and survives a resume
    stop = loop.EarlyStopping(2)
    assert [stop.update(v, e) for e, v in enumerate([0.5, 0.7, 0.6])] == [True, True, False]
    assert not stop.should_stop
    resumed = loop.EarlyStopping(2, stop.state())
    resumed.update(0.69, 3)
    assert resumed.should_stop and resumed.best_epoch == 1
    # rare classes weigh more in the loss (mean weight 1) and are drawn as often by the balanced sampler
    from visiond.train.data import BalancedSampler, inverse_frequency_weights

    assert inverse_frequency_weights(np.array([0, 0, 0, 1]), 3).tolist() == [0.5, 1.5, 0.0]
    labels = np.array([0] * 90 + [1] * 10)
    drawn = labels[list(BalancedSampler(labels, seed=1))]
    assert len(drawn) == 100 and 35 <= drawn.sum() <= 65
