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
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import cv2
import numpy as np

from visiond.config import CameraConfig, redact_url
from visiond.frames import Frame
from visiond.metrics import Metrics
from visiond.queues import FrameQueue

log = logging.getLogger(__name__)

# A decoder and the model share two cores (DESIGN.md): OpenCV's own worker
# pool would only compete with the inference thread.
cv2.setNumThreads(1)

SourceKind = Literal["stream", "device", "folder", "file"]
StatusCallback = Callable[[str, bool, str], None]
Opener = Callable[..., Any]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_DEVICE_PATH = re.compile(r"^/dev/video\d+$")
_FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_ffmpeg_env_lock = threading.Lock()
_ffmpeg_env_ready = False
_WATCHDOG_PERIOD_S = 0.25  # stall noticed within read_timeout + 1 + this
# Folder images: a 20000x20000 PNG compresses to kilobytes and decodes to 1.2 GB.
# 50 MP covers the largest industrial sensors; bigger files are skipped unread.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 512 * 1024 * 1024


class RoiError(ValueError):
    """The camera ROI does not overlap the frame: a config error, not a crash."""


# --------------------------------------------------------------------------- opening


def source_kind(source: str | int) -> SourceKind:
    """What a config `source` names: a network stream, a V4L2 device, an image folder or a video file."""
    if isinstance(source, int) or str(source).strip().isdigit() or _DEVICE_PATH.match(str(source)):
        return "device"
    text = str(source)
    if text.lower().startswith(_STREAM_SCHEMES):
        return "stream"
    return "folder" if Path(_file_path(text)).is_dir() else "file"


def is_live(source: str | int) -> bool:
    """Live sources reconnect forever and keep only their newest frames."""
    return source_kind(source) in ("stream", "device")


def default_policy(source: str | int) -> Literal["latest", "every"]:
    """Queue policy when the config names none: files must not lose frames, live cameras must not lag."""
    return "latest" if is_live(source) else "every"


def open_capture(source: str | int, cfg: CameraConfig, on_decode_error: Callable[[Path, str], None] | None = None):
    """Open `source` with the backend its kind needs; the caller must release() it, opened or not."""
    kind = source_kind(source)
    if kind in ("stream", "file"):
        _ensure_ffmpeg_options()  # written before any of our FFmpeg opens can read it
    if kind == "stream":
        return _open_stream(str(source), cfg)
    if kind == "device":
        text = str(source).strip()
        cap = cv2.VideoCapture(int(text) if text.isdigit() else text, cv2.CAP_V4L2)
        if cap.isOpened():
            configure_v4l2(cap, fps=cfg.fps)
        return cap
    if kind == "folder":
        return ImageFolderCapture(_file_path(str(source)), on_decode_error)
    # one decode thread: on a small box the model needs the other core (DESIGN, hot path)
    return cv2.VideoCapture(_file_path(str(source)), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])


def _open_stream(url: str, cfg: CameraConfig):
    """FFmpeg over TCP with explicit open/read timeouts, so a dead camera never blocks for FFmpeg's 30 s default."""
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.read_timeout_s * 1000),
        # frame-threaded decoding adds one frame of latency per thread and takes the model's core
        cv2.CAP_PROP_N_THREADS, 1,
    ]
    return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def _ensure_ffmpeg_options() -> None:
    """Make OpenCV's FFmpeg use RTSP over TCP (UDP loses packets and smears frames on busy networks).

    The variable is process-global and read by every FFmpeg open, so it is written once,
    under a lock, before our first FFmpeg open, merged with any options the operator set.
    Per-camera timeouts travel as open parameters instead.
    """
    global _ffmpeg_env_ready
    with _ffmpeg_env_lock:
        if _ffmpeg_env_ready:
            return
        current = os.environ.get(_FFMPEG_OPTIONS_ENV, "")
        if "rtsp_transport;" not in current:
            os.environ[_FFMPEG_OPTIONS_ENV] = "|".join(filter(None, [current, "rtsp_transport;tcp"]))
        _ffmpeg_env_ready = True


def configure_v4l2(cap, fps: float = 0, fourcc: str = "MJPG", buffers: int = 2) -> dict[str, bool]:
    """Ask a V4L2 camera for MJPG (USB 2 bandwidth), a small buffer (fresh frames) and the fps cap.

    Works on any capture object: a property the backend does not support is
    simply refused (False), which is how a video file goes through it in tests.
    """
    wanted = {
        "fourcc": (cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fourcc)),
        "buffersize": (cv2.CAP_PROP_BUFFERSIZE, buffers),
    }
    if fps > 0:
        wanted["fps"] = (cv2.CAP_PROP_FPS, fps)
    applied = {name: bool(cap.set(prop, value)) for name, (prop, value) in wanted.items()}
    log.debug("v4l2 properties applied: %s", applied)
    return applied


