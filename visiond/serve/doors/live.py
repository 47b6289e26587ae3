"""The live operator page: what an operator at the line looks at instead of reading payloads.

`LiveState` is fed by the daemon: as a worker sink it keeps each stream camera's latest
verdict per ROI (a tuple per ROI, under one lock per batch: it runs on the inference
thread), and as an inspection listener it counts each station's verdicts of the UTC day
and keeps the last NG/ERROR parts with their evidence. `routes(ctx)` serves the page (three
plain files, no CDN, no inline script or style so a strict CSP holds), its JSON, the
newest frame of each camera as a downscaled JPEG (encoded on request in a worker thread,
once per frame and width however many tiles poll), evidence images and stored verdicts.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import re
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import cv2
import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from visiond.frames import Prediction
from visiond.timefmt import rfc3339

log = logging.getLogger(__name__)

STRIP_SIZE = 20  # NG/ERROR parts kept for the page's strip
MAX_WIDTH = 640  # the widest frame the page gets
MIN_WIDTH = 32
JPEG_QUALITY = 70
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_STATIC = {"live.js": "text/javascript; charset=utf-8", "live.css": "text/css; charset=utf-8"}
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NO_STORE = {"Cache-Control": "no-store"}


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


def _day_start(ts: float) -> float:
    return float(int(ts // 86400) * 86400)


class _Station:
    """One station's day: counts, the last verdict, the recipe and models that made it."""

    __slots__ = ("day", "counts", "last", "recipe", "models")

    def __init__(self, day: str):
        self.day = day
        self.counts = {"OK": 0, "NG": 0, "ERROR": 0}
        self.last: dict | None = None
        self.recipe: str | None = None
        self.models: dict = {}

    def view(self, today: str) -> dict:
        counts = self.counts if self.day == today else {"OK": 0, "NG": 0, "ERROR": 0}
        total = sum(counts.values())
        return {"ok": counts["OK"], "ng": counts["NG"], "error": counts["ERROR"], "total": total,
                "yield": counts["OK"] / total if total else None, "last": self.last, "recipe": self.recipe,
                "models": self.models}


def _thumbnail(evidence: list | None, rois: list) -> str | None:
    """The evidence image that shows the part best: the annotated frame where a ROI first saw a defect."""
    if not evidence:
        return None
    k = next((i for r in rois for i, f in enumerate(r.get("frames") or ()) if f.get("defect")), 0)
    for suffix in (f"_f{k}_annotated.jpg", "_annotated.jpg", f"_f{k}.jpg"):
        hit = next((p for p in evidence if p.endswith(suffix)), None)
        if hit is not None:
            return hit
    return evidence[0]


def _strip_item(doc: dict, payload: dict | None) -> dict:
    return {"job_id": doc["job_id"], "camera": doc["camera"], "part_id": doc.get("part_id"),
            "verdict": doc["verdict"], "reason": doc.get("reason"), "recipe": doc.get("recipe"),
            "decided_at": doc.get("decided_at"), "evidence": doc.get("evidence") or [],
            "thumbnail": _thumbnail(doc.get("evidence"), doc.get("rois") or []), "payload": payload}


