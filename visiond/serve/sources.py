"""Camera, RTSP, file and folder sources: one capture thread per camera.

A `FrameSource` reads frames, crops the camera ROI (a numpy view, no copy),
caps the frame rate and hands `Frame`s to its `FrameQueue`. Files and folders
end at EOF (or loop). Live sources (RTSP/HTTP streams, V4L2 devices) never
give up: a failed open or read releases the capture and reconnects with capped,
jittered exponential backoff, and a small watchdog reports a read that hangs.
OpenCV decoding releases the GIL, so a thread per camera is enough.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from visiond.config import CameraConfig
from visiond.frames import Frame
from visiond.logs import redact_url
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameQueue
from visiond.video import RoiError, is_live, open_capture, roi_slices

log = logging.getLogger(__name__)

# A decoder and the model share two cores (DESIGN.md): OpenCV's own worker
# pool would only compete with the inference thread.
cv2.setNumThreads(1)

StatusCallback = Callable[[str, bool, str], None]
Opener = Callable[..., Any]

_WATCHDOG_PERIOD_S = 0.25  # stall noticed within read_timeout + 1 + this


# --------------------------------------------------------------------------- pacing


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, so many cameras behind one switch do not retry in step."""

    initial_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        base = min(self.cap_s, self.initial_s * 2.0 ** min(attempt, 30))
        return base * (0.5 + 0.5 * random.random())


class _Pacer:
    """The fps cap: files sleep until the next frame is due, live sources skip early frames."""

    def __init__(self, fps: float, tolerance: float):
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._tolerance = tolerance * self.period
        self._next_due = 0.0

    def sleep(self, stop: threading.Event) -> None:
        delay = self._next_due - time.monotonic()
        if delay > 0:
            stop.wait(delay)

    def due(self, now: float) -> bool:
        return now + self._tolerance >= self._next_due

    def accept(self, now: float) -> None:
        # fell behind (blocked consumer, slow camera): restart the schedule rather than burst
        self._next_due += self.period
        if self._next_due < now:
            self._next_due = now + self.period


# --------------------------------------------------------------------------- the source thread


