"""The daemon's one web front: an ASGI app (Starlette) served by uvicorn on its own thread and event loop.

Routes: `/metrics` and `/healthz` (as the old stdlib server had them), the Open Inference
Protocol v2 (`oip.py`), the integrators' `POST /v1/classify` and `POST /v1/inspect/{camera}`,
and the operator page at `/` (`live.py`). Requests that need the model are handed to the one
inference thread through `oip.ModelGate` (bounded, awaited without blocking the loop).

`Guard`, one pure-ASGI layer around everything, checks each request before any route sees it:
the Host header must name this box (localhost, an IP literal, its host or node name: a
DNS-rebinding page arrives under its own name), the path must not climb out (`..`), the bearer
token (`http.token`, compared in constant time) is required, and the body is limited to
`http.max_body_mb`. /healthz and /metrics are open (no token, any Host): a scraper or a load
balancer asks for them under whatever name it knows the box by, and they change nothing. It adds the security headers to every
answer and counts every request by route template and status (`visiond_http_requests_total`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import weakref

import anyio
import cv2
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from visiond.asgi import AsgiServer, host_allowed, host_name, listen
from visiond.serve.doors import live, oip
from visiond.serve.doors.context import WebContext
from visiond.serve.doors.oip import HttpError, ModelGate, decode_image, model_input
from visiond.serve.inspect.service import trigger_from
from visiond.serve.serving import DEFAULT, FULL

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/metrics"})  # what a scraper and a load balancer reach without the token
# the operator page's own files carry no data; the page asks for the token and sends it on every /api call
PAGE_PATHS = frozenset({"/", "/static/live.js", "/static/live.css", "/favicon.ico"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # the page sets its own (scripts and styles from 'self'); everything else loads nothing at all
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_WILDCARDS = ("0.0.0.0", "::", "")
_COUNTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # registry -> its http requests counter


def requests_counter(metrics) -> Counter:
    """`visiond_http_requests_total{route,code}` on the daemon's registry, created once per registry."""
    own = getattr(metrics, "http_requests", None)  # defined in metrics.py once it lists the family
    if own is not None:
        return own
    counter = _COUNTERS.get(metrics.registry)
    if counter is None:
        counter = _COUNTERS[metrics.registry] = Counter(
            "visiond_http_requests", "HTTP requests by route template and status code (refusals included).",
            ["route", "code"], registry=metrics.registry)
    return counter


# ---------------------------------------------------------------- the checks on every request


def allowed_names(cfg) -> frozenset[str]:
    """Names a request may use for this box besides IP literals: localhost, the bind name, host and node name."""
    names = {"localhost", socket.gethostname().lower(), socket.gethostname().split(".")[0].lower(), cfg.node.lower()}
    bind = cfg.web.bind.lower()
    if bind not in _WILDCARDS:
        names.add(bind)
    return frozenset(n for n in names if n)


def _climbs(path: str) -> bool:
    """A path with `..` or `.` segments, backslashes or NUL: nothing here is named like that."""
    return "\\" in path or "\x00" in path or any(seg in ("..", ".") for seg in path.split("/"))


