"""Frames the model was unsure about, saved into a dataset's inbox for labelling.

A sink beside MQTT. `submit` runs on the inference thread, so it only checks the
camera's rules (a few comparisons per frame) and hands matching frames to a bounded
queue; a writer thread hashes, dedupes, encodes and writes them. A slow or full disk
therefore never slows classification: the queue fills, further frames are dropped
and counted (`visiond_capture_write_failures_total{reason="queue_full"}`), and write
errors are counted by reason and logged at most every 30 s. Each saved frame carries
the model's verdict in its sidecar, for pre-labelling (see `visiond.data.inbox`).
"""

from __future__ import annotations

import collections
import errno
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from visiond.config import CameraConfig, CaptureConfig, CaptureRules
from visiond.data import phash as ph
from visiond.data.inbox import discard_inbox_item, inbox_usage, list_inbox, prediction_dict, write_inbox_item
from visiond.errors import UserError
from visiond.frames import Frame, Prediction
from visiond.logs import redact_url
from visiond.serve.metrics import Metrics

log = logging.getLogger(__name__)

MAX_COMMAND_COUNT = 1000
DEDUPE_WINDOW = 1024  # recent hashes per camera (a 64-bit XOR + popcount each, in the writer thread)
_LOG_EVERY_S = 30.0
_RESYNC_EVERY_S = 60.0
_ERRNO_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EIO: "io_error",
                  errno.EACCES: "permission", errno.EPERM: "permission", errno.EROFS: "read_only"}
FAILURE_REASONS = ("queue_full", "disk_full", "io_error", "permission", "read_only", "os_error", "error")


@dataclass(frozen=True, slots=True)
class CaptureJob:
    frame: Frame
    rule: str
    prediction: dict | None
    forced: bool  # asked for by a command: no dedupe


class _Bucket:
    """Token bucket: `per_minute` saves a minute, bursts up to the same number."""

    def __init__(self, per_minute: float, now: float):
        self.rate, self.capacity = per_minute / 60.0, max(1.0, per_minute)
        self.tokens, self.at = self.capacity, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0 and self.rate > 0:
            self.tokens -= 1.0
            return True
        return False


