"""Generated images of circles, squares and triangles: a dataset any test can make in a second.

The shapes vary in position, size, colour and background so a classifier has to learn
the shape, not a pixel; shared by the data and training tests.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from visiond.data.manifest import Sample, add_image, read_manifest, write_manifest
from visiond.data.split import split_dataset

CLASSES = ("circle", "square", "triangle")


def draw_shape(kind: str, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """One BGR uint8 size x size image with one filled shape of the given kind."""
    rng = rng or np.random.default_rng()
    bg = int(rng.integers(0, 80))
    img = np.full((size, size, 3), bg, np.uint8)
    color = tuple(int(c) for c in rng.integers(140, 256, 3))
    r = int(rng.integers(size // 5, size // 3 + 1))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
    elif kind == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA)
    else:
        raise ValueError(f"shape {kind!r}: expected one of {CLASSES}")
    return img


def make_shapes_dataset(dataset_dir: str | Path, per_class: int = 30, size: int = 32, seed: int = 0,
                        sessions: int = 0, classes: tuple[str, ...] = CLASSES) -> list[Sample]:
    """Write images + manifest for a shapes dataset; with sessions > 0 each sample gets extra['session']."""
    rng = np.random.default_rng(seed)
    samples = []
    for kind in classes:
        for i in range(per_class):
            extra = {"session": f"s{i % sessions}"} if sessions else {}
            samples.append(add_image(dataset_dir, draw_shape(kind, size, rng), kind, source="shapes", extra=extra))
    write_manifest(dataset_dir, samples)
    return samples


def make_split_shapes_dataset(dataset_dir: str | Path, per_class: int = 30, size: int = 32, seed: int = 0,
                              fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """A shapes dataset split train/val/test by `fractions` (split seed 0), as the training tests use it."""
    make_shapes_dataset(dataset_dir, per_class=per_class, size=size, seed=seed)
    write_manifest(dataset_dir, split_dataset(read_manifest(dataset_dir), *fractions, seed=0))
    return Path(dataset_dir)
