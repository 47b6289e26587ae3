"""Where a frame goes on its way to the model: pure decisions, testable without a GPU.

The CUDA path once crashed on its first real frame because two spellings of one
device compared unequal (`torch.device("cuda")` has no index, a tensor on it
reports `cuda:0`) and a tensor already on the GPU was then `pin_memory()`-ed.
Every such decision now lives here as a function of `torch.device` values and
flags only, so tests cover 'cuda' against 'cuda:0' on a machine with no GPU, and
`TorchClassifier` calls exactly these functions.
"""

from __future__ import annotations

from typing import Literal

import torch

from visiond.models.checkpoint import CheckpointError

Move = Literal["none", "upload", "download", "peer"]
Site = Literal["host", "device"]
RESIZE_ON = ("cpu", "gpu", "auto")
DEVICE_RESIZES = ("linear", "nearest")  # the spec resizes the torch twin reproduces (preprocess.gpu_resize_uint8)


def choose_device(requested: str, *, cuda_available: bool, device_count: int, current: int = 0) -> torch.device:
    """`model.device` -> an indexed device: 'auto' and 'cuda' name the current CUDA device as cuda:N."""
    text = str(requested).strip()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", current) if cuda_available and device_count > 0 else torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not cuda_available or device_count < 1:
            raise CheckpointError(f"model.device {text!r}: no CUDA device is available here; use auto or cpu")
        tail = text.partition(":")[2]
        if tail and not tail.isdigit():
            raise CheckpointError(f"model.device {text!r}: expected auto, cpu, cuda or cuda:N")
        idx = int(tail) if tail else current
        if idx >= device_count:
            raise CheckpointError(f"model.device {text!r}: only {device_count} CUDA device(s) present")
        return torch.device("cuda", idx)
    raise CheckpointError(f"model.device {text!r}: expected auto, cpu, cuda or cuda:N")


def canonical(device: torch.device | str, current: int = 0) -> tuple[str, int]:
    """(type, index) with a missing index filled in: cuda -> the current device, cpu (and others) -> 0."""
    d = torch.device(device)
    if d.index is not None:
        return d.type, d.index
    return d.type, current if d.type == "cuda" else 0


def same_device(a: torch.device | str, b: torch.device | str, current: int = 0) -> bool:
    """True when a and b are one device: 'cuda' and 'cuda:<current>' are; 'cuda:0' and 'cuda:1' are not."""
    return canonical(a, current) == canonical(b, current)


def move_for(src: torch.device | str, dst: torch.device | str, current: int = 0) -> Move:
    """What a tensor on `src` needs before a model on `dst` can read it."""
    if same_device(src, dst, current):
        return "none"
    s, d = torch.device(src).type, torch.device(dst).type
    if s == "cpu" and d == "cuda":
        return "upload"
    if s == "cuda" and d == "cpu":
        return "download"
    return "peer"


def needs_pinning(src: torch.device | str, dst: torch.device | str, *, pinned: bool, current: int = 0) -> bool:
    """Pin (page-lock) host memory only for a host -> CUDA upload of memory not pinned yet; never a GPU tensor."""
    return move_for(src, dst, current) == "upload" and not pinned


def model_dtype(device: torch.device | str, precision: str) -> torch.dtype:
    """The dtype the model is cast to once at load (no autocast per batch).

    CUDA: auto and fp16 -> float16, bf16 -> bfloat16. CPU: bf16 is honoured (recent CPUs run it
    natively); auto and fp16 stay float32 (fp16 convolutions on a CPU are emulated and slow).
    """
    kind = torch.device(device).type
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision in ("auto", "fp16"):
        return torch.float16 if kind == "cuda" else torch.float32
    raise ValueError(f"model.precision {precision!r}: expected auto, fp32, fp16 or bf16")


def resize_site(resize_on: str, spec_resize: str, *, frames_on_device: bool, measured: Site | None = None) -> Site:
    """Where the frames of one batch are resized: 'host' (cv2, then one upload of the small inputs) or 'device'.

    Frames decoded on the GPU (NVDEC) are resized there, unless the spec's resize has no
    torch twin. Otherwise `model.resize_on`: cpu -> host, gpu -> device (on a CPU model
    device that is the torch resize on the CPU: the same code path, used by the tests),
    auto -> what warm-up measured to be faster on this machine, host until it has.
    """
    if resize_on not in RESIZE_ON:
        raise ValueError(f"model.resize_on {resize_on!r}: expected one of {', '.join(RESIZE_ON)}")
    if spec_resize not in DEVICE_RESIZES:
        return "host"
    if frames_on_device:
        return "device"
    if resize_on == "gpu":
        return "device"
    if resize_on == "auto" and measured is not None:
        return measured
    return "host"
