"""Shared fixtures: a private Mosquitto, synthetic line footage and a real RTSP server.

Tests use real parts (DESIGN.md). A missing system binary fails the fixture with
the Debian package to install: a skipped test would hide a broken environment.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # tools.* and mqtt_helpers import without installing
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from mqtt_helpers import MqttRecorder  # noqa: E402
from tools import synthline  # noqa: E402
from visiond.harness.broker import Broker  # noqa: E402
from visiond.harness.process import free_port, stop_process, wait_for_port  # noqa: E402, F401 (tests import them here)

pytest_plugins = ["tiers"]  # marks the slow tests that `make test-fast` leaves out

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = ROOT / "tools" / "rtsp_server.py"
SYNTH_SEED = 7


def require_binary(name: str, package: str) -> str:
    """The binary's path, or fail the test naming the Debian package that provides it."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package '{package}' (apt-get install {package})")
    return path


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    return free_port()


class Mosquitto(Broker):
    """The harness's private broker, started as the tests start it (binary found by `require_binary`)."""

    def __init__(self, binary: str, workdir: Path):
        super().__init__(workdir, binary=binary)


@pytest.fixture
def mosquitto(tmp_path_factory) -> Mosquitto:
    """A fresh private broker per test, never on port 1883."""
    broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_recorder(mosquitto):
    """A factory: ``mqtt_recorder("visiond/#")`` returns a started MqttRecorder on the test's broker."""
    recorders: list[MqttRecorder] = []

    def start(topic_filter: str = "#", host: str | None = None, port: int | None = None) -> MqttRecorder:
        recorder = MqttRecorder(host or mosquitto.host, port or mosquitto.port, topic_filter).start()
        recorders.append(recorder)
        return recorder

    yield start
    for recorder in recorders:
        recorder.stop()


@dataclass(frozen=True)
class SynthVideo:
    """A rendered line video with its ground truth (one label per decoded frame)."""

    path: Path
    truth_path: Path
    truth: list[str]
    roi: tuple[int, int, int, int]
    fps: int
    seed: int


def make_synth_video(directory: Path, frames: int, seed: int = SYNTH_SEED, fps: int = 30) -> SynthVideo:
    """Render a synthetic line video; fails the test when ffmpeg is missing."""
    require_binary("ffmpeg", "ffmpeg")
    path = directory / f"line_{frames}f_seed{seed}.mp4"
    csv_path = synthline.render_video(path, frames, seed, fps=fps)
    return SynthVideo(path, csv_path, synthline.read_truth(csv_path), synthline.default_roi(640, 480), fps, seed)


@pytest.fixture(scope="session")
def synth_video(tmp_path_factory) -> SynthVideo:
    """300 frames (10 s at 30 fps) of 640x480 line footage, shared by the whole session."""
    return make_synth_video(tmp_path_factory.mktemp("synth_video"), 300)


@pytest.fixture(scope="session")
def synth_images(tmp_path_factory) -> Path:
    """A labelled image folder, ``<root>/<label>/<label>_<i>.png``, 80 ROI crops per class."""
    root = tmp_path_factory.mktemp("synth_images")
    synthline.render_images(root, 80, SYNTH_SEED)
    return root


@dataclass
class RtspServer:
    url: str
    proc: subprocess.Popen
    video: Path

    def stop(self) -> None:
        stop_process(self.proc)


def start_rtsp_server(video: Path, workdir: Path, path: str = "/line", timeout: float = 20.0) -> RtspServer:
    """Run tools/rtsp_server.py with the system python and wait for its READY line."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} not found: install the Debian packages 'python3 python3-gi "
                    "gir1.2-gst-rtsp-server-1.0'")
    stderr_path = workdir / f"rtsp_server_{time.monotonic_ns()}.stderr"
    command = [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", "0", "--path", path, "--video", str(video)]
    with open(stderr_path, "wb") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    line = _first_line(proc, timeout)
    if not line.startswith("READY "):
        stop_process(proc)
        stderr = stderr_path.read_text(errors="replace")[-2000:]
        pytest.fail(f"rtsp_server.py did not become ready ({line!r}): {stderr}")
    return RtspServer(line.split()[1], proc, video)


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, or "" on timeout or exit; a thread keeps draining the pipe after it."""
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=drain, daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


@pytest.fixture
def rtsp_server_factory(tmp_path):
    """A factory: ``rtsp_server_factory(video_path)`` serves a file in a loop; all stop at teardown."""
    servers: list[RtspServer] = []

    def start(video: Path, path: str = "/line") -> RtspServer:
        servers.append(start_rtsp_server(Path(video), tmp_path, path))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def rtsp_server(rtsp_server_factory, synth_video) -> RtspServer:
    """The session's synthetic video served over RTSP on 127.0.0.1, looped forever."""
    return rtsp_server_factory(synth_video.path)


@pytest.fixture(scope="session")
def line_model(tmp_path_factory, synth_images) -> Path:
    """A smallcnn trained on the synthetic line crops, shared by every daemon-level test."""
    from daemon_helpers import trained_line_model

    return trained_line_model(tmp_path_factory.getbasetemp(), synth_images)
