"""What an operator changes in a running daemon: the served model, a shadow candidate, captures on request.

Hot reload loads and warms a checkpoint beside the serving model and hands it to the
`ModelSlot`, which switches between two batches; a checkpoint the running config cannot
serve is refused and the old model keeps serving. Commands arrive on `cmd/<verb>` as
JSON objects; a bad one is reported in `status/detail` and never stops the daemon.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from visiond.config import Config
from visiond.errors import UserError
from visiond.models.checkpoint import CheckpointError, load_checkpoint
from visiond.models.runtime import Classifier, make_classifier, warm_up
from visiond.serve.inspect.service import trigger_from
from visiond.serve.metrics import Metrics
from visiond.serve.serving import ServingSet, SetBuilder
from visiond.serve.sinks.capture import CaptureSink
from visiond.serve.sinks.mqtt import MqttSink, Request
from visiond.serve.sinks.shadow import ShadowRunner, ShadowSink
from visiond.serve.worker import ModelSlot

log = logging.getLogger(__name__)

_NO_ERROR = {"last_error": None, "last_error_at": None}  # a later success supersedes the last error
_REFUSED = (CheckpointError, UserError, ValueError, RuntimeError, OSError)  # a candidate that cannot serve


class ModelLoader:
    """Loads, checks and warms the checkpoints a serving set needs; an unchanged file is not loaded twice.

    A file is known by its `file_identity`, so a checkpoint replaced on disk is loaded again
    (hot reload) while a recipe switching back to models it used before gets them warm.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.builder = SetBuilder(cfg)
        self._cache: dict[str, tuple] = {}  # resolved path -> (identity, classifier, thresholds, warmed batch)
        self._lock = threading.Lock()

    def load(self, path: Path) -> tuple[Classifier, dict, int]:
        """(classifier, checkpoint thresholds, the batch size it was warmed for: `model.max_batch`, auto timed)."""
        key = str(Path(path).resolve())
        ident = file_identity(Path(path))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] == ident and ident is not None:
            return hit[1], hit[2], hit[3]
        ckpt = load_checkpoint(path)
        clf = classifier_for(self.cfg, ckpt)
        batch = warm_up(clf, self.cfg.model.max_batch, warmup_shapes(self.cfg))
        with self._lock:
            self._cache[key] = (ident, clf, dict(ckpt.thresholds or {}), batch)
        return clf, dict(ckpt.thresholds or {}), batch

    def build(self, recipe: str | None) -> ServingSet:
        """Every model of the recipe (None: the config's own) loaded and warmed, ROIs and rules checked; the
        set's batch limit is the smallest its models were warmed for (one batch goes through each of them)."""
        models, thresholds, batches = {}, {}, []
        for key, (path, _named) in self.builder.checkpoints(recipe).items():
            models[key], thresholds[key], batch = self.load(path)
            batches.append(batch)
        return dataclasses.replace(self.builder.build(recipe, models, thresholds), max_batch=min(batches))

    def retain(self, *sets: ServingSet) -> None:
        """Forget models no set in `sets` uses (their memory goes with the last batch that used them)."""
        keep = {str(Path(p).resolve()) for st in sets if st is not None for p in st.paths.values()}
        with self._lock:
            for key in [k for k in self._cache if k not in keep]:
                del self._cache[key]


_TYPICAL_FRAME = (1080, 1920, 3)  # a stream's size is known only once it streams: warm up for 1080p


def warmup_shapes(cfg: Config) -> list[tuple[int, int, int]]:
    """The frame sizes the model will get: each ROI's size, else a video file's frame size, else 1080p."""
    shapes = []
    for cam in cfg.cameras:
        rects = [r.rect for r in cam.rois] if cam.rois else [cam.roi] if cam.roi else []
        shapes += [(h, w, 3) for _x, _y, w, h in rects] or [_probe_frame(cam.source)]
    return list(dict.fromkeys(shapes))


def _probe_frame(source: str) -> tuple[int, int, int]:
    from visiond.video import source_kind

    if source_kind(source) == "file":
        import cv2

        cap = cv2.VideoCapture(str(source))
        try:
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        finally:
            cap.release()
        if w > 0 and h > 0:
            return (h, w, 3)
    return _TYPICAL_FRAME


