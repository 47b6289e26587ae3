"""The dataset's inbox: captured frames waiting for a label.

Layout (inside a dataset directory, beside ``manifest.csv`` and ``images/``)::

    inbox/<id>.png    the frame, PNG (pixels exact), written atomically
    inbox/<id>.json   its sidecar, written atomically AFTER the image

An item exists once its sidecar exists; an image without a sidecar (a crash between
the two writes) and dot-prefixed temp files are ignored. Sidecar (JSON object)::

    {"schema": "visiond.inbox/1", "id", "camera", "captured_at" (RFC 3339, UTC),
     "source" (credentials redacted), "sha256" (of the PNG bytes), "phash" (16 hex digits),
     "rule" (why it was captured: manual, every_frames, low_score, near_threshold, sample, command...),
     "width", "height",
     "prediction": {"label", "score", "top": [{"label", "score"}], "model": {"name", "version"}} or null}

Ids are ``<UTC time>_<camera>_<8 hex>`` so sorting ids sorts by capture time, and they
are safe as file names and URL path segments (`validate_item_id`). Accepting an item
moves its image into ``images/<label>/`` and appends a manifest row under a lock, so the
labelling page, the CLI and the daemon can work on one dataset at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from visiond.data import phash as ph
from visiond.data.manifest import (
    DISCARDED_DIR,
    IMAGES_DIR,
    INBOX_DIR,
    SPLITS,
    Sample,
    encode_image,
    manifest_path,
    read_manifest,
    sha256_bytes,
    validate_label,
    write_manifest,
)
from visiond.errors import UserError
from visiond.fsutil import atomic_copy, atomic_write, fsync_dir
from visiond.timefmt import rfc3339

log = logging.getLogger(__name__)

SCHEMA = "visiond.inbox/1"
IMAGE_SUFFIX = ".png"
SIDECAR_SUFFIX = ".json"
LOCK_NAME = ".manifest.lock"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,159}$")
_CAMERA_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class InboxItem:
    """One captured frame and what is known about it (the sidecar's fields)."""

    id: str
    camera: str
    captured_at: str
    source: str
    sha256: str
    phash: str
    rule: str
    prediction: dict | None
    width: int = 0
    height: int = 0
    image_path: Path | None = None   # absolute path of inbox/<id>.png
    sidecar_path: Path | None = None  # absolute path of inbox/<id>.json

    @property
    def predicted_label(self) -> str | None:
        return (self.prediction or {}).get("label")

    @property
    def predicted_score(self) -> float | None:
        score = (self.prediction or {}).get("score")
        return None if score is None else float(score)

    def to_json(self) -> dict:
        """The sidecar object (no local paths)."""
        d = asdict(self)
        d.pop("image_path")
        d.pop("sidecar_path")
        return {"schema": SCHEMA, **d}

    def size_bytes(self) -> int:
        """Bytes on disk (image + sidecar); 0 for what is already gone."""
        total = 0
        for p in (self.image_path, self.sidecar_path):
            try:
                total += p.stat().st_size if p else 0
            except OSError:
                pass
        return total


def inbox_dir(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / INBOX_DIR


def validate_item_id(item_id: str) -> str:
    """Ids come back from web requests: only a plain file-name stem is accepted."""
    if not isinstance(item_id, str) or not _ID_RE.match(item_id) or ".." in item_id:
        raise UserError(f"inbox item id {str(item_id)[:80]!r}: expected letters, digits, '_', '-', '.' only")
    return item_id


def _parse_time(value: Any) -> tuple[float, str]:
    if value is None:
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        return now, rfc3339(now)
    if isinstance(value, (int, float)):
        return float(value), rfc3339(float(value))
    try:
        t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"captured_at {value!r}: expected epoch seconds or an RFC 3339 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp(), rfc3339(t.timestamp())


def new_item_id(camera: str, captured_at: float) -> str:
    stamp = dt.datetime.fromtimestamp(captured_at, dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    cam = _CAMERA_SAFE.sub("-", camera or "camera").strip("-.")[:64] or "camera"
    return f"{stamp}_{cam}_{secrets.token_hex(4)}"


def prediction_dict(label: str, score: float, top, model_name: str, model_version: str) -> dict:
    """The sidecar's `prediction` object from a verdict (top: (label, score) pairs or dicts)."""
    pairs = [(t["label"], t["score"]) if isinstance(t, Mapping) else (t[0], t[1]) for t in top]
    return {"label": str(label), "score": round(float(score), 6),
            "top": [{"label": str(lb), "score": round(float(s), 6)} for lb, s in pairs],
            "model": {"name": str(model_name), "version": str(model_version)}}


def write_inbox_item(dataset_dir: str | Path, image_bgr: np.ndarray, meta: Mapping[str, Any]) -> InboxItem:
    """Store one frame in the inbox: PNG first, then its sidecar, each temp file + fsync + rename.

    `meta` keys: camera, captured_at (epoch seconds or RFC 3339; default now), source
    (redacted here), rule, prediction (a dict as `prediction_dict` makes, or None), and
    optionally phash (int or hex, when the caller already computed it) and id.
    Raises OSError (ENOSPC, EIO...) for the caller to count; nothing half-written stays.
    """
    from visiond.logs import redact_url

    directory = inbox_dir(dataset_dir)
    directory.mkdir(parents=True, exist_ok=True)
    ts, captured_at = _parse_time(meta.get("captured_at"))
    camera = str(meta.get("camera") or "")
    item_id = validate_item_id(str(meta.get("id") or new_item_id(camera, ts)))
    data = encode_image(image_bgr, IMAGE_SUFFIX)
    given = meta.get("phash")
    hash_hex = (given if isinstance(given, str) else ph.to_hex(given)) if given is not None \
        else ph.to_hex(ph.phash(image_bgr))
    prediction = meta.get("prediction")
    item = InboxItem(id=item_id, camera=camera, captured_at=captured_at, source=redact_url(str(meta.get("source") or "")),
                     sha256=sha256_bytes(data), phash=hash_hex, rule=str(meta.get("rule") or "manual"),
                     prediction=dict(prediction) if prediction else None,
                     width=int(image_bgr.shape[1]), height=int(image_bgr.shape[0]),
                     image_path=directory / f"{item_id}{IMAGE_SUFFIX}",
                     sidecar_path=directory / f"{item_id}{SIDECAR_SUFFIX}")
    atomic_write(item.image_path, data)
    try:
        atomic_write(item.sidecar_path, json.dumps(item.to_json(), indent=1).encode())
    except BaseException:
        item.image_path.unlink(missing_ok=True)
        raise
    return item


def _item_from_json(d: dict, directory: Path) -> InboxItem:
    item_id = validate_item_id(str(d["id"]))
    pred = d.get("prediction")
    return InboxItem(id=item_id, camera=str(d.get("camera", "")), captured_at=str(d.get("captured_at", "")),
                     source=str(d.get("source", "")), sha256=str(d.get("sha256", "")), phash=str(d.get("phash", "")),
                     rule=str(d.get("rule", "")), prediction=pred if isinstance(pred, dict) else None,
                     width=int(d.get("width") or 0), height=int(d.get("height") or 0),
                     image_path=directory / f"{item_id}{IMAGE_SUFFIX}",
                     sidecar_path=directory / f"{item_id}{SIDECAR_SUFFIX}")


def read_inbox_item(dataset_dir: str | Path, item_id: str) -> InboxItem:
    """One item by id; UserError when it is not (or no longer) in the inbox."""
    directory = inbox_dir(dataset_dir)
    validate_item_id(item_id)
    sidecar = directory / f"{item_id}{SIDECAR_SUFFIX}"
    try:
        d = json.loads(sidecar.read_text(encoding="utf-8"))
        item = _item_from_json(d, directory)
    except FileNotFoundError:
        raise UserError(f"inbox item {item_id!r}: not in {directory} (already labelled, discarded or evicted?)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{sidecar}: unreadable sidecar ({exc.__class__.__name__})") from None
    if item.id != item_id or not item.image_path.exists():
        raise UserError(f"inbox item {item_id!r}: its image is missing")
    return item


def list_inbox(dataset_dir: str | Path) -> list[InboxItem]:
    """Every complete item, oldest first (by capture time, then id)."""
    directory = inbox_dir(dataset_dir)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    images = {n[: -len(IMAGE_SUFFIX)] for n in names if n.endswith(IMAGE_SUFFIX) and not n.startswith(".")}
    items = []
    for name in names:
        if name.startswith(".") or not name.endswith(SIDECAR_SUFFIX) or name[: -len(SIDECAR_SUFFIX)] not in images:
            continue
        try:
            d = json.loads((directory / name).read_text(encoding="utf-8"))
            item = _item_from_json(d, directory)
        except FileNotFoundError:
            continue  # accepted or evicted while we listed
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            log.warning("ignoring unreadable inbox sidecar %s: %s", directory / name, exc.__class__.__name__)
            continue
        if item.id + SIDECAR_SUFFIX == name:
            items.append(item)
    items.sort(key=lambda i: (i.captured_at, i.id))
    return items


@contextlib.contextmanager
def manifest_lock(dataset_dir: str | Path) -> Iterator[None]:
    """An exclusive flock around a read-modify-write of the manifest (between processes and threads)."""
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(dataset_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_or_empty(dataset_dir: Path) -> list[Sample]:
    return read_manifest(dataset_dir) if manifest_path(dataset_dir).exists() else []


def _place_image(src: Path, dst: Path) -> None:
    """Hard link (same file system: instant, atomic), else an atomic copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return  # content-addressed name: the same bytes are already there
    try:
        os.link(src, dst)
    except OSError:
        atomic_copy(src, dst)


def accept_inbox_item(dataset_dir: str | Path, item_id: str, label: str, *, split: str = "") -> Sample:
    """Label an item: image into images/<label>/, one manifest row appended, item removed from the inbox.

    Order: place the image, rewrite the manifest (atomic, under the lock), then unlink the
    inbox files; a crash in between leaves the item in the inbox and re-accepting it
    does not add a second row (nor does an image already in the dataset with the same
    label). The row's extra fields keep inbox_id, camera, rule, phash
    and the model's guess (predicted_label, predicted_score, model_version).
    """
    dataset_dir = Path(dataset_dir)
    label = validate_label(label)
    if split not in ("",) + SPLITS:
        raise UserError(f"split {split!r}: expected one of train, val, test or empty")
    with manifest_lock(dataset_dir):
        item = read_inbox_item(dataset_dir, item_id)
        rel = f"{IMAGES_DIR}/{label}/{item.sha256[:20]}{IMAGE_SUFFIX}"
        pred = item.prediction or {}
        extra = {"inbox_id": item.id, "camera": item.camera, "rule": item.rule, "phash": item.phash,
                 "predicted_label": str(pred.get("label", "")),
                 "predicted_score": "" if pred.get("score") is None else f"{float(pred['score']):.6f}",
                 "model_version": str((pred.get("model") or {}).get("version", ""))}
        sample = Sample(rel, label, split, item.source, item.captured_at, item.sha256, extra)
        _place_image(item.image_path, dataset_dir / rel)
        samples = _read_or_empty(dataset_dir)
        already = [s for s in samples if s.extra.get("inbox_id") == item.id or (s.path == rel and s.label == label)]
        if already:
            sample = already[0]
        else:
            samples.append(sample)
            write_manifest(dataset_dir, samples)
        item.image_path.unlink(missing_ok=True)
        item.sidecar_path.unlink(missing_ok=True)
    return sample


def return_to_inbox(dataset_dir: str | Path, item_id: str) -> InboxItem:
    """Undo an accept: the row leaves the manifest, the image and a sidecar go back to the inbox.

    The restored sidecar is rebuilt from the manifest row (the model's top-k beyond the
    winning label is not kept there).
    """
    dataset_dir = Path(dataset_dir)
    validate_item_id(item_id)
    with manifest_lock(dataset_dir):
        samples = _read_or_empty(dataset_dir)
        rows = [s for s in samples if s.extra.get("inbox_id") == item_id]
        if not rows:
            raise UserError(f"inbox item {item_id!r}: not in the manifest (never accepted, or already returned)")
        s = rows[0]
        src = dataset_dir / s.path
        directory = inbox_dir(dataset_dir)
        directory.mkdir(parents=True, exist_ok=True)
        image_path, sidecar_path = directory / f"{item_id}{IMAGE_SUFFIX}", directory / f"{item_id}{SIDECAR_SUFFIX}"
        data = src.read_bytes()
        pred = None
        if s.extra.get("predicted_label"):
            score = float(s.extra.get("predicted_score") or 0.0)
            pred = {"label": s.extra["predicted_label"], "score": score,
                    "top": [{"label": s.extra["predicted_label"], "score": score}],
                    "model": {"name": "", "version": s.extra.get("model_version", "")}}
        from visiond.data.manifest import decode_image

        img = decode_image(data)
        item = InboxItem(id=item_id, camera=s.extra.get("camera", ""), captured_at=s.captured_at, source=s.source,
                         sha256=s.sha256, phash=s.extra.get("phash", ""), rule=s.extra.get("rule", ""), prediction=pred,
                         width=0 if img is None else int(img.shape[1]), height=0 if img is None else int(img.shape[0]),
                         image_path=image_path, sidecar_path=sidecar_path)
        atomic_write(image_path, data)
        atomic_write(sidecar_path, json.dumps(item.to_json(), indent=1).encode())
        remaining = [x for x in samples if x is not s]
        write_manifest(dataset_dir, remaining)
        if not any(x.path == s.path for x in remaining):
            src.unlink(missing_ok=True)
    return item


def discard_inbox_item(dataset_dir: str | Path, item_id: str) -> None:
    """Remove an item that is not worth labelling (sidecar first: the item disappears at once)."""
    directory = inbox_dir(dataset_dir)
    validate_item_id(item_id)
    sidecar, image = directory / f"{item_id}{SIDECAR_SUFFIX}", directory / f"{item_id}{IMAGE_SUFFIX}"
    if not sidecar.exists() and not image.exists():
        raise UserError(f"inbox item {item_id!r}: not in {directory}")
    sidecar.unlink(missing_ok=True)
    image.unlink(missing_ok=True)


def move_to_discarded(dataset_dir: str | Path, item_id: str) -> None:
    """Set an item aside in `<dataset>/discarded/` (never trained on; `restore_discarded` undoes it).

    Sidecar first, so the item leaves the inbox listing at once; the image follows.
    """
    validate_item_id(item_id)
    src, dst = inbox_dir(dataset_dir), Path(dataset_dir) / DISCARDED_DIR
    with manifest_lock(dataset_dir):
        if not (src / f"{item_id}{SIDECAR_SUFFIX}").exists():
            raise UserError(f"inbox item {item_id!r}: not in {src}")
        dst.mkdir(parents=True, exist_ok=True)
        for suffix in (SIDECAR_SUFFIX, IMAGE_SUFFIX):
            try:
                os.replace(src / f"{item_id}{suffix}", dst / f"{item_id}{suffix}")
            except FileNotFoundError:
                pass
        fsync_dir(dst)
        fsync_dir(src)


def restore_discarded(dataset_dir: str | Path, item_id: str) -> None:
    """Put a discarded item back into the inbox (image first, so it reappears complete)."""
    validate_item_id(item_id)
    src, dst = Path(dataset_dir) / DISCARDED_DIR, inbox_dir(dataset_dir)
    with manifest_lock(dataset_dir):
        if not (src / f"{item_id}{IMAGE_SUFFIX}").exists():
            raise UserError(f"discarded item {item_id!r}: not in {src}")
        dst.mkdir(parents=True, exist_ok=True)
        for suffix in (IMAGE_SUFFIX, SIDECAR_SUFFIX):
            os.replace(src / f"{item_id}{suffix}", dst / f"{item_id}{suffix}")
        fsync_dir(dst)
        fsync_dir(src)


def inbox_usage(dataset_dir: str | Path) -> tuple[int, int]:
    """(bytes, files) the inbox holds, temp and orphan files included."""
    total = files = 0
    try:
        with os.scandir(inbox_dir(dataset_dir)) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
                    files += 1
    except (FileNotFoundError, NotADirectoryError):
        pass
    return total, files
