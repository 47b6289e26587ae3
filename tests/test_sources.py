"""FrameSource on real video files, image folders and a real RTSP server; given / when / then."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np

from visiond.config import CameraConfig
from visiond.frames import Frame
from visiond.serve.metrics import Metrics
from visiond.serve.queues import FrameHub, FrameQueue
from visiond.serve.sources import Backoff, FrameSource
from visiond.video import ImageFolderCapture, configure_v4l2, default_policy, open_capture, source_kind

_SYSTEM_PYTHON = "/usr/bin/python3"  # the one with GStreamer's RTSP server (python3-gi)
_RTSP_SERVER = Path(__file__).resolve().parents[1] / "tools" / "rtsp_server.py"


class Harness:
    """One camera wired the way the pipeline wires it: source -> queue -> hub, statuses recorded."""

    def __init__(self, cfg: CameraConfig, policy: str | None = None, queue_size: int = 4, **source_kwargs):
        self.metrics = Metrics(process=False)
        self.metrics.init_camera(cfg.name)
        self.queue = FrameQueue(cfg.name, queue_size, policy or default_policy(cfg.source), self.metrics)
        self.hub = FrameHub([self.queue])
        self.stop = threading.Event()
        self.statuses: list[tuple[float, bool, str]] = []
        self._changed = threading.Condition()
        self.source = FrameSource(cfg, self.queue, self.metrics, self._on_status, self.stop, **source_kwargs)

    def _on_status(self, camera: str, online: bool, reason: str) -> None:
        with self._changed:
            self.statuses.append((time.monotonic(), online, reason))
            self._changed.notify_all()

    def __enter__(self) -> Harness:
        self.source.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.hub.wake()
        self.source.join(10)
        assert not self.source.alive(), "the source thread did not stop"

    def take(self, n: int, timeout: float = 20) -> list[Frame]:
        """Consume until n frames arrived, the source ended, or timeout."""
        got: list[Frame] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            if self.hub.wait(timeout=0.2):
                got += self.hub.take(n - len(got))
            elif self.hub.all_closed_and_empty:
                break
        return got

    def drain_all(self, timeout: float = 30) -> list[Frame]:
        return self.take(10**9, timeout)

    def wait_status(self, online: bool, timeout: float, since: float = 0.0) -> tuple[float, bool, str] | None:
        """The first status with this `online` value reported after `since`, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for status in self.statuses:
                    if status[0] >= since and status[1] == online:
                        return status
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def sample(self, name: str, **labels) -> float:
        value = self.metrics.registry.get_sample_value(name, {"camera": self.source.camera, **labels})
        return 0.0 if value is None else value


def _camera(source, **kw) -> CameraConfig:
    return CameraConfig(name="cam", source=str(source), **kw)


def _threads_and_fds() -> tuple[int, int, int]:
    """Python threads, native threads (FFmpeg's too) and open file descriptors of this process."""
    return threading.active_count(), len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- files and folders


def test_file_source_yields_every_frame_in_order_then_closes(synth_video):
    # given a file camera with a small queue (policy defaults to every for files)
    cfg = _camera(synth_video.path)
    assert default_policy(cfg.source) == "every"
    with Harness(cfg, queue_size=2) as h:
        # when a consumer takes everything
        frames = h.drain_all()
        h.source.join(5)
        # then exactly the file's frames arrive, in order, and the source ends cleanly
        assert [f.index for f in frames] == list(range(len(synth_video.truth)))
        assert h.hub.all_closed_and_empty and not h.source.alive()
        assert h.sample("visiond_frames_captured_total") == len(synth_video.truth)
        assert h.sample("visiond_frames_dropped_total", reason="queue_full") == 0
        assert [(online, reason) for _, online, reason in h.statuses] == [(True, "streaming"), (False, "end of input")]
        first = frames[0]
        assert first.image.dtype == np.uint8 and first.image.shape == (480, 640, 3)
        assert first.captured_mono <= first.enqueued_mono and abs(first.captured_at - time.time()) < 60


