"""`visiond compare` and `visiond promote`: the last steps of the learning loop."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visiond.errors import UserError

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
    allow_overlap: bool = typer.Option(False, "--allow-overlap",
                                       help="Compare even when some evaluated images were in a model's training "
                                            "set (refused otherwise); the overlap is reported."),
) -> None:
    """Evaluate two checkpoints on the same split; per-class precision/recall/F1, old -> new.

    Refuses when an evaluated image was in either model's training set (the checkpoints list theirs).
    """
    from visiond.train.compare import compare_checkpoints

    r = compare_checkpoints(old, new, dataset, split=split, out=out, device=device, allow_overlap=allow_overlap)
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
    console.print(f"accuracy {r.old['accuracy']:.4f} → {r.new['accuracy']:.4f} "
                  f"({_delta(r.new['accuracy'] - r.old['accuracy'])}), "
                  f"macro-F1 {r.old['macro_f1']:.4f} → {r.new['macro_f1']:.4f} "
                  f"({_delta(r.new['macro_f1'] - r.old['macro_f1'])})")
    for warning in r.warnings:
        console.print(f"[bold red]WARNING:[/bold red] {escape(warning)}", highlight=False, soft_wrap=True)
    if r.files:
        console.print(f"wrote {r.files['json']} and {r.files['png']}")


def promote(
    checkpoint: Optional[Path] = typer.Argument(None, help="The checkpoint to put into service (not with --rollback)."),
    to: Optional[Path] = typer.Option(None, "--to", help="Where the daemon's model.checkpoint points "
                                                          "(default: model.checkpoint of --config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="The daemon's config: check the model against it (decide classes) "
                                               "and install where it points."),
    keep: int = typer.Option(3, help="Backups of replaced models to keep: PATH.prev, PATH.prev.2, ..."),
    rollback: bool = typer.Option(False, "--rollback", help="Put PATH.prev (the last good model) back into service."),
    device: str = typer.Option("cpu", help="Device for the validation batch."),
) -> None:
    """Validate a checkpoint (load, build, one dummy batch) and install it atomically; the daemon reloads it.

    The model replaced is kept as PATH.prev only if it loads; the installed file gets the mode and
    owner of the one it replaces, and must be readable by the owner of its directory (the service).
    """
    from visiond.models import promote as p

    if to is None and config is None:
        raise UserError("promote: --to PATH or --config FILE is needed to know where the daemon loads its model")
    target = to if to is not None else p.config_target(config)
    if rollback:
        if checkpoint is not None:
            raise UserError("promote --rollback takes no checkpoint: it puts PATH.prev back")
        r = p.rollback(target, config=config, device=device)
        typer.echo(f"{r.path}: rolled back to version {r.version}"
                   + (f" ({len(p.backups(target))} older backup(s) left, newest {r.previous})" if r.previous else
                      " (no older backup left)"))
        return
    if checkpoint is None:
        raise UserError("promote: expected a CHECKPOINT to install (or --rollback)")
    r = p.promote(checkpoint, target, config=config, device=device, keep=keep)
    kept = (f" (previous {r.previous_version} kept as {r.previous})" if r.previous else
            f" (the file it replaced did not load, so it was not kept: {r.not_kept})" if r.not_kept else "")
    typer.echo(f"{r.path}: now version {r.version}{kept}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
    app.command("promote")(promote)
