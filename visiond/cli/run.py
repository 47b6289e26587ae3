"""`visiond run`, `visiond config check` and `visiond bench` (and `visiond bench --inspect`).

`visiond bench` with no video or model makes its own: the synthetic line and a small CNN
trained on its crops. That is done here, where both halves may be used (the daemon's
bench never imports training), once into a cache directory that later runs reuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import typer

from visiond.config import ConfigError, check_files, load_config

config_app = typer.Typer(help="Work with daemon config files.", no_args_is_help=True)


def _load(path: Path):
    cfg = load_config(path)
    problems = check_files(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def run(config: Path = typer.Option(..., "--config", "-c", help="The daemon's YAML config.",
                                    readable=False)) -> None:  # load_config says why in one line
    """Run the daemon: cameras -> model -> MQTT + /metrics, until SIGTERM/SIGINT or all files end."""
    cfg = _load(config)
    from visiond.logs import capture_native_stderr, setup_logging

    capture_native_stderr()  # FFmpeg/OpenCV lines become (coalesced, redacted) log records
    setup_logging(cfg.logging.level, cfg.logging.json_)
    from visiond.serve.daemon import Daemon

    code = Daemon(cfg).run()
    raise typer.Exit(code)


@config_app.command("check")
def check(file: Path = typer.Argument(..., help="Config file to validate.", readable=False)) -> None:
    """Validate a config: every problem on one line, exit 2 if any."""
    cfg = _load(file)
    typer.echo(f"{file}: ok (node {cfg.node}, {len(cfg.cameras)} camera(s), checkpoint {cfg.model.checkpoint})")


# The default inputs of `visiond bench`; change one and bump the directory name so caches rebuild.
BENCH_INPUTS = "synthline-v1"
_BENCH_VIDEO_FRAMES, _BENCH_VIDEO_SEED = 300, 7  # 10 s at 30 fps, looped by every measurement
_BENCH_CROPS_PER_CLASS, _BENCH_CROPS_SEED, _BENCH_EPOCHS = 100, 11, 5  # a model for timing, not for accuracy


def bench_cache_dir() -> Path:
    """Where the default bench inputs live: $XDG_CACHE_HOME/visiond/bench (~/.cache when unset)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "visiond" / "bench" / BENCH_INPUTS


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


@contextlib.contextmanager
def _scratch(cache: Path, prefix: str):
    """A work folder in the cache, removed afterwards: a result is renamed into place only when whole."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench_video(cache: Path) -> Path:
    """The synthetic line as an H.264 video, rendered once (into a temporary name, then renamed)."""
    from visiond.errors import UserError
    from visiond.harness import synthline

    video = cache / "line.mp4"
    if video.exists():
        return video
    with _scratch(cache, "render-") as work, _progress() as bar:
        try:
            task = bar.add_task("rendering the synthetic line", total=_BENCH_VIDEO_FRAMES)
            truth = synthline.render_video(work / video.name, _BENCH_VIDEO_FRAMES, _BENCH_VIDEO_SEED,
                                           on_frame=lambda: bar.advance(task))
            os.replace(truth, synthline.truth_path(video))
            os.replace(work / video.name, video)  # last: the video's presence says both files are whole
        except (FileNotFoundError, RuntimeError) as exc:
            raise UserError(f"bench: cannot render the default video: {exc} (or pass --video)") from None
    return video


def _bench_checkpoint(cache: Path) -> Path:
    """A smallcnn trained on the synthetic line's crops, once; the checkpoint appears only when training ends."""
    import logging

    from visiond.harness import synthline
    from visiond.train.loop import TrainOptions, train as run_training

    checkpoint = cache / "model.ckpt"
    if checkpoint.exists():
        return checkpoint
    with _scratch(cache, "train-") as work:
        with _progress() as bar:
            task = bar.add_task("rendering labelled crops", total=_BENCH_CROPS_PER_CLASS * len(synthline.CLASSES))
            synthline.render_images(work / "synthline", _BENCH_CROPS_PER_CLASS, _BENCH_CROPS_SEED, size=64,
                                    on_image=lambda: bar.advance(task))
        logging.getLogger("visiond.train.data").setLevel(logging.ERROR)  # unsplit crops: the in-memory split is intended
        result = run_training(TrainOptions(data=work / "synthline", out=work / "model.ckpt", arch="smallcnn",
                                           epochs=_BENCH_EPOCHS, image_size=64, augment="none", seed=1,
                                           defect_classes=("scratch", "spot")))
        os.replace(result.best, checkpoint)
    return checkpoint


