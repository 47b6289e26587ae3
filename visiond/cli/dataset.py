"""`visiond dataset import|split|stats` and `visiond augment-preview`: arguments in, library call, table out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from visiond.data.manifest import SPLITS, read_manifest, write_manifest

dataset_app = typer.Typer(name="dataset", help="Build and inspect datasets (images + manifest.csv).",
                          no_args_is_help=True, add_completion=False)
console = Console()
_SHOW = 20


def _counts_table(title: str, per: dict[str, dict[str, int]]) -> Table:
    """label -> split -> count, with unsplit and total columns."""
    t = Table(title=title)
    t.add_column("class")
    cols = [*SPLITS, ""]
    for c in cols:
        t.add_column(c or "unsplit", justify="right")
    t.add_column("total", justify="right", style="bold")
    for label, row in per.items():
        t.add_row(label, *(str(row.get(c, 0)) for c in cols), str(sum(row.values())))
    return t


def _per_class_split(samples) -> dict[str, dict[str, int]]:
    per: dict[str, dict[str, int]] = {}
    for s in sorted(samples, key=lambda s: s.label):
        per.setdefault(s.label, {})
        per[s.label][s.split] = per[s.label].get(s.split, 0) + 1
    return per


@dataset_app.command("import")
def import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="folder | csv | json | idx | cifar10 | voc | yolo"),
    src: Path = typer.Argument(..., help="Source directory or file (csv/json)."),
    dataset_dir: Path = typer.Argument(..., help="Dataset directory to create or add to."),
    classes: Optional[str] = typer.Option(
        None, help="Comma-separated class names in index order (idx, cifar10, yolo)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Import an existing dataset; each VOC/YOLO box becomes a cropped sample of its class."""
    from visiond.data.importers import import_dataset

    names = [c.strip() for c in classes.split(",")] if classes else None
    report = import_dataset(fmt, src, dataset_dir, progress=progress, class_names=names)
    table = Table(title=f"imported {report.imported} images into {report.dataset_dir}")
    table.add_column("class")
    table.add_column("images", justify="right")
    for label, n in report.per_class.items():
        table.add_row(label, str(n))
    console.print(table)
    console.print("splits: " + ", ".join(f"{k or 'unsplit'}={v}" for k, v in report.per_split.items()))
    if report.duplicates:
        console.print(f"[yellow]{report.duplicates} duplicate image(s) already present were not added again")
    if report.skipped:
        console.print(f"[yellow]skipped {len(report.skipped)} unreadable or unusable item(s):")
        for ref, why in report.skipped[:_SHOW]:
            console.print(f"  {ref}: {why}", markup=False)


@dataset_app.command("split")
def split_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory."),
    train: float = typer.Option(0.7, help="Fraction for training."),
    val: float = typer.Option(0.15, help="Fraction for validation."),
    test: float = typer.Option(0.15, help="Fraction for the final test."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same split."),
    group_by: Optional[str] = typer.Option(
        None, help="Manifest column or metadata field whose groups never straddle splits (e.g. session)."),
    keep_test: bool = typer.Option(
        False, help="Send no sample to 'test' and keep those already there (e.g. an imported official test "
                    "set); split the rest train:val."),
    reshuffle: bool = typer.Option(
        False, help="Reassign every sample, not only those without a split. Models trained before are then "
                    "no longer comparable on the test split (their training images may become test images)."),
):
    """Assign train/val/test to samples without one (stratified per class) and rewrite the manifest.

    Samples that already have a split keep it, so a test image never becomes a training image.
    """
    from visiond.data.split import split_changes, split_dataset

    before = read_manifest(dataset_dir)
    samples = split_dataset(before, train, val, test, seed=seed, group_by=group_by, keep_test=keep_test,
                            reshuffle=reshuffle)
    path = write_manifest(dataset_dir, samples)
    console.print(_counts_table(f"split written to {path}", _per_class_split(samples)))
    kept, assigned, moved = split_changes(before, samples)
    console.print(f"{kept} sample(s) kept their split, {assigned} new sample(s) assigned, {moved} moved")
    if moved:
        console.print(f"[yellow]--reshuffle moved {moved} sample(s) to another split: checkpoints trained before "
                      "this are not comparable with new ones on the test split ('visiond compare' checks the "
                      "overlap)")


@dataset_app.command("stats")
def stats_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory."),
    sheet: Optional[Path] = typer.Option(None, help="Write a contact sheet PNG (samples per class) here."),
    per_class: int = typer.Option(8, help="Images per class on the contact sheet."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of tables."),
):
    """Counts per class and split, image sizes, corrupt and duplicate files, imbalance warnings."""
    from visiond.data.stats import contact_sheet, dataset_stats

    samples = read_manifest(dataset_dir)
    stats = dataset_stats(dataset_dir, samples)
    if sheet is not None:
        contact_sheet(dataset_dir, samples, sheet, per_class=per_class)
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
        return
    console.print(_counts_table(f"{dataset_dir}: {stats.total} images, {len(stats.classes)} classes", stats.counts))
    if stats.sizes:
        console.print("image size (h x w): " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in stats.sizes.items()))
    for c in stats.corrupt[:_SHOW]:
        console.print(f"[red]corrupt[/red] {c['path']}: {c['reason']}", highlight=False)
    for group in stats.duplicates[:_SHOW]:
        console.print(f"[yellow]duplicates[/yellow] {' = '.join(group)}", highlight=False)
    for w in stats.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    if sheet is not None:
        console.print(f"contact sheet: {sheet}")


def augment_preview_cmd(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    preset: str = typer.Option(None, help="Augmentation preset: auto (the training default: none from "
                                          "2,000 training images in the smallest class, else safe) | safe | "
                                          "trivial | none | light | line | heavy."),
    size: int = typer.Option(64, help="Model input size (square), as in training."),
    grayscale: bool = typer.Option(False, help="Grey input, as in training with --grayscale."),
    rows: int = typer.Option(8, help="How many sample images (rows)."),
    seed: int = typer.Option(0, help="Seed for the choice of images and the augmentation."),
):
    """Show what training augmentation does: each row is an image, then augmented variants."""
    from visiond.data.augment import augment_preview
    from visiond.errors import UserError
    from visiond.preprocess import PreprocessSpec

    try:
        spec = PreprocessSpec.for_color(size, "gray" if grayscale else "rgb")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from visiond.data.augment import AUTO_PRESET, DEFAULT_PRESET
    from visiond.train.data import load_splits

    preset, why = preset or DEFAULT_PRESET, ""
    if preset == AUTO_PRESET:  # what training would choose for this dataset's training split
        preset, why = load_splits(dataset_dir).augmentation(preset)
    path = augment_preview(dataset_dir, out, preset, spec, n=rows, seed=seed)
    console.print(f"wrote {path} (preset {preset}{f'; {why}' if why else ''})")


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
    app.command("augment-preview")(augment_preview_cmd)
