"""Training data: samples from a dataset directory (or a plain class-folder tree) as uint8 tensors.

Every image goes through the daemon's own steps — decode with OpenCV (IMREAD_UNCHANGED),
`resize_uint8(img, spec)` — before the training-only augmentation. Normalisation is not
done here: the model wrapper applies `visiond.preprocess.Normalizer` on the device, the
same module the runtime uses, so training and serving cannot drift apart.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from visiond.data.augment import resolve_auto
from visiond.data.manifest import (
    DISCARDED_DIR,
    INBOX_DIR,
    SPLITS,
    Sample,
    classes_of,
    dataset_hash,
    load_image,
    manifest_path,
    read_manifest,
)
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.preprocess import PreprocessSpec, resize_uint8
from visiond.train.membership import membership_meta
from visiond.video import IMAGE_EXTS, is_image_path

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 1 << 30  # decoded, resized images kept in memory up to this size
CLASS_WEIGHTS = ("none", "loss", "balanced")


@dataclass(frozen=True)
class DataSplits:
    """The samples of one dataset by split, with the class order the model will use."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    hash: str

    def augmentation(self, preset: str) -> tuple[str, str]:
        """(preset, why): `auto` resolved for this training split (`data.augment.resolve_auto`), else as given."""
        return resolve_auto(preset, self.class_counts()["train"].values())

    @functools.cached_property
    def membership(self) -> dict:
        """The checkpoint's record of the train and val images, computed once per run (files may need hashing)."""
        return membership_meta(self.root, self.train, self.val)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """split -> label -> count, for the checkpoint metadata."""
        out = {}
        for split in SPLITS:
            counts = Counter(s.label for s in getattr(self, split))
            out[split] = {c: counts.get(c, 0) for c in self.classes}
        return out


def scan_class_folders(root: Path) -> list[Sample]:
    """A plain `root/<label>/**/image` tree as unsplit samples (paths relative to root)."""
    samples = []
    reserved = {INBOX_DIR, DISCARDED_DIR}  # unlabelled and thrown-out frames are no class
    for label_dir in sorted(p for p in root.iterdir()
                            if p.is_dir() and not p.name.startswith(".") and p.name not in reserved):
        for path in sorted(label_dir.rglob("*")):
            if path.is_file() and is_image_path(path):
                samples.append(Sample(path.relative_to(root).as_posix(), label_dir.name, source="folder"))
    return samples


