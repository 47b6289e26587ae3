"""A local audit trail: one JSON line per verdict, with the batch it was classified in.

Plants keep it beside MQTT for traceability (which model said what about which
frame, and when); line-buffered appends, rotated by size.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Sequence

from visiond.frames import Prediction
from visiond.serve.sinks.payloads import dumps
from visiond.timefmt import rfc3339

log = logging.getLogger(__name__)


class JsonlSink:
    def __init__(self, path: str | Path, node: str, max_bytes: int = 100 * 1024 * 1024, keep: int = 3):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._node, self._max, self._keep = node, max_bytes, keep
        self._lock = threading.Lock()
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")

    def submit(self, predictions: Sequence[Prediction]) -> None:
        lines = b"".join(dumps(self._record(p)) + b"\n" for p in predictions).decode()
        with self._lock:
            self._f.write(lines)
            if self._f.seekable() and self._f.tell() > self._max:  # a pipe (a log shipper) is never rotated
                self._rotate()

    def _record(self, p: Prediction) -> dict:
        return {"node": self._node, "camera": p.frame.camera, "frame": p.frame.index,
                "captured_at": rfc3339(p.frame.captured_at), "batch": p.batch_id, "label": p.label,
                "score": round(p.score, 6), "defect": p.defect, "model": p.model.version,
                "latency_ms": round(p.timings.total_s * 1000, 3)}

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self._keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            self._f.close()