class FrameSource:
    """One camera's capture thread (and, for live sources, its stall watchdog)."""

    def __init__(
        self,
        cfg: CameraConfig,
        queue: FrameQueue,
        metrics: Metrics,
        on_status: StatusCallback,
        stop: threading.Event,
        *,
        backoff: Backoff | None = None,
        opener: Opener = open_capture,
    ):
        self.cfg = cfg
        self.camera = cfg.name
        self.queue = queue
        self._on_status = on_status
        self._stop = stop
        self._backoff = backoff or Backoff()
        if opener is open_capture and cfg.decode != "cpu":  # GPU decode where it can run (serve/nvdec.py)
            from visiond.serve.nvdec import make_opener

            opener = make_opener(cfg, open_capture)
        self._opener = opener
        self._live = is_live(cfg.source)
        self._shown = redact_url(str(cfg.source))
        self._pacer = _Pacer(cfg.fps, tolerance=0.1 if self._live else 0.0)
        self._read_timeout = cfg.read_timeout_s
        # cached children: no .labels() lookup per frame
        self._captured = metrics.frames_captured.labels(camera=self.camera)
        self._decode_errors = metrics.frames_dropped.labels(camera=self.camera, reason="decode_error")
        self._too_large = metrics.frames_dropped.labels(camera=self.camera, reason="too_large")
        self._up = metrics.source_up.labels(camera=self.camera)
        self._reconnects = metrics.source_reconnects.labels(camera=self.camera)
        self._last_frame = metrics.source_last_frame.labels(camera=self.camera)
        self._index = 0
        self._online = False
        self._status_key: tuple[bool, str] | None = None
        self._status_lock = threading.Lock()
        self._read_started = 0.0  # monotonic start of the read in progress; 0.0 = not reading
        self._open_started = 0.0  # monotonic start of the open in progress; 0.0 = not opening
        self.error: BaseException | None = None  # the exception that killed the capture thread (a bug)
        self._last_frame_mono = 0.0
        self.latest: Frame | None = None
        self._roi_shape: tuple[int, ...] | None = None
        self._roi: tuple[slice, slice] | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"source-{self.camera}", daemon=True)
        self._watchdog = (
            threading.Thread(target=self._watch, name=f"watchdog-{self.camera}", daemon=True) if self._live else None
        )

    def start(self) -> None:
        self._up.set(0)
        self._thread.start()
        if self._watchdog is not None:
            self._watchdog.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the threads; a read blocked in the driver may outlive this (the threads are daemons)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (self._thread, self._watchdog):
            if t is not None and t.ident is not None:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def blocked(self, now: float) -> tuple[str, float, float] | None:
        """("open"|"read", seconds inside it, the timeout it was given) while the capture thread is in one; else None.

        FFmpeg and V4L2 honour their timeouts, so a call far past its own is a wedged
        driver that only a restart clears (the daemon's liveness check uses this).
        """
        started = self._open_started
        if started:
            return "open", now - started, self.cfg.open_timeout_s
        started = self._read_started
        if started:
            return "read", now - started, self.cfg.read_timeout_s
        return None

    # --- capture thread ---

    def _run(self) -> None:
        try:
            self._run_live() if self._live else self._run_file()
        except RoiError as exc:
            log.error("camera %s: %s", self.camera, exc)
            self._report(False, str(exc))
        except Exception as exc:  # a bug: reported; the daemon decides (it exits non-zero)
            self.error = exc
            log.exception("camera %s: source failed", self.camera)
            self._report(False, f"source failed: {exc.__class__.__name__}")
        finally:
            self._finished.set()
            self.queue.close()

    def _run_file(self) -> None:
        """Play the file (or folder) once, or forever with loop: true, reopening at each end."""
        while not self._stop.is_set():
            cap = self._open()
            try:
                if not cap.isOpened():
                    self._report(False, f"cannot open {self._shown}")
                    return
                frames, _ = self._pump(cap)
            finally:
                cap.release()
            if self._stop.is_set() or not self.cfg.loop:
                break
            if frames == 0:
                self._report(False, f"no frames in {self._shown}")
                return
        self._report(False, "stopped" if self._stop.is_set() else "end of input")

    def _run_live(self) -> None:
        """Open, stream until it fails, release, back off, reopen: forever, with a new capture each time."""
        attempt = 0
        while not self._stop.is_set():
            cap = self._open()
            try:
                if cap.isOpened():
                    frames, reason = self._pump(cap)
                else:
                    frames, reason = 0, f"cannot open {self._shown}"
            finally:
                cap.release()  # every failed capture too: no fd or thread left per retry
            if self._stop.is_set():
                break
            if frames:
                attempt = 0  # it streamed: the next outage starts again from the shortest delay
            self._report(False, reason, key="stalled" if reason.startswith("stalled") else None)
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.info("camera %s: %s; reconnecting in %.1f s", self.camera, reason, delay)
            if self._stop.wait(delay):
                break
            self._reconnects.inc()
        self._report(False, "stopped")

    def _open(self):
        self._open_started = time.monotonic()
        try:
            return self._opener(self.cfg.source, self.cfg, self._on_decode_error)
        finally:
            self._open_started = 0.0

    def _pump(self, cap) -> tuple[int, str]:
        """Read until the source ends, fails or we stop; return (frames queued, why it ended)."""
        frames = 0
        grab, retrieve, pacer, live = cap.grab, cap.retrieve, self._pacer, self._live
        while not self._stop.is_set():
            if pacer.period and not live:
                pacer.sleep(self._stop)
            self._read_started = started = time.monotonic()
            ok = grab()
            mono, wall = time.monotonic(), time.time()
            self._read_started = 0.0
            if not ok or (live and mono - started >= self._read_timeout):
                # FFmpeg's read timeout can still hand back one stale frame: a stall either way
                return frames, self._end_reason(mono, mono - started)
            if pacer.period:
                if live and not pacer.due(mono):
                    continue  # keep draining the camera, decode-only: no colour conversion, no frame
                pacer.accept(mono)
            ok, image = retrieve()
            if not ok or image is None:
                self._decode_errors.inc()
                continue
            if not self._emit(image, wall, mono):
                break
            frames += 1
        return frames, "stopped"

    def _emit(self, image: np.ndarray, wall: float, mono: float) -> bool:
        if self.cfg.roi is not None:
            if image.shape != self._roi_shape:
                self._roi, self._roi_shape = roi_slices(self.cfg.roi, image.shape), image.shape
            image = image[self._roi]
        frame = Frame(self.camera, self._index, wall, mono, image)
        self.latest = frame  # the operator page's tile reads it (a reference, no copy)
        self._index += 1
        self._last_frame_mono = mono
        self._captured.inc()
        self._last_frame.set(wall)
        if not self._online:
            self._report(True, "streaming")
        return self.queue.put(frame, self._stop)

    def _end_reason(self, now: float, blocked_s: float) -> str:
        if not self._live:
            return "end of input"
        if blocked_s >= self._read_timeout:
            return f"stalled: no frame for {now - (self._last_frame_mono or now - blocked_s):.1f} s"
        return "read failed"

    def _on_decode_error(self, path: Path, reason: str = "decode_error") -> None:
        (self._too_large if reason == "too_large" else self._decode_errors).inc()

    # --- status ---

    def _report(self, online: bool, reason: str, key: str | None = None) -> None:
        """Set source_up and tell on_status, once per change (a repeated stall or retry is not news).

        The callback runs under the lock, so the watchdog and the capture thread can never
        deliver their statuses out of order (a retained MQTT status must end up the true one).
        """
        with self._status_lock:
            status_key = (online, key or reason)
            if status_key == self._status_key:
                return
            self._status_key, self._online = status_key, online
            self._up.set(1 if online else 0)
            level = logging.WARNING if self._live and not online else logging.INFO
            log.log(level, "camera %s %s: %s", self.camera, "online" if online else "offline", reason)
            try:
                self._on_status(self.camera, online, reason)
            except Exception:  # a sink's failure must not stop capture
                log.exception("camera %s: status callback failed", self.camera)

    def _watch(self) -> None:
        """Report a read that has blocked past read_timeout + 1 s, even if the driver never returns."""
        limit = self.cfg.read_timeout_s + 1.0
        while not self._finished.wait(_WATCHDOG_PERIOD_S) and not self._stop.is_set():
            started = self._read_started
            if not started or not self._online:
                continue
            now = time.monotonic()
            if now - started > limit:
                silent = now - (self._last_frame_mono or started)
                self._report(False, f"stalled: no frame for {silent:.1f} s", key="stalled")
