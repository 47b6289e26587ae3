"""Lifecycle under a service manager: READY, honest WATCHDOG pings, STOPPING, clean stop, dying stages.

The daemon runs as a real process with a fake `$NOTIFY_SOCKET` (an abstract
AF_UNIX datagram socket this test binds), `WATCHDOG_USEC` set and
`WATCHDOG_PID` unset (systemd sets it to the main pid; the child's pid is not
known before it starts). Stalls are real, not hooks in the product: a capture
read wedged on a FIFO whose writer went quiet, an audit-trail write that blocks
because the pipe's reader stopped reading, a spool write (and, separately, the
MQTT thread recording acks) stuck on the spool's write lock held by another
process: what a hung disk looks like.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port, require_binary
from daemon_helpers import Daemon, line_cfg, metric_value, wait_offline

WATCHDOG_USEC = 2_000_000  # pings every 1 s
STOP_TIMEOUT_S = 20  # TimeoutStopSec of systemd/visiond.service


class NotifySocket:
    """What systemd would receive: every datagram, with its arrival time."""

    def __init__(self):
        self.name = f"@visiond-test-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name[1:])
        self._sock.settimeout(0.2)
        self._messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self._messages.append((time.monotonic(), data.decode(errors="replace")))
                self._cond.notify_all()

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def messages(self, since: float = 0.0) -> list[tuple[float, str]]:
        with self._cond:
            return [(t, m) for t, m in self._messages if t >= since]

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, m in self.messages(since) if "WATCHDOG=1" in m.splitlines()]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [line[len("STATUS="):] for _, m in self.messages(since) for line in m.splitlines()
                if line.startswith("STATUS=")]

    def wait_for(self, predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> float:
        """The time the predicate first held; fails with what arrived (and whether the daemon died)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0 or (proc is not None and proc.poll() is not None):
                    tail = [m for _, m in self._messages[-8:]]
                    died = f"; daemon exited {proc.returncode}" if proc is not None and proc.poll() is not None else ""
                    raise AssertionError(f"{what} not seen within {timeout} s{died}; last messages: {tail}")
                self._cond.wait(min(left, 0.5))
            return time.monotonic()

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # it would have to equal the child's pid
    sock = NotifySocket()
    yield sock
    sock.close()


def _has(line: str):
    return lambda msgs: any(line in m.splitlines() for _, m in msgs)


def _status_with(text: str, since: float = 0.0):
    return lambda msgs: any(ln.startswith("STATUS=") and text in ln for t, m in msgs if t >= since
                            for ln in m.splitlines())


def _no_pings_for(notify: NotifySocket, since: float, seconds: float, proc: subprocess.Popen) -> None:
    """No WATCHDOG=1 from `since` for `seconds` (3 ping intervals and more), while the daemon keeps running."""
    time.sleep(max(0.0, since + seconds - time.monotonic()))
    assert notify.pings(since) == [], f"pings went on during a stall: {notify.messages(since)[-5:]}"
    assert proc.poll() is None, "a stall is for the service manager to act on; the daemon must not exit by itself"


def _spool_write_lock(spool_dir: Path) -> sqlite3.Connection:
    """Hold the spool's write lock from another process's point of view (an operator's sqlite3 shell)."""
    db = sqlite3.connect(spool_dir / "spool.sqlite3", isolation_level=None, timeout=30)
    db.execute("BEGIN IMMEDIATE")
    return db


# --------------------------------------------------------------------------- ready, pings, clean stop


