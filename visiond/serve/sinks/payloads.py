"""What visiond says over MQTT: the node's topics and every payload's bytes (DESIGN.md, "MQTT").

Predictions, events and shadow reports follow the JSON schemas in `visiond/schemas/`;
retained state is `status` (`online`/`offline`), `status/detail` (a JSON object) and
`<camera>/status` (JSON `{"state", "reason", "at"}`). Kept apart from the sink so the
contract can be read, and tested, without a broker.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import orjson

from visiond.config import RESERVED_CAMERA_NAMES
from visiond.frames import ModelRef, Prediction
from visiond.timefmt import rfc3339

PREDICTION_SCHEMA = "visiond.prediction/1"
EVENT_SCHEMA = "visiond.event/1"
SHADOW_SCHEMA = "visiond.shadow/1"
INSPECTION_SCHEMA = "visiond.inspection/1"

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_json_fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, keys in insertion order: orjson (~10x the standard library), which writes the same
    values (a float may be spelt differently, `1e-05` as `0.00001`: the same number); what it refuses (an
    integer beyond 64 bits, an object of an unknown type) goes through the standard library as before."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return _json_fallback(obj).encode()


def new_id() -> str:
    """A random (version 4) UUID as text, as `str(uuid.uuid4())` writes it, for a third of its cost."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


# ---------------------------------------------------------------- topics


class Topics:
    """Every topic of one node; camera topics are cached (they are built per frame)."""

    def __init__(self, prefix: str, node: str):
        self.base = f"{prefix}/{node}"
        self.status = f"{self.base}/status"
        self.status_detail = f"{self.base}/status/detail"
        self.cmd_filter = f"{self.base}/cmd/+"
        self._predictions: dict[str, str] = {}

    def _camera(self, camera: str) -> str:
        if camera in RESERVED_CAMERA_NAMES or not camera or any(c in camera for c in "/+#"):
            raise ValueError(f"camera name {camera!r} cannot be used in a topic (reserved or has / + #)")
        return f"{self.base}/{camera}"

    def camera_status(self, camera: str) -> str:
        return f"{self._camera(camera)}/status"

    def prediction(self, camera: str) -> str:
        topic = self._predictions.get(camera)
        if topic is None:
            topic = self._predictions[camera] = f"{self._camera(camera)}/prediction"
        return topic

    def event(self, camera: str) -> str:
        return f"{self._camera(camera)}/event"

    def shadow(self, camera: str) -> str:
        return f"{self._camera(camera)}/shadow"

    def cmd(self, verb: str) -> str:
        return f"{self.base}/cmd/{verb}"

    @property
    def recipe(self) -> str:
        return f"{self.base}/recipe"

    def inspection(self, camera: str) -> str:
        return f"{self._camera(camera)}/inspection"

    def ready(self, camera: str) -> str:
        return f"{self._camera(camera)}/ready"


# ---------------------------------------------------------------- spooled messages


def _model_dict(model: ModelRef | Mapping[str, str]) -> dict[str, str]:
    if isinstance(model, ModelRef):
        return {"name": model.name, "version": model.version}
    return {"name": str(model["name"]), "version": str(model["version"])}


def prediction_payload(p: Prediction, seq: int, node: str, msg_id: str) -> bytes:
    """Compact JSON of prediction.schema.json; on the hot path (~10 µs)."""
    t = p.timings
    return dumps({
        "schema": PREDICTION_SCHEMA,
        "id": msg_id,
        "node": node,
        "camera": p.frame.camera,
        "seq": seq,
        "captured_at": rfc3339(p.frame.captured_at),
        "label": p.label,
        "score": round(float(p.score), 6),
        "top": [{"label": label, "score": round(float(score), 6)} for label, score in p.top],
        "defect": bool(p.defect),
        "roi": p.roi,
        "model": {"name": p.model.name, "version": p.model.version},
        "latency_ms": {
            "queue": round(t.queue_s * 1e3, 3),
            "inference": round(t.inference_s * 1e3, 3),
            "total": round(t.total_s * 1e3, 3),
        },
    })


