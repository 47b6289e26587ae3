"""Starting from weights someone already trained: an ImageNet state dict or a visiond checkpoint.

ImageNet files are read with `torch.load(weights_only=True)`: tensors only, never code.
The classifier head is left freshly initialised for this dataset's classes; a visiond
checkpoint being fine-tuned keeps the head rows of the classes it already knew.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from visiond.errors import UserError
from visiond.models.checkpoint import Checkpoint
from visiond.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

log = logging.getLogger(__name__)


def head_name(model: nn.Module) -> str:
    """The module name of the classifier head (the last Linear layer)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear head to replace or keep trainable")
    return names[-1]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-style state dict (torch.save or safetensors), refusing anything that needs unpickling code."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
        why = lines[0][:160] if lines else exc.__class__.__name__
        raise UserError(f"--weights {path}: refused: it holds more than tensors, and weights are only loaded "
                        f"with torch.load(weights_only=True) ({why})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights {path}: expected a dict of tensors (a torchvision state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            if "visiond" in (f.metadata() or {}):
                raise UserError(f"--weights {path}: is a visiond checkpoint; fine-tune it with --init-from")
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise UserError(f"--weights {path}: unreadable safetensors file ({exc})") from None


def fold_rgb_conv(weight: torch.Tensor, gray_mean: float = 0.5, gray_std: float = 0.5,
                  rgb_mean=IMAGENET_MEAN, rgb_std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB first convolution (out x 3 x k x k) as a grey one (out x 1 x k x k) plus a per-output offset.

    A grey image tripled into RGB and normalised per channel, (x - m_c) / s_c, equals the grey
    normalisation g = (x - m) / s as (s / s_c) g + (m - m_c) / s_c. So the grey filter is
    sum_c W_c s / s_c (the sum over colour, each channel rescaled by its std), and the
    constant part, sum over c and taps of W_c (m - m_c) / s_c, is an offset per output channel:
    the result equals the tripled input's everywhere but at the padded border, at a third of the
    first layer's cost and memory.
    """
    scale = torch.tensor([gray_std / s for s in rgb_std], dtype=weight.dtype).view(1, 3, 1, 1)
    shift = torch.tensor([(gray_mean - m) / s for m, s in zip(rgb_mean, rgb_std)], dtype=weight.dtype)
    folded = (weight * scale).sum(dim=1, keepdim=True)
    offset = (weight.sum(dim=(2, 3)) * shift).sum(dim=1)
    return folded, offset


def _absorb_offset(model: nn.Module, dst: dict, conv_key: str, offset: torch.Tensor) -> None:
    """Add the folded convolution's constant where it costs nothing: its bias if it has one, else the
    running mean of the BatchNorm right after it (in training, batch statistics cancel it anyway)."""
    prefix = conv_key.rsplit(".", 1)[0]
    if prefix + ".bias" in dst:
        dst[prefix + ".bias"] = dst[prefix + ".bias"] + offset
        return
    names = [n for n, _ in model.named_modules()]
    after = names[names.index(prefix) + 1:] if prefix in names else []
    for name in after:
        m = model.get_submodule(name)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == offset.numel():
            dst[name + ".running_mean"] = dst[name + ".running_mean"] - offset
            return
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            break
    log.warning("%s: no bias or BatchNorm follows the folded first convolution; its constant is dropped", prefix)


def load_imagenet_weights(model: nn.Module, path: Path, arch: str, spec: PreprocessSpec | None = None) -> None:
    """Copy every matching tensor; the head stays new; a grey first conv gets the RGB filters folded
    (`fold_rgb_conv`) instead of the image being tripled."""
    src = read_state_dict(path)
    dst = model.state_dict()
    head = head_name(model) + "."
    gray = (spec.mean[0], spec.std[0]) if spec is not None and spec.channels == 1 else (0.5, 0.5)
    loaded, unexpected, folded = 0, [], None
    for key, value in src.items():
        if key not in dst:
            unexpected.append(key)
        elif dst[key].shape == value.shape:
            dst[key] = value.to(dst[key].dtype)
            loaded += 1
        elif value.ndim == 4 and dst[key].ndim == 4 and dst[key].shape[1] == 1 and value.shape[1] == 3:
            weight, offset = fold_rgb_conv(value.float(), *gray)  # RGB filters seen by a grey image
            dst[key], folded = weight.to(dst[key].dtype), (key, offset)
            loaded += 1
        elif not key.startswith(head):
            unexpected.append(f"{key} {tuple(value.shape)} vs {tuple(dst[key].shape)}")
    missing = [k for k in dst if k not in src and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise UserError(f"--weights {path} does not fit --arch {arch}: {len(missing)} tensors missing "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected or misshapen (e.g. {unexpected[:2]}); "
                        f"expected the torchvision ImageNet state dict of {arch}")
    if folded is not None:
        _absorb_offset(model, dst, *folded)
        log.info("grey input: the RGB filters of %s are folded into one channel", folded[0])
    model.load_state_dict(dst)
    log.info("loaded %d tensors from %s; new head %s for this dataset", loaded, path, head.rstrip("."))


def load_from_checkpoint(model: nn.Module, ckpt: Checkpoint, classes: list[str]) -> None:
    """Fine-tune start: same-shaped tensors copied, head rows copied by class name.

    Classes may grow: a tensor whose first axis is the class count gets the rows of the
    classes the old model knew, and new classes keep their fresh initialisation.
    """
    dst = model.state_dict()
    head = head_name(model) + "."
    old_index = {c: i for i, c in enumerate(ckpt.classes)}
    rows = [(new_i, old_index[c]) for new_i, c in enumerate(classes) if c in old_index]
    for key, value in ckpt.state_dict.items():
        if key not in dst:
            raise UserError(f"--init-from: tensor {key} of the checkpoint has no place in this network")
        if key.startswith(head) and value.shape[:1] == (len(ckpt.classes),) \
                and dst[key].shape == (len(classes), *value.shape[1:]):
            for new_i, old_i in rows:
                dst[key][new_i] = value[old_i]
        elif dst[key].shape == value.shape:
            dst[key] = value
        else:
            raise UserError(f"--init-from: tensor {key} {tuple(value.shape)} does not fit {tuple(dst[key].shape)}")
    model.load_state_dict(dst)
    new = [c for c in classes if c not in old_index]
    log.info("initialised from %s (version %s)%s", ckpt.name, ckpt.version,
             f"; new classes {new} start from scratch" if new else "")


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze everything but the head (and keep frozen BatchNorm statistics fixed)."""
    head = head_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith(head + "."))
    model._visiond_frozen = frozen  # read by `frozen_batchnorm_eval` after model.train()


def set_batchnorm_frozen(model: nn.Module, frozen: bool) -> None:
    """Every BatchNorm layer keeps its running statistics while training (its scale and shift still
    learn): batches of a few images give statistics too noisy to replace ImageNet's."""
    model._visiond_bn_frozen = frozen  # read by `frozen_batchnorm_eval` after model.train()


def frozen_batchnorm_eval(model: nn.Module) -> None:
    """model.train() turns BatchNorm back on; a frozen backbone keeps its ImageNet statistics, and so
    does every BatchNorm layer when `set_batchnorm_frozen` said so."""
    if getattr(model, "_visiond_bn_frozen", False):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return
    if getattr(model, "_visiond_frozen", False):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
