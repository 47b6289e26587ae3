"""Helpers of the learning-loop tests: models that lack a class, ground truth of captured frames."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import paho.mqtt.publish as paho_publish
import pytest

from tools import synthline


def visiond(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real entry point, so exit codes and stderr are what a shell sees."""
    return subprocess.run([sys.executable, "-m", "visiond", *args], capture_output=True, text=True, timeout=timeout,
                          input=input)


def without_class(images: Path, dest: Path, dropped: str = "spot") -> Path:
    """A copy of a class-folder tree without one class (a line whose model never saw that defect)."""
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(images, tmp, ignore=lambda d, names: [dropped] if Path(d) == images else [])
        tmp.rename(dest)
    return dest


def trained_model(out: Path, images: Path, epochs: int = 10, seed: int = 3, **kw) -> Path:
    """A smallcnn on a class-folder tree, trained once per path (cached on disk)."""
    from visiond.train.loop import TrainOptions, train

    if not out.exists():
        train(TrainOptions(data=images, out=out, arch="smallcnn", epochs=epochs, image_size=64, seed=seed,
                           augment="none", progress=False, **kw))
    return out


def frame_truth(video: Path, roi: tuple[int, int, int, int]) -> dict[str, int]:
    """sha256 of each ROI crop's pixels -> its frame index, decoded as the daemon decodes the file.

    A captured PNG holds the exact pixels the daemon saw, so its hash names the frame
    and the line's truth file names what is on it.
    """
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    out, i = {}, 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            out.setdefault(pixel_hash(np.ascontiguousarray(synthline.crop(frame, roi))), i)
            i += 1
    finally:
        cap.release()
    return out


def pixel_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def publish(broker, topic: str, body: dict | str | bytes, qos: int = 1) -> None:
    """One message to the test broker, as an operator's tool would send a command."""
    payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
    paho_publish.single(topic, payload, qos=qos, hostname=broker.host, port=broker.port, protocol=paho.MQTTv5)


def epoch(rfc3339: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="session")
def model_without_spot(tmp_path_factory, synth_images) -> Path:
    """A smallcnn trained on empty/ok/scratch only: the line's model before spots ever appeared."""
    base = tmp_path_factory.getbasetemp()
    images = without_class(synth_images, base / "synth_images_no_spot", "spot")
    return trained_model(base / "model_no_spot" / "no_spot.ckpt", images, epochs=10)