class _BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """Host, path, token and body-size checks, security headers and request counting, around the whole app."""

    def __init__(self, app, *, routes: list, names: frozenset[str], token: str | None, max_body: int,
                 counter: Counter):
        self.app, self._routes, self._names = app, routes, names
        self._token = token.encode() if token else None
        self._max_body, self._counter = max_body, counter
        self._children: dict[tuple[str, int], object] = {}

    def route_of(self, scope) -> str:
        """The route template a request is for (bounded label values), or `unmatched`."""
        for r in self._routes:
            match, _ = r.matches(scope)
            if match is not Match.NONE:
                return getattr(r, "path", "unmatched")
        return "unmatched"

    def _refusal(self, scope, route: str) -> JSONResponse | None:
        headers = dict((k.lower(), v) for k, v in ((k.decode("latin-1"), v.decode("latin-1"))
                                                     for k, v in scope["headers"]))
        host = headers.get("host")
        if scope["path"] not in OPEN_PATHS and not host_allowed(host, self._names):
            return _error(421, f"Host {host_name(host or '')[:64]!r} is not this box: use its IP address or "
                               "host name (DNS rebinding guard)")
        if _climbs(scope["path"]):
            return _error(404, "not found")
        if self._token is not None and scope["path"] not in OPEN_PATHS and scope["path"] not in PAGE_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <http.token>)",
                              {"WWW-Authenticate": 'Bearer realm="visiond"'})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            return _error(413, f"request body of {int(length)} bytes is over http.max_body_mb "
                               f"({self._max_body} bytes)")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.route_of(scope)
        status = {"code": 0}
        got = {"bytes": 0}

        async def send_headers(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
                message["headers"] = headers.raw
            await send(message)

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                got["bytes"] += len(message.get("body", b""))
                if got["bytes"] > self._max_body:
                    raise _BodyTooLarge
            return message

        try:
            refusal = self._refusal(scope, route)
            if refusal is not None:
                await refusal(scope, receive, send_headers)
                return
            await self.app(scope, receive_limited, send_headers)
        except _BodyTooLarge:
            if status["code"]:
                raise
            await _error(413, f"request body over http.max_body_mb ({self._max_body} bytes)")(
                scope, receive, send_headers)
        finally:
            self._count(route, status["code"] or 500)

    def _count(self, route: str, code: int) -> None:
        key = (route, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(route=route, code=str(code))
        child.inc()


# ---------------------------------------------------------------- routes of this module


def _prediction(verdict, model, roi: str) -> dict:
    """One ROI's verdict in the shape of the MQTT prediction payload's verdict fields."""
    return {"label": verdict.label, "score": round(float(verdict.score), 6),
            "top": [{"label": label, "score": round(float(score), 6)} for label, score in verdict.top],
            "defect": bool(verdict.defect), "model": {"name": model.name, "version": model.version}, "roi": roi}


class WebRoutes:
    """/metrics, /healthz and the integrators' /v1 routes over one `WebContext`."""

    def __init__(self, ctx: WebContext, gate: ModelGate):
        self.ctx, self.gate = ctx, gate
        self.cameras = {c.name: c for c in ctx.cfg.cameras}

    async def metrics(self, request: Request) -> Response:
        return Response(self.ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        ok, detail = self.ctx.health()
        return Response(json.dumps({"ok": ok, **detail}, sort_keys=True), status_code=200 if ok else 503,
                        media_type="application/json")

    async def classify(self, request: Request) -> Response:
        """An image (multipart upload or raw body) -> the verdict; `?camera=` -> one per ROI of that camera."""
        camera = request.query_params.get("camera")
        if camera is not None and camera not in self.cameras:
            raise HttpError(404, f"no camera {camera[:64]!r} (expected one of: {', '.join(self.cameras)})")
        async with self.gate.admit():
            data = await self._image_bytes(request)
            spec = self.ctx.slot.active.classifier.spec
            image = await self.gate.run(self._decode, data, camera is None, spec)
            result = await self.gate.classify(camera, [image])
        serving = result.serving
        if result.errors:
            roi, why = next(iter(result.errors.items()))
            raise HttpError(400, f"camera {camera}: ROI {roi}: {why} (send a full frame of the camera)")
        if camera is None:
            verdict = serving.decider.decide(result.probs[FULL])[0]
            return JSONResponse(_prediction(verdict, serving.model_ref(DEFAULT), FULL))
        out = []
        for plan in serving.plans(camera):
            verdict = plan.decider.decide(result.probs[plan.name])[0]
            out.append(_prediction(verdict, serving.model_ref(plan.model), plan.name))
        return JSONResponse(out)

    @staticmethod
    def _decode(data: bytes, whole: bool, spec):
        if whole:  # the default model on the whole image: resized here, as `visiond predict` does
            return model_input(decode_image(data), spec)
        return decode_image(data, cv2.IMREAD_COLOR)  # a camera frame: ROIs cut from it at full size

    @staticmethod
    async def _image_bytes(request: Request) -> bytes:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=8)
            except HTTPException as exc:
                raise HttpError(400, f"multipart body: {exc.detail}") from None
            upload = next((v for _, v in form.multi_items() if not isinstance(v, str)), None)
            if upload is None:
                raise HttpError(400, "multipart body without a file; expected one image file field")
            data = await upload.read()
            await form.close()
        else:
            data = await request.body()
        if not data:
            raise HttpError(400, "empty body; expected an image (raw body or a multipart file field)")
        return data

    async def inspect(self, request: Request) -> Response:
        """Trigger a station's inspection and answer with its stored verdict (504 past the deadline + 1 s)."""
        camera = request.path_params["camera"]
        service = self.ctx.inspection
        if service is None:
            raise HttpError(404, "no triggered camera here (cameras[].mode: triggered)")
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "body: expected JSON {part_id, trigger_id?, recipe?}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body: expected a JSON object {part_id, trigger_id?, recipe?}")
        if "camera" in body:
            raise HttpError(400, "camera: goes in the path (/v1/inspect/<camera>), not in the body")
        try:
            trigger = trigger_from({**body, "camera": camera}, "http")
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def reply(payload: bytes) -> None:  # the station's thread (or this one's, for a stored answer)
            loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(payload))

        trigger.reply = reply
        try:
            await anyio.to_thread.run_sync(service.trigger, trigger)  # the store is read (and written) there
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        deadline_s = self.cameras[camera].inspect.deadline_ms / 1000.0 + 1.0
        left = trigger.received_mono + deadline_s - time.monotonic()
        try:
            payload = await asyncio.wait_for(answer, max(0.0, left))
        except TimeoutError:
            raise HttpError(504, f"station {camera}: no verdict within its deadline + 1 s ({deadline_s:g} s)") \
                from None
        return Response(payload, media_type="application/json")


