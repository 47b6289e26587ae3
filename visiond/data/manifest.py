"""The dataset directory: images plus one CSV manifest that says what each image is.

Layout: ``DATASET_DIR/manifest.csv`` and ``DATASET_DIR/images/<label>/<name>.<ext>``
(unlabelled captures wait in ``DATASET_DIR/inbox/``). The manifest is the single
source of truth for labels and splits, so training, evaluation and the labelling
page all read the same file, and its hash goes into the checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Iterable, NamedTuple

import cv2
import numpy as np

from visiond.errors import UserError
from visiond.fsutil import atomic_write_text

MANIFEST_NAME = "manifest.csv"
IMAGES_DIR = "images"
INBOX_DIR = "inbox"
DISCARDED_DIR = "discarded"  # frames thrown out on the labelling page; never trained on
COLUMNS = ("path", "label", "split", "source", "captured_at", "sha256")
SPLITS = ("train", "val", "test")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_BAD_LABEL_RE = re.compile(r"[/\\\x00-\x1f]")


@dataclass
class Sample:
    """One manifest row: an image file (relative POSIX path) and what it is."""

    path: str
    label: str
    split: str = ""
    source: str = ""
    captured_at: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict)

    def field_value(self, name: str) -> str:
        """A manifest column or free metadata field by name ('' when absent), for --group-by."""
        if name in COLUMNS:
            return getattr(self, name)
        return str(self.extra.get(name, ""))


class ImageCheck(NamedTuple):
    """What `check_images` found: readable samples, (sample, reason) pairs, duplicate groups."""

    ok: list
    corrupt: list
    duplicates: list


def manifest_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def validate_label(label: str) -> str:
    """Labels become directory names, so they must be safe path components."""
    label = label.strip()
    if not label or label in (".", "..") or _BAD_LABEL_RE.search(label):
        raise UserError(f"label {label!r}: expected a non-empty name without '/', '\\' or control characters")
    return label


def _check_path(rel: str, where: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise UserError(f"{where}: path {rel!r}: expected a relative POSIX path inside the dataset directory")
    return str(p)


def _check_time(value: str, where: str) -> str:
    if value:
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise UserError(f"{where}: captured_at {value!r}: expected an RFC 3339 time or empty") from None
    return value


def _row_to_sample(row: list[str], header: list[str], where: str) -> Sample:
    if len(row) != len(header):
        raise UserError(f"{where}: {len(row)} fields, expected {len(header)} (the header's columns)")
    values = dict(zip(header, row))
    split = values["split"].strip()
    if split not in ("",) + SPLITS:
        raise UserError(f"{where}: split {split!r}: expected one of train, val, test or empty")
    sha = values["sha256"].strip().lower()
    if sha and not _SHA_RE.match(sha):
        raise UserError(f"{where}: sha256 {sha!r}: expected 64 hex digits or empty")
    try:
        label = validate_label(values["label"])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    extra = {k: values[k] for k in header[len(COLUMNS):]}
    return Sample(_check_path(values["path"].strip(), where), label, split, values["source"],
                  _check_time(values["captured_at"].strip(), where), sha, extra)


def read_manifest(dataset_dir: str | Path) -> list[Sample]:
    """All samples of a dataset, in file order; a malformed file names its line."""
    path = manifest_path(dataset_dir)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest; expected a dataset directory (try 'visiond dataset import')") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read manifest: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:len(COLUMNS)]) != COLUMNS:
            raise UserError(f"{path}:1: header {header}: expected columns {','.join(COLUMNS)} first")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise UserError(f"{path}:1: duplicate column names in the header")
        samples = [_row_to_sample(row, header, f"{path}:{reader.line_num}") for row in reader if row]
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    return samples


def _extra_columns(samples: Iterable[Sample]) -> list[str]:
    seen: dict[str, None] = {}
    for s in samples:
        for k in s.extra:
            if k not in COLUMNS:
                seen.setdefault(k, None)
    return list(seen)


def write_manifest(dataset_dir: str | Path, samples: list[Sample]) -> Path:
    """Write the manifest atomically: a crash leaves the old file or the new one, never half."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    extras = _extra_columns(samples)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(COLUMNS) + extras)
    for s in samples:
        w.writerow([s.path, s.label, s.split, s.source, s.captured_at, s.sha256]
                   + [s.extra.get(k, "") for k in extras])
    target = manifest_path(dataset_dir)
    atomic_write_text(target, buf.getvalue())
    return target


