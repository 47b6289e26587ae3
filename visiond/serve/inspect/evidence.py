"""Evidence images of inspected parts: the burst's frames as JPEGs, raw and annotated, kept bounded.

When a part is rejected, quality wants to see why. The core asks `plan` for the
paths (deterministic, so they go into the verdict payload before the files
exist) and hands the job to `submit`, which only enqueues: a writer thread
encodes, draws the ROIs and a banner, and writes each file atomically under
`<root>/<YYYY-MM-DD UTC>/<camera>/<job_id>_f<k>[_annotated].jpg`. A full or
read-only disk never reaches the inference thread: failures are counted by
reason and logged at most every 10 s, and the writer goes on with the next job.
Old evidence goes by age (`keep_days`) and by size (`quota_mb`, oldest day first).
The PLC's part id is free text: it is drawn in the banner, never used in a path.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np

from visiond.config import NAME_PATTERN
from visiond.errors import UserError
from visiond.fsutil import atomic_write
from visiond.timefmt import rfc3339

if TYPE_CHECKING:
    from visiond.serve.metrics import Metrics

log = logging.getLogger(__name__)

SAVE_MODES = ("ng", "all", "none")
VERDICTS = ("OK", "NG", "ERROR")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CAMERA = re.compile(NAME_PATTERN)
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_LOG_EVERY_S = 10.0
_PRUNE_EVERY_S = 60.0
_QUOTA_TARGET = 0.9  # evict down to this share of the quota, so one job over it does not evict on every write
_ERRNO_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full",
                  errno.EROFS: "read_only", errno.EACCES: "read_only", errno.EPERM: "read_only"}

_GREEN, _RED, _GREY, _AMBER = (0, 200, 0), (0, 0, 255), (160, 160, 160), (0, 170, 255)
_VERDICT_COLOURS = {"OK": _GREEN, "NG": _RED, "ERROR": _AMBER}
_FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class RoiMark:
    """What is drawn for one ROI."""

    name: str
    rect: tuple[int, int, int, int]  # x, y, w, h in full-frame pixels
    label: str | None
    score: float | None
    defect: bool


@dataclass(frozen=True)
class EvidenceJob:
    camera: str
    job_id: str  # unique, safe in a file name
    part_id: str  # free text from the PLC: drawn, never part of a path
    verdict: str  # OK | NG | ERROR
    reason: str | None
    recipe: str | None
    decided_at: float  # epoch seconds (UTC)
    frames: tuple[np.ndarray, ...]  # the burst's full frames, uint8 HxW or HxWx3 BGR (may be empty for ERROR)
    rois: tuple[RoiMark, ...]


class _File(NamedTuple):
    day: str
    mtime: float
    path: Path
    size: int


def _printable(text: str, limit: int = 48) -> str:
    """ASCII Hershey fonts draw nothing else; a PLC may send anything, of any length."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bgr(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2 or frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    return frame.copy()