def bench_arch_checkpoint(arch: str, size: int) -> Path:
    """A freshly initialised `arch` at `size` x `size` with the synthetic line's classes, made once in the cache:
    a model for timing (random weights time as trained ones do), never downloaded."""
    import torch

    from visiond.errors import UserError
    from visiond.harness import synthline
    from visiond.models.arch import ARCHITECTURES, build_model
    from visiond.models.checkpoint import save_checkpoint
    from visiond.preprocess import PreprocessSpec

    networks = [a for a in ARCHITECTURES if a not in ("knn", "svm")]  # the classical baselines are no CNN to time
    if arch not in networks:
        raise UserError(f"--arch {arch!r}: expected one of {', '.join(networks)}")
    if not 16 <= size <= 1024:
        raise UserError(f"--size {size}: expected 16..1024")
    cache = bench_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{arch}-{size}.ckpt"
    if not path.exists():
        torch.manual_seed(0)
        spec = PreprocessSpec.for_color(size, "rgb", imagenet=arch != "smallcnn")
        net = build_model(arch, len(synthline.CLASSES), spec.channels, size)
        save_checkpoint(path, arch=arch, classes=synthline.CLASSES, spec=spec, state_dict=net.state_dict(),
                        arch_args={"in_channels": spec.channels, "image_size": size}, name=f"{arch}-{size}")
    return path


def bench_inputs(video: Path | None, checkpoint: Path | None) -> tuple[Path, Path]:
    """The video and model to measure: the ones given, else the cached synthetic defaults (made if missing)."""
    from rich.console import Console

    from visiond.errors import UserError

    for what, given in (("--video", video), ("--checkpoint", checkpoint)):
        if given is not None and not given.exists():  # before minutes of making the other one
            raise UserError(f"{what} {given}: not found")
    if video is not None and checkpoint is not None:
        return video, checkpoint
    cache = bench_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [name for name, given in (("line.mp4", video), ("model.ckpt", checkpoint)) if given is None]
    missing = [name for name in wanted if not (cache / name).exists()]
    if missing:
        Console(stderr=True).print(f"bench: making {' and '.join(missing)} in {cache} (once; later runs reuse them)")
    return video or _bench_video(cache), checkpoint or _bench_checkpoint(cache)


