"""Logging set-up: plain lines for a terminal, one JSON object per line for journald/Loki.

Every line goes through `redact_url`, so a camera or broker password in a URL
never reaches a log. `capture_native_stderr` routes what FFmpeg and OpenCV
write to file descriptor 2 through the same formatters.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import re
import select
import sys
import threading
import time


def redact_url(text: str) -> str:
    """Hide the password of any user:password@ in a URL (logs, metrics, status)."""
    # up to the last @ of the authority: an unencoded `p@ss` must not leave `ss` showing
    return re.sub(r"(://[^:/@\s]+):[^/\s]*@", r"\1:***@", text)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": redact_url(record.getMessage()),
        }
        if record.exc_info:
            out["exc"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for chatty in ("PIL", "onnx_ir", "onnxscript", "torch.onnx"):  # the ONNX exporter narrates each pass at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- native stderr
# FFmpeg and OpenCV print straight to file descriptor 2, past Python's logging:
# in JSON mode their lines break the one-object-per-line stream, a stream URL in
# them can carry a password, and a corrupt or glitchy stream prints the same
# complaint hundreds of times a second. `capture_native_stderr()` swaps fd 2 for
# a pipe whose reader thread turns each line into a record of the
# `visiond.native` logger (so the formatter and URL redaction apply), and
# coalesces repeats: a message seen again within `window_s` is only counted, and
# the count is logged when the window ends.
#
# Python's own stderr (logging, tracebacks, faulthandler dumps) keeps writing to
# the original stderr. The pipe's write end is non-blocking: if the reader ever
# fell behind, a native library loses a log line rather than stalling a camera.

_native_log = logging.getLogger("visiond.native")

# "[h264 @ 0x7f80f81b14c0] msg" (FFmpeg) and "[ WARN:0@1.234] global file.cpp (123) fn msg" (OpenCV)
_FFMPEG = re.compile(r"^\[(?P<ctx>[\w.-]+) @ 0x[0-9a-f]+\]\s*(?P<msg>.*)$")
_OPENCV = re.compile(r"^\[\s*(?P<lvl>[A-Z]+):[\d@.]+\]\s*(?:global\s+)?(?P<msg>.*)$")
_LEVELS = {"FATAL": logging.ERROR, "ERROR": logging.ERROR, "WARN": logging.WARNING, "INFO": logging.INFO,
           "DEBUG": logging.DEBUG, "VERBOSE": logging.DEBUG}

_installed: "_Capture | None" = None


def parse_line(line: str) -> tuple[int, str]:
    """(level, message) for one native stderr line; the pointer FFmpeg adds is dropped (it defeats coalescing)."""
    m = _FFMPEG.match(line)
    if m:
        return logging.WARNING, f"ffmpeg {m['ctx']}: {m['msg']}"
    m = _OPENCV.match(line)
    if m:
        return _LEVELS.get(m["lvl"], logging.WARNING), f"opencv: {m['msg']}"
    return logging.WARNING, line


class _Capture:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self.saved_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.set_inheritable(self.saved_fd, False)
        fcntl.fcntl(write_fd, fcntl.F_SETFL, fcntl.fcntl(write_fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        sys.stderr.flush()
        # Python's stderr goes on to the real one; only native writes to fd 2 reach the pipe.
        sys.stderr = open(self.saved_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._seen: dict[str, list] = {}  # message -> [level, first_logged_at, repeats since]
        self._lock = threading.Lock()  # _seen: the reader thread and the exit hook
        self._thread = threading.Thread(target=self._run, name="native-stderr", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """Counts of repeats still inside their window are reported, not lost."""
        self._flush_repeats(time.monotonic(), force=True)

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                ready, _, _ = select.select([self._reader], [], [], 1.0)
                chunk = self._reader.read(65536) if ready else None
            except (OSError, ValueError):
                return
            if chunk is None:  # quiet: only report the repeats whose window ended
                self._flush_repeats(time.monotonic())
                continue
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > 65536:  # a runaway line without a newline
                lines.append(buf)
                buf = b""
            now = time.monotonic()
            with self._lock:
                for raw in lines:
                    text = raw.decode("utf-8", "backslashreplace").strip()
                    if text:
                        self._emit(*parse_line(text), now)
            self._flush_repeats(now)

    def _emit(self, level: int, msg: str, now: float) -> None:
        entry = self._seen.get(msg)
        if entry is not None and now - entry[1] < self.window_s:
            entry[2] += 1
            return
        if entry is not None and entry[2]:
            _native_log.log(entry[0], "%s (repeated %d more times in %.0f s)", msg, entry[2], now - entry[1])
        else:
            _native_log.log(level, "%s", msg)
        self._seen[msg] = [level, now, 0]
        if len(self._seen) > 1000:  # bounded: forget the stalest
            for key in sorted(self._seen, key=lambda k: self._seen[k][1])[:500]:
                del self._seen[key]

    def _flush_repeats(self, now: float, force: bool = False) -> None:
        with self._lock:
            for msg, entry in self._seen.items():
                if entry[2] and (force or now - entry[1] >= self.window_s):
                    _native_log.log(entry[0], "%s (repeated %d more times in %.0f s)", msg, entry[2], now - entry[1])
                    entry[1], entry[2] = now, 0


def capture_native_stderr(window_s: float = 10.0) -> None:
    """Install once per process, before logging is set up (its handler must get the real stderr)."""
    global _installed
    if _installed is None:
        _installed = _Capture(window_s)
