"""Shadow mode: a candidate model classifies the same frames as the served one, unseen by the plant.

Its labels are never published as predictions; per camera, the daemon counts how often
the candidate agrees with the served model, per served class, with the full confusion
between the two, and publishes that every `interval_s` on `visiond/<node>/<camera>/shadow`,
so an operator promotes with evidence.

The candidate runs on its own thread, fed the frames of each batch through a small
bounded queue: the main verdicts never wait for it. It preprocesses the frames itself
with its own spec (the same deterministic resize, so with the same spec it sees the
identical uint8 pixels; a candidate with a different input size still works). When it
cannot keep up, whole batches are skipped and counted, never queued without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from visiond.frames import Prediction
from visiond.models.runtime import Classifier
from visiond.serve.metrics import Metrics
from visiond.timefmt import rfc3339

log = logging.getLogger(__name__)

Publish = Callable[[str, dict], None]  # (camera, report) -> None


class _Window:
    """One camera's counts since the last report."""

    def __init__(self, now_wall: float):
        self.start = now_wall
        self.frames = self.agreed = self.skipped = 0
        self.per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # served label -> [frames, agreed]
        self.confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.serving: dict[str, str] | None = None

    def report(self, candidate: Classifier, end_wall: float) -> dict:
        return {
            "window": {"start": rfc3339(self.start), "end": rfc3339(end_wall), "seconds": round(end_wall - self.start, 3)},
            "frames": self.frames,
            "agreed": self.agreed,
            "agreement": round(self.agreed / self.frames, 6) if self.frames else None,
            "per_class": {c: {"frames": n, "agreed": a, "agreement": round(a / n, 6) if n else None}
                          for c, (n, a) in sorted(self.per_class.items())},
            "confusion": {s: dict(sorted(row.items())) for s, row in sorted(self.confusion.items())},
            "skipped_frames": self.skipped,
            "serving": self.serving,
            "candidate": {"name": candidate.name, "version": candidate.version},
        }


class ShadowRunner:
    """The candidate's thread, its queue and its per-camera windows."""

    def __init__(self, candidate: Classifier, publish: Publish, metrics: Metrics, interval_s: float,
                 queue_batches: int = 4):
        self.candidate = candidate
        self._publish, self._m, self.interval_s = publish, metrics, interval_s
        self._queue: queue.Queue[list[Prediction] | None] = queue.Queue(queue_batches)
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()  # windows: the shadow thread writes, submit() counts skips
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run_guarded, name="shadow", daemon=True)
        self._next_report = time.monotonic() + interval_s
        self._children: dict[tuple[str, str], object] = {}
        self.frames_done = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        log.info("shadow: candidate %s %s runs beside the served model; report every %.0f s",
                 self.candidate.name, self.candidate.version, self.interval_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, predictions: Sequence[Prediction]) -> None:
        """Inference thread: hand the batch over, or skip it when the candidate is behind.

        Only the default model's predictions are compared: an ROI served by another model
        (cameras[].rois[].model) is not what the candidate would replace."""
        predictions = [p for p in predictions if p.served_default]
        if not predictions:
            return
        try:
            self._queue.put_nowait(predictions)
        except queue.Full:
            with self._lock:
                for p in predictions:
                    self._window(p.frame.camera).skipped += 1
            for p in predictions:
                self._count(p.frame.camera, "skipped")

    def stop(self, timeout: float = 5.0, final_report: bool = True) -> None:
        """Classify what is queued, publish the last (partial) window, end the thread."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if final_report and not self._thread.is_alive():
            self._report()

    def _window(self, camera: str) -> _Window:
        w = self._windows.get(camera)
        if w is None:
            w = self._windows[camera] = _Window(time.time())
        return w

    def _count(self, camera: str, outcome: str):
        child = self._children.get((camera, outcome))
        if child is None:
            child = self._children[(camera, outcome)] = self._m.shadow_frames.labels(camera=camera, outcome=outcome)
        child.inc()

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the candidate must never take the daemon down
            self.error = exc
            log.exception("shadow thread died; the served model is unaffected")

    def _run(self) -> None:
        while True:
            wait = max(0.01, self._next_report - time.monotonic())
            try:
                batch = self._queue.get(timeout=min(wait, 0.5))
            except queue.Empty:
                if self._stop.is_set():
                    return  # stopping, and nothing is queued any more
                batch = []
            if batch is None:
                while True:  # stop: finish what is queued
                    try:
                        rest = self._queue.get_nowait()
                    except queue.Empty:
                        return
                    if rest:
                        self._classify(rest)
            if batch:
                self._classify(batch)
            if time.monotonic() >= self._next_report:
                self._next_report = time.monotonic() + self.interval_s
                self._report()

    def _classify(self, preds: list[Prediction]) -> None:
        probs = self.candidate.predict_images([p.image for p in preds]) \
            if hasattr(self.candidate, "predict_images") else self.candidate.predict(
                _stack([p.image for p in preds], self.candidate))
        labels = [self.candidate.classes[i] for i in np.argmax(probs, axis=1).tolist()]
        with self._lock:
            for p, label in zip(preds, labels):
                w = self._window(p.frame.camera)
                agree = p.label == label
                w.frames += 1
                w.agreed += agree
                row = w.per_class[p.label]
                row[0] += 1
                row[1] += agree
                w.confusion[p.label][label] += 1
                w.serving = {"name": p.model.name, "version": p.model.version}
        for p, label in zip(preds, labels):
            self._count(p.frame.camera, "agree" if p.label == label else "disagree")
        self.frames_done += len(preds)

    def _report(self) -> None:
        now = time.time()
        with self._lock:
            windows, self._windows = self._windows, {}
        for camera, w in windows.items():
            if not w.frames and not w.skipped:
                continue
            try:
                self._publish(camera, w.report(self.candidate, now))
            except Exception:
                log.exception("shadow: could not publish the comparison for %s", camera)


def _stack(images, clf):
    from visiond.preprocess import stack_uint8

    return stack_uint8(images, clf.spec)


class ShadowSink:
    """Always in the worker's sink list; holds the runner of the moment (or none), swapped at run time."""

    def __init__(self):
        self.runner: ShadowRunner | None = None
        self._lock = threading.Lock()

    def submit(self, predictions: Sequence[Prediction]) -> None:
        runner = self.runner
        if runner is not None:
            runner.submit(predictions)

    def replace(self, runner: ShadowRunner | None) -> ShadowRunner | None:
        """Install a new runner (started) and return the old one for the caller to stop."""
        with self._lock:
            old, self.runner = self.runner, runner
        return old
