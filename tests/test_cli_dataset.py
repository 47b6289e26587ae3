"""`visiond dataset ...` and `visiond augment-preview` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from shapes import draw_shape, make_shapes_dataset
from visiond.cli.app import app
from visiond.data.manifest import read_manifest

runner = CliRunner()


def visiond(*args: str) -> subprocess.CompletedProcess:
    """The real entry point, so exit codes and stderr are what a shell sees."""
    return subprocess.run([sys.executable, "-m", "visiond", *args], capture_output=True, text=True, timeout=120)


def test_import_split_stats_preview_end_to_end(tmp_path):
    # given class folders of shapes
    rng = np.random.default_rng(0)
    for kind in ("circle", "square", "triangle"):
        (tmp_path / "src" / kind).mkdir(parents=True)
        for i in range(10):
            cv2.imwrite(str(tmp_path / "src" / kind / f"{i}.png"), draw_shape(kind, 32, rng))
    ds = str(tmp_path / "ds")
    # when imported, split, summarised and previewed
    r = runner.invoke(app, ["dataset", "import", "folder", str(tmp_path / "src"), ds, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "imported 30 images" in r.output
    r = runner.invoke(app, ["dataset", "split", ds, "--train", "0.6", "--val", "0.2", "--test", "0.2", "--seed", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["dataset", "stats", ds, "--json", "--sheet", str(tmp_path / "sheet.png")])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(app, ["augment-preview", ds, "--out", str(tmp_path / "grid.png"), "--size", "32", "--grayscale"])
    assert r2.exit_code == 0, r2.output
    # (the preview shows what training's default, auto, picks for 6 training images a class, and says why)
    assert "preset safe; auto: the smallest class has 6 training images" in " ".join(r2.output.split())
    # then the manifest holds the split and the outputs exist
    stats = json.loads(r.output)
    assert stats["counts"]["circle"] == {"train": 6, "val": 2, "test": 2}
    assert {s.split for s in read_manifest(ds)} == {"train", "val", "test"}
    assert cv2.imread(str(tmp_path / "sheet.png")) is not None
    assert cv2.imread(str(tmp_path / "grid.png")) is not None



def test_split_again_keeps_old_rows_and_reshuffle_says_what_it_breaks(tmp_path):
    # given a split dataset
    rng = np.random.default_rng(0)
    for kind in ("circle", "square"):
        (tmp_path / "src" / kind).mkdir(parents=True)
        for i in range(20):
            cv2.imwrite(str(tmp_path / "src" / kind / f"{i}.png"), draw_shape(kind, 32, rng))
    ds = str(tmp_path / "ds")
    assert runner.invoke(app, ["dataset", "import", "folder", str(tmp_path / "src"), ds, "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["dataset", "split", ds]).exit_code == 0
    first = {s.path: s.split for s in read_manifest(ds)}
    # when split again, with another seed
    r = runner.invoke(app, ["dataset", "split", ds, "--seed", "9"])
    # then nothing moved, and the output says so
    assert r.exit_code == 0, r.output
    assert "40 sample(s) kept their split, 0 new sample(s) assigned, 0 moved" in r.output
    assert {s.path: s.split for s in read_manifest(ds)} == first
    # when reshuffled on purpose, rows move and the user is told what that does to comparisons
    r = runner.invoke(app, ["dataset", "split", ds, "--seed", "9", "--reshuffle"])
    assert r.exit_code == 0, r.output
    assert "not comparable" in " ".join(r.output.split())
    assert {s.path: s.split for s in read_manifest(ds)} != first

def test_stats_table_output(tmp_path):
    make_shapes_dataset(tmp_path, per_class=3)
    r = runner.invoke(app, ["dataset", "stats", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "triangle" in r.output and "9 images, 3 classes" in r.output


@pytest.mark.parametrize("args, message", [
    (["dataset", "import", "idx", "{tmp}", "{tmp}/ds"], "no IDX files"),
    (["dataset", "split", "{tmp}/nothing"], "no manifest"),
    (["dataset", "split", "{shapes}", "--train", "0.9"], "expected them to sum to 1"),
    (["augment-preview", "{shapes}", "--out", "{tmp}/g.png", "--preset", "wild"], "expected one of none, safe"),
    (["augment-preview", "{shapes}", "--out", "{tmp}/g.png", "--size", "2"], "expected 8..4096"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, args, message):
    # given a small dataset, when a command is given bad input
    make_shapes_dataset(tmp_path / "shapes", per_class=2)
    proc = visiond(*(a.format(tmp=tmp_path, shapes=tmp_path / "shapes") for a in args))
    # then it exits 2 with one line on stderr and no traceback
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visiond: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "ds").exists()
