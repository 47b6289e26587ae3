"""The one timestamp format of payloads, sidecars and audit lines: RFC 3339, UTC, microseconds, `Z`."""

from __future__ import annotations

import datetime as dt

_second: tuple[int | None, str] = (None, "")  # the last formatted second; swapped whole, so any thread may read it


def rfc3339(ts: float) -> str:
    """`2023-11-14T22:13:20.123457Z` for epoch seconds; the second is formatted once (a batch shares it)."""
    global _second
    sec = int(ts // 1)
    us = int(round((ts - sec) * 1e6))
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, dt.datetime.fromtimestamp(sec, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{us:06d}Z"
