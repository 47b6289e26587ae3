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
from visiond.models.arch import PRETRAINED_INPUT_SIZE, SMALLCNN_VERSION, build_model
from visiond.models.checkpoint import Checkpoint
from visiond.models.runtime import resolve_device
from visiond.preprocess import PreprocessSpec
from visiond.train import transfer
from visiond.train.data import BalancedSampler, DataSplits, stored_image_shape
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


def rank0_decides(procs: Processes, *flags: bool) -> tuple[bool, ...]:
    """Rank 0's flags on every rank (a broadcast): decisions taken from validation figures, such as
    early stopping, must be the same everywhere, or a rank that stops leaves the others waiting in
    an all-reduce forever. Every rank validates on its own and figures can differ in the last bit."""
    if procs.world <= 1:
        return tuple(bool(f) for f in flags)
    device = procs.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return tuple(bool(v) for v in t.tolist())


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


def preprocess_spec(opts: TrainOptions, init: Checkpoint | None, splits: DataSplits | None = None
                    ) -> PreprocessSpec:
    """The spec that goes into the checkpoint: the fine-tuned model's, else from the options, where
    the size and colour not given follow the weights and the data (`default_image_size`, `default_gray`)."""
    if init is not None:
        return init.spec
    shape = stored_image_shape(splits.root, splits.train) if splits is not None and splits.train else None
    size = opts.image_size or default_image_size(opts, shape)
    gray = opts.grayscale if opts.grayscale is not None else (shape is not None and shape[2] == 1)
    return PreprocessSpec.for_color(size, "gray" if gray else "rgb", imagenet=opts.weights is not None)


DEFAULT_IMAGE_SIZE = 64


def round_up8(x: float) -> int:
    """The multiple of 8 at or above `x` (input sides: the networks downsample by powers of two)."""
    return int(-(-x // 8)) * 8


def default_image_size(opts: TrainOptions, shape: tuple[int, int, int] | None) -> int:
    """The size the weights were trained at (224 for the torchvision families); from scratch 64, or the
    stored images' own size rounded up to a multiple of 8 when smaller: upscaling adds no detail, only
    cost (Fashion-MNIST's 28 px: 32, a quarter of the work of 64)."""
    if opts.weights is not None:
        return PRETRAINED_INPUT_SIZE.get(opts.arch, 224)
    if shape is None:
        return DEFAULT_IMAGE_SIZE
    side = round_up8(max(shape[0], shape[1]))
    return max(8 if opts.arch == "smallcnn" else 32, min(DEFAULT_IMAGE_SIZE, side))


def build_network(opts: TrainOptions, classes: list[str], spec: PreprocessSpec, init: Checkpoint | None):
    """(network, arch_args): fresh, from ImageNet weights, or from a visiond checkpoint."""
    if init is not None:
        if init.arch != opts.arch:
            raise UserError(f"--init-from {opts.init_from}: architecture {init.arch!r}, but --arch {opts.arch!r}")
        net = build_model(init.arch, len(classes), **init.arch_args)
        transfer.load_from_checkpoint(net, init, classes)
        return net, dict(init.arch_args)
    arch_args = {"in_channels": spec.channels, "image_size": spec.height}
    if opts.arch == "smallcnn":
        arch_args["version"] = SMALLCNN_VERSION
    net = build_model(opts.arch, len(classes), **arch_args)
    if opts.weights is not None:
        transfer.load_imagenet_weights(net, opts.weights, opts.arch, spec)
    return net, arch_args


def param_groups(opts: TrainOptions, net: nn.Module) -> list[dict]:
    """Parameter groups, named: from weights the pretrained layers ("backbone") learn at `backbone_lr`
    times the head's rate, so the new head moves fast while the features it reads move little; from
    scratch every layer is "head". Biases and norm scales (1-d tensors) take no weight decay.
    All parameters, frozen or not: unfreezing later needs no new optimizer (frozen ones get no grad)."""
    lr, wd = opts.resolved_lr(), opts.resolved_weight_decay()
    head = transfer.head_name(net) + "."
    groups: dict[tuple[str, bool], list] = {}
    for name, p in net.named_parameters():
        part = "backbone" if opts.from_weights and not name.startswith(head) else "head"
        groups.setdefault((part, p.ndim > 1), []).append(p)
    scale = {"backbone": opts.backbone_lr, "head": 1.0}
    return [{"name": f"{part}" + ("" if decay else "/no_decay"), "params": params, "lr": lr * scale[part],
             "weight_decay": wd if decay else 0.0}
            for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != "backbone", not kv[0][1]))]


def make_optimizer(opts: TrainOptions, net: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(opts, net)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.resolved_lr(), momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=opts.resolved_lr())


def warmup_steps(opts: TrainOptions, steps_per_epoch: int) -> int:
    """`warmup_epochs` of steps, at most a fifth of the run."""
    total = opts.epochs * steps_per_epoch
    return min(round(opts.warmup_epochs * steps_per_epoch), total // 5)


def lr_factor(step: int, *, total: int, warmup: int, kind: str, epochs: int, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step` as a fraction of the base: linear warm-up to 1, then
    cosine to 0 at the last step (`cosine`), a tenth every third of the run (`step`), or flat (`none`)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "step":
        return 0.1 ** ((step // max(1, steps_per_epoch)) // max(1, math.ceil(epochs / 3)))
    return 1.0


def make_scheduler(opts: TrainOptions, optimizer, steps_per_epoch: int):
    """Stepped after every optimizer step (so warm-up and cosine are smooth even over few epochs)."""
    spe = max(1, steps_per_epoch)
    shape = dict(total=opts.epochs * spe, warmup=warmup_steps(opts, spe), kind=opts.scheduler,
                 epochs=opts.epochs, steps_per_epoch=spe)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **shape))


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
