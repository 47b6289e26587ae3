"""uvicorn serving an ASGI app from a socket bound up front, on a thread of its own or on the caller's.

The daemon's web front and the labelling page both need the same three things: a bind
error that is one line naming the address (the socket is bound before serving, so a taken
port is reported at once and port 0 resolves to a real one), a server that runs on its own
thread and reports when it listens, and a stop that gives requests in flight a moment.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from visiond.errors import UserError

log = logging.getLogger(__name__)


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.lower().rstrip(".")


def host_allowed(host_header: str | None, names: frozenset[str]) -> bool:
    """An IP literal, or one of `names` (lower case), with any port.

    A DNS-rebinding page reaches a local server under its own (attacker's) name, which is none of these.
    """
    if not host_header:
        return False
    host = host_name(host_header)
    if host in names:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def listen(bind: str, port: int, what: str) -> socket.socket:
    """A listening socket, or UserError in one line: `<what>: cannot listen on <bind>:<port> (<why>)`."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as exc:
        raise UserError(f"{what}: cannot listen on {bind}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise UserError(f"{what}: cannot listen on {bind}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    return sock


class AsgiServer:
    """uvicorn on `sock`: `serve_forever()` on the caller's thread, or `start()` a thread and return once it listens."""

    def __init__(self, app, sock: socket.socket, *, name: str, **config):
        self.name = name
        self.sock = sock
        defaults = dict(loop="asyncio", lifespan="off", ws="none", log_config=None, log_level="warning",
                        access_log=False, server_header=False, timeout_keep_alive=5, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(uvicorn.Config(app, **{**defaults, **config}))
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def serve_forever(self) -> None:
        """On the main thread uvicorn handles SIGINT/SIGTERM: requests in flight finish, then the signal is
        raised again for the handler that was there before."""
        self._server.run(sockets=[self.sock])

    def _run(self) -> None:
        try:
            self.serve_forever()
        except BaseException as exc:  # noticed by start() or alive()
            self.error = exc
            log.exception("%s stopped", self.name)

    def start(self, timeout: float = 10.0) -> None:
        """Serve from a thread; UserError when it does not listen within `timeout`."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self.stop()
                host, port = self.address
                raise UserError(f"{self.name}: did not start on {host}:{port} ({self.error!r})")
            time.sleep(0.01)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving (another thread): requests in flight get the graceful timeout, then the thread is forced."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace_s)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=2)

    def close(self) -> None:
        self.sock.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