def _put_label(img: np.ndarray, text: str, x: int, y: int, colour: tuple, scale: float, thick: int) -> None:
    """`text` on a filled box of `colour`, with its top-left corner at (x, y)."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
    cv2.rectangle(img, (x, y), (x + tw + 4, y + th + base + 4), colour, cv2.FILLED)
    cv2.putText(img, text, (x + 2, y + th + 2), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)


def annotate(frame: np.ndarray, job: EvidenceJob) -> np.ndarray:
    """A BGR copy of `frame` with each ROI boxed (green OK, red defect, grey unclassified) and a verdict banner."""
    img = _bgr(frame)
    h, w = img.shape[:2]
    thick = max(3, round(min(h, w) / 120))  # survives JPEG chroma subsampling
    scale = max(0.4, min(h, w) / 600)
    text_thick = max(1, thick // 2)
    banner = f"{job.verdict}  part {_printable(job.part_id)}  {job.camera}  {rfc3339(job.decided_at)}"
    if job.recipe:
        banner += f"  recipe {_printable(job.recipe, 32)}"
    if job.reason:
        banner += f"  ({_printable(job.reason, 32)})"
    (tw, th), base = cv2.getTextSize(banner, _FONT, scale, text_thick)
    banner_scale = min(scale, scale * (w - 8) / max(tw, 1))
    (_, th), base = cv2.getTextSize(banner, _FONT, banner_scale, text_thick)
    banner_h = th + base + 8
    for roi in job.rois:
        x, y, rw, rh = (int(v) for v in roi.rect)
        colour = _GREY if roi.label is None else _RED if roi.defect else _GREEN
        cv2.rectangle(img, (x, y), (x + rw - 1, y + rh - 1), colour, thick)
        text = roi.name if roi.label is None else f"{roi.name} {roi.label}"
        if roi.label is not None and roi.score is not None:
            text += f" {roi.score:.2f}"
        text = _printable(text, 64)
        (_, lh), lbase = cv2.getTextSize(text, _FONT, scale * 0.8, text_thick)
        label_h = lh + lbase + 4
        top = y - label_h if y - label_h >= banner_h else y + thick  # above the box, or inside it when no room
        _put_label(img, text, x, top, colour, scale * 0.8, text_thick)
    cv2.rectangle(img, (0, 0), (w - 1, banner_h - 1), (0, 0, 0), cv2.FILLED)
    cv2.putText(img, banner, (4, th + 4), _FONT, banner_scale, _VERDICT_COLOURS.get(job.verdict, _GREY),
                text_thick, cv2.LINE_AA)
    return img


class _QuietLog:
    """One line per reason at most every `_LOG_EVERY_S` (a full disk fails every job), with the count held back."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def error(self, reason: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= _LOG_EVERY_S:
            held = self._held.pop(reason, 0)
            log.error(msg + (f" ({held} more since the last report)" if held else ""), *args)
            self._last[reason] = now
        else:
            self._held[reason] = self._held.get(reason, 0) + 1


