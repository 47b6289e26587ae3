"""What one labelling run remembers: the class list, the order items are shown in, and an undo stack.

The files themselves change only through `visiond.data.inbox` (accept, return to inbox),
which locks the manifest, so the page, the CLI and a capturing daemon can share a dataset.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from visiond.data import inbox
from visiond.data.manifest import classes_of, manifest_path, read_manifest, validate_label
from visiond.errors import UserError
from visiond.fsutil import atomic_write

log = logging.getLogger(__name__)

MAX_UNDO = 1000
MAX_IDS_PER_REQUEST = 5000


class NotFound(UserError):
    """An id that is not (or no longer) in the inbox, or nothing left to undo."""


@dataclass
class _Accepted:
    """One accepted item and its original sidecar, so undo restores the model's full top-k.

    `own_row` is False when the same bytes were already labelled so (the accept added no row).
    """

    item_id: str
    label: str
    sidecar: bytes
    path: str
    own_row: bool


@dataclass
class _Discarded:
    """One item set aside in discarded/ (a blurred frame, a hand in view): undo puts it back."""

    item_id: str


@dataclass
class _Order:
    """Show order: items just returned by undo first, then the inbox oldest first, then skipped ones."""

    restored: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)

    def key(self, index: int, item_id: str) -> tuple[int, int]:
        if item_id in self.restored:
            return (0, -self.restored[item_id])
        if item_id in self.skipped:
            return (2, self.skipped[item_id])
        return (1, index)


def default_classes(dataset_dir: str | Path, first: list[str] | None = None) -> list[str]:
    """`first` (in the order given), then the manifest's classes and the inbox's predicted labels, sorted."""
    known: set[str] = set()
    if manifest_path(dataset_dir).exists():
        known.update(classes_of(read_manifest(dataset_dir)))
    for item in inbox.list_inbox(dataset_dir):
        label = item.predicted_label
        if label:
            try:
                known.add(validate_label(str(label)))
            except UserError:
                log.warning("inbox item %s: ignoring unusable predicted label %r", item.id, label)
    first = [validate_label(c) for c in (first or [])]
    ordered = list(dict.fromkeys(first))
    return ordered + sorted(known - set(ordered))


class LabelSession:
    """The labelling page's state between requests; every method is safe to call from many threads."""

    def __init__(self, dataset_dir: str | Path, classes: list[str]):
        self.dataset_dir = Path(dataset_dir)
        self._classes = list(dict.fromkeys(validate_label(c) for c in classes))
        self._lock = threading.Lock()
        self._undo: list[list[_Accepted | _Discarded]] = []
        self._order = _Order()
        self._labelled = 0
        self._discarded = 0

    @property
    def classes(self) -> list[str]:
        with self._lock:
            return list(self._classes)

    def state(self) -> dict:
        """What the page shows: classes, the items left in show order, progress, whether undo can act."""
        with self._lock:
            items = inbox.list_inbox(self.dataset_dir)
            ordered = sorted(enumerate(items), key=lambda p: self._order.key(p[0], p[1].id))
            labelled, discarded = self._labelled, self._discarded
            return {
                "dataset": str(self.dataset_dir),
                "classes": list(self._classes),
                "items": [_item_json(item, item.id in self._order.skipped) for _, item in ordered],
                "labelled": labelled,
                "discarded": discarded,
                "left": len(items),
                "total": labelled + discarded + len(items),
                "undo": len(self._undo),
            }

    def add_class(self, name: str) -> list[str]:
        name = validate_label(name)
        with self._lock:
            if name not in self._classes:
                self._classes.append(name)
            return list(self._classes)

    def accept(self, ids: list[str], label: str) -> list[dict]:
        """Accept each id as `label` (one undo step for all of them); all ids are checked first."""
        label = self._known_label(label)
        ids = _check_ids(ids)
        with self._lock:
            present = {item.id: item for item in inbox.list_inbox(self.dataset_dir)}
            missing = [i for i in ids if i not in present]
            if missing:
                raise NotFound(f"not in the inbox (labelled or removed meanwhile?): {', '.join(missing[:5])}")
            group: list[_Accepted] = []
            try:
                for item_id in ids:
                    sidecar = _read_or_none(present[item_id].sidecar_path)
                    sample = inbox.accept_inbox_item(self.dataset_dir, item_id, label)
                    own_row = sample.extra.get("inbox_id") == item_id
                    group.append(_Accepted(item_id, label, sidecar or b"", sample.path, own_row))
                    self._order.restored.pop(item_id, None)
                    self._order.skipped.pop(item_id, None)
                    log.info("labelled %s as %s -> %s", item_id, label, sample.path)
            finally:
                if group:
                    self._undo.append(group)
                    del self._undo[:-MAX_UNDO]
                    self._labelled += len(group)
            return [{"id": a.item_id, "label": a.label} for a in group]

    def discard(self, ids: list[str]) -> list[str]:
        """Set items aside in discarded/ (one undo step for all of them); all ids are checked first."""
        ids = _check_ids(ids)
        with self._lock:
            present = {item.id for item in inbox.list_inbox(self.dataset_dir)}
            missing = [i for i in ids if i not in present]
            if missing:
                raise NotFound(f"not in the inbox (labelled or removed meanwhile?): {', '.join(missing[:5])}")
            group: list[_Accepted | _Discarded] = []
            try:
                for item_id in ids:
                    inbox.move_to_discarded(self.dataset_dir, item_id)
                    group.append(_Discarded(item_id))
                    self._order.restored.pop(item_id, None)
                    self._order.skipped.pop(item_id, None)
                    log.info("discarded %s", item_id)
            finally:
                if group:
                    self._undo.append(group)
                    del self._undo[:-MAX_UNDO]
                    self._discarded += len(group)
            return [d.item_id for d in group]

    def undo(self) -> list[str]:
        """Return the last accepted or discarded item (or grid group) to the inbox, shown first again."""
        with self._lock:
            if not self._undo:
                raise NotFound("nothing to undo")
            group = self._undo.pop()
            restored: list[str] = []
            try:
                for step in reversed(group):
                    if isinstance(step, _Discarded):
                        inbox.restore_discarded(self.dataset_dir, step.item_id)
                        self._discarded -= 1
                        log.info("undid discarding %s", step.item_id)
                    else:
                        if step.own_row:
                            inbox.return_to_inbox(self.dataset_dir, step.item_id)
                            self._restore_sidecar(step)
                        else:
                            self._restore_duplicate(step)
                        self._labelled -= 1
                        log.info("undid %s (was %s)", step.item_id, step.label)
                    self._order.restored[step.item_id] = next(self._order.counter)
                    restored.append(step.item_id)
            except BaseException:
                left = [a for a in group if a.item_id not in restored]
                if left:
                    self._undo.append(left)
                raise
            return restored

    def skip(self, item_id: str) -> None:
        """Leave the item in the inbox and show it after everything else."""
        (item_id,) = _check_ids([item_id])
        with self._lock:
            self._order.restored.pop(item_id, None)
            self._order.skipped.pop(item_id, None)
            self._order.skipped[item_id] = next(self._order.counter)

    def close(self) -> None:
        """Wait for a change in progress to finish (the lock is held for each whole change)."""
        with self._lock:
            pass

    def _known_label(self, label: object) -> str:
        if not isinstance(label, str):
            raise UserError("label: expected a string")
        label = validate_label(label)
        with self._lock:
            if label not in self._classes:
                raise UserError(f"label {label!r}: not a class of this run ({', '.join(self._classes) or 'none yet'})")
        return label

    def _restore_duplicate(self, acc: _Accepted) -> None:
        """An accept that found its bytes already labelled only emptied the inbox entry: put it back."""
        directory = inbox.inbox_dir(self.dataset_dir)
        with inbox.manifest_lock(self.dataset_dir):
            try:
                data = (self.dataset_dir / acc.path).read_bytes()
            except FileNotFoundError:
                raise NotFound(f"inbox item {acc.item_id!r}: its image {acc.path} is gone from the dataset") from None
            atomic_write(directory / f"{acc.item_id}{inbox.IMAGE_SUFFIX}", data)
            atomic_write(directory / f"{acc.item_id}{inbox.SIDECAR_SUFFIX}", acc.sidecar)

    def _restore_sidecar(self, acc: _Accepted) -> None:
        """`return_to_inbox` rebuilds the sidecar from the manifest row; the original keeps the full top-k."""
        if not acc.sidecar:
            return
        directory = inbox.inbox_dir(self.dataset_dir)
        with inbox.manifest_lock(self.dataset_dir):
            if (directory / f"{acc.item_id}{inbox.IMAGE_SUFFIX}").exists():
                atomic_write(directory / f"{acc.item_id}{inbox.SIDECAR_SUFFIX}", acc.sidecar)


def _check_ids(ids: object) -> list[str]:
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS_PER_REQUEST:
        raise UserError(f"ids: expected a list of 1..{MAX_IDS_PER_REQUEST} inbox item ids")
    return list(dict.fromkeys(inbox.validate_item_id(i) for i in ids))


def _read_or_none(path: Path | None) -> bytes | None:
    try:
        return path.read_bytes() if path else None
    except OSError:
        return None


def _item_json(item: inbox.InboxItem, skipped: bool) -> dict:
    return {"id": item.id, "url": f"/files/{inbox.INBOX_DIR}/{item.id}{inbox.IMAGE_SUFFIX}",
            "camera": item.camera, "captured_at": item.captured_at, "source": item.source, "rule": item.rule,
            "width": item.width, "height": item.height, "prediction": item.prediction, "skipped": skipped}
