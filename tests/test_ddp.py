"""Data-parallel training: `torchrun --nproc_per_node=2` on CPU (gloo) trains a model that evaluates sensibly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shapes import make_shapes_dataset
from visiond.data.manifest import read_manifest, write_manifest
from visiond.data.split import split_dataset
from visiond.models.checkpoint import load_checkpoint
from visiond.train.evaluate import EvaluateOptions, evaluate_checkpoint


def test_torchrun_two_cpu_processes_train_a_model_that_evaluates(tmp_path):
    # given a shapes dataset
    ds = tmp_path / "ds"
    make_shapes_dataset(ds, per_class=120, size=32, seed=2)
    write_manifest(ds, split_dataset(read_manifest(ds), 0.6, 0.2, 0.2, seed=0))
    out = tmp_path / "ddp.ckpt"
    # when torchrun starts two training processes on the CPU
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "visiond", "train", str(ds),
                           "--out", str(out), "--epochs", "8", "--batch-size", "16", "--image-size", "32",
                           "--lr", "3e-3", "--augment", "light", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # then rank 0 alone reported and wrote the run, counting both processes' images every epoch
    assert "2 process(es)" in proc.stderr and proc.stdout.count("best epoch") == 1
    history = json.loads((tmp_path / "ddp.train" / "history.json").read_text())
    assert len(history) == 8
    assert load_checkpoint(out).meta["class_counts"]["train"] == {"circle": 72, "square": 72, "triangle": 72}
    # and the model is good on the held-out split
    report = evaluate_checkpoint(EvaluateOptions(checkpoint=out, dataset=ds, out=tmp_path / "eval"))
    assert report.metrics["accuracy"] >= 0.85, report.metrics["per_class"]
