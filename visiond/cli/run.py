"""`visiond run`, `visiond config check` and `visiond bench`."""

from __future__ import annotations

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
    from visiond.logs import setup_logging
    from visiond.logs import capture_native_stderr

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


def bench(
    video: Path = typer.Option(None, "--video", help="H.264 video to read (default: a synthetic line)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Model (default: a smallcnn trained on the fly)."),
    json_out: Path = typer.Option(None, "--json", help="Write the figures as JSON here."),
    frames: int = typer.Option(1500, help="Frames per measurement."),
    max_batch: int = typer.Option(16, help="Largest batch to try."),
    broker: str = typer.Option(None, help="host:port of an MQTT broker (default: a private mosquitto)."),
    realtime_fps: float = typer.Option(30.0, help="Rate of the real-time latency run."),
    realtime_seconds: float = typer.Option(10.0, help="Length of the real-time latency run."),
    runtime: str = typer.Option("torch", help="Model runtime for every run: torch or onnxruntime (CPU)."),
) -> None:
    """Measure decode, model, a naive per-frame loop and the daemon pipeline on one video."""
    from visiond.serve.bench import BenchOptions, run_bench
    from visiond.errors import UserError

    if runtime not in ("torch", "onnxruntime"):
        raise UserError(f"--runtime {runtime!r}: expected torch or onnxruntime")

    run_bench(BenchOptions(video=video, checkpoint=checkpoint, json_out=json_out, frames=frames, max_batch=max_batch,
                           broker=broker, realtime_fps=realtime_fps, realtime_seconds=realtime_seconds,
                           runtime=runtime))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("bench")(bench)
    app.add_typer(config_app, name="config")