class LiveState:
    """What the page shows of the daemon's verdicts; every method may be called from any thread.

    `submit` is a worker `Sink`; `verdict` an `InspectionService.on_verdict` listener. With
    `store`, today's counts and the last NG/ERROR parts are read from it once, so a restart
    does not zero the operator's day: build it before the stations start.
    """

    def __init__(self, store: Any = None, *, keep: int = STRIP_SIZE, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._rois: dict[tuple[str, str], tuple[str | None, float | None, bool, float]] = {}
        self._stations: dict[str, _Station] = {}
        self._strip: collections.deque[dict] = collections.deque(maxlen=keep)
        if store is not None:
            self._seed(store)

    def _seed(self, store: Any) -> None:
        now = self._clock()
        today = _day(now)
        try:
            for row in store.summary(since=_day_start(now)):
                st = self._stations.setdefault(row["camera"], _Station(today))
                st.counts["OK"] += row["ok"]
                st.counts["NG"] += row["ng"]
                st.counts["ERROR"] += row["error"]
            rows = store.query(verdict="NG", limit=self._strip.maxlen) + store.query(verdict="ERROR",
                                                                                      limit=self._strip.maxlen)
        except Exception as exc:  # the page starts empty rather than the daemon not at all
            log.error("operator page: cannot read today's verdicts from the results store (%s)", exc)
            return
        for row in sorted(rows, key=lambda r: r["decided_at"])[-self._strip.maxlen:]:
            self._strip.appendleft(_strip_item({**row, "decided_at": rfc3339(row["decided_at"])}, None))

    # ---- feeding (daemon threads) -----------------------------------------------------
    def submit(self, predictions: Sequence[Prediction]) -> None:
        """Inference thread: the latest label/score/defect per camera and ROI (references only, no copies)."""
        with self._lock:
            rois = self._rois
            for p in predictions:
                rois[(p.frame.camera, p.roi)] = (p.label, p.score, p.defect, p.frame.captured_at)

    def verdict(self, camera: str, payload: bytes) -> None:
        """A station's stored verdict (any door's): counts of the UTC day, last verdict, strip of NG/ERROR parts."""
        doc = json.loads(payload)
        now = self._clock()
        today = _day(now)
        item = _strip_item(doc, doc) if doc["verdict"] != "OK" else None
        with self._lock:
            st = self._stations.get(camera)
            if st is None or st.day != today:
                st = self._stations[camera] = _Station(today)
            st.counts[doc["verdict"]] = st.counts.get(doc["verdict"], 0) + 1
            st.last = {"verdict": doc["verdict"], "part_id": doc.get("part_id"), "job_id": doc.get("job_id"),
                       "reason": doc.get("reason"), "decided_at": doc.get("decided_at")}
            st.recipe = doc.get("recipe")
            st.models = doc.get("models") or st.models
            seen = set()
            for r in doc.get("rois") or ():
                seen.add(r["name"])
                self._rois[(camera, r["name"])] = (r["label"], r["score"], bool(r["defect"]), now)
            if doc["verdict"] == "ERROR":  # no ROI was judged: the boxes turn grey, not the last part's colours
                for key in [k for k in self._rois if k[0] == camera and k[1] not in seen]:
                    del self._rois[key]
            if item is not None:
                self._strip.appendleft(item)

    # ---- reading (web thread) -----------------------------------------------------------
    def roi(self, camera: str, name: str) -> tuple[str | None, float | None, bool, float] | None:
        """(label, score, defect, at) of the ROI's latest verdict, or None before any."""
        return self._rois.get((camera, name))

    def station(self, camera: str) -> dict:
        today = _day(self._clock())
        with self._lock:
            st = self._stations.get(camera)
            return (st or _Station(today)).view(today)

    def strip(self) -> list[dict]:
        """The last NG/ERROR parts, newest first (without their payloads)."""
        with self._lock:
            return [{k: v for k, v in item.items() if k != "payload"} for item in self._strip]

    def payload(self, job_id: str) -> dict | None:
        """A strip part's verdict as published (for a verdict the store could not keep)."""
        with self._lock:
            return next((i["payload"] for i in self._strip if i["job_id"] == job_id), None)


class FrameEncoder:
    """Newest frame -> downscaled JPEG, cached per camera and width so several tiles share one encoding."""

    def __init__(self, quality: int = JPEG_QUALITY):
        self._params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self._cache: dict[tuple[str, int], tuple[tuple[int, float], bytes]] = {}
        self._locks: dict[tuple[str, int], anyio.Lock] = {}

    def encode(self, image: np.ndarray, width: int) -> bytes:
        h, w = image.shape[:2]
        if w > width:
            image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", image, self._params)
        if not ok:
            raise ValueError(f"JPEG encoding failed for a {image.dtype} {image.shape} frame")
        return buf.tobytes()

    async def jpeg(self, camera: str, frame, width: int) -> bytes:
        key, ident = (camera, width), (frame.index, frame.captured_mono)
        lock = self._locks.get(key) or self._locks.setdefault(key, anyio.Lock())
        async with lock:  # a second tile asking for the same frame waits for the first one's bytes
            hit = self._cache.get(key)
            if hit is not None and hit[0] == ident:
                return hit[1]
            data = await anyio.to_thread.run_sync(self.encode, frame.image, width)
            self._cache[key] = (ident, data)
            return data


def _width(request: Request) -> int:
    raw = request.query_params.get("w")
    if raw is None:
        return MAX_WIDTH
    try:
        w = int(raw)
    except ValueError:
        raise ValueError(f"w: expected a width in pixels, got {raw[:20]!r}") from None
    return max(MIN_WIDTH, min(MAX_WIDTH, -(-w // 16) * 16))  # steps of 16 px: a few cache entries, not hundreds


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE)


def _static_bytes(name: str) -> bytes:
    return resources.files("visiond.serve.doors").joinpath("static", name).read_bytes()


class LivePage:
    """The handlers of the operator page over one `WebContext`."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.live: LiveState = ctx.live if ctx.live is not None else LiveState()
        self.frames = FrameEncoder()
        self.static = {name: _static_bytes(name) for name in (*_STATIC, "index.html")}
        self.cameras = list(ctx.cfg.cameras)
        self.stale_s = ctx.cfg.web.stale_after_s

    async def index(self, request: Request) -> Response:
        return Response(self.static["index.html"], media_type="text/html; charset=utf-8",
                        headers={**_NO_STORE, "Content-Security-Policy": PAGE_CSP})

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return _error(404, "not found")
        return Response(self.static[name], media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    async def api_live(self, request: Request) -> Response:
        ok, health = self.ctx.health()
        now = time.time()
        serving = self.ctx.slot.active
        cameras = []
        for cam in self.cameras:
            src = self.ctx.sources.get(cam.name)
            frame = src.latest if src is not None else None
            cameras.append({
                "name": cam.name, "mode": cam.mode,
                "frame": None if frame is None else {
                    "width": int(frame.image.shape[1]), "height": int(frame.image.shape[0]), "index": frame.index,
                    "age_s": round(max(0.0, now - frame.captured_at), 3)},
                "rois": [self._roi(cam, plan, now) for plan in serving.plans(cam.name)],
                "models": {p.name: {"name": m.name, "version": m.version}
                           for p in serving.plans(cam.name) for m in [serving.model_ref(p.model)]},
                "station": self._station(cam.name) if cam.mode == "triggered" else None,
            })
        strip = self.live.strip()
        await anyio.to_thread.run_sync(self._mark_written, strip)
        return JSONResponse({"node": self.ctx.cfg.node, "now": now, "recipe": serving.recipe,
                             "health": {"ok": ok, **health}, "cameras": cameras, "strip": strip},
                            headers=_NO_STORE)

    def _mark_written(self, strip: list[dict]) -> None:
        """Whether each thumbnail is on disk yet (the evidence writer saves it a moment after the verdict)."""
        root = self.ctx.evidence_dir
        for item in strip:
            item["thumbnail_ready"] = bool(root is not None and item["thumbnail"]
                                           and (Path(root) / item["thumbnail"]).is_file())

    def _roi(self, cam, plan, now: float) -> dict:
        got = self.live.roi(cam.name, plan.name)
        out = {"name": plan.name, "rect": list(plan.rect) if plan.rect else None, "label": None, "score": None,
               "state": "unknown", "age_s": None}
        if got is not None:
            label, score, defect, at = got
            age = max(0.0, now - at)
            stale = cam.mode == "stream" and age > self.stale_s  # a part's verdict stands until the next part
            out.update(label=label, score=None if score is None else round(float(score), 4), age_s=round(age, 3),
                       state="unknown" if stale else ("defect" if defect else "ok"))
        return out

    def _station(self, camera: str) -> dict:
        out = self.live.station(camera)
        inspection = self.ctx.inspection
        out["state"] = inspection.state(camera) if inspection is not None else "error"
        return out

    async def frame(self, request: Request) -> Response:
        camera = request.path_params["camera"]
        src = self.ctx.sources.get(camera)
        if src is None:
            return _error(404, f"no camera {camera[:64]!r}")
        try:
            width = _width(request)
        except ValueError as exc:
            return _error(400, str(exc))
        frame = src.latest
        if frame is None:
            return _error(503, f"camera {camera}: no frame yet")
        if request.query_params.get("since") == str(frame.index):
            return Response(status_code=204, headers={**_NO_STORE, "X-Frame-Index": str(frame.index)})
        data = await self.frames.jpeg(camera, frame, width)
        return Response(data, media_type="image/jpeg", headers={**_NO_STORE, "X-Frame-Index": str(frame.index)})

    async def evidence(self, request: Request) -> Response:
        root = self.ctx.evidence_dir
        rel = request.path_params["path"]
        if root is None or not rel.endswith(".jpg"):
            return _error(404, "no such evidence image")
        try:
            base = Path(root).resolve()
            real = (base / rel).resolve(strict=True)
            if not real.is_relative_to(base) or not real.is_file():
                raise FileNotFoundError(rel)
        except (OSError, ValueError, RuntimeError):  # missing, outside the evidence dir, a NUL byte, a symlink loop
            return _error(404, "no such evidence image")
        return FileResponse(real, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def result(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not _JOB_ID.match(job_id):
            return _error(404, "no such verdict")
        row = None
        if self.ctx.store is not None:
            row = await anyio.to_thread.run_sync(self.ctx.store.get, job_id)
        payload = row["payload"] if row is not None else self.live.payload(job_id)
        if payload is None:
            return _error(404, f"no verdict for job {job_id}")
        return JSONResponse(payload, headers=_NO_STORE)


def routes(ctx) -> list[BaseRoute]:
    """The operator page's routes over `ctx` (a `WebContext`), for the daemon's web front to include."""
    page = LivePage(ctx)
    return [
        Route("/", page.index, methods=["GET", "HEAD"]),
        Route("/static/{name}", page.static_file, methods=["GET", "HEAD"]),
        Route("/favicon.ico", page.favicon, methods=["GET", "HEAD"]),
        Route("/api/live", page.api_live, methods=["GET"]),
        Route("/api/frame/{camera}.jpg", page.frame, methods=["GET"]),
        Route("/api/evidence/{path:path}", page.evidence, methods=["GET"]),
        Route("/api/result/{job_id}", page.result, methods=["GET"]),
    ]
