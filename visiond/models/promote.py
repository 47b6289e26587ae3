"""Putting a checkpoint into service: validate it, then install it atomically where the daemon watches.

The daemon reloads when the file at `model.checkpoint` changes. `promote` makes that
change a single rename (temp file in the same directory, fsync, rename, fsync of the
directory), so the watcher never sees half a file, and keeps the previous model as
`PATH.prev` for a one-command rollback (`visiond promote PATH.prev --to PATH`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiond.data.manifest import fsync_dir
from visiond.errors import CheckpointError, UserError
from visiond.models.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromoteResult:
    path: Path
    version: str
    previous: Path | None          # PATH.prev, when there was a model before
    previous_version: str | None


def prev_path(target: Path) -> Path:
    return target.with_name(target.name + ".prev")


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


def _copy_to_temp(src: Path, directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def install_checkpoint(src: str | Path, target: str | Path, *, keep_previous: bool = True) -> PromoteResult:
    """Copy `src` over `target` in one rename; the old target becomes `target.prev`."""
    src, target = Path(src), Path(target)
    if not src.is_file():
        raise UserError(f"{src}: no such checkpoint file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(src, target):
        raise UserError(f"{src} is already {target}; nothing to promote")
    new = load_checkpoint(src)
    tmp = _copy_to_temp(src, target.parent, target.name)
    previous = previous_version = None
    try:
        if load_checkpoint(tmp).version != new.version:  # what we wrote is what we validated
            raise CheckpointError(f"{tmp}: the copy differs from {src}; not installed")
        if keep_previous and target.exists():
            try:
                previous_version = load_checkpoint(target, verify=False).version
            except CheckpointError:
                previous_version = None  # a broken model can still be kept for the record
            previous = prev_path(target)
            prev_tmp = _copy_to_temp(target, target.parent, previous.name)
            os.replace(prev_tmp, previous)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    log.info("promoted %s (version %s) to %s%s", src, new.version, target,
             f"; previous version {previous_version} kept as {previous}" if previous else "")
    return PromoteResult(target, new.version, previous, previous_version)


def promote(src: str | Path, target: str | Path, *, config: str | Path | None = None,
            device: str = "cpu", keep_previous: bool = True) -> PromoteResult:
    """Validate, optionally check against a daemon config, then install atomically."""
    ckpt = validate_checkpoint(src, device=device)
    if config is not None:
        check_config_fit(ckpt, config)
    return install_checkpoint(src, target, keep_previous=keep_previous)
