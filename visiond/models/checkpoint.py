"""The checkpoint: one safetensors file = weights + JSON metadata, never a pickle.

Layout: tensors are the model's state dict; the safetensors header's
`__metadata__` holds `visiond` = JSON with format, name, arch, arch_args,
classes, preprocess spec, training metadata (with `meta.temperature`, the
softmax temperature fitted at the end of training; absent = 1.0, so older
files load unchanged) and `version` (a content hash of everything else).
Loading parses JSON and raw tensors only, so a hostile file gets a clear
error and no code runs, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from visiond import __version__
from visiond.errors import CheckpointError
from visiond.fsutil import atomic_replace
from visiond.models.arch import ARCHITECTURES, build_model
from visiond.preprocess import PreprocessSpec

FORMAT = "visiond.checkpoint/1"
_MAX_HEADER = 100 * 1024 * 1024
MAX_CLASSES = 10_000


@dataclass(frozen=True)
class Checkpoint:
    name: str
    arch: str
    arch_args: dict
    classes: tuple[str, ...]
    spec: PreprocessSpec
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    meta: dict = field(default_factory=dict)
    version: str = ""

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on the validation split (meta['temperature']; 1.0 when never fitted).

        Every runtime and export divides the logits by it before softmax, so scores read as confidence.
        """
        return float(self.meta.get("temperature", 1.0))

    @property
    def thresholds(self) -> dict[str, float]:
        """Per-class score thresholds written by `visiond evaluate --write-threshold`."""
        return {str(k): float(v) for k, v in self.meta.get("thresholds", {}).items()}

    def build(self) -> nn.Module:
        """The network with these weights, in eval mode."""
        try:
            with torch.device("meta"):  # shapes only: a hostile class count or argument allocates nothing
                wanted = build_model(self.arch, len(self.classes), **self.arch_args).state_dict()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"architecture {self.arch!r} refuses arguments {_brief(self.arch_args)}: "
                                  f"{str(exc).splitlines()[0][:160]}") from None
        wrong = [(k, list(v.shape), list(wanted[k].shape)) for k, v in self.state_dict.items()
                 if k in wanted and v.shape != wanted[k].shape]
        if wrong:  # torch would raise a many-line RuntimeError; say it in one
            name, got, expected = wrong[0]
            raise CheckpointError(
                f"weights do not fit architecture {self.arch!r} with {len(self.classes)} classes "
                f"({len(wrong)} tensor(s) of the wrong shape, e.g. {name}: {got} in the file, {expected} expected; "
                f"class list and weights disagree?)"
            )
        missing = [k for k in wanted if k not in self.state_dict]  # checked on shapes too: before allocating
        unexpected = [k for k in self.state_dict if k not in wanted]
        if missing or unexpected:
            raise CheckpointError(
                f"weights do not fit architecture {self.arch!r} with {len(self.classes)} classes "
                f"(missing {len(missing)} tensors e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
            )
        model = build_model(self.arch, len(self.classes), **self.arch_args)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"weights do not fit architecture {self.arch!r} with {len(self.classes)} classes "
                f"(missing {len(missing)} tensors e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
            )
        return model.eval()


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _header_json(ckpt_fields: dict) -> str:
    return json.dumps(ckpt_fields, sort_keys=True, separators=(",", ":"))