def event_payload(camera: str, event: Mapping[str, Any], seq: int, node: str, msg_id: str) -> bytes:
    """Compact JSON of event.schema.json; `event` holds kind, at (wall seconds), label, score, model."""
    return dumps({
        "schema": EVENT_SCHEMA,
        "id": msg_id,
        "node": node,
        "camera": camera,
        "seq": seq,
        "at": rfc3339(float(event["at"])),
        "kind": str(event["kind"]),
        "label": str(event["label"]),
        "score": round(float(event["score"]), 6),
        "roi": str(event.get("roi") or "full"),
        "model": _model_dict(event["model"]),
        "evidence": event.get("evidence"),
    })


def shadow_payload(camera: str, report: Mapping[str, Any], seq: int, node: str, msg_id: str) -> bytes:
    """Compact JSON of one shadow-mode comparison window (the report as `ShadowRunner` makes it)."""
    return dumps({"schema": SHADOW_SCHEMA, "id": msg_id, "node": node, "camera": camera, "seq": seq,
                    **report})


def inspection_payload(doc: Mapping[str, Any], seq: int, node: str) -> bytes:
    """Compact JSON of inspection.schema.json from the station's verdict (times as epoch seconds).

    Built once, inside the results store's transaction that assigns `seq`; the stored bytes are what
    every door sends, and what a redelivered trigger gets again.
    """
    def score(x):
        return None if x is None else round(float(x), 6)

    return dumps({
        "schema": INSPECTION_SCHEMA,
        "id": doc["id"],
        "job_id": doc["job_id"],
        "node": node,
        "camera": doc["camera"],
        "seq": seq,
        "part_id": doc["part_id"],
        "trigger_id": doc["trigger_id"],
        "door": doc["door"],
        "recipe": doc["recipe"],
        "verdict": doc["verdict"],
        "reason": doc["reason"],
        "detail": doc["detail"],
        "rois": [{"name": r["name"], "label": r["label"], "score": score(r["score"]), "defect": bool(r["defect"]),
                  "top": [{"label": label, "score": score(s)} for label, s in r["top"]],
                  "frames": [{"label": f["label"], "score": score(f["score"]), "defect": bool(f["defect"])}
                             for f in r["frames"]],
                  "model": r["model"]} for r in doc["rois"]],
        "frames": [{"captured_at": rfc3339(t), "index": i} for t, i in doc["frames"]],
        "models": doc["models"],
        "triggered_at": rfc3339(doc["triggered_at"]),
        "decided_at": rfc3339(doc["decided_at"]),
        "latency_ms": doc["latency_ms"],
        "evidence": doc["evidence"],
    })


def recipe_payload(name: str | None, models: Mapping[str, Any], at: float) -> bytes:
    """Retained `recipe`: the recipe in service (null: the config's own models and ROIs) and its models."""
    return dumps({"name": name, "models": dict(models), "at": rfc3339(at)})


# The spool calls these with the seq it assigns; the id is new per message (a resend reuses the stored bytes).


def build_prediction(p: Prediction, node: str, seq: int) -> bytes:
    return prediction_payload(p, seq, node, new_id())


def build_event(camera: str, event: Mapping[str, Any], node: str, seq: int) -> bytes:
    return event_payload(camera, event, seq, node, new_id())


def build_shadow(camera: str, report: Mapping[str, Any], node: str, seq: int) -> bytes:
    return shadow_payload(camera, report, seq, node, new_id())


# ---------------------------------------------------------------- retained state


def camera_status_payload(online: bool, reason: str, at: float) -> bytes:
    """Retained `<camera>/status`: {"state": "online"|"offline", "reason", "at"}."""
    return dumps({"state": "online" if online else "offline", "reason": reason, "at": rfc3339(at)})


def status_detail_payload(detail: Mapping[str, Any], at: float) -> bytes:
    """Retained `status/detail`: the merged detail keys (model, last_error, ...) and when it was built.

    Times are recorded as epoch seconds and written here as RFC 3339 UTC, like every other
    time in every payload: any `at` or `*_at` key, at any depth.
    """
    return dumps(_times_as_rfc3339({**detail, "at": at}))


def _times_as_rfc3339(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _times_as_rfc3339(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_times_as_rfc3339(v) for v in value]
    if (key == "at" or key.endswith("_at")) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return rfc3339(float(value))
    return value
