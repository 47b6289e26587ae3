"""`visiond dataset capture`: parse options, call visiond.data.capture, show progress."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def capture_cmd(
    source: str = typer.Argument(..., help="Camera (/dev/videoN, index), rtsp://..., a video file or an image folder."),
    dataset_dir: Path = typer.Argument(..., help="Dataset directory; frames go to DATASET_DIR/inbox/."),
    every_frames: Optional[int] = typer.Option(None, "--every-frames", help="Keep every Nth frame."),
    every_seconds: Optional[float] = typer.Option(None, "--every-seconds",
                                                  help="Keep a frame every N seconds (video time for files)."),
    burst: Optional[int] = typer.Option(None, "--burst", help="Keep K consecutive frames (per Enter with --stdin)."),
    stdin: bool = typer.Option(False, "--stdin", help="Keep a frame (or a burst) each time a line is read on stdin."),
    max_frames: Optional[int] = typer.Option(None, "--max", help="Stop after saving this many frames."),
    roi: Optional[str] = typer.Option(None, "--roi", help="Crop x,y,w,h in pixels, as the daemon's cameras[].roi."),
    dedupe_bits: int = typer.Option(6, "--dedupe-bits",
                                    help="Skip frames within this many perceptual-hash bits of a kept one; -1 = off."),
    camera: str = typer.Option("capture", "--camera", help="Camera name stored with each frame."),
    fps: float = typer.Option(0.0, "--fps", help="Frame-rate cap of the source (0 = as it comes)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="Pre-label: store this model's guess beside each frame."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Capture frames into the dataset's inbox for labelling (atomic writes, near-duplicates skipped)."""
    from visiond.data.capture import CaptureOptions, capture_frames, parse_roi

    opts = CaptureOptions(source=source, dataset=dataset_dir, camera=camera, every_frames=every_frames,
                          every_seconds=every_seconds, burst=burst, stdin=stdin, max_frames=max_frames,
                          roi=parse_roi(roi), dedupe_bits=dedupe_bits, fps=fps, checkpoint=checkpoint)
    opts.validate()
    if stdin and progress:
        console.print("press Enter to capture, Ctrl-D to finish")
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[dups]} near-duplicates skipped"), TimeElapsedColumn(),
                   console=console, disable=not progress, transient=False)
    with bar:
        task = bar.add_task("capturing", total=max_frames or burst if not stdin else max_frames, dups=0)

        def update(report) -> None:
            bar.update(task, completed=len(report.saved), dups=report.duplicates)

        try:
            report = capture_frames(opts, on_progress=update)
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None
        update(report)
    typer.echo(f"saved {len(report.saved)} frame(s) of {report.frames_read} read into {dataset_dir / 'inbox'} "
               f"({report.duplicates} near-duplicate(s) skipped; {report.ended})")


def register(app: typer.Typer) -> None:
    from visiond.cli.dataset import dataset_app

    dataset_app.command("capture")(capture_cmd)
