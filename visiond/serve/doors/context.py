"""What the web front (and any other door) may use of the running daemon, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visiond.config import Config
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub
from visiond.serve.worker import ModelSlot


@dataclass
class WebContext:
    cfg: Config
    metrics: Metrics
    health: Callable[[], tuple[bool, dict]]  # /healthz: (ok, detail)
    slot: ModelSlot  # slot.active: the serving set (models, ROI plans, recipe)
    hub: FrameHub  # hub.submit(InferenceRequest), hub.pending_requests()
    control: Any = None  # visiond.serve.control.Control (switch_recipe, ...)
    inspection: Any = None  # visiond.serve.inspect.service.InspectionService, None without triggered cameras
    store: Any = None  # visiond.serve.inspect.store.ResultsStore, None without triggered cameras
    evidence_dir: Path | None = None
    sources: dict = field(default_factory=dict)  # camera -> FrameSource (`.latest`: its newest Frame, or None)
    live: Any = None  # the operator page's state (visiond.serve.doors.live.LiveState), fed by the daemon
