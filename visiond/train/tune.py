"""`visiond tune DATASET --budget 30m`: a bounded search for the training options that score best on the
validation split, with Optuna.

Each trial is one ordinary `visiond train DATASET --options trial.yaml` in a child process, so:
- the best trial's options file reproduces its score with `visiond train --options best.yaml` by
  construction (same code path, same seed);
- a trial can be cut at the budget's edge at any moment, even in the middle of an epoch (its process
  group is terminated), so the whole search ends inside its wall-time budget;
- training reads the train and val splits only; the test split is never opened (the parent reads the
  manifest, never an image).

The search: learning rate (log-uniform), input size, augmentation preset, architecture from a short
list, and epochs (with early stopping), by a seeded TPE sampler; a median pruner stops a trial whose
per-epoch validation figure falls below the median of earlier trials at the same epoch. No trial is
started when the remaining budget cannot hold the quickest first epoch seen so far.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from visiond.data.augment import PRESETS
from visiond.errors import UserError
from visiond.models.arch import ARCHITECTURES
from visiond.train.data import load_splits
from visiond.train.options import BASELINES, TrainOptions
from visiond.train.options_file import options_yaml
from visiond.train.progress import stderr_progress
from visiond.train.recipe import last_path_for, preprocess_spec, round_up8, run_dir_for

log = logging.getLogger(__name__)

CPU_ARCHS = ("smallcnn",)
CUDA_ARCHS = ("smallcnn", "mobilenet_v3_small", "resnet18")
SIZES, WEIGHTS_SIZES = (32, 48, 64), (160, 224)
LR_RANGE = (1e-4, 3e-3)
# A CPU budget holds a handful of trials (30 minutes of two cores: five on Fashion-MNIST), so there the search
# stays near the defaults: the presets that keep every class's meaning and cost least per epoch, the learning
# rate within a factor of CPU_LR_SPAN of the default's, and the default input size and one step up.
CPU_AUGMENTS = ("none", "light", "safe")
CPU_LR_SPAN = (1 / 3, 2.0)
SEARCHED = ("arch", "lr", "image_size", "augment", "epochs")
POLL_S = 0.25
KILL_GRACE_S = 2.0
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float:
    """'30m', '90s', '1h30m', '45' (seconds) -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", s)
    if not s or not parts or "".join(n + u for n, u in parts) != s:
        raise UserError(f"--budget {text!r}: expected a duration like 90s, 30m or 1h30m")
    seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--budget {text!r}: expected more than 0 seconds")
    return seconds


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else \
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class TuneOptions:
    data: Path
    out: Path                                  # a directory: trials.csv, trials.png, best.yaml, best.ckpt, trials/
    budget_s: float
    archs: tuple[str, ...] = ()                # () = smallcnn on CPU; smallcnn, mobilenet_v3_small, resnet18 on CUDA
    sizes: tuple[int, ...] = ()                # () = CPU: the default size and 1.5x; CUDA: 32, 48, 64; weights: 160, 224
    augments: tuple[str, ...] = ()             # () = CPU: CPU_AUGMENTS; CUDA: every preset
    lr_min: float | None = None                # None: CPU: the default lr x CPU_LR_SPAN; CUDA: LR_RANGE
    lr_max: float | None = None
    min_epochs: int = 0                        # 0 = a third of max_epochs
    max_epochs: int = 15
    early_stop: int = 3
    max_trials: int = 0                        # 0 = as many as the budget holds
    batch_size: int | None = None              # None: the training default
    grayscale: bool | None = None              # None: grey when the images are stored grey
    weights: Path | None = None
    monitor: str = "macro_f1"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    base: TrainOptions | None = field(default=None, repr=False)  # fixed options (e.g. from --options)

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        self.weights = Path(self.weights) if self.weights is not None else None


@dataclass
class TuneResult:
    out: Path
    trials: list[dict]
    best: dict | None
    best_yaml: Path | None
    best_ckpt: Path | None
    seconds: float


@dataclass(frozen=True)
class Space:
    archs: tuple[str, ...]
    sizes: tuple[int, ...]
    augments: tuple[str, ...]
    lr: tuple[float, float]
    epochs: tuple[int, int]
    defaults: dict                             # what `visiond train` would run here, inside the space


