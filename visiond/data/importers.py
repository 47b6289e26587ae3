"""Bring existing datasets into visiond's layout (images + manifest), whatever shape they come in.

Every format is read by a small scanner that yields `Item`s; one ingest loop stores them.
Everything is written into a staging directory beside DATASET_DIR and moved into place
only at the end, so malformed input leaves no half-written dataset behind. Corrupt
images inside an otherwise valid source are skipped and reported, never a crash.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import shutil
import struct
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from visiond.data.manifest import MANIFEST_NAME, Sample, add_image, decode_image, read_manifest, write_manifest
from visiond.errors import UserError
from visiond.video import is_image_path

FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801
CIFAR_RECORD = 1 + 3 * 32 * 32
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Item:
    """One image a scanner found: pixels or file bytes, or the reason it cannot be used."""

    ref: str
    label: str = ""
    image: np.ndarray | bytes | None = None
    split: str = ""
    problem: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class ImportReport:
    """What an import did, for the CLI's table and for tests."""

    format: str
    src: str
    dataset_dir: str
    imported: int = 0
    per_class: dict = field(default_factory=dict)
    per_split: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)   # (ref, reason)
    duplicates: int = 0                            # rows whose file was already in the dataset


def safe_label(name: str, where: str) -> str:
    """Class names from foreign files become directory names: '/' and '\\' turn into '_'."""
    label = "".join(ch for ch in name.replace("/", "_").replace("\\", "_") if ch.isprintable()).strip()
    if not label or label in (".", ".."):
        raise UserError(f"{where}: class name {name!r}: expected a non-empty name")
    return label