def classifier_for(cfg: Config, ckpt) -> Classifier:
    """The configured runtime for a loaded checkpoint (served or shadow), behind model.tta's views if set."""
    m = cfg.model
    clf = make_classifier(ckpt, runtime=m.runtime, device=m.device, precision=m.precision, threads=m.threads,
                          cache_dir=Path(cfg.spool.dir) / "models", url=m.url, remote_model=m.remote_model,
                          remote_timeout_s=m.remote_timeout_s,
                          remote_token=m.remote_token.get_secret_value() if m.remote_token else None,
                          resize_on=m.resize_on)
    if m.tta == "none":
        return clf
    from visiond.data.augment import PRESETS  # calib: test-time augmentation (issue 14), views in one batch
    from visiond.models.tta import with_tta

    return with_tta(clf, m.tta, ckpt, PRESETS)


def serving_detail(serving: ServingSet, cfg: Config) -> dict:
    """The served set as `status/detail` shows it: default model, recipe, every model and each camera's ROIs."""
    return {"model": model_detail(serving.classifier), "recipe": serving.recipe, "recipes": sorted(cfg.recipes),
            "models": serving.versions(), "max_batch": serving.max_batch,
            "rois": {cam.name: [{"name": p.name, "rect": list(p.rect) if p.rect else None, "model": p.model}
                                for p in serving.plans(cam.name)] for cam in cfg.cameras}}


def model_detail(clf) -> dict:
    """The served model as `status/detail` shows it."""
    return {"name": clf.name, "version": clf.version, "arch": clf.arch, "device": clf.device,
            "runtime": clf.runtime, "classes": list(clf.classes), "tta": getattr(clf, "tta", "none")}


def file_identity(path: Path):
    """Inode, mtime and size: a replaced or rewritten checkpoint changes it; None while the file is missing."""
    try:
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _similar(a: float, b: float, factor: float = 1.25) -> bool:
    return max(a, b) / min(a, b) <= factor


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