def _file_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def _natural_key(path: Path) -> list:
    """img2 before img10: folders of numbered frames play in capture order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _header_pixels(path: Path) -> int | None:
    """Width x height from the image header, without decoding; None when the header can't be read."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size[0] * im.size[1]
    except Image.DecompressionBombError as exc:  # PIL's own limit is above ours: report its count
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1
    except Exception:  # PIL can't parse it (UnidentifiedImageError and worse): OpenCV decides
        return None


def image_file_problem(path: Path) -> tuple[str, str] | None:
    """(drop reason, why) for an image file that must not be decoded, else None; reads header and tail only."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "decode_error", "empty file"
        if size > MAX_IMAGE_BYTES:
            return "too_large", f"{size} bytes, over the limit of {MAX_IMAGE_BYTES}"
        pixels = _header_pixels(path)
        if pixels is not None and pixels > MAX_IMAGE_PIXELS:
            return "too_large", f"{pixels} pixels, over the limit of {MAX_IMAGE_PIXELS}"
        with open(path, "rb") as f:
            if f.read(2) == b"\xff\xd8":
                f.seek(max(0, size - 1024))
                if not f.read().rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                    # libjpeg would hand back a grey-filled partial picture: never classify half a part
                    return "decode_error", "truncated JPEG (no end-of-image marker)"
    except OSError as exc:
        return "decode_error", f"cannot read ({exc.strerror or exc.__class__.__name__})"
    return None


def load_image(path: Path) -> tuple[np.ndarray | None, str, str]:
    """(BGR uint8 image, "", "") or (None, drop reason, why) for a file that must be skipped."""
    problem = image_file_problem(path)
    if problem is not None:
        return None, *problem
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None, "decode_error", "not a decodable image"
    return image, "", ""


class ImageFolderCapture:
    """A folder of images read like a VideoCapture: sorted; unreadable or oversized files logged and skipped."""

    def __init__(self, folder: str | Path, on_decode_error: Callable[[Path, str], None] | None = None):
        self.folder = Path(folder)
        self._on_decode_error = on_decode_error
        try:
            files = [p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            self._opened = True
        except OSError as exc:
            log.error("cannot list image folder %s: %s", self.folder, exc)
            files, self._opened = [], False
        self._files = sorted(files, key=_natural_key)
        self._pos = 0
        self._image: np.ndarray | None = None

    def isOpened(self) -> bool:  # noqa: N802 (VideoCapture's name)
        return self._opened

    def grab(self) -> bool:
        self._image = None
        while self._pos < len(self._files):
            path = self._files[self._pos]
            self._pos += 1
            image, reason, why = load_image(path)
            if image is not None:
                self._image = image
                return True
            log.warning("skipping image %s: %s", path, why)
            if self._on_decode_error is not None:
                self._on_decode_error(path, reason)
        return False

    def retrieve(self, image=None, flag: int = 0) -> tuple[bool, np.ndarray | None]:
        return self._image is not None, self._image

    def read(self, image=None) -> tuple[bool, np.ndarray | None]:
        return self.retrieve() if self.grab() else (False, None)

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FRAME_COUNT:
            return float(len(self._files))
        return float(self._pos) if prop == cv2.CAP_PROP_POS_FRAMES else 0.0

    def set(self, prop: int, value: float) -> bool:
        if prop == cv2.CAP_PROP_POS_FRAMES:
            self._pos = max(0, int(value))
            return True
        return False

    def release(self) -> None:
        self._opened, self._files, self._image = False, [], None


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


def roi_slices(roi: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The ROI (x, y, w, h) clamped to a frame of `shape`; RoiError if nothing of it is inside."""
    x, y, w, h = roi
    height, width = shape[:2]
    x0, y0, x1, y1 = min(x, width), min(y, height), min(x + w, width), min(y + h, height)
    if x1 <= x0 or y1 <= y0:
        raise RoiError(f"roi [{x}, {y}, {w}, {h}] lies outside the {width}x{height} frame; fix cameras[].roi")
    if (x1 - x0, y1 - y0) != (w, h):
        log.warning("roi [%d, %d, %d, %d] clamped to the %dx%d frame", x, y, w, h, width, height)
    return slice(y0, y1), slice(x0, x1)


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
