"""FrameQueue policies and FrameHub fairness, read as given / when / then."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from visiond.frames import Frame
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub, FrameQueue

_IMAGE = np.zeros((4, 4, 3), np.uint8)


def _frame(camera: str, index: int) -> Frame:
    now = time.monotonic()
    return Frame(camera=camera, index=index, captured_at=time.time(), captured_mono=now, image=_IMAGE)


def _sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


def test_latest_drops_the_oldest_and_counts_it(metrics):
    # given a latest queue of 3
    q = FrameQueue("cam", 3, "latest", metrics)
    hub = FrameHub([q])
    # when 5 frames arrive before the consumer takes any
    for i in range(5):
        assert q.put(_frame("cam", i))
    # then the newest 3 are kept, 2 are counted as queue_full drops
    assert [f.index for f in hub.take(10)] == [2, 3, 4]
    assert _sample(metrics, "visiond_frames_dropped_total", camera="cam", reason="queue_full") == 2
    assert _sample(metrics, "visiond_queue_depth", camera="cam") == 0


def test_every_blocks_the_producer_and_never_drops(metrics):
    # given an every queue of 2 and a producer of 50 frames
    q = FrameQueue("cam", 2, "every", metrics)
    hub = FrameHub([q])
    stop = threading.Event()

    def produce():
        for i in range(50):
            q.put(_frame("cam", i), stop)
        q.close()

    t = threading.Thread(target=produce)
    t.start()
    # when a slow consumer takes them
    got: list[int] = []
    while hub.wait(timeout=5):
        time.sleep(0.001)
        got += [f.index for f in hub.take(3)]
        assert len(q) <= 2
    t.join(5)
    # then every frame arrives in order, none dropped, and the hub reports the end
    assert got == list(range(50))
    assert _sample(metrics, "visiond_frames_dropped_total", camera="cam", reason="queue_full") == 0
    assert hub.all_closed_and_empty and q.closed_and_empty


def test_a_blocked_every_producer_is_released_by_stop(metrics):
    # given a full every queue with nobody consuming
    q = FrameQueue("cam", 1, "every", metrics)
    hub = FrameHub([q])
    stop = threading.Event()
    assert q.put(_frame("cam", 0), stop)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(q.put(_frame("cam", 1), stop)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    # when shutdown sets stop and wakes the hub
    t0 = time.monotonic()
    stop.set()
    hub.wake()
    t.join(2)
    # then the producer returns at once and says the frame was not queued
    assert not t.is_alive() and result == [False]
    assert time.monotonic() - t0 < 0.5


def test_take_is_round_robin_across_cameras(metrics):
    # given a camera with a deep backlog and two with one frame each
    busy = FrameQueue("busy", 100, "every", metrics)
    a = FrameQueue("a", 100, "every", metrics)
    b = FrameQueue("b", 100, "every", metrics)
    hub = FrameHub([busy, a, b])
    for i in range(50):
        busy.put(_frame("busy", i))
    a.put(_frame("a", 0))
    b.put(_frame("b", 0))
    # when the consumer takes small batches
    first = hub.take(3)
    # then the quiet cameras are served in the first batch, not after the backlog
    assert sorted(f.camera for f in first) == ["a", "b", "busy"]
    assert [f.index for f in hub.take(4)] == [1, 2, 3, 4]


def test_round_robin_rotates_when_batches_are_smaller_than_the_camera_count(metrics):
    # given three cameras that always have frames
    queues = [FrameQueue(name, 100, "every", metrics) for name in ("a", "b", "c")]
    hub = FrameHub(queues)
    for q in queues:
        for i in range(10):
            q.put(_frame(q.camera, i))
    # when the consumer takes one frame at a time
    served = [hub.take(1)[0].camera for _ in range(9)]
    # then every camera gets an equal share
    assert {c: served.count(c) for c in "abc"} == {"a": 3, "b": 3, "c": 3}


def test_wait_sleeps_until_a_frame_arrives(metrics):
    # given an empty hub
    q = FrameQueue("cam", 4, "latest", metrics)
    hub = FrameHub([q])
    # when a frame arrives 50 ms later from another thread
    threading.Timer(0.05, lambda: q.put(_frame("cam", 0))).start()
    t0 = time.monotonic()
    ready = hub.wait(timeout=5)
    # then wait returns promptly with a frame ready and sets enqueued_mono
    assert ready and time.monotonic() - t0 < 1.0
    (frame,) = hub.take(8)
    assert frame.enqueued_mono >= frame.captured_mono > 0


def test_wait_returns_false_on_timeout_and_when_all_closed(metrics):
    # given two open, empty queues
    a, b = FrameQueue("a", 2, "latest", metrics), FrameQueue("b", 2, "latest", metrics)
    hub = FrameHub([a, b])
    # then an empty wait times out with False
    assert hub.wait(timeout=0.05) is False
    # when one queue closes with a frame left and the other closes empty
    a.put(_frame("a", 0))
    a.close()
    b.close()
    # then the frame is still delivered, and only afterwards the hub is finished
    assert hub.wait(timeout=1) and not hub.all_closed_and_empty
    assert len(hub.take(8)) == 1
    t0 = time.monotonic()
    assert hub.wait(timeout=5) is False and time.monotonic() - t0 < 0.5
    assert hub.all_closed_and_empty
    # and a put after close is refused
    assert a.put(_frame("a", 1)) is False


def test_queue_depth_gauge_follows_puts_and_takes(metrics):
    # given a queue
    q = FrameQueue("cam", 8, "latest", metrics)
    hub = FrameHub([q])
    # when 3 frames arrive and 2 are taken
    for i in range(3):
        q.put(_frame("cam", i))
    assert _sample(metrics, "visiond_queue_depth", camera="cam") == 3
    hub.take(2)
    # then the gauge shows the one left
    assert _sample(metrics, "visiond_queue_depth", camera="cam") == 1


def test_bad_arguments_fail_loudly(metrics):
    with pytest.raises(ValueError, match="latest, every"):
        FrameQueue("cam", 2, "newest", metrics)  # type: ignore[arg-type]
    q = FrameQueue("cam", 2, "latest", metrics)
    FrameHub([q])
    with pytest.raises(ValueError, match="already belongs"):
        FrameHub([q])
