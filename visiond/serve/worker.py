"""The inference stage: greedy cross-camera batches -> model -> verdicts -> sinks.

One thread owns the models. It takes whatever frames are queued (up to
max_batch) the moment the model is free, so at light load a frame goes straight
through and under load batches grow by themselves. Every ROI of every frame is
one crop; crops of all cameras are batched together per model. Requests from
other threads (an inspection's burst) join the same batches. The served set of
models and ROIs (`ServingSet`) switches only between two batches.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from visiond.frames import Frame, Prediction, Timings
from visiond.models.remote import ModelUnavailable
from visiond.serve.decide import DefectDebouncer
from visiond.serve.metrics import Metrics
from visiond.serve.serving import DEFAULT, FULL, RoiPlan, ServingSet
from visiond.video import RoiError

log = logging.getLogger(__name__)
MODEL_WAIT_CAP_S = 1.0  # longest pause after a model server failed a batch (the queues drop meanwhile)


class Sink(Protocol):
    def submit(self, predictions: Sequence[Prediction]) -> None: ...


class FrameSupply(Protocol):
    def wait(self, timeout: float) -> bool: ...
    def take(self, max_n: int) -> list[Frame]: ...
    def take_requests(self) -> list: ...
    @property
    def all_closed_and_empty(self) -> bool: ...


class ModelSlot:
    """The set in service plus at most one staged replacement.

    `stage()` is called from any thread; the inference thread calls `current()`
    before each batch, so the switch always falls between two batches.
    """

    def __init__(self, serving: ServingSet):
        self._active = serving
        self._staged: ServingSet | None = None
        self._lock = threading.Lock()
        self._switched = threading.Condition(self._lock)
        self.on_switch: Callable[[ServingSet, ServingSet], None] | None = None

    def stage(self, serving: ServingSet) -> None:
        with self._lock:
            self._staged = serving

    @property
    def active(self) -> ServingSet:
        """The set serving right now, without taking a staged one (any thread, read-only)."""
        return self._active

    @property
    def staged(self) -> ServingSet | None:
        return self._staged

    def wait_switched(self, serving: ServingSet, timeout: float) -> bool:
        """Until `serving` is the active set (True) or the timeout (False)."""
        with self._switched:
            return self._switched.wait_for(lambda: self._active is serving, timeout)

    def current(self) -> ServingSet:
        if self._staged is not None:
            with self._lock:
                staged, self._staged = self._staged, None
                if staged is not None:
                    old, self._active = self._active, staged
                    self._switched.notify_all()
            if staged is not None:
                log.info("model switched: %s %s -> %s %s (recipe %s -> %s)",
                         old.classifier.name, old.classifier.version, staged.classifier.name,
                         staged.classifier.version, old.recipe or "-", staged.recipe or "-")
                if self.on_switch:
                    self.on_switch(old, staged)
        return self._active


@dataclass(frozen=True)
class RequestResult:
    serving: ServingSet  # the set that classified every crop of the request
    probs: dict[str, np.ndarray]  # ROI name -> F x C probabilities, in frame order
    errors: dict[str, str]  # ROI name -> why it was not classified (outside the frame)
    inference_s: float
    batch_id: int


class InferenceRequest:
    """Frames of one camera to classify on every ROI, for a thread that waits (an inspection's burst)."""

    def __init__(self, camera: str | None, frames: Sequence[Frame]):
        """`camera` None: each image is classified whole by the default model (HTTP: OIP infer, /v1/classify)."""
        self.camera = camera
        self.frames = tuple(frames)
        self.result: RequestResult | None = None
        self.error: str | None = None
        self._done = threading.Event()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(max(0.0, timeout))

    def finish(self, result: RequestResult | None = None, error: str | None = None) -> None:
        self.result, self.error = result, error
        self._done.set()


class InferenceWorker:
    """The one thread that batches, runs the models, decides and hands to sinks."""

    def __init__(self, supply: FrameSupply, slot: ModelSlot, sinks: Sequence[Sink], metrics: Metrics,
                 *, max_batch: int | None = None, max_wait_s: float = 0.0,
                 on_event: Callable[[str, dict], None] | None = None,
                 debounce: int | tuple[int, int, int, int] = 3,
                 on_roi_error: Callable[[str, str, str], None] | None = None,
                 on_model: Callable[[str | None], None] | None = None):
        self._supply, self._slot, self._sinks, self._m = supply, slot, list(sinks), metrics
        self._max_batch, self._max_wait = max_batch, max_wait_s  # max_batch None: the serving set's (warm-up's)
        self._on_event = on_event
        self._on_roi_error = on_roi_error
        self._on_model = on_model
        self.model_error: str | None = None  # why the model server is not answering; None while it is
        n, m, end_n, end_m = (debounce, debounce, debounce, debounce) if isinstance(debounce, int) else debounce
        self._debounce = DefectDebouncer(n, m, end_n, end_m)
        self._thread = threading.Thread(target=self._run_guarded, name="inference", daemon=True)
        self._last_full = False
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()  # watchdog: the loop turned recently
        self.last_frame: dict[str, float] = {}  # camera -> monotonic time of its last classified frame
        self.frames_done = 0
        self._label_counters: dict[tuple[str, str], object] = {}
        self._roi_errors: set[tuple[str, str]] = set()
        self._sink_errors = 0
        self._batches = 0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced to the daemon, which exits non-zero
            self.error = exc
            log.exception("inference thread died")

    def _run(self) -> None:
        while True:
            self.last_progress = time.monotonic()
            if not self._supply.wait(0.25):
                if self._supply.all_closed_and_empty:
                    return
                self._slot.current()  # idle (a station waiting for triggers): a staged set still takes over
                continue
            frames = self._gather()
            requests = self._supply.take_requests()
            if frames or requests:
                self.process(frames, requests)

    def _gather(self) -> list[Frame]:
        limit = self._max_batch or self._slot.active.max_batch
        frames = self._supply.take(limit)
        if self._max_wait > 0 and self._last_full and 0 < len(frames) < limit:
            deadline = time.monotonic() + self._max_wait
            while len(frames) < limit:
                left = deadline - time.monotonic()
                if left <= 0 or not self._supply.wait(left):
                    break
                frames += self._supply.take(limit - len(frames))
        self._last_full = len(frames) >= limit
        return frames

    def process(self, frames: list[Frame], requests: Sequence[InferenceRequest] = ()) -> list[Prediction]:
        """One batch of frames (and requests) through the models; public so the bench can drive it directly."""
        serving = self._slot.current()
        try:
            out = self._process(serving, frames, requests)
        except ModelUnavailable as exc:  # runtime remote: the server is away; the daemon goes on without it
            self._model_unavailable(frames, requests, exc)
            return []
        except BaseException as exc:
            for r in requests:  # nobody waits forever on a batch that failed
                if r.result is None and r.error is None:
                    r.finish(error=f"model: {exc.__class__.__name__}: {exc}"[:300])
            raise
        if self.model_error is not None:
            self.model_error = None
            log.info("the model answers again")
            self._model_status(None)
        return out

    def _model_unavailable(self, frames: list[Frame], requests: Sequence[InferenceRequest],
                           exc: ModelUnavailable) -> None:
        """A batch the model server did not classify: its frames dropped and counted, its requests answered.

        The next batch waits until the server is worth asking again (at most MODEL_WAIT_CAP_S), so
        meanwhile the camera queues drop by their own policy instead of the worker spinning through frames.
        """
        for f in frames:
            self._m.frames_dropped.labels(camera=f.camera, reason="model_unavailable").inc()
        for r in requests:
            if r.result is None and r.error is None:
                r.finish(error=f"model: {exc}"[:300])
        if self.model_error is None:
            log.warning("%s; frames are dropped until it answers", exc)
            self._model_status(str(exc))
        self.model_error = str(exc)
        time.sleep(min(max(exc.retry_after_s, 0.0), MODEL_WAIT_CAP_S))

    def _model_status(self, why: str | None) -> None:
        if self._on_model is not None:
            try:
                self._on_model(why)
            except Exception:
                log.exception("model status callback failed")

    def _process(self, serving: ServingSet, frames: list[Frame], requests: Sequence[InferenceRequest]):
        t0 = time.monotonic()
        # model key -> (crops, owners); an owner is (position, frame, plan) or (request, frame index, plan)
        groups: dict[str, tuple[list, list]] = {}
        pos = 0
        for f in frames:
            for plan in serving.plans(f.camera):
                try:
                    crop = plan.crop(f.image)
                except RoiError as exc:
                    self._roi_error(f.camera, plan.name, str(exc))
                    continue
                g = groups.get(plan.model)
                if g is None:
                    g = groups[plan.model] = ([], [])
                g[0].append(crop)
                g[1].append((pos, f, plan))
                pos += 1
        errors: dict[int, dict[str, str]] = {}
        for r in requests:
            plans = serving.plans(r.camera) if r.camera is not None else (
                RoiPlan(FULL, None, DEFAULT, serving.decider),)
            for k, f in enumerate(r.frames):
                for plan in plans:
                    try:
                        crop = plan.crop(f.image)
                    except RoiError as exc:
                        errors.setdefault(id(r), {})[plan.name] = str(exc)
                        continue
                    g = groups.get(plan.model)
                    if g is None:
                        g = groups[plan.model] = ([], [])
                    g[0].append(crop)
                    g[1].append((r, k, plan))
        outputs = {key: serving.models[key].predict_images(crops) for key, (crops, _) in groups.items()}
        t1 = time.monotonic()
        inf = t1 - t0
        self._batches += 1
        preds: list[tuple[int, Prediction]] = []
        req_rows: dict[int, dict[str, list]] = {}
        decided = []
        for key, (_, owners) in groups.items():
            probs = outputs[key]
            model = serving.model_ref(key)
            by = _by_decider(owners)
            decided.append(by)
            for decider, idx in by.items():
                rows = probs if len(idx) == len(owners) else probs[idx]
                verdicts = decider.decide(rows)
                for i, v in zip(idx, verdicts):
                    owner, k, plan = owners[i]
                    if isinstance(owner, InferenceRequest):
                        req_rows.setdefault(id(owner), {}).setdefault(plan.name, []).append((k, probs[i]))
                        continue
                    f = k
                    preds.append((owner, Prediction(
                        f, v.label, v.score, v.top, v.defect, model,
                        Timings(queue_s=t0 - f.captured_mono, inference_s=inf, total_s=t1 - f.captured_mono),
                        self._batches, plan.name, None if plan.rect is None else groups[key][0][i],
                        plan.model == DEFAULT)))
        for r in requests:
            rows = req_rows.get(id(r), {})
            probs = {roi: np.stack([p for _, p in sorted(items, key=lambda kp: kp[0])]) for roi, items in rows.items()}
            r.finish(RequestResult(serving, probs, errors.get(id(r), {}), inf, self._batches))
        if len(groups) > 1 or any(len(by) > 1 for by in decided):  # only then can ROIs leave frame order
            preds.sort(key=lambda item: item[0])
        out = [p for _, p in preds]
        if out:
            self._account(out, inf)
            for sink in self._sinks:
                try:
                    sink.submit(out)
                except Exception:  # one sink's failure never stops the others or the model
                    self._sink_errors += 1
                    log.exception("sink %s failed on a batch of %d", type(sink).__name__, len(out))
            self._events(out)
        elif requests:
            self._m.batch_size.observe(sum(len(r.frames) for r in requests))
            self._m.inference_seconds.observe(inf)
        return out

    def _roi_error(self, camera: str, roi: str, why: str) -> None:
        """A stream ROI that cannot be cropped: said once (log, camera status), counted per frame."""
        self._m.frames_dropped.labels(camera=camera, reason="roi_outside").inc()
        if (camera, roi) in self._roi_errors:
            return
        self._roi_errors.add((camera, roi))
        log.error("camera %s: %s; the other ROIs go on", camera, why)
        if self._on_roi_error is not None:
            try:
                self._on_roi_error(camera, roi, why)
            except Exception:
                log.exception("roi error callback failed")

    def _account(self, preds: list[Prediction], inference_s: float) -> None:
        m = self._m
        m.batch_size.observe(len(preds))
        m.inference_seconds.observe(inference_s)
        now = time.monotonic()
        counts: dict[tuple[str, str], int] = {}  # one counter update per camera and label of the batch, not per frame
        for p in preds:
            key = (p.frame.camera, p.label)
            counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            child = self._label_counters.get(key)
            if child is None:
                child = self._label_counters[key] = m.predictions.labels(camera=key[0], label=key[1])
            child.inc(n)
            self.last_frame[key[0]] = now
        self.frames_done += len(preds)

    def _events(self, preds: list[Prediction]) -> None:
        if self._on_event is None:
            return
        for p in preds:
            kind = self._debounce.update((p.frame.camera, p.roi), p.defect)
            if kind:
                try:
                    self._on_event(p.frame.camera, {"kind": kind, "label": p.label, "score": round(p.score, 6),
                                                    "model": {"name": p.model.name, "version": p.model.version},
                                                    "at": p.frame.captured_at, "roi": p.roi, "image": p.image})
                except Exception:
                    log.exception("event sink failed")




def _by_decider(owners: list) -> dict:
    """Decider -> the owner indices it decides (one entry in the common case)."""
    out: dict = {}
    for i, (_, _, plan) in enumerate(owners):
        idx = out.get(plan.decider)
        if idx is None:
            idx = out[plan.decider] = []
        idx.append(i)
    return out
