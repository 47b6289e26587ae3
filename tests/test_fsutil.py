"""Atomic writes: readable modes, whole replacement, nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from visiond.fsutil import atomic_copy, atomic_replace, atomic_write, atomic_write_text


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_new_files_get_the_umask_mode_not_0600(tmp_path, umask_027):
    # given a umask of 027, when each kind of write creates a file
    atomic_write(tmp_path / "a.bin", b"a")
    atomic_write_text(tmp_path / "b.txt", "b")
    with atomic_replace(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    src = tmp_path / "src.bin"
    src.write_bytes(b"d")
    src.chmod(0o600)
    atomic_copy(src, tmp_path / "d.bin")
    # then every file is 0666 minus the umask, as open() would make it (a copy does not inherit 0600)
    for name in ("a.bin", "b.txt", "c.bin", "d.bin"):
        assert _mode(tmp_path / name) == 0o640, name


def test_replacement_swaps_the_whole_content(tmp_path):
    # given a file that a reader holds open
    target = tmp_path / "model.bin"
    target.write_bytes(b"old" * 1000)
    with open(target, "rb") as reader:
        # when it is replaced
        atomic_write(target, b"new")
        # then the open reader still sees the old file whole, a new open sees only the new bytes
        assert reader.read() == b"old" * 1000
    assert target.read_bytes() == b"new"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_target_and_no_temp_file(tmp_path):
    # given an existing target
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    # when the writer raises halfway (a verification that fails, a full disk)
    with pytest.raises(RuntimeError, match="disagrees"):
        with atomic_replace(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".model.bin.") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"half")
            raise RuntimeError("export disagrees")
    # then the target is untouched and the temp file is gone
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failing_copy_leaves_no_temp_file(tmp_path):
    # when the source of a copy does not exist
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.bin", tmp_path / "out.bin")
    # then neither the target nor a temp file appears
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_leaves_no_temp_file(tmp_path):
    # when the data cannot be written (not bytes)
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "out.bin", "text, not bytes")  # type: ignore[arg-type]
    # then neither the target nor a temp file appears
    assert list(tmp_path.iterdir()) == []
