"""One script for a lent GPU machine: is the CUDA path right, and how fast is it. `--dry-run` runs it on a CPU.

    python tools/gpu_check.py [--out DIR] [--dry-run]

Writes `gpu_check.json` into `--out`, default `$OUT` when set (the device machine's
folder that comes back), else `./gpu-check`. Sections, each `status` ok | skipped
(with `reason`) | error (with `error`), so one failure never hides the others:

- machine: torch, CUDA, the GPU, onnxruntime's providers.
- parity: fp16/bf16/fp32 on the device against fp32 on the CPU; GPU resize against cv2.
- model_fps: model-only frames/s, p50/p99 per batch and peak GPU memory, per runtime
  (torch, onnxruntime), arch (resnet18, mobilenet_v3_small at 224), precision and batch.
- resize_paths: 1080p frames through `predict_images` with the CPU resize and the GPU
  resize side by side (and pipelined: the next batch prepared while the GPU runs).
- nvdec: 1080p H.264 decode fps, NVDEC (frames left on the GPU) against the daemon's
  OpenCV decoder.
- amp_train_step: one mixed-precision training step (fp16 + GradScaler on CUDA).
- streams: the largest number of 1080p30 file cameras the daemon's own sources and
  inference worker (in-process) serve with every frame delivered and p99 < 50 ms.

Random weights throughout (nothing is downloaded, nothing trained): speed and agreement
do not depend on what the network learned. On the GPU it keeps to about 6 minutes.
`--dry-run` uses tiny inputs on the CPU through the same calls, in well under a minute;
the GPU-only figures are then `skipped` with their reason (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from visiond.models.arch import build_model  # noqa: E402
from visiond.models.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from visiond.models.onnx_runtime import OnnxClassifier  # noqa: E402
from visiond.models.runtime import TorchClassifier, resolve_device  # noqa: E402
from visiond.preprocess import PreprocessSpec, gpu_resize_uint8, stack_uint8  # noqa: E402

console = Console(stderr=True)
NO_GPU = "no CUDA GPU on this machine"
CLASSES = ["ok", "scratch", "dent", "stain"]


@dataclass(frozen=True)
class Plan:
    """Every size the check uses: the real one for a GPU, a tiny one for --dry-run (same code, smaller numbers)."""

    archs: tuple[str, ...] = ("resnet18", "mobilenet_v3_small")
    size: int = 224
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
    batches: tuple[int, ...] = (1, 8, 32, 128)
    seconds: float = 1.5  # per measured configuration
    frame: tuple[int, int] = (1080, 1920)
    resize_batches: tuple[int, ...] = (1, 8, 32)
    video_frames: int = 300
    train_batch: int = 64
    streams_limit_ms: float = 50.0
    streams_fps: float = 30.0
    streams_warm_s: float = 3.0
    streams_hold_s: float = 10.0
    streams_max: int = 64
    budget_s: float = 420.0  # the streams search stops raising N past this (the whole check < 8 min)
    ort_archs: tuple[str, ...] = ("resnet18", "mobilenet_v3_small")


# the dry run's onnxruntime leg exports a smallcnn: the same OnnxClassifier path, without a minute of export
DRY = Plan(archs=("resnet18", "mobilenet_v3_small"), size=32, batches=(1, 4), seconds=0.05, frame=(96, 128),
           resize_batches=(1, 4), video_frames=20, train_batch=4, streams_warm_s=0.5, streams_hold_s=1.0,
           streams_max=2, budget_s=45.0, ort_archs=("smallcnn",))


# --------------------------------------------------------------------------- helpers


def _ckpt(tmp: Path, arch: str, size: int) -> Checkpoint:
    torch.manual_seed(0)
    net = build_model(arch, len(CLASSES), 3, size)
    return save_checkpoint(tmp / f"{arch}-{size}.ckpt", arch=arch, classes=CLASSES,
                           spec=PreprocessSpec.for_color(size, imagenet=arch != "smallcnn"), state_dict=net.state_dict(),
                           arch_args={"in_channels": 3, "image_size": size}, name=f"{arch}-{size}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mb():
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _timed(fn: Callable[[], object], images_per_call: int, seconds: float, warm: int = 2) -> dict:
    """Call fn until `seconds` passed (at least 3 calls): images/s and the p50/p99 of one call, in ms."""
    for _ in range(warm):
        fn()
    _sync()
    _peak_reset()
    took: list[float] = []
    start = time.perf_counter()
    while len(took) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)
    _sync()
    total = time.perf_counter() - start
    ms = np.array(took) * 1e3
    return {"fps": round(len(took) * images_per_call / total, 1), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "calls": len(took), "peak_gpu_mb": _peak_mb()}


def _frames(n: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), (9, 9), 3)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def _first_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# --------------------------------------------------------------------------- sections


def machine(plan: Plan, dry: bool) -> dict:
    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "dry_run": dry,
           "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        dev = resolve_device("auto")
        out |= {"device": str(dev), "gpu": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda,
                "gpu_memory_gb": round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)}
    else:
        out |= {"device": "cpu", "gpu": None, "gpu_skipped": NO_GPU}
    try:
        import onnxruntime as ort

        out |= {"onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers()}
    except ImportError:
        out["onnxruntime"] = None
    return out


def parity(plan: Plan, ckpts: dict[str, Checkpoint], device: str) -> dict:
    rows = []
    for arch, ck in ckpts.items():
        frames = _frames(8, plan.frame, seed=1)
        x = stack_uint8(frames, ck.spec)
        ref = TorchClassifier(ck, "cpu", precision="fp32", threads=0).predict(x)
        row: dict = {"arch": arch}
        for prec in plan.precisions:
            clf = TorchClassifier(ck, device, precision=prec, threads=0)
            if clf.dtype == torch.float32 and prec != "fp32":
                row[f"max_prob_diff_{prec}"] = {"skipped": f"{prec} runs on CUDA only (the CPU keeps fp32)"}
                continue
            row[f"max_prob_diff_{prec}"] = round(float(np.abs(clf.predict(x) - ref).max()), 5)
        dev = resolve_device(device)
        on_dev = gpu_resize_uint8([torch.from_numpy(f).to(dev) for f in frames], ck.spec).cpu().numpy()
        row["gpu_resize_max_level_diff"] = int(np.abs(on_dev.astype(int) - x.astype(int)).max())
        rows.append(row)
    return {"device": device, "rows": rows}


def model_fps(plan: Plan, ckpts: dict[str, Checkpoint], device: str, cache: Path) -> dict:
    rows, skipped = [], {}
    for arch, ck in ckpts.items():
        for prec in plan.precisions:
            clf = TorchClassifier(ck, device, precision=prec, threads=0)
            if clf.dtype == torch.float32 and prec != "fp32":
                skipped[f"torch {arch} {prec}"] = f"{prec} runs on CUDA only (the CPU keeps fp32)"
                continue
            dev = torch.device(clf.device)
            for b in plan.batches:
                x = torch.from_numpy(stack_uint8(_frames(b, (plan.size, plan.size), 2), ck.spec)).to(dev)
                r = _timed(lambda: clf.predict(x), b, plan.seconds)  # input already on the device: model only
                rows.append({"runtime": "torch", "device": clf.device, "arch": arch, "input": plan.size,
                             "precision": prec, "batch": b, **r})
                console.log(f"torch {arch} {prec} batch {b}: {r['fps']:.0f} fps, p99 {r['p99_ms']:.2f} ms")
    for arch in plan.ort_archs:
        ck = ckpts.get(arch) or _ckpt(cache.parent, arch, plan.size)
        try:  # TensorRT not timed here: its engine build alone can take minutes
            ort_clf = OnnxClassifier(ck, cache, threads=0, device=device, tensorrt=False)
        except Exception as exc:  # noqa: BLE001 - recorded, the rest goes on
            skipped[f"onnxruntime {arch}"] = _first_line(exc)
            continue
        for b in plan.batches:
            x = stack_uint8(_frames(b, (plan.size, plan.size), 2), ck.spec)
            r = _timed(lambda: ort_clf.predict(x), b, plan.seconds)
            r["peak_gpu_mb"] = None  # onnxruntime's memory is not torch's to count
            rows.append({"runtime": "onnxruntime", "device": ort_clf.device, "arch": arch, "input": plan.size,
                         "precision": "fp32", "batch": b, **r})
            console.log(f"onnxruntime ({ort_clf.device}) {arch} batch {b}: {r['fps']:.0f} fps")
    if not torch.cuda.is_available():
        skipped["peak_gpu_mb"] = NO_GPU
    skipped["onnxruntime TensorRT"] = "not timed: its engine build alone can take minutes (the daemon caches it)"
    return {"rows": rows, "skipped": skipped}


def resize_paths(plan: Plan, ckpts: dict[str, Checkpoint], device: str) -> dict:
    rows = []
    arch = "mobilenet_v3_small" if "mobilenet_v3_small" in ckpts else next(iter(ckpts))
    ck = ckpts[arch]
    for path in ("cpu", "gpu"):
        clf = TorchClassifier(ck, device, precision="auto", threads=0, resize_on=path)
        for b in plan.resize_batches:
            frames = _frames(b, plan.frame, 3)
            r = _timed(lambda: clf.predict_images(frames), b, plan.seconds)
            rows.append({"path": f"{path}-resize", "arch": arch, "frame": list(plan.frame), "batch": b,
                         "device": clf.device, **r})

            def pipelined():  # two batches in flight: the CPU prepares one while the GPU runs the other
                p = clf.submit_images(frames)
                q = clf.submit_images(frames)
                clf.collect(p)
                clf.collect(q)

            r = _timed(pipelined, 2 * b, plan.seconds)
            rows.append({"path": f"{path}-resize-pipelined", "arch": arch, "frame": list(plan.frame), "batch": b,
                         "device": clf.device, **r})
            console.log(f"{path} resize {arch} {plan.frame[1]}x{plan.frame[0]} batch {b}: {rows[-2]['fps']:.0f} fps "
                        f"({rows[-1]['fps']:.0f} pipelined)")
    auto = TorchClassifier(ck, device, precision="auto", threads=0, resize_on="auto")
    auto.warmup(max(plan.resize_batches), frame_shapes=[(*plan.frame, 3)])
    out = {"rows": rows, "auto_chose": {"host": "cpu", "device": "gpu", None: "cpu (not measured on a CPU device)"}[
        auto.measured_site]}
    if not torch.cuda.is_available():
        out["skipped"] = {"gpu-resize on a GPU": f"{NO_GPU}: the torch resize ran on the CPU (same code path)"}
    return out


def synth_video(path: Path, frames: int, hw: tuple[int, int]) -> Path:
    """An H.264 1080p30 (dry run: tiny) video: ffmpeg's test pattern, or OpenCV's mp4v when ffmpeg is missing."""
    h, w = hw
    if shutil.which("ffmpeg"):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate=30",
                        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                        "-g", "30", str(path)], check=True, timeout=300)
        return path
    import cv2

    path = path.with_suffix(".avi")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
    for f in _frames(frames, hw, 4):
        writer.write(f)
    writer.release()
    return path


def nvdec(plan: Plan, video: Path) -> dict:
    from visiond.config import CameraConfig
    from visiond.serve.nvdec import NvdecCapture, nvdec_unavailable
    from visiond.video import open_capture

    cam = CameraConfig(name="check", source=str(video))
    out: dict = {"video": {"frames": plan.video_frames, "size": [plan.frame[1], plan.frame[0]],
                           "codec": "h264" if video.suffix == ".mp4" else "mp4v"}}
    cap, n, t0 = open_capture(str(video), cam), 0, time.perf_counter()
    while cap.grab():
        ok, _img = cap.retrieve()
        n += ok
    cap.release()
    out["opencv_fps"] = round(n / (time.perf_counter() - t0), 1)
    out["opencv_frames"] = n
    why = nvdec_unavailable("file")
    if why is not None:
        out["nvdec_fps"] = {"skipped": why}
        return out
    for host in (False, True):
        cap, m, t0 = NvdecCapture(str(video), cam), 0, time.perf_counter()
        while cap.grab():
            if host:
                cap.retrieve()  # + the host copy every frame gets for evidence and the live page
            m += 1
        _sync()
        out["nvdec_fps_with_host_copy" if host else "nvdec_fps"] = round(m / (time.perf_counter() - t0), 1)
        out["nvdec_frames"] = m
        cap.release()
    return out


def amp_train_step(plan: Plan, device: str) -> dict:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    arch = "resnet18"
    torch.manual_seed(0)
    model = build_model(arch, len(CLASSES), 3, plan.size).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    dtype = torch.float16 if cuda else torch.bfloat16
    x = torch.randn(plan.train_batch, 3, plan.size, plan.size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, len(CLASSES), (plan.train_batch,), device=dev)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))

    r = _timed(step, plan.train_batch, plan.seconds, warm=1)
    out = {"arch": arch, "input": plan.size, "batch": plan.train_batch, "device": str(dev),
           "autocast": str(dtype).removeprefix("torch."), "grad_scaler": cuda, "step_ms": r["p50_ms"],
           "images_per_s": r["fps"], "peak_gpu_mb": r["peak_gpu_mb"], "loss_finite": all(map(math.isfinite, losses))}
    if not cuda:
        out["skipped"] = {"fp16 + GradScaler": f"{NO_GPU}: bf16 autocast on the CPU instead"}
    return out


class _LatencySink:
    """Keeps capture -> verdict latency of every prediction after `open()` (the worker's sink interface)."""

    def __init__(self):
        self.lat: list[float] = []
        self.recording = False
        self.lock = threading.Lock()

    def submit(self, predictions) -> None:
        if self.recording:
            with self.lock:
                self.lat += [p.timings.total_s for p in predictions]


def streams_trial(clf, video: Path, n: int, plan: Plan, decode: str) -> dict:
    """N cameras (the video looped at fps, policy latest) -> the daemon's sources, hub and inference worker."""
    from visiond.config import CameraConfig, DecideConfig
    from visiond.serve.decide import Decider
    from visiond.serve.metrics import Metrics
    from visiond.serve.queues import FrameHub, FrameQueue
    from visiond.serve.serving import single
    from visiond.serve.sources import FrameSource
    from visiond.serve.worker import InferenceWorker, ModelSlot

    metrics, stop, sink = Metrics(process=False), threading.Event(), _LatencySink()
    queues, sources = [], []
    for i in range(n):
        cam = CameraConfig(name=f"cam{i}", source=str(video), fps=plan.streams_fps, loop=True, policy="latest",
                           decode=decode)
        metrics.init_camera(cam.name)
        q = FrameQueue(cam.name, 4, "latest", metrics)
        queues.append(q)
        sources.append(FrameSource(cam, q, metrics, lambda *_: None, stop))
    hub = FrameHub(queues)
    worker = InferenceWorker(hub, ModelSlot(single(clf, Decider(clf.classes, DecideConfig()))), [sink], metrics,
                             max_batch=min(64, max(8, n)))
    for s in sources:
        s.start()
    worker.start()
    try:
        time.sleep(plan.streams_warm_s)
        sink.recording = True
        done0 = worker.frames_done
        time.sleep(plan.streams_hold_s)
        sink.recording = False
        done = worker.frames_done - done0
    finally:
        stop.set()
        hub.wake()
        for s in sources:
            s.join(5)
        worker.join(5)
    errors = [f"{s.camera}: {_first_line(s.error)}" for s in sources if s.error] + (
        [f"worker: {_first_line(worker.error)}"] if worker.error else [])
    lat = np.array(sink.lat) * 1e3 if sink.lat else np.array([float("inf")])
    expected = n * plan.streams_fps * plan.streams_hold_s
    rate = done / expected
    p99 = float(np.percentile(lat, 99))
    holds = not errors and rate >= 0.95 and p99 < plan.streams_limit_ms
    return {"streams": n, "delivered_share": round(rate, 3), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(p99, 2), "holds": holds, **({"errors": errors} if errors else {})}


def streams(plan: Plan, ck: Checkpoint, video: Path, device: str, deadline: float) -> dict:
    from visiond.serve.nvdec import nvdec_unavailable

    decode = "nvdec" if nvdec_unavailable("file") is None else "cpu"
    clf = TorchClassifier(ck, device, precision="auto", threads=0, resize_on="auto")
    clf.warmup(64, frame_shapes=[(*plan.frame, 3)])
    trials, best, worst_fail = [], 0, None
    n = 1
    while n <= plan.streams_max and (not trials or time.monotonic() < deadline):  # 1, 2, 4, ... then bisect
        t = streams_trial(clf, video, n, plan, decode)
        trials.append(t)
        console.log(f"streams {n}: p99 {t['p99_ms']:.1f} ms, delivered {t['delivered_share']:.0%}, "
                    f"{'holds' if t['holds'] else 'fails'}")
        if t["holds"]:
            best = n
            if worst_fail is None:
                n *= 2
                continue
        else:
            worst_fail = n
        if worst_fail - best <= 1:
            break
        n = (best + worst_fail) // 2
    out = {"largest_streams": best, "p99_limit_ms": plan.streams_limit_ms, "fps": plan.streams_fps,
           "frame": [plan.frame[1], plan.frame[0]], "decode": decode, "arch": ck.arch, "input": ck.spec.height,
           "device": clf.device, "trials": trials,
           "search_complete": worst_fail is not None or best >= plan.streams_max}
    if decode == "cpu":
        out["skipped"] = {"nvdec decode": nvdec_unavailable("file")}
    return out


# --------------------------------------------------------------------------- main


def run(out_dir: Path, dry: bool) -> dict:
    plan = DRY if dry else Plan()
    started = time.monotonic()
    device = "cpu" if dry or not torch.cuda.is_available() else "auto"
    report: dict = {"schema": 1, "dry_run": dry, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "plan": {k: v for k, v in plan.__dict__.items()}}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ckpts = {arch: _ckpt(tmp, arch, plan.size) for arch in plan.archs}
    video: list[Path] = []

    def section(name: str, fn: Callable[[], dict]) -> None:
        t0 = time.monotonic()
        with console.status(f"gpu_check: {name}"):
            try:
                res = {"status": "ok", **fn()}
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                res = {"status": "error", "error": _first_line(exc), "traceback": traceback.format_exc()[-4000:]}
                console.log(f"[red]{name}: {_first_line(exc)}")
        res["seconds"] = round(time.monotonic() - t0, 2)
        report[name] = res
        _write(out_dir, report)

    def make_video() -> dict:
        video.append(synth_video(tmp / "line.mp4", plan.video_frames, plan.frame))
        return nvdec(plan, video[0])

    section("machine", lambda: machine(plan, dry))
    section("parity", lambda: parity(plan, ckpts, device))
    section("model_fps", lambda: model_fps(plan, ckpts, device, tmp / "models"))
    section("resize_paths", lambda: resize_paths(plan, ckpts, device))
    section("nvdec", make_video)
    section("amp_train_step", lambda: amp_train_step(plan, device))
    mobilenet = ckpts.get("mobilenet_v3_small") or next(iter(ckpts.values()))

    def run_streams() -> dict:
        if not video:
            raise RuntimeError("no test video (see the nvdec section)")
        return streams(plan, mobilenet, video[0], device, started + plan.budget_s)

    section("streams", run_streams)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    _write(out_dir, report)
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write(out_dir: Path, report: dict) -> None:
    tmp = out_dir / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out_dir / "gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: $OUT, else ./gpu-check)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, same code path (< 60 s)")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or "gpu-check")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gpu_check: --out {out}: cannot create it ({exc.strerror}); expected a writable folder",
              file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: {NO_GPU}; run it on a GPU machine, or with --dry-run to check the code path on the CPU",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.dry_run else max(1, min(4, os.cpu_count() or 1)))
    report = run(out, args.dry_run)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status") == "error"]
    console.print(f"gpu_check: {out / 'gpu_check.json'} written in {report['elapsed_s']:.0f} s"
                  + (f"; [red]errors in {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
