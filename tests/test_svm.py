"""The SVM baseline beside k-NN (fitted by scikit-learn, stored as tensors, run by torch) and the
baselines' fp32 distances under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.svm import SVC, LinearSVC

from shapes import CLASSES, make_split_shapes_dataset
from visiond.data.manifest import add_image, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.models.arch import imagenet_model
from visiond.models.baseline import FeatureSVM, PixelKNN, fp32_region
from visiond.models.checkpoint import load_checkpoint
from visiond.models.export import export_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.train.baseline import _fit_sklearn, infer_backbone
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint
from visiond.train.loop import TrainOptions, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_split_shapes_dataset(tmp_path_factory.mktemp("svm-shapes"), per_class=60, size=32, seed=3)


def opts(data, out, **kw) -> TrainOptions:
    return TrainOptions(**({"data": data, "out": out, "arch": "svm", "image_size": 32, "progress": False,
                            "device": "cpu"} | kw))


def test_svm_on_pixels_beats_chance_and_goes_through_checkpoint_evaluate_and_export(shapes, tmp_path):
    # given generated circles, squares and triangles (chance: 1/3)
    out = tmp_path / "svm.ckpt"
    # when the SVM baseline trains with the same command as a CNN
    result = train(opts(shapes, out))
    # then the held-out test split, through the daemon's runtime, is clearly better than chance
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=shapes, out=tmp_path / "eval", device="cpu"))
    assert report.metrics["accuracy"] >= 0.7 and result.best_metrics["accuracy"] >= 0.7, report.metrics
    # and the checkpoint holds the SVM as plain tensors (support vectors, dual coefficients), no pickle
    ckpt = load_checkpoint(out)
    assert ckpt.arch == "svm" and ckpt.arch_args["kernel"] == "rbf" and ckpt.name == shapes.name
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {"support", "dual", "intercept", "gamma", "mean", "scale"} <= keys
    assert ckpt.state_dict["support"].shape[0] == ckpt.arch_args["n_sv"] > 0
    # and a reloaded model gives exactly what the saved one does
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    p1 = TorchClassifier(ckpt, device="cpu").predict(pixels)
    p2 = TorchClassifier(load_checkpoint(out), device="cpu").predict(pixels)
    assert np.array_equal(p1, p2) and np.allclose(p1.sum(1), 1, atol=1e-5)
    # and it exports to ONNX and TorchScript, verified against PyTorch
    for fmt, name in (("onnx", "svm.onnx"), ("torchscript", "svm.pt")):
        res = export_checkpoint(out, fmt, tmp_path / name)
        assert res.path.exists() and res.max_abs_diff <= 1e-4


def test_linear_svm_on_two_classes(tmp_path):
    # given two classes a linear model can tell apart: a bright left half or a bright right half, in noise
    root, rng, samples = tmp_path / "two", np.random.default_rng(5), []
    for label in ("left", "right"):
        for _ in range(50):
            img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
            half = img[:, :16] if label == "left" else img[:, 16:]
            half += rng.integers(40, 100, dtype=np.uint8)
            samples.append(add_image(root, img, label, source="test"))
    write_manifest(root, split_dataset(samples, 0.6, 0.2, 0.2, seed=0))
    # when a linear SVM trains (liblinear's single row becomes two logits)
    train(opts(root, tmp_path / "lin.ckpt", svm_kernel="linear", svm_c=1.0))
    # then it is right on the test split, through evaluate
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=tmp_path / "lin.ckpt", dataset=root, out=tmp_path / "e",
                                                 device="cpu"))
    assert load_checkpoint(tmp_path / "lin.ckpt").state_dict["coef"].shape[0] == 2
    assert report.metrics["accuracy"] >= 0.9, report.metrics


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
def test_torch_svm_gives_scikit_learns_decisions(kernel):
    # given blobs of 4 classes and scikit-learn's own SVM on them
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    x[np.arange(400), y] += 2.0
    test = rng.normal(size=(200, 12)).astype(np.float32)
    # when the same fit is kept as tensors and evaluated by torch
    fitted = _fit_sklearn(x, y, 4, kernel, 10.0, 0)
    svm = FeatureSVM(4, 3, 32, kernel=kernel, grid=2, n_sv=fitted["support"].shape[0] if kernel == "rbf" else 1)
    svm.mean, svm.inv_std = torch.zeros(12), torch.ones(12)
    for name, value in fitted.items():
        setattr(svm, name, value)
    with torch.inference_mode():
        got = svm.decision(torch.from_numpy(test)).numpy()
    # then the scores are scikit-learn's (SVC 'ovr' votes + confidences; LinearSVC one-vs-rest)
    ref = SVC(C=10.0, gamma="scale").fit(x, y) if kernel == "rbf" else \
        LinearSVC(C=10.0, dual="auto", max_iter=5000, random_state=0).fit(x, y)
    want = ref.decision_function(test)
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(1) == want.argmax(1)).all()


def test_svm_on_backbone_features_keeps_the_weights(shapes, tmp_path):
    # given a torchvision ImageNet-format state dict (random weights: no download; the path is what is tested)
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet_v3_small.pth"
    src = imagenet_model("mobilenet_v3_small").state_dict()
    torch.save(src, weights)
    assert infer_backbone(src, weights) == "mobilenet_v3_small"
    # when the SVM trains on that network's features
    out = tmp_path / "feat.ckpt"
    train(opts(shapes, out, weights=weights, svm_kernel="linear", image_size=32))
    # then the checkpoint holds the backbone (the file's tensors) and the SVM, and serves like any model
    ckpt = load_checkpoint(out)
    assert ckpt.arch_args["backbone"] == "mobilenet_v3_small" and ckpt.arch_args["dim"] == 1024
    assert torch.equal(ckpt.state_dict["backbone.features.0.0.weight"], src["features.0.0.weight"])
    assert ckpt.spec.mean != (0.5, 0.5, 0.5)  # ImageNet normalisation, as the weights expect
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=shapes, out=tmp_path / "eval", device="cpu"))
    assert report.metrics["accuracy"] > 0.45, report.metrics
    assert export_checkpoint(out, "onnx", tmp_path / "feat.onnx").max_abs_diff <= 1e-4


def test_svm_refuses_bad_options(shapes, tmp_path):
    with pytest.raises(UserError, match="--svm-kernel 'poly'"):
        train(opts(shapes, tmp_path / "a.ckpt", svm_kernel="poly"))
    with pytest.raises(UserError, match="--svm-c"):
        train(opts(shapes, tmp_path / "a.ckpt", svm_c=0.0))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, bad)
    with pytest.raises(UserError, match="not the ImageNet state dict"):
        train(opts(shapes, tmp_path / "a.ckpt", weights=bad))


def test_knn_distances_stay_fp32_under_autocast():
    # given neighbours 100 units from the origin that differ by hundredths: in 16-bit floats,
    # |q|^2 - 2 q.x + |x|^2 cannot tell them apart
    torch.manual_seed(0)
    q = torch.full((1, 1, 4, 4), 100.0)
    train_x = q.flatten(1).repeat(8, 1) + torch.randn(8, 16) * 0.1
    train_x[3] = q.flatten(1) + 0.01  # the true nearest neighbour
    knn = PixelKNN(8, 1, 4, k=1).fit(train_x, torch.arange(8))
    f = q.flatten(1)
    naive = ((f * f).sum(1, keepdim=True) - 2 * (f.bfloat16() @ train_x.bfloat16().T).float()
             + (train_x * train_x).sum(1)).argmin(1)
    assert naive.item() != 3  # the case is one where half precision picks the wrong neighbour
    # when the model runs under autocast (as the runtime does on CUDA; bf16 autocast is the CPU's)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = knn(q)
    # then the distances were fp32: the right neighbour, the same scores as without autocast
    with torch.inference_mode():
        want = knn(q)
    assert got.argmax(1).item() == 3 and torch.equal(got, want)


def test_fp32_region_turns_autocast_off_only_inside():
    a = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a.T).dtype == torch.bfloat16
        with fp32_region(a):
            assert (a @ a.T).dtype == torch.float32
        assert (a @ a.T).dtype == torch.bfloat16


def test_svm_scores_stay_fp32_under_autocast(shapes, tmp_path):
    out = tmp_path / "svm.ckpt"
    train(opts(shapes, out, svm_max_train=60))
    net = load_checkpoint(out).build()
    x = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        want = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = net(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert set(CLASSES) == set(load_checkpoint(out).classes)
