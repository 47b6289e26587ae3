"""`visiond tune`: search training options on the validation split within a wall-time budget."""

from __future__ import annotations

from pathlib import Path

import typer

from visiond.cli.model import comma_list, given_on_command_line
from visiond.errors import UserError


def _ints(flag: str, value: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in comma_list(value))
    except ValueError:
        raise UserError(f"{flag} {value!r}: expected comma-separated whole numbers, e.g. 32,48,64") from None


def _lr_range(value: str | None) -> tuple[float | None, float | None]:
    if not value:
        return None, None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--lr-range {value!r}: expected LOW,HIGH, e.g. 1e-4,3e-3") from None
    return lo, hi


def tune(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="Dataset directory (manifest.csv) or a folder of class subfolders."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory: trials.csv, trials.png, best.yaml, best.ckpt, "
                                                      "trials/<n>/ (each trial's options, history and log)."),
    budget: str = typer.Option("30m", help="Wall time for the whole search, e.g. 90s, 30m, 1h30m; a trial "
                                           "running at its end is cut."),
    archs: str = typer.Option(None, help="Architectures to try, comma-separated (default: smallcnn on CPU; "
                                         "smallcnn,mobilenet_v3_small,resnet18 on CUDA; the --weights' family)."),
    sizes: str = typer.Option(None, help="Input sizes to try (default on CPU: the training default for the data "
                                         "and 1.5x it; on CUDA 32,48,64; 160,224 with --weights)."),
    augments: str = typer.Option(None, help="Augmentation presets to try (default on CPU: none,light,safe; on "
                                            "CUDA all)."),
    lr_range: str = typer.Option(None, help="Learning-rate range LOW,HIGH, searched log-uniformly (default on "
                                            "CPU: the default rate /3 to x2; on CUDA 1e-4,3e-3)."),
    max_epochs: int = typer.Option(15, help="Most epochs a trial may be given."),
    min_epochs: int = typer.Option(0, help="Fewest epochs a trial may be given (0: a third of --max-epochs)."),
    early_stop: int = typer.Option(3, help="Each trial stops after this many epochs without a better val figure."),
    max_trials: int = typer.Option(0, help="Stop after this many trials (0: as many as the budget holds)."),
    batch_size: int = typer.Option(None, help="Images per batch (default: train's)."),
    grayscale: bool = typer.Option(None, "--grayscale/--rgb", help="One grey channel or RGB (default: grey when "
                                                                   "the images are stored grey)."),
    weights: Path = typer.Option(None, help="Local torchvision ImageNet state dict; every trial starts from it."),
    monitor: str = typer.Option("macro_f1", help="Validation figure to maximise: macro_f1 or accuracy."),
    options: Path = typer.Option(None, "--options", help="YAML of fixed training options for every trial (the "
                                                         "searched ones and the flags above override it)."),
    seed: int = typer.Option(0, help="Seed of the sampler and of every trial."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Draw the progress view."),
) -> None:
    """Search learning rate, input size, augmentation, architecture and epochs on the validation split
    (the test split is never read), with Optuna (TPE, median pruning), inside a wall-time budget."""
    from visiond.logs import setup_logging
    from visiond.train.options import TrainOptions
    from visiond.train.tune import TuneOptions, parse_budget, run_tune

    setup_logging("info")
    lo, hi = _lr_range(lr_range)
    base = None
    if options is not None:
        from visiond.train.options_file import apply_options_file

        base = apply_options_file(TrainOptions(data=dataset, out=out / "base.ckpt"), options)
    fixed = dict(early_stop=early_stop, batch_size=batch_size, grayscale=grayscale, weights=weights, monitor=monitor,
                 seed=seed, device=device)
    if base is not None:  # the file's value where the flag was left at its default
        given = given_on_command_line(ctx)
        fixed = {k: v if k in given else getattr(base, k) for k, v in fixed.items()}
    result = run_tune(TuneOptions(
        data=dataset, out=out, budget_s=parse_budget(budget), archs=comma_list(archs), sizes=_ints("--sizes", sizes),
        augments=comma_list(augments), lr_min=lo, lr_max=hi, min_epochs=min_epochs, max_epochs=max_epochs,
        max_trials=max_trials, progress=progress, base=base, **fixed))
    counts = {s: sum(r["state"] == s for r in result.trials) for s in ("complete", "pruned", "cut", "failed")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    typer.echo(f"{len(result.trials)} trial(s) in {result.seconds:.0f}s ({summary or 'none'}) -> "
               f"{out / 'trials.csv'}, {out / 'trials.png'}")
    if result.best is None:
        raise UserError(f"no trial finished inside the {budget} budget; give a larger --budget or a smaller "
                        "--max-epochs / --sizes")
    b = result.best
    typer.echo(f"best: trial {b['trial']}, val {monitor} {b['value']:.4f} ({b['arch']}, lr {b['lr']:.3g}, size "
               f"{b['image_size']}, augment {b['augment']}, {b['epochs']} epochs) -> {result.best_ckpt}")
    typer.echo(f"reproduce or retrain: visiond train {dataset} --options {result.best_yaml} --out model.ckpt")


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
