"""The inference stage: greedy cross-camera batches -> model -> verdicts -> sinks.

One thread owns the model. It takes whatever frames are queued (up to
max_batch) the moment the model is free, so at light load a frame goes straight
through and under load batches grow by themselves. A model swap happens only
between two batches.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, Sequence

from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.models.runtime import Classifier
from visiond.serve.decide import Decider, DefectDebouncer
from visiond.serve.metrics import Metrics

log = logging.getLogger(__name__)


class Sink(Protocol):
    def submit(self, predictions: Sequence[Prediction]) -> None: ...


class FrameSupply(Protocol):
    def wait(self, timeout: float) -> bool: ...
    def take(self, max_n: int) -> list[Frame]: ...
    @property
    def all_closed_and_empty(self) -> bool: ...


class ModelSlot:
    """The model in service plus at most one staged replacement.

    `stage()` is called from any thread; the inference thread calls `current()`
    before each batch, so the switch always falls between two batches.
    """

    def __init__(self, classifier: Classifier, decider: Decider):
        self._active = (classifier, decider)
        self._staged: tuple[Classifier, Decider] | None = None
        self._lock = threading.Lock()
        self.on_switch: Callable[[Classifier], None] | None = None

    def stage(self, classifier: Classifier, decider: Decider) -> None:
        with self._lock:
            self._staged = (classifier, decider)

    @property
    def active(self) -> tuple[Classifier, Decider]:
        """The model serving right now, without taking a staged one (any thread, read-only)."""
        return self._active

    def current(self) -> tuple[Classifier, Decider]:
        if self._staged is not None:
            with self._lock:
                staged, self._staged = self._staged, None
            if staged is not None:
                old = self._active[0]
                self._active = staged
                log.info("model switched: %s %s -> %s %s", old.name, old.version, staged[0].name, staged[0].version)
                if self.on_switch:
                    self.on_switch(staged[0])
        return self._active


class InferenceWorker:
    """The one thread that batches, runs the model, decides and hands to sinks."""

    def __init__(self, supply: FrameSupply, slot: ModelSlot, sinks: Sequence[Sink], metrics: Metrics,
                 *, max_batch: int = 16, max_wait_s: float = 0.0,
                 on_event: Callable[[str, dict], None] | None = None, debounce_frames: int = 3):
        self._supply, self._slot, self._sinks, self._m = supply, slot, list(sinks), metrics
        self._max_batch, self._max_wait = max_batch, max_wait_s
        self._on_event = on_event
        self._debounce = DefectDebouncer(debounce_frames)
        self._thread = threading.Thread(target=self._run_guarded, name="inference", daemon=True)
        self._last_full = False
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()  # watchdog: the loop turned recently
        self.last_frame: dict[str, float] = {}  # camera -> monotonic time of its last classified frame
        self.frames_done = 0
        self._label_counters: dict[tuple[str, str], object] = {}
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
                continue
            frames = self._gather()
            if frames:
                self.process(frames)

    def _gather(self) -> list[Frame]:
        frames = self._supply.take(self._max_batch)
        if self._max_wait > 0 and self._last_full and 0 < len(frames) < self._max_batch:
            deadline = time.monotonic() + self._max_wait
            while len(frames) < self._max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or not self._supply.wait(left):
                    break
                frames += self._supply.take(self._max_batch - len(frames))
        self._last_full = len(frames) >= self._max_batch
        return frames

    def process(self, frames: list[Frame]) -> list[Prediction]:
        """One batch through the model; public so the bench can drive it directly."""
        clf, decider = self._slot.current()
        t0 = time.monotonic()
        probs = clf.predict_images([f.image for f in frames])
        t1 = time.monotonic()
        verdicts = decider.decide(probs)
        model = ModelRef(clf.name, clf.version)
        inf = t1 - t0
        self._batches += 1
        preds = [
            Prediction(f, v.label, v.score, v.top, v.defect, model,
                       Timings(queue_s=t0 - f.captured_mono, inference_s=inf, total_s=t1 - f.captured_mono),
                       self._batches)
            for f, v in zip(frames, verdicts)
        ]
        self._account(preds, inf)
        for sink in self._sinks:
            try:
                sink.submit(preds)
            except Exception:  # one sink's failure never stops the others or the model
                self._sink_errors += 1
                log.exception("sink %s failed on a batch of %d", type(sink).__name__, len(preds))
        self._events(preds)
        return preds

    def _account(self, preds: list[Prediction], inference_s: float) -> None:
        m = self._m
        m.batch_size.observe(len(preds))
        m.inference_seconds.observe(inference_s)
        now = time.monotonic()
        for p in preds:
            key = (p.frame.camera, p.label)
            child = self._label_counters.get(key)
            if child is None:
                child = self._label_counters[key] = m.predictions.labels(camera=key[0], label=key[1])
            child.inc()
            self.last_frame[p.frame.camera] = now
        self.frames_done += len(preds)

    def _events(self, preds: list[Prediction]) -> None:
        if self._on_event is None:
            return
        for p in preds:
            kind = self._debounce.update(p.frame.camera, p.defect)
            if kind:
                try:
                    self._on_event(p.frame.camera, {"kind": kind, "label": p.label, "score": round(p.score, 6),
                                                    "model": {"name": p.model.name, "version": p.model.version},
                                                    "at": p.frame.captured_at})
                except Exception:
                    log.exception("event sink failed")


