"""Payload builders on their own: what a subscriber reads on status/detail."""

from __future__ import annotations

import json

from visiond.serve.sinks.payloads import status_detail_payload


def test_every_time_in_status_detail_is_rfc3339_utc_at_any_depth():
    detail = {"last_error": "reload refused: x", "last_error_at": 1_700_000_000.25,
              "last_reload": {"result": "refused", "why": "x", "at": 1_700_000_000.5},
              "last_reload_at": 1_700_000_001, "model": {"name": "m", "version": "v"}, "shadow": None, "pid": 7}
    doc = json.loads(status_detail_payload(detail, 1_700_000_002.0))
    assert doc["last_error_at"] == "2023-11-14T22:13:20.250000Z"
    assert doc["last_reload"]["at"] == "2023-11-14T22:13:20.500000Z"
    assert doc["last_reload_at"] == "2023-11-14T22:13:21.000000Z"
    assert doc["at"] == "2023-11-14T22:13:22.000000Z"
    # and what is not a time is left alone (a cleared error stays null, a pid stays a number)
    assert doc["pid"] == 7 and doc["shadow"] is None and doc["model"] == {"name": "m", "version": "v"}
    cleared = json.loads(status_detail_payload({"last_error": None, "last_error_at": None}, 1_700_000_002.0))
    assert cleared["last_error"] is None and cleared["last_error_at"] is None
