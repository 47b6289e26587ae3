"""A small TCP proxy for fault injection between visiond and its broker (tc and iptables are not available).

Modes, switched at any time from a test (in process) or over stdin (the CLI):

- ``pass``: forward bytes both ways.
- ``delay MS``: forward every chunk MS milliseconds after it arrived (both ways).
- ``blackhole``: accept connections but forward nothing, both ways: bytes wait
  unread in the kernel, as on a dead link where TCP keeps retransmitting, and
  every connection hangs. Back in ``pass``, what survived flows on in order.
- ``reset``: RST every live connection; a new one is accepted and RST at once.
- ``refuse``: RST every live connection and stop listening (connect gets
  ECONNREFUSED, as with no broker at all); ``pass`` listens again on the same port.

``drop_all()`` RSTs every live connection and leaves the mode as it is.

All sockets belong to one thread running a selector loop; the control methods
hand it a command and return once it is applied, so a test knows the fault is on.

CLI (for tools/faults.py)::

    python tools/tcpproxy.py --upstream 127.0.0.1:1883 [--listen 127.0.0.1:0]

prints ``READY <port>``, then reads one command a line from stdin (``pass``,
``blackhole``, ``reset``, ``refuse``, ``delay 200``, ``drop``, ``stats``,
``quit``) and answers each with one line starting ``ok``.
"""

from __future__ import annotations

import argparse
import collections
import json
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

MODES = ("pass", "delay", "blackhole", "reset", "refuse")
_CHUNK = 65536
_MAX_PENDING = 1 << 20  # stop reading a side while this much waits for the other
_UPSTREAM_CONNECT_S = 2.0


def _rst_close(sock: socket.socket) -> None:
    """Close with an RST (linger 0) instead of a FIN: the peer sees ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Pipe:
    """One direction of a connection: bytes read from src, waiting (with their due time) for dst."""

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.size = 0
        self.eof = False

    def next_due(self) -> float | None:
        return self.pending[0][0] if self.pending else None


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.up = _Pipe(client, upstream)  # client -> broker
        self.down = _Pipe(upstream, client)  # broker -> client
        self.closed = False


class TcpProxy:
    """listen_host:listen_port -> upstream; see the module docstring for the modes."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.host = listen_host
        self.mode = "pass"
        self.delay_s = 0.0
        self.stats = {"accepted": 0, "reset": 0, "refused_upstream": 0, "bytes_up": 0, "bytes_down": 0}
        self._sel = selectors.DefaultSelector()
        self._conns: list[_Conn] = []
        self._registered: dict[socket.socket, int] = {}
        self._listener: socket.socket | None = None
        self.port = listen_port
        self._listen()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._commands: collections.deque[tuple[Callable[[], None], threading.Event]] = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tcpproxy", daemon=True)

    # ------------------------------------------------------------ control (any thread)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._shutdown)
            self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pass_(self) -> None:
        self._call(lambda: self._set_mode("pass"))

    def delay(self, ms: float) -> None:
        def apply():
            self.delay_s = ms / 1000.0
            self._set_mode("delay")
        self._call(apply)

    def blackhole(self) -> None:
        self._call(lambda: self._set_mode("blackhole"))

    def reset(self) -> None:
        self._call(lambda: self._set_mode("reset"))

    def refuse(self) -> None:
        self._call(lambda: self._set_mode("refuse"))

    def set_mode(self, mode: str, delay_ms: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "delay":
            self.delay(delay_ms)
        else:
            self._call(lambda: self._set_mode(mode))

    def drop_all(self) -> None:
        """RST every live connection; the mode stays."""
        self._call(self._reset_all)

    def connections(self) -> int:
        return len(self._conns)

    def _call(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        done = threading.Event()
        self._commands.append((fn, done))
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if not self._thread.is_alive():  # not started (or gone): apply here, nothing else touches the sockets
            self._run_commands()
        if not done.wait(timeout):
            raise RuntimeError("tcpproxy loop did not apply the command in time")

    # ------------------------------------------------------------ the loop thread

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ)

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode in ("reset", "refuse"):
            self._reset_all()
        if mode == "refuse":
            self._unlisten()
        elif self._listener is None:
            self._listen()

    def _reset_all(self) -> None:
        for conn in list(self._conns):
            self._close(conn, rst=True)
            self.stats["reset"] += 1

    def _shutdown(self) -> None:
        self._reset_all()
        self._unlisten()
        self._stop = True

    def _run_commands(self) -> None:
        while self._commands:
            fn, done = self._commands.popleft()
            try:
                fn()
            finally:
                done.set()

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._update_interest()
                for key, events in self._sel.select(self._timeout()):
                    self._handle(key.fileobj, events)
                self._flush_due()
        finally:
            for conn in list(self._conns):
                self._close(conn, rst=True)
            self._unlisten()
            self._sel.close()
            self._wake_r.close()
            # _wake_w stays open: a late _call must not fail on a closed socket (it times out instead)

    def _timeout(self) -> float | None:
        if self.mode != "delay":
            return None
        dues = [d for c in self._conns for p in (c.up, c.down) if (d := p.next_due()) is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _handle(self, sock, events: int) -> None:
        if sock is self._wake_r:
            try:
                while sock.recv(4096):
                    pass
            except BlockingIOError:
                pass
            self._run_commands()
        elif sock is self._listener:
            self._accept()
        else:
            conn, pipe_in, pipe_out = self._find(sock)
            if conn is None:
                return
            if events & selectors.EVENT_READ and not conn.closed:
                self._read(conn, pipe_in)
            if events & selectors.EVENT_WRITE and not conn.closed:
                self._write(conn, pipe_out)

    def _find(self, sock):
        for conn in self._conns:
            if sock is conn.client:
                return conn, conn.up, conn.down
            if sock is conn.upstream:
                return conn, conn.down, conn.up
        return None, None, None

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.stats["accepted"] += 1
        if self.mode == "reset":
            _rst_close(client)
            self.stats["reset"] += 1
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=_UPSTREAM_CONNECT_S)
        except OSError:
            self.stats["refused_upstream"] += 1
            _rst_close(client)  # nothing behind us: the client sees its connection die at once
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conns.append(_Conn(client, upstream))

    def _read(self, conn: _Conn, pipe: _Pipe) -> None:
        try:
            data = pipe.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, rst=True)
            return
        if not data:
            pipe.eof = True
            if not pipe.pending:
                self._close(conn, rst=False)
            return
        delay = self.delay_s if self.mode == "delay" else 0.0
        pipe.pending.append((time.monotonic() + delay, data))
        pipe.size += len(data)
        self.stats["bytes_up" if pipe is conn.up else "bytes_down"] += len(data)
        if delay == 0.0:
            self._write(conn, pipe)

    def _write(self, conn: _Conn, pipe: _Pipe) -> None:
        now = time.monotonic()
        while pipe.pending and pipe.pending[0][0] <= now:
            due, data = pipe.pending[0]
            try:
                sent = pipe.dst.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn, rst=True)
                return
            pipe.size -= sent
            if sent < len(data):
                pipe.pending[0] = (due, data[sent:])
                return
            pipe.pending.popleft()
        if pipe.eof and not pipe.pending:
            self._close(conn, rst=False)

    def _flush_due(self) -> None:
        if self.mode in ("blackhole", "reset", "refuse"):
            return
        for conn in list(self._conns):
            for pipe in (conn.up, conn.down):
                if not conn.closed and pipe.pending and pipe.pending[0][0] <= time.monotonic():
                    self._write(conn, pipe)

    def _update_interest(self) -> None:
        """What each socket waits for: nothing at all in blackhole (the bytes stay in the kernel)."""
        forwarding = self.mode in ("pass", "delay")
        now = time.monotonic()
        for conn in self._conns:
            for sock, pipe_in, pipe_out in ((conn.client, conn.up, conn.down), (conn.upstream, conn.down, conn.up)):
                mask = 0
                if forwarding:
                    if not pipe_in.eof and pipe_in.size < _MAX_PENDING:
                        mask |= selectors.EVENT_READ
                    if pipe_out.pending and pipe_out.pending[0][0] <= now:
                        mask |= selectors.EVENT_WRITE
                self._register(sock, mask)

    def _register(self, sock: socket.socket, mask: int) -> None:
        old = self._registered.get(sock, 0)
        if mask == old:
            return
        if old and mask:
            self._sel.modify(sock, mask)
        elif mask:
            self._sel.register(sock, mask)
        else:
            self._sel.unregister(sock)
        if mask:
            self._registered[sock] = mask
        else:
            self._registered.pop(sock, None)

    def _close(self, conn: _Conn, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.upstream):
            self._register(sock, 0)
            if rst:
                _rst_close(sock)
            else:
                try:
                    sock.close()
                except OSError:
                    pass
        self._conns.remove(conn)


