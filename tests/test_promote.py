"""`visiond promote` on a served model file: backups that always load, rollback, modes and owners.

Models here are small untrained networks saved as real checkpoints: promote validates by
loading and running them, which needs no training.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visiond.models.arch import build_model
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.preprocess import PreprocessSpec

SERVICE_UID = 4242  # stands for systemd's dynamic user, the owner of StateDirectory=


def visiond(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visiond", *args], capture_output=True, text=True, timeout=120)


def model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = build_model("smallcnn", 2, in_channels=1, image_size=16)
    save_checkpoint(path, arch="smallcnn", arch_args={"in_channels": 1, "image_size": 16}, classes=["ok", "ng"],
                    spec=PreprocessSpec.for_color(16, "gray"), state_dict=net.state_dict(),
                    name="line")
    return path


@pytest.fixture
def models(tmp_path) -> list[Path]:
    (tmp_path / "cand").mkdir()
    return [model(tmp_path / "cand" / f"m{i}.ckpt", i) for i in range(4)]


def version(path: Path) -> str:
    return load_checkpoint(path).version


def service_state_dir(tmp_path: Path) -> Path:
    """A StateDirectory= as systemd makes it: owned by the service's user, 0750."""
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    os.chown(state, SERVICE_UID, SERVICE_UID)
    return state


def promote_as_root(umask: str, checkpoint: Path, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", f"umask {umask} && {sys.executable} -m visiond promote {checkpoint} "
                                       f"--to {target}"], capture_output=True, text=True, timeout=120)


def test_a_broken_served_file_never_replaces_the_last_good_backup(tmp_path, models):
    target = tmp_path / "serve" / "model.ckpt"
    assert visiond("promote", str(models[0]), "--to", str(target)).returncode == 0
    assert visiond("promote", str(models[1]), "--to", str(target)).returncode == 0
    good_prev = version(target.with_name("model.ckpt.prev"))
    # given a truncated file copied over the served model by hand (the daemon refuses it)
    target.write_bytes(models[2].read_bytes()[:500])
    # when a good model is promoted
    r = visiond("promote", str(models[3]), "--to", str(target))
    # then it serves, the broken file is not kept, and .prev still holds the last model that loaded
    assert r.returncode == 0, r.stderr
    assert "did not load, so it was not kept" in r.stdout
    assert version(target) == version(models[3])
    assert version(target.with_name("model.ckpt.prev")) == good_prev
    # and --rollback puts that last good model back
    r = visiond("promote", "--rollback", "--to", str(target))
    assert r.returncode == 0, r.stderr
    assert version(target) == good_prev


def test_backups_are_a_bounded_history_and_rollback_walks_it(tmp_path, models):
    target = tmp_path / "model.ckpt"
    for m in models:
        r = visiond("promote", str(m), "--to", str(target), "--keep", "2")
        assert r.returncode == 0, r.stderr
    # then the two newest replaced models are kept, newest first, and nothing else lies around
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == [
        "model.ckpt", "model.ckpt.prev", "model.ckpt.prev.2"]
    assert version(target.with_name("model.ckpt.prev")) == version(models[2])
    assert version(target.with_name("model.ckpt.prev.2")) == version(models[1])
    # when rolled back twice, each step goes one model further back
    assert visiond("promote", "--rollback", "--to", str(target)).returncode == 0
    assert version(target) == version(models[2])
    assert visiond("promote", "--rollback", "--to", str(target)).returncode == 0
    assert version(target) == version(models[1])
    # and with nothing left, a rollback says so in one line
    r = visiond("promote", "--rollback", "--to", str(target))
    assert r.returncode == 2 and "no backup to roll back to" in r.stderr and "Traceback" not in r.stderr
    assert version(target) == version(models[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root, as promote under sudo has")
def test_the_installed_model_keeps_the_mode_and_owner_of_the_file_it_replaces(tmp_path, models):
    target = service_state_dir(tmp_path) / "model.ckpt"
    assert visiond("promote", str(models[0]), "--to", str(target)).returncode == 0
    os.chown(target, SERVICE_UID, SERVICE_UID)
    target.chmod(0o640)
    # when root promotes under a strict umask
    r = promote_as_root("077", models[1], target)
    # then the service can still read its model: same mode and owner as the file replaced
    assert r.returncode == 0, r.stderr
    st = target.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, SERVICE_UID, SERVICE_UID)
    prev = target.with_name("model.ckpt.prev").stat()
    assert (prev.st_uid, stat.S_IMODE(prev.st_mode)) == (SERVICE_UID, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory owned by another user needs root to set up")
def test_a_first_install_the_service_could_not_read_is_refused(tmp_path, models):
    state = service_state_dir(tmp_path)
    target = state / "model.ckpt"
    # when root installs the first model under umask 077 (a root-only 0600 file)
    r = promote_as_root("077", models[0], target)
    # then it is refused in one line that says why and what to do, and nothing is installed
    assert r.returncode == 2, r.stderr
    assert f"uid {SERVICE_UID}" in r.stderr and "could not read" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists() and list(state.iterdir()) == []
    # and under the usual umask it installs, readable by the service
    r = promote_as_root("022", models[0], target)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_promote_finds_the_target_in_the_daemon_config(tmp_path, models):
    target = tmp_path / "served.ckpt"
    cfg = tmp_path / "visiond.yaml"
    cfg.write_text(f"cameras: [{{name: c, source: /dev/null}}]\nmodel: {{checkpoint: {target}}}\n")
    r = visiond("promote", str(models[0]), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert version(target) == version(models[0])
    r = visiond("promote", str(models[0]))
    assert r.returncode == 2 and "--to PATH or --config FILE" in r.stderr
