"""Bounded per-camera frame queues and the hub the one inference thread reads.

Each camera gets its own `FrameQueue`, so one busy camera cannot crowd out
another; the policy decides what a full queue does: `latest` drops the oldest
frame (live cameras: latency stays bounded) and `every` blocks the producer
(files, triggered frames: nothing is lost). All queues of a `FrameHub` share
one Condition, so the consumer sleeps until any camera has a frame instead of
polling each queue.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import replace
from typing import Iterable, Literal

from visiond.frames import Frame
from visiond.serve.metrics import Metrics

Policy = Literal["latest", "every"]
POLICIES: tuple[str, ...] = ("latest", "every")

# A producer blocked by `every` rechecks its stop event this often, so shutdown
# cannot hang on a consumer that has gone away (FrameHub.wake() is immediate).
_BLOCKED_RECHECK_S = 0.2


class FrameQueue:
    """Frames of one camera waiting for the model; bounded, with a drop policy."""

    def __init__(self, camera: str, maxsize: int, policy: Policy, metrics: Metrics):
        if policy not in POLICIES:
            raise ValueError(f"policy: got {policy!r}, expected one of {', '.join(POLICIES)}")
        if maxsize < 1:
            raise ValueError(f"maxsize: got {maxsize}, expected >= 1")
        self.camera = camera
        self.maxsize = maxsize
        self.policy: Policy = policy
        self._items: deque[Frame] = deque()
        self._closed = False
        self._cond = threading.Condition()  # replaced by the hub's shared one
        self._hub: FrameHub | None = None
        # cached children: a .labels() lookup costs more than the update
        self._depth = metrics.queue_depth.labels(camera=camera)
        self._dropped_full = metrics.frames_dropped.labels(camera=camera, reason="queue_full")
        self._depth.set(0)

    def put(self, frame: Frame, stop_event: threading.Event | None = None) -> bool:
        """Queue a frame; False if it was not queued (queue closed, or stopped while blocked).

        `latest` never blocks: when full, the oldest frame goes and is counted.
        `every` waits for room until the consumer takes a frame or `stop_event` is set.
        """
        frame = replace(frame, enqueued_mono=time.monotonic())
        with self._cond:
            if self._closed:
                return False
            if len(self._items) >= self.maxsize:
                if self.policy == "latest":
                    self._items.popleft()
                    self._dropped_full.inc()
                elif not self._wait_for_room(stop_event):
                    return False
            self._items.append(frame)
            self._depth.set(len(self._items))
            self._cond.notify_all()
        return True

    def _wait_for_room(self, stop_event: threading.Event | None) -> bool:
        """Block (holding no lock while asleep) until there is room; False on stop/close."""
        while len(self._items) >= self.maxsize:
            if self._closed or (stop_event is not None and stop_event.is_set()):
                return False
            self._cond.wait(_BLOCKED_RECHECK_S)
        return not self._closed

    def close(self) -> None:
        """The producer is done: no more frames. Queued frames can still be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closed_and_empty(self) -> bool:
        with self._cond:
            return self._closed and not self._items

    def __len__(self) -> int:
        return len(self._items)

    # --- consumer side, called by FrameHub with the shared lock held ---

    def _pop(self) -> Frame:
        frame = self._items.popleft()
        self._depth.set(len(self._items))
        return frame

    def _bind(self, hub: FrameHub, cond: threading.Condition) -> None:
        with self._cond:
            if self._hub is not None:
                raise ValueError(f"camera {self.camera!r}: queue already belongs to a FrameHub")
            if self._items:
                raise ValueError(f"camera {self.camera!r}: bind the queue to its FrameHub before producing")
            self._hub = hub
            self._cond = cond


class FrameHub:
    """The consumer side of all cameras' queues, for ONE inference thread.

    `wait` sleeps on one Condition shared with every queue; `take` hands out
    what is queued right now, round-robin, so one camera cannot starve another.
    """

    def __init__(self, queues: Iterable[FrameQueue], requests: bool = False):
        self.queues: tuple[FrameQueue, ...] = tuple(queues)
        self._requests: deque = deque()  # work handed in by other threads (inspection bursts), batched with frames
        self._serves_requests = requests  # while True the consumer stays up even when every queue has closed
        if not self.queues and not requests:
            raise ValueError("a FrameHub needs at least one queue")
        names = [q.camera for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError(f"cameras must be unique, got {names}")
        self._cond = threading.Condition()
        self._next = 0  # where the next round-robin pass starts
        for q in self.queues:
            q._bind(self, self._cond)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a frame is queued (True), or all queues are closed and empty / timeout (False)."""
        with self._cond:
            self._cond.wait_for(self._ready_or_finished, timeout)
            return self._any_queued()

    def take(self, max_n: int) -> list[Frame]:
        """Take up to max_n frames queued right now, one per camera per round; never waits."""
        out: list[Frame] = []
        n_q = len(self.queues)
        if not n_q:  # only triggered cameras: their frames come as requests
            return out
        with self._cond:
            start = self._next
            while len(out) < max_n:
                took = False
                for i in range(n_q):
                    q = self.queues[(start + i) % n_q]
                    if q._items:
                        out.append(q._pop())
                        took = True
                        if len(out) >= max_n:
                            # the camera after the last one served opens the next pass
                            self._next = (start + i + 1) % n_q
                            break
                if not took:
                    self._next = (start + 1) % n_q
                    break
            if out:
                self._cond.notify_all()  # producers blocked by `every` have room now
        return out

    def submit(self, request) -> None:
        """Hand a request to the inference thread; it is taken with the next batch (any thread)."""
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def pending_requests(self) -> int:
        """Requests handed in and not yet taken by the inference thread (a web front bounds its waiters by it)."""
        return len(self._requests)

    def take_requests(self) -> list:
        with self._cond:
            out = list(self._requests)
            self._requests.clear()
        return out

    def stop_requests(self) -> None:
        """No more requests (shutdown): the consumer may end once the queues are drained."""
        with self._cond:
            self._serves_requests = False
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the consumer and every blocked producer now (shutdown: they recheck stop)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def all_closed_and_empty(self) -> bool:
        with self._cond:
            return self._all_finished()

    def _any_queued(self) -> bool:
        return bool(self._requests) or any(q._items for q in self.queues)

    def _all_finished(self) -> bool:
        return not self._serves_requests and not self._requests and all(q._closed and not q._items for q in self.queues)

    def _ready_or_finished(self) -> bool:
        return self._any_queued() or self._all_finished()
