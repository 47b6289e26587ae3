"""The parts a training run is assembled from: processes, seeds, network, optimizer, schedule,
loaders, and the files a run leaves beside its checkpoint. `loop.py` puts them together."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import Checkpoint
from visiond.models.runtime import resolve_device
from visiond.preprocess import PreprocessSpec
from visiond.train import transfer
from visiond.train.data import BalancedSampler, DataSplits
from visiond.train.membership import META_KEY
from visiond.train.options import TrainOptions


@dataclass
class Processes:
    """This process's place among torchrun's (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_processes(requested_device: str) -> Processes:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA (one GPU per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(requested_device)
    if world <= 1:
        return Processes(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Every epoch's random draws follow from (seed, epoch, rank) alone, so a resumed run repeats them."""
    return seed * 100_003 + epoch * 1009 + rank


def preprocess_spec(opts: TrainOptions, init: Checkpoint | None) -> PreprocessSpec:
    """The spec that goes into the checkpoint: the fine-tuned model's, else from the options."""
    if init is not None:
        return init.spec
    return PreprocessSpec.for_color(opts.image_size, "gray" if opts.grayscale else "rgb",
                                    imagenet=opts.weights is not None)


def build_network(opts: TrainOptions, classes: list[str], spec: PreprocessSpec, init: Checkpoint | None):
    """(network, arch_args): fresh, from ImageNet weights, or from a visiond checkpoint."""
    if init is not None:
        if init.arch != opts.arch:
            raise UserError(f"--init-from {opts.init_from}: architecture {init.arch!r}, but --arch {opts.arch!r}")
        net = build_model(init.arch, len(classes), **init.arch_args)
        transfer.load_from_checkpoint(net, init, classes)
        return net, dict(init.arch_args)
    arch_args = {"in_channels": spec.channels, "image_size": spec.height}
    net = build_model(opts.arch, len(classes), **arch_args)
    if opts.weights is not None:
        transfer.load_imagenet_weights(net, opts.weights, opts.arch)
    return net, arch_args


def make_optimizer(opts: TrainOptions, net: nn.Module) -> torch.optim.Optimizer:
    """All parameters, frozen or not: unfreezing later needs no new optimizer (frozen ones get no grad)."""
    params = list(net.parameters())
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr or 1e-2, momentum=0.9, weight_decay=opts.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=opts.lr or 1e-3, weight_decay=opts.weight_decay)


def make_scheduler(opts: TrainOptions, optimizer):
    """Stepped once per epoch."""
    if opts.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts.epochs)
    if opts.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(opts.epochs / 3)), gamma=0.1)
    return None


def make_loaders(opts: TrainOptions, train_ds, val_ds, procs: Processes, seed_gen: torch.Generator):
    """(sampler, train loader, val loader); every process validates on the whole val set."""
    if opts.class_weights == "balanced":
        sampler = BalancedSampler(train_ds.labels, procs.world, procs.rank, opts.seed)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=opts.seed)
    cuda = procs.device.type == "cuda"
    workers = opts.workers if opts.workers >= 0 else (min(8, os.cpu_count() or 1) if cuda else 0)
    common = {"num_workers": workers, "pin_memory": cuda, "generator": seed_gen}
    # a last batch of one breaks BatchNorm in training mode; drop it only then
    train_loader = DataLoader(train_ds, batch_size=opts.batch_size, sampler=sampler,
                              drop_last=len(sampler) % opts.batch_size == 1, **common)
    val_loader = DataLoader(val_ds, batch_size=opts.batch_size * 2, shuffle=False, **common)
    return sampler, train_loader, val_loader


def run_dir_for(out: Path) -> Path:
    """`model.ckpt` -> `model.train/` beside it: history, curves and the resume file."""
    return out.with_name(out.stem + ".train")


def last_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".last.ckpt")


def checkpoint_meta(opts: TrainOptions, splits: DataSplits, row: dict, epochs: int, best_epoch: int) -> dict:
    """Training metadata stored in the checkpoint (its date is added by save_checkpoint); the images
    it was trained on go in by content, so `compare` can tell when a test image is one of them."""
    return {"dataset_hash": splits.hash, "dataset": str(opts.data), "class_counts": splits.class_counts(),
            "val_metrics": {k[4:]: v for k, v in row.items() if k.startswith("val_")}, "epochs": epochs,
            "best_epoch": best_epoch, "seed": opts.seed, "arch": opts.arch,
            "defect_classes": list(opts.defect_classes), "train_options": opts.to_json(), **opts.extra_meta,
            META_KEY: splits.membership}


def write_history(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and history.json after every epoch, and the curves PNG."""
    from visiond.train.plots import training_curves

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(history)
    training_curves(history, run_dir / "curves.png")
