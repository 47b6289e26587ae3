"""The preprocessing spec (CPU and the GPU twin, run on CPU tensors here) and the verdict rules."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from visiond.config import DecideConfig
from visiond.errors import UserError
from visiond.preprocess import Normalizer, PreprocessSpec, gpu_resize_uint8, resize_uint8, stack_uint8
from visiond.serve.decide import Decider, DefectDebouncer

RNG = np.random.default_rng(0)


def _frames():
    smooth = cv2.GaussianBlur(RNG.integers(0, 255, (480, 640, 3), dtype=np.uint8), (9, 9), 3)
    return [RNG.integers(0, 255, (320, 320, 3), dtype=np.uint8), smooth, smooth[80:400, 160:480]]


@pytest.mark.parametrize("spec", [PreprocessSpec.for_color(64), PreprocessSpec.for_color((48, 80), "gray"),
                                  PreprocessSpec.for_color(224, imagenet=True)], ids=["rgb64", "gray48x80", "rgb224"])
def test_gpu_resize_matches_the_cpu_path_within_one_level(spec):
    # given the same frames (one a non-contiguous ROI view, as sources hand them over)
    frames = _frames()
    # when resized by the CPU path and by the GPU path (run on CPU tensors here)
    cpu = stack_uint8(frames, spec).astype(int)
    gpu = gpu_resize_uint8([torch.from_numpy(np.ascontiguousarray(f)) for f in frames], spec).numpy().astype(int)
    # then both give the model the same input, up to rounding
    assert cpu.shape == gpu.shape == (3, spec.height, spec.width, spec.channels)
    assert np.abs(cpu - gpu).max() <= 1


def test_colour_order_and_normalisation():
    bgr = np.zeros((10, 10, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR
    spec = PreprocessSpec.for_color(8)
    rgb = resize_uint8(bgr, spec)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == 255).all() and (rgb[..., 2] == 0).all()
    x = Normalizer(spec)(torch.from_numpy(rgb[None]))
    assert x.shape == (1, 3, 8, 8) and torch.allclose(x[0, 0], torch.ones(8, 8)) and torch.allclose(x[0, 2], -torch.ones(8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("image", [np.zeros((5, 7), np.uint8), np.zeros((5, 7, 4), np.uint8),
                                   np.full((5, 7, 3), 65535, np.uint16), np.ones((1, 1, 3), np.uint8)],
                         ids=["gray", "bgra", "16-bit", "1x1"])
def test_odd_frames_become_model_input(image):
    out = resize_uint8(image, PreprocessSpec.for_color(16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec.for_color((32, 48), "gray")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown keys"):
        PreprocessSpec.from_dict({**spec.to_dict(), "crop": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="8..4096"):
        PreprocessSpec(height=2, width=2)


CLASSES = ("empty", "ok", "scratch", "spot")


def test_defect_when_any_defect_class_reaches_its_threshold():
    # given thresholds: scratch from the config, spot from the checkpoint
    d = Decider(CLASSES, DecideConfig(defect_classes=["scratch", "spot"], threshold={"scratch": 0.4}),
                ckpt_thresholds={"spot": 0.2, "scratch": 0.9})
    assert d.thresholds == {"scratch": 0.4, "spot": 0.2}
    probs = np.array([[0.1, 0.7, 0.05, 0.15],   # ok, nothing near a threshold
                      [0.1, 0.5, 0.05, 0.35],   # ok wins, but spot >= 0.2: still a defect
                      [0.0, 0.55, 0.45, 0.0],   # scratch 0.45 >= 0.4
                      [0.9, 0.0, 0.1, 0.0]], np.float32)
    v = d.decide(probs)
    assert [x.label for x in v] == ["ok", "ok", "ok", "empty"]
    assert [x.defect for x in v] == [False, True, True, False]
    assert v[0].top[0] == ("ok", pytest.approx(0.7)) and len(v[0].top) == 3


def test_unknown_defect_class_is_a_clear_error():
    with pytest.raises(UserError, match=r"decide.defect_classes: \['crack'\] not among the model's classes"):
        Decider(CLASSES, DecideConfig(defect_classes=["crack"]))


def test_debounce_needs_frames_in_a_row():
    deb = DefectDebouncer(3)
    seq = [True, True, False, True, True, True, True, False, False, False]
    events = [deb.update("c", x) for x in seq]
    assert events == [None, None, None, None, None, "defect_started", None, None, None, "defect_ended"]