def test_looping_file_wraps_and_keeps_counting(synth_video):
    # given a looping file camera
    n = len(synth_video.truth)
    with Harness(_camera(synth_video.path, loop=True)) as h:
        # when more than two passes are consumed
        frames = h.take(2 * n + 5)
    # then the index keeps increasing across the wrap and the picture starts over
    assert [f.index for f in frames] == list(range(2 * n + 5))
    assert np.array_equal(frames[0].image, frames[n].image)
    assert np.array_equal(frames[3].image, frames[2 * n + 3].image)
    assert not np.array_equal(frames[0].image, frames[n // 2].image)


def test_fps_cap_paces_a_file(synth_video):
    # given a file capped at 20 fps
    with Harness(_camera(synth_video.path, fps=20)) as h:
        # when 21 frames are consumed
        frames = h.take(21)
    # then they were captured at about 20 fps (generous: a loaded 2-core box only ever runs slower)
    span = frames[-1].captured_mono - frames[0].captured_mono
    rate = (len(frames) - 1) / span
    assert 12 <= rate <= 21, f"{rate:.1f} fps"


def test_roi_crops_a_view_of_the_frame(synth_video):
    # given a camera with the synthetic line's ROI
    x, y, w, h_ = synth_video.roi
    with Harness(_camera(synth_video.path, roi=synth_video.roi)) as h:
        frames = h.take(3)
    # then frames have the ROI's shape and are views (no copy) matching a direct crop
    assert frames[0].image.shape == (h_, w, 3)
    assert frames[0].image.base is not None
    cap = cv2.VideoCapture(str(synth_video.path))
    ok, full = cap.read()
    cap.release()
    assert ok and np.array_equal(frames[0].image, full[y : y + h_, x : x + w])


def test_roi_partly_outside_is_clamped(synth_video):
    # given a ROI running past the right and bottom edges of a 640x480 frame
    with Harness(_camera(synth_video.path, roi=(600, 400, 100, 100))) as h:
        frames = h.take(2)
    # then the crop is what lies inside
    assert frames[0].image.shape == (80, 40, 3)


def test_roi_outside_the_frame_is_a_status_line_not_a_crash(synth_video):
    # given a ROI entirely right of a 640x480 frame
    with Harness(_camera(synth_video.path, roi=(700, 0, 50, 50))) as h:
        # when the source reads its first frame
        frames = h.drain_all(timeout=10)
        h.source.join(5)
        # then no frame is delivered, the source ends, and the status says why
        assert frames == [] and not h.source.alive() and h.hub.all_closed_and_empty
        offline = h.wait_status(False, timeout=1)
        assert offline is not None and "outside the 640x480 frame" in offline[2]
        assert h.sample("visiond_source_up") == 0


def test_folder_source_skips_a_corrupt_image_and_counts_it(tmp_path):
    # given a folder of 5 images (numbered naturally) with a corrupt file in the middle and a stray text file
    for i in (1, 2, 10, 11, 20):
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), np.full((48, 64, 3), i, np.uint8))
    (tmp_path / "frame3.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert source_kind(str(tmp_path)) == "folder"
    with Harness(_camera(tmp_path)) as h:
        # when it plays to the end
        frames = h.drain_all()
        h.source.join(5)
        # then the 5 good images arrive in natural order and the corrupt one is a counted decode_error
        assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 10, 11, 20]
        assert [f.index for f in frames] == list(range(5))
        assert h.sample("visiond_frames_dropped_total", reason="decode_error") == 1
        assert h.hub.all_closed_and_empty


def test_missing_file_reports_offline_and_ends(tmp_path):
    # given a camera whose file does not exist
    with Harness(_camera(tmp_path / "missing.mp4")) as h:
        h.source.join(5)
        # then the source ends with a status naming the file, and nothing crashes
        assert not h.source.alive() and h.hub.all_closed_and_empty
        assert h.statuses[-1][1:] == (False, f"cannot open {tmp_path / 'missing.mp4'}")


def test_v4l2_properties_applied_to_a_file_capture_do_not_break_reading(synth_video):
    # given a capture that is not a V4L2 camera
    cap = cv2.VideoCapture(str(synth_video.path), cv2.CAP_FFMPEG)
    try:
        # when the V4L2 setup runs on it
        applied = configure_v4l2(cap, fps=15)
        # then it returns what each property did, and every frame still decodes
        assert set(applied) == {"fourcc", "buffersize", "fps"}
        count = 0
        while True:
            ok, image = cap.read()
            if not ok:
                break
            assert image.shape == (480, 640, 3)
            count += 1
        assert count == len(synth_video.truth)
    finally:
        cap.release()


