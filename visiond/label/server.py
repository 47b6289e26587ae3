"""The labelling page's HTTP server: a static page, a small JSON API, and the dataset's images.

A small Starlette app served by uvicorn (the daemon's web front uses the same framework, but
the label layer keeps its own app: it may not import visiond.serve). Bound to 127.0.0.1 by
default. It serves only three fixed static files and image files that resolve inside the
dataset's inbox/ or images/ (no symlink leads out). `_Guard`, one layer around the app, makes
every request name this machine by IP, `localhost` or a name the operator allowed with
`--allow-host` (no DNS rebinding), and every POST carry the per-run token the page was served
with, so another site open in the operator's browser cannot label anything.
"""

from __future__ import annotations

import json
import logging
import secrets
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from visiond.asgi import AsgiServer, host_allowed, host_name, listen
from visiond.data.manifest import IMAGES_DIR, INBOX_DIR
from visiond.errors import UserError
from visiond.label.session import LabelSession, NotFound
from visiond.video import is_image_path

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Visiond-Token"
MAX_BODY = 256 * 1024
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/static/style.css": ("style.css", "text/css; charset=utf-8")}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_METHODS = frozenset({"GET", "HEAD", "POST"})


def resolve_dataset_file(root: Path, url_path: str) -> Path:
    """The image file a `/files/...` path names: PermissionError when we may not serve it, FileNotFoundError when gone.

    `url_path` is what follows `/files/`, still percent-encoded. Decoded once; then it must
    be a relative path under inbox/ or images/ with an image extension whose real path
    (symlinks followed) stays under the real inbox/ or images/ of the dataset.
    """
    try:
        rel = unquote(url_path, errors="strict")
    except UnicodeDecodeError:
        raise PermissionError("not UTF-8") from None
    p = PurePosixPath(rel)
    if not rel or "\\" in rel or "\x00" in rel or p.is_absolute() or ".." in p.parts:
        raise PermissionError("not a relative path inside the dataset")
    if len(p.parts) < 2 or p.parts[0] not in (INBOX_DIR, IMAGES_DIR) or not is_image_path(p):
        raise PermissionError("not an image under inbox/ or images/")
    base = root.resolve() / p.parts[0]
    try:
        real = (root / rel).resolve(strict=True)
    except FileNotFoundError:
        if not (root / rel).resolve().is_relative_to(base):
            raise PermissionError("leads outside the dataset") from None
        raise
    except (OSError, RuntimeError):
        raise PermissionError("unresolvable path") from None
    if not real.is_relative_to(base):
        raise PermissionError("leads outside the dataset")
    if not real.is_file():
        raise PermissionError("not a file")
    return real


def _send(status: int, body: bytes, ctype: str, *, cache: str) -> Response:
    return Response(body, status_code=status, media_type=ctype, headers={"Cache-Control": cache})


def _json(status: int, obj: object) -> Response:
    return _send(status, json.dumps(obj).encode(), "application/json", cache="no-store")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = _json(status, {"ok": False, "error": message})
    response.headers.update(headers or {})
    return response


class _Refused(Exception):
    """A request answered with a one-line JSON error before it reaches the session."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class _Guard:
    """Method, Host and token checks before any route runs; security headers on every answer."""

    def __init__(self, app, *, allowed_hosts: frozenset[str], token: str):
        self.app, self._allowed, self._token = app, frozenset(allowed_hosts) | {"localhost"}, token

    def _refusal(self, scope) -> Response | None:
        if scope["method"] not in _METHODS:
            return _error(405, "method not allowed", {"Allow": "GET, HEAD, POST"})
        host = _header(scope, b"host")
        if not host_allowed(host, self._allowed):
            name = host_name(host or "")[:64]
            return _error(403, f"Host {name!r} is not allowed: open the page by localhost or an IP address, "
                               f"or start visiond label with --allow-host {name or 'NAME'}")
        if scope["method"] == "POST" and not secrets.compare_digest(
                (_header(scope, TOKEN_HEADER.lower().encode()) or "").encode("latin-1"), self._token.encode()):
            return _error(403, f"missing or wrong {TOKEN_HEADER} header (reload the page)")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for key, value in _SECURITY_HEADERS.items():
                    headers[key] = value
                message["headers"] = headers.raw
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_secured)
            else:
                await self.app(scope, receive, send_secured)
        finally:
            client = scope.get("client") or ("-", 0)
            log.debug("%s %s %s %s", client[0], scope["method"], scope.get("raw_path", b"")[:200].decode("latin-1"),
                      status["code"])


async def _json_body(request: Request) -> dict:
    """The request's JSON object (`{}` when empty), refused past MAX_BODY bytes without reading on."""
    too_big = _Refused(400, f"expected a JSON body of at most {MAX_BODY} bytes")
    length = request.headers.get("content-length")
    if length is not None and (not length.strip().isdigit() or int(length) > MAX_BODY):
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_big
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _Refused(400, "expected a JSON object")
    return body


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name}: expected a string")
    return value


