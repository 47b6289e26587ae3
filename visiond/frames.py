"""Plain values handed from stage to stage: Frame -> Prediction (a batch is a list of Frames).

Each stage owns one job and passes one of these on; no stage reaches back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded image from one camera, uint8 HWC (BGR or grey as decoded)."""

    camera: str
    index: int  # per-camera frame counter, from 0 at source start
    captured_at: float  # wall clock, seconds since the epoch (UTC)
    captured_mono: float  # time.monotonic() at capture, for latency
    image: np.ndarray
    enqueued_mono: float = 0.0  # time.monotonic() when it entered the queue


@dataclass(frozen=True, slots=True)
class Timings:
    queue_s: float  # capture -> batch formed
    inference_s: float  # batch formed -> scores ready (whole batch)
    total_s: float  # capture -> prediction ready


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Prediction:
    """The verdict on one frame, before it becomes a message."""

    frame: Frame
    label: str
    score: float
    top: tuple[tuple[str, float], ...]
    defect: bool
    model: ModelRef
    timings: Timings
    batch_id: int = 0  # which model call classified it (audit trail, batching tests)
    roi: str = "full"  # the camera's inspection point (DESIGN.md "Inspecting parts"); "full" without rois
    crop: np.ndarray | None = None  # what the model saw (the ROI of the full frame); None = the whole frame
    served_default: bool = True  # classified by the default model (shadow mode compares only those)

    @property
    def camera(self) -> str:
        return self.frame.camera

    @property
    def image(self) -> np.ndarray:
        """The pixels the model classified: the ROI's crop of the full-resolution frame."""
        return self.frame.image if self.crop is None else self.crop
