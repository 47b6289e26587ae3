"""`visiond train --arch knn` and `--arch svm`: the classical baselines, trained by the same command as a CNN.

k-NN has nothing to optimise: the normalised, pooled training images are the model. The SVM is fitted
by scikit-learn on pooled pixels, or on a pretrained network's features with `--weights`, and kept
as tensors (coefficients, or support vectors and dual coefficients), evaluated by torch.
It is saved through the same checkpoint, so `evaluate`, `predict`, `export` and the
daemon treat it like any other model, and the report shows what the CNN buys over it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.baseline import SVM_KERNELS, PixelKNN, grid_for, without_head
from visiond.models.checkpoint import save_checkpoint
from visiond.preprocess import Normalizer, PreprocessSpec
from visiond.train.data import ImageDataset, load_splits
from visiond.train.engine import TrainableModel, evaluate
from visiond.train.options import TrainOptions, TrainResult
from visiond.train.progress import stderr_progress
from visiond.train.recipe import (
    Processes,
    checkpoint_meta,
    last_path_for,
    preprocess_spec,
    run_dir_for,
    write_history,
)

log = logging.getLogger(__name__)


def _subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` indices, the same fraction from every class (the model's size is bounded)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        keep.append(rng.choice(idx, max(1, round(len(idx) * limit / len(labels))), replace=False))
    return np.sort(np.concatenate(keep))


def _inputs(ds: ImageDataset, idx) -> torch.Tensor:
    return torch.from_numpy(np.stack([ds.image_hwc(int(i)) for i in idx]))


def _extract(features, ds: ImageDataset, idx, spec: PreprocessSpec, device: torch.device, what: str,
             progress: bool, batch: int = 256) -> torch.Tensor:
    """Raw features of the images at `idx`, normalised as at serving time, on the CPU in fp32."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    norm, out = Normalizer(spec).to(device), []
    bar = stderr_progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          enabled=progress, transient=True)
    with bar, torch.inference_mode():
        task = bar.add_task(what, total=len(idx))
        for start in range(0, len(idx), batch):
            x = _inputs(ds, idx[start:start + batch]).to(device)
            out.append(features(norm(x)).float().cpu())
            bar.update(task, advance=min(batch, len(idx) - start))
    return torch.cat(out)


def fit_knn(ds: ImageDataset, spec: PreprocessSpec, num_classes: int, k: int, limit: int, seed: int,
            progress: bool = False) -> PixelKNN:
    """Pool and store the training images, normalised exactly as at serving time."""
    idx = _subsample(ds.labels, limit, seed)
    model = PixelKNN(num_classes, spec.channels, spec.height, k=k, n_train=len(idx))
    feats = _extract(model.features, ds, idx, spec, torch.device("cpu"), "pooled pixels (train)", progress, batch=512)
    return model.fit(feats, torch.from_numpy(ds.labels[idx]))


def train_knn(opts: TrainOptions, procs: Processes) -> TrainResult:
    """Fit, score on the validation split with the same `evaluate` as a CNN, save like one."""
    if procs.world > 1:
        raise UserError("--arch knn has nothing to distribute; run it without torchrun")
    if opts.init_from or opts.weights or opts.resume:
        raise UserError("--arch knn takes no --init-from, --weights or --resume")
    t0 = time.monotonic()
    splits = load_splits(opts.data)
    spec = preprocess_spec(opts, None, splits)  # size and colour from the options, else from the data
    opts = dataclasses.replace(opts, image_size=spec.height, grayscale=spec.color == "gray")  # as recorded
    train_ds = ImageDataset(splits.root, splits.train, splits.classes, spec)
    val_ds = ImageDataset(splits.root, splits.val or splits.train, splits.classes, spec)
    net = fit_knn(train_ds, spec, len(splits.classes), opts.knn_k, opts.knn_max_train, opts.seed, opts.progress)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=256)
    val = evaluate(TrainableModel(net, spec), loader, torch.device("cpu"), splits.classes)
    row = {"epoch": 1, "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
           "seconds": round(time.monotonic() - t0, 3)}
    arch_args = {"in_channels": spec.channels, "image_size": spec.height, "k": net.k,
                 "grid": grid_for(spec.height), "n_train": int(net.train_x.shape[0])}
    last, run_dir = last_path_for(opts.out), run_dir_for(opts.out)
    meta, name = checkpoint_meta(opts, splits, row, 1, 1), opts.model_name()
    for path in (opts.out, last):
        save_checkpoint(path, arch="knn", classes=splits.classes, spec=spec, state_dict=net.state_dict(),
                        arch_args=arch_args, meta=meta, name=name)
    write_history(run_dir, [row])
    log.info("knn (k=%d, %d stored images, %dx%d pooled): val accuracy %.4f, macro-F1 %.4f", net.k,
             arch_args["n_train"], net.grid, net.grid, val["accuracy"], val["macro_f1"])
    best = {"accuracy": val["accuracy"], "macro_f1": val["macro_f1"]}
    return TrainResult(opts.out, last, run_dir, 1, 1, best, [row])