class _Routes:
    """The page's routes over one `LabelServer` (its session, token and static files)."""

    def __init__(self, server: LabelServer):
        self.server = server
        session = server.session
        self.actions: dict[str, Callable[[dict], dict]] = {
            "/api/accept": lambda b: {"accepted": session.accept(b.get("ids"), b.get("label"))},
            "/api/undo": lambda b: {"restored": session.undo()},
            "/api/skip": lambda b: session.skip(b.get("id")) or {"skipped": b.get("id")},
            "/api/discard": lambda b: {"set_aside": session.discard(b.get("ids"))},
            "/api/classes": lambda b: {"classes": session.add_class(_str(b.get("name"), "name"))},
        }

    def routes(self) -> list[Route]:
        return [*(Route(path, self.static, methods=["GET"]) for path in _STATIC),
                Route("/favicon.ico", self.favicon, methods=["GET"]),
                Route("/api/state", self.state, methods=["GET"]),
                Route("/files/{rel:path}", self.file, methods=["GET"]),
                *(Route(path, self.action, methods=["POST"]) for path in self.actions)]

    async def static(self, request: Request) -> Response:
        name, ctype = _STATIC[request.url.path]
        return _send(200, self.server.static_bytes(name), ctype, cache="no-store")

    async def favicon(self, request: Request) -> Response:
        return _send(204, b"", "image/x-icon", cache="max-age=86400")

    async def state(self, request: Request) -> Response:
        return _json(200, await run_in_threadpool(self.server.session.state))

    async def file(self, request: Request) -> Response:
        # the raw (still percent-encoded) path: resolve_dataset_file decodes it exactly once
        raw = request.scope.get("raw_path", b"").decode("latin-1")
        if not raw.startswith("/files/"):
            return _error(404, "not found")
        try:
            real = resolve_dataset_file(self.server.session.dataset_dir, raw[len("/files/"):])
            data = await run_in_threadpool(real.read_bytes)
        except PermissionError as exc:
            log.warning("refused file request %r: %s", raw[:200], exc)
            return _error(403, "not a dataset image")
        except OSError:
            return _error(404, "no such image (labelled meanwhile?)")
        return _send(200, data, _IMAGE_TYPES.get(real.suffix.lower(), "application/octet-stream"),
                     cache="private, max-age=60")

    async def action(self, request: Request) -> Response:
        path = request.url.path
        body = await _json_body(request)
        try:
            result = await run_in_threadpool(self.actions[path], body)
        except NotFound as exc:
            return _error(404, str(exc))
        except UserError as exc:
            return _error(400, str(exc))
        except OSError as exc:
            log.error("labelling %s failed: %s", path, exc)
            return _error(500, f"disk error: {exc.strerror or exc}")
        return _json(200, {"ok": True, **result, **await run_in_threadpool(self._progress)})

    def _progress(self) -> dict:
        s = self.server.session.state()
        return {"labelled": s["labelled"], "discarded": s["discarded"], "left": s["left"], "total": s["total"]}


async def _refused(request: Request, exc: _Refused) -> Response:
    return _error(exc.status, str(exc))


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, message, exc.headers)


async def _internal(request: Request, exc: Exception) -> Response:
    return _error(500, "internal error (see the visiond label log)")  # uvicorn logs the traceback


def build_app(server: LabelServer) -> Starlette:
    """The page's app over `server`: every route, behind `_Guard`."""
    app = Starlette(routes=_Routes(server).routes(),
                    exception_handlers={_Refused: _refused, HTTPException: _http_exception, Exception: _internal})
    app.router.redirect_slashes = False  # one name per resource; a redirect would only echo the Host
    app.add_middleware(_Guard, allowed_hosts=server.allowed_hosts, token=server.token)
    return app


class LabelServer:
    """One labelling run: `LabelServer(session, bind, port)`, then `start()` (a thread) or `serve_forever()`.

    The socket is bound on construction, so `url` is known (and a taken port reported) before serving.
    """

    def __init__(self, session: LabelSession, bind: str = "127.0.0.1", port: int = 8765,
                 allow_hosts: tuple[str, ...] | list[str] = ()):
        self.session = session
        self.allowed_hosts = frozenset(h.strip().lower().rstrip(".") for h in allow_hosts if h.strip())
        self.token = secrets.token_urlsafe(24)
        self._static: dict[str, bytes] = {}
        self._sock = listen(bind, port, "label")
        self.server_address = self._sock.getsockname()
        self.app = build_app(self)
        self._server = AsgiServer(self.app, self._sock, name="visiond-label", http="h11",
                                  headers=[("Server", "visiond-label")])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def static_bytes(self, name: str) -> bytes:
        """A page file, with this run's token put into index.html."""
        if name not in self._static:
            data = resources.files("visiond.label").joinpath("static", name).read_bytes()
            if name == "index.html":
                data = data.replace(b"{{TOKEN}}", self.token.encode())
            self._static[name] = data
        return self._static[name]

    def serve_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (on the main thread) or `shutdown()`."""
        self._server.serve_forever()

    def start(self, timeout: float = 30.0) -> LabelServer:
        """Serve from a background thread (tests, embedding) and return once it answers; `close()` stops it."""
        try:
            self._server.start(timeout)
        except UserError:
            self.close()
            raise UserError(f"the labelling page did not start on {self.url}") from None
        return self

    def shutdown(self) -> None:
        """Stop serving (from another thread): requests in flight get 2 s to finish."""
        self._server.stop(grace_s=10.0)

    def server_close(self) -> None:
        self._server.close()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.session.close()


def make_server(dataset_dir: str | Path, *, bind: str = "127.0.0.1", port: int = 8765,
                classes: list[str] | None = None, allow_hosts: tuple[str, ...] | list[str] = ()) -> LabelServer:
    """A server for `dataset_dir`, classes as `default_classes` gives them (`classes` first)."""
    from visiond.label.session import default_classes

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"{dataset_dir}: not a directory; expected a dataset directory with an inbox/")
    session = LabelSession(dataset_dir, default_classes(dataset_dir, classes))
    return LabelServer(session, bind, port, allow_hosts)
