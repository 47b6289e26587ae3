"""`visiond train --arch knn`: the classical baseline, trained by the same command as a CNN.

There is nothing to optimise: the normalised, pooled training images are the model.
It is saved through the same checkpoint, so `evaluate`, `predict`, `export` and the
daemon treat it like any other model, and the report shows what the CNN buys over it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from visiond.errors import UserError
from visiond.models.baseline import PixelKNN, grid_for
from visiond.models.checkpoint import save_checkpoint
from visiond.preprocess import Normalizer, PreprocessSpec
from visiond.train.data import ImageDataset, load_splits
from visiond.train.engine import TrainableModel, evaluate
from visiond.train.options import TrainOptions, TrainResult
from visiond.train.recipe import Processes, checkpoint_meta, last_path_for, run_dir_for, write_history

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


def fit_knn(ds: ImageDataset, spec: PreprocessSpec, num_classes: int, k: int, limit: int, seed: int) -> PixelKNN:
    """Pool and store the training images, normalised exactly as at serving time."""
    idx = _subsample(ds.labels, limit, seed)
    norm = Normalizer(spec)
    model = PixelKNN(num_classes, spec.channels, spec.height, k=k, n_train=len(idx))
    feats = []
    with torch.inference_mode():
        for start in range(0, len(idx), 512):
            feats.append(model.features(norm(_inputs(ds, idx[start:start + 512]))))
    return model.fit(torch.cat(feats), torch.from_numpy(ds.labels[idx]))


def train_knn(opts: TrainOptions, procs: Processes) -> TrainResult:
    """Fit, score on the validation split with the same `evaluate` as a CNN, save like one."""
    if procs.world > 1:
        raise UserError("--arch knn has nothing to distribute; run it without torchrun")
    if opts.init_from or opts.weights or opts.resume:
        raise UserError("--arch knn takes no --init-from, --weights or --resume")
    t0 = time.monotonic()
    splits = load_splits(opts.data)
    spec = PreprocessSpec.for_color(opts.image_size, "gray" if opts.grayscale else "rgb")
    train_ds = ImageDataset(splits.root, splits.train, splits.classes, spec)
    val_ds = ImageDataset(splits.root, splits.val or splits.train, splits.classes, spec)
    net = fit_knn(train_ds, spec, len(splits.classes), opts.knn_k, opts.knn_max_train, opts.seed)
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
