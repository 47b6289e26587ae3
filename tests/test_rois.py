"""Named ROIs in the inference stage: crops of the full frame, per-ROI models and thresholds, requests in batches.

No daemon: the worker, the serving set and the burst buffer driven directly, as the daemon drives them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from shapes import CLASSES, draw_shape
from test_worker import RecordingSink, run_to_end, tiny_classifier
from visiond.config import parse_config
from visiond.frames import Frame
from visiond.serve.decide import Decider
from visiond.serve.inspect.burst import BurstBuffer, BurstError
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.serving import DEFAULT, SetBuilder
from visiond.serve.worker import InferenceRequest, InferenceWorker, ModelSlot

RECTS = {"left": (0, 0, 48, 48), "middle": (100, 20, 48, 48), "right": (200, 0, 48, 48)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("roi_models")
    return {DEFAULT: tiny_classifier(d, "model-a", seed=1), "other": tiny_classifier(d, "model-b", seed=2)}


def board(seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 100x260 frame with a different shape picture pasted at each ROI; returns it and the pictures."""
    rng = np.random.default_rng(seed)
    frame = np.zeros((100, 260, 3), np.uint8)
    pics = {}
    for i, (name, (x, y, w, h)) in enumerate(RECTS.items()):
        pics[name] = draw_shape(CLASSES[(seed + i) % 3], 48, rng)
        frame[y:y + h, x:x + w] = pics[name]
    return frame, pics


def cfg_with(rois: list[dict], **extra):
    raw = {"cameras": [{"name": "cam", "source": "x.mp4", "rois": rois}], "model": {"checkpoint": "a.ckpt"},
           "decide": {"defect_classes": ["triangle"], "threshold": 0.5}, **extra}
    return parse_config(raw)


def build(cfg, models):
    used = {k: models[k] for k in SetBuilder(cfg).checkpoints(None)}
    return SetBuilder(cfg).build(None, used, {})


def test_every_roi_of_every_frame_is_one_prediction_cropped_from_the_full_frame(models):
    # given a camera with three named ROIs on one model
    cfg = cfg_with([{"name": n, "rect": list(r)} for n, r in RECTS.items()])
    serving = build(cfg, models)
    metrics = Metrics(process=False)
    q = FrameQueue("cam", 10, "every", metrics)
    hub = FrameHub([q])
    boards = [board(s) for s in range(4)]
    for i, (img, _) in enumerate(boards):
        q.put(Frame("cam", i, time.time(), time.monotonic(), img))
    q.close()
    sink = RecordingSink()
    # when the worker classifies the four frames
    run_to_end(InferenceWorker(hub, ModelSlot(serving), [sink], metrics, max_batch=8))
    preds = sink.predictions
    # then there are 4 x 3 predictions, in frame order then ROI order, each naming its ROI
    assert [(p.frame.index, p.roi) for p in preds] == [(i, n) for i in range(4) for n in RECTS]
    # and each was classified on exactly its ROI's pixels (what the model gives for that picture alone)
    clf = models[DEFAULT]
    for p in preds:
        assert np.array_equal(p.image, boards[p.frame.index][1][p.roi])
        alone = Decider(clf.classes, cfg.decide).decide(clf.predict_images([boards[p.frame.index][1][p.roi]]))[0]
        assert p.label == alone.label and p.score == pytest.approx(alone.score, abs=1e-5)
    # and every crop of a frame went through the model in the same batch
    assert len({p.batch_id for p in preds if p.frame.index == 0}) == 1


def test_a_roi_can_name_its_own_model_and_threshold(models):
    # given ROIs on two models, one with a threshold of 0 (everything of a defect class is a defect)
    cfg = cfg_with([{"name": "left", "rect": list(RECTS["left"])},
                    {"name": "right", "rect": list(RECTS["right"]), "model": "other", "threshold": 0.0}],
                   models={"other": {"checkpoint": "b.ckpt"}})
    serving = build(cfg, models)
    metrics = Metrics(process=False)
    q = FrameQueue("cam", 10, "every", metrics)
    hub = FrameHub([q])
    img, pics = board(7)
    q.put(Frame("cam", 0, time.time(), time.monotonic(), img))
    q.close()
    sink = RecordingSink()
    run_to_end(InferenceWorker(hub, ModelSlot(serving), [sink], metrics))
    left, right = sink.predictions
    # then each ROI names the model that classified it, and the threshold of 0 makes the right ROI a defect
    assert (left.model.name, right.model.name) == ("model-a", "model-b")
    assert right.defect is True and left.served_default and not right.served_default
    expected = models["other"].predict_images([pics["right"]])[0]
    assert right.score == pytest.approx(float(expected.max()), abs=1e-5)


def test_overlapping_or_unknown_names_are_config_errors():
    with pytest.raises(Exception, match="unique per camera"):
        cfg_with([{"name": "a", "rect": [0, 0, 4, 4]}, {"name": "a", "rect": [4, 4, 4, 4]}])
    with pytest.raises(Exception, match="not a key of models"):
        cfg_with([{"name": "a", "rect": [0, 0, 4, 4], "model": "nope"}])
    with pytest.raises(Exception, match="either roi"):
        parse_config({"cameras": [{"name": "c", "source": "x.mp4", "roi": [0, 0, 4, 4],
                                   "rois": [{"name": "a", "rect": [0, 0, 4, 4]}]}], "model": {"checkpoint": "a"}})


