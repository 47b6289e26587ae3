"""`visiond run`: wires sources, the inference worker and the sinks, and owns the lifecycle.

Start order: metrics, MQTT (never waits for the broker), model, worker, sources.
Stop (SIGTERM and SIGINT alike): stop sources -> drain queued frames through the
model -> publish them -> retained `offline` -> exit 0. A stage thread that dies
takes the daemon down with exit code 1 rather than leaving it half-alive.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from visiond.config import CameraConfig, Config
from visiond.logs import redact_url
from visiond.serve.decide import Decider
from visiond.errors import UserError
from visiond.serve import liveness
from visiond.serve.metrics import Metrics, MetricsServer
from visiond.models.checkpoint import CheckpointError, load_checkpoint
from visiond.models.runtime import Classifier, make_classifier
from visiond.serve.notify import sd_notify, watchdog_interval_s
from visiond.serve.worker import InferenceWorker, ModelSlot
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.sinks.capture import CaptureSink
from visiond.serve.sinks.jsonl import JsonlSink
from visiond.serve.sinks.shadow import ShadowRunner, ShadowSink
from visiond.serve.sinks.mqtt import MqttSink
from visiond.serve.sources import FrameSource
from visiond.video import default_policy
from visiond.serve.sinks.spool import Spool

log = logging.getLogger(__name__)

_MAX_CMD_BYTES = 64 * 1024
_STATUS_EVERY_S = 5.0  # STATUS= for `systemctl status`, also without a watchdog


def _similar(a: float, b: float, factor: float = 1.25) -> bool:
    return max(a, b) / min(a, b) <= factor


def effective_policy(cam: CameraConfig) -> str:
    """Files and folders must not lose frames; live cameras keep only the newest."""
    return cam.policy or default_policy(cam.source)


def load_model(cfg: Config) -> tuple[Classifier, Decider]:
    """Load, check against the config, and warm a checkpoint; raises CheckpointError/UserError."""
    ckpt = load_checkpoint(cfg.model.checkpoint)
    decider = Decider(ckpt.classes, cfg.decide, ckpt.thresholds)
    clf = classifier_for(cfg, ckpt)
    clf.warmup(cfg.model.max_batch)
    return clf, decider


def classifier_for(cfg: Config, ckpt) -> Classifier:
    """The configured runtime for a loaded checkpoint (served or shadow)."""
    return make_classifier(ckpt, runtime=cfg.model.runtime, device=cfg.model.device, precision=cfg.model.precision,
                           threads=cfg.model.threads, cache_dir=Path(cfg.spool.dir) / "models")


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_event = threading.Event()
        self._signalled: str | None = None  # set by the SIGTERM/SIGINT handler, acted on by _supervise
        self._hup = False  # set by the SIGHUP handler
        self.metrics = Metrics()
        self._reload_lock = threading.Lock()
        self._exit_code = 0
        self._ckpt_stat = self._stat(cfg.model.checkpoint)
        clf, decider = load_model(cfg)  # fail before anything is started
        self.slot = ModelSlot(clf, decider)
        self.slot.on_switch = self._model_switched
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
        self._shadow_lock = threading.Lock()
        sinks.append(self.shadow)
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
        self.mqtt.set_detail({"model": self._model_detail(self.slot.current()[0]), "cameras": [c.name for c in self.cfg.cameras],
                              "pid": os.getpid()})
        if self.capture is not None:
            self.capture.start()
        if self.cfg.model.shadow is not None:
            self.set_shadow(self.cfg.model.shadow, "model.shadow")
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
                threading.Thread(target=self.reload, args=("SIGHUP",), name="reload", daemon=True).start()
            dead = liveness.dead_stage(self.worker, self.mqtt, self.sources)
            if dead is not None:
                self._fail(dead)
                return
            if not self.worker.alive():
                log.info("all sources finished; stopping")
                self.stop_event.set()
                return
            self._watch_checkpoint()
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
        self._stop_shadow(final_report=True)  # its last window goes out with the drain below
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

    # ---- status and health ----------------------------------------------
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

    @staticmethod
    def _model_detail(clf) -> dict:
        return {"name": clf.name, "version": clf.version, "arch": clf.arch, "device": clf.device,
                "runtime": clf.runtime, "classes": list(clf.classes)}

    # ---- hot reload --------------------------------------------------------
    @staticmethod
    def _stat(path: Path):
        try:
            st = os.stat(path)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _watch_checkpoint(self) -> None:
        st = self._stat(self.cfg.model.checkpoint)
        if st is not None and st != self._ckpt_stat:
            self._ckpt_stat = st
            threading.Thread(target=self.reload, args=("file change",), daemon=True).start()

    def reload(self, why: str = "request") -> bool:
        """Load and warm the checkpoint beside the serving model; switch between two batches."""
        with self._reload_lock:
            log.info("reloading model (%s)", why)
            try:
                clf, decider = load_model(self.cfg)
                self._check_fit(clf)
            except (CheckpointError, UserError, ValueError, RuntimeError, OSError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                self.metrics.model_reload_failures.inc()
                log.error("reload refused, old model keeps serving: %s", msg)
                now = time.time()
                self.mqtt.set_detail({"last_error": f"reload refused: {msg}", "last_error_at": now,
                                      "last_reload": {"result": "refused", "why": msg, "at": now}})
                return False
            log.info("model %s %s loaded and warmed; it takes over at the next batch", clf.name, clf.version)
            self.slot.stage(clf, decider)
            return True

    def _check_fit(self, clf) -> None:
        """Refuse a checkpoint the running config cannot serve (the Decider has checked the classes)."""
        old = self.slot.active[0]
        spec = clf.spec
        if spec.channels != old.spec.channels:
            raise UserError(f"new model wants {spec.channels} colour channel(s), the serving one {old.spec.channels}")
        aspect = spec.width / spec.height
        if not _similar(aspect, old.spec.width / old.spec.height):
            for cam in self.cfg.cameras:
                if cam.roi is not None and not _similar(aspect, cam.roi[2] / cam.roi[3]):
                    raise UserError(
                        f"new model's input {spec.width}x{spec.height} does not fit camera {cam.name}'s roi "
                        f"{cam.roi[2]}x{cam.roi[3]} (aspect {aspect:.2f} vs {cam.roi[2] / cam.roi[3]:.2f}); "
                        f"the serving model takes {old.spec.width}x{old.spec.height}")
        probs = clf.predict(np.zeros((1, spec.height, spec.width, spec.channels), np.uint8))
        if probs.shape != (1, len(clf.classes)):
            raise UserError(f"new model gives {probs.shape[-1]} scores for its {len(clf.classes)} classes")

    def _model_switched(self, clf) -> None:
        self.metrics.set_model(clf.name, clf.version, clf.arch)
        now = time.time()
        self.mqtt.set_detail({"model": self._model_detail(clf), "last_reload_at": now,
                              "last_reload": {"result": "switched", "version": clf.version, "at": now}})

    # ---- commands ------------------------------------------------------------
    def _on_command(self, verb: str, payload: bytes) -> None:
        if len(payload) > _MAX_CMD_BYTES:
            self._cmd_error(verb, f"payload of {len(payload)} bytes exceeds {_MAX_CMD_BYTES}")
            return
        try:
            body = json.loads(payload) if payload.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            self._cmd_error(verb, f"payload is not JSON ({exc.__class__.__name__}); expected a JSON object")
            return
        except RecursionError:
            self._cmd_error(verb, "payload is JSON nested too deeply; expected a flat JSON object")
            return
        if not isinstance(body, dict):
            self._cmd_error(verb, f"payload is {type(body).__name__}; expected a JSON object")
            return
        if verb == "reload":
            threading.Thread(target=self.reload, args=("cmd/reload",), daemon=True).start()
        elif verb == "capture":
            self._cmd_capture(body)
        elif verb == "shadow":
            self._cmd_shadow(body)
        else:
            self._cmd_error(verb, "unknown command; expected one of: reload, capture, shadow")

    def _cmd_capture(self, body: dict) -> None:
        """{"camera": name (default: every capturing camera), "count": n (default 1)}."""
        if self.capture is None:
            self._cmd_error("capture", "capture is not configured (set capture.dataset)")
            return
        camera = body.get("camera")
        if camera is not None and not isinstance(camera, str):
            self._cmd_error("capture", f"camera {str(camera)[:64]!r}: expected a camera name or null")
            return
        try:
            self.capture.request(camera, body.get("count", 1))
        except UserError as exc:
            self._cmd_error("capture", str(exc))

    def _cmd_shadow(self, body: dict) -> None:
        """{"checkpoint": path} runs a candidate in shadow mode; {"checkpoint": null} stops it.

        Only checkpoints in the served checkpoint's directory (or model.shadow) are accepted:
        a command must not make the daemon read arbitrary files.
        """
        path = body.get("checkpoint")
        if path is None:
            threading.Thread(target=self._stop_shadow, kwargs={"final_report": True}, daemon=True).start()
            self.mqtt.set_detail({"shadow": None})
            return
        if not isinstance(path, str) or not path.strip():
            self._cmd_error("shadow", f"checkpoint {str(path)[:64]!r}: expected a checkpoint path or null")
            return
        allowed = {self.cfg.model.checkpoint.resolve().parent}
        if self.cfg.model.shadow is not None:
            allowed.add(self.cfg.model.shadow.resolve().parent)
        target = Path(path)
        if not target.is_absolute():
            target = self.cfg.model.checkpoint.resolve().parent / target
        target = target.resolve()
        if target.parent not in allowed:
            self._cmd_error("shadow", f"checkpoint must be in {', '.join(sorted(map(str, allowed)))}")
            return
        threading.Thread(target=self.set_shadow, args=(target, "cmd/shadow"), daemon=True).start()

    # ---- shadow mode -----------------------------------------------------------
    def set_shadow(self, path: Path, why: str) -> bool:
        """Load and warm a candidate, then run it beside the served model (replacing any other)."""
        with self._shadow_lock:
            try:
                ckpt = load_checkpoint(path)
                clf = classifier_for(self.cfg, ckpt)
                clf.warmup(self.cfg.model.max_batch)
            except (CheckpointError, UserError, ValueError, RuntimeError, OSError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                log.error("shadow candidate refused (%s): %s", why, msg)
                self.mqtt.set_detail({"last_error": f"shadow refused: {msg}", "last_error_at": time.time()})
                return False
            runner = ShadowRunner(clf, self.mqtt.submit_shadow, self.metrics, self.cfg.model.shadow_interval_s)
            runner.start()
            old = self.shadow.replace(runner)
            if old is not None:
                old.stop(final_report=True)
            self.mqtt.set_detail({"shadow": {"name": clf.name, "version": clf.version, "path": str(path),
                                             "interval_s": self.cfg.model.shadow_interval_s}})
            return True

    def _stop_shadow(self, final_report: bool = True) -> None:
        with self._shadow_lock:
            old = self.shadow.replace(None)
            if old is not None:
                old.stop(final_report=final_report)

    def _cmd_error(self, verb: str, why: str) -> None:
        shown = "".join(c if c.isprintable() else "?" for c in verb[:64])  # a topic may carry a newline
        msg = f"cmd/{shown}: {why}"
        log.error("%s", msg)
        self.mqtt.set_detail({"last_error": msg, "last_error_at": time.time()})
