"""Opening what a camera config names, and reading images safely: one place for both halves.

`open_capture` opens RTSP/HTTP streams (FFmpeg over TCP with timeouts), V4L2
devices (MJPG, small buffer), video files (one decode thread) and image folders
(an `ImageFolderCapture` that reads like a VideoCapture). Image files are
checked before decoding (`image_file_problem`): empty, truncated JPEGs and
decompression bombs are refused by their header, never decoded. The daemon's
sources, `visiond capture` and `visiond predict` all open through here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np

from visiond.config import CameraConfig

log = logging.getLogger(__name__)

SourceKind = Literal["stream", "device", "folder", "file"]

# Every image format visiond reads (folders, datasets, labelling, predict): the one list.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
_STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_DEVICE_PATH = re.compile(r"^/dev/video\d+$")
_FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_ffmpeg_env_lock = threading.Lock()
_ffmpeg_env_ready = False
# Folder images: a 20000x20000 PNG compresses to kilobytes and decodes to 1.2 GB.
# 50 MP covers the largest industrial sensors; bigger files are skipped unread.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 512 * 1024 * 1024


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


class RoiError(ValueError):
    """The camera ROI does not overlap the frame: a config error, not a crash."""


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
            files = [p for p in self.folder.iterdir() if is_image_path(p) and p.is_file()]
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
