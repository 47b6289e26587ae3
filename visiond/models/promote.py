"""Putting a checkpoint into service: validate it, then install it atomically where the daemon watches.

The daemon reloads when the file at `model.checkpoint` changes. `promote` makes that
change a single rename (temp file in the same directory, fsync, rename, fsync of the
directory), so the watcher never sees half a file.

Backups: the model being replaced is kept as `PATH.prev` (older ones as `PATH.prev.2`,
`PATH.prev.3`, ... up to `keep`), but only when it loads: a broken file that sits at
PATH (copied there by hand and refused by the daemon) is never kept, so `.prev` always
holds a model that served or could have. `rollback` puts `.prev` back and moves the
older ones up.

Permissions: the installed file takes the mode and owner of the file it replaces (or
0666 minus the umask when there is none), and before the rename `promote` checks that
the serving user can read it. The serving user is the owner of the directory the model
lives in: systemd's `StateDirectory=` hands that directory to the service's (dynamic)
user, so a model that user cannot read would be refused at reload.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiond.errors import CheckpointError, UserError
from visiond.fsutil import atomic_replace, fsync_dir
from visiond.models.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

DEFAULT_KEEP = 3  # backups kept: .prev, .prev.2, .prev.3


@dataclass(frozen=True)
class PromoteResult:
    path: Path
    version: str
    previous: Path | None          # PATH.prev, when the model replaced was kept
    previous_version: str | None
    not_kept: str | None = None    # why the file replaced was not kept (it did not load)


def prev_path(target: Path, n: int = 1) -> Path:
    """PATH.prev for the newest backup, PATH.prev.N for older ones."""
    return target.with_name(target.name + (".prev" if n == 1 else f".prev.{n}"))


def backups(target: str | Path) -> list[Path]:
    """The backups that exist, newest first."""
    target, out, n = Path(target), [], 1
    while prev_path(target, n).exists():
        out.append(prev_path(target, n))
        n += 1
    return out


def validate_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    """Load it (hash verified), build the network and run one dummy batch of two frames."""
    from visiond.models.runtime import TorchClassifier

    ckpt = load_checkpoint(path)
    try:
        clf = TorchClassifier(ckpt, device=device, precision="fp32", threads=0)
        s = ckpt.spec
        probs = clf.predict(np.zeros((2, s.height, s.width, s.channels), np.uint8))
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the model does not run ({str(exc).splitlines()[0][:160]})") from None
    if probs.shape != (2, len(ckpt.classes)) or not np.all(np.isfinite(probs)):
        raise CheckpointError(f"{path}: a dummy batch gave scores of shape {probs.shape} "
                              f"(expected 2 x {len(ckpt.classes)} finite values)")
    return ckpt


def check_config_fit(ckpt: Checkpoint, config_path: str | Path) -> None:
    """The daemon config's decide rules must name only classes the model has."""
    from visiond.config import load_config

    load_config(config_path).decide.check_classes(ckpt.classes)


def config_target(config_path: str | Path) -> Path:
    """Where the daemon of this config loads its model from (`model.checkpoint`)."""
    from visiond.config import load_config

    return Path(load_config(config_path).model.checkpoint)


def _fit_for_service(path: Path, target: Path) -> None:
    """Before `path` becomes `target`: give it target's mode and owner (when there is a target), then make
    sure the serving user can read it."""
    if target.exists():
        _take_owner_and_mode(path, target.stat())
    check_readable_by_service(path, target)


def _take_owner_and_mode(path: Path, like: os.stat_result) -> None:
    """Give `path` the mode and owner of the file it replaces; a non-root user keeps its own uid."""
    os.chmod(path, stat.S_IMODE(like.st_mode))
    try:
        os.chown(path, like.st_uid, like.st_gid)
    except PermissionError:
        log.warning("cannot give %s the owner %d:%d of the file it replaces (not root); kept %d:%d",
                    path, like.st_uid, like.st_gid, os.getuid(), os.getgid())