class _QuietLog:
    """One line per reason at most every `_LOG_EVERY_S`, with how many were not logged."""

    def __init__(self):
        self._last: dict[str, float] = {}
        self._quiet: collections.Counter = collections.Counter()

    def error(self, reason: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= _LOG_EVERY_S:
            extra = f" ({self._quiet[reason]} more since the last report)" if self._quiet[reason] else ""
            log.error(msg + extra, *args)
            self._last[reason], self._quiet[reason] = now, 0
        else:
            self._quiet[reason] += 1


class CaptureSink:
    """Rules on the inference thread, writes on its own thread; see the module docstring."""

    def __init__(self, cfg: CaptureConfig, cameras: Sequence[CameraConfig], metrics: Metrics, *,
                 thresholds: Callable[[], Mapping[str, float]] = dict,
                 writer: Callable = write_inbox_item, rng: random.Random | None = None):
        if cfg.dataset is None:
            raise ValueError("capture.dataset is not set")
        self.dataset = Path(cfg.dataset)
        self._cfg, self._m = cfg, metrics
        self._thresholds = thresholds
        self._write = writer
        self._rng = rng or random.Random()
        self._rules: dict[str, CaptureRules] = {}
        self._sources: dict[str, str] = {}
        for cam in cameras:
            rules = cam.capture or cfg.rules
            if rules.enabled:
                self._rules[cam.name] = rules
            self._sources[cam.name] = redact_url(str(cam.source))
        now = time.monotonic()
        self._buckets = {name: _Bucket(r.max_per_minute, now) for name, r in self._rules.items()}
        # a line repeats itself: remember enough recent captures to recognise the next pass of the same part
        self._dedupe = {name: ph.NearDuplicateFilter(r.dedupe_bits, window=DEDUPE_WINDOW)
                        for name, r in self._rules.items()}
        self._pending: dict[str, int] = {}
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[CaptureJob | None] = queue.Queue(cfg.queue_size)
        self._quota = int(cfg.quota_mb * 1024 * 1024)
        self._items: collections.deque[tuple[str, int]] = collections.deque()  # (id, bytes), oldest first
        self._bytes = 0
        self._next_resync = 0.0
        self._quiet = _QuietLog()
        self._stopping = threading.Event()
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.saved = 0
        self._children: dict[tuple, object] = {}
        for name in self._rules:
            for reason in ("queue_full", "disk_full", "io_error"):
                self._child(metrics.capture_write_failures, name, reason)
            for reason in ("duplicate", "rate_limited"):
                self._child(metrics.capture_skipped, name, reason)

    # ---- any thread ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def request(self, camera: str | None, count: int) -> list[str]:
        """cmd/capture: save the next `count` frames of a camera (None: of every capturing camera)."""
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COMMAND_COUNT:
            raise UserError(f"count {count!r}: expected a whole number from 1 to {MAX_COMMAND_COUNT}")
        if camera is None:
            targets = list(self._rules)
        elif camera in self._rules:
            targets = [camera]
        else:
            raise UserError(f"camera {str(camera)[:64]!r}: expected one of {sorted(self._rules)} "
                            "(cameras with capture enabled)")
        with self._pending_lock:
            for cam in targets:
                self._pending[cam] = min(MAX_COMMAND_COUNT, self._pending.get(cam, 0) + count)
        log.info("capture requested: %d frame(s) of %s", count, ", ".join(targets))
        return targets

    def stop(self, timeout: float = 3.0) -> None:
        """Write what is queued (up to `timeout`), then end the writer; a hung disk is left behind."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon = True
                log.error("capture writer still busy after %.1f s (slow disk?); %d frame(s) not saved",
                          timeout, self._queue.qsize())

    # ---- inference thread: cheap ------------------------------------------------
    def submit(self, predictions: Sequence[Prediction]) -> None:
        if not self._rules or self._stopping.is_set():
            return
        thresholds = None
        now = time.monotonic()
        for p in predictions:
            cam = p.frame.camera
            rules = self._rules.get(cam)
            if rules is None:
                continue
            if self._pending and self._take_pending(cam):
                self._enqueue(p, "command", True)
                continue
            if thresholds is None and rules.near_threshold is not None:
                thresholds = self._thresholds()
            rule = self._match(p, rules, thresholds)
            if rule is None:
                continue
            if not self._buckets[cam].take(now):
                self._child(self._m.capture_skipped, cam, "rate_limited").inc()
                continue
            self._enqueue(p, rule, False)

    def _take_pending(self, cam: str) -> bool:
        with self._pending_lock:
            n = self._pending.get(cam, 0)
            if n <= 0:
                return False
            if n == 1:
                del self._pending[cam]
            else:
                self._pending[cam] = n - 1
            return True

    def _match(self, p: Prediction, rules: CaptureRules, thresholds: Mapping[str, float] | None) -> str | None:
        if rules.low_score_below is not None and p.score < rules.low_score_below:
            return "low_score"
        if rules.near_threshold is not None and thresholds:
            for label, score in p.top:
                thr = thresholds.get(label)
                if thr is not None and abs(score - thr) <= rules.near_threshold:
                    return "near_threshold"
        if rules.sample_rate > 0 and self._rng.random() < rules.sample_rate:
            return "sample"
        return None

    def _enqueue(self, p: Prediction, rule: str, forced: bool) -> None:
        pred = prediction_dict(p.label, p.score, p.top, p.model.name, p.model.version)
        try:
            frame = p.frame if p.crop is None else replace(p.frame, image=p.crop)  # what the model saw: the ROI
            self._queue.put_nowait(CaptureJob(frame, rule, pred, forced))
        except queue.Full:
            self._child(self._m.capture_write_failures, p.frame.camera, "queue_full").inc()
            self._quiet.error("queue_full", "capture queue full (%d frames; slow disk?): dropping frames to capture, "
                              "classification continues", self._cfg.queue_size)

    def _child(self, family, camera: str, label: str):
        key = (id(family), camera, label)
        child = self._children.get(key)
        if child is None:
            kw = {"camera": camera, "rule" if family is self._m.capture_saved else "reason": label}
            child = self._children[key] = family.labels(**kw)
        return child

    # ---- writer thread ----------------------------------------------------------
    def _run(self) -> None:
        try:
            self._resync()
        except (OSError, UserError) as exc:
            log.error("capture: cannot read the inbox at %s (%s); the quota counts from zero", self.dataset, exc)
        while True:
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            if job is None or self._abandon:
                return
            self._handle(job)

    def _handle(self, job: CaptureJob) -> None:
        cam = job.frame.camera
        try:
            value = ph.phash(job.frame.image)
            dedupe = self._dedupe[cam]
            if not job.forced and dedupe.seen(value):
                self._child(self._m.capture_skipped, cam, "duplicate").inc()
                return
            item = self._write(self.dataset, job.frame.image, {
                "camera": cam, "captured_at": job.frame.captured_at, "source": self._sources.get(cam, ""),
                "rule": job.rule, "prediction": job.prediction, "phash": value})
            dedupe.add(value)
        except OSError as exc:
            reason = _ERRNO_REASONS.get(exc.errno, "os_error")
            self._child(self._m.capture_write_failures, cam, reason).inc()
            self._quiet.error(reason, "capture: cannot write to %s (%s: %s); predictions keep flowing",
                              self.dataset, reason, exc.strerror or exc)
            return
        except Exception as exc:  # a bug or an odd frame must not kill the writer
            self._child(self._m.capture_write_failures, cam, "error").inc()
            self._quiet.error("error", "capture: failed to save a frame of %s (%r)", cam, exc)
            return
        self.saved += 1
        self._child(self._m.capture_saved, cam, job.rule).inc()
        self._account(item.id, item.size_bytes())

    def _resync(self) -> None:
        """Recount the inbox from disk (items labelled or removed by others leave it meanwhile)."""
        items = list_inbox(self.dataset)
        self._items = collections.deque((i.id, i.size_bytes()) for i in items)
        self._bytes = inbox_usage(self.dataset)[0]
        self._next_resync = time.monotonic() + _RESYNC_EVERY_S

    def _account(self, item_id: str, size: int) -> None:
        if time.monotonic() >= self._next_resync:
            self._resync()
        else:
            self._items.append((item_id, size))
            self._bytes += size
        evicted = 0
        while self._bytes > self._quota and self._items:
            old_id, old_size = self._items.popleft()
            try:
                discard_inbox_item(self.dataset, old_id)
            except UserError:
                pass  # labelled or removed meanwhile
            except OSError as exc:
                self._quiet.error("evict", "capture: cannot evict %s: %s", old_id, exc)
                break
            self._bytes -= old_size
            evicted += 1
        if evicted:
            log.info("capture inbox over its %.0f MB quota: evicted the %d oldest item(s)", self._quota / 2**20, evicted)
