"""What one training run is asked to do (TrainOptions), what it hands back, and when it stops.

One plain dataclass instead of an argparse namespace passed everywhere: the CLI fills it,
tests build it directly, and `validate` fails before any work, naming the valid choices.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from visiond.config import NAME_PATTERN
from visiond.data.augment import DEFAULT_PRESET, PRESETS
from visiond.errors import UserError
from visiond.models.arch import ARCHITECTURES
from visiond.train.data import CLASS_WEIGHTS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
MONITORS = ("macro_f1", "accuracy")
BASELINES = ("knn",)
_MODEL_NAME = re.compile(NAME_PATTERN)


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
    name: str | None = None              # the model line's name; default: the init model's, else the dataset's
    extra_meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("weights", "resume", "init_from"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.defect_classes = tuple(self.defect_classes)

    def validate(self) -> None:
        """Fail before any work, naming the valid choices."""
        choices = {"arch": (self.arch, tuple(dict.fromkeys(ARCHITECTURES + BASELINES))),
                   "optimizer": (self.optimizer, OPTIMIZERS),
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
        if self.name is not None and not _MODEL_NAME.match(self.name):
            checks.append((False, f"--name {self.name!r}: expected 1-64 letters, digits, '_', '.' or '-'"))
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: no CUDA device is available here; use auto or cpu")

    def model_name(self) -> str:
        """The name predictions and status/detail carry: a property of the model line, never of the
        output file (a candidate.ckpt promoted into service is still the line's model; its version differs)."""
        if self.name:
            return self.name
        if self.init_from is not None:
            from visiond.models.checkpoint import read_header

            inherited = str(read_header(self.init_from).get("name") or "")
            if _MODEL_NAME.match(inherited):
                return inherited
        root = self.data.resolve()
        stem = root.name if root.is_dir() else root.stem
        cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")[:64]
        return cleaned or "model"

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
