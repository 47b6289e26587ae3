"""`visiond dataset capture`: frames from any source the daemon reads, into a dataset's inbox.

The source is opened with the daemon's own `open_capture`, so a camera, an RTSP
stream, a video file or an image folder all work, and the ROI is cut the same way.
Which frames are kept: every N frames, every N seconds, a burst of K consecutive
frames, or one frame (or burst) per line on standard input (the operator presses
Enter). Near-duplicates (perceptual hash within `dedupe_bits`) are skipped, and every
frame is written atomically through `visiond.data.inbox`.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import cv2
import numpy as np

from visiond.config import CameraConfig
from visiond.data import phash as ph
from visiond.data.inbox import InboxItem, prediction_dict, write_inbox_item
from visiond.errors import UserError
from visiond.logs import redact_url

log = logging.getLogger(__name__)

MODES = ("every_frames", "every_seconds", "burst", "stdin")


@dataclass
class CaptureOptions:
    source: str
    dataset: Path
    camera: str = "capture"
    every_frames: int | None = None
    every_seconds: float | None = None
    burst: int | None = None
    stdin: bool = False
    max_frames: int | None = None
    roi: tuple[int, int, int, int] | None = None
    dedupe_bits: int = 6
    fps: float = 0.0
    checkpoint: Path | None = None   # pre-label with this model's guess
    device: str = "cpu"

    @property
    def mode(self) -> str:
        if self.stdin:
            return "stdin"
        if self.every_frames is not None:
            return "every_frames"
        if self.every_seconds is not None:
            return "every_seconds"
        return "burst"

    def validate(self) -> None:
        chosen = [n for n, v in (("--every-frames", self.every_frames), ("--every-seconds", self.every_seconds),
                                 ("--stdin", self.stdin or None)) if v is not None]
        if len(chosen) > 1:
            raise UserError(f"{' and '.join(chosen)} exclude each other; choose one way to pick frames")
        if not chosen and self.burst is None:
            raise UserError("choose how to pick frames: --every-frames N, --every-seconds S, --burst K or --stdin")
        if self.burst is not None and (self.every_frames is not None or self.every_seconds is not None):
            raise UserError("--burst goes alone or with --stdin (a burst per Enter)")
        checks = [(self.every_frames is None or self.every_frames >= 1, f"--every-frames {self.every_frames}: expected >= 1"),
                  (self.every_seconds is None or self.every_seconds > 0, f"--every-seconds {self.every_seconds}: expected > 0"),
                  (self.burst is None or self.burst >= 1, f"--burst {self.burst}: expected >= 1"),
                  (self.max_frames is None or self.max_frames >= 1, f"--max {self.max_frames}: expected >= 1"),
                  (-1 <= self.dedupe_bits <= 64, f"--dedupe-bits {self.dedupe_bits}: expected -1 (off) to 64")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


@dataclass
class CaptureReport:
    saved: list[InboxItem] = field(default_factory=list)
    frames_read: int = 0
    duplicates: int = 0
    ended: str = ""


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UserError(f"--roi {text!r}: expected x,y,w,h in pixels") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise UserError(f"--roi {text!r}: expected x >= 0, y >= 0, w > 0, h > 0")
    return x, y, w, h


class _Triggers:
    """Lines on standard input, read by a thread so a live camera keeps being drained meanwhile."""

    def __init__(self, stream: TextIO):
        self._q: queue.Queue[bool] = queue.Queue()
        self.closed = False
        threading.Thread(target=self._read, args=(stream,), name="capture-stdin", daemon=True).start()

    def _read(self, stream: TextIO) -> None:
        for _line in stream:
            self._q.put(True)
        self._q.put(False)

    def poll(self, block: bool = False) -> bool:
        """True when a line arrived since the last call (one per call); `block` waits for one or for EOF."""
        if self.closed:
            return False
        try:
            got = self._q.get(timeout=0.5) if block else self._q.get_nowait()
        except queue.Empty:
            return False
        if not got:
            self.closed = True
        return got


def _labeller(opts: CaptureOptions):
    if opts.checkpoint is None:
        return None
    from visiond.models.runtime import TorchClassifier

    clf = TorchClassifier.from_file(opts.checkpoint, device=opts.device, threads=0)

    def guess(image: np.ndarray) -> dict:
        from visiond.preprocess import stack_uint8

        probs = clf.predict(stack_uint8([image], clf.spec))[0]
        order = np.argsort(-probs)[:3]
        top = [(clf.classes[i], float(probs[i])) for i in order]
        return prediction_dict(top[0][0], top[0][1], top, clf.name, clf.version)

    return guess


def capture_frames(opts: CaptureOptions, *, stdin: TextIO | None = None,
                   on_progress: Callable[[CaptureReport], None] | None = None,
                   stop: threading.Event | None = None) -> CaptureReport:
    """Read the source until it ends, --max frames are saved, stdin closes, or `stop` is set."""
    from visiond.video import open_capture, roi_slices, source_kind

    opts.validate()
    cam = CameraConfig(name=opts.camera, source=str(opts.source), fps=opts.fps, roi=opts.roi)
    stop = stop or threading.Event()
    kind = source_kind(cam.source)
    triggers = _Triggers(stdin or sys.stdin) if opts.stdin else None
    guess = _labeller(opts)
    dedupe = ph.NearDuplicateFilter(opts.dedupe_bits)
    report = CaptureReport()
    shown = redact_url(str(opts.source))
    cap = open_capture(cam.source, cam)
    try:
        if not cap.isOpened():
            raise UserError(f"cannot open {shown}")
        burst_left = 0 if opts.stdin else (opts.burst or 0)
        last_saved_t: float | None = None
        roi = None
        index = -1
        while not stop.is_set():
            if opts.max_frames and len(report.saved) >= opts.max_frames:
                report.ended = f"saved --max {opts.max_frames}"
                break
            if triggers is not None:
                # a file waits for the operator; a live camera keeps being read so the frame taken is fresh
                if burst_left == 0 and kind in ("file", "folder"):
                    while not triggers.closed and not stop.is_set() and not triggers.poll(block=True):
                        pass
                    if not triggers.closed:
                        burst_left += opts.burst or 1
                while triggers.poll():
                    burst_left += opts.burst or 1
                if triggers.closed and burst_left == 0:
                    report.ended = "standard input closed"
                    break
            elif opts.mode == "burst" and burst_left == 0:
                report.ended = f"burst of {opts.burst} done"
                break
            ok, image = cap.read()
            if not ok or image is None:
                report.ended = "end of input" if kind in ("file", "folder") else "source stopped delivering"
                break
            index += 1
            report.frames_read += 1
            wall = time.time()
            pos_s = _position_s(cap, kind, wall)
            if opts.mode == "every_frames":
                want = index % opts.every_frames == 0
            elif opts.mode == "every_seconds":
                want = last_saved_t is None or pos_s - last_saved_t >= opts.every_seconds
            else:
                want = burst_left > 0
            if not want:
                continue
            if cam.roi is not None:
                roi = roi or roi_slices(cam.roi, image.shape)
                image = np.ascontiguousarray(image[roi])
            value = ph.phash(image)
            if dedupe.seen(value):
                report.duplicates += 1
                if burst_left:
                    burst_left -= 1  # a burst is K consecutive frames; the near-duplicates among them are skipped
                if opts.mode == "every_seconds":
                    last_saved_t = pos_s
                continue
            item = write_inbox_item(opts.dataset, image, {
                "camera": opts.camera, "captured_at": wall, "source": shown, "rule": opts.mode,
                "phash": value, "prediction": guess(image) if guess else None})
            dedupe.add(value)
            report.saved.append(item)
            last_saved_t = pos_s
            if burst_left:
                burst_left -= 1
            if on_progress:
                on_progress(report)
        else:
            report.ended = "stopped"
    finally:
        cap.release()
    return report


def _position_s(cap, kind: str, wall: float) -> float:
    """Video time for files (reading runs faster than real time), wall time otherwise."""
    if kind == "file":
        ms = cap.get(cv2.CAP_PROP_POS_MSEC)
        if ms is not None and ms >= 0:
            return ms / 1000.0
    return wall
