"""The `visiond` command line: every command group is there, one that cannot be imported fails loudly,
and `visiond bench` makes its default video and model once."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from visiond.cli.app import app, register_commands


def test_a_command_module_that_is_missing_names_itself():
    # given a command module list with a module that does not exist
    # when the commands are registered
    # then registration fails naming that module, instead of leaving its commands out
    with pytest.raises(ImportError, match=r"visiond\.cli\.no_such_commands cannot be loaded"):
        register_commands(typer.Typer(), ("visiond.cli.run", "visiond.cli.no_such_commands"))


def test_a_command_module_whose_own_import_fails_names_itself_and_the_cause(tmp_path, monkeypatch):
    # given a command module that imports a package this install lacks
    (tmp_path / "broken_commands.py").write_text("import visiond_absent_dependency\n\n"
                                                 "def register(app):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # when the commands are registered
    # then the error names the command module and the missing dependency
    with pytest.raises(ImportError, match=r"broken_commands cannot be loaded: .*visiond_absent_dependency"):
        register_commands(typer.Typer(), ("broken_commands",))


def test_every_command_group_is_registered():
    # given the entry point, which registers every command module when it is imported
    runner = CliRunner()
    # when its help and the dataset group's help are shown
    top = runner.invoke(app, ["--help"], terminal_width=200)
    dataset = runner.invoke(app, ["dataset", "--help"], terminal_width=200)
    # then each command module's commands are listed (capture's under dataset)
    assert top.exit_code == 0 and dataset.exit_code == 0, top.output + dataset.output
    for command in ("run", "bench", "config", "dataset", "train", "export", "label", "compare", "promote"):
        assert f" {command} " in top.output, command
    assert " capture " in dataset.output


def test_bench_defaults_are_made_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    from visiond.cli.run import bench_cache_dir, bench_inputs
    from visiond.harness.synthline import read_truth, truth_path

    # given an empty cache directory, except for a model already trained into it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = bench_cache_dir()
    cache.mkdir(parents=True)
    (cache / "model.ckpt").write_bytes(b"a model")
    # when bench asks for its default inputs twice
    video, checkpoint = bench_inputs(None, None)
    made_at = video.stat().st_mtime_ns
    again = bench_inputs(None, None)
    # then the synthetic line was rendered once into the cache (no temporary left), and the model reused
    assert (video, checkpoint) == (cache / "line.mp4", cache / "model.ckpt") == again
    assert video.stat().st_mtime_ns == made_at
    assert len(read_truth(truth_path(video))) == 300
    assert sorted(p.name for p in cache.iterdir()) == ["line.mp4", "line.mp4.truth.csv", "model.ckpt"]


def test_bench_inputs_given_are_used_as_they_are(tmp_path, monkeypatch):
    from visiond.cli.run import bench_inputs

    # given a video and a model on the command line
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    video, checkpoint = tmp_path / "v.mp4", tmp_path / "m.ckpt"
    video.write_bytes(b"v")
    checkpoint.write_bytes(b"m")
    # when bench resolves its inputs
    # then it uses them and makes nothing
    assert bench_inputs(video, checkpoint) == (video, checkpoint)
    assert not (tmp_path / "cache").exists()


def test_a_missing_bench_input_is_refused_before_the_other_is_made(tmp_path, monkeypatch):
    from visiond.cli.run import bench_inputs
    from visiond.errors import UserError

    # given a video that does not exist, and no model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # when bench resolves its inputs
    # then it says so at once, without training a default model first
    with pytest.raises(UserError, match=r"--video .*nope\.mp4: not found"):
        bench_inputs(tmp_path / "nope.mp4", None)
    assert not (tmp_path / "cache").exists()
