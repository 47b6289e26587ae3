"""Training, read top to bottom like torchvision's references: train_one_epoch, evaluate, load_data, train.

The model trains on uint8 images that went through the daemon's own resize; the
`TrainableModel` wrapper normalises them on the device with the runtime's Normalizer.
One process or many (`torchrun`, DDP): only rank 0 writes files and draws the bar.
Every epoch reseeds from (seed, epoch, rank), so a resumed run repeats the exact
random draws an uninterrupted one would have made.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from visiond.data.augment import DEFAULT_PRESET, PRESETS, build_augmentation
from visiond.errors import UserError
from visiond.models.arch import ARCHITECTURES, build_model
from visiond.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from visiond.models.runtime import resolve_device
from visiond.preprocess import Normalizer, PreprocessSpec
from visiond.train import transfer
from visiond.train.data import CLASS_WEIGHTS, BalancedSampler, DataSplits, ImageDataset, \
    inverse_frequency_weights, load_splits
from visiond.train.metrics import classification_metrics
from visiond.train.progress import EpochBar
from visiond.train.state import RESUME_NAME, ResumeState, resume_path_for, save_resume

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
MONITORS = ("macro_f1", "accuracy")
BASELINES = ("knn",)


@dataclass
class TrainOptions:
    """Everything one training run needs; the CLI fills it, tests build it directly."""

    data: Path
    out: Path
    arch: str = "smallcnn"
    epochs: int = 10
    batch_size: int = 32
    image_size: int = 64
    grayscale: bool = False
    weights: Path | None = None          # torchvision ImageNet state dict file
    freeze_backbone: bool = False
    unfreeze_after: int = 0              # with freeze_backbone: epochs frozen (0 = frozen throughout)
    lr: float | None = None              # default: 1e-3 adamw, 1e-2 sgd
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    label_smoothing: float = 0.0
    class_weights: str = "none"          # none | loss (inverse frequency) | balanced (sampler)
    early_stop: int = 0                  # patience in epochs, 0 = off
    monitor: str = "macro_f1"
    augment: str = DEFAULT_PRESET
    resume: Path | None = None
    init_from: Path | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = -1                    # -1: 0 on CPU, up to 8 on CUDA
    defect_classes: tuple[str, ...] = ()
    knn_k: int = 5
    knn_max_train: int = 10000
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("weights", "resume", "init_from"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.defect_classes = tuple(self.defect_classes)

    def validate(self) -> None:
        """Fail before any work, naming the valid choices."""
        choices = {"arch": (self.arch, tuple(dict.fromkeys(ARCHITECTURES + BASELINES))), "optimizer": (self.optimizer, OPTIMIZERS),
                   "scheduler": (self.scheduler, SCHEDULERS), "class-weights": (self.class_weights, CLASS_WEIGHTS),
                   "monitor": (self.monitor, MONITORS), "augment": (self.augment, tuple(PRESETS))}
        for opt, (value, valid) in choices.items():
            if value not in valid:
                raise UserError(f"--{opt} {value!r}: expected one of {', '.join(valid)}")
        if self.arch in BASELINES and self.arch not in ARCHITECTURES:
            raise UserError(f"--arch {self.arch}: this visiond build does not register the baseline "
                            "in visiond.models.arch, so its checkpoint cannot be saved")
        checks = [(self.epochs >= 1, f"--epochs {self.epochs}: expected >= 1"),
                  (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected >= 1"),
                  (8 <= self.image_size <= 4096, f"--image-size {self.image_size}: expected 8..4096"),
                  (self.arch in ("smallcnn", *BASELINES) or self.image_size >= 32,
                   f"--image-size {self.image_size}: {self.arch} needs at least 32 pixels"),
                  (self.lr is None or self.lr > 0, f"--lr {self.lr}: expected > 0"),
                  (0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: expected 0..1"),
                  (self.early_stop >= 0, f"--early-stop {self.early_stop}: expected >= 0 epochs"),
                  (self.weights is None or self.arch != "smallcnn" and self.arch not in BASELINES,
                   f"--weights needs a torchvision architecture, not {self.arch!r} "
                   "(use --init-from for a visiond checkpoint)"),
                  (self.weights is None or self.init_from is None, "--weights and --init-from exclude each other"),
                  (self.out.suffix == ".ckpt", f"--out {self.out}: expected a file name ending in .ckpt"),
                  (self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda",
                   f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclass
class TrainResult:
    best: Path
    last: Path
    run_dir: Path
    epochs: int                        # epochs completed in total
    best_epoch: int
    best_metrics: dict
    history: list[dict]
    is_main: bool = True               # False on torchrun ranks other than 0 (they wrote nothing)


class TrainableModel(nn.Module):
    """uint8 N x C x H x W -> logits, normalising on the device exactly as the runtime does."""

    def __init__(self, net: nn.Module, spec: PreprocessSpec, channels_last: bool = False):
        super().__init__()
        self.net, self.normalize, self.channels_last = net, Normalizer(spec), channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(self.normalize(x, nhwc=False))


def train_one_epoch(model, loader, criterion, optimizer, device, scaler=None, amp_dtype=None, bar=None) -> torch.Tensor:
    """One pass over the training data; returns float64 [loss sum, correct, count] for this rank."""
    model.train()
    transfer.frozen_batchnorm_eval(_unwrap(model).net)
    sums = torch.zeros(3, dtype=torch.float64)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = targets.shape[0]
        batch = torch.tensor([loss.item() * n, (logits.argmax(1) == targets).sum().item(), n], dtype=torch.float64)
        sums += batch
        if bar is not None:
            bar.advance(n, sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item())
    return sums


def evaluate(model: nn.Module, loader, device, classes: list[str], criterion=None, amp_dtype=None) -> dict:
    """Loss (when a criterion is given), accuracy, macro-F1 and the rest of `classification_metrics`."""
    model.eval()
    y_true, y_pred, loss_sum = [], [], 0.0
    with torch.inference_mode():
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                logits = model(images).float()
            if criterion is not None:
                loss_sum += criterion(logits, targets).item() * targets.shape[0]
            y_true.append(targets.cpu())
            y_pred.append(logits.argmax(1).cpu())
    if not y_true:
        return {}
    y_true, y_pred = torch.cat(y_true).numpy(), torch.cat(y_pred).numpy()
    out = classification_metrics(y_true, y_pred, classes)
    if criterion is not None:
        out["loss"] = loss_sum / len(y_true)
    return out


def load_data(opts: TrainOptions, splits: DataSplits, spec: PreprocessSpec) -> tuple[ImageDataset, ImageDataset]:
    """Training set with augmentation, validation set without; unreadable files reported and skipped."""
    augment = None if opts.augment == "none" else build_augmentation(opts.augment, spec)
    train_ds = ImageDataset(splits.root, splits.train, splits.classes, spec, augment)
    val_samples = splits.val
    if not val_samples:
        log.warning("no validation samples: model selection and early stopping use the training set")
        val_samples = splits.train
    val_ds = ImageDataset(splits.root, val_samples, splits.classes, spec)
    if len(train_ds) == 0:
        raise UserError(f"{opts.data}: no readable training images")
    return train_ds, val_ds


# --- the run ------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(requested: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(requested)
    if world <= 1:
        return _Dist(0, 1, device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, device)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _spec(opts: TrainOptions, init: Checkpoint | None) -> PreprocessSpec:
    if init is not None:
        if init.spec.height != opts.image_size or init.spec.channels != (1 if opts.grayscale else 3):
            log.warning("--init-from: keeping the checkpoint's preprocessing %s", init.spec.to_dict())
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


def _optimizer(opts: TrainOptions, net: nn.Module):
    params = list(net.parameters())
    if opts.optimizer == "sgd":
        return torch.optim.SGD(params, lr=opts.lr or 1e-2, momentum=0.9, weight_decay=opts.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=opts.lr or 1e-3, weight_decay=opts.weight_decay)


def _scheduler(opts: TrainOptions, optimizer):
    if opts.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts.epochs)
    if opts.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(opts.epochs / 3)), gamma=0.1)
    return None


def _loaders(opts: TrainOptions, train_ds, val_ds, ctx: _Dist, seed_gen: torch.Generator):
    if opts.class_weights == "balanced":
        sampler = BalancedSampler(train_ds.labels, ctx.world, ctx.rank, opts.seed)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=opts.seed)
    workers = opts.workers if opts.workers >= 0 else (min(8, os.cpu_count() or 1) if ctx.device.type == "cuda" else 0)
    common = {"num_workers": workers, "pin_memory": ctx.device.type == "cuda", "generator": seed_gen}
    # a last batch of one breaks BatchNorm in training mode; drop it only then
    train_loader = DataLoader(train_ds, batch_size=opts.batch_size, sampler=sampler,
                              drop_last=len(sampler) % opts.batch_size == 1, **common)
    val_loader = DataLoader(val_ds, batch_size=opts.batch_size * 2, shuffle=False, **common)
    return sampler, train_loader, val_loader


class EarlyStopping:
    """Stops after `patience` epochs without a better validation figure (0 = never)."""

    def __init__(self, patience: int, state: dict | None = None):
        self.patience = patience
        s = state or {}
        best = s.get("best")
        self.best = -math.inf if best is None else best
        self.best_epoch, self.bad = s.get("best_epoch", -1), s.get("bad", 0)

    def update(self, value: float, epoch: int) -> bool:
        if value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": None if self.best == -math.inf else self.best, "best_epoch": self.best_epoch, "bad": self.bad}


def _meta(opts: TrainOptions, splits: DataSplits, row: dict, epochs: int, best_epoch: int) -> dict:
    return {"dataset_hash": splits.hash, "dataset": str(opts.data), "class_counts": splits.class_counts(),
            "val_metrics": {k[4:]: v for k, v in row.items() if k.startswith("val_")}, "epochs": epochs,
            "best_epoch": best_epoch + 1, "seed": opts.seed, "arch": opts.arch,
            "defect_classes": list(opts.defect_classes), "train_options": opts.to_json(), **opts.extra_meta}


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


def run_dir_for(out: Path) -> Path:
    """`model.ckpt` -> `model.train/` beside it: history, curves and the resume file."""
    return out.with_name(out.stem + ".train")


def train(opts: TrainOptions) -> TrainResult:
    """Train a model from a dataset directory (or class-folder tree) into `opts.out`."""
    opts.validate()
    ctx = _init_distributed(opts.device)
    try:
        if opts.arch in BASELINES:
            from visiond.train.baseline import train_knn

            return train_knn(opts, ctx)
        return _train(opts, ctx)
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(opts: TrainOptions, ctx: _Dist) -> TrainResult:
    t_start = time.monotonic()
    init = load_checkpoint(opts.init_from) if opts.init_from else None
    resume = ResumeState(resume_path_for(opts.resume)) if opts.resume else None
    known = resume.info["classes"] if resume else (list(init.classes) if init else None)
    splits = load_splits(opts.data, classes=known)  # fixed split seed: evaluate must see the same test set
    spec = PreprocessSpec.from_dict(resume.info["spec"]) if resume else _spec(opts, init)
    _seed_all(opts.seed)
    net, arch_args = build_network(opts, splits.classes, spec, init)
    if resume:
        _check_resume(resume, opts, splits, spec)
        net.load_state_dict(resume.model_state)
    cuda = ctx.device.type == "cuda"
    # channels_last on CPU too: the small CNN's training step is 4x faster on 2 cores
    model = TrainableModel(net, spec, channels_last=True).to(ctx.device).to(memory_format=torch.channels_last)
    train_ds, val_ds = load_data(opts, splits, spec)
    weight = inverse_frequency_weights(train_ds.labels, len(splits.classes)).to(ctx.device) \
        if opts.class_weights == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=opts.label_smoothing)
    optimizer, scaler = _optimizer(opts, net), torch.amp.GradScaler("cuda", enabled=cuda)
    scheduler = _scheduler(opts, optimizer)
    stopper = EarlyStopping(opts.early_stop, resume.info["early_stop"] if resume else None)
    history: list[dict] = list(resume.info["history"]) if resume else []
    start = resume.info["epoch"] if resume else 0
    if resume:
        resume.apply(optimizer, scheduler, scaler)
        log.info("resuming %s at epoch %d of %d", resume.path, start + 1, opts.epochs)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=opts.freeze_backbone) \
        if ctx.world > 1 else model
    seed_gen = torch.Generator()
    sampler, train_loader, val_loader = _loaders(opts, train_ds, val_ds, ctx, seed_gen)
    amp_dtype = torch.float16 if cuda else None
    run_dir, last = run_dir_for(opts.out), opts.out.with_name(opts.out.stem + ".last.ckpt")
    if ctx.main:
        log.info("training %s on %d images (%d val), %d classes, %s, %d process(es)", opts.arch, len(train_ds),
                 len(val_ds), len(splits.classes), ctx.device, ctx.world)
    epoch = start - 1
    for epoch in range(start, opts.epochs):
        t0 = time.monotonic()
        if opts.freeze_backbone:
            transfer.set_backbone_frozen(net, opts.unfreeze_after == 0 or epoch < opts.unfreeze_after)
        _seed_all(opts.seed * 100_003 + epoch * 1009 + ctx.rank)  # this epoch's draws depend on nothing else
        seed_gen.manual_seed(opts.seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        with EpochBar(ctx.main and opts.progress, epoch, opts.epochs, len(train_loader)) as bar:
            sums = train_one_epoch(ddp, train_loader, criterion, optimizer, ctx.device, scaler, amp_dtype, bar)
        if ctx.world > 1:
            dist.all_reduce(sums)
        val = evaluate(model, val_loader, ctx.device, splits.classes, criterion, amp_dtype)
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums[0].item() / sums[2].item(),
               "train_accuracy": sums[1].item() / sums[2].item(), "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
               "seconds": round(time.monotonic() - t0, 3)}
        history.append(row)
        improved = stopper.update(row[f"val_{opts.monitor}"], epoch)
        if ctx.main:
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f macro-F1 %.4f  lr %.3g  %.1fs%s",
                     epoch + 1, opts.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
                     row["val_accuracy"], row["val_macro_f1"], lr, row["seconds"], "  *best*" if improved else "")
            meta = _meta(opts, splits, row, epoch + 1, epoch)
            kw = dict(arch=opts.arch, classes=splits.classes, spec=spec, arch_args=arch_args, name=opts.out.stem)
            if improved:
                save_checkpoint(opts.out, state_dict=net.state_dict(), meta=meta, **kw)
            save_checkpoint(last, state_dict=net.state_dict(), meta=meta | {"best_epoch": stopper.best_epoch + 1}, **kw)
            info = {"epoch": epoch + 1, "history": history, "early_stop": stopper.state(), "classes": splits.classes,
                    "spec": spec.to_dict(), "arch": opts.arch, "arch_args": arch_args,
                    "dataset_hash": splits.hash, "options": opts.to_json()}
            save_resume(run_dir / RESUME_NAME, model_state=net.state_dict(), optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, info=info)
            write_history(run_dir, history)
        if stopper.should_stop:
            if ctx.main:
                log.info("early stop: no better val %s for %d epochs", opts.monitor, opts.early_stop)
            break
    if ctx.world > 1:
        dist.barrier()
    if ctx.main:
        log.info("done in %.1fs: best epoch %d, val %s %.4f -> %s", time.monotonic() - t_start,
                 stopper.best_epoch + 1, opts.monitor, stopper.best, opts.out)
    best_row = history[stopper.best_epoch] if 0 <= stopper.best_epoch < len(history) else {}
    return TrainResult(opts.out, last, run_dir, len(history), stopper.best_epoch + 1,
                       {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}, history, ctx.main)


def _check_resume(resume: ResumeState, opts: TrainOptions, splits: DataSplits, spec: PreprocessSpec) -> None:
    info = resume.info
    if info["arch"] != opts.arch:
        raise UserError(f"--resume {resume.path}: that run trained {info['arch']!r}, not --arch {opts.arch!r}")
    if info["classes"] != splits.classes:
        raise UserError(f"--resume {resume.path}: classes {info['classes']} differ from the dataset's {splits.classes}")
    if info["dataset_hash"] != splits.hash:
        log.warning("--resume: the dataset changed since that run (hash %s -> %s)", info["dataset_hash"][:12],
                    splits.hash[:12])