# --- the SVM baseline ---------------------------------------------------------------------------


def train_baseline(opts: TrainOptions, procs: Processes) -> TrainResult:
    """`--arch knn` or `--arch svm`: the classical baselines, trained by the same command as a CNN."""
    return train_svm(opts, procs) if opts.arch == "svm" else train_knn(opts, procs)


def infer_backbone(state: dict[str, torch.Tensor], path) -> str:
    """The torchvision family an ImageNet state dict belongs to: the one whose tensors have exactly its
    names and shapes (the file names no architecture, and `--arch svm` needs one for its features)."""
    from visiond.models.arch import _TORCHVISION, imagenet_model

    have = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for arch in _TORCHVISION:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in imagenet_model(arch).state_dict().items()
                    if not k.endswith("num_batches_tracked")}
        if want == have:
            return arch
    raise UserError(f"--weights {path}: not the ImageNet state dict of any of {', '.join(_TORCHVISION)}; "
                    "--arch svm takes its features from one of those")


def _check_svm(opts: TrainOptions, procs: Processes) -> None:
    if procs.world > 1:
        raise UserError("--arch svm has nothing to distribute; run it without torchrun")
    if opts.init_from or opts.resume:
        raise UserError("--arch svm takes no --init-from or --resume (it is fitted in one go; --weights is allowed)")
    if opts.svm_kernel not in SVM_KERNELS:
        raise UserError(f"--svm-kernel {opts.svm_kernel!r}: expected one of {', '.join(SVM_KERNELS)}")
    if not opts.svm_c > 0:
        raise UserError(f"--svm-c {opts.svm_c}: expected > 0")
    if opts.svm_max_train < 2:
        raise UserError(f"--svm-max-train {opts.svm_max_train}: expected >= 2 images")


def _fit_sklearn(x: np.ndarray, y: np.ndarray, num_classes: int, kernel: str, c: float, seed: int) -> dict:
    """Fit with scikit-learn and hand back plain tensors (nothing of scikit-learn is kept or pickled)."""
    from sklearn.svm import SVC, LinearSVC

    missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise UserError(f"--arch svm: class index(es) {missing} have no training images; every class needs some")
    if kernel == "linear":
        clf = LinearSVC(C=c, dual="auto", max_iter=5000, random_state=seed).fit(x, y)
        coef, icpt = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if num_classes == 2:  # liblinear's one row: d > 0 means class 1; softmax([-d/2, d/2]) = sigmoid(d)
            coef, icpt = torch.cat([-coef, coef]) / 2, torch.cat([-icpt, icpt]) / 2
        return {"coef": coef, "intercept": icpt}
    clf = SVC(C=c, kernel="rbf", gamma="scale", decision_function_shape="ovo", cache_size=1000).fit(x, y)
    sv_class = np.repeat(np.arange(num_classes), clf.n_support_)  # support vectors come sorted by class
    pairs = [(i, j) for i in range(num_classes) for j in range(i + 1, num_classes)]
    dual = np.zeros((len(sv_class), len(pairs)), np.float64)
    for p, (i, j) in enumerate(pairs):  # libsvm's layout: row j-1 holds class i's coefficients vs j, row i class j's
        dual[sv_class == i, p] = clf.dual_coef_[j - 1, sv_class == i]
        dual[sv_class == j, p] = clf.dual_coef_[i, sv_class == j]
    return {"support": torch.from_numpy(clf.support_vectors_).float(), "dual": torch.from_numpy(dual).float(),
            "intercept": torch.from_numpy(clf.intercept_).float(), "gamma": torch.tensor(float(clf._gamma))}