class ProxyProcess:
    """The CLI as a child process, driven over stdin with the same methods as TcpProxy."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0, python: str = sys.executable):
        cmd = [python, str(Path(__file__).resolve()), "--upstream", f"{upstream_host}:{upstream_port}",
               "--listen", f"127.0.0.1:{listen_port}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"tcpproxy did not start: {line!r}")
        self.host, self.port = "127.0.0.1", int(line.split()[1])
        self._lock = threading.Lock()

    def command(self, line: str) -> str:
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"tcpproxy: {line!r} -> {answer!r}")
        return answer

    def pass_(self) -> None:
        self.command("pass")

    def blackhole(self) -> None:
        self.command("blackhole")

    def reset(self) -> None:
        self.command("reset")

    def refuse(self) -> None:
        self.command("refuse")

    def delay(self, ms: float) -> None:
        self.command(f"delay {ms}")

    def drop_all(self) -> None:
        self.command("drop")

    def stats(self) -> dict:
        return json.loads(self.command("stats")[3:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
            except (OSError, RuntimeError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to (the broker)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on; port 0 picks a free one")
    args = parser.parse_args(argv)
    proxy = TcpProxy(*_address(args.upstream), *_address(args.listen)).start()
    print(f"READY {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            verb = words[0]
            try:
                if verb == "quit":
                    print("ok", flush=True)
                    break
                if verb == "drop":
                    proxy.drop_all()
                elif verb == "stats":
                    print("ok " + json.dumps({**proxy.stats, "mode": proxy.mode, "connections": proxy.connections()}),
                          flush=True)
                    continue
                else:
                    proxy.set_mode(verb, float(words[1]) if len(words) > 1 else 0.0)
                print(f"ok {proxy.mode}", flush=True)
            except (ValueError, IndexError) as exc:
                print(f"error {exc}", flush=True)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
