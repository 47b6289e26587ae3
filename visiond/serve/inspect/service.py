"""The core every door calls: one trigger in, one stored verdict out (DESIGN.md "Inspecting parts").

A trigger names a station (a camera in `mode: triggered`) and a part. The station's
thread takes triggers one at a time from a bounded queue (a full queue answers
ERROR `busy` at once), waits for the burst of frames captured after the trigger,
hands the burst to the one inference thread (batched with live frames), aggregates
per ROI and per part, writes the verdict to the results store (fsync'd, which also
assigns the inspection stream's gapless `seq`), and only then publishes it, queues
its evidence and answers every door that asked. Whatever goes wrong (camera down,
model busy, unknown recipe) is an ERROR verdict with its reason, decided inside the
trigger's deadline: a part never goes unanswered.

A trigger seen twice (MQTT QoS 1 redelivery: the same correlation data, or the same
part id and trigger id within 10 minutes) is answered again with the stored verdict,
or joins the inspection still running for it: it is never inspected twice.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from visiond.config import CameraConfig, Config
from visiond.serve.inspect.aggregate import RoiOutcome, aggregate_roi, part_verdict
from visiond.serve.inspect.burst import BurstBuffer, BurstError
from visiond.serve.inspect.evidence import EvidenceJob, EvidenceWriter, RoiMark
from visiond.serve.inspect.store import ResultsStore
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub
from visiond.serve.serving import ServingSet
from visiond.serve.worker import InferenceRequest, ModelSlot

log = logging.getLogger(__name__)

DEDUPE_WINDOW_S = 600.0
MAX_BURST_FRAMES = 100
_MARGIN_S = 0.05  # of the deadline, kept for storing and publishing the verdict

Reply = Callable[[bytes], None]


class InspectError(Exception):
    """A part that cannot be inspected: `reason` goes into the ERROR verdict, the message into `detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Trigger:
    camera: str
    part_id: str
    door: str = "mqtt"
    trigger_id: str | None = None
    recipe: str | None = None
    frames: int | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    reply: Reply | None = None  # the door's answer to this request (MQTT response topic, HTTP waiter, ...)
    received_mono: float = field(default_factory=time.monotonic)
    received_at: float = field(default_factory=time.time)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    extra_replies: list = field(default_factory=list)  # redeliveries that arrived while it ran

    def key(self) -> tuple | None:
        if self.correlation:
            return (self.camera, "corr", self.correlation)
        if self.trigger_id:
            return (self.camera, "trig", self.part_id, self.trigger_id)
        return None


class Station:
    """One triggered camera: its burst buffer, its trigger queue and the thread that works through it."""

    def __init__(self, cam: CameraConfig, buffer: BurstBuffer, service: InspectionService):
        self.cam = cam
        self.name = cam.name
        self.buffer = buffer
        self._service = service
        self._queue: queue.Queue[Trigger | None] = queue.Queue(maxsize=cam.inspect.queue)
        self.running: Trigger | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_guarded, name=f"station-{self.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def offer(self, trigger: Trigger) -> bool:
        try:
            self._queue.put_nowait(trigger)
        except queue.Full:
            return False
        self._service.update_ready(self)
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def join(self, timeout: float) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced to the daemon, which exits non-zero
            self.error = exc
            log.exception("station %s: thread died", self.name)

    def _run(self) -> None:
        while True:
            try:
                trigger = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._service.stopping.is_set():
                    return
                continue
            if trigger is None:
                self._answer_left_as_shutdown()
                return
            self.running = trigger
            self._service.update_ready(self)
            try:
                self._service.inspect(self, trigger)
            finally:
                self.running = None
                self._service.update_ready(self)

    def _answer_left_as_shutdown(self) -> None:
        while True:
            try:
                trigger = self._queue.get_nowait()
            except queue.Empty:
                return
            if trigger is not None:
                self._service.answer_error(trigger, "shutdown", "visiond is stopping; trigger again after restart")


class InspectionService:
    """Triggers from any door -> verdicts in the store -> every door; see the module docstring."""

    def __init__(self, cfg: Config, slot: ModelSlot, hub: FrameHub, store: ResultsStore,
                 evidence: EvidenceWriter | None, metrics: Metrics, *,
                 publish: Callable[[str, bytes], None], set_ready: Callable[[str, str], None],
                 build_payload: Callable[[dict, int], bytes],
                 switch_recipe: Callable[[str, float], ServingSet] | None = None,
                 on_error: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.slot = slot
        self.hub = hub
        self.store = store
        self.evidence = evidence
        self.metrics = metrics
        self._publish = publish
        self._set_ready = set_ready
        self._build = build_payload
        self._switch_recipe = switch_recipe
        self._on_error = on_error
        self.stopping = threading.Event()
        self.buffers = {c.name: BurstBuffer(c.name, c.inspect.keep_frames) for c in cfg.cameras if c.mode == "triggered"}
        self.stations = {c.name: Station(c, self.buffers[c.name], self) for c in cfg.cameras if c.mode == "triggered"}
        self._inflight: dict[tuple, Trigger] = {}
        self._lock = threading.Lock()
        self._verdict_listeners: list[Callable[[str, bytes], None]] = []
        self._ready_listeners: list[Callable[[str, str], None]] = []
        self._ready_shown: dict[str, str] = {}
        self._ready_lock = threading.Lock()
        self._spooling: list[int] = []  # seqs of verdicts handed to `publish`, not yet known to be on its disk

    def on_verdict(self, listener: Callable[[str, bytes], None]) -> None:
        """Call `listener(camera, payload)` with every stored verdict, whichever door asked (the doors' state)."""
        self._verdict_listeners.append(listener)

    def on_ready(self, listener: Callable[[str, str], None]) -> None:
        """Call `listener(camera, "ready"|"busy"|"error")` on every change of a station's state."""
        self._ready_listeners.append(listener)

    def state(self, camera: str) -> str:
        return self._ready_shown.get(camera, "error")

    # ---- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        again = self.store.unspooled()  # stored, then a crash before the spool had them: publish them again
        if again:
            log.warning("%d verdict(s) stored but not known to be spooled before the last stop (seq %d..%d); "
                        "publishing them again (subscribers may see a seq twice, never miss one)",
                        len(again), again[0][0], again[-1][0])
        for seq, camera, payload in again:
            self._publish(camera, payload)
            self._spooling.append(seq)
        for st in self.stations.values():
            for verdict in ("OK", "NG", "ERROR"):
                self.metrics.inspections.labels(camera=st.name, verdict=verdict)
            self.metrics.triggers_rejected.labels(camera=st.name, reason="busy")
            self.update_ready(st)
            st.start()

    def confirm_spooled(self, flush: Callable[[float], bool], timeout: float = 0.5) -> None:
        """Once `flush` says everything published so far is on the spool's disk, unmark those verdicts in the
        store (the daemon calls this every second and after its drain)."""
        with self._lock:
            seqs, self._spooling = self._spooling, []
        try:
            if seqs and flush(timeout):
                self.store.mark_spooled(seqs)
                return
        except Exception as exc:  # tried again next time; at worst a restart publishes them twice (same seq and id)
            log.warning("results store: cannot mark %d verdict(s) spooled (%s)", len(seqs), exc)
        with self._lock:
            self._spooling[:0] = seqs

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running inspections, answer the queued ones ERROR shutdown."""
        self.stopping.set()
        for st in self.stations.values():
            st.stop()
        end = time.monotonic() + timeout
        for st in self.stations.values():
            st.join(max(0.0, end - time.monotonic()))

    # ---- any door, any thread -------------------------------------------------------
    def trigger(self, t: Trigger) -> str:
        """Accept a trigger; its verdict reaches `t.reply` (and the inspection topic) later. Returns how it was taken:
        "queued", "joined" (the same trigger is running), "stored" (answered again from the store) or "rejected"."""
        st = self.stations.get(t.camera)
        if st is None:
            raise ValueError(f"camera {t.camera!r} is not a triggered station "
                             f"(expected one of: {', '.join(self.stations) or 'none configured'})")
        if not t.part_id or len(t.part_id) > 128:
            raise ValueError("part_id: expected a non-empty string of at most 128 characters")
        if t.frames is not None and not 1 <= t.frames <= MAX_BURST_FRAMES:
            raise ValueError(f"frames: got {t.frames}, expected 1..{MAX_BURST_FRAMES}")
        self.metrics.triggers.labels(camera=t.camera, door=t.door).inc()
        if self.stopping.is_set():
            self.answer_error(t, "shutdown", "visiond is stopping; trigger again after restart")
            return "rejected"
        key = t.key()
        if key is not None:
            with self._lock:
                running = self._inflight.get(key)
                if running is not None:
                    if t.reply is not None:
                        running.extra_replies.append(t.reply)
                    log.info("station %s: trigger for part %s seen again while it runs; one verdict answers both",
                             t.camera, t.part_id)
                    return "joined"
            stored = self.store.find_duplicate(t.camera, t.correlation, t.part_id, t.trigger_id,
                                               within_s=DEDUPE_WINDOW_S)
            if stored is not None and _refused_unseen(stored.payload):
                stored = None  # it was turned away (busy, stopping) without a look: a retry is a new attempt
            if stored is not None:
                log.info("station %s: trigger for part %s seen again; answered from the store (job %s)",
                         t.camera, t.part_id, stored.job_id)
                if t.reply is not None:
                    t.reply(stored.payload)
                return "stored"
            with self._lock:
                self._inflight[key] = t
        if not st.offer(t):
            self._forget(t)
            self.metrics.triggers_rejected.labels(camera=t.camera, reason="busy").inc()
            self.answer_error(t, "busy", f"station {t.camera}: {st.cam.inspect.queue} triggers already wait")
            return "rejected"
        return "queued"

    def update_ready(self, st: Station) -> None:
        """Retained `<camera>/ready`; under a lock so two threads cannot leave a stale state as the last word."""
        with self._ready_lock:
            if not st.buffer.online or st.buffer.closed:
                state = "error"
            elif st.running is not None or st.pending():
                state = "busy"
            else:
                state = "ready"
            if self._ready_shown.get(st.name) != state:
                self._ready_shown[st.name] = state
                self._set_ready(st.name, state)
                for listener in self._ready_listeners:
                    try:
                        listener(st.name, state)
                    except Exception:
                        log.exception("station %s: a door could not take the state %s", st.name, state)

    def camera_status(self, camera: str, online: bool, reason: str) -> None:
        buf = self.buffers.get(camera)
        if buf is not None:
            buf.set_status(online, reason)
            self.update_ready(self.stations[camera])

    # ---- the station's thread ---------------------------------------------------------
    def inspect(self, st: Station, t: Trigger) -> None:
        inspect = st.cam.inspect
        deadline = t.received_mono + inspect.deadline_ms / 1000.0
        until = deadline - min(_MARGIN_S, inspect.deadline_ms / 10000.0)
        t_burst = t_infer = 0.0
        frames: list = []
        rois: list[RoiOutcome] = []
        serving = self.slot.active
        try:
            if time.monotonic() >= until:
                raise InspectError("deadline", f"the trigger waited {time.monotonic() - t.received_mono:.2f} s "
                                               "in the queue, past its deadline")
            if t.recipe is not None and t.recipe != serving.recipe:
                serving = self._recipe(t.recipe, until)
            t0 = time.monotonic()
            frames = st.buffer.burst(t.frames or inspect.frames, inspect.interval_ms / 1000.0, t.received_mono, until)
            t1 = time.monotonic()
            t_burst = t1 - t0
            request = InferenceRequest(st.name, frames)
            self.hub.submit(request)
            if not request.wait(until - time.monotonic()):
                raise InspectError("deadline", f"the model did not classify the burst within the deadline "
                                               f"({inspect.deadline_ms:.0f} ms; model busy)")
            if request.error is not None:
                raise InspectError("model", request.error)
            result = request.result
            t_infer = result.inference_s
            serving = result.serving
            if result.errors:
                name, why = next(iter(result.errors.items()))
                raise InspectError("roi", why)
            for plan in serving.plans(st.name):
                rois.append(aggregate_roi(plan.name, result.probs[plan.name], plan.decider, inspect.aggregate))
            verdict, reason, detail = part_verdict(rois), None, None
        except BurstError as exc:
            verdict, reason, detail = "ERROR", exc.reason, str(exc)
        except InspectError as exc:
            verdict, reason, detail = "ERROR", exc.reason, str(exc)
        self._decide(st, t, serving, verdict, reason, detail, frames, rois, t_burst, t_infer)

    def _recipe(self, name: str, until: float) -> ServingSet:
        if name not in self.cfg.recipes:
            raise InspectError("unknown_recipe", f"recipe {name!r} is not configured "
                                                 f"(expected one of: {', '.join(self.cfg.recipes) or 'none'})")
        if self._switch_recipe is None:
            raise InspectError("recipe_failed", "recipes cannot be switched here")
        try:
            return self._switch_recipe(name, until - time.monotonic())
        except TimeoutError as exc:
            raise InspectError("deadline", str(exc)) from None
        except Exception as exc:  # refused: the old recipe keeps serving
            raise InspectError("recipe_failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def answer_error(self, t: Trigger, reason: str, detail: str) -> None:
        """An ERROR verdict without a burst (busy, shutdown): stored and published like any other."""
        self._decide(None, t, self.slot.active, "ERROR", reason, detail, [], [], 0.0, 0.0)

    def _decide(self, st: Station | None, t: Trigger, serving: ServingSet, verdict: str, reason: str | None,
                detail: str | None, frames: list, rois: list[RoiOutcome], t_burst: float, t_infer: float) -> None:
        decided_mono, decided_at = time.monotonic(), time.time()
        plans = {p.name: p for p in serving.plans(t.camera)}
        models = {r.name: serving.model_ref(plans[r.name].model) for r in rois if r.name in plans}
        paths = None
        job = None
        if self.evidence is not None and st is not None:
            job = EvidenceJob(
                camera=t.camera, job_id=t.job_id, part_id=t.part_id, verdict=verdict, reason=reason,
                recipe=serving.recipe, decided_at=decided_at, frames=tuple(f.image for f in frames),
                rois=tuple(RoiMark(p.name, p.rect or (0, 0, *_size(frames)), o.label, o.score, o.defect)
                           for p, o in _marks(plans, rois)) or tuple(
                    RoiMark(p.name, p.rect or (0, 0, *_size(frames)), None, None, False) for p in plans.values()))
            paths = self.evidence.plan(job) if frames or verdict != "OK" else None
        doc = {
            "id": str(uuid.uuid4()), "job_id": t.job_id, "camera": t.camera, "part_id": t.part_id,
            "trigger_id": t.trigger_id, "door": t.door, "recipe": serving.recipe, "verdict": verdict,
            "reason": reason, "detail": (detail or None) and detail[:500],
            "rois": [{"name": o.name, "label": o.label, "score": o.score, "defect": o.defect, "top": o.top,
                      "frames": [{"label": v.label, "score": v.score, "defect": v.defect} for v in o.frames],
                      "model": {"name": models[o.name].name, "version": models[o.name].version}} for o in rois],
            "frames": [(f.captured_at, f.index) for f in frames],
            "models": {k: {"name": m.name, "version": m.version} for k, m in models.items()},
            "triggered_at": t.received_at, "decided_at": decided_at,
            "latency_ms": {"burst": round(t_burst * 1e3, 3), "inference": round(t_infer * 1e3, 3),
                           "total": round((decided_mono - t.received_mono) * 1e3, 3)},
            "evidence": paths,
        }
        row = {**{k: v for k, v in doc.items() if k != "frames"},  # the frames' times live in the payload
               "correlation": t.correlation, "response_topic": t.response_topic}
        stored = None
        try:
            stored = self.store.record(row, lambda seq: self._build(doc, seq))
            payload = stored.payload
        except Exception as exc:  # the verdict still goes out: a lost row is counted, a lost answer would be worse
            log.error("results store: cannot record job %s (%s); the verdict is published anyway", t.job_id, exc)
            payload = self._build(doc, 0)
            if self._on_error:
                self._on_error(f"results store: cannot record a verdict ({exc.__class__.__name__})")
        self._forget(t)
        self._publish(t.camera, payload)
        if stored is not None:
            with self._lock:
                self._spooling.append(stored.seq)
        for listener in self._verdict_listeners:
            try:
                listener(t.camera, payload)
            except Exception:
                log.exception("station %s: a door could not take the verdict of job %s", t.camera, t.job_id)
        for reply in [t.reply, *t.extra_replies]:
            if reply is not None:
                try:
                    reply(payload)
                except Exception:
                    log.exception("station %s: a door could not take the verdict of job %s", t.camera, t.job_id)
        if job is not None and paths:
            self.evidence.submit(job, paths)
        self.metrics.inspections.labels(camera=t.camera, verdict=verdict).inc()
        self.metrics.inspection_seconds.labels(camera=t.camera).observe(decided_mono - t.received_mono)
        if verdict == "ERROR":
            log.warning("station %s: part %s ERROR %s: %s", t.camera, t.part_id, reason, detail)

    def _forget(self, t: Trigger) -> None:
        key = t.key()
        if key is not None:
            with self._lock:
                if self._inflight.get(key) is t:
                    del self._inflight[key]


def _refused_unseen(payload: bytes) -> bool:
    """An ERROR given before any frame was looked at: busy or shutdown."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return doc.get("verdict") == "ERROR" and doc.get("reason") in ("busy", "shutdown")


def _size(frames: list) -> tuple[int, int]:
    if not frames:
        return (1, 1)
    h, w = frames[0].image.shape[:2]
    return (w, h)


def _marks(plans: dict, rois: list[RoiOutcome]):
    return [(plans[o.name], o) for o in rois if o.name in plans]


def trigger_from(body: dict, door: str, correlation: bytes | None = None, response_topic: str | None = None):
    """A door's trigger request as a `Trigger`; ValueError names the field and what was expected."""
    camera = body.get("camera")
    if not isinstance(camera, str) or not camera:
        raise ValueError(f"camera {str(camera)[:64]!r}: expected the name of a triggered camera")
    part = body.get("part_id")
    if isinstance(part, bool) or not isinstance(part, (str, int)) or not str(part) or len(str(part)) > 128:
        raise ValueError(f"part_id {str(part)[:64]!r}: expected a string (or integer) of 1 to 128 characters")
    trig = body.get("trigger_id")
    if trig is not None and (isinstance(trig, bool) or not isinstance(trig, (str, int)) or len(str(trig)) > 128):
        raise ValueError(f"trigger_id {str(trig)[:64]!r}: expected a string (or integer) of at most 128 characters")
    recipe = body.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise ValueError(f"recipe {str(recipe)[:64]!r}: expected a recipe name")
    frames = body.get("frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)):
        raise ValueError(f"frames {str(frames)[:64]!r}: expected an integer")
    unknown = sorted(set(body) - {"camera", "part_id", "trigger_id", "recipe", "frames"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(k[:32] for k in unknown[:5])}; expected camera, part_id, "
                         "trigger_id, recipe, frames")
    return Trigger(camera=camera, part_id=str(part), door=door, trigger_id=None if trig is None else str(trig),
                   recipe=recipe, frames=frames, correlation=correlation, response_topic=response_topic)
