"""What a dataset holds, before a model is trained on it: counts, sizes, problems, a picture.

The numbers catch the usual mistakes early (an empty class, a 50:1 imbalance, the same
frame saved twice, a truncated JPEG); the contact sheet lets a person see the labels.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from visiond.data.manifest import SPLITS, Sample, check_images, classes_of, load_image
from visiond.errors import UserError
from visiond.fsutil import atomic_write

IMBALANCE_RATIO = 5.0
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class DatasetStats:
    """Plain figures for a table or JSON; `warnings` are sentences for a person."""

    total: int
    classes: list[str]
    counts: dict[str, dict[str, int]]          # label -> split ('' = unsplit) -> count
    sizes: dict[str, list[int]]                # min / median / max of [height, width]
    corrupt: list[dict] = field(default_factory=list)      # {path, reason}
    duplicates: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"total": self.total, "classes": self.classes, "counts": self.counts, "sizes": self.sizes,
                "corrupt": self.corrupt, "duplicates": self.duplicates, "warnings": self.warnings}


def _counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {c: {} for c in classes_of(samples)}
    for s in samples:
        counts[s.label][s.split] = counts[s.label].get(s.split, 0) + 1
    return counts


def _sizes(dataset_dir: Path, samples: list[Sample]) -> dict[str, list[int]]:
    hw = []
    for s in samples:
        img = load_image(dataset_dir, s)
        if img is not None:
            hw.append(img.shape[:2])
    if not hw:
        return {}
    hs, ws = [h for h, _ in hw], [w for _, w in hw]
    return {"min": [min(hs), min(ws)], "median": [int(statistics.median(hs)), int(statistics.median(ws))],
            "max": [max(hs), max(ws)]}


def _warnings(counts: dict[str, dict[str, int]], corrupt: list, duplicates: list) -> list[str]:
    out = []
    totals = {c: sum(v.values()) for c, v in counts.items()}
    if len(totals) < 2:
        out.append(f"{len(totals)} class(es): a classifier needs at least 2")
    elif min(totals.values()) and max(totals.values()) / min(totals.values()) > IMBALANCE_RATIO:
        big, small = max(totals, key=totals.get), min(totals, key=totals.get)
        out.append(f"imbalanced: {big!r} has {totals[big]} images, {small!r} only {totals[small]} "
                   f"(> {IMBALANCE_RATIO:g}x); consider --class-weights or more {small!r} images")
    used = [sp for sp in SPLITS if any(row.get(sp) for row in counts.values())]
    if used and len(used) < len(SPLITS):
        missing = [sp for sp in SPLITS if sp not in used]
        out.append(f"no images in split(s) {', '.join(missing)}; "
                   "run 'visiond dataset split' (--keep-test keeps a given test set)")
    for c, row in counts.items():
        missing = [sp for sp in used if not row.get(sp)]
        if missing:
            out.append(f"class {c!r} has no images in split(s) {', '.join(missing)}")
    if corrupt:
        out.append(f"{len(corrupt)} corrupt or missing image file(s) will be skipped")
    if duplicates:
        out.append(f"{len(duplicates)} group(s) of duplicate images (same sha256)")
    return out


def dataset_stats(dataset_dir: str | Path, samples: list[Sample]) -> DatasetStats:
    """Counts per class and split, image sizes, corrupt files, duplicates, warnings."""
    dataset_dir = Path(dataset_dir)
    ok, corrupt, duplicates = check_images(dataset_dir, samples)
    counts = _counts(samples)
    return DatasetStats(
        total=len(samples), classes=classes_of(samples), counts=counts, sizes=_sizes(dataset_dir, ok),
        corrupt=[{"path": s.path, "reason": why} for s, why in corrupt],
        duplicates=[[s.path for s in group] for group in duplicates],
        warnings=_warnings(counts, corrupt, duplicates))


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        from visiond.preprocess import to_uint8
        image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _tile(image: np.ndarray, caption: str, tile: int, caption_h: int) -> np.ndarray:
    """The image scaled to fit a tile x tile square (pixelated when small) above its caption."""
    img = _as_bgr(image)
    h, w = img.shape[:2]
    scale = tile / max(h, w)
    interp = cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
    out = np.full((tile + caption_h, tile, 3), 255, np.uint8)
    y, x = (tile - img.shape[0]) // 2, (tile - img.shape[1]) // 2
    out[y:y + img.shape[0], x:x + img.shape[1]] = img
    text = caption
    while text and cv2.getTextSize(text, _FONT, 0.35, 1)[0][0] > tile - 4:
        text = text[:-1]
    cv2.putText(out, text, (2, tile + caption_h - 5), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def contact_sheet_images(images: list[tuple[np.ndarray, str]], out_png: str | Path,
                         columns: int = 8, tile: int = 96) -> Path:
    """A grid PNG of (image, caption) pairs; images are BGR, BGRA or grey as cv2 decodes them."""
    if not images:
        raise UserError(f"{out_png}: no images to draw")
    columns = max(1, min(columns, len(images)))
    caption_h = 16
    tiles = [_tile(img, cap, tile, caption_h) for img, cap in images]
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    sheet = np.vstack(rows)
    ok, buf = cv2.imencode(".png", sheet)
    if not ok:
        raise UserError(f"{out_png}: cannot encode the contact sheet")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, buf.tobytes())
    return out_png


def contact_sheet(dataset_dir: str | Path, samples: list[Sample], out_png: str | Path,
                  per_class: int = 8, seed: int = 0) -> Path:
    """One row per class, up to per_class readable random samples each, captioned with the label."""
    rng = random.Random(seed)
    tiles: list[tuple[np.ndarray, str]] = []
    for label in classes_of(samples):
        group = [s for s in samples if s.label == label]
        rng.shuffle(group)
        row = []
        for s in group:
            img = load_image(dataset_dir, s)
            if img is not None:
                row.append((img, label))
            if len(row) == per_class:
                break
        blank = np.full((8, 8), 255, np.uint8)
        tiles += row + [(blank, "")] * (per_class - len(row))
    if not any(cap for _, cap in tiles):
        raise UserError(f"{dataset_dir}: no readable images for a contact sheet")
    return contact_sheet_images(tiles, out_png, columns=per_class)
