"""`visiond tune`: inside its budget, never reading the test split, and a best.yaml that reproduces its
best trial with `visiond train --options`; the options file itself."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shapes import make_split_shapes_dataset
from visiond.cli.app import app
from visiond.data.manifest import read_manifest
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint, read_header
from visiond.train.options import TrainOptions
from visiond.train.options_file import apply_options_file, read_options_file
from visiond.train.tune import TuneOptions, parse_budget, run_tune

# Installed in every Python process started with this directory on PYTHONPATH (the tune command and each
# trial it starts): records every file opened under the dataset, through Python's audit hook.
SITECUSTOMIZE = '''
import os, sys
_root = os.environ["VISIOND_TEST_DATASET"]
_fd = os.open(os.environ["VISIOND_TEST_OPENED"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_root):
            os.write(_fd, (path + "\\n").encode())
sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_split_shapes_dataset(tmp_path_factory.mktemp("tune-shapes"), per_class=24, size=32, seed=2)


def test_budget_parses_like_a_person_writes_it():
    assert parse_budget("30m") == 1800 and parse_budget("1h30m") == 5400
    assert parse_budget("90s") == 90 and parse_budget("45") == 45 and parse_budget("0.5m") == 30
    for bad in ("30x", "", "m", "0m", "30m-"):
        with pytest.raises(UserError, match="--budget"):
            parse_budget(bad)


def test_tune_never_opens_the_test_split_and_its_best_options_reproduce(shapes, tmp_path):
    # given a dataset split 60/20/20 and an audit hook in every process that records the files opened
    hook_dir, opened = tmp_path / "hook", tmp_path / "opened.txt"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
                        "VISIOND_TEST_DATASET": str(shapes.resolve()), "VISIOND_TEST_OPENED": str(opened)}
    out = tmp_path / "tune"
    # when `visiond tune` searches two short trials
    cmd = [sys.executable, "-m", "visiond", "tune", str(shapes), "--out", str(out), "--budget", "4m",
           "--max-trials", "2", "--max-epochs", "2", "--min-epochs", "1", "--sizes", "32", "--device", "cpu",
           "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # then training read train and val images, and not one test image
    by_split = {s.path: s.split for s in read_manifest(shapes)}
    seen = {Path(p).relative_to(shapes.resolve()).as_posix() for p in opened.read_text().split()}
    splits_read = {by_split[p] for p in seen if p in by_split}
    assert splits_read == {"train", "val"}, splits_read
    # and the table, the plot, the best options and the best checkpoint are there
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2 and {r["state"] for r in rows} <= {"complete", "pruned"}
    # and the first trial was what `visiond train` does by default, inside the search's bounds (10 epochs -> 2;
    # `auto` augmentation -> safe for 14 training images a class)
    first = rows[0]
    assert (first["arch"], float(first["lr"]), first["image_size"], first["augment"], first["epochs"]) == \
        ("smallcnn", 0.002, "32", "safe", "2")
    assert (out / "trials.png").stat().st_size > 0
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["value"]))
    options = yaml.safe_load((out / "best.yaml").read_text())
    assert options["lr"] == pytest.approx(float(best["lr"])) and options["image_size"] == 32
    assert load_checkpoint(out / "best.ckpt").meta["val_metrics"]["macro_f1"] == pytest.approx(float(best["value"]))
    # and `visiond train --options best.yaml` gets the best trial's val score again (same seed, CPU)
    again = tmp_path / "again.ckpt"
    run = subprocess.run([sys.executable, "-m", "visiond", "train", str(shapes), "--options", str(out / "best.yaml"),
                          "--out", str(again), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = read_header(again)["meta"]["val_metrics"]["macro_f1"]
    assert got == pytest.approx(float(best["value"]), abs=1e-6)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_a_trial_running_at_the_budget_edge_is_cut_and_the_search_ends_in_time(shapes, tmp_path):
    # given a 20-second budget and trials that would need many epochs
    out = tmp_path / "tiny"
    opts = TuneOptions(data=shapes, out=out, budget_s=20, sizes=(32,), min_epochs=1000, max_epochs=1000,
                       early_stop=10_000, device="cpu", progress=False)  # no early stop: a trial needs minutes
    # when tune runs
    t0 = time.monotonic()
    result = run_tune(opts)
    took = time.monotonic() - t0
    # then it ended inside its budget, the running trial was cut and its process is gone
    assert took <= 20.5, took
    assert result.trials and result.trials[-1]["state"] == "cut" and result.best is None
    assert not _processes_mentioning(str(out))
    assert (out / "trials.csv").exists() and (out / "trials.png").exists() and not (out / "best.yaml").exists()


def test_tune_refuses_bad_input_before_any_work(shapes, tmp_path):
    with pytest.raises(UserError, match="--archs knn"):
        run_tune(TuneOptions(data=shapes, out=tmp_path / "a", budget_s=60, archs=("knn",)))
    with pytest.raises(UserError, match="need at least 32 pixels"):
        run_tune(TuneOptions(data=shapes, out=tmp_path / "a", budget_s=60, archs=("resnet18",), sizes=(28,)))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "trials.csv").write_text("x")
    with pytest.raises(UserError, match="already holds files"):
        run_tune(TuneOptions(data=shapes, out=tmp_path / "used", budget_s=60, device="cpu"))
    result = CliRunner().invoke(app, ["tune", str(shapes), "--out", str(tmp_path / "b"), "--budget", "30x"])
    assert result.exit_code != 0 and "--budget '30x'" in str(result.exception)


def test_options_file_is_checked_and_the_command_line_wins(shapes, tmp_path):
    f = tmp_path / "opts.yaml"
    f.write_text("arch: knn\nknn_k: 3\nimage_size: 32\n")
    # the file's values replace the defaults, except those given explicitly
    opts = apply_options_file(TrainOptions(data=shapes, out=tmp_path / "m.ckpt", knn_k=1), f, {"knn_k"})
    assert (opts.arch, opts.knn_k, opts.image_size) == ("knn", 1, 32)
    # through the real command line: the file picks knn, --knn-k on the line wins over the file's 3
    out = tmp_path / "knn.ckpt"
    result = CliRunner().invoke(app, ["train", str(shapes), "--options", str(f), "--knn-k", "1", "--out", str(out),
                                      "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.arch == "knn" and ckpt.arch_args["k"] == 1 and ckpt.spec.height == 32
    # bad files fail in one line naming what is wrong
    for text, match in (("lr: fast\n", "lr: 'fast'; expected a number"), ("learning_rate: 0.1\n", "unknown option"),
                        ("data: /x\n", "on the command line"), ("- 1\n", "expected a mapping"),
                        ("lr: [\n", "not valid YAML")):
        f.write_text(text)
        with pytest.raises(UserError, match=match.replace("[", r"\[")):
            read_options_file(f)


# A stand-in for `visiond train` that reports per-epoch figures at once (no training): trials 0 and 1 are
# good (0.9), later ones poor (0.1), and a poor one would then take 30 s more before its third epoch.
FAKE_TRAIN = '''
import json, sys, time
from pathlib import Path
ckpt = Path(sys.argv[1]); run = ckpt.with_name(ckpt.stem + ".train"); run.mkdir(parents=True, exist_ok=True)
good = int(ckpt.parent.name) < 2
rows = []
for epoch in range(1, 4):
    if epoch == 3 and not good:
        time.sleep(30)
    rows.append({"epoch": epoch, "val_macro_f1": 0.9 if good else 0.1, "val_accuracy": 0.9 if good else 0.1})
    (run / "history.json").write_text(json.dumps(rows))
    time.sleep(0.3)
ckpt.write_bytes(b"stand-in")
'''


def test_poor_trials_are_pruned_on_their_per_epoch_reports(shapes, tmp_path, monkeypatch):
    from visiond.models import checkpoint
    from visiond.train import tune

    # given trials whose per-epoch validation figures are reported as they come
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(tune, "trial_command", lambda opts, options, ckpt: [sys.executable, str(fake), str(ckpt)])
    monkeypatch.setattr(checkpoint, "read_header", lambda path: {"meta": {"val_metrics": {"macro_f1": 0.9}}})
    out = tmp_path / "prune"
    # when four trials run (the median pruner waits for two finished trials and one epoch)
    t0 = time.monotonic()
    result = run_tune(TuneOptions(data=shapes, out=out, budget_s=300, max_trials=4, min_epochs=3, max_epochs=3,
                                  sizes=(32,), device="cpu", progress=False))
    # then the poor trials were stopped after their second epoch, long before their third
    states = [(r["state"], r["epochs_run"]) for r in result.trials]
    assert states == [("complete", 3), ("complete", 3), ("pruned", 2), ("pruned", 2)], states
    assert time.monotonic() - t0 < 30 and not _processes_mentioning(str(out))
    assert result.best["trial"] == 0 and (out / "best.ckpt").read_bytes() == b"stand-in"
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "pruned"]


def test_on_a_cpu_the_search_starts_at_the_defaults_then_trains_them_longer_and_stays_near_them(
        shapes, tmp_path, monkeypatch):
    from visiond.models import checkpoint
    from visiond.train import tune

    # given a CPU, no search bounds from the user, training defaults of 2 epochs (an options file's) and trials
    # that report at once
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(tune, "trial_command", lambda opts, options, ckpt: [sys.executable, str(fake), str(ckpt)])
    monkeypatch.setattr(checkpoint, "read_header", lambda path: {"meta": {"val_metrics": {"macro_f1": 0.9}}})
    base = TrainOptions(data=shapes, out=tmp_path / "base.ckpt", epochs=2)
    # when six trials run
    result = run_tune(TuneOptions(data=shapes, out=tmp_path / "cpu", budget_s=300, max_trials=6, min_epochs=1,
                                  max_epochs=3, device="cpu", progress=False, base=base))
    rows = list(csv.DictReader(open(tmp_path / "cpu" / "trials.csv")))
    assert len(rows) == len(result.trials) == 6
    # then trial 0 is the defaults (32 px images, lr 0.002, `auto` -> safe for 14 images a class, 2 epochs) and
    # trial 1 the same trained for the most epochs allowed
    params = [(r["arch"], float(r["lr"]), int(r["image_size"]), r["augment"], int(r["epochs"])) for r in rows]
    assert params[0] == ("smallcnn", 0.002, 32, "safe", 2)
    assert params[1] == ("smallcnn", 0.002, 32, "safe", 3)
    # and every trial stayed near the defaults: lr within /3..x2, the default size or 1.5x, the meaning-keeping
    # presets
    assert all(0.002 / 3 - 1e-12 <= lr <= 0.004 + 1e-12 for _, lr, _, _, _ in params), params
    assert {size for _, _, size, _, _ in params} <= {32, 48}
    assert {aug for _, _, _, aug, _ in params} <= {"none", "light", "safe"}
    assert len({p for p in params[2:]}) == 4  # and TPE drew four different points after them
