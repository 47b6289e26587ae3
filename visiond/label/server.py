"""The labelling page's HTTP server: a static page, a small JSON API, and the dataset's images.

Stdlib `ThreadingHTTPServer`, bound to 127.0.0.1 by default. It serves only three fixed
static files and image files that resolve inside the dataset's inbox/ or images/ (no
symlink leads out). Requests must name this machine by IP, `localhost` or a name the
operator allowed with `--allow-host` (no DNS rebinding), and POSTs must carry the per-run
token the page was served with, so another site open in the operator's browser cannot label anything.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urlsplit

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


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets."""
    host = host_header.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _host_allowed(host_header: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """`localhost`, an IP literal or a name given with --allow-host, with any port.

    A DNS-rebinding page reaches us under its own (attacker's) name, which is none of these.
    """
    if not host_header:
        return False
    host = _host_name(host_header)
    if host.lower() == "localhost" or host.lower().rstrip(".") in allowed:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    server: "LabelServer"
    server_version = "visiond-label"
    sys_version = ""

    def log_message(self, fmt: str, *args) -> None:  # noqa: D102 - route the access log to logging
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- dispatch ---------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in _STATIC:
            name, ctype = _STATIC[path]
            body = self.server.static_bytes(name)
            self._send(HTTPStatus.OK, body, ctype, cache="no-store")
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", cache="max-age=86400")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.session.state())
        elif path.startswith("/files/"):
            self._file(path[len("/files/"):])
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        if not secrets.compare_digest(self.headers.get(TOKEN_HEADER, ""), self.server.token):
            self._error(HTTPStatus.FORBIDDEN, f"missing or wrong {TOKEN_HEADER} header (reload the page)")
            return
        routes: dict[str, Callable[[dict], object]] = {
            "/api/accept": lambda b: {"accepted": self.server.session.accept(b.get("ids"), b.get("label"))},
            "/api/undo": lambda b: {"restored": self.server.session.undo()},
            "/api/skip": lambda b: self.server.session.skip(b.get("id")) or {"skipped": b.get("id")},
            "/api/discard": lambda b: {"set_aside": self.server.session.discard(b.get("ids"))},
            "/api/classes": lambda b: {"classes": self.server.session.add_class(_str(b.get("name"), "name"))},
        }
        route = routes.get(urlsplit(self.path).path)
        if route is None:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        body = self._body()
        if body is None:
            return
        try:
            result = route(body)
        except NotFound as exc:
            self._error(HTTPStatus.NOT_FOUND, str(exc))
        except UserError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except OSError as exc:
            log.error("labelling %s failed: %s", self.path, exc)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"disk error: {exc.strerror or exc}")
        else:
            self._json(HTTPStatus.OK, {"ok": True, **result, **self._progress()})

    def do_PUT(self) -> None:  # noqa: N802
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    # -- pieces -----------------------------------------------------------------
    def _host_ok(self) -> bool:
        host = self.headers.get("Host")
        if _host_allowed(host, self.server.allowed_hosts):
            return True
        name = _host_name(host or "")[:64]
        self._error(HTTPStatus.FORBIDDEN, f"Host {name!r} is not allowed: open the page by localhost or an IP "
                                          f"address, or start visiond label with --allow-host {name or 'NAME'}")
        return False

    def _body(self) -> dict | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, f"expected a JSON body of at most {MAX_BODY} bytes")
            return None
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._error(HTTPStatus.BAD_REQUEST, "expected a JSON object")
            return None
        return body

    def _progress(self) -> dict:
        s = self.server.session.state()
        return {"labelled": s["labelled"], "discarded": s["discarded"], "left": s["left"], "total": s["total"]}

    def _file(self, rel: str) -> None:
        try:
            real = resolve_dataset_file(self.server.session.dataset_dir, rel)
            data = real.read_bytes()
        except PermissionError as exc:
            log.warning("refused file request %r: %s", self.path[:200], exc)
            self._error(HTTPStatus.FORBIDDEN, "not a dataset image")
            return
        except OSError:
            self._error(HTTPStatus.NOT_FOUND, "no such image (labelled meanwhile?)")
            return
        self._send(HTTPStatus.OK, data, _IMAGE_TYPES.get(real.suffix.lower(), "application/octet-stream"),
                   cache="private, max-age=60")

    def _json(self, status: HTTPStatus, obj: object) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", cache="no-store")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"ok": False, "error": message})

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, *, cache: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for k, v in _SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name}: expected a string")
    return value


class LabelServer(ThreadingHTTPServer):
    """One labelling run: `LabelServer(session, bind, port)`, then `start()` or `serve_forever()`."""

    daemon_threads = True

    def __init__(self, session: LabelSession, bind: str = "127.0.0.1", port: int = 8765,
                 allow_hosts: tuple[str, ...] | list[str] = ()):
        self.session = session
        self.allowed_hosts = frozenset(h.strip().lower().rstrip(".") for h in allow_hosts if h.strip())
        self.token = secrets.token_urlsafe(24)
        self._static: dict[str, bytes] = {}
        self._thread: threading.Thread | None = None
        if ":" in bind:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((bind, port), _Handler)
        except OSError as exc:
            raise UserError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None

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

    def start(self) -> "LabelServer":
        """Serve from a background thread (tests, embedding); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="visiond-label", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
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