def bench(
    ctx: typer.Context,
    video: Path = typer.Option(None, "--video", help="H.264 video to read (default: a synthetic line, rendered once "
                                                     "and cached in ~/.cache/visiond/bench)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Model (default: a smallcnn trained on the fly on the "
                                                               "synthetic line's crops, cached beside it)."),
    json_out: Path = typer.Option(None, "--json", help="Write the figures as JSON here."),
    frames: int = typer.Option(1500, help="Frames per measurement."),
    max_batch: int = typer.Option(16, help="Largest batch to try (--streams: the daemons' model.max_batch; left "
                                           "out, auto, as a plant's default config)."),
    broker: str = typer.Option(None, help="host:port of an MQTT broker (default: a private mosquitto)."),
    realtime_fps: float = typer.Option(30.0, help="Rate of the real-time latency run (with --inspect: the camera's)."),
    realtime_seconds: float = typer.Option(10.0, help="Length of the real-time latency run."),
    runtime: str = typer.Option("torch", help="Model runtime for every run: torch, onnxruntime (CPU), openvino "
                                              "(CPU) or auto (what a daemon's model.runtime auto picks here)."),
    inspect: bool = typer.Option(False, "--inspect", help="Measure a triggered station instead: 3 ROIs on the video "
                                                          "at --realtime-fps, trigger -> verdict over MQTT 5."),
    seconds: float = typer.Option(30.0, "--seconds", help="--inspect: how long the triggers come."),
    rate: float = typer.Option(10.0, "--rate", help="--inspect: triggers a second."),
    arch: str = typer.Option(None, "--arch", help="Measure a freshly initialised network of this architecture "
                                                  "(e.g. mobilenet_v3_small, resnet18; made once, cached) instead of "
                                                  "the default model; with --size. --streams defaults to "
                                                  "mobilenet_v3_small."),
    size: int = typer.Option(224, "--size", help="--arch: its input side in pixels."),
    model_only: bool = typer.Option(False, "--model-only", help="Only the model stage, for torch, onnxruntime and "
                                                                "openvino side by side."),
    streams: bool = typer.Option(False, "--streams", help="How many cameras at --realtime-fps this box holds: the "
                                                          "daemon with N cameras, N raised until frames drop or p99 "
                                                          "capture -> broker passes --p99-ms."),
    rtsp: bool = typer.Option(False, "--rtsp", help="--streams: the cameras are RTSP streams of the video "
                                                    "(tools/rtsp_server.py) instead of the file at --realtime-fps."),
    hold: float = typer.Option(60.0, "--hold", help="--streams: seconds a number of cameras must hold."),
    p99_ms: float = typer.Option(100.0, "--p99-ms", help="--streams: the p99 latency limit."),
    max_streams: int = typer.Option(64, "--max-streams", help="--streams: the most cameras to try."),
    threads: int = typer.Option(1, "--threads", help="--streams, --model-only: the runtime's intra-op threads "
                                                     "(model.threads; 0 = the runtime's default)."),
) -> None:
    """Measure decode, model, a naive per-frame loop and the daemon pipeline on one video (or, with --inspect,
    a triggered station's trigger -> verdict latency and accuracy)."""
    from visiond.errors import UserError
    from visiond.serve.bench import BenchOptions, run_bench, run_bench_inspect

    if runtime not in ("torch", "onnxruntime", "openvino", "auto"):
        raise UserError(f"--runtime {runtime!r}: expected torch, onnxruntime, openvino or auto")
    if inspect and (seconds <= 0 or rate <= 0):
        raise UserError(f"--seconds {seconds:g} and --rate {rate:g}: expected both > 0")
    if sum((inspect, streams, model_only)) > 1:
        raise UserError("--inspect, --streams and --model-only: expected at most one")
    if arch is not None and checkpoint is not None:
        raise UserError("--arch and --checkpoint: expected one of them")
    if streams and arch is None and checkpoint is None:
        arch = "mobilenet_v3_small"  # a realistic model for a plant's question
    if arch is not None:
        checkpoint = bench_arch_checkpoint(arch, size)
    if model_only:
        from visiond.serve.benchmodel import run_model_only

        if checkpoint is None:  # the default model, without rendering the video it is not run on
            bench_cache_dir().mkdir(parents=True, exist_ok=True)
            checkpoint = _bench_checkpoint(bench_cache_dir())
        elif not checkpoint.exists():
            raise UserError(f"--checkpoint {checkpoint}: not found")
        run_model_only(checkpoint, max_batch=max_batch, threads=threads, json_out=json_out)
        return
    if streams:
        from visiond.cli.model import given_on_command_line
        from visiond.serve.benchstreams import StreamsOptions, run_streams

        daemon_batch = max_batch if "max_batch" in given_on_command_line(ctx) else "auto"
        video, checkpoint = bench_inputs(video, checkpoint)
        run_streams(StreamsOptions(video=video, checkpoint=checkpoint, runtime=runtime, fps=realtime_fps, hold_s=hold,
                                   p99_limit_ms=p99_ms, max_streams=max_streams, rtsp=rtsp,
                                   max_batch=daemon_batch, threads=threads, json_out=json_out))
        return

    video, checkpoint = bench_inputs(video, checkpoint)
    opts = BenchOptions(video=video, checkpoint=checkpoint, json_out=json_out, frames=frames, max_batch=max_batch,
                        broker=broker, realtime_fps=realtime_fps, realtime_seconds=realtime_seconds, runtime=runtime,
                        inspect_seconds=seconds, inspect_rate=rate)
    (run_bench_inspect if inspect else run_bench)(opts)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("bench")(bench)
    app.add_typer(config_app, name="config")