def _file_item(path: Path, label: str, ref: str, **kw) -> Item:
    """An image file as bytes (stored unchanged), or a skip reason when it does not decode."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Item(ref, label, problem=f"unreadable: {exc.strerror or exc}")
    if decode_image(data) is None:
        return Item(ref, label, problem="not a decodable image")
    return Item(ref, label, data, **kw)


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if is_image_path(p) and p.is_file())


def _need_dir(src: Path, what: str) -> Path:
    if not src.is_dir():
        raise UserError(f"{src}: expected a directory holding {what}")
    return src


# --- folder, csv, json -------------------------------------------------------------------


def scan_folder(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """SRC/<class>/**/*.png: the folder name is the label."""
    _need_dir(src, "one sub-folder of images per class")
    files = [(d.name, p) for d in sorted(src.iterdir()) if d.is_dir() and not d.name.startswith(".")
             for p in _images_under(d)]
    if not files:
        raise UserError(f"{src}: no images in class sub-folders; expected SRC/<class>/<image>.png")
    return len(files), (_file_item(p, safe_label(lbl, str(p.parent)), f"folder:{p.relative_to(src).as_posix()}")
                        for lbl, p in files)


def _listed_item(base: Path, rec: dict, where: str) -> Item:
    """A (path, label, ...) record from a CSV or JSON list -> Item; other keys become metadata."""
    path, label = str(rec.pop("path") or "").strip(), str(rec.pop("label") or "").strip()
    if not path or not label:
        raise UserError(f"{where}: expected a non-empty path and label")
    split = str(rec.pop("split", "") or "").strip()
    if split and split not in ("train", "val", "test"):
        raise UserError(f"{where}: split {split!r}: expected train, val, test or empty")
    extra = {k: "" if v is None else str(v) for k, v in rec.items()}
    return _file_item(base / path, safe_label(label, where), f"{where.split(':')[0]}:{path}", split=split, extra=extra)


_PATH_KEYS = ("path", "file", "filename", "image", "image_path")
_LABEL_KEYS = ("label", "class", "category", "class_name")


def _normalise_keys(rec: dict, where: str) -> dict:
    lower = {str(k).strip().lower(): v for k, v in rec.items()}
    pk = next((k for k in _PATH_KEYS if k in lower), None)
    lk = next((k for k in _LABEL_KEYS if k in lower), None)
    if pk is None or lk is None:
        raise UserError(f"{where}: expected fields path and label (or file/filename/image and class/category)")
    out = {k: v for k, v in lower.items() if k not in (pk, lk)}
    out["path"], out["label"] = lower[pk], lower[lk]
    return out


def scan_csv(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """A CSV with a header naming path and label columns; paths are relative to the file."""
    try:
        with open(src, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, dict(r)) for r in reader]
            header = reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{src}: cannot read CSV: {exc}") from None
    if not header:
        raise UserError(f"{src}: empty file; expected a header with columns path,label")
    _normalise_keys(dict.fromkeys(header, ""), f"{src}:1")
    items = []
    for line, row in rows:
        if None in row or any(v is None for v in row.values()):
            raise UserError(f"{src}:{line}: field count differs from the header's {len(header)} columns")
        items.append(_listed_item(src.parent, _normalise_keys(row, f"{src}:{line}"), f"{src}:{line}"))
    return len(items), iter(items)


def scan_json(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """JSON: a list of {path, label, ...}, {"samples": [...]}, or {path: label}; paths relative to the file."""
    try:
        doc = json.loads(src.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{src}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{src}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(doc, dict):
        lists = [doc[k] for k in ("samples", "images", "items") if isinstance(doc.get(k), list)]
        doc = lists[0] if lists else [{"path": k, "label": v} for k, v in doc.items()]
    if not isinstance(doc, list):
        raise UserError(f"{src}: expected a list of {{path, label}} objects or a {{path: label}} object")
    items = []
    for i, rec in enumerate(doc):
        where = f"{src}: entry {i}"
        if not isinstance(rec, dict) or isinstance(rec.get("label"), (dict, list)):
            raise UserError(f"{where}: expected an object with string path and label")
        items.append(_listed_item(src.parent, _normalise_keys(rec, where), where))
    return len(items), iter(items)


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------


def _read_maybe_gz(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None


def parse_idx_images(path: Path) -> np.ndarray:
    """IDX3 images file -> uint8 N x rows x cols; header and size are checked, not trusted."""
    data = _read_maybe_gz(path)
    if len(data) < 16:
        raise UserError(f"{path}: {len(data)} bytes; expected an IDX images header of 16 bytes")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise UserError(f"{path}: magic 0x{magic:08x}; expected 0x{IDX_IMAGES_MAGIC:08x} (IDX ubyte images)")
    if not (0 < rows <= 4096 and 0 < cols <= 4096) or len(data) - 16 != n * rows * cols:
        raise UserError(f"{path}: header says {n} images of {rows}x{cols} = {n * rows * cols} bytes, "
                        f"file has {len(data) - 16}")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def parse_idx_labels(path: Path) -> np.ndarray:
    """IDX1 labels file -> uint8 N."""
    data = _read_maybe_gz(path)
    if len(data) < 8:
        raise UserError(f"{path}: {len(data)} bytes; expected an IDX labels header of 8 bytes")
    magic, n = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise UserError(f"{path}: magic 0x{magic:08x}; expected 0x{IDX_LABELS_MAGIC:08x} (IDX ubyte labels)")
    if len(data) - 8 != n:
        raise UserError(f"{path}: header says {n} labels, file has {len(data) - 8} bytes of them")
    return np.frombuffer(data, np.uint8, offset=8)


def _find_idx(src: Path, prefix: str, kind: str) -> Path | None:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = src / f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte{suffix}"
            if p.is_file():
                return p
    return None


def _idx_classes(src: Path, class_names) -> tuple[str, ...]:
    if class_names:
        return tuple(class_names)
    return FASHION_MNIST_CLASSES if "fashion" in str(src.resolve()).lower() else tuple(str(d) for d in range(10))


def scan_idx(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """SRC holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; train/t10k become train/test."""
    _need_dir(src, "train-images-idx3-ubyte(.gz) / train-labels-idx1-ubyte(.gz) and/or the t10k pair")
    names = [safe_label(n, "--classes") for n in _idx_classes(src, class_names)]
    parts = []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        img_path, lbl_path = _find_idx(src, prefix, "images"), _find_idx(src, prefix, "labels")
        if (img_path is None) != (lbl_path is None):
            raise UserError(f"{src}: {prefix} images and labels must come together; found only {img_path or lbl_path}")
        if img_path is None:
            continue
        images, labels = parse_idx_images(img_path), parse_idx_labels(lbl_path)
        if len(images) != len(labels):
            raise UserError(f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}")
        if len(labels) and int(labels.max()) >= len(names):
            raise UserError(f"{lbl_path}: label {int(labels.max())} but only {len(names)} class names")
        parts.append((img_path.name, split, images, labels))
    if not parts:
        raise UserError(f"{src}: no IDX files; expected train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")

    def items():
        for fname, split, images, labels in parts:
            for i in range(len(images)):
                yield Item(f"idx:{fname}#{i}", names[labels[i]], images[i], split=split)
    return sum(len(p[2]) for p in parts), items()


# --- CIFAR-10 (binary version) ----------------------------------------------------------


def _cifar_names(root: Path) -> tuple[str, ...]:
    meta = root / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = [ln.strip() for ln in meta.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not names:
        raise UserError(f"{meta}: no class names; expected one name per line")
    return tuple(safe_label(n, str(meta)) for n in names)


def scan_cifar10(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """data_batch_1..5.bin and test_batch.bin: 1 label byte + 3072 bytes (R, G, B planes) per image."""
    _need_dir(src, "the CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin)")
    root = src / "cifar-10-batches-bin" if (src / "cifar-10-batches-bin").is_dir() else src
    files = [(root / f"data_batch_{i}.bin", "train") for i in range(1, 6)] + [(root / "test_batch.bin", "test")]
    files = [(p, s) for p, s in files if p.is_file()]
    if not files:
        raise UserError(f"{src}: no CIFAR-10 binary batches; expected data_batch_1.bin ... test_batch.bin "
                        f"(the binary version, not the Python pickles)")
    names = tuple(class_names) if class_names else _cifar_names(root)
    batches = []
    for path, split in files:
        data = path.read_bytes()
        if not data or len(data) % CIFAR_RECORD:
            raise UserError(f"{path}: {len(data)} bytes; expected a multiple of {CIFAR_RECORD} "
                            f"(1 label byte + 3072 pixel bytes per record)")
        rec = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
        if int(rec[:, 0].max()) >= len(names):
            raise UserError(f"{path}: label {int(rec[:, 0].max())} but only {len(names)} class names")
        batches.append((path.name, split, rec))

    def items():
        for fname, split, rec in batches:
            for i, r in enumerate(rec):
                bgr = r[1:].reshape(3, 32, 32).transpose(1, 2, 0)[:, :, ::-1]
                yield Item(f"cifar10:{fname}#{i}", names[r[0]], np.ascontiguousarray(bgr), split=split)
    return sum(len(b[2]) for b in batches), items()


# --- box annotations: each box becomes a crop --------------------------------------------


def _split_from_parts(rel: Path) -> str:
    return next((_SPLIT_DIRS[p.lower()] for p in rel.parts[:-1] if p.lower() in _SPLIT_DIRS), "")


def _crops(image_path: Path, boxes: list[tuple[str, float, float, float, float]], ref: str,
           split: str = "", normalised: bool = False) -> Iterator[Item]:
    """Boxes cut out of one image; bad image or box -> skipped Item.

    Boxes are (label, x0, y0, x1, y1) in pixels, or (label, cx, cy, w, h) in 0..1 when
    `normalised` (YOLO), which needs the decoded image's size.
    """
    try:
        img = decode_image(image_path.read_bytes())
    except OSError:
        img = None
    if img is None:
        yield Item(ref, problem=f"image {image_path.name} missing or not decodable ({len(boxes)} box(es))")
        return
    h, w = img.shape[:2]
    if normalised:
        boxes = [(lbl, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                 for lbl, cx, cy, bw, bh in boxes]
    for k, (label, x0, y0, x1, y1) in enumerate(boxes):
        a, b = max(0, math.floor(x0)), max(0, math.floor(y0))
        c, d = min(w, math.ceil(x1)), min(h, math.ceil(y1))
        if c - a < 2 or d - b < 2:
            yield Item(f"{ref}#{k}", label, problem=f"box {k} is empty inside the {w}x{h} image")
            continue
        crop = np.ascontiguousarray(img[b:d, a:c])
        yield Item(f"{ref}#{k}", label, crop, split=split,
                   extra={"image": ref.split(":", 1)[1], "box": f"{a},{b},{c},{d}"})


def _voc_boxes(xml_path: Path) -> tuple[str, list]:
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise UserError(f"{xml_path}: not valid XML: {exc}") from None
    if root.tag != "annotation":
        raise UserError(f"{xml_path}: root <{root.tag}>; expected a Pascal VOC <annotation>")
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        raise UserError(f"{xml_path}: expected <filename> naming the image")
    boxes = []
    for k, obj in enumerate(root.findall("object")):
        name, bb = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        try:
            coords = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{xml_path}: object {k}: expected <name> and <bndbox> with numeric "
                            f"xmin, ymin, xmax, ymax") from None
        if not name or coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise UserError(f"{xml_path}: object {k}: expected a <name> and xmax > xmin, ymax > ymin")
        boxes.append((safe_label(name, str(xml_path)), coords[0] - 1, coords[1] - 1, coords[2], coords[3]))
    return filename, boxes


def _voc_image(src: Path, xml_path: Path, filename: str) -> Path:
    for d in (xml_path.parent, xml_path.parent.parent / "JPEGImages", src / "JPEGImages", src / "images", src):
        if (d / filename).is_file():
            return d / filename
    stem = Path(filename).stem
    near = [p for p in xml_path.parent.glob(f"{stem}.*") if is_image_path(p)]
    return near[0] if near else xml_path.parent / filename


def scan_voc(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """Pascal VOC XML (LabelImg, CVAT): images found beside the XML or in JPEGImages/."""
    _need_dir(src, "Pascal VOC XML annotations (Annotations/*.xml and JPEGImages/)")
    xmls = sorted(src.rglob("*.xml"))
    if not xmls:
        raise UserError(f"{src}: no .xml files; expected Pascal VOC annotations")
    parsed = [(x, *_voc_boxes(x)) for x in xmls]  # parse all first: a bad file fails before any write

    def items():
        for xml_path, filename, boxes in parsed:
            img = _voc_image(src, xml_path, filename)
            ref = f"voc:{xml_path.relative_to(src).as_posix()}"
            yield from _crops(img, boxes, ref, _split_from_parts(xml_path.relative_to(src)))
    return sum(len(p[2]) for p in parsed), items()


def _yolo_names(src: Path) -> list[str]:
    for name in ("classes.txt", "obj.names"):
        for p in [src / name, *sorted(src.rglob(name))]:
            if p.is_file():
                names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
                if not names:
                    raise UserError(f"{p}: no class names; expected one per line")
                return [safe_label(n, str(p)) for n in names]
    for name in ("data.yaml", "dataset.yaml"):
        if (src / name).is_file():
            names = (yaml.safe_load((src / name).read_text()) or {}).get("names")
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if isinstance(names, list) and names:
                return [safe_label(str(n), str(src / name)) for n in names]
    raise UserError(f"{src}: no class names; expected classes.txt, obj.names or data.yaml with names")


def _yolo_label_file(image: Path, src: Path) -> Path | None:
    rel = image.relative_to(src)
    candidates = [image.with_suffix(".txt")]
    if "images" in rel.parts:
        parts = list(rel.parts)
        parts[parts.index("images")] = "labels"
        candidates.append((src / Path(*parts)).with_suffix(".txt"))
    return next((c for c in candidates if c.is_file()), None)


def _yolo_boxes(txt: Path, names: list[str]) -> list[tuple[str, float, float, float, float]]:
    """Normalised 'cls cx cy w h' lines, checked; returned as (label, cx, cy, w, h)."""
    boxes = []
    for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        f = line.split()
        try:
            cls, vals = int(f[0]), [float(v) for v in f[1:]]
        except (ValueError, IndexError):
            cls, vals = -1, []
        if len(vals) != 4 or not 0 <= cls < len(names) or not all(-1e-3 <= v <= 1 + 1e-3 for v in vals):
            raise UserError(f"{txt}:{n}: {line.strip()!r}: expected 'class cx cy w h' with class 0..{len(names) - 1} "
                            f"and coordinates normalised to 0..1")
        boxes.append((names[cls], *vals))
    return boxes


def scan_yolo(src: Path, class_names=None) -> tuple[int, Iterator[Item]]:
    """YOLO txt per image (beside it or under labels/), classes.txt / obj.names for names."""
    _need_dir(src, "images with YOLO .txt labels and classes.txt or obj.names")
    names = list(class_names) if class_names else _yolo_names(src)
    work = []
    for image in _images_under(src):
        txt = _yolo_label_file(image, src)
        if txt is not None:
            work.append((image, _yolo_boxes(txt, names)))  # all checked before anything is written
    if not work:
        raise UserError(f"{src}: no images with a YOLO .txt label file beside them or under labels/")

    def items():
        for image, boxes in work:
            rel = image.relative_to(src)
            yield from _crops(image, boxes, f"yolo:{rel.as_posix()}", _split_from_parts(rel), normalised=True)
    return sum(len(b) for _, b in work), items()


SCANNERS: dict[str, Callable[..., tuple[int, Iterator[Item]]]] = {
    "folder": scan_folder, "csv": scan_csv, "json": scan_json, "idx": scan_idx,
    "cifar10": scan_cifar10, "voc": scan_voc, "yolo": scan_yolo,
}


# --- storing: staging directory, then into place -----------------------------------------


def _existing(dataset_dir: Path) -> list[Sample] | None:
    """The samples already there, [] for an empty directory, None when it does not exist."""
    if not dataset_dir.exists():
        return None
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: exists and is not a directory")
    if (dataset_dir / MANIFEST_NAME).is_file():
        return read_manifest(dataset_dir)
    if any(dataset_dir.iterdir()):
        raise UserError(f"{dataset_dir}: not empty and has no {MANIFEST_NAME}; expected a new or existing dataset")
    return []


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


def _ingest(items: Iterator[Item], total: int, staging: Path, report: ImportReport,
            known: set[str], progress: bool) -> list[Sample]:
    samples = []
    with _progress(progress) as bar:
        task = bar.add_task(f"importing {report.format}", total=total)
        for item in items:
            bar.advance(task)
            if item.problem:
                report.skipped.append((item.ref, item.problem))
                continue
            s = add_image(staging, item.image, item.label, source=item.ref, split=item.split, extra=item.extra)
            if s.path in known:
                report.duplicates += 1
                continue
            known.add(s.path)
            samples.append(s)
    return samples


def _move_into(staging: Path, dataset_dir: Path, samples: list[Sample]) -> None:
    """Merge new files into an existing dataset; undo the moves if one fails."""
    moved: list[Path] = []
    try:
        for s in samples:
            dst = dataset_dir / s.path
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / s.path, dst)
                moved.append(dst)
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        raise


def _commit(staging: Path, dataset_dir: Path, existing: list[Sample] | None, samples: list[Sample]) -> None:
    if not existing:
        write_manifest(staging, samples)
        if existing == []:
            dataset_dir.rmdir()
        os.rename(staging, dataset_dir)
        return
    _move_into(staging, dataset_dir, samples)
    write_manifest(dataset_dir, existing + samples)


def import_dataset(fmt: str, src: str | Path, dataset_dir: str | Path, *, progress: bool = True,
                   class_names: list[str] | None = None) -> ImportReport:
    """Import SRC (in FORMAT) into DATASET_DIR, creating it or adding to its manifest."""
    if fmt not in SCANNERS:
        raise UserError(f"import format {fmt!r}: expected one of {', '.join(SCANNERS)}")
    src, dataset_dir = Path(src), Path(dataset_dir)
    if not src.exists():
        raise UserError(f"{src}: does not exist")
    existing = _existing(dataset_dir)
    total, items = SCANNERS[fmt](src, class_names)
    report = ImportReport(fmt, str(src), str(dataset_dir))
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.import-", dir=dataset_dir.parent))
    try:
        samples = _ingest(items, total, staging, report, {s.path for s in existing or []}, progress)
        if not samples:
            raise UserError(f"{src}: nothing to import ({len(report.skipped)} skipped, {report.duplicates} duplicates)")
        _commit(staging, dataset_dir, existing, samples)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.imported = len(samples)
    report.per_class = dict(sorted(Counter(s.label for s in samples).items()))
    report.per_split = dict(sorted(Counter(s.split for s in samples).items()))
    return report
