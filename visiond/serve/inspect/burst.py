"""A triggered camera's newest frames, and the burst a trigger takes from them.

The station's source keeps streaming (a camera that is reopened per trigger costs
hundreds of milliseconds) and puts every frame here instead of into the model's
queue; only the newest `keep` are held. A trigger asks for `n` frames captured
after it arrived, `interval` apart; it gets them as they come, or a `BurstError`
saying why not (camera down, deadline) no later than its deadline.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from visiond.frames import Frame


class BurstError(Exception):
    """No burst: `reason` is the verdict's ERROR reason (camera_down, deadline), the message says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class BurstBuffer:
    """The newest frames of one camera; the source's side looks like a `FrameQueue` (put, close)."""

    def __init__(self, camera: str, keep: int = 8):
        self.camera = camera
        self._frames: deque[Frame] = deque(maxlen=max(1, keep))
        self._cond = threading.Condition()
        self._closed = False
        self.online = False
        self.reason = "not started"
        self.last_frame_mono = 0.0

    # ---- the source's side --------------------------------------------------
    def put(self, frame: Frame, stop_event: threading.Event | None = None) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._frames.append(frame)
            self.last_frame_mono = frame.captured_mono
            self._cond.notify_all()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def set_status(self, online: bool, reason: str) -> None:
        with self._cond:
            self.online, self.reason = online, reason
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._frames)

    # ---- the station's side -------------------------------------------------
    def burst(self, n: int, interval_s: float, after_mono: float, deadline_mono: float) -> list[Frame]:
        """`n` frames, the first captured at or after `after_mono`, each `interval_s` after the previous one."""
        chosen: list[Frame] = []
        due = after_mono
        with self._cond:
            while len(chosen) < n:
                frame = self._first_from(due, chosen[-1].index if chosen else -1)
                if frame is not None:
                    chosen.append(frame)
                    due = frame.captured_mono + interval_s
                    continue
                now = time.monotonic()
                if self._closed:
                    raise BurstError("camera_down", f"camera {self.camera}: its source has ended ({self.reason})")
                if now >= deadline_mono:
                    raise self._late(chosen, n, after_mono, now)
                self._cond.wait(deadline_mono - now)
        return chosen

    def _first_from(self, due: float, after_index: int) -> Frame | None:
        for f in self._frames:
            if f.captured_mono >= due and f.index > after_index:
                return f
        return None

    def _late(self, chosen: list[Frame], n: int, after_mono: float, now: float) -> BurstError:
        if not chosen:
            last = self.last_frame_mono
            since = f"its last frame came {now - last:.2f} s ago" if last else "it has sent no frame yet"
            state = "" if self.online else f", source offline: {self.reason}"
            return BurstError("camera_down", f"camera {self.camera}: no frame since the trigger "
                                             f"{now - after_mono:.2f} s ago ({since}{state})")
        return BurstError("deadline", f"camera {self.camera}: {len(chosen)} of {n} frames before the deadline")
