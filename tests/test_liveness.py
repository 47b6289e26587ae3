"""Liveness for systemd: the dead stage named in one line, stalls past their limits, the status line.

The worker is a real InferenceWorker (its progress fields are what the daemon reads);
the MQTT thread and the cameras are stand-ins holding the few fields liveness reads,
so each limit can be stepped over exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from visiond.config import DecideConfig
from visiond.frames import Frame
from visiond.models.arch import build_model
from visiond.models.checkpoint import save_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec
from visiond.serve import liveness
from visiond.serve.decide import Decider
from visiond.serve.liveness import CAPTURE_GRACE_S, CONNECT_STALL_S, INFERENCE_STALL_S, PUBLISH_STALL_S
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.serving import single
from visiond.serve.sinks.spool import Spool
from visiond.serve.worker import InferenceWorker, ModelSlot

NOW = 10_000.0
CLASSES = ("ok", "scratch")


@dataclass
class Mqtt:
    connected: bool = True
    last_loop: float = NOW
    spool_write_started: float = 0.0
    error: BaseException | None = None
    thread_alive: bool = True

    def alive(self) -> bool:
        return self.thread_alive


@dataclass
class Camera:
    camera: str
    error: BaseException | None = None
    inside: tuple[str, float, float] | None = None  # ("open"|"read", seconds inside it, its timeout)

    def blocked(self, now: float) -> tuple[str, float, float] | None:
        return self.inside


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> TorchClassifier:
    torch.manual_seed(0)
    net = build_model("smallcnn", len(CLASSES), in_channels=3, image_size=16)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt", arch="smallcnn", classes=CLASSES,
                           spec=PreprocessSpec.for_color(16), state_dict=net.state_dict(),
                           arch_args={"in_channels": 3, "image_size": 16})
    return TorchClassifier(ckpt, device="cpu", threads=0)


@pytest.fixture
def worker(classifier) -> InferenceWorker:
    """A worker that has not turned yet; tests set `last_progress` or feed it frames."""
    metrics = Metrics(process=False)
    w = InferenceWorker(FrameHub([FrameQueue("line1", 4, "latest", metrics)]),
                        ModelSlot(single(classifier, Decider(CLASSES, DecideConfig()))), [], metrics)
    w.last_progress = NOW
    return w


def _frame(camera: str, index: int) -> Frame:
    return Frame(camera, index, time.time(), time.monotonic(), np.full((20, 20, 3), index * 40, np.uint8))


def test_while_every_stage_lives_and_progresses_nothing_is_reported(worker):
    cams = [Camera("line1"), Camera("line2", inside=("read", 3.0, 10.0))]
    assert liveness.dead_stage(worker, Mqtt(), cams) is None
    assert liveness.stalls(worker, Mqtt(), cams, NOW) == []


def test_a_dead_camera_is_named_first_even_when_inference_ended_after_it(worker):
    # given a camera whose thread died and a worker that died too
    worker.error = RuntimeError("queue closed")
    cams = [Camera("line1"), Camera("line2", error=OSError("VIDIOC_DQBUF: No such device"))]
    # then the camera is the cause named
    assert liveness.dead_stage(worker, Mqtt(), cams) == (
        "camera line2: capture thread died (OSError: VIDIOC_DQBUF: No such device)")


def test_a_dead_inference_or_mqtt_thread_is_one_line_with_its_exception(worker):
    # an exception with a traceback-long message gives its first line, cut at 200 characters
    worker.error = RuntimeError("CUDA error: device lost\n  at line 2\n  at line 3")
    assert liveness.dead_stage(worker, Mqtt(), []) == "inference thread died (RuntimeError: CUDA error: device lost)"
    worker.error = ValueError("x" * 500)
    assert liveness.dead_stage(worker, Mqtt(), []) == f"inference thread died (ValueError: {'x' * 200})"
    # an exception without a message gives its class; a thread gone without one says so
    worker.error = None
    assert liveness.dead_stage(worker, Mqtt(thread_alive=False, error=MemoryError()), []) == (
        "MQTT thread died (MemoryError)")
    assert liveness.dead_stage(worker, Mqtt(thread_alive=False), []) == (
        "MQTT thread died (no exception recorded)")


def test_inference_is_stalled_only_past_its_limit(worker):
    worker.last_progress = NOW - INFERENCE_STALL_S + 0.5
    assert liveness.stalls(worker, Mqtt(), [], NOW) == []
    worker.last_progress = NOW - 42
    assert liveness.stalls(worker, Mqtt(), [], NOW) == ["inference stalled: its loop has not turned for 42 s"]


def test_a_connecting_publisher_gets_the_longer_limit(worker):
    # a connected MQTT loop silent past PUBLISH_STALL_S is stalled
    assert liveness.stalls(worker, Mqtt(last_loop=NOW - PUBLISH_STALL_S - 1), [], NOW) == [
        f"publishing stalled: the MQTT loop has not turned for {PUBLISH_STALL_S + 1:.0f} s"]
    # while connecting (DNS, TCP, TLS block by design) only CONNECT_STALL_S counts
    assert liveness.stalls(worker, Mqtt(connected=False, last_loop=NOW - PUBLISH_STALL_S - 1), [], NOW) == []
    assert liveness.stalls(worker, Mqtt(connected=False, last_loop=NOW - CONNECT_STALL_S - 1), [], NOW) == [
        f"publishing stalled: the MQTT loop has not turned for {CONNECT_STALL_S + 1:.0f} s"]


def test_a_hung_spool_write_is_a_publishing_stall(worker):
    assert liveness.stalls(worker, Mqtt(spool_write_started=NOW - 2), [], NOW) == []
    assert liveness.stalls(worker, Mqtt(spool_write_started=NOW - 15), [], NOW) == [
        "publishing stalled: a spool write has been in progress for 15 s"]


def test_a_camera_call_is_wedged_only_past_its_own_timeout_plus_the_grace(worker):
    # a read inside its timeout plus the grace is a slow camera that will time out and reconnect
    within = Camera("line1", inside=("read", 5.0 + CAPTURE_GRACE_S - 1, 5.0))
    assert liveness.stalls(worker, Mqtt(), [within], NOW) == []
    # past it, only a restart clears it
    wedged = Camera("line2", inside=("open", 30.0 + CAPTURE_GRACE_S + 5, 30.0))
    assert liveness.stalls(worker, Mqtt(), [within, wedged], NOW) == [
        "capture stalled: camera line2 has been inside one open for 45 s (its timeout is 30 s)"]


def test_every_stall_is_listed_at_once(worker):
    worker.last_progress = NOW - 20
    found = liveness.stalls(worker, Mqtt(last_loop=NOW - 20, spool_write_started=NOW - 20),
                            [Camera("line1", inside=("read", 60.0, 5.0))], NOW)
    assert [line.split(":")[0] for line in found] == [
        "inference stalled", "publishing stalled", "publishing stalled", "capture stalled"]


def test_the_status_line_counts_cameras_that_recently_got_a_verdict(worker, tmp_path):
    # given a worker that classified frames of two of three cameras, and a spool holding two messages
    worker.process([_frame("line1", 0), _frame("line2", 1), _frame("line1", 2)])
    spool = Spool(tmp_path / "spool", 100)
    spool.append([("visiond/testbox/line1/prediction", lambda seq: b"{}", 1, time.time(), "line1")] * 2)
    cameras = ["line1", "line2", "line3"]
    now = time.monotonic()
    # then right away two cameras stream; once their frames are older than fresh_s none does
    assert liveness.summary(worker, Mqtt(), spool, cameras, fresh_s=5.0, now=now) == (
        "2/3 camera(s) streaming, 3 frames classified, broker connected, 2 spooled")
    assert liveness.summary(worker, Mqtt(connected=False), spool, cameras, fresh_s=5.0, now=now + 6) == (
        "0/3 camera(s) streaming, 3 frames classified, broker unreachable, 2 spooled")
    spool.close()
