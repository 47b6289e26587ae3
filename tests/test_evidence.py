"""Evidence images: what is kept, where, drawn how, and how a full or read-only disk and the bounds behave.

Real JPEGs on real file systems (a 1 MiB tmpfs plays the full disk), decoded back with OpenCV.
"""

from __future__ import annotations

import contextlib
import logging
import random
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from visiond.errors import UserError
from visiond.serve.inspect.evidence import EvidenceJob, EvidenceWriter, RoiMark
from visiond.serve.metrics import Metrics

DAY = 86400.0
T0 = 1_717_200_000.0 + 3600  # 2024-06-01 01:00 UTC
DEFECT = RoiMark("screw_left", (20, 60, 100, 100), "scratch", 0.93, True)
GOOD = RoiMark("label", (170, 60, 120, 80), "ok", 0.99, False)


def _frame(seed: int, *, noise: bool = False, gray: bool = False) -> np.ndarray:
    """A 320x240 scene: a smooth gradient, or noise that JPEG cannot shrink (~70 KB a frame)."""
    rng = np.random.default_rng(seed)
    if noise:
        img = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    else:
        ramp = np.linspace(60, 180, 320, dtype=np.float32)[None, :, None]
        img = np.broadcast_to(ramp, (240, 320, 3)).astype(np.uint8) + rng.integers(0, 12, (240, 320, 3), np.uint8)
    return img[:, :, 0].copy() if gray else img


def _job(job_id: str, *, verdict: str = "NG", decided_at: float = T0, frames: tuple | int = 2, camera: str = "c",
         part_id: str = "P-1", noise: bool = False) -> EvidenceJob:
    if isinstance(frames, int):
        frames = tuple(_frame(k, noise=noise) for k in range(frames))
    return EvidenceJob(camera=camera, job_id=job_id, part_id=part_id, verdict=verdict, reason=None, recipe="part-a",
                       decided_at=decided_at, frames=frames, rois=(DEFECT, GOOD))


@pytest.fixture
def make_writer(tmp_path):
    """Started writers on `tmp_path/evidence` (or a given root), stopped at the end of the test."""
    started = []

    def make(root: Path | None = None, **kw) -> EvidenceWriter:
        kw.setdefault("metrics", Metrics(process=False))
        w = EvidenceWriter(root or tmp_path / "evidence", **kw)
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


def _save(w: EvidenceWriter, job: EvidenceJob) -> list[str]:
    paths = w.plan(job)
    assert paths is not None
    assert w.submit(job, paths)
    assert w.flush(30)
    return paths


def _metric(w: EvidenceWriter, name: str, **labels) -> float:
    return w._m.registry.get_sample_value(name, labels) or 0.0


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _strong_red(img: np.ndarray) -> np.ndarray:
    b, g, r = (img[..., i].astype(int) for i in range(3))
    return (r > 170) & (r - np.maximum(b, g) > 90)


def _border(img: np.ndarray, rect: tuple[int, int, int, int], width: int = 3) -> np.ndarray:
    """The pixels of a `width`-wide band just inside the rectangle's outline (label box excluded: bottom and sides)."""
    x, y, w, h = rect
    inner = img[y + h - width:y + h, x:x + w], img[y + 20:y + h, x:x + width], img[y + 20:y + h, x + w - width:x + w]
    return np.concatenate([part.reshape(-1, 3) for part in inner])


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs ({options}) at {where}: {done.stderr.strip() or done.returncode}; "
                    "the disk-full and read-only evidence tests run as root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


# ---------------------------------------------------------------- what is written, and how it looks