def _content_hash(fields: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(_header_json({k: v for k, v in fields.items() if k != "version"}).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    *,
    arch: str,
    classes: list[str] | tuple[str, ...],
    spec: PreprocessSpec,
    state_dict: dict[str, torch.Tensor],
    arch_args: dict | None = None,
    meta: dict | None = None,
    name: str | None = None,
) -> Checkpoint:
    """Write atomically (temp file + rename) so a watcher never sees half a file."""
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta or {})
    meta.setdefault("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("visiond_version", __version__)
    _check_temperature(meta.get("temperature", 1.0), str(path))
    fields = {
        "format": FORMAT,
        "name": name or path.stem,
        "arch": arch,
        "arch_args": dict(arch_args or {}),
        "classes": list(classes),
        "preprocess": spec.to_dict(),
        "meta": meta,
    }
    fields["version"] = _content_hash(fields, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path) as tmp:
        save_file(tensors, str(tmp), metadata={"visiond": _header_json(fields)})
    return _from_fields(fields, tensors)


def _sniff(path: Path) -> None:
    """Recognise what a non-visiond file is, to say so in one line."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: file is empty; expected a visiond checkpoint (safetensors)")
    size = path.stat().st_size
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if len(head) >= 9 and head[8:9] == b"{" and 0 < n <= _MAX_HEADER:
        if n + 8 > size:
            raise CheckpointError(f"{path}: truncated (header says {n} bytes, file has {size})")
        return
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and 2 <= head[1] <= 5):  # torch.save zip / pickle
        raise CheckpointError(
            f"{path}: is a pickle/torch.save file; visiond checkpoints are safetensors and pickles are never loaded "
            f"(convert it with `visiond train --weights` or re-export it)"
        )
    if len(head) < 9:
        raise CheckpointError(f"{path}: truncated ({len(head)} bytes); expected a visiond checkpoint")
    raise CheckpointError(f"{path}: not a safetensors file (bad header); expected a visiond checkpoint")


def read_header(path: str | Path) -> dict:
    """The checkpoint's metadata without loading the weights."""
    path = Path(path)
    _sniff(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
            need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            size = path.stat().st_size
            if need > size:
                raise CheckpointError(f"{path}: truncated (its tensors need {need} bytes, the file has {size})")
            fields = json.loads(header["__metadata__"]["visiond"])
            if not isinstance(fields, dict):
                raise TypeError(f"metadata is a JSON {type(fields).__name__}, not an object")
            return fields
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: safetensors file without visiond metadata ({exc.__class__.__name__}); "
                                  "expected a checkpoint written by visiond") from None


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    path = Path(path)
    try:
        fields = read_header(path)
        tensors = load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory; expected a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied reading the checkpoint") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if fields.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {fields.get('format')!r}; expected {FORMAT!r}")
    ckpt = _from_fields(fields, tensors, where=str(path))
    if verify and _content_hash(fields, tensors) != ckpt.version:
        raise CheckpointError(f"{path}: content hash mismatch (file altered or corrupt); expected version {ckpt.version}")
    for name, t in tensors.items():  # NaN weights would publish NaN scores: invalid JSON downstream
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values; expected finite weights")
    return ckpt


TEMPERATURE_RANGE = (0.05, 20.0)


def _check_temperature(value, where: str) -> None:
    """A temperature outside the fitted range would turn every score into 0/1 or uniform: refuse it."""
    lo, hi = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise CheckpointError(f"{where}: meta temperature {_brief(value)}: expected a number in [{lo:g}, {hi:g}] "
                              "(the softmax temperature fitted on the validation split)")


def _from_fields(fields: dict, tensors: dict, where: str = "checkpoint") -> Checkpoint:
    try:
        arch = str(fields["arch"])
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{where}: unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        classes = tuple(str(c) for c in fields["classes"])
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise CheckpointError(f"{where}: classes {list(classes)[:10]}: expected at least 2 distinct names")
        if len(classes) > MAX_CLASSES or not all(0 < len(c) <= 128 and c.isprintable() for c in classes):
            raise CheckpointError(f"{where}: {len(classes)} classes {_brief(list(classes[:5]))}...: expected at most "
                                  f"{MAX_CLASSES} printable names of 1..128 characters (they become labels and topics)")
        _check_temperature(dict(fields.get("meta") or {}).get("temperature", 1.0), where)
        return Checkpoint(
            name=str(fields.get("name") or "model"),
            arch=arch,
            arch_args=dict(fields.get("arch_args") or {}),
            classes=classes,
            spec=PreprocessSpec.from_dict(fields["preprocess"]),
            state_dict=tensors,
            meta=dict(fields.get("meta") or {}),
            version=str(fields.get("version", "")),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed metadata ({exc.__class__.__name__}: {exc})") from None