def classes_of(samples: Iterable[Sample]) -> list[str]:
    """Class names in index order: sorted, so the same dataset always gives the same indices."""
    return sorted({s.label for s in samples})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sniff_ext(data: bytes) -> str:
    """The file extension from the leading bytes, so a written file opens in any viewer."""
    magic = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"BM": ".bmp", b"II*\x00": ".tif",
             b"MM\x00*": ".tif", b"P5": ".pgm", b"P6": ".ppm"}
    for prefix, ext in magic.items():
        if data.startswith(prefix):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".bin"


def encode_image(image: np.ndarray, ext: str = ".png") -> bytes:
    """A decoded image (BGR, BGRA or grey) as file bytes; PNG keeps pixels exact."""
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise UserError(f"cannot encode image of shape {image.shape} as {ext}")
    return buf.tobytes()


def add_image(dataset_dir: str | Path, image: np.ndarray | bytes, label: str, source: str = "", *,
              split: str = "", captured_at: str = "", extra: dict | None = None, ext: str = ".png") -> Sample:
    """Store one image under images/<label>/ with a content-addressed name and return its row.

    The name is the sha256 prefix, so adding the same picture twice writes one file;
    the caller appends the returned Sample to the manifest. Bytes are stored as given.
    """
    label = validate_label(label)
    if split not in ("",) + SPLITS:
        raise UserError(f"split {split!r}: expected one of train, val, test or empty")
    data = image if isinstance(image, (bytes, bytearray)) else encode_image(image, ext)
    data = bytes(data)
    sha = sha256_bytes(data)
    suffix = _sniff_ext(data) if isinstance(image, (bytes, bytearray)) else ext
    rel = f"{IMAGES_DIR}/{label}/{sha[:20]}{suffix}"
    target = Path(dataset_dir) / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return Sample(rel, label, split, source, captured_at, sha, dict(extra or {}))


def dataset_hash(samples: Iterable[Sample]) -> str:
    """One hash of what a model was trained on (files, labels, splits), for checkpoint metadata."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path):
        h.update(f"{s.path}\t{s.label}\t{s.split}\t{s.sha256}\n".encode())
    return h.hexdigest()


def decode_image(data: bytes) -> np.ndarray | None:
    """File bytes -> uint8/uint16 image (BGR, BGRA or grey), or None when not a readable image."""
    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return None
    return img


def load_image(dataset_dir: str | Path, sample: Sample) -> np.ndarray | None:
    """The sample's pixels, or None when the file is missing or corrupt (callers skip it)."""
    try:
        data = (Path(dataset_dir) / sample.path).read_bytes()
    except OSError:
        return None
    return decode_image(data)


def check_images(dataset_dir: str | Path, samples: list[Sample]) -> ImageCheck:
    """Which samples are readable, which are corrupt or missing (with why), which share bytes.

    Duplicates are groups (lists) of readable samples with the same sha256; a file whose
    bytes no longer match the manifest's sha256 counts as corrupt.
    """
    ok, corrupt = [], []
    by_sha: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        try:
            data = (Path(dataset_dir) / s.path).read_bytes()
        except OSError as exc:
            corrupt.append((s, f"unreadable: {exc.strerror or exc}"))
            continue
        sha = sha256_bytes(data)
        if s.sha256 and s.sha256 != sha:
            corrupt.append((s, "sha256 differs from the manifest"))
        elif decode_image(data) is None:
            corrupt.append((s, "not a decodable image"))
        else:
            ok.append(s)
            by_sha[sha].append(s)
    duplicates = [group for group in by_sha.values() if len(group) > 1]
    return ImageCheck(ok, corrupt, duplicates)
