"""Test-time augmentation: views the training allowed, probabilities averaged through the real runtime,
in `evaluate`, `predict` and the daemon (`model.tta`)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from daemon_helpers import line_cfg, run_to_end, wait_offline
from shapes import make_shapes_dataset
from visiond.config import ConfigError, load_config
from visiond.data.augment import PRESETS as TRAINING_PRESETS, AugmentConfig
from visiond.data.manifest import read_manifest, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.models.runtime import TorchClassifier, warm_up
from visiond.models.tta import TTAClassifier, allowed_transforms, make_views, view_names, with_tta
from visiond.preprocess import PreprocessSpec
from visiond.serve.control import classifier_for, model_detail
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint
from visiond.train.predict import load_resized, predict_paths

PRESETS = {"mirror": AugmentConfig(hflip=0.5),
           "mirror+zoom": AugmentConfig(hflip=0.5, zoom=(0.85, 1.0)),
           "any-way-up": AugmentConfig(hflip=0.5, vflip=0.5, translate=0.05),
           "still": AugmentConfig()}


def _ckpt(path: Path, augment: str, classes=("ok", "scratch", "spot"), size: int = 32) -> Path:
    torch.manual_seed(0)
    net = build_model("smallcnn", len(classes), 3, size)
    save_checkpoint(path, arch="smallcnn", classes=list(classes), spec=PreprocessSpec.for_color(size),
                    state_dict=net.state_dict(), arch_args={"in_channels": 3, "image_size": size},
                    meta={"train_options": {"augment": augment}})
    return path


def test_views_are_only_the_transforms_training_used():
    # a horizontal flip only where training flipped horizontally, a vertical one only where it flipped vertically
    assert view_names("flip", allowed_transforms(PRESETS["mirror"])) == ("image", "hflip")
    assert view_names("flip", allowed_transforms(PRESETS["any-way-up"])) == ("image", "hflip", "vflip")
    # crops only where training zoomed or shifted
    assert view_names("flip+crop", allowed_transforms(PRESETS["mirror"])) == ("image", "hflip")
    assert view_names("flip+crop", allowed_transforms(PRESETS["mirror+zoom"])) == (
        "image", "hflip", "crop_tl", "crop_tr", "crop_bl", "crop_br")
    assert view_names("flip+crop", allowed_transforms(PRESETS["still"])) == ("image",)
    with pytest.raises(ValueError, match="expected one of none, flip, flip\\+crop"):
        view_names("rotate", frozenset())


def test_the_views_are_the_flipped_and_cropped_images():
    x = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    v = make_views(x, ("image", "hflip", "vflip", "crop_tl", "crop_br")).reshape(5, 2, 20, 30, 3)
    assert (v[0] == x).all() and (v[1] == x[:, :, ::-1]).all() and (v[2] == x[:, ::-1]).all()
    # a corner crop keeps 90 % of each side and is resized back to the model's input size
    assert (v[3][1] == cv2.resize(x[1, :18, :27], (30, 20), interpolation=cv2.INTER_LINEAR)).all()
    assert (v[4][0] == cv2.resize(x[0, 2:, 3:], (30, 20), interpolation=cv2.INTER_LINEAR)).all()
    # grey images keep their channel axis
    g = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    assert make_views(g, ("image", "crop_tr")).shape == (6, 16, 16, 1)


def test_flip_tta_averages_the_runtime_over_image_and_mirror(tmp_path, caplog):
    path = _ckpt(tmp_path / "m.ckpt", "mirror")
    ckpt = load_checkpoint(path)
    inner = TorchClassifier(ckpt, device="cpu", precision="fp32", threads=0)
    # when the model is wrapped with flip TTA
    clf = with_tta(inner, "flip", ckpt, PRESETS)
    assert isinstance(clf, TTAClassifier) and clf.views == ("image", "hflip") and clf.runtime == "torch"
    x = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = clf.predict(x)
    # then each image's scores are the mean of the runtime's scores for it and its mirror image
    want = (inner.predict(x) + inner.predict(x[:, :, ::-1].copy())) / 2
    assert np.abs(got - want).max() < 1e-6 and np.allclose(got.sum(1), 1, atol=1e-5)
    # and a mirrored part gets the very same scores
    assert np.abs(clf.predict(x[:, :, ::-1].copy()) - got).max() < 1e-6
    # and decoded frames of another size go through the same resize as without TTA
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(2)]
    assert clf.predict_images(frames).shape == (2, 3)
    # a model trained without flips gets no flip (said once), and none is the runtime itself
    still = load_checkpoint(_ckpt(tmp_path / "s.ckpt", "still"))
    assert with_tta(inner, "flip", still, PRESETS).views == ("image",)
    assert "used none of its transforms" in caplog.text
    assert with_tta(inner, "none", ckpt, PRESETS) is inner


def test_evaluate_and_predict_take_tta(tmp_path):
    ds = tmp_path / "ds"
    make_shapes_dataset(ds, per_class=8, size=32, seed=1)
    write_manifest(ds, split_dataset(read_manifest(ds), 0.5, 0.25, 0.25, seed=0))
    # a model trained with the `light` preset (horizontal flips, a little zoom)
    path = _ckpt(tmp_path / "m.ckpt", "light", classes=("circle", "square", "triangle"))
    # evaluate reports which views it averaged
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=path, dataset=ds, out=tmp_path / "ev", tta="flip+crop"))
    assert report.metrics["tta"] == "flip+crop" and len(report.metrics["tta_views"]) == 6
    assert "views (image, hflip, crop_tl" in (tmp_path / "ev" / "report.md").read_text()
    # predict's scores are those of the TTA wrapper on the same files
    files = [str(ds / s.path) for s in read_manifest(ds)][:4]
    rows = predict_paths(path, files, tta="flip")
    ckpt = load_checkpoint(path)
    clf = with_tta(TorchClassifier(ckpt, device="cpu", precision="fp32", threads=0), "flip", ckpt,
                   TRAINING_PRESETS)
    want = clf.predict(np.stack([load_resized(Path(f), ckpt.spec) for f in files]))
    assert [r["score"] for r in rows] == pytest.approx(want.max(1).tolist(), abs=1e-6)
    with pytest.raises(UserError, match="--tta 'mirror': expected one of none, flip, flip\\+crop"):
        predict_paths(path, files, tta="mirror")


def _config(tmp_path: Path, ckpt: Path, tta: str):
    cfg = {"cameras": [{"name": "c1", "source": str(tmp_path)}], "model": {"checkpoint": str(ckpt), "tta": tta},
           "spool": {"dir": str(tmp_path / "spool")}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(tmp_path / "cfg.yaml", env={})


def test_daemon_loader_wraps_the_runtime_and_rejects_an_unknown_mode(tmp_path):
    path = _ckpt(tmp_path / "m.ckpt", "line")  # the `line` preset flips both ways and zooms
    cfg = _config(tmp_path, path, "flip+crop")
    clf = classifier_for(cfg, load_checkpoint(path))
    warm_up(clf, cfg.model.max_batch)
    assert clf.views[:3] == ("image", "hflip", "vflip") and len(clf.views) == 7
    assert model_detail(clf)["tta"] == "flip+crop" and model_detail(clf)["runtime"] == "torch"
    assert getattr(classifier_for(_config(tmp_path, path, "none"), load_checkpoint(path)), "tta", "none") == "none"
    with pytest.raises(ConfigError, match="model.tta: got 'mirror'"):
        _config(tmp_path, path, "mirror")


def test_daemon_publishes_tta_scores(tmp_path, mosquitto, mqtt_recorder, synth_video):
    # given a model trained with flips and the daemon on the line video with model.tta flip
    path = _ckpt(tmp_path / "m.ckpt", "line", classes=("ok", "scratch", "spot"), size=32)
    rec = mqtt_recorder("visiond/#")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi)}
    run_to_end(tmp_path, line_cfg(path, mosquitto, [cam], model={"tta": "flip"}))
    wait_offline(rec, 10)
    # then every frame is published, and status/detail says the scores are TTA's
    assert len(rec.json_payloads("/prediction")) == len(synth_video.truth)
    detail = json.loads(rec.messages("visiond/testbox/status/detail")[-1].payload)
    assert detail["model"]["tta"] == "flip"
    # and the first frame's score is the flip average of the served model on that frame
    cap = cv2.VideoCapture(str(synth_video.path))
    ok, frame = cap.read()
    cap.release()
    x, y, w, h = synth_video.roi
    ckpt = load_checkpoint(path)
    clf = with_tta(TorchClassifier(ckpt, device="cpu", precision="fp32", threads=0), "flip", ckpt,
                   {"line": AugmentConfig(hflip=0.5, vflip=0.5)})
    want = clf.predict_images([frame[y:y + h, x:x + w]])[0]
    first = rec.json_payloads("/prediction")[0]
    assert first["score"] == pytest.approx(float(want.max()), abs=2e-3)