def test_ready_pings_and_a_clean_stop_mid_batch_lose_nothing(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                              synth_video, notify):
    # given a daemon under a fake service manager: a looping file that keeps the model busy (every stop is
    # mid-batch) and a camera that never answers (it must not cost the daemon its watchdog)
    rec = mqtt_recorder("visiond/#")
    dead = f"rtsp://127.0.0.1:{free_port()}/none"
    cams = [{"name": "line1", "source": str(synth_video.path), "loop": True, "roi": list(synth_video.roi)},
            {"name": "dead", "source": dead, "open_timeout_s": 1, "read_timeout_s": 1}]
    jsonl = tmp_path / "verdicts.jsonl"
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, cams, jsonl={"path": str(jsonl)}), env=notify.env())
    try:
        # when it starts, READY=1 comes once the model is warm and every stage runs
        ready = notify.wait_for(_has("READY=1"), 120, "READY=1", d.proc)
        assert d.http("/metrics")[0] == 200
        # then WATCHDOG=1 comes every WATCHDOG_USEC/2 while the dead camera keeps failing
        notify.wait_for(lambda ms: len([1 for t, m in ms if t > ready and "WATCHDOG=1" in m]) >= 5, 30,
                        "five watchdog pings", d.proc)
        pings = notify.pings(ready)
        assert max(b - a for a, b in zip(pings, pings[1:])) < 5, pings
        text = d.http("/metrics")[1].decode()
        assert metric_value(text, "visiond_source_up", camera="dead") == 0
        assert metric_value(text, "visiond_source_reconnects_total", camera="dead") >= 1
        assert any("camera(s) streaming" in s and "frames classified" in s for s in notify.statuses(ready))
        assert metric_value(text, "visiond_predictions_total", camera="line1") > 0
        # when SIGTERM arrives mid-batch
        t0 = time.monotonic()
        d.send(signal.SIGTERM)
        rc = d.wait(STOP_TIMEOUT_S + 10)
        took = time.monotonic() - t0
    finally:
        d.close()
    # then it exits 0 within the unit's stop timeout, having said STOPPING=1
    assert rc == 0, d.stderr[-3000:]
    assert took < STOP_TIMEOUT_S, took
    assert any("STOPPING=1" in m for _, m in notify.messages())
    # and every classified frame is either delivered or still in the spool for the next start
    classified = len(jsonl.read_text().splitlines())
    assert classified > 0
    with sqlite3.connect(tmp_path / "spool" / "spool.sqlite3") as db:
        rows = db.execute("SELECT topic, payload FROM messages").fetchall()
    spooled = {json.loads(p)["seq"] for t, p in rows if t.endswith("/prediction")}

    def delivered() -> set[int]:
        return {p["seq"] for p in rec.json_payloads("/prediction")}

    rec.wait_for(lambda ms: len(delivered() | spooled) >= classified, 15)
    assert delivered() | spooled == set(range(1, classified + 1))
    # and the retained offline came from the daemon itself: the broker saw a clean DISCONNECT, so no will
    wait_offline(rec, 10)
    assert [m.payload for m in rec.messages("visiond/testbox/status")][-1] == b"offline"
    broker_log = mosquitto.log.read_text()
    assert "Client visiond-testbox disconnected." in broker_log, broker_log[-2000:]
    assert "Client visiond-testbox closed its connection." not in broker_log
    assert "disconnected from broker" in d.stderr


# --------------------------------------------------------------------------- stalls stop the pings


class FifoFeed:
    """A video arriving through a FIFO: the test decides when the bytes stop coming."""

    def __init__(self, ts_file: Path, fifo: Path):
        self.data = ts_file.read_bytes()
        self.fifo = fifo
        os.mkfifo(fifo)
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)

    def start(self, fraction: float) -> FifoFeed:
        self._cut = int(len(self.data) * fraction)
        self._thread.start()
        return self

    def _write(self) -> None:
        with open(self.fifo, "wb") as f:  # blocks until the daemon opens the camera
            f.write(self.data[:self._cut])
            f.flush()
            self._release.wait(300)  # the writer goes quiet but keeps the pipe open: reads block

    def end(self) -> None:
        self._release.set()  # closing the write end: the reader sees end of input
        self._thread.join(10)