def load_splits(dataset_dir: str | Path, classes: list[str] | None = None, seed: int = 0) -> DataSplits:
    """Read a dataset directory (manifest.csv) or a class-folder tree and split what is unsplit.

    Unsplit samples get a stratified split (70/15/15) from `visiond.data.split`, seeded, so a
    folder trains the same way every time; `classes` fixes the class order (e.g. from a
    checkpoint being fine-tuned), new labels are appended in sorted order.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; expected a dataset directory or class subfolders of images")
    if manifest_path(root).exists():
        samples = read_manifest(root)
    else:
        samples = scan_class_folders(root)
        if not samples:
            raise UserError(f"{root}: no manifest.csv and no class subfolders with images "
                            f"({', '.join(IMAGE_EXTS)})")
    samples = _split_unsplit(samples, seed)
    known = list(classes or [])
    classes = known + [c for c in classes_of(samples) if c not in known]
    if len(classes) < 2:
        raise UserError(f"{root}: {len(classes)} class(es) {classes}; a classifier needs at least 2")
    by_split = {sp: [s for s in samples if s.split == sp] for sp in SPLITS}
    if by_split["train"] and not by_split["val"] and len(by_split["train"]) >= 20:
        by_split["train"], by_split["val"] = _carve_val(by_split["train"], seed)
    return DataSplits(root, classes, by_split["train"], by_split["val"], by_split["test"], dataset_hash(samples))


def _split_unsplit(samples: list[Sample], seed: int) -> list[Sample]:
    unsplit = [s for s in samples if not s.split]
    if not unsplit:
        return samples
    log.warning("%d sample(s) have no split; assigning a stratified 70/15/15 split (seed %d) in memory "
                "(use 'visiond dataset split' to fix it in the manifest)", len(unsplit), seed)
    return split_dataset(samples, seed=seed)  # rows with a split keep it


def _carve_val(train: list[Sample], seed: int, fraction: float = 0.1) -> tuple[list[Sample], list[Sample]]:
    """No val split (e.g. an import with only train/test): hold out a stratified tenth of train,
    the same tenth every time, so model selection never peeks at the test split."""
    log.info("no val split: holding out a stratified %.0f%% of train (%d images) for validation",
             fraction * 100, round(len(train) * fraction))
    assigned = split_dataset(train, 1 - fraction, fraction, 0.0, seed=seed, reshuffle=True)  # all rows say "train"
    return [s for s in assigned if s.split == "train"], [s for s in assigned if s.split == "val"]


def stored_image_shape(root: Path, samples: list[Sample], n: int = 32) -> tuple[int, int, int] | None:
    """(median height, median width, 1 if every one is stored grey else 3) over up to `n` evenly
    spaced readable samples; None when none is readable. What the default input size and colour
    follow (`recipe.preprocess_spec`)."""
    step = max(1, len(samples) // n)
    shapes = []
    for s in samples[::step][:n]:
        img = load_image(root, s)
        if img is not None and img.ndim in (2, 3):
            shapes.append((img.shape[0], img.shape[1], 1 if img.ndim == 2 or img.shape[2] == 1 else 3))
    if not shapes:
        return None
    hs, ws, cs = zip(*shapes)
    return int(np.median(hs)), int(np.median(ws)), 1 if max(cs) == 1 else 3


def _decode(root: Path, sample: Sample, spec: PreprocessSpec) -> np.ndarray | None:
    img = load_image(root, sample)
    if img is None:
        return None
    try:
        return resize_uint8(img, spec)
    except (ValueError, cv2.error) as exc:  # e.g. a 2-channel TIFF
        log.debug("%s: %s", sample.path, exc)
        return None


class ImageDataset(Dataset):
    """Samples as (uint8 C x H x W tensor, class index); corrupt files are reported and left out.

    Every file is decoded once up front (that is how corrupt ones are found); when the
    resized images fit in `cache_bytes` they stay in memory, which on a small box makes
    an epoch cost the network, not the JPEG decoder.
    """

    def __init__(self, root: Path, samples: list[Sample], classes: list[str], spec: PreprocessSpec,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 cache_bytes: int = CACHE_BUDGET_BYTES, threads: int | None = None):
        self.root, self.spec, self.augment = Path(root), spec, augment
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({s.label for s in samples} - set(index))
        if unknown:
            log.warning("skipping samples of classes %s that the model does not have %s", unknown, classes)
        samples = [s for s in samples if s.label in index]
        per_image = spec.height * spec.width * spec.channels
        keep = len(samples) * per_image <= cache_bytes
        with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(lambda s: _decode(self.root, s, spec), samples, chunksize=64))
        self.skipped = [s for s, img in zip(samples, decoded) if img is None]
        for s in self.skipped[:20]:
            log.warning("skipping unreadable or corrupt image %s", self.root / s.path)
        if len(self.skipped) > 20:
            log.warning("... and %d more unreadable images", len(self.skipped) - 20)
        ok = [i for i, img in enumerate(decoded) if img is not None]
        self.samples = [samples[i] for i in ok]
        self.labels = np.array([index[s.label] for s in self.samples], dtype=np.int64)
        self._cache = np.stack([decoded[i] for i in ok]) if keep and ok else None

    def __len__(self) -> int:
        return len(self.samples)

    def image_hwc(self, i: int) -> np.ndarray:
        """The uint8 H x W x C image exactly as the daemon would hand it to the model."""
        if self._cache is not None:
            return self._cache[i]
        img = _decode(self.root, self.samples[i], self.spec)
        if img is None:
            raise UserError(f"{self.root / self.samples[i].path}: became unreadable during training")
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.image_hwc(i))).permute(2, 0, 1).contiguous()
        if self.augment is not None:
            x = _one_thread(self.augment, x)
        return x, int(self.labels[i])


def _one_thread(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run a per-image transform on one intra-op thread: on a tiny image, waking the thread
    pool costs more than the work (RandomAffine on 32x32: 6.5 ms with 2 threads, 0.23 ms with 1)."""
    n = torch.get_num_threads()
    if n == 1:
        return fn(x)
    torch.set_num_threads(1)
    try:
        return fn(x)
    finally:
        torch.set_num_threads(n)


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-class loss weights ~ 1/count, mean 1 over present classes, so rare defects count."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    present = counts > 0
    w[present] *= present.sum() / w[present].sum()
    return torch.tensor(w, dtype=torch.float32)


class BalancedSampler(Sampler[int]):
    """Draws indices with replacement so every class is equally likely; rank-aware like
    DistributedSampler (same draw on every rank, each takes its own stride)."""

    def __init__(self, labels: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        counts = np.bincount(labels)
        self.weights = torch.tensor(1.0 / counts[labels], dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(labels) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        idx = torch.multinomial(self.weights, total, replacement=True, generator=g).tolist()
        return iter(idx[self.rank:total:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
