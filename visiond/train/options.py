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
from visiond.data.augment import DEFAULT_PRESET, preset_choices
from visiond.errors import UserError
from visiond.models.arch import ARCHITECTURES
from visiond.train.data import CLASS_WEIGHTS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
MONITORS = ("macro_f1", "accuracy")
BATCHNORM = ("auto", "train", "freeze")
SMALL_BATCH = 16  # below this many images per process, batch statistics of pretrained BatchNorm are too noisy
BASELINES = ("knn", "svm")
_MODEL_NAME = re.compile(NAME_PATTERN)


@dataclass
class TrainOptions:
    """Everything one training run needs; the CLI fills it, tests build it directly."""

    data: Path
    out: Path
    arch: str = "smallcnn"
    epochs: int = 10
    batch_size: int = 32
    image_size: int | None = None        # default: the weights' (224), the --init-from model's, else 64
                                         # (or the images' own size, rounded up to 8, when they are smaller)
    grayscale: bool | None = None        # default: grey when the training images are stored grey
    weights: Path | None = None          # torchvision ImageNet state dict file
    freeze_backbone: bool = False
    unfreeze_after: int = 0              # with freeze_backbone: epochs frozen (0 = frozen throughout)
    lr: float | None = None              # default: adamw 2e-3 (1e-3 from weights), sgd 10x
    weight_decay: float | None = None    # default: 0.05 adamw, 5e-4 sgd (never on biases and norm scales)
    optimizer: str = "adamw"
    scheduler: str = "cosine"            # per step, after the warm-up
    warmup_epochs: float = 1.0           # linear warm-up, at most a fifth of the run
    backbone_lr: float = 0.1             # from weights: the pretrained layers' lr, as a fraction of the head's
    grad_clip: float = 1.0               # max global gradient norm (0 = off)
    ema: float = 0.999                   # decay of the weights' moving average used to validate and save (0 = off)
    batchnorm: str = "auto"              # auto (frozen from weights below 16 images a batch) | train | freeze
    label_smoothing: float = 0.1
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
    svm_kernel: str = "rbf"              # --arch svm: rbf (libsvm SVC) or linear (liblinear LinearSVC)
    svm_c: float = 10.0                  # --arch svm: the SVM's C (less = wider margin, more regularised)
    svm_max_train: int = 10000           # --arch svm: training images kept (a stratified subset), bounds fit time
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
                   "monitor": (self.monitor, MONITORS), "augment": (self.augment, preset_choices()),
                   "batchnorm": (self.batchnorm, BATCHNORM)}
        for opt, (value, valid) in choices.items():
            if value not in valid:
                raise UserError(f"--{opt} {value!r}: expected one of {', '.join(valid)}")
        if self.arch in BASELINES and self.arch not in ARCHITECTURES:
            raise UserError(f"--arch {self.arch}: this visiond build does not register the baseline "
                            "in visiond.models.arch, so its checkpoint cannot be saved")
        checks = [(self.epochs >= 1, f"--epochs {self.epochs}: expected >= 1"),
                  (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected >= 1"),
                  (self.image_size is None or 8 <= self.image_size <= 4096,
                   f"--image-size {self.image_size}: expected 8..4096"),
                  (self.arch in ("smallcnn", *BASELINES) or self.image_size is None or self.image_size >= 32,
                   f"--image-size {self.image_size}: {self.arch} needs at least 32 pixels"),
                  (self.lr is None or self.lr > 0, f"--lr {self.lr}: expected > 0"),
                  (self.weight_decay is None or self.weight_decay >= 0,
                   f"--weight-decay {self.weight_decay}: expected >= 0"),
                  (0 <= self.warmup_epochs <= self.epochs, f"--warmup-epochs {self.warmup_epochs}: expected 0..epochs"),
                  (0 < self.backbone_lr <= 1, f"--backbone-lr {self.backbone_lr}: expected a fraction 0..1 of --lr"),
                  (self.grad_clip >= 0, f"--grad-clip {self.grad_clip}: expected >= 0 (0 = off)"),
                  (0 <= self.ema < 1, f"--ema {self.ema}: expected a decay 0..1 (0 = off), e.g. 0.999"),
                  (0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: expected 0..1"),
                  (self.early_stop >= 0, f"--early-stop {self.early_stop}: expected >= 0 epochs"),
                  (self.weights is None or self.arch not in ("smallcnn", "knn"),
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

    @property
    def from_weights(self) -> bool:
        """Starts from trained weights (ImageNet or a visiond checkpoint): the fine-tuning recipe applies."""
        return self.weights is not None or self.init_from is not None

    def resolved_lr(self) -> float:
        """The head's learning rate: AdamW 2e-3 from scratch, 1e-3 from weights; SGD ten times that."""
        if self.lr:
            return self.lr
        return (1e-3 if self.from_weights else 2e-3) * (1 if self.optimizer == "adamw" else 10)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 5e-4

    def batchnorm_frozen(self) -> bool:
        """BatchNorm layers keep their running statistics (eval mode) while the rest trains."""
        if self.batchnorm == "auto":
            return self.from_weights and self.batch_size < SMALL_BATCH
        return self.batchnorm == "freeze"

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