def test_source_kinds_choose_the_backend(tmp_path, synth_video):
    assert source_kind("rtsp://u:p@10.0.0.5/stream1") == "stream"
    assert source_kind("rtsps://cam/1") == "stream"
    assert source_kind("http://cam/mjpg") == "stream"
    assert source_kind("0") == "device" and source_kind(2) == "device"
    assert source_kind("/dev/video3") == "device"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind(str(synth_video.path)) == "file"
    assert source_kind(f"file://{synth_video.path}") == "file"
    assert default_policy("rtsp://cam/1") == "latest" and default_policy("/dev/video0") == "latest"
    folder = open_capture(str(tmp_path), _camera(tmp_path))
    assert isinstance(folder, ImageFolderCapture) and folder.isOpened()
    folder.release()


def test_backoff_grows_jitters_and_caps():
    backoff = Backoff(initial_s=0.5, cap_s=30)
    delays = [[backoff.delay(a) for a in range(12)] for _ in range(50)]
    assert all(0.25 <= d[0] <= 0.5 for d in delays)
    assert all(15 <= d[11] <= 30 for d in delays)
    assert len({round(d[3], 6) for d in delays}) > 10  # jittered: cameras do not retry in step


# --------------------------------------------------------------------------- a read that hangs


class _HangingCapture:
    """A real file capture whose grab() blocks while `gate` is clear: a driver that hangs in read()."""

    def __init__(self, path: Path, gate: threading.Event, released: list):
        self._cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        self._gate = gate
        self._released = released

    def isOpened(self) -> bool:  # noqa: N802
        return self._cap.isOpened()

    def grab(self) -> bool:
        self._gate.wait()
        time.sleep(1 / 30)
        return self._cap.grab()

    def retrieve(self, *args):
        return self._cap.retrieve()

    def release(self) -> None:
        self._released.append(True)
        self._cap.release()


def test_watchdog_reports_a_hung_read_and_recovers(synth_video):
    # given a live camera whose driver read can hang forever
    gate = threading.Event()
    gate.set()
    released: list = []
    cfg = _camera("rtsp://127.0.0.1:9/hangs", read_timeout_s=1.0)
    opener = lambda source, cfg, on_error=None: _HangingCapture(synth_video.path, gate, released)  # noqa: E731
    with Harness(cfg, opener=opener) as h:
        assert len(h.take(5)) == 5 and h.sample("visiond_source_up") == 1
        # when read() blocks and never returns on its own
        hung_at = time.monotonic()
        gate.clear()
        # then the watchdog reports the stall within read_timeout + 2 s, while read() is still blocked
        offline = h.wait_status(False, timeout=cfg.read_timeout_s + 2, since=hung_at)
        assert offline is not None and offline[2].startswith("stalled: no frame for")
        assert offline[0] - hung_at <= cfg.read_timeout_s + 2
        assert h.sample("visiond_source_up") == 0
        # when the driver comes back
        back_at = time.monotonic()
        gate.set()
        # then frames flow and the camera is up again
        assert h.wait_status(True, timeout=5, since=back_at) is not None
        assert len(h.take(5)) == 5 and h.sample("visiond_source_up") == 1


# --------------------------------------------------------------------------- a real RTSP server


def test_rtsp_source_gets_frames(rtsp_server):
    # given a camera on the RTSP server (policy defaults to latest for live sources)
    cfg = _camera(rtsp_server.url, read_timeout_s=3, open_timeout_s=5)
    assert default_policy(cfg.source) == "latest"
    with Harness(cfg) as h:
        # when the consumer reads for a while
        frames = h.take(30, timeout=20)
        # then frames arrive, stamped, in order, and the camera is reported up
        assert len(frames) == 30
        assert all(b.index > a.index for a, b in zip(frames, frames[1:]))
        assert frames[0].image.dtype == np.uint8 and frames[0].image.ndim == 3
        assert h.statuses[0][1:] == (True, "streaming")
        assert h.sample("visiond_source_up") == 1
        assert abs(h.sample("visiond_source_last_frame_timestamp_seconds") - time.time()) < 5


