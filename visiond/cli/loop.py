"""`visiond compare` and `visiond promote`: the last steps of the learning loop."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)  # piped: keep the table's columns on one line


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _delta(v: float | None) -> str:
    if v is None:
        return "—"
    colour = "green" if v > 0.005 else "red" if v < -0.005 else "dim"
    return f"[{colour}]{v:+.3f}[/{colour}]"


def compare(
    old: Path = typer.Argument(..., help="The model in service (or any baseline checkpoint)."),
    new: Path = typer.Argument(..., help="The candidate checkpoint."),
    dataset: Path = typer.Argument(..., help="Dataset directory (manifest.csv) or class-folder tree."),
    split: str = typer.Option("test", help="train, val, test or all: both models see the same samples."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write compare.json and compare.png here."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Evaluate two checkpoints on the same split; per-class precision/recall/F1, old -> new."""
    from visiond.train.compare import compare_checkpoints

    r = compare_checkpoints(old, new, dataset, split=split, out=out, device=device)
    t = Table(title=f"{split} split: {r.old['name']} {r.old['version']} -> {r.new['name']} {r.new['version']}")
    t.add_column("class")
    t.add_column("support", justify="right")
    for key in ("precision", "recall", "F1"):
        t.add_column(f"{key} old → new", justify="right")
        t.add_column("Δ", justify="right")
    for row in r.rows:
        cells = [row.label, str(row.support)]
        for key in ("precision", "recall", "f1"):
            cells += [f"{_fmt(row.old[key])} → {_fmt(row.new[key])}", _delta(row.delta(key))]
        t.add_row(*cells)
    console.print(t)
    console.print(f"accuracy {r.old['accuracy']:.4f} → {r.new['accuracy']:.4f} ({_delta(r.new['accuracy'] - r.old['accuracy'])}), "
                  f"macro-F1 {r.old['macro_f1']:.4f} → {r.new['macro_f1']:.4f} "
                  f"({_delta(r.new['macro_f1'] - r.old['macro_f1'])})")
    if r.files:
        console.print(f"wrote {r.files['json']} and {r.files['png']}")


def promote(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to put into service."),
    to: Path = typer.Option(..., "--to", help="Where the daemon's model.checkpoint points; the old one becomes PATH.prev."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="Also check it against this daemon config (decide classes)."),
    keep_previous: bool = typer.Option(True, "--keep-previous/--no-keep-previous", help="Keep the old model as PATH.prev."),
    device: str = typer.Option("cpu", help="Device for the validation batch."),
) -> None:
    """Validate a checkpoint (load, build, one dummy batch) and install it atomically; the daemon reloads it."""
    from visiond.models.promote import promote as run_promote

    r = run_promote(checkpoint, to, config=config, device=device, keep_previous=keep_previous)
    typer.echo(f"{r.path}: now version {r.version}"
               + (f" (previous {r.previous_version} kept as {r.previous})" if r.previous else ""))


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
    app.command("promote")(promote)
