"""The inference stage: cross-camera batches, per-frame verdicts, model swaps between batches, failures.

Real small models (untrained smallcnns, seeded) classify real Frames taken from a real
FrameHub; a sink records what the worker hands on.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shapes import CLASSES, draw_shape
from visiond.config import DecideConfig
from visiond.frames import Frame, Prediction
from visiond.models.arch import build_model
from visiond.models.checkpoint import save_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.preprocess import PreprocessSpec
from visiond.serve import liveness
from visiond.serve.decide import Decider
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.serving import single
from visiond.serve.worker import InferenceWorker, ModelSlot

CAMERAS = ("line1", "line2", "line3")


def tiny_classifier(directory: Path, name: str, seed: int) -> TorchClassifier:
    """An untrained 32 px smallcnn whose head is scaled up so each image gets a clearly different verdict."""
    torch.manual_seed(seed)
    net = build_model("smallcnn", len(CLASSES), in_channels=3, image_size=32)
    with torch.no_grad():
        net.classifier[-1].weight.mul_(40)
    ckpt = save_checkpoint(directory / f"{name}.ckpt", arch="smallcnn", classes=CLASSES,
                           spec=PreprocessSpec.for_color(32), state_dict=net.state_dict(),
                           arch_args={"in_channels": 3, "image_size": 32}, name=name)
    return TorchClassifier(ckpt, device="cpu", threads=0)  # threads=0: leave the test process's torch alone


def frames_of(camera: str, count: int, seed: int) -> list[Frame]:
    """`count` frames of one camera, each a different 48 px shape picture."""
    rng = np.random.default_rng(seed)
    return [Frame(camera, i, time.time(), time.monotonic(), draw_shape(CLASSES[i % 3], 48, rng))
            for i in range(count)]


class RecordingSink:
    """Keeps every batch it is handed; `on_batch(n)` runs inside the worker after batch n is recorded."""

    def __init__(self, on_batch=None):
        self.batches: list[list[Prediction]] = []
        self.on_batch = on_batch
        self.got_one = threading.Event()

    def submit(self, predictions) -> None:
        self.batches.append(list(predictions))
        self.got_one.set()
        if self.on_batch:
            self.on_batch(len(self.batches))

    @property
    def predictions(self) -> list[Prediction]:
        return [p for batch in self.batches for p in batch]


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> TorchClassifier:
    return tiny_classifier(tmp_path_factory.mktemp("model_a"), "model-a", seed=1)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> TorchClassifier:
    return tiny_classifier(tmp_path_factory.mktemp("model_b"), "model-b", seed=2)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


def no_defects() -> Decider:
    return Decider(CLASSES, DecideConfig())


def every_frame_a_defect() -> Decider:
    return Decider(CLASSES, DecideConfig(defect_classes=list(CLASSES), threshold=0.0))


def queued_hub(metrics: Metrics, frames_per_camera: int, cameras=CAMERAS) -> FrameHub:
    """A hub whose cameras have all their frames queued and are closed (files that were read to the end)."""
    queues = [FrameQueue(c, 100, "every", metrics) for c in cameras]
    hub = FrameHub(queues)
    for n, q in enumerate(queues):
        for frame in frames_of(q.camera, frames_per_camera, seed=n):
            q.put(frame)
        q.close()
    return hub


def run_to_end(worker: InferenceWorker) -> None:
    worker.start()
    worker.join(timeout=60)
    assert not worker.alive(), "the worker did not end after every camera closed"


def single_frame_verdict(clf: TorchClassifier, decider: Decider, frame: Frame):
    return decider.decide(clf.predict_images([frame.image]))[0]


def test_queued_frames_of_several_cameras_share_batches_of_at_most_max_batch(model_a, metrics):
    # given three cameras with ten frames each waiting
    hub = queued_hub(metrics, 10)
    sink = RecordingSink()
    worker = InferenceWorker(hub, ModelSlot(single(model_a, no_defects())), [sink], metrics, max_batch=4)
    # when the worker runs until the cameras are done
    run_to_end(worker)
    # then every frame is classified exactly once, in batches of max_batch (the rest in the last one)
    sizes = [len(b) for b in sink.batches]
    assert sizes == [4] * 7 + [2]
    seen = [(p.frame.camera, p.frame.index) for p in sink.predictions]
    assert sorted(seen) == sorted((c, i) for c in CAMERAS for i in range(10))
    # and a batch mixes cameras instead of serving one camera at a time
    assert {p.camera for p in sink.batches[0]} == set(CAMERAS)
    assert all(len({p.camera for p in b}) >= 2 for b in sink.batches[:-1])
    # and each camera's frames keep their order
    for camera in CAMERAS:
        assert [p.frame.index for p in sink.predictions if p.camera == camera] == list(range(10))
    # and the frames of one model call carry that call's batch id, counted from 1
    assert [{p.batch_id for p in b} for b in sink.batches] == [{n} for n in range(1, 9)]
    # and the metrics and the progress counters agree with what the sink got
    sample = metrics.registry.get_sample_value
    assert sample("visiond_batch_size_count") == 8 and sample("visiond_batch_size_sum") == 30
    assert sum(sample("visiond_predictions_total", {"camera": "line2", "label": c}) or 0 for c in CLASSES) == 10
    assert worker.frames_done == 30 and set(worker.last_frame) == set(CAMERAS) and worker.error is None


def test_each_prediction_is_the_models_verdict_on_its_own_frame(model_a, metrics):
    # given frames of two cameras, classified in batches of 5
    hub = queued_hub(metrics, 6, cameras=("left", "right"))
    decider = every_frame_a_defect()
    sink = RecordingSink()
    run_to_end(InferenceWorker(hub, ModelSlot(single(model_a, decider)), [sink], metrics, max_batch=5))
    preds = sink.predictions
    assert len(preds) == 12
    assert len({round(p.score, 4) for p in preds}) == 12, "the model must tell these frames apart for this test"
    # then each prediction holds what the model says about that frame alone: a mix-up inside a batch shows here
    for p in preds:
        alone = single_frame_verdict(model_a, decider, p.frame)
        assert p.label == alone.label and p.score == pytest.approx(alone.score, abs=1e-5), p.frame.index
        assert [label for label, _ in p.top] == [label for label, _ in alone.top]
        assert p.defect is True
        assert (p.model.name, p.model.version) == ("model-a", model_a.version)
        assert 0 <= p.timings.queue_s <= p.timings.total_s and p.timings.inference_s <= p.timings.total_s


def test_at_light_load_each_frame_goes_through_alone_at_once(model_a, metrics):
    # given a running worker and a camera that delivers a frame now and then
    q = FrameQueue("line1", 10, "latest", metrics)
    sink = RecordingSink()
    worker = InferenceWorker(FrameHub([q]), ModelSlot(single(model_a, no_defects())), [sink], metrics, max_batch=16)
    worker.start()
    try:
        for frame in frames_of("line1", 4, seed=5):
            sink.got_one.clear()
            q.put(frame)
            # then it is classified without waiting for others to fill a batch
            assert sink.got_one.wait(10), f"frame {frame.index} was never classified"
    finally:
        q.close()
        worker.join(timeout=10)
    assert [len(b) for b in sink.batches] == [1, 1, 1, 1]
    assert not worker.alive() and worker.error is None


def test_a_staged_model_takes_over_between_two_batches_and_no_frame_is_lost(model_a, model_b, metrics):
    # given a worker serving model A (no defect rules) through 30 queued frames
    hub = queued_hub(metrics, 10)
    slot = ModelSlot(single(model_a, no_defects()))
    switched: list[str] = []
    slot.on_switch = lambda old, new: switched.append(new.classifier.name)
    staged, reached = threading.Event(), threading.Event()

    def hold_after_third(n: int) -> None:  # runs on the inference thread, between two batches
        if n == 3:
            reached.set()
            assert staged.wait(10)

    sink = RecordingSink(on_batch=hold_after_third)
    worker = InferenceWorker(hub, slot, [sink], metrics, max_batch=4)
    worker.start()
    # when model B with other rules (every frame a defect) is staged from another thread after the third batch
    assert reached.wait(30)
    slot.stage(single(model_b, every_frame_a_defect()))
    staged.set()
    worker.join(timeout=60)
    assert not worker.alive() and worker.error is None
    # then the first three batches are A's and every later one is B's, whole batches each
    versions = [{p.model.version for p in b} for b in sink.batches]
    assert versions == [{model_a.version}] * 3 + [{model_b.version}] * (len(sink.batches) - 3)
    assert switched == ["model-b"] and slot.active.classifier is model_b
    # and B's rules and B's scores apply from the switch on
    for p in sink.predictions[12:]:
        assert p.defect and p.score == pytest.approx(single_frame_verdict(model_b, every_frame_a_defect(), p.frame)
                                                     .score, abs=1e-5)
    assert not any(p.defect for p in sink.predictions[:12])
    # and no frame was lost or classified twice across the switch
    assert sorted((p.camera, p.frame.index) for p in sink.predictions) == sorted(
        (c, i) for c in CAMERAS for i in range(10))


def test_only_the_last_staged_model_is_served(model_a, model_b, tmp_path, metrics):
    # given B and then C staged before the next batch
    model_c = tiny_classifier(tmp_path, "model-c", seed=3)
    slot = ModelSlot(single(model_a, no_defects()))
    slot.stage(single(model_b, no_defects()))
    slot.stage(single(model_c, no_defects()))
    worker = InferenceWorker(queued_hub(metrics, 1), slot, [], metrics)
    # when a batch is classified, then C serves it and B never did
    preds = worker.process(frames_of("line1", 2, seed=9))
    assert {p.model.name for p in preds} == {"model-c"} and slot.active.classifier is model_c


class FailingDevice:
    """The real classifier until its `fail_on`-th batch, which raises as a lost GPU does."""

    def __init__(self, clf: TorchClassifier, fail_on: int):
        self._clf, self._fail_on, self.calls = clf, fail_on, 0

    def predict_images(self, images):
        self.calls += 1
        if self.calls == self._fail_on:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
        return self._clf.predict_images(images)

    def __getattr__(self, name):
        return getattr(self._clf, name)


def test_a_classifier_error_ends_the_thread_and_names_itself_for_the_daemon(model_a, metrics, caplog):
    # given a device that fails on the third batch, with 30 frames queued
    hub = queued_hub(metrics, 10)
    sink = RecordingSink()
    worker = InferenceWorker(hub, ModelSlot(single(FailingDevice(model_a, 3), no_defects())), [sink], metrics, max_batch=4)
    # when the worker runs
    with caplog.at_level(logging.ERROR, logger="visiond.serve.worker"):
        worker.start()
        worker.join(timeout=30)
    # then the thread stops at the error instead of classifying on, and keeps it for the daemon
    assert not worker.alive()
    assert isinstance(worker.error, RuntimeError)
    assert "inference thread died" in caplog.text and "illegal memory access" in caplog.text
    # and the batches before it were delivered whole, the failed one never reached a sink
    assert [len(b) for b in sink.batches] == [4, 4] and worker.frames_done == 8
    # and the daemon's liveness check names the stage and the error in one line
    mqtt_fine = type("Mqtt", (), {"alive": lambda self: True, "error": None})()
    assert liveness.dead_stage(worker, mqtt_fine, []) == (
        "inference thread died (RuntimeError: CUDA error: an illegal memory access was encountered)")


class BrokenSink:
    def __init__(self):
        self.calls = 0

    def submit(self, predictions) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")


def test_a_failing_sink_never_stops_the_other_sinks_or_the_model(model_a, metrics, caplog):
    # given a sink that raises on every batch, listed before a working one
    broken, sink = BrokenSink(), RecordingSink()
    worker = InferenceWorker(queued_hub(metrics, 5), ModelSlot(single(model_a, no_defects())), [broken, sink], metrics,
                             max_batch=4)
    # when the worker runs through every frame
    with caplog.at_level(logging.ERROR, logger="visiond.serve.worker"):
        run_to_end(worker)
    # then the working sink got every frame, the broken one was tried on every batch, and it is logged
    assert len(sink.predictions) == 15 and broken.calls == len(sink.batches) == 4
    assert worker.error is None
    assert "sink BrokenSink failed on a batch of 4" in caplog.text


def test_defect_events_are_debounced_per_camera_and_a_failing_event_hook_is_survived(model_a, metrics, caplog):
    # given every frame a defect, a debounce of 3 frames and an event hook that fails on its first call
    events: list[tuple[str, dict]] = []

    def on_event(camera: str, event: dict) -> None:
        events.append((camera, event))
        if len(events) == 1:
            raise ConnectionError("broker gone")

    worker = InferenceWorker(queued_hub(metrics, 5, cameras=("left", "right")),
                             ModelSlot(single(model_a, every_frame_a_defect())), [RecordingSink()], metrics, max_batch=3,
                             on_event=on_event, debounce=3)
    # when ten defect frames of two cameras are classified
    with caplog.at_level(logging.ERROR, logger="visiond.serve.worker"):
        run_to_end(worker)
    # then each camera starts one defect, on its third defect frame, and the failed hook did not stop the worker
    assert sorted(camera for camera, _ in events) == ["left", "right"]
    assert all(e["kind"] == "defect_started" and e["model"]["name"] == "model-a" for _, e in events)
    assert worker.frames_done == 10 and worker.error is None
    assert "event sink failed" in caplog.text