class EvidenceWriter:
    """Plans and queues on the caller's thread; encodes, writes and prunes on its own; see the module docstring."""

    def __init__(self, root: Path, *, save: str = "ng", sample_ok: float = 0.0, annotated: bool = True,
                 keep_days: float = 30, quota_mb: float = 2000, jpeg_quality: int = 90, queue_size: int = 64,
                 metrics: Metrics | None = None, rng: random.Random | None = None):
        if save not in SAVE_MODES:
            raise UserError(f"evidence.save {save!r}: expected one of {', '.join(SAVE_MODES)}")
        for name, value, low, high in (("sample_ok", sample_ok, 0, 1), ("keep_days", keep_days, 0, None),
                                       ("quota_mb", quota_mb, 0, None), ("jpeg_quality", jpeg_quality, 1, 100),
                                       ("queue_size", queue_size, 1, None)):
            if value < low or (high is not None and value > high):
                bound = f"from {low} to {high}" if high is not None else f"{low} or more"
                raise UserError(f"evidence.{name} {value!r}: expected {bound}")
        self.root = Path(root)
        self.save, self.sample_ok, self.annotated = save, float(sample_ok), annotated
        self.keep_days = float(keep_days)
        self.quota_bytes = int(quota_mb * 1024 * 1024)
        self._jpeg = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)]
        self._m = metrics
        self._rng = rng or random.Random()
        self._queue: queue.Queue[tuple[EvidenceJob, list[str]]] = queue.Queue(queue_size)
        self._lock = threading.Lock()  # one of: a job's writes, a prune
        self._used = 0
        self._quiet = _QuietLog()
        self._children: dict[tuple, object] = {}
        self._stopping = threading.Event()
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="evidence-writer", daemon=True)

    # ---- the caller's thread: cheap ---------------------------------------------
    def wants(self, verdict: str) -> bool:
        """Whether a part with this verdict keeps evidence (OK parts by the `sample_ok` draw)."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
        if self.save == "none":
            return False
        if self.save == "all" or verdict != "OK":
            return True
        return self.sample_ok > 0 and self._rng.random() < self.sample_ok

    def plan(self, job: EvidenceJob) -> list[str] | None:
        """The paths, relative to root, that `submit` will write for `job`; None when nothing is kept."""
        if not job.frames or not self.wants(job.verdict):
            return None
        return self._layout(job)

    def _layout(self, job: EvidenceJob) -> list[str]:
        if not _CAMERA.match(job.camera):
            raise ValueError(f"camera {job.camera[:64]!r}: not a camera name (config.NAME_PATTERN)")
        if not _JOB_ID.match(job.job_id):
            raise ValueError(f"job_id {job.job_id[:64]!r}: expected letters, digits, '_', '.', '-'")
        day = dt.datetime.fromtimestamp(job.decided_at, dt.timezone.utc).strftime("%Y-%m-%d")
        stem = f"{day}/{job.camera}/{job.job_id}"
        suffixes = ("", "_annotated") if self.annotated else ("",)
        return [f"{stem}_f{k}{s}.jpg" for k in range(len(job.frames)) for s in suffixes]

    def submit(self, job: EvidenceJob, paths: list[str]) -> bool:
        """Queue `job` for the writer (never blocks); False, counted and logged, when the queue is full."""
        if paths != self._layout(job):
            raise ValueError(f"evidence paths of job {job.job_id} are not the ones plan() gave")
        if self._stopping.is_set():
            self._quiet.error("stopped", "evidence writer stopped: job %s of %s not saved", job.job_id, job.camera)
            return False
        try:
            self._queue.put_nowait((job, paths))
            return True
        except queue.Full:
            self._fail(job.camera, "queue_full", "evidence queue full (%d jobs; slow disk?): job %s of %s not "
                       "saved, inspection goes on", self._queue.maxsize, job.job_id, job.camera)
            return False

    # ---- lifecycle ------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    def start(self) -> None:
        """Count what is already on disk, then start the writer thread."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._used = sum(f.size for f in self._scan())
        except OSError as exc:
            log.error("evidence: cannot read %s (%s); the quota counts from zero", self.root, exc)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued job is written (or failed); False when `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), then end the writer; a hung disk is left behind."""
        self._stopping.set()
        if self._thread.ident is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon = True
            log.error("evidence writer still busy after %.1f s (slow disk?); %d job(s) not saved",
                      timeout, self._queue.qsize())

    # ---- writer thread ------------------------------------------------------------------
    def _run(self) -> None:
        next_prune = time.monotonic() + _PRUNE_EVERY_S
        while not self._abandon:
            if time.monotonic() >= next_prune:
                self._prune_logged()
                next_prune = time.monotonic() + _PRUNE_EVERY_S
            try:
                job, paths = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            try:
                if not self._abandon:
                    self._write(job, paths)
            finally:
                self._queue.task_done()

    def _write(self, job: EvidenceJob, paths: list[str]) -> None:
        written: set[Path] = set()
        try:
            images = []
            for frame in job.frames:
                images.append(frame)
                if self.annotated:
                    images.append(annotate(frame, job))
            blobs = [self._encode(img) for img in images]
            with self._lock:
                for rel, data in zip(paths, blobs):
                    target = self.root / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(target, data)
                    written.add(target)
                    self._used += len(data)
        except OSError as exc:
            reason = _ERRNO_REASONS.get(exc.errno, "error")
            self._fail(job.camera, reason, "evidence: cannot write job %s of %s under %s (%s: %s); inspection goes "
                       "on", job.job_id, job.camera, self.root, reason, exc.strerror or exc)
        except Exception as exc:  # an odd frame or a bug must not end the writer
            self._fail(job.camera, "error", "evidence: failed to save job %s of %s (%r)", job.job_id, job.camera, exc)
        else:
            if self._m is not None:
                self._child(self._m.evidence_saved, camera=job.camera).inc()
        if written and self.quota_bytes and self._used > self.quota_bytes:
            self._prune_logged(protect=written)

    def _encode(self, img: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", img, self._jpeg)
        if not ok:
            raise ValueError(f"JPEG encoding failed for a {img.dtype} {img.shape} frame")
        return buf.tobytes()

    def _prune_logged(self, protect: set[Path] = frozenset()) -> None:
        try:
            self._prune(time.time(), protect)
        except Exception as exc:  # the writer outlives a broken tree
            self._quiet.error("prune", "evidence: pruning %s failed (%r)", self.root, exc)

    def _fail(self, camera: str, reason: str, msg: str, *args) -> None:
        if self._m is not None:
            self._child(self._m.evidence_write_failures, camera=camera, reason=reason).inc()
        self._quiet.error(reason, msg, *args)

    def _child(self, family, **labels):
        key = (id(family), *labels.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(**labels)
        return child

    # ---- pruning: any thread --------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Remove evidence older than `keep_days`, then the oldest over the quota; the number of files removed."""
        return self._prune(time.time() if now is None else now, frozenset())

    def _scan(self) -> list[_File]:
        """Every evidence file, oldest first: by date directory, then mtime (temp files and strangers left alone)."""
        files: list[_File] = []
        if not self.root.is_dir():
            return files
        for day in self.root.iterdir():
            if not (_DAY.match(day.name) and day.is_dir()):
                continue
            for cam in day.iterdir():
                if not (_CAMERA.match(cam.name) and cam.is_dir()):
                    continue
                for f in cam.iterdir():
                    if f.suffix != ".jpg" or f.name.startswith("."):
                        continue
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue
                    files.append(_File(day.name, st.st_mtime, f, st.st_size))
        files.sort(key=lambda f: (f.day, f.mtime, f.path.name))
        return files

    def _prune(self, now: float, protect: set[Path] | frozenset) -> int:
        with self._lock:
            files = self._scan()  # also corrects the count for files others removed
            self._used = sum(f.size for f in files)
            doomed: list[tuple[_File, str]] = []
            if self.keep_days > 0:
                cutoff = dt.datetime.fromtimestamp(now - self.keep_days * 86400, dt.timezone.utc).strftime("%Y-%m-%d")
                doomed += [(f, "age") for f in files if f.day < cutoff]
                files = [f for f in files if f.day >= cutoff]
            if self.quota_bytes:
                used = sum(f.size for f in files)
                own = [f for f in files if f.path in protect]
                others = [f for f in files if f.path not in protect]
                if sum(f.size for f in own) <= self.quota_bytes:
                    own = []  # the job just written stays unless it alone is over the quota
                target = self.quota_bytes * _QUOTA_TARGET
                if used > self.quota_bytes:
                    for f in others + own:
                        if used <= target:
                            break
                        doomed.append((f, "quota"))
                        used -= f.size
            return self._remove(doomed)

    def _remove(self, doomed: list[tuple[_File, str]]) -> int:
        removed, parents = 0, set()
        counts = {"age": 0, "quota": 0}
        for f, reason in doomed:
            try:
                f.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._quiet.error("evict", "evidence: cannot remove %s (%s)", f.path, exc.strerror or exc)
                continue
            else:
                removed += 1
                counts[reason] += 1
            self._used -= f.size
            parents.add(f.path.parent)
        for cam in parents:
            for directory in (cam, cam.parent):
                try:
                    directory.rmdir()
                except OSError:
                    pass  # not empty
        if self._m is not None:
            for reason, n in counts.items():
                if n:
                    self._child(self._m.evidence_evicted, reason=reason).inc(n)
        if removed:
            log.info("evidence: removed %d file(s) (%d by age, %d over the %.0f MB quota); %.1f MB kept",
                     removed, counts["age"], counts["quota"], self.quota_bytes / 2**20, self._used / 2**20)
        return removed