def test_ng_job_writes_raw_and_annotated_jpegs_at_the_planned_paths(make_writer, tmp_path):
    # given an NG job of two frames, the second grayscale
    w = make_writer()
    job = _job("job-1", frames=(_frame(1), _frame(2, gray=True)))
    # when it is planned and written
    paths = w.plan(job)
    assert paths == ["2024-06-01/c/job-1_f0.jpg", "2024-06-01/c/job-1_f0_annotated.jpg",
                     "2024-06-01/c/job-1_f1.jpg", "2024-06-01/c/job-1_f1_annotated.jpg"]
    assert not (tmp_path / "evidence" / "2024-06-01").exists()  # planned before anything exists
    _save(w, job)
    # then exactly those files exist and decode
    root = tmp_path / "evidence"
    assert _files(root) == set(paths)
    raw0, ann0 = (cv2.imread(str(root / p), cv2.IMREAD_UNCHANGED) for p in paths[:2])
    raw1, ann1 = (cv2.imread(str(root / p), cv2.IMREAD_UNCHANGED) for p in paths[2:])
    assert raw0.shape == (240, 320, 3) and raw1.shape == (240, 320)  # raw frames keep their channels
    assert ann0.shape == ann1.shape == (240, 320, 3)  # annotated copies are colour
    # and the raw frame is the frame, the annotated copy has the defect boxed in red and the good ROI not
    assert np.abs(raw0.astype(int) - _frame(1)).mean() < 4
    assert np.abs(ann0.astype(int) - raw0).mean() > 3
    for ann in (ann0, ann1):
        assert _strong_red(_border(ann, DEFECT.rect)).mean() > 0.8
        assert _strong_red(_border(ann, GOOD.rect)).mean() < 0.05
    assert _strong_red(_border(raw0, DEFECT.rect)).mean() == 0
    # and the job is counted and its bytes tracked
    assert _metric(w, "visiond_evidence_saved_total", camera="c") == 1
    assert w.used_bytes == sum((root / p).stat().st_size for p in paths)


def test_annotated_false_keeps_only_raw_frames(make_writer, tmp_path):
    w = make_writer(annotated=False)
    assert _save(w, _job("j", frames=3)) == [f"2024-06-01/c/j_f{k}.jpg" for k in range(3)]
    assert len(_files(tmp_path / "evidence")) == 3


@pytest.mark.parametrize("save, sample_ok, verdict, kept", [
    ("ng", 0.0, "NG", True), ("ng", 0.0, "ERROR", True), ("ng", 0.0, "OK", False),
    ("ng", 1.0, "OK", True), ("all", 0.0, "OK", True), ("all", 0.0, "NG", True),
    ("none", 0.0, "NG", False), ("none", 1.0, "OK", False), ("none", 0.0, "ERROR", False),
])
def test_which_verdicts_keep_evidence(make_writer, tmp_path, save, sample_ok, verdict, kept):
    w = make_writer(save=save, sample_ok=sample_ok)
    paths = w.plan(_job("j", verdict=verdict))
    assert (paths is not None) == kept
    if kept:
        _save(w, _job("k", verdict=verdict))
        assert len(_files(tmp_path / "evidence")) == 4
    assert w.wants(verdict) == kept


def test_sample_ok_keeps_about_that_share_of_ok_parts_and_error_without_frames_keeps_nothing(make_writer):
    w = make_writer(sample_ok=0.25, rng=random.Random(3))
    kept = sum(w.wants("OK") for _ in range(2000))
    assert 400 < kept < 600
    assert w.plan(_job("e", verdict="ERROR", frames=())) is None
    with pytest.raises(ValueError, match="verdict 'MAYBE'"):
        w.wants("MAYBE")


