"""The one timestamp format: what payloads, inbox sidecars and audit lines write."""

from __future__ import annotations

import datetime as dt
import random

from visiond.timefmt import rfc3339


def _reference(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_rfc3339_is_utc_with_microseconds_and_a_z():
    assert rfc3339(1_700_000_000.1234567) == "2023-11-14T22:13:20.123457Z"
    assert rfc3339(1_700_000_000.9999996) == "2023-11-14T22:13:21.000000Z"  # rounds into the next second
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"


def test_rfc3339_rounds_like_datetime_including_half_microsecond_ties():
    rng = random.Random(7)
    stamps = [rng.uniform(0, 2e9) for _ in range(20000)]
    stamps += [rng.randrange(0, 2_000_000_000) + rng.randrange(0, 2_000_000) / 2e6 for _ in range(20000)]
    assert [rfc3339(t) for t in stamps] == [_reference(t) for t in stamps]