class Control:
    """Hot reload, shadow mode and the MQTT commands, on the daemon's ready collaborators.

    `checkpoint_seen` is the checkpoint's `file_identity` from before the first load, so a
    file replaced while the daemon started is still noticed.
    """

    def __init__(self, cfg: Config, metrics: Metrics, slot: ModelSlot, mqtt: MqttSink, shadow: ShadowSink,
                 capture: CaptureSink | None, checkpoint_seen, loader: ModelLoader | None = None):
        self.cfg = cfg
        self.loader = loader or ModelLoader(cfg)
        self.inspection = None  # the InspectionService, when the config has triggered cameras (set by the daemon)
        self._recipe_job: _RecipeJob | None = None
        self.metrics = metrics
        self.slot = slot
        self.mqtt = mqtt
        self.shadow = shadow
        self.capture = capture
        self._checkpoint_seen = checkpoint_seen
        self._reload_lock = threading.Lock()
        self._recipe_lock = threading.Lock()
        self._shadow_lock = threading.Lock()

    # ---- hot reload --------------------------------------------------------
    def watch_checkpoint(self) -> None:
        """Supervise loop: a changed checkpoint file is reloaded on its own thread."""
        seen = file_identity(self.cfg.model.checkpoint)
        if seen is not None and seen != self._checkpoint_seen:
            self._checkpoint_seen = seen
            threading.Thread(target=self.reload, args=("file change",), daemon=True).start()

    def reload(self, why: str = "request") -> bool:
        """Load and warm the served set's changed checkpoints beside it; switch between two batches."""
        with self._reload_lock:
            log.info("reloading model (%s)", why)
            try:
                serving = self.loader.build(self.slot.active.recipe)
                self._check_fit(serving.classifier)
            except _REFUSED as exc:
                msg = _first_line(exc)
                self.metrics.model_reload_failures.inc()
                log.error("reload refused, old model keeps serving: %s", msg)
                now = time.time()
                self._error(f"reload refused: {msg}", now, last_reload={"result": "refused", "why": msg, "at": now})
                return False
            clf = serving.classifier
            log.info("model %s %s loaded and warmed; it takes over at the next batch", clf.name, clf.version)
            self.slot.stage(serving)
            return True

    # ---- recipes (product changeover) ----------------------------------------------
    def switch_recipe(self, name: str, timeout: float) -> ServingSet:
        """Serve recipe `name` (its models loaded and warmed beside the serving ones, switched between two
        batches); returns the set once it serves. Raises UserError (unknown, refused: the old one keeps
        serving) or TimeoutError (still loading: the switch goes on, the caller stops waiting)."""
        if name not in self.cfg.recipes:
            raise UserError(f"recipe {name!r} is not configured (expected one of: "
                            f"{', '.join(sorted(self.cfg.recipes)) or 'none'})")
        with self._recipe_lock:  # not the reload lock: a trigger must not wait behind a long load to give up
            active = self.slot.active
            if active.recipe == name and self.slot.staged is None:
                return active
            job = self._recipe_job
            if job is None or job.name != name or job.done.is_set():
                job = self._recipe_job = _RecipeJob(name)
                threading.Thread(target=self._run_recipe_job, args=(job,), name=f"recipe-{name}",
                                 daemon=True).start()
        if not job.done.wait(max(0.0, timeout)):
            raise TimeoutError(f"recipe {name!r} is still loading")
        if job.error is not None:
            raise UserError(job.error)
        if not self.slot.wait_switched(job.serving, max(0.0, timeout)):
            raise TimeoutError(f"recipe {name!r} is loaded but not yet serving")
        return job.serving

    def _run_recipe_job(self, job: _RecipeJob) -> None:
        try:
            with self._reload_lock:
                serving = self.loader.build(job.name)
                self.slot.stage(serving)
            job.serving = serving
            log.info("recipe %s loaded and warmed; it takes over at the next batch", job.name)
        except _REFUSED as exc:
            job.error = f"recipe {job.name!r} refused, {self.slot.active.recipe or 'the config'} keeps serving: " \
                        f"{_first_line(exc)}"
            log.error("%s", job.error)
            self._error(job.error)
        finally:
            job.done.set()

    def _check_fit(self, clf) -> None:
        """Refuse a checkpoint the running config cannot serve (the Decider has checked the classes)."""
        old = self.slot.active.classifier
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

    def model_switched(self, old: ServingSet, new: ServingSet) -> None:
        """The slot's switch callback (inference thread): metrics, `status/detail` and `recipe` name the new set."""
        clf = new.classifier
        self.metrics.set_model(clf.name, clf.version, clf.arch)
        now = time.time()
        self.mqtt.set_detail({**serving_detail(new, self.cfg), "last_reload_at": now,
                              "last_reload": {"result": "switched", "version": clf.version, "recipe": new.recipe,
                                              "at": now},
                              **_NO_ERROR})
        self.mqtt.set_recipe(new.recipe, new.versions())
        self.loader.retain(old, new, self.slot.staged)
        runner = self.shadow.runner
        if runner is not None and runner.candidate.version == clf.version:
            # the candidate is now the served model: comparing it with itself would only report 1.0
            log.info("shadow candidate %s is now served; shadow mode ends with a final report", clf.version)
            threading.Thread(target=self.stop_shadow, kwargs={"only_version": clf.version}, daemon=True).start()

    # ---- commands ------------------------------------------------------------
    def command(self, verb: str, payload: bytes, request: Request | None = None) -> None:
        """MQTT thread: one `cmd/<verb>`; the sink has already refused an oversized payload.

        A refused command is reported in `status/detail` and, when it carried an MQTT 5 Response
        Topic, answered there (with its Correlation Data) so a waiting PLC hears why at once.
        """
        request = request or Request()
        try:
            body = json.loads(payload) if payload.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            self._cmd_error(verb, f"payload is not JSON ({exc.__class__.__name__}); expected a JSON object", request)
            return
        except RecursionError:
            self._cmd_error(verb, "payload is JSON nested too deeply; expected a flat JSON object", request)
            return
        if not isinstance(body, dict):
            self._cmd_error(verb, f"payload is {type(body).__name__}; expected a JSON object", request)
            return
        if verb == "inspect":
            self._cmd_inspect(body, request)
        elif verb == "recipe":
            self._cmd_recipe(body, request)
        elif verb == "reload":
            threading.Thread(target=self.reload, args=("cmd/reload",), daemon=True).start()
        elif verb == "capture":
            self._cmd_capture(body)
        elif verb == "shadow":
            self._cmd_shadow(body)
        else:
            self._cmd_error(verb, "unknown command; expected one of: inspect, recipe, reload, capture, shadow", request)

    def _cmd_inspect(self, body: dict, request: Request) -> None:
        """{"camera", "part_id", "trigger_id"?, "recipe"?, "frames"?}: one part's verdict, answered on the
        Response Topic (with the Correlation Data) and on `<camera>/inspection`."""
        if self.inspection is None:
            self._cmd_error("inspect", "no camera has mode: triggered; expected a trigger for an inspection station",
                            request)
            return
        problem = request.problem()
        if problem is not None:
            self._cmd_error("inspect", problem, Request())
            return
        try:
            trigger = trigger_from(body, "mqtt", request.correlation, request.response_topic)
            if request.response_topic is not None:
                trigger.reply = lambda payload: self.mqtt.submit_reply(request, payload, trigger.camera)
            self.inspection.trigger(trigger)
        except ValueError as exc:
            self._cmd_error("inspect", str(exc), request)

    def _cmd_recipe(self, body: dict, request: Request) -> None:
        """{"name"}: switch the recipe in service (in the background; refused -> status/detail, reply)."""
        name = body.get("name")
        if not isinstance(name, str) or name not in self.cfg.recipes:
            self._cmd_error("recipe", f"name {str(name)[:64]!r}: expected one of the configured recipes "
                                      f"({', '.join(sorted(self.cfg.recipes)) or 'none configured'})", request)
            return

        def run():
            try:
                serving = self.switch_recipe(name, timeout=600.0)
            except (UserError, TimeoutError) as exc:
                self._reply(request, {"command": "recipe", "ok": False, "error": str(exc)})
                return
            self._reply(request, {"command": "recipe", "ok": True, "recipe": serving.recipe,
                                  "models": serving.versions()})

        threading.Thread(target=run, name="cmd-recipe", daemon=True).start()

    def _reply(self, request: Request, doc: dict) -> None:
        if request.response_topic is not None and request.problem() is None:
            self.mqtt.submit_reply(request, json.dumps(doc, separators=(",", ":")).encode())

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
            threading.Thread(target=self.stop_shadow, daemon=True).start()
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

    def _cmd_error(self, verb: str, why: str, request: Request | None = None) -> None:
        shown = "".join(c if c.isprintable() else "?" for c in verb[:64])  # a topic may carry a newline
        msg = f"cmd/{shown}: {why}"
        log.error("%s", msg)
        self._error(msg)
        if request is not None:
            self._reply(request, {"command": shown, "ok": False, "error": msg})

    def _error(self, msg: str, at: float | None = None, **detail) -> None:
        """`status/detail.last_error` with its time; the next success clears both (see `_NO_ERROR`)."""
        self.mqtt.set_detail({"last_error": msg, "last_error_at": time.time() if at is None else at, **detail})

    # ---- shadow mode -----------------------------------------------------------
    def set_shadow(self, path: Path, why: str) -> bool:
        """Load and warm a candidate, then run it beside the served model (replacing any other)."""
        with self._shadow_lock:
            try:
                ckpt = load_checkpoint(path)
                clf = classifier_for(self.cfg, ckpt)
                warm_up(clf, self.slot.active.max_batch, warmup_shapes(self.cfg))  # no timing beside the served model
            except _REFUSED as exc:
                msg = _first_line(exc)
                log.error("shadow candidate refused (%s): %s", why, msg)
                self._error(f"shadow refused: {msg}")
                return False
            served = self.slot.active.classifier.version
            if ckpt.version == served:
                log.error("shadow candidate refused (%s): it is the served model (version %s)", why, served)
                self._error(f"shadow refused: {path} is the served model (version {served}); "
                            "expected a candidate to compare with it")
                return False
            runner = ShadowRunner(clf, self.mqtt.submit_shadow, self.metrics, self.cfg.model.shadow_interval_s)
            runner.start()
            old = self.shadow.replace(runner)
            if old is not None:
                old.stop(final_report=True)
            self.mqtt.set_detail({"shadow": {"name": clf.name, "version": clf.version, "path": str(path),
                                             "interval_s": self.cfg.model.shadow_interval_s}, **_NO_ERROR})
            return True

    def stop_shadow(self, final_report: bool = True, only_version: str | None = None) -> None:
        """End the candidate's run, if any (with `only_version`: only while that candidate is the one running);
        its last (partial) window is reported when asked, and `status/detail` says shadow is off."""
        with self._shadow_lock:
            runner = self.shadow.runner
            if runner is None or only_version not in (None, runner.candidate.version):
                return
            self.shadow.replace(None)
            runner.stop(final_report=final_report)
        self.mqtt.set_detail({"shadow": None})


class _RecipeJob:
    """One recipe being loaded in the background; triggers that want it wait on `done`."""

    def __init__(self, name: str):
        self.name = name
        self.done = threading.Event()
        self.serving: ServingSet | None = None
        self.error: str | None = None