@pytest.mark.parametrize("kw, message", [
    ({"save": "bad"}, "evidence.save 'bad': expected one of ng, all, none"),
    ({"sample_ok": 1.5}, "evidence.sample_ok 1.5: expected from 0 to 1"),
    ({"quota_mb": -1}, "evidence.quota_mb -1: expected 0 or more"),
    ({"jpeg_quality": 0}, "evidence.jpeg_quality 0: expected from 1 to 100"),
])
def test_bad_settings_are_one_line_user_errors(tmp_path, kw, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        EvidenceWriter(tmp_path, **kw)


def test_part_id_never_reaches_a_path(make_writer, tmp_path):
    # given part ids a PLC might send, hostile or not
    w = make_writer(save="all")
    hostile = ["../../etc/passwd", "/abs/path", "a/b\\c", "..", "x\x00y", "\u00fc" * 300, "$(rm -rf /)", ""]
    for i, part in enumerate(hostile):
        paths = _save(w, _job(f"job{i}", part_id=part, frames=1))
        # then the path is made of the date, camera and job id only
        assert paths == [f"2024-06-01/c/job{i}_f0.jpg", f"2024-06-01/c/job{i}_f0_annotated.jpg"]
    # and nothing was written outside the root
    assert {p.name for p in tmp_path.iterdir()} == {"evidence"}
    assert len(_files(tmp_path / "evidence")) == 2 * len(hostile)
    assert _metric(w, "visiond_evidence_saved_total", camera="c") == len(hostile)
    # and camera names and job ids that would escape are refused before anything is queued
    for bad in ({"camera": "../x"}, {"camera": "a/b"}, {"camera": ".."}):
        with pytest.raises(ValueError, match="camera"):
            w.plan(_job("j", **bad))
    for job_id in ("../j", "a/b", "..", ".hidden", ""):
        with pytest.raises(ValueError, match="job_id"):
            w.plan(_job(job_id))


def test_submit_refuses_paths_that_are_not_the_plan(make_writer):
    w = make_writer()
    job = _job("j")
    with pytest.raises(ValueError, match="not the ones plan"):
        w.submit(job, ["../../elsewhere.jpg"])


# ---------------------------------------------------------------- bounds: quota and age


def _job_bytes(tmp_path: Path, make_writer) -> int:
    probe = make_writer(tmp_path / "probe", quota_mb=0)
    _save(probe, _job("probe", decided_at=T0))
    return probe.used_bytes


def test_quota_evicts_the_oldest_day_first_and_removes_empty_directories(make_writer, tmp_path):
    # given a quota of about 3.5 jobs
    size = _job_bytes(tmp_path, make_writer)
    w = make_writer(quota_mb=3.5 * size / 2**20, keep_days=0)
    root = tmp_path / "evidence"
    # when jobs of five days are written, days 1 and 2 after day 3 (newer by mtime, older by date)
    for day in (3, 1, 2, 4, 5):
        _save(w, _job(f"d{day}", decided_at=T0 + day * DAY))
    # then the two oldest days went, by date, not by write order, and their directories with them
    assert sorted(p.name for p in root.iterdir()) == ["2024-06-04", "2024-06-05", "2024-06-06"]
    assert {Path(p).name.split("_")[0] for p in _files(root)} == {"d3", "d4", "d5"}
    assert _metric(w, "visiond_evidence_evicted_total", reason="quota") == 2 * 4
    assert w.used_bytes == sum((root / p).stat().st_size for p in _files(root)) <= 3.5 * size


def test_quota_keeps_the_job_just_written_even_when_its_day_is_the_oldest(make_writer, tmp_path):
    # given a quota a little over one job (its 90 % eviction target is under one job)
    size = _job_bytes(tmp_path, make_writer)
    w = make_writer(quota_mb=1.05 * size / 2**20, keep_days=0)
    _save(w, _job("newer", decided_at=T0 + 5 * DAY))
    # when a job dated earlier than everything kept pushes the total over the quota
    _save(w, _job("late", decided_at=T0))
    # then it is the other job that goes, all of it, and the late one stays whole
    assert _files(tmp_path / "evidence") == {f"2024-06-01/c/late_f{k}{s}.jpg" for k in (0, 1) for s in ("", "_annotated")}


def test_a_job_alone_over_the_quota_is_not_kept(make_writer, tmp_path):
    size = _job_bytes(tmp_path, make_writer)
    w = make_writer(quota_mb=0.5 * size / 2**20, keep_days=0)
    _save(w, _job("huge"))
    assert w.used_bytes <= 0.5 * size
    assert _metric(w, "visiond_evidence_evicted_total", reason="quota") >= 1


def test_keep_days_removes_old_date_directories_and_zero_keeps_forever(make_writer, tmp_path):
    # given evidence from 40, 10 and 0 days ago
    now = T0 + 40 * DAY
    w = make_writer(keep_days=30, quota_mb=0)
    forever = make_writer(tmp_path / "forever", keep_days=0, quota_mb=0)
    for writer in (w, forever):
        for age in (40, 10, 0):
            _save(writer, _job(f"a{age}", decided_at=now - age * DAY))
    # when pruned
    removed = w.prune(now)
    # then the 40-day-old day is gone, file by file, and counted
    assert removed == 4
    assert sorted(p.name for p in (tmp_path / "evidence").iterdir()) == ["2024-07-01", "2024-07-11"]
    assert _metric(w, "visiond_evidence_evicted_total", reason="age") == 4
    assert w.used_bytes == sum(p.stat().st_size for p in (tmp_path / "evidence").rglob("*.jpg"))
    # and keep_days 0 removes nothing
    assert forever.prune(now + 1000 * DAY) == 0
    assert len(_files(tmp_path / "forever")) == 12


def test_start_counts_what_is_already_on_disk(make_writer, tmp_path):
    first = make_writer(quota_mb=0)
    _save(first, _job("j"))
    first.stop()
    second = make_writer(quota_mb=0)
    assert second.used_bytes == first.used_bytes > 0


# ---------------------------------------------------------------- failures never stop the writer


def test_full_disk_is_counted_not_fatal_and_writing_resumes_after_space_is_freed(make_writer, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="visiond.serve.inspect.evidence")
    now = time.time()
    with _tmpfs(tmp_path / "disk", "size=1m") as disk:
        # given a writer on a 1 MiB disk and jobs of ~420 KB (3 noisy frames, raw + annotated) from 3 days ago
        w = make_writer(disk, keep_days=2, quota_mb=0)
        jobs = [_job(f"old{i}", decided_at=now - 3 * DAY, frames=3, noise=True) for i in range(6)]
        # when more are submitted than fit
        for job in jobs:
            assert w.submit(job, w.plan(job))
        assert w.flush(60)
        # then the writer went through all of them: some saved, the rest counted as disk_full, logged once
        saved = _metric(w, "visiond_evidence_saved_total", camera="c")
        full = _metric(w, "visiond_evidence_write_failures_total", camera="c", reason="disk_full")
        assert saved >= 1 and full >= 3 and saved + full == len(jobs)
        logged = [r for r in caplog.records if "disk_full" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        # and no temp file is left behind
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        # when pruning by age frees the disk
        assert w.prune(now) > 0
        assert not list(disk.iterdir())
        # then later jobs are written again
        for i in range(2):
            assert w.plan(_job(f"new{i}", decided_at=now, frames=1, noise=True))
            _save(w, _job(f"new{i}", decided_at=now, frames=1, noise=True))
        assert _metric(w, "visiond_evidence_saved_total", camera="c") == saved + 2
        assert _metric(w, "visiond_evidence_write_failures_total", camera="c", reason="disk_full") == full
        w.stop()


def test_read_only_disk_is_counted_as_read_only(make_writer, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
        w = make_writer(disk)
        for i in range(3):
            job = _job(f"j{i}")
            assert w.submit(job, w.plan(job))
        assert w.flush(30)
        assert _metric(w, "visiond_evidence_write_failures_total", camera="c", reason="read_only") == 3
        assert _metric(w, "visiond_evidence_saved_total", camera="c") == 0
        w.stop()


def test_an_unencodable_frame_is_an_error_and_the_next_job_is_written(make_writer, tmp_path):
    w = make_writer()
    bad = _job("bad", frames=(np.zeros((240, 320, 7), np.uint8),))
    assert w.submit(bad, w.plan(bad))
    _save(w, _job("good"))
    assert _metric(w, "visiond_evidence_write_failures_total", camera="c", reason="error") == 1
    assert {Path(p).name.split("_")[0] for p in _files(tmp_path / "evidence")} == {"good"}


def test_a_full_queue_refuses_without_blocking_and_counts_queue_full(tmp_path):
    # given a writer whose thread has not started, with room for two jobs
    m = Metrics(process=False)
    w = EvidenceWriter(tmp_path / "evidence", queue_size=2, metrics=m)
    jobs = [_job(f"j{i}") for i in range(3)]
    # when three are submitted
    began = time.monotonic()
    accepted = [w.submit(job, w.plan(job)) for job in jobs]
    # then the third is refused at once and counted
    assert accepted == [True, True, False] and time.monotonic() - began < 1
    assert m.registry.get_sample_value("visiond_evidence_write_failures_total",
                                       {"camera": "c", "reason": "queue_full"}) == 1
    # and the two queued are written once it runs
    w.start()
    try:
        assert w.flush(30)
    finally:
        w.stop()
    assert {Path(p).name.split("_")[0] for p in _files(tmp_path / "evidence")} == {"j0", "j1"}


def test_stop_drains_the_queue(tmp_path):
    m = Metrics(process=False)
    w = EvidenceWriter(tmp_path / "evidence", metrics=m)
    w.start()
    for i in range(8):
        job = _job(f"j{i}", frames=3)
        assert w.submit(job, w.plan(job))
    w.stop(timeout=60)
    assert len(_files(tmp_path / "evidence")) == 8 * 6
    assert m.registry.get_sample_value("visiond_evidence_saved_total", {"camera": "c"}) == 8
    # and after stop nothing more is taken
    late = _job("late")
    assert w.submit(late, w.plan(late)) is False
