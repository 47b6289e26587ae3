"""The resume file: everything `--resume` needs to continue a run exactly, without pickle.

Tensors (weights, optimizer moments, RNG states) go into a safetensors file; everything
else (epoch, scheduler, early-stopping state, history, param groups) into JSON in its
header. Loading parses only those two, so a resume file is as safe to open as a checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from visiond.errors import UserError
from visiond.fsutil import atomic_replace

FORMAT = "visiond.resume/1"
RESUME_NAME = "resume.safetensors"


def _optimizer_to_flat(opt_state: dict, tensors: dict) -> dict:
    """Split an optimizer state dict into tensors (added to `tensors`) and JSON."""
    scalars: dict[str, dict] = {}
    for pid, st in opt_state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(js: dict, tensors: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    for pid, kv in js["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in js["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng(tensors: dict) -> dict:
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0]}


def restore_rng(js: dict, tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = js["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((js["python_version"], tuple(js["python"]), None))


def save_resume(path: Path, *, model_state: dict, optimizer, scheduler, scaler, info: dict,
                ema_state: dict | None = None) -> None:
    """Write atomically; `info` is JSON (epoch, history, early stopping, identity of the run);
    `ema_state` is the moving average of the weights, when the run keeps one."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema_state or {}).items()}
    opt = _optimizer_to_flat(optimizer.state_dict(), tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    rng = capture_rng(tensors)
    js = {"format": FORMAT, "info": info, "optimizer": opt, "rng": rng,
          "scheduler": scheduler.state_dict() if scheduler is not None else None,
          "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    header = json.dumps(js, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path) as tmp:
        save_file(tensors, str(tmp), metadata={"visiond_resume": header})


class ResumeState:
    """A loaded resume file; `apply` puts optimizer, scheduler, scaler and RNG back."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 0 < n < 1 << 28 else {}
            js = json.loads(header["__metadata__"]["visiond_resume"])
            tensors = load_file(str(path), device="cpu")
        except FileNotFoundError:
            raise UserError(f"--resume {path}: no such file; expected a {RESUME_NAME} written by 'visiond train'") \
                from None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise UserError(f"--resume {path}: not a visiond resume file ({exc.__class__.__name__}); "
                            f"expected the {RESUME_NAME} beside a training run") from None
        if js.get("format") != FORMAT:
            raise UserError(f"--resume {path}: format {js.get('format')!r}; expected {FORMAT!r}")
        self.path, self.js, self.tensors = path, js, tensors
        self.info: dict = js["info"]
        self.model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None

    def apply(self, optimizer, scheduler, scaler) -> None:
        state = _optimizer_from_flat(self.js["optimizer"], self.tensors)
        if len(state["param_groups"]) != len(optimizer.param_groups):
            raise UserError(f"--resume {self.path}: its optimizer has {len(state['param_groups'])} parameter "
                            f"group(s), this run's {len(optimizer.param_groups)} (a run from an older visiond, or "
                            "other --weights/--init-from); start a new run instead")
        optimizer.load_state_dict(state)
        if scheduler is not None and self.js["scheduler"] is not None:
            scheduler.load_state_dict(self.js["scheduler"])
        if scaler is not None and self.js["scaler"] is not None:
            scaler.load_state_dict(self.js["scaler"])
        restore_rng(self.js["rng"], self.tensors)


def resume_path_for(arg: str | Path) -> Path:
    """`--resume` takes the resume file, the run directory, or the run's model.ckpt / model.last.ckpt."""
    p = Path(arg)
    if p.is_dir():
        return p / RESUME_NAME
    if p.suffix == ".ckpt":
        stem = p.stem[: -len(".last")] if p.stem.endswith(".last") else p.stem
        return p.with_name(f"{stem}.train") / RESUME_NAME
    return p