@pytest.fixture
def ts_video(synth_video, tmp_path) -> Path:
    """The synthetic line as MPEG-TS, which FFmpeg reads from a pipe."""
    ffmpeg = require_binary("ffmpeg", "ffmpeg")
    out = tmp_path / "line.ts"
    subprocess.run([ffmpeg, "-v", "error", "-y", "-i", str(synth_video.path), "-c", "copy", "-f", "mpegts", str(out)],
                   check=True, timeout=60)
    return out


def test_a_capture_read_that_hangs_stops_the_pings(tmp_path, mosquitto, line_model, synth_video, ts_video, notify):
    # given a camera fed through a FIFO (read timeout 1 s); half the video arrives, then the writer goes quiet
    feed = FifoFeed(ts_video, tmp_path / "feed.ts")
    cam = {"name": "pipe", "source": str(feed.fifo), "roi": list(synth_video.roi), "read_timeout_s": 1,
           "open_timeout_s": 5}
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, [cam]), env=notify.env())
    feed.start(0.5)
    try:
        ready = notify.wait_for(_has("READY=1"), 120, "READY=1", d.proc)
        # when the capture thread sits in a read no timeout can end (a plain file read never times out)
        stalled = notify.wait_for(_status_with("capture stalled: camera pipe", ready), 60, "capture stall", d.proc)
        # then pings went out while the read was still within its bound, and stop once it is past it
        assert len(notify.pings(ready)) >= 3, notify.messages(ready)
        _no_pings_for(notify, stalled, 5, d.proc)
        assert "watchdog pings withheld" in d.stderr and "capture stalled: camera pipe" in d.stderr
        # when the rest of the input ends the read, the daemon finishes the file and exits 0
        feed.end()
        assert d.wait(60) == 0, d.stderr[-3000:]
    finally:
        feed.end()
        d.close()


class PipeReader:
    """The reading end of a FIFO with a one-page buffer, drained only while `draining` is set."""

    def __init__(self, fifo: Path):
        os.mkfifo(fifo)
        self.fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer's open() return at once
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)
        self.draining = threading.Event()
        self.draining.set()
        self._done = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._done:
            if not self.draining.wait(0.1):
                continue
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    os.read(self.fd, 65536)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        self._done = True
        self._thread.join(2)
        os.close(self.fd)


def test_a_stalled_inference_stops_the_pings_and_they_resume(tmp_path, mosquitto, line_model, synth_video, notify):
    # given a daemon whose audit trail goes to a pipe (a log shipper), and a camera at 10 fps
    reader = PipeReader(tmp_path / "verdicts.jsonl")
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 10, "roi": list(synth_video.roi)}
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, [cam], jsonl={"path": str(tmp_path / "verdicts.jsonl")}),
               env=notify.env())
    try:
        ready = notify.wait_for(_has("READY=1"), 120, "READY=1", d.proc)
        notify.wait_for(lambda ms: len([1 for t, m in ms if t > ready and "WATCHDOG=1" in m]) >= 2, 30, "pings",
                        d.proc)
        # when the shipper stops reading, the pipe fills and the inference thread hangs in its write
        # (a hung NFS mount or a dying disk under the audit trail looks the same)
        reader.draining.clear()
        stalled = notify.wait_for(_status_with("inference stalled", ready), 40, "inference stall", d.proc)
        # then no ping goes out while it is stuck, and the daemon keeps running (systemd restarts it)
        _no_pings_for(notify, stalled, 5, d.proc)
        assert "watchdog pings withheld" in d.stderr
        # and once the write goes through again, so do the pings
        reader.draining.set()
        released = time.monotonic()
        notify.wait_for(lambda ms: any(t > released and "WATCHDOG=1" in m for t, m in ms), 20, "pings resume", d.proc)
        assert "every stage progresses again" in d.stderr
        assert d.stop() == 0, d.stderr[-3000:]
    finally:
        d.close()
        reader.close()
    assert "Traceback" not in d.stderr


