"""Training, read top to bottom like torchvision's references: load_data, then train, epoch by epoch
(`train_one_epoch` and `evaluate` live in engine.py, shared with the knn baseline).

One process or many (`torchrun`, DDP): only rank 0 writes files and draws the bar.
Every epoch reseeds from (seed, epoch, rank), so a resumed run repeats the exact
random draws an uninterrupted one would have made.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from visiond.data.augment import build_augmentation
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.preprocess import PreprocessSpec
from visiond.train import calibrate, recipe, transfer
from visiond.train.baseline import train_baseline
from visiond.train.data import DataSplits, ImageDataset, inverse_frequency_weights, load_splits
from visiond.train.ema import ModelEMA
from visiond.train.engine import TrainableModel, evaluate, train_one_epoch
from visiond.train.options import BASELINES, EarlyStopping, TrainOptions, TrainResult  # noqa: F401 (re-exported)
from visiond.train.progress import EpochBar
from visiond.train.state import RESUME_NAME, ResumeState, resume_path_for, save_resume

__all__ = ["TrainOptions", "TrainResult", "TrainableModel", "train_one_epoch", "evaluate", "load_data", "train"]

log = logging.getLogger(__name__)


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
class _Run:
    """What one run holds between epochs."""

    opts: TrainOptions
    procs: recipe.Processes
    splits: DataSplits
    spec: PreprocessSpec
    net: nn.Module
    arch_args: dict
    model: TrainableModel
    ddp: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    stopper: EarlyStopping
    history: list
    start: int
    loaders: tuple
    seed_gen: torch.Generator
    amp_dtype: torch.dtype | None
    name: str  # the model line's name, resolved once (it may read the --init-from header)
    ema: ModelEMA | None  # the weights' moving average: what is validated and saved
    eval_model: TrainableModel  # the model validation runs: the average's, else the trained one

    def saved_state(self) -> dict:
        """The weights that go into the checkpoints."""
        return (self.ema.module if self.ema is not None else self.net).state_dict()


def train(opts: TrainOptions) -> TrainResult:
    """Train a model from a dataset directory (or class-folder tree) into `opts.out`."""
    opts.validate()
    procs = recipe.init_processes(opts.device)
    try:
        if opts.arch in BASELINES:
            return train_baseline(opts, procs)
        t0 = time.monotonic()
        run = _prepare(opts, procs)
        for epoch in range(run.start, opts.epochs):
            row = _run_epoch(run, epoch)
            improved = run.stopper.update(row[f"val_{opts.monitor}"], epoch)
            # rank 0 decides: the ranks' figures can differ in the last bit, and a rank stopping alone hangs the rest
            improved, stop = recipe.rank0_decides(procs, improved, run.stopper.should_stop)
            if procs.main:
                _log_epoch(run, row, improved)
                _save_epoch(run, row, improved)
            if stop:
                log.info("early stop: no better val %s for %d epochs", opts.monitor, opts.early_stop)
                break
        if procs.world > 1:
            dist.barrier()
        if procs.main:  # calib (issue 14): fit the softmax temperature on the val split, stored in the checkpoint
            calibrate.calibrate_checkpoint(opts.out, run.splits.root, run.splits.val, procs.device)
        return _result(run, time.monotonic() - t0)
    finally:
        procs.close()


def _prepare(opts: TrainOptions, procs: recipe.Processes) -> _Run:
    """Data, network (fresh, ImageNet, fine-tune or resumed), optimizer, schedule, loaders."""
    init = load_checkpoint(opts.init_from) if opts.init_from else None
    resume = ResumeState(resume_path_for(opts.resume)) if opts.resume else None
    known = resume.info["classes"] if resume else (list(init.classes) if init else None)
    splits = load_splits(opts.data, classes=known)  # fixed split seed: evaluate must see the same test set
    spec = PreprocessSpec.from_dict(resume.info["spec"]) if resume else recipe.preprocess_spec(opts, init, splits)
    augment, why = splits.augmentation(opts.augment)
    # as recorded in the checkpoint (TTA reads the augmentation the model was trained with)
    opts = dataclasses.replace(opts, image_size=spec.height, grayscale=spec.color == "gray", augment=augment)
    recipe.seed_all(opts.seed)
    net, arch_args = recipe.build_network(opts, splits.classes, spec, init)
    if resume:
        _check_resume(resume, opts, splits)
        net.load_state_dict(resume.model_state)
    cuda = procs.device.type == "cuda"
    # channels_last on CPU too: the small CNN's training step is 4x faster on 2 cores
    model = TrainableModel(net, spec, channels_last=True).to(procs.device).to(memory_format=torch.channels_last)
    transfer.set_batchnorm_frozen(net, opts.batchnorm_frozen())
    train_ds, val_ds = load_data(opts, splits, spec)
    weight = inverse_frequency_weights(train_ds.labels, len(splits.classes)).to(procs.device) \
        if opts.class_weights == "loss" else None
    seed_gen = torch.Generator()
    loaders = recipe.make_loaders(opts, train_ds, val_ds, procs, seed_gen)
    optimizer = recipe.make_optimizer(opts, net)
    scheduler = recipe.make_scheduler(opts, optimizer, len(loaders[1]))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    ema = ModelEMA(net, opts.ema) if opts.ema else None
    if resume:
        resume.apply(optimizer, scheduler, scaler)
        if ema is not None and resume.ema_state is not None:
            ema.load_state_dict(resume.ema_state, resume.info.get("ema_updates", 0))
        log.info("resuming %s at epoch %d of %d", resume.path, resume.info["epoch"] + 1, opts.epochs)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=opts.freeze_backbone) \
        if procs.world > 1 else model
    if procs.main:
        log.info("training %s on %d images (%d val), %d classes, %s, %d process(es)", opts.arch, len(train_ds),
                 len(val_ds), len(splits.classes), procs.device, procs.world)
        log.info("recipe: %dx%d %s, %s lr %.3g%s, weight decay %.3g, warm-up %d steps then %s, label smoothing "
                 "%.2g, grad clip %s, EMA %s, BatchNorm %s, augmentation %s", spec.height, spec.width, spec.color,
                 opts.optimizer, opts.resolved_lr(), f" (backbone x{opts.backbone_lr:g})" if opts.from_weights else "",
                 opts.resolved_weight_decay(), recipe.warmup_steps(opts, len(loaders[1])), opts.scheduler,
                 opts.label_smoothing, opts.grad_clip or "off", opts.ema or "off",
                 "frozen" if opts.batchnorm_frozen() else "trained", f"{opts.augment} ({why})" if why else opts.augment)
    eval_model = TrainableModel(ema.module, spec, channels_last=True).to(procs.device) if ema is not None else model
    return _Run(opts, procs, splits, spec, net, arch_args, model, ddp,
                nn.CrossEntropyLoss(weight=weight, label_smoothing=opts.label_smoothing), optimizer, scheduler,
                scaler, EarlyStopping(opts.early_stop, resume.info["early_stop"] if resume else None),
                list(resume.info["history"]) if resume else [], resume.info["epoch"] if resume else 0,
                loaders, seed_gen, torch.float16 if cuda else None, opts.model_name(), ema, eval_model)


def _run_epoch(run: _Run, epoch: int) -> dict:
    """Train one epoch and validate; the history row."""
    opts, procs = run.opts, run.procs
    t0 = time.monotonic()
    if opts.freeze_backbone:
        transfer.set_backbone_frozen(run.net, opts.unfreeze_after == 0 or epoch < opts.unfreeze_after)
    recipe.seed_all(recipe.epoch_seed(opts.seed, epoch, procs.rank))
    run.seed_gen.manual_seed(recipe.epoch_seed(opts.seed, epoch))
    sampler, train_loader, val_loader = run.loaders
    sampler.set_epoch(epoch)
    lr = max(g["lr"] for g in run.optimizer.param_groups)  # the head's, at the epoch's start
    with EpochBar(procs.main and opts.progress, epoch, opts.epochs, len(train_loader)) as bar:
        sums = train_one_epoch(run.ddp, train_loader, run.criterion, run.optimizer, procs.device, run.scaler,
                               run.amp_dtype, bar, scheduler=run.scheduler, grad_clip=opts.grad_clip, ema=run.ema)
    if procs.world > 1:
        dist.all_reduce(sums)
    sums = sums.cpu()
    val = evaluate(run.eval_model, val_loader, procs.device, run.splits.classes, run.criterion, run.amp_dtype)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums[0].item() / sums[2].item(),
           "train_accuracy": sums[1].item() / sums[2].item(), "val_loss": val["loss"],
           "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
           "seconds": round(time.monotonic() - t0, 3)}
    run.history.append(row)
    return row


def _log_epoch(run: _Run, row: dict, improved: bool) -> None:
    log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f macro-F1 %.4f  lr %.3g  %.1fs%s",
             row["epoch"], run.opts.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
             row["val_accuracy"], row["val_macro_f1"], row["lr"], row["seconds"], "  *best*" if improved else "")


def _save_epoch(run: _Run, row: dict, improved: bool) -> None:
    """Best and last checkpoints, the resume file and the history; rank 0 only."""
    opts, state = run.opts, run.saved_state()
    meta = recipe.checkpoint_meta(opts, run.splits, row, row["epoch"], run.stopper.best_epoch + 1)
    kw = dict(arch=opts.arch, classes=run.splits.classes, spec=run.spec, arch_args=run.arch_args,
              name=run.name, state_dict=state, meta=meta)
    if improved:
        save_checkpoint(opts.out, **kw)
    save_checkpoint(recipe.last_path_for(opts.out), **kw)
    info = {"epoch": row["epoch"], "history": run.history, "early_stop": run.stopper.state(),
            "classes": run.splits.classes, "spec": run.spec.to_dict(), "arch": opts.arch,
            "arch_args": run.arch_args, "dataset_hash": run.splits.hash, "options": opts.to_json(),
            "ema_updates": run.ema.updates if run.ema is not None else 0}
    run_dir = recipe.run_dir_for(opts.out)
    save_resume(run_dir / RESUME_NAME, model_state=run.net.state_dict(), optimizer=run.optimizer,
                scheduler=run.scheduler, scaler=run.scaler, info=info,
                ema_state=run.ema.state_dict() if run.ema is not None else None)
    recipe.write_history(run_dir, run.history)


def _result(run: _Run, seconds: float) -> TrainResult:
    opts, best = run.opts, run.stopper.best_epoch
    if run.procs.main:
        log.info("done in %.1fs: best epoch %d, val %s %.4f -> %s", seconds, best + 1, opts.monitor,
                 run.stopper.best, opts.out)
    row = run.history[best] if 0 <= best < len(run.history) else {}
    return TrainResult(opts.out, recipe.last_path_for(opts.out), recipe.run_dir_for(opts.out), len(run.history),
                       best + 1, {k[4:]: v for k, v in row.items() if k.startswith("val_")}, run.history,
                       run.procs.main)


def _check_resume(resume: ResumeState, opts: TrainOptions, splits: DataSplits) -> None:
    info = resume.info
    if info["arch"] != opts.arch:
        raise UserError(f"--resume {resume.path}: that run trained {info['arch']!r}, not --arch {opts.arch!r}")
    if info["classes"] != splits.classes:
        raise UserError(f"--resume {resume.path}: classes {info['classes']} differ from the dataset's {splits.classes}")
    if info["options"]["epochs"] != opts.epochs:
        log.warning("--resume: that run planned %d epochs, now %d; its learning-rate schedule keeps its "
                    "original length", info["options"]["epochs"], opts.epochs)
    if info["dataset_hash"] != splits.hash:
        log.warning("--resume: the dataset changed since that run (hash %s -> %s)", info["dataset_hash"][:12],
                    splits.hash[:12])
