"""One short script for a lent GPU machine: the CUDA path against the CPU path, and its speed.

Run from the repo root with the venv: `python tools/gpu_check.py [--out DIR]`. It
renders a synthetic line, trains nothing (random weights are enough to compare
paths), and reports: fp32/fp16 CUDA vs CPU max prob difference, GPU-resize vs
CPU-resize agreement, and model-only fps per batch size for smallcnn@64 and
mobilenet_v3_small@224 on CUDA with autocast + channels_last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from visiond.models.arch import build_model  # noqa: E402
from visiond.models.checkpoint import save_checkpoint  # noqa: E402
from visiond.models.runtime import TorchClassifier  # noqa: E402
from visiond.preprocess import PreprocessSpec, gpu_resize_uint8, stack_uint8  # noqa: E402


def _ckpt(tmp: Path, arch: str, size: int):
    torch.manual_seed(0)
    args = {"in_channels": 3, "image_size": size} if arch == "smallcnn" else {"in_channels": 3}
    model = build_model(arch, 4, **args)
    return save_checkpoint(tmp / f"{arch}.ckpt", arch=arch, classes=["a", "b", "c", "d"],
                           spec=PreprocessSpec.for_color(size, imagenet=arch != "smallcnn"),
                           state_dict=model.state_dict(), arch_args=args)


def _fps(clf, frames, batch, seconds=1.0):
    for _ in range(3):
        clf.predict_images(frames[:batch])
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clf.predict_images(frames[:batch])
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8) for _ in range(64)]
    for arch, size in (("smallcnn", 64), ("mobilenet_v3_small", 224), ("resnet18", 224)):
        ck = _ckpt(args.out, arch, size)
        cpu = TorchClassifier(ck, "cpu", threads=0)
        x = stack_uint8(frames[:8], ck.spec)
        ref = cpu.predict(x)
        row = {}
        for prec in ("fp32", "fp16", "bf16"):
            gpu = TorchClassifier(ck, "cuda", precision=prec)
            row[f"max_prob_diff_{prec}"] = float(np.abs(gpu.predict(x) - ref).max())
        gpu = TorchClassifier(ck, "cuda", precision="auto")
        on_dev = gpu_resize_uint8([torch.from_numpy(f).cuda() for f in frames[:8]], ck.spec).cpu().numpy()
        row["gpu_resize_max_level_diff"] = int(np.abs(on_dev.astype(int) - x.astype(int)).max())
        row["fps_1080p_frames"] = {b: round(_fps(gpu, frames, b)) for b in (1, 4, 16, 64)}
        report[arch] = row
        print(arch, json.dumps(row), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
