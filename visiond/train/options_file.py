"""`visiond train --options best.yaml`: training options from a YAML file (what `visiond tune` writes).

The file holds TrainOptions fields by name (`lr: 0.002`, `image_size: 48`, `augment: light`, ...);
options given on the command line win over the file, the file wins over the defaults. The dataset and
`--out` are never in the file: the same recipe trains on a grown dataset into a new checkpoint.
Values are checked against each field's type, and an unknown key fails naming the known ones, so a
typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from visiond.errors import UserError
from visiond.train.options import TrainOptions

NOT_IN_FILE = ("data", "out", "resume", "progress", "extra_meta")  # per run, not part of a recipe
_FIELDS = {f.name: str(f.type) for f in dataclasses.fields(TrainOptions) if f.name not in NOT_IN_FILE}


def _coerce(path: Path, key: str, value, kind: str):
    optional = kind.endswith("| None")
    base = kind.removesuffix("| None").strip()
    if value is None:
        if optional:
            return None
        raise UserError(f"{path}: {key}: null; expected a value ({base})")
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str), "Path": isinstance(value, str),
          "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value),
          "dict": isinstance(value, dict)}.get(base, True)  # a type added later: checked by validate()
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "Path": "a file path", "tuple[str, ...]": "a list of strings"}.get(base, base)
        raise UserError(f"{path}: {key}: {value!r}; expected {want}")
    return {"float": float, "Path": Path, "tuple[str, ...]": tuple}.get(base, lambda v: v)(value)


def read_options_file(path: str | Path) -> dict:
    """The file's options as TrainOptions keyword arguments, checked; a one-line UserError otherwise."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--options {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--options {path}: unreadable ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"--options {path}: not valid YAML{where}; expected `name: value` lines") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"--options {path}: a YAML {type(doc).__name__}; expected a mapping of option: value")
    out = {}
    for raw, value in doc.items():
        key = str(raw).replace("-", "_")
        if key in NOT_IN_FILE:
            raise UserError(f"--options {path}: {raw!r} is given per run, on the command line, not in the file")
        if key not in _FIELDS:
            raise UserError(f"--options {path}: unknown option {raw!r}; expected some of {', '.join(_FIELDS)}")
        out[key] = _coerce(path, str(raw), value, _FIELDS[key])
    return out


def apply_options_file(opts: TrainOptions, path: str | Path, explicit: set[str] | frozenset[str] = frozenset()
                       ) -> TrainOptions:
    """`opts` with the file's values, except for the fields in `explicit` (given on the command line)."""
    values = {k: v for k, v in read_options_file(path).items() if k not in explicit}
    return dataclasses.replace(opts, **values)


def options_yaml(opts: TrainOptions, keys: list[str] | None = None, header: str = "") -> str:
    """The YAML text `read_options_file` reads back into the same options (all recipe fields by default)."""
    d = opts.to_json()
    keys = [k for k in (keys or list(_FIELDS)) if k in _FIELDS]
    body = yaml.safe_dump({k: d[k] for k in keys}, sort_keys=False, default_flow_style=False)
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + body