def test_a_roi_outside_the_frame_is_skipped_said_once_and_the_others_go_on(models):
    cfg = cfg_with([{"name": "left", "rect": list(RECTS["left"])}, {"name": "gone", "rect": [5000, 0, 10, 10]}])
    serving = build(cfg, models)
    metrics = Metrics(process=False)
    q = FrameQueue("cam", 10, "every", metrics)
    hub = FrameHub([q])
    for i in range(3):
        q.put(Frame("cam", i, time.time(), time.monotonic(), board(i)[0]))
    q.close()
    said = []
    sink = RecordingSink()
    run_to_end(InferenceWorker(hub, ModelSlot(serving), [sink], metrics,
                               on_roi_error=lambda cam, roi, why: said.append((cam, roi, why))))
    assert [p.roi for p in sink.predictions] == ["left"] * 3
    assert len(said) == 1 and said[0][1] == "gone" and "outside the 260x100 frame" in said[0][2]
    assert metrics.registry.get_sample_value("visiond_frames_dropped_total",
                                             {"camera": "cam", "reason": "roi_outside"}) == 3


def test_a_request_is_classified_per_roi_in_the_same_batch_as_live_frames(models):
    # given a stream camera with frames queued, and a triggered camera's burst handed in as a request
    cfg = parse_config({"cameras": [{"name": "live", "source": "x.mp4"},
                                    {"name": "station", "source": "y.mp4", "mode": "triggered",
                                     "rois": [{"name": n, "rect": list(r)} for n, r in RECTS.items()]}],
                        "model": {"checkpoint": "a.ckpt"}})
    serving = build(cfg, models)
    metrics = Metrics(process=False)
    q = FrameQueue("live", 10, "every", metrics)
    hub = FrameHub([q], requests=True)
    for i in range(2):
        q.put(Frame("live", i, time.time(), time.monotonic(), board(i)[1]["left"]))
    burst = [Frame("station", i, time.time(), time.monotonic(), board(10 + i)[0]) for i in range(3)]
    request = InferenceRequest("station", burst)
    hub.submit(request)
    sink = RecordingSink()
    worker = InferenceWorker(hub, ModelSlot(serving), [sink], metrics)
    worker.start()
    try:
        # when the worker takes its next batch
        assert request.wait(30)
    finally:
        q.close()
        hub.stop_requests()
        worker.join(30)
    result = request.result
    # then the request has F x C probabilities per ROI, from the same batch as the live frames' predictions
    assert request.error is None and set(result.probs) == set(RECTS)
    assert all(p.shape == (3, len(CLASSES)) for p in result.probs.values())
    assert result.batch_id in {p.batch_id for p in sink.predictions}
    clf = models[DEFAULT]
    for k in range(3):
        for name in RECTS:
            alone = clf.predict_images([board(10 + k)[1][name]])[0]
            assert np.allclose(result.probs[name][k], alone, atol=1e-5)
    # and the live frames were published, the request's crops were not
    assert {p.frame.camera for p in sink.predictions} == {"live"}


def test_the_serving_set_switches_whole_between_batches(models):
    cfg = cfg_with([{"name": "left", "rect": list(RECTS["left"])}])
    slot = ModelSlot(build(cfg, models))
    other = SetBuilder(cfg).build(None, {DEFAULT: models["other"]}, {})
    switched = threading.Event()
    slot.on_switch = lambda old, new: switched.set()
    slot.stage(other)
    assert slot.active is not other and not slot.wait_switched(other, 0.05)
    assert slot.current() is other and switched.is_set() and slot.wait_switched(other, 0)


def frame_at(i: int, mono: float) -> Frame:
    return Frame("cam", i, time.time(), mono, np.zeros((4, 4), np.uint8))


def test_a_burst_takes_frames_captured_after_the_trigger_interval_apart():
    buf = BurstBuffer("cam", keep=16)
    buf.set_status(True, "streaming")
    t0 = time.monotonic()
    buf.put(frame_at(0, t0 - 0.01))  # before the trigger: never part of its burst

    def feed():
        for i in range(1, 12):
            time.sleep(0.01)
            buf.put(frame_at(i, time.monotonic()))

    threading.Thread(target=feed, daemon=True).start()
    frames = buf.burst(3, 0.025, t0, t0 + 5)
    assert frames[0].index >= 1
    gaps = [b.captured_mono - a.captured_mono for a, b in zip(frames, frames[1:])]
    assert all(g >= 0.025 for g in gaps)


def test_a_burst_from_a_silent_camera_fails_by_its_deadline_naming_why():
    buf = BurstBuffer("cam")
    buf.set_status(False, "stalled: no frame for 3.0 s")
    t0 = time.monotonic()
    with pytest.raises(BurstError) as err:
        buf.burst(3, 0.0, t0, t0 + 0.3)
    assert err.value.reason == "camera_down" and "stalled" in str(err.value)
    assert time.monotonic() - t0 < 0.6
    buf.close()
    with pytest.raises(BurstError, match="ended"):
        buf.burst(1, 0.0, time.monotonic(), time.monotonic() + 5)