def check_readable_by_service(path: Path, target: Path) -> None:
    """Refuse `path` (about to become `target`) when the serving user, the owner of target's directory, could not read it."""
    directory = target.parent
    d, f = directory.stat(), path.stat()
    if d.st_uid == 0:
        return  # a root-owned directory: the daemon runs as root or reads through its group; nothing to infer
    if f.st_uid == d.st_uid:
        ok = bool(f.st_mode & stat.S_IRUSR)
    elif f.st_gid == d.st_gid:
        ok = bool(f.st_mode & stat.S_IRGRP)
    else:
        ok = bool(f.st_mode & stat.S_IROTH)
    if not ok:
        raise UserError(
            f"{target}: the serving user (uid {d.st_uid}, owner of "
            f"{directory}) could not read the model (mode {stat.S_IMODE(f.st_mode):o}, owner "
            f"{f.st_uid}:{f.st_gid}); not installed. Expected a umask such as 022, or "
            f"chown {d.st_uid} the served model first")


def _loadable(path: Path) -> tuple[str | None, str | None]:
    """(version, None) when `path` is a model that loads, else (None, why)."""
    try:
        return load_checkpoint(path).version, None
    except CheckpointError as exc:
        return None, str(exc)


def _rotate_backups(target: Path, keep: int) -> Path:
    """Move PATH.prev.N up by one (dropping those past `keep`); returns the free PATH.prev."""
    for n in range(len(backups(target)), 0, -1):
        if n >= keep:
            prev_path(target, n).unlink()
        else:
            os.replace(prev_path(target, n), prev_path(target, n + 1))
    return prev_path(target)


def install_checkpoint(src: str | Path, target: str | Path, *, keep: int = DEFAULT_KEEP) -> PromoteResult:
    """Copy `src` over `target` in one rename; a loadable old target becomes `target.prev`."""
    src, target = Path(src), Path(target)
    if not src.is_file():
        raise UserError(f"{src}: no such checkpoint file")
    if keep < 0:
        raise UserError(f"--keep {keep}: expected 0 or more backups")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(src, target):
        raise UserError(f"{src} is already {target}; nothing to promote")
    new = load_checkpoint(src)
    previous_version, not_kept = _loadable(target) if target.exists() else (None, None)
    previous = None
    with atomic_replace(target) as tmp:
        shutil.copyfile(src, tmp)
        if load_checkpoint(tmp).version != new.version:  # what we wrote is what we validated
            raise CheckpointError(f"{tmp}: the copy differs from {src}; not installed")
        _fit_for_service(tmp, target)
        if previous_version is not None and keep > 0:
            previous = _rotate_backups(target, keep)
            try:
                os.link(target, previous)  # the served file itself, not a copy: same bytes, mode and owner
            except OSError:  # a file system without hard links
                shutil.copy2(target, previous)
    if not_kept:
        log.warning("the model replaced at %s did not load (%s); not kept as a backup, %s", target, not_kept,
                    f"the last good one is still {prev_path(target)}" if prev_path(target).exists() else
                    "there is no older backup")
    log.info("promoted %s (version %s) to %s%s", src, new.version, target,
             f"; previous version {previous_version} kept as {previous}" if previous else "")
    return PromoteResult(target, new.version, previous, previous_version if previous else None, not_kept)


def _validated(path: Path, config: str | Path | None, device: str) -> Checkpoint:
    """Load and run it, and check it against the daemon's config when one is named."""
    ckpt = validate_checkpoint(path, device=device)
    if config is not None:
        check_config_fit(ckpt, config)
    return ckpt


def promote(src: str | Path, target: str | Path, *, config: str | Path | None = None,
            device: str = "cpu", keep: int = DEFAULT_KEEP) -> PromoteResult:
    """Validate, optionally check against a daemon config, then install atomically."""
    _validated(Path(src), config, device)
    return install_checkpoint(src, target, keep=keep)


def rollback(target: str | Path, *, config: str | Path | None = None, device: str = "cpu") -> PromoteResult:
    """Put PATH.prev back at PATH and move the older backups up; the model rolled back from is dropped."""
    target = Path(target)
    prev = prev_path(target)
    if not prev.exists():
        raise UserError(f"{prev}: no backup to roll back to (a promote keeps the model it replaces there)")
    ckpt = _validated(prev, config, device)
    _fit_for_service(prev, target)
    older = backups(target)
    os.replace(prev, target)  # .prev is a whole file beside the target: one rename puts it back
    for n in range(2, len(older) + 1):
        os.replace(prev_path(target, n), prev_path(target, n - 1))
    fsync_dir(target.parent)
    log.info("rolled %s back to version %s", target, ckpt.version)
    return PromoteResult(target, ckpt.version, prev if len(older) > 1 else None, None)
