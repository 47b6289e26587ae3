"""Every metric visiond exports, on a private registry (served by the web front, serve/doors/http.py).

Stages only write these; nothing reads a metric to make a decision. Hot-path
writers cache `.labels()` children (a lookup costs more than the update).
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from visiond import __version__

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_INFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The metric families of DESIGN.md, registered on one private registry."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True):
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        # capture
        self.frames_captured = Counter("visiond_frames_captured", "Frames decoded from a source.", ["camera"], registry=r)
        self.frames_dropped = Counter(
            "visiond_frames_dropped", "Frames dropped before the model, by reason.", ["camera", "reason"], registry=r
        )
        self.queue_depth = Gauge("visiond_queue_depth", "Frames waiting for the model.", ["camera"], registry=r)
        self.source_up = Gauge("visiond_source_up", "1 while the source delivers frames.", ["camera"], registry=r)
        self.source_reconnects = Counter("visiond_source_reconnects", "Source reopen attempts.", ["camera"], registry=r)
        self.source_last_frame = Gauge(
            "visiond_source_last_frame_timestamp_seconds", "Wall time of the last frame.", ["camera"], registry=r
        )
        # model
        self.batch_size = Histogram("visiond_batch_size", "Frames per model call.", buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "visiond_inference_seconds", "Preprocess + forward time of one batch.", buckets=_INFER_BUCKETS, registry=r
        )
        self.predictions = Counter("visiond_predictions", "Classified frames.", ["camera", "label"], registry=r)
        self.model_info = Gauge("visiond_model_info", "The model in service (value 1).", ["name", "version", "arch"], registry=r)
        self.model_reload_failures = Counter(
            "visiond_model_reload_failures", "Checkpoints refused at reload.", registry=r
        )
        # delivery
        self.latency = Histogram(
            "visiond_latency_seconds", "Capture to broker acknowledgement.", ["camera"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.mqtt_connected = Gauge("visiond_mqtt_connected", "1 while connected to the broker.", registry=r)
        self.mqtt_publish = Counter("visiond_mqtt_publish", "Publish outcomes.", ["result"], registry=r)
        self.spool_messages = Gauge("visiond_spool_messages", "Messages waiting in the on-disk spool.", registry=r)
        self.spool_oldest_age = Gauge(
            "visiond_spool_oldest_age_seconds", "Age of the oldest spooled message.", registry=r
        )
        self.spool_dropped = Counter("visiond_spool_dropped", "Messages pushed out by the spool bound.", registry=r)
        # learning
        self.capture_saved = Counter("visiond_capture_saved", "Frames saved for labelling.", ["camera", "rule"], registry=r)
        self.capture_write_failures = Counter(
            "visiond_capture_write_failures", "Capture writes that failed.", ["camera", "reason"], registry=r
        )
        self.capture_skipped = Counter(
            "visiond_capture_skipped", "Frames a capture rule matched but did not save (duplicate, rate_limited).",
            ["camera", "reason"], registry=r
        )
        self.shadow_frames = Counter(
            "visiond_shadow_frames", "Frames the shadow candidate classified, by outcome (agree, disagree, skipped).",
            ["camera", "outcome"], registry=r
        )
        # part inspection (DESIGN.md "Inspecting parts")
        self.inspections = Counter("visiond_inspections", "Inspection verdicts, by verdict (OK, NG, ERROR).",
                                   ["camera", "verdict"], registry=r)
        self.inspection_seconds = Histogram(
            "visiond_inspection_seconds", "Trigger received to verdict decided and stored.", ["camera"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.triggers = Counter("visiond_triggers", "Inspection triggers received, by door.", ["camera", "door"],
                                registry=r)
        self.triggers_rejected = Counter(
            "visiond_triggers_rejected", "Triggers answered ERROR before a burst (busy, unknown_recipe, ...).",
            ["camera", "reason"], registry=r)
        self.evidence_saved = Counter("visiond_evidence_saved", "Inspections whose evidence images were written.",
                                      ["camera"], registry=r)
        self.evidence_write_failures = Counter(
            "visiond_evidence_write_failures", "Evidence images not written, by reason (disk_full, read_only, "
            "queue_full, error).", ["camera", "reason"], registry=r)
        self.evidence_evicted = Counter(
            "visiond_evidence_evicted", "Evidence files removed by age or quota.", ["reason"], registry=r)
        self.door_refusals = Counter(
            "visiond_door_refusals", "What a plant door refused: bad credentials or certificate, a write to a "
            "read-only register, a malformed frame.", ["door", "reason"], registry=r)
        self.http_requests = Counter("visiond_http_requests", "Web front requests, by route and status code.",
                                     ["route", "code"], registry=r)
        self.results_rows = Gauge("visiond_results_rows", "Verdicts held in the results store.", registry=r)
        self.results_write_failures = Counter(
            "visiond_results_write_failures", "Verdicts the results store could not write.", registry=r)
        # process
        self.build_info = Info("visiond_build", "visiond build.", registry=r)
        self.build_info.info({"version": __version__})
        for result in ("acked", "failed", "denied"):
            self.mqtt_publish.labels(result=result)
        self.mqtt_connected.set(0)

    def init_camera(self, camera: str) -> None:
        """Create a camera's series at zero so dashboards see them before the first event."""
        self.frames_captured.labels(camera=camera)
        for reason in ("queue_full", "decode_error"):
            self.frames_dropped.labels(camera=camera, reason=reason)
        self.queue_depth.labels(camera=camera).set(0)
        self.source_up.labels(camera=camera).set(0)
        self.source_reconnects.labels(camera=camera)

    def set_model(self, name: str, version: str, arch: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version, arch=arch).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