def test_a_hung_spool_disk_stops_the_pings_and_they_resume(tmp_path, mosquitto, line_model, synth_video, notify):
    # given a camera at 10 fps and a daemon pinging its watchdog
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 10, "roi": list(synth_video.roi)}
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, [cam]), env=notify.env())
    try:
        ready = notify.wait_for(_has("READY=1"), 120, "READY=1", d.proc)
        notify.wait_for(lambda ms: len([1 for t, m in ms if t > ready and "WATCHDOG=1" in m]) >= 2, 30, "pings",
                        d.proc)
        # when another process holds the spool's write lock, nothing more can be persisted
        lock = _spool_write_lock(tmp_path / "spool")
        try:
            stalled = notify.wait_for(_status_with("a spool write has been in progress", ready), 30, "spool stall",
                                      d.proc)
            # then the pings stop while predictions cannot be made durable
            _no_pings_for(notify, stalled, 5, d.proc)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        # and they resume once the disk does
        released = time.monotonic()
        notify.wait_for(lambda ms: any(t > released and "WATCHDOG=1" in m for t, m in ms), 20, "pings resume", d.proc)
        assert d.stop() == 0, d.stderr[-3000:]
    finally:
        d.close()


def test_a_stalled_publisher_stops_the_pings(tmp_path, mosquitto, line_model, rtsp_server, synth_video, notify):
    # given an RTSP camera and a broker answering slowly enough to leave acks in flight
    cam = {"name": "rtsp", "source": rtsp_server.url, "roi": list(synth_video.roi), "read_timeout_s": 2,
           "open_timeout_s": 2}
    cfg = line_cfg(line_model, mosquitto, [cam])
    cfg["mqtt"]["keepalive_s"] = 60  # the brief broker freeze below must not drop the connection
    d = Daemon(tmp_path, cfg, env=notify.env())
    try:
        ready = notify.wait_for(_has("READY=1"), 120, "READY=1", d.proc)
        notify.wait_for(_status_with("1/1 camera(s) streaming", ready), 60, "camera streaming", d.proc)
        # when the broker freezes, predictions go out unacknowledged; then the camera freezes too, so
        # nothing more is classified (the camera times out and reconnects: that is not a stall)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            os.kill(rtsp_server.proc.pid, signal.SIGSTOP)
            time.sleep(1.5)
            lock = _spool_write_lock(tmp_path / "spool")
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        # and the acks arrive while the spool is locked: the MQTT thread hangs deleting what was delivered
        try:
            stalled = notify.wait_for(_status_with("publishing stalled", ready), 30, "publishing stall", d.proc)
            _no_pings_for(notify, stalled, 5, d.proc)
            # then it is the publisher that is named, not the idle inference loop nor the timed-out camera
            last = [s for s in notify.statuses(ready) if s.startswith("stalled")][-1]
            assert "inference" not in last and "capture" not in last, last
        finally:
            lock.execute("ROLLBACK")
            lock.close()
            os.kill(rtsp_server.proc.pid, signal.SIGCONT)
        released = time.monotonic()
        notify.wait_for(lambda ms: any(t > released and "WATCHDOG=1" in m for t, m in ms), 20, "pings resume", d.proc)
        assert d.stop() == 0, d.stderr[-3000:]
    finally:
        d.close()


# --------------------------------------------------------------------------- a stage that dies


_SIGNAL_IN_THE_WORST_PLACE = """
import os, signal, sys, threading, yaml
from visiond.config import parse_config
from visiond.serve.daemon import Daemon
from visiond.logs import setup_logging

class SignalWhileLocked(threading.Event):
    # After ~3 s of the supervise loop, SIGTERM arrives while the main thread holds the
    # event's own lock, i.e. inside Event.wait() just before it sleeps: the handler then runs there.
    calls = 0
    def wait(self, timeout=None):
        if threading.current_thread() is threading.main_thread():
            SignalWhileLocked.calls += 1
            if SignalWhileLocked.calls == 15:
                with self._cond:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # bytecodes: the handler runs here, lock held
                        pass
        return super().wait(timeout)

setup_logging("info")
daemon = Daemon(parse_config(yaml.safe_load(open(sys.argv[1])), env={}))
daemon.stop_event.__class__ = SignalWhileLocked
sys.exit(daemon.run())
"""


