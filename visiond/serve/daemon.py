"""`visiond run`: wires sources, the inference worker and the sinks, and owns the lifecycle.

Start order: metrics, MQTT (never waits for the broker), model, worker, sources.
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

from visiond.config import CameraConfig, Config
from visiond.errors import UserError
from visiond.logs import redact_url
from visiond.serve import liveness
from visiond.serve.control import Control, file_identity, load_model, model_detail
from visiond.serve.metrics import Metrics, MetricsServer
from visiond.serve.notify import sd_notify, watchdog_interval_s
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.sinks.capture import CaptureSink
from visiond.serve.sinks.jsonl import JsonlSink
from visiond.serve.sinks.mqtt import MqttSink
from visiond.serve.sinks.shadow import ShadowSink
from visiond.serve.sinks.spool import Spool
from visiond.serve.sources import FrameSource
from visiond.serve.worker import InferenceWorker, ModelSlot
from visiond.video import default_policy

log = logging.getLogger(__name__)

_STATUS_EVERY_S = 5.0  # STATUS= for `systemctl status`, also without a watchdog


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
        checkpoint_seen = file_identity(cfg.model.checkpoint)  # before the load: a change during it is noticed
        clf, decider = load_model(cfg)  # fail before anything is started
        self.slot = ModelSlot(clf, decider)
        self.metrics.set_model(clf.name, clf.version, clf.arch)
        self.spool = Spool(cfg.spool.dir, cfg.spool.max_messages, metrics=self.metrics)
        self.mqtt = MqttSink(cfg.mqtt, cfg.node, self.spool, self.metrics, on_command=self._on_command)
        self.queues = {}
        self.sources = []
        for cam in cfg.cameras:
            self.metrics.init_camera(cam.name)
            q = FrameQueue(cam.name, cam.queue_size, effective_policy(cam), self.metrics)
            self.queues[cam.name] = q
            self.sources.append(FrameSource(cam, q, self.metrics, self._camera_status, self.stop_event))
        self.hub = FrameHub(list(self.queues.values()))
        sinks = [self.mqtt]
        self.jsonl = None
        if cfg.jsonl.path:
            self.jsonl = JsonlSink(cfg.jsonl.path, cfg.node, cfg.jsonl.max_bytes, cfg.jsonl.keep)
            sinks.append(self.jsonl)
        self.capture = None
        if cfg.capture.dataset is not None:
            self.capture = CaptureSink(cfg.capture, cfg.cameras, self.metrics,
                                       thresholds=lambda: self.slot.active[1].thresholds)
            sinks.append(self.capture)
        self.shadow = ShadowSink()  # empty until model.shadow or cmd/shadow gives it a candidate
        sinks.append(self.shadow)
        self.control = Control(cfg, self.metrics, self.slot, self.mqtt, self.shadow, self.capture, checkpoint_seen)
        self.slot.on_switch = self.control.model_switched
        self.worker = InferenceWorker(
            self.hub, self.slot, sinks, self.metrics,
            max_batch=cfg.model.max_batch, max_wait_s=cfg.model.max_wait_ms / 1000.0,
            on_event=self.mqtt.submit_event, debounce_frames=cfg.decide.debounce_frames,
        )
        self.http = None
        if cfg.metrics.enabled:
            try:
                self.http = MetricsServer(self.metrics, self.health, cfg.metrics.bind, cfg.metrics.port)
            except OSError as exc:
                raise UserError(f"metrics: cannot listen on {cfg.metrics.bind}:{cfg.metrics.port} ({exc.strerror})") from None

    # ---- lifecycle -------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        if self.http:
            self.http.start()
        self.mqtt.start()
        self.mqtt.set_detail({"model": model_detail(self.slot.current()[0]), "cameras": [c.name for c in self.cfg.cameras],
                              "pid": os.getpid()})
        if self.capture is not None:
            self.capture.start()
        if self.cfg.model.shadow is not None:
            self.control.set_shadow(self.cfg.model.shadow, "model.shadow")
        self.worker.start()
        for s in self.sources:
            s.start()
        clf = self.slot.current()[0]
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
            if dead is not None:
                self._fail(dead)
                return
            if not self.worker.alive():
                log.info("all sources finished; stopping")
                self.stop_event.set()
                return
            self.control.watch_checkpoint()
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + min(ping_every or 1.0, 1.0)
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
                    self.cfg.metrics.stale_after_s, now)
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
        self.hub.wake()
        self.worker.join(timeout=10)
        if self.worker.alive():
            log.error("inference did not drain within 10 s; %d frames classified", self.worker.frames_done)
        self.control.stop_shadow(final_report=True)  # its last window goes out with the drain below
        if self.capture is not None:
            self.capture.stop(timeout=3.0)
        self.mqtt.stop(drain_timeout_s=5.0)
        self.spool.close()
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

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        # `kill -USR1` (systemctl kill -s USR1 visiond) writes every thread's stack to stderr
        # and the daemon goes on: what an operator needs when a stage looks stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    # ---- callbacks and health -------------------------------------------
    def _on_command(self, verb: str, payload: bytes) -> None:
        """MQTT thread; `control` is built before that thread starts."""
        self.control.command(verb, payload)

    def _camera_status(self, camera: str, online: bool, reason: str) -> None:
        self.mqtt.set_camera_status(camera, online, redact_url(reason))  # the source already logged it

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        stale = self.cfg.metrics.stale_after_s
        cams = {}
        for cam in self.cfg.cameras:
            last = self.worker.last_frame.get(cam.name)
            age = None if last is None else round(now - last, 3)
            cams[cam.name] = {"ok": age is not None and age <= stale, "last_frame_age_s": age}
        broker = self.mqtt.connected
        ok = broker and all(c["ok"] for c in cams.values())
        return ok, {"mqtt_connected": broker, "cameras": cams, "inference_alive": self.worker.alive()}
