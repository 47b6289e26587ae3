"""Logging set-up: plain lines for a terminal, one JSON object per line for journald/Loki."""

from __future__ import annotations

import json
import logging
import sys
import time

from visiond.config import redact_url


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