def resolve_space(opts: TuneOptions, splits) -> Space:
    """The search space, checked before any trial; a one-line error names what is wrong. What the user left
    out is chosen for the device: wide on CUDA, near the defaults on a CPU (see CPU_AUGMENTS)."""
    import torch

    if opts.weights is not None:
        from visiond.train.baseline import infer_backbone
        from visiond.train.transfer import read_state_dict

        family = infer_backbone(read_state_dict(opts.weights), opts.weights)
        if opts.archs and tuple(opts.archs) != (family,):
            raise UserError(f"--archs {','.join(opts.archs)}: --weights {opts.weights} holds {family} weights; "
                            f"expected --archs {family} (or none)")
        archs = (family,)
    cuda = opts.device.startswith("cuda") or (opts.device == "auto" and torch.cuda.is_available())
    if opts.weights is None:
        archs = tuple(opts.archs) or (CUDA_ARCHS if cuda else CPU_ARCHS)
    valid = [a for a in ARCHITECTURES if a not in BASELINES]
    bad = [a for a in archs if a not in valid]
    if bad:
        raise UserError(f"--archs {','.join(bad)}: expected some of {', '.join(valid)}")
    base = _trial_options(opts, opts.out / "defaults.ckpt", {})
    default_size = base.image_size or preprocess_spec(base, None, splits).height  # reads one training image's shape
    near = (default_size, round_up8(default_size * 1.5))
    sizes = tuple(opts.sizes) or (WEIGHTS_SIZES if opts.weights else SIZES if cuda else near)
    if any(not 8 <= s <= 4096 for s in sizes):
        raise UserError(f"--sizes {','.join(map(str, sizes))}: expected sizes of 8..4096 pixels")
    if any(a != "smallcnn" for a in archs) and min(sizes) < 32:
        raise UserError(f"--sizes {','.join(map(str, sizes))}: {', '.join(a for a in archs if a != 'smallcnn')} "
                        "need at least 32 pixels")
    augments = tuple(opts.augments) or (tuple(PRESETS) if cuda else CPU_AUGMENTS)
    bad = [a for a in augments if a not in PRESETS]
    if bad:
        raise UserError(f"--augments {','.join(bad)}: expected some of {', '.join(PRESETS)}")
    if opts.max_epochs < 1:
        raise UserError(f"--max-epochs {opts.max_epochs}: expected >= 1")
    lo = opts.min_epochs or max(1, opts.max_epochs // 3)
    if not 1 <= lo <= opts.max_epochs:
        raise UserError(f"--min-epochs {opts.min_epochs}: expected 1..--max-epochs ({opts.max_epochs})")
    default_lr = base.resolved_lr()
    lr = (opts.lr_min, opts.lr_max) if opts.lr_min is not None and opts.lr_max is not None else \
        LR_RANGE if cuda else (default_lr * CPU_LR_SPAN[0], default_lr * CPU_LR_SPAN[1])
    if not 0 < lr[0] <= lr[1]:
        raise UserError(f"--lr-range {lr[0]:g},{lr[1]:g}: expected 0 < low <= high")
    space = Space(archs, sizes, augments, lr, (lo, opts.max_epochs), {})
    return dataclasses.replace(space, defaults=default_params(base, splits, space, default_size))


def _trial_options(opts: TuneOptions, out: Path, params: dict) -> TrainOptions:
    base = opts.base or TrainOptions(data=opts.data, out=out)
    fixed = {"batch_size": opts.batch_size, "grayscale": opts.grayscale}
    return dataclasses.replace(
        base, data=opts.data, out=out, weights=opts.weights, seed=opts.seed, device=opts.device, monitor=opts.monitor,
        early_stop=opts.early_stop, progress=False, resume=None, **{k: v for k, v in fixed.items() if v is not None},
        **params)


def default_params(base: TrainOptions, splits, space: Space, default_size: int) -> dict:
    """What `visiond train` would run on this data (the options file's, if given), put into the search space:
    the first trial, so the search starts from the defaults and its best is never worse than them (given
    the budget for one run). A default outside the space (an arch or preset not listed) is left to TPE."""
    params: dict = {}
    if base.arch in space.archs:
        params["arch"] = base.arch
    params["lr"] = min(max(base.resolved_lr(), space.lr[0]), space.lr[1])
    params["image_size"] = min(space.sizes, key=lambda s: (abs(s - default_size), s))
    augment, _ = splits.augmentation(base.augment)
    if augment in space.augments:
        params["augment"] = augment
    params["epochs"] = min(max(base.epochs, space.epochs[0]), space.epochs[1])
    return params


def _read_history(run_dir: Path) -> list[dict]:
    """The trial's epochs so far (written after every epoch; a half-written file reads as 'not yet')."""
    try:
        rows = json.loads((run_dir / "history.json").read_text())
        return rows if isinstance(rows, list) else []
    except (OSError, ValueError):
        return []


def _kill(proc: subprocess.Popen) -> None:
    """End the trial's process group (the trainer and any data-loader workers it started)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _View:
    """The progress view: a bar over the budget, the running trial, the best so far and the time left."""

    def __init__(self, enabled: bool, budget_s: float, dataset: str):
        from rich.progress import BarColumn, TextColumn

        self.progress = stderr_progress(TextColumn("[bold]tune[/bold] {task.fields[head]}"), BarColumn(),
                                        TextColumn("{task.fields[left]} left of {task.fields[budget]}"),
                                        enabled=enabled)
        self.task = self.progress.add_task("tune", total=budget_s, head=dataset, left=_fmt_s(budget_s),
                                           budget=_fmt_s(budget_s))

    def __enter__(self) -> "_View":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, elapsed: float, left: float, head: str) -> None:
        self.progress.update(self.task, completed=elapsed, left=_fmt_s(left), head=head)

    def say(self, text: str) -> None:
        if self.progress.disable:
            log.info("%s", text)
        else:
            self.progress.console.print(text, highlight=False, markup=False)


def _describe(params: dict) -> str:
    return (f"{params['arch']} lr {params['lr']:.3g} size {params['image_size']} "
            f"augment {params['augment']} epochs {params['epochs']}")


def run_tune(opts: TuneOptions) -> TuneResult:
    """Search until the budget or --max-trials runs out; write the table, plot, best options and checkpoint."""
    t0 = time.monotonic()  # the budget counts from here, imports included
    import optuna

    from visiond.train import plots  # noqa: F401 - matplotlib loaded now, not in the last seconds of the budget

    deadline = t0 + opts.budget_s
    reserve = min(5.0, max(2.0, 0.1 * opts.budget_s))  # for the table, the plot and copying the best checkpoint
    splits = load_splits(opts.data)  # the manifest only: a clear error now, and the val count for the log
    space = resolve_space(opts, splits)
    archs, sizes, augments, (min_epochs, max_epochs) = space.archs, space.sizes, space.augments, space.epochs
    _trial_options(opts, opts.out / "check.ckpt", {"arch": archs[0], "lr": space.lr[0], "image_size": sizes[0],
                                                   "augment": augments[0], "epochs": min_epochs}).validate()
    if opts.out.exists() and any(opts.out.iterdir()):
        raise UserError(f"--out {opts.out}: already holds files (an earlier tune?); expected a new or empty directory")
    (opts.out / "trials").mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=opts.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2))  # epoch 1: never
    rows: list[dict] = []
    first_epoch_s: list[float] = []  # spawn -> first validation figure, per trial
    best: dict | None = None
    log.info("tuning on %s: %d train / %d val images (test split untouched), %s budget; archs %s, sizes %s, "
             "augments %s, lr %.3g..%.3g, epochs %d..%d", opts.data, len(splits.train), len(splits.val),
             _fmt_s(opts.budget_s), ",".join(archs), ",".join(map(str, sizes)), ",".join(augments), *space.lr,
             min_epochs, max_epochs)
    # trial 0: the defaults; trial 1: the defaults trained for the longest the space allows (with early stopping),
    # the likeliest gain when the budget holds more than one run; then TPE
    study.enqueue_trial(space.defaults)
    if space.defaults.get("epochs", max_epochs) < max_epochs:
        study.enqueue_trial({**space.defaults, "epochs": max_epochs})
    stop_reason, failures = "budget spent", 0
    with _View(opts.progress, opts.budget_s, str(opts.data)) as view:
        while True:
            left = deadline - reserve - time.monotonic()
            if opts.max_trials and len(rows) >= opts.max_trials:
                stop_reason = f"{opts.max_trials} trials done"
                break
            need = min(first_epoch_s) if first_epoch_s else 1.0
            if left < need:
                stop_reason = (f"{_fmt_s(max(0, left))} left cannot hold a trial (the quickest first epoch took "
                               f"{_fmt_s(need)})" if first_epoch_s else "budget spent")
                break
            trial = study.ask()
            params = {"arch": trial.suggest_categorical("arch", list(archs)),
                      "lr": trial.suggest_float("lr", *space.lr, log=True),
                      "image_size": trial.suggest_categorical("image_size", list(sizes)),
                      "augment": trial.suggest_categorical("augment", list(augments)),
                      "epochs": trial.suggest_int("epochs", min_epochs, max_epochs)}
            row = _run_trial(opts, study, trial, params, deadline - reserve, view, best, t0, first_epoch_s)
            rows.append(row)
            if row["state"] == "complete" and (best is None or row["value"] > best["value"]):
                if best is not None:
                    _drop_checkpoints(Path(best["dir"]))
                best = row
            else:
                _drop_checkpoints(Path(row["dir"]))
            write_trials_csv(opts.out / "trials.csv", rows)
            view.say(f"trial {row['trial']} {row['state']}: val {opts.monitor} "
                     f"{'-' if row['value'] is None else format(row['value'], '.4f')} after {row['epochs_run']} "
                     f"epoch(s), {row['seconds']:.0f}s ({_describe(params)})"
                     + ("  [best so far]" if best is row else ""))
            failures = failures + 1 if row["state"] == "failed" else 0
            if failures >= 2:
                raise UserError(f"two trials in a row failed; the last said: {row['error']} "
                                f"(log: {row['dir']}/train.log)")
    best_yaml = best_ckpt = None
    if best is not None:
        best_yaml, best_ckpt = opts.out / "best.yaml", opts.out / "best.ckpt"
        body = [ln for ln in (Path(best["dir"]) / "options.yaml").read_text().splitlines(True)
                if not ln.startswith("#")]
        best_yaml.write_text(
            f"# visiond tune on {opts.data}: best of {len(rows)} trial(s), trial {best['trial']}, val {opts.monitor} "
            f"{best['value']:.6f}\n# use: visiond train {opts.data} --options {best_yaml.name} --out model.ckpt\n"
            + "".join(body))
        shutil.copyfile(Path(best["dir"]) / "model.ckpt", best_ckpt)
    trials_png(rows, opts.out / "trials.png", opts.monitor)
    seconds = time.monotonic() - t0
    log.info("tune stopped (%s) after %s: %d trial(s), %s", stop_reason, _fmt_s(seconds), len(rows),
             f"best trial {best['trial']} val {opts.monitor} {best['value']:.4f}" if best else "none complete")
    return TuneResult(opts.out, rows, best, best_yaml, best_ckpt, seconds)


def trial_command(opts: TuneOptions, options_file: Path, ckpt: Path) -> list[str]:
    """The child a trial runs: the ordinary `visiond train` with the trial's options file."""
    return [sys.executable, "-m", "visiond", "train", str(opts.data), "--options", str(options_file),
            "--out", str(ckpt), "--device", opts.device, "--no-progress"]


def _run_trial(opts: TuneOptions, study, trial, params: dict, kill_at: float, view: _View, best: dict | None,
               t0: float, first_epoch_s: list[float]) -> dict:
    """One `visiond train --options` child: per-epoch reports to the pruner, cut at `kill_at`."""
    import optuna

    tdir = opts.out / "trials" / f"{trial.number:03d}"
    tdir.mkdir(parents=True)
    ckpt = tdir / "model.ckpt"
    topts = _trial_options(opts, ckpt, params)
    (tdir / "options.yaml").write_text(options_yaml(topts, keys=_RECIPE_KEYS, header=(
        f"visiond tune trial {trial.number} on {opts.data}\n"
        f"reproduce: visiond train {opts.data} --options options.yaml --out model.ckpt")))
    cmd = trial_command(opts, tdir / "options.yaml", ckpt)
    started = time.monotonic()
    state, value, history, monitor_key, error = "complete", None, [], f"val_{opts.monitor}", ""
    with open(tdir / "train.log", "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while True:
                rc = proc.poll()
                rows = _read_history(run_dir_for(ckpt))
                for row in rows[len(history):]:
                    if not history:
                        first_epoch_s.append(time.monotonic() - started)
                    history.append(row)
                    running = max(r.get(monitor_key, float("-inf")) for r in history)
                    trial.report(running, len(history))
                    if rc is None and trial.should_prune():
                        state = "pruned"
                        break
                if state == "pruned" or rc is not None:
                    break
                if time.monotonic() >= kill_at:
                    state = "cut"
                    break
                now = time.monotonic()
                head = (f"trial {trial.number} ({_describe(params)}): epoch {len(history)}/{params['epochs']}"
                        f"  best {'-' if best is None else format(best['value'], '.4f')}"
                        + (f" (trial {best['trial']})" if best else ""))
                view.update(now - t0, opts.budget_s - (now - t0), head)
                time.sleep(POLL_S)
        finally:
            _kill(proc)  # pruned, cut, or an exception (Ctrl-C) here: the child never outlives its trial
    values = [r.get(monitor_key) for r in history if r.get(monitor_key) is not None]
    if state == "complete" and proc.returncode != 0:
        state = "failed"
        tail = (tdir / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        error = tail[0][:300]
        log.warning("trial %d failed (exit %s): %s (log: %s)", trial.number, proc.returncode, error,
                    tdir / "train.log")
    if state == "complete":
        from visiond.models.checkpoint import read_header

        value = float(read_header(ckpt)["meta"]["val_metrics"][opts.monitor])  # the saved best epoch's figure
        study.tell(trial, value)
    elif state == "failed":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        value = max(values) if values else None
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    best_epoch = 1 + max(range(len(values)), key=values.__getitem__) if values else 0
    return {"trial": trial.number, "state": state, "value": value, "epochs_run": len(history),
            "best_epoch": best_epoch, "seconds": round(time.monotonic() - started, 1), **params,
            "dir": str(tdir), "error": error}


def _drop_checkpoints(tdir: Path) -> None:
    """Only the best trial keeps its weights; the others keep options, history and log."""
    ckpt = tdir / "model.ckpt"
    for p in (ckpt, last_path_for(ckpt), run_dir_for(ckpt) / "resume.safetensors"):
        p.unlink(missing_ok=True)


# every option a training run reads, except where it runs (device, workers: given per run)
_RECIPE_KEYS = [f.name for f in dataclasses.fields(TrainOptions) if f.name not in ("device", "workers")]
CSV_COLUMNS = ("trial", "state", "value", "epochs_run", "best_epoch", "seconds", *SEARCHED, "dir", "error")


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def trials_png(rows: list[dict], path: Path, monitor: str) -> Path:
    """Val figure per trial: complete (dots), pruned (x at its last figure), cut at the budget edge
    (triangles), and the best so far as a step line."""
    from visiond.train.plots import _save, plt

    fig, ax = plt.subplots(figsize=(8, 4))
    styles = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:red"), "cut": ("v", "tab:orange")}
    for state, (marker, color) in styles.items():
        pts = [(r["trial"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=f"{state} ({len(pts)})", zorder=3)
    best, xs, ys = None, [], []
    for r in rows:
        if r["state"] == "complete" and r["value"] is not None:
            best = r["value"] if best is None else max(best, r["value"])
        if best is not None:
            xs.append(r["trial"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel(f"val {monitor}")
    ax.set_title(f"visiond tune: {len(rows)} trial(s)")
    ax.grid(alpha=0.3)
    if ax.collections or ax.lines:
        ax.legend(loc="best")
    return _save(fig, path)
