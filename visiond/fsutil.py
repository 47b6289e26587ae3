"""Writing a file so that readers see the old content or the new, never half of it.

Every write goes to a dot-prefixed temp file in the target's directory (so the rename
stays on one file system and directory scans skip it), is fsynced, renamed over the
target, and the directory is fsynced so the rename survives a power cut. The temp file
is created with mode 0o666 minus the umask, as `open()` would: a 0600 file (what
`tempfile.mkstemp` gives) would hide models and frames from a service running as
another user. A write that fails leaves the target untouched and no temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
from pathlib import Path
from typing import Iterator


def _create_temp(target: Path) -> Path:
    """A new, empty temp file beside `target`, made with mode 0o666 minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target` to write by name; a clean exit renames it over `target`.

    For writers that want a file name (safetensors, ONNX, TorchScript) and for checks
    on the written file before it goes live: raising inside the block leaves `target`
    as it was and removes the temp file.
    """
    target = Path(target)
    tmp = _create_temp(target)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write(target: str | Path, data: bytes) -> None:
    """Replace `target` with `data` in one rename."""
    with atomic_replace(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write(target, text.encode(encoding))


def atomic_copy(src: str | Path, target: str | Path) -> None:
    """Copy `src`'s bytes over `target` in one rename (the mode is the umask's, not `src`'s)."""
    with atomic_replace(target) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def sqlite_transaction(db: sqlite3.Connection, durable: bool = True) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit (isolation_level=None) connection: BEGIN IMMEDIATE, COMMIT at the end,
    ROLLBACK on any exception (re-raised). `durable=False` commits without fsync (synchronous=NORMAL for this one
    commit): for deletes whose loss in a power cut only means doing them again."""
    if not durable:
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if not durable:
            db.execute("PRAGMA synchronous=FULL")