def fit_scale(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The factor on the SVM's scores that minimises the validation log-loss of softmax(factor x scores)
    (a grid over 1e-2..1e3: one number, no optimiser to diverge)."""
    grid = torch.logspace(-2, 3, 101)
    nll = [torch.nn.functional.cross_entropy(s * scores.double(), labels.long()).item() for s in grid.double()]
    return float(grid[int(np.nanargmin(nll))])


def train_svm(opts: TrainOptions, procs: Processes) -> TrainResult:
    """Fit on pooled pixels (or on the penultimate features of `--weights`' network), pick the score
    scale on the validation split, score it there with the CNN's `evaluate`, save it like a CNN."""
    from visiond.train import transfer

    _check_svm(opts, procs)
    t0 = time.monotonic()
    splits = load_splits(opts.data)
    spec = preprocess_spec(opts, None, splits)  # --weights: their input size unless told; else from the data
    opts = dataclasses.replace(opts, image_size=spec.height, grayscale=spec.color == "gray")  # as recorded
    train_ds = ImageDataset(splits.root, splits.train, splits.classes, spec)
    val_ds = ImageDataset(splits.root, splits.val or splits.train, splits.classes, spec)
    if len(train_ds) == 0:
        raise UserError(f"{opts.data}: no readable training images")
    n_cls, device = len(splits.classes), procs.device
    backbone, extractor, arch_args = None, None, {"in_channels": spec.channels, "image_size": spec.height,
                                                  "kernel": opts.svm_kernel}
    if opts.weights is not None:
        backbone = infer_backbone(transfer.read_state_dict(opts.weights), opts.weights)
        net = build_model(backbone, n_cls, spec.channels, spec.height)
        transfer.load_imagenet_weights(net, opts.weights, backbone)
        extractor = without_head(net).to(device).eval()
        arch_args["backbone"] = backbone
    else:
        arch_args["grid"] = grid_for(spec.height, 32)
        extractor = torch.nn.AdaptiveAvgPool2d(arch_args["grid"])

    def features(x: torch.Tensor) -> torch.Tensor:
        return extractor(x).flatten(1)

    idx = _subsample(train_ds.labels, opts.svm_max_train, opts.seed)
    what = f"{backbone} features" if backbone else "pooled pixels"
    x = _extract(features, train_ds, idx, spec, device, f"{what} (train)", opts.progress)
    y = train_ds.labels[idx]
    mean, std = x.mean(0), x.std().clamp_min(1e-6)  # centred per feature, one scale: pixels keep their weights
    log.info("fitting a %s SVM (C=%g) on %d x %d %s; an rbf fit grows ~quadratically with the images "
             "(--svm-max-train)", opts.svm_kernel, opts.svm_c, x.shape[0], x.shape[1], what)
    fitted = _fit_sklearn(((x - mean) / std).numpy(), y, n_cls, opts.svm_kernel, opts.svm_c, opts.seed)
    if opts.svm_kernel == "rbf":
        arch_args["n_sv"] = int(fitted["support"].shape[0])
    if backbone:
        arch_args["dim"] = int(x.shape[1])
    svm = build_model("svm", n_cls, **arch_args)
    if backbone:
        svm.backbone.load_state_dict(extractor.state_dict())
    svm.mean.copy_(mean)
    svm.inv_std.fill_(1.0 / float(std))
    for name, value in fitted.items():
        getattr(svm, name).copy_(value)
    svm = svm.to(device).eval()
    val_idx = np.arange(len(val_ds))
    val_f = _extract(features, val_ds, val_idx, spec, device, f"{what} (val)", opts.progress)
    with torch.inference_mode():
        scores = svm.cpu().decision(val_f)
    svm.scale.fill_(fit_scale(scores, torch.from_numpy(val_ds.labels)))
    svm = svm.to(device)
    loader = torch.utils.data.DataLoader(val_ds, batch_size=256)
    val = evaluate(TrainableModel(svm, spec), loader, device, splits.classes)
    row = {"epoch": 1, "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
           "seconds": round(time.monotonic() - t0, 3)}
    last, run_dir = last_path_for(opts.out), run_dir_for(opts.out)
    meta, name = checkpoint_meta(opts, splits, row, 1, 1), opts.model_name()
    meta["svm"] = {"kernel": opts.svm_kernel, "C": opts.svm_c, "n_train": int(x.shape[0]),
                   "features": what, "scale": float(svm.scale)}
    for path in (opts.out, last):
        save_checkpoint(path, arch="svm", classes=splits.classes, spec=spec, state_dict=svm.state_dict(),
                        arch_args=arch_args, meta=meta, name=name)
    write_history(run_dir, [row])
    log.info("svm (%s, C=%g, %d images of %d %s%s): val accuracy %.4f, macro-F1 %.4f in %.1fs", opts.svm_kernel,
             opts.svm_c, x.shape[0], x.shape[1], what,
             f", {arch_args['n_sv']} support vectors" if "n_sv" in arch_args else "", val["accuracy"],
             val["macro_f1"], row["seconds"])
    best = {"accuracy": val["accuracy"], "macro_f1": val["macro_f1"]}
    return TrainResult(opts.out, last, run_dir, 1, 1, best, [row])