async def _http_error(request: Request, exc: HttpError) -> Response:
    return exc.response()


async def _starlette_error(request: Request, exc: HTTPException) -> Response:
    message = "not found" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, message, getattr(exc, "headers", None))


def build_app(ctx: WebContext) -> Starlette:
    """The web front over `ctx`: every route, behind `Guard`."""
    web = ctx.cfg.web
    gate = ModelGate(ctx.hub, web.max_waiting)
    h = WebRoutes(ctx, gate)
    routes = [Route("/metrics", h.metrics, methods=["GET"]),
              Route("/healthz", h.healthz, methods=["GET"]),
              Route("/v1/classify", h.classify, methods=["POST"]),
              Route("/v1/inspect/{camera}", h.inspect, methods=["POST"]),
              *oip.routes(ctx, gate),
              *live.routes(ctx)]
    app = Starlette(routes=routes, exception_handlers={HttpError: _http_error, HTTPException: _starlette_error})
    app.router.redirect_slashes = False  # one name per resource; a redirect would only echo the Host
    token = web.token.get_secret_value() if web.token is not None else None
    app.add_middleware(Guard, routes=routes, names=allowed_names(ctx.cfg), token=token,
                       max_body=int(web.max_body_mb * 1024 * 1024), counter=requests_counter(ctx.metrics))
    return app


# ---------------------------------------------------------------- the server


class HttpDoor:
    """uvicorn serving `build_app(ctx)` on a thread of its own: start() returns once it listens."""

    def __init__(self, ctx: WebContext):
        web = ctx.cfg.web
        self.ctx = ctx
        self._bind, self._port = web.bind, web.port
        self.app = build_app(ctx)
        self._server: AsgiServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address if self._server is not None else (self._bind, self._port)

    def start(self, timeout: float = 10.0) -> None:
        sock = listen(self._bind, self._port, "http")
        self._server = AsgiServer(self.app, sock, name="http", limit_concurrency=256)
        self._server.start(timeout)
        host, port = self.address
        log.info("http on http://%s:%d/ (/metrics, /healthz, /v2, /v1)", f"[{host}]" if ":" in host else host, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server.close()

    def alive(self) -> bool:
        return self._server is not None and self._server.alive()