def test_a_stop_signal_that_lands_while_the_main_thread_holds_a_lock_still_stops_cleanly(tmp_path, mosquitto,
                                                                                        line_model, synth_video):
    # given a running daemon whose main thread is interrupted by SIGTERM at the worst moment:
    # while it holds the stop event's own lock (a handler that takes that lock hangs forever)
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 30, "roi": list(synth_video.roi)}
    cfg = line_cfg(line_model, mosquitto, [cam], node="testbox", spool={"dir": str(tmp_path / "spool")},
                   metrics={"port": free_port()})
    (tmp_path / "cfg.yaml").write_text(__import__("yaml").safe_dump(cfg))
    (tmp_path / "run.py").write_text(_SIGNAL_IN_THE_WORST_PLACE)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True, timeout=90)  # old bug: hangs here
    # then it stops, drains and exits 0 like any SIGTERM
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "signal SIGTERM: stopping" in proc.stderr
    assert "stopped in" in proc.stderr and "(exit 0)" in proc.stderr, proc.stderr[-3000:]


def _run_in_process(cfg_dict: dict, break_it, caplog) -> int:
    """The daemon in this process (run() needs the main thread for its signal handlers), broken by `break_it`."""
    from visiond.config import parse_config
    from visiond.serve.daemon import Daemon as VisionDaemon

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon = VisionDaemon(parse_config(cfg_dict, env={}))
    guard = threading.Timer(60, daemon.stop_event.set)  # never hang the test run
    guard.start()
    try:
        break_it(daemon)
        with caplog.at_level(logging.INFO):
            return daemon.run()
    finally:
        guard.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _crash_camera(daemon) -> None:
    def broken_driver(*args, **kwargs):
        raise RuntimeError("driver fault")

    daemon.sources[0]._opener = broken_driver


def _crash_inference(daemon) -> None:
    def device_fault(frames, requests=()):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    daemon.worker.process = device_fault


def _crash_publisher(daemon) -> None:
    threading.Timer(2.0, daemon.spool.close).start()  # the spool vanishes under the MQTT thread (a stop-order bug)


@pytest.mark.parametrize("stage, break_it, named", [
    ("capture", _crash_camera, "camera line1: capture thread died (RuntimeError: driver fault)"),
    ("inference", _crash_inference, "inference thread died (RuntimeError: CUDA error"),
    ("publishing", _crash_publisher, "MQTT thread died (ProgrammingError"),
], ids=["capture", "inference", "publishing"])
def test_a_stage_thread_that_dies_takes_the_daemon_down_with_exit_1(stage, break_it, named, tmp_path, mosquitto,
                                                                      line_model, synth_video, caplog):
    # given a daemon on a looping camera, one of whose stage threads is killed by an exception
    cam = {"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 30, "roi": list(synth_video.roi)}
    cfg = line_cfg(line_model, mosquitto, [cam], node="testbox", spool={"dir": str(tmp_path / "spool")},
               metrics={"port": free_port()})
    t0 = time.monotonic()
    code = _run_in_process(cfg, break_it, caplog)
    # then run() returns 1 promptly instead of leaving a half-alive daemon
    assert code == 1
    assert time.monotonic() - t0 < 45
    # and one error line says which stage died and why
    lines = [r.getMessage() for r in caplog.records if "exiting with code 1" in r.getMessage()]
    assert len(lines) == 1 and named in lines[0], [r.getMessage() for r in caplog.records][-10:]
