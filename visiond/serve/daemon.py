"""`visiond run`: wires sources, the inference worker and the sinks, and owns the lifecycle.

Start order: the web front (/metrics, /healthz, ...), MQTT (never waits for the broker), model, worker, sources.
Stop (SIGTERM and SIGINT alike): stop sources -> drain queued frames through the
model -> publish them -> retained `offline` -> exit 0. A stage thread that dies
takes the daemon down with exit code 1 rather than leaving it half-alive.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
import uuid

from visiond.config import CameraConfig, Config
from visiond.errors import UserError
from visiond.logs import redact_url
from visiond.serve import liveness
from visiond.serve.control import Control, ModelLoader, file_identity, serving_detail
from visiond.serve.doors.context import WebContext
from visiond.serve.doors.http import HttpDoor
from visiond.serve.doors.live import LiveState
from visiond.serve.inspect.evidence import EvidenceJob, EvidenceWriter, RoiMark
from visiond.serve.inspect.service import InspectionService
from visiond.serve.inspect.store import ResultsStore
from visiond.serve.metrics import Metrics
from visiond.serve.notify import sd_notify, watchdog_interval_s
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.sinks.capture import CaptureSink
from visiond.serve.sinks.jsonl import JsonlSink
from visiond.serve.sinks.mqtt import MqttSink
from visiond.serve.sinks.payloads import inspection_payload
from visiond.serve.sinks.shadow import ShadowSink
from visiond.serve.sinks.spool import Spool
from visiond.serve.sources import FrameSource
from visiond.serve.worker import InferenceWorker, ModelSlot
from visiond.video import default_policy

log = logging.getLogger(__name__)

_STATUS_EVERY_S = 5.0  # STATUS= for `systemctl status`, also without a watchdog
_PRUNE_EVERY_S = 3600.0  # results-store retention


def effective_policy(cam: CameraConfig) -> str:
    """Files and folders must not lose frames; live cameras keep only the newest."""
    return cam.policy or default_policy(cam.source)


class Daemon:
    """Builds every stage from the config, runs them, and takes them down in order; `control` changes them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_event = threading.Event()
        self._signalled: str | None = None  # set by the SIGTERM/SIGINT handler, acted on by _supervise
        self._hup = False  # set by the SIGHUP handler
        self.metrics = Metrics()
        self._exit_code = 0
        self._next_prune = time.monotonic() + 60.0
        checkpoint_seen = file_identity(cfg.model.checkpoint)  # before the load: a change during it is noticed
        loader = ModelLoader(cfg)
        serving = loader.build(cfg.recipe)  # fail before anything is started
        self.slot = ModelSlot(serving)
        clf = serving.classifier
        self.metrics.set_model(clf.name, clf.version, clf.arch)
        self.spool = Spool(cfg.spool.dir, cfg.spool.max_messages, metrics=self.metrics)
        self.mqtt = MqttSink(cfg.mqtt, cfg.node, self.spool, self.metrics, on_command=self._on_command)
        self.queues = {}
        stations = [c for c in cfg.cameras if c.mode == "triggered"]
        for cam in cfg.cameras:
            self.metrics.init_camera(cam.name)
            if cam.mode == "stream":
                self.queues[cam.name] = FrameQueue(cam.name, cam.queue_size, effective_policy(cam), self.metrics)
        self.hub = FrameHub(list(self.queues.values()), requests=bool(stations))
        self.inspection: InspectionService | None = None
        self.store: ResultsStore | None = None
        self.evidence: EvidenceWriter | None = None
        ev = cfg.evidence
        if (stations or ev.stream_events) and (ev.save != "none" or ev.sample_ok > 0):
            self.evidence = EvidenceWriter(cfg.evidence_dir, save=ev.save, sample_ok=ev.sample_ok,
                                           annotated=ev.annotated, keep_days=ev.keep_days, quota_mb=ev.quota_mb,
                                           metrics=self.metrics)
        if stations:
            self._build_inspection(cfg)
        self.sources = []
        for cam in cfg.cameras:
            target = self.queues[cam.name] if cam.mode == "stream" else self.inspection.buffers[cam.name]
            self.sources.append(FrameSource(cam, target, self.metrics, self._camera_status, self.stop_event))
        sinks = [self.mqtt]
        self.jsonl = None
        if cfg.jsonl.path:
            self.jsonl = JsonlSink(cfg.jsonl.path, cfg.node, cfg.jsonl.max_bytes, cfg.jsonl.keep)
            sinks.append(self.jsonl)
        self.capture = None
        if cfg.capture.dataset is not None:
            self.capture = CaptureSink(cfg.capture, cfg.cameras, self.metrics,
                                       thresholds=lambda: self.slot.active.decider.thresholds)
            sinks.append(self.capture)
        self.shadow = ShadowSink()  # empty until model.shadow or cmd/shadow gives it a candidate
        sinks.append(self.shadow)
        self.live = LiveState(self.store)  # the operator page: newest verdict per ROI, today's counts, NG strip
        sinks.append(self.live)
        if self.inspection is not None:
            self.inspection.on_verdict(self.live.verdict)
        self.control = Control(cfg, self.metrics, self.slot, self.mqtt, self.shadow, self.capture, checkpoint_seen,
                               loader)
        self.control.inspection = self.inspection
        self.doors: list = []  # plant doors onto the inspection core (Modbus, OPC UA), started after it
        if self.inspection is not None and cfg.modbus.enabled:
            from visiond.serve.doors.modbus import ModbusDoor

            self.doors.append(ModbusDoor(cfg, self.inspection, self.control, self.metrics, self.mqtt.set_detail))
        if self.inspection is not None and cfg.opcua.enabled:
            from visiond.serve.doors.opcua import OpcUaDoor

            self.doors.append(OpcUaDoor(cfg, self.inspection, self.control, self.metrics, self.mqtt.set_detail))
        self.slot.on_switch = self.control.model_switched
        d = cfg.decide
        self.worker = InferenceWorker(
            self.hub, self.slot, sinks, self.metrics,
            max_wait_s=cfg.model.max_wait_ms / 1000.0,  # the batch limit: the serving set's (auto: timed)
            on_event=self._event,
            debounce=d.debounce.resolved() if d.debounce is not None else d.debounce_frames,
            on_roi_error=self._roi_error,
            on_model=self._model_status,
        )
        self.http = None
        web = cfg.web
        for line in cfg.deprecations:
            log.warning("%s", line)
        if web.enabled:  # listens from run(); a port that is taken is a UserError there
            self.http = HttpDoor(WebContext(
                cfg, self.metrics, self.health, self.slot, self.hub, control=self.control, inspection=self.inspection,
                store=self.store, evidence_dir=cfg.evidence_dir if self.evidence is not None else None,
                sources={s.camera: s for s in self.sources}, live=self.live))

    def _build_inspection(self, cfg: Config) -> None:
        """Part inspection: the results store, evidence writer and the stations' service."""
        self.store = ResultsStore(cfg.results_db, metrics=self.metrics)
        node = cfg.node
        self.inspection = InspectionService(
            cfg, self.slot, self.hub, self.store, self.evidence, self.metrics,
            publish=self.mqtt.submit_inspection, set_ready=self.mqtt.set_ready,
            build_payload=lambda doc, seq: inspection_payload(doc, seq, node),
            switch_recipe=lambda name, timeout: self.control.switch_recipe(name, timeout),
            on_error=lambda msg: self.mqtt.set_detail({"last_error": msg, "last_error_at": time.time()}))

    # ---- lifecycle -------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        if self.http:
            self.http.start()
        self.mqtt.start()
        serving = self.slot.current()
        self.mqtt.set_detail({**serving_detail(serving, self.cfg), "cameras": [c.name for c in self.cfg.cameras],
                              "stations": sorted(self.inspection.stations) if self.inspection else [],
                              "pid": os.getpid()})
        self.mqtt.set_recipe(serving.recipe, serving.versions())
        if self.capture is not None:
            self.capture.start()
        if self.evidence is not None:
            self.evidence.start()
        if self.inspection is not None:
            self.inspection.start()
        try:
            for door in self.doors:
                door.start()
        except UserError as exc:
            log.error("%s; exiting with code 2", exc)
            self._exit_code = 2
            return self._shutdown()
        if self.cfg.model.shadow is not None:
            self.control.set_shadow(self.cfg.model.shadow, "model.shadow")
        self.worker.start()
        for s in self.sources:
            s.start()
        clf = serving.classifier
        log.info("visiond running: node %s, %d camera(s), model %s %s on %s (%s)", self.cfg.node, len(self.sources),
                 clf.name, clf.version, clf.device, clf.runtime)
        sd_notify("READY=1\nSTATUS=running")
        self._supervise()
        return self._shutdown()

    def _supervise(self) -> None:
        """Until stop: exit 1 if a stage thread died; ping the watchdog only while every stage progresses."""
        ping_every = watchdog_interval_s()
        next_ping = next_status = next_check = 0.0
        stalled_before: list[str] = []
        while not self.stop_event.wait(0.2):
            if self._signalled:
                log.info("signal %s: stopping", self._signalled)
                self.stop_event.set()
                return
            if self._hup:
                self._hup = False
                threading.Thread(target=self.control.reload, args=("SIGHUP",), name="reload", daemon=True).start()
            dead = liveness.dead_stage(self.worker, self.mqtt, self.sources)
            if dead is None and self.inspection is not None:
                dead = next((f"station {st.name} thread died: {st.error!r}"
                             for st in self.inspection.stations.values() if st.error is not None), None)
            if dead is None:
                dead = next((f"{type(d).__name__} stopped" for d in self.doors if not d.alive()), None)
            if dead is None and self.http is not None and not self.http.alive():
                dead = "the web front (HTTP) stopped"
            if dead is not None:
                self._fail(dead)
                return
            self._housekeeping()
            if not self.worker.alive():
                log.info("all sources finished; stopping")
                self.stop_event.set()
                return
            self.control.watch_checkpoint()
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + min(ping_every or 1.0, 1.0)
            if self.inspection is not None:
                self.inspection.confirm_spooled(self.mqtt.flush)
            stalled = liveness.stalls(self.worker, self.mqtt, self.sources, now)
            if bool(stalled) != bool(stalled_before):
                if stalled:
                    log.error("watchdog pings withheld so the service manager restarts visiond: %s", "; ".join(stalled))
                else:
                    log.warning("every stage progresses again; watchdog pings resume")
                next_status = now  # tell the service manager at once
            stalled_before = stalled
            ping = bool(ping_every) and not stalled and now >= next_ping
            if ping or now >= next_status:
                status = ("stalled: " + "; ".join(stalled)) if stalled else "running: " + liveness.summary(
                    self.worker, self.mqtt, self.spool, [c.name for c in self.cfg.cameras],
                    self.cfg.web.stale_after_s, now)
                sd_notify(("WATCHDOG=1\n" if ping else "") + f"STATUS={status}")
                next_status = now + _STATUS_EVERY_S
                if ping:
                    next_ping = now + ping_every

    def _fail(self, why: str) -> None:
        log.error("%s; exiting with code 1 so the service manager restarts visiond", why)
        self._exit_code = 1
        self.stop_event.set()

    def _shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self.stop_event.set()
        t0 = time.monotonic()
        self.hub.wake()  # release sources blocked on a full `every` queue
        for s in self.sources:
            s.join(timeout=3)
        for q in self.queues.values():
            q.close()  # a camera stuck in a network read must not hold up the drain
        for door in self.doors:
            try:
                door.stop()
            except Exception:
                log.exception("%s did not stop cleanly", type(door).__name__)
        if self.inspection is not None:
            for buf in self.inspection.buffers.values():
                buf.close()  # a running burst answers camera_down now instead of at its deadline
            self.inspection.stop(timeout=5.0)  # the running verdicts are decided (the worker still serves them)
        self.hub.stop_requests()
        self.hub.wake()
        self.worker.join(timeout=10)
        if self.worker.alive():
            log.error("inference did not drain within 10 s; %d frames classified", self.worker.frames_done)
        self.control.stop_shadow(final_report=True)  # its last window goes out with the drain below
        if self.capture is not None:
            self.capture.stop(timeout=3.0)
        if self.evidence is not None:
            self.evidence.stop(timeout=5.0)
        self.mqtt.stop(drain_timeout_s=5.0)
        if self.inspection is not None:
            self.inspection.confirm_spooled(self.mqtt.flush)
        self.spool.close()
        if self.store is not None:
            self.store.close()
        if self.jsonl:
            self.jsonl.close()
        if self.http:
            self.http.stop()
        log.info("stopped in %.2f s (exit %d)", time.monotonic() - t0, self._exit_code)
        return self._exit_code

    def _install_signals(self) -> None:
        """The handlers only record the signal; the supervise loop acts on it within 0.2 s.

        A Python signal handler runs in the main thread between two bytecodes, so it
        must take no lock: the main thread sits in `stop_event.wait()` nearly all the
        time, and `Event.set()` from a handler that interrupted it while it held the
        event's own (non-reentrant) lock hangs the daemon for good (seen as a stop
        that logged "signal SIGTERM" and nothing after). Logging and starting the
        reload thread take locks too, so they happen in the loop.
        """
        def stop(signum, _frame):
            self._signalled = signal.Signals(signum).name

        def hup(_signum, _frame):
            self._hup = True

        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests, a host program): the caller stops it with stop_event
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        # `kill -USR1` (systemctl kill -s USR1 visiond) writes every thread's stack to stderr
        # and the daemon goes on: what an operator needs when a stage looks stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    # ---- callbacks and health -------------------------------------------
    def _on_command(self, verb: str, payload: bytes, request=None) -> None:
        """MQTT thread; `control` is built before that thread starts."""
        self.control.command(verb, payload, request)

    def _camera_status(self, camera: str, online: bool, reason: str) -> None:
        self.mqtt.set_camera_status(camera, online, redact_url(reason))  # the source already logged it
        if self.inspection is not None:
            self.inspection.camera_status(camera, online, redact_url(reason))

    def _event(self, camera: str, event: dict) -> None:
        """Inference thread: a debounced defect event out over MQTT; with evidence.stream_events the crop that
        started it is kept like an NG part's evidence (written by the evidence thread)."""
        image = event.pop("image", None)
        event["evidence"] = None
        if (self.evidence is not None and self.cfg.evidence.stream_events and image is not None
                and event["kind"] == "defect_started"):
            h, w = image.shape[:2]
            job = EvidenceJob(camera=camera, job_id=uuid.uuid4().hex[:16], part_id=f"event {event['roi']}",
                              verdict="NG", reason=None, recipe=self.slot.active.recipe, decided_at=event["at"],
                              frames=(image,), rois=(RoiMark(event["roi"], (0, 0, w, h), event["label"],
                                                             event["score"], True),))
            paths = self.evidence.plan(job)
            if paths and self.evidence.submit(job, paths):
                event["evidence"] = paths
        self.mqtt.submit_event(camera, event)

    def _model_status(self, why: str | None) -> None:
        """Inference thread: `status/detail.model_status` says whether the model server answers (runtime remote)."""
        state = {"state": "ok" if why is None else "unavailable", "reason": why, "at": time.time()}
        detail = {"model_status": state}
        if why is not None:
            detail.update(last_error=why, last_error_at=state["at"])
        self.mqtt.set_detail(detail)

    def _roi_error(self, camera: str, roi: str, why: str) -> None:
        self.mqtt.set_detail({"last_error": f"camera {camera}: {why}", "last_error_at": time.time()})

    def _housekeeping(self) -> None:
        """Retention of the results store, in the background, about hourly (and once soon after start)."""
        if self.store is None or not self.cfg.results.keep_days:
            return
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_S

        def prune():
            try:
                n = self.store.prune(self.cfg.results.keep_days)
                if n:
                    log.info("results store: %d verdict(s) older than %g days removed", n, self.cfg.results.keep_days)
            except Exception as exc:
                log.error("results store: retention failed (%s); it is tried again in an hour", exc)

        threading.Thread(target=prune, name="results-retention", daemon=True).start()

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        stale = self.cfg.web.stale_after_s
        cams = {}
        for cam in self.cfg.cameras:
            last = self.worker.last_frame.get(cam.name)
            if self.inspection is not None and cam.name in self.inspection.buffers:
                last = self.inspection.buffers[cam.name].last_frame_mono or None
            age = None if last is None else round(now - last, 3)
            cams[cam.name] = {"ok": age is not None and age <= stale, "last_frame_age_s": age}
        broker = self.mqtt.connected
        ok = broker and all(c["ok"] for c in cams.values())
        spool = {"messages": self.spool.count(), "oldest_age_s": round(self.spool.oldest_age(), 3)}
        return ok, {"mqtt_connected": broker, "cameras": cams, "inference_alive": self.worker.alive(),
                    "spool": spool}