def test_fps_cap_on_a_live_stream_skips_frames_instead_of_lagging(rtsp_server):
    # given a 30 fps RTSP camera capped at 10 fps
    with Harness(_camera(rtsp_server.url, fps=10, read_timeout_s=3, open_timeout_s=5)) as h:
        # when frames are consumed for about two seconds
        frames = h.take(21, timeout=20)
    # then about 10 fps arrive, and the skipped frames are neither queued nor counted as drops
    rate = (len(frames) - 1) / (frames[-1].captured_mono - frames[0].captured_mono)
    assert 7 <= rate <= 11, f"{rate:.1f} fps"
    assert h.sample("visiond_frames_dropped_total", reason="queue_full") == 0


def test_rtsp_server_killed_then_restarted(rtsp_server):
    # given a streaming RTSP camera with a short backoff
    cfg = _camera(rtsp_server.url, read_timeout_s=2, open_timeout_s=3)
    with Harness(cfg, backoff=Backoff(initial_s=0.1, cap_s=0.5)) as h:
        assert len(h.take(10, timeout=20)) == 10
        # when the server dies
        killed_at = time.monotonic()
        rtsp_server.proc.send_signal(signal.SIGKILL)
        rtsp_server.proc.wait(5)
        # then the camera goes offline within read_timeout + 2 s
        offline = h.wait_status(False, timeout=cfg.read_timeout_s + 2, since=killed_at)
        assert offline is not None, h.statuses
        assert offline[0] - killed_at <= cfg.read_timeout_s + 2
        assert h.sample("visiond_source_up") == 0
        time.sleep(1.0)  # a few failed reconnects against the closed port
        # when the server comes back on the same port
        restarted_at = time.monotonic()
        with _serve_again(rtsp_server.url, rtsp_server.video):
            # then frames resume and the reconnects were counted
            assert h.wait_status(True, timeout=20, since=restarted_at) is not None, h.statuses
            assert len(h.take(10, timeout=20)) == 10
            assert h.sample("visiond_source_up") == 1
            assert h.sample("visiond_source_reconnects_total") >= 2


def test_rtsp_stall_reports_offline(rtsp_server):
    # given a streaming RTSP camera
    cfg = _camera(rtsp_server.url, read_timeout_s=2, open_timeout_s=2)
    with Harness(cfg, backoff=Backoff(initial_s=0.1, cap_s=0.5)) as h:
        assert len(h.take(10, timeout=20)) == 10
        # when the server freezes (alive, socket open, no data)
        stalled_at = time.monotonic()
        rtsp_server.proc.send_signal(signal.SIGSTOP)
        try:
            # then the camera is reported stalled within read_timeout + 2 s
            offline = h.wait_status(False, timeout=cfg.read_timeout_s + 2, since=stalled_at)
            assert offline is not None, h.statuses
            assert offline[2].startswith("stalled: no frame for")
            assert h.sample("visiond_source_up") == 0
        finally:
            rtsp_server.proc.send_signal(signal.SIGCONT)


def test_dead_rtsp_url_retries_without_leaking_threads_or_fds(free_port):
    # given a camera whose URL (with a password) has nothing listening behind it
    cfg = _camera(f"rtsp://inspect:hunter2@127.0.0.1:{free_port}/stream1", open_timeout_s=2)
    with Harness(cfg, backoff=Backoff(initial_s=0.005, cap_s=0.02)) as h:
        # when it has retried a few times (libraries loaded), then ~10 times more
        _wait_for(lambda: h.sample("visiond_source_reconnects_total") >= 3, timeout=20)
        before = _threads_and_fds()
        start = h.sample("visiond_source_reconnects_total")
        _wait_for(lambda: h.sample("visiond_source_reconnects_total") >= start + 10, timeout=30)
        after = _threads_and_fds()
        # then no thread or file descriptor was left behind by any attempt
        assert after == before, f"threads, native threads, fds: before {before}, after {after}"
        # and the camera is offline with a reason that hides the password
        assert h.sample("visiond_source_up") == 0
        reasons = [reason for _, _, reason in h.statuses]
        assert reasons and all("hunter2" not in r for r in reasons)
        assert any("inspect:***@" in r for r in reasons)


@contextlib.contextmanager
def _serve_again(url: str, video: Path):
    """A new tools/rtsp_server.py on the port of `url` (the fixture's server picks a random one)."""
    parts = urlsplit(url)
    command = [_SYSTEM_PYTHON, str(_RTSP_SERVER), "--port", str(parts.port), "--path", parts.path, "--video", str(video)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # the server prints READY once it listens, or exits
        assert line.startswith("READY "), f"rtsp_server.py did not restart on port {parts.port}: {line!r}"
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
