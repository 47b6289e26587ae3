"""What the daemon promises under faults (no prediction lost to broker cuts or crashes, a frozen broker
noticed, a bounded spool, stalled and dead cameras handled, a full capture disk counted), checked against the
real daemon, real Mosquitto and a real RTSP server.

A subscriber connected straight to the broker (never through the proxy) records
every prediction seq; visiond reaches the broker through tools/tcpproxy.py where
a test needs to cut it off. Outages are a few seconds here; tools/faults.py runs
the 20 s versions. Each delivery check stops the daemon (SIGTERM drains) and
reads its spool: "missing" is produced, never received and not spooled either.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, require_binary
from daemon_helpers import Daemon, metric_value
from tools.faults import SeqRecorder, account, partial_files, proc_sample, spool_state
from tools.tcpproxy import TcpProxy

OUTAGE_S = 3.0
KEEPALIVE_S = 2
MAX_INFLIGHT = 64  # the config default: what a broker can hold acked-but-undelivered


@pytest.fixture
def recorder(mosquitto):
    rec = SeqRecorder(mosquitto.host, mosquitto.port).start()
    yield rec
    rec.stop()


@pytest.fixture
def proxy(mosquitto):
    with TcpProxy(mosquitto.host, mosquitto.port) as p:
        yield p


@pytest.fixture
def daemons():
    """Start daemons with ``daemons(tmp, cfg)``; all are killed at teardown."""
    started: list[Daemon] = []

    def start(tmp: Path, cfg: dict) -> Daemon:
        tmp.mkdir(parents=True, exist_ok=True)
        started.append(Daemon(tmp, cfg))
        return started[-1]

    yield start
    for d in started:
        d.close()


# ---------------------------------------------------------------- helpers


def _file_cam(video, name: str = "line1", fps: float = 30) -> dict:
    return {"name": name, "source": str(video.path), "loop": True, "fps": fps, "roi": list(video.roi)}


def _cfg(model, port: int, cameras: list[dict], spool: Path, spool_max: int = 1_000_000) -> dict:
    return {"cameras": cameras, "model": {"checkpoint": str(model), "max_batch": 16},
            "decide": {"defect_classes": ["scratch", "spot"]},
            "mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": KEEPALIVE_S},
            "spool": {"dir": str(spool), "max_messages": spool_max}}


def _metric(d: Daemon, name: str, **labels) -> float | None:
    """The current value, or None while /metrics does not answer (starting, or the series is absent)."""
    try:
        return metric_value(d.http("/metrics")[1].decode(), name, **labels)
    except (OSError, AssertionError):
        return None


def _until(d: Daemon, condition, timeout: float, what: str, every: float = 0.1) -> float:
    """Poll until true; seconds it took. Fails with the daemon's log if it died or time ran out."""
    start = time.monotonic()
    while not condition():
        if d.proc.poll() is not None:
            pytest.fail(f"visiond exited with {d.proc.returncode} while waiting for {what}:\n{d.stderr[-3000:]}")
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s\n{d.stderr[-3000:]}")
        time.sleep(every)
    return time.monotonic() - start


def _gauge_is(d: Daemon, name: str, value: float, **labels):
    return lambda: _metric(d, name, **labels) == value


def _drained(d: Daemon):
    """Connected, and the spool down to what a steady 30 fps keeps in flight."""
    return lambda: _metric(d, "visiond_mqtt_connected") == 1 and (_metric(d, "visiond_spool_messages") or 0) <= 10


def _finish(d: Daemon, rec: SeqRecorder, spool: Path):
    """SIGTERM (which drains), then what the subscriber got of everything the node produced."""
    assert d.stop() == 0, d.stderr[-3000:]
    produced, spooled = spool_state(spool)
    try:  # delivery is in seq order: once the last one is in, all that will come has come
        rec.wait_for(lambda r: not produced or produced in spooled or produced in r.seqs(), 20, "the last seq")
    except TimeoutError:
        pass  # the accounting below names what is missing
    delivery = account(rec.records(), produced, spooled)
    print(f"\n{delivery}")
    return delivery


def _whole(delivery, missing_ok: bool = False) -> bool:
    """Nothing missing, no seq handed out twice, first arrivals in seq order, nothing left in the spool."""
    return (missing_ok or not delivery.missing) and not delivery.reused and not delivery.out_of_order \
        and delivery.spooled == 0


# ---------------------------------------------------------------- 1. no prediction lost while the broker is away


def test_broker_cut_three_times_loses_no_prediction(tmp_path, mosquitto, recorder, proxy, line_model, synth_video,
                                                    daemons):
    # given visiond publishing 30 predictions a second through the proxy, and a subscriber on the broker
    d = daemons(tmp_path / "run", _cfg(line_model, proxy.port, [_file_cam(synth_video)], tmp_path / "spool"))
    recorder.wait_for(lambda r: r.count() >= 30, 120, "first predictions")
    # when the broker becomes unreachable three times: connections reset and refused, then a black hole
    # (the black hole lasts past 1.5 x keepalive, so visiond must notice it by silence alone)
    for fault, outage in ((proxy.reset, OUTAGE_S), (proxy.blackhole, 1.5 * KEEPALIVE_S + 1.5), (proxy.reset, OUTAGE_S)):
        fault()
        time.sleep(outage)
        # then visiond knows it is disconnected, and predictions wait in the spool
        assert _metric(d, "visiond_mqtt_connected") == 0, f"still connected during {fault.__name__}"
        assert _metric(d, "visiond_spool_messages") >= 30, f"nothing spooled during {fault.__name__}"
        proxy.pass_()
        # and it reconnects and drains once the broker is back
        took = _until(d, _drained(d), 45, f"drained after {fault.__name__}")
        print(f"\n{fault.__name__}: recovered in {took:.1f} s")
    # then every seq arrived (duplicates are allowed: at-least-once), and no seq was handed out twice
    delivery = _finish(d, recorder, tmp_path / "spool")
    assert delivery.produced >= 30 * (3 * OUTAGE_S + 1)
    assert _whole(delivery), delivery


def test_killed_broker_loses_at_most_what_it_had_acked(tmp_path, mosquitto, recorder, proxy, line_model,
                                                       synth_video, daemons):
    # given visiond publishing through the proxy to a broker without persistence
    d = daemons(tmp_path / "run", _cfg(line_model, proxy.port, [_file_cam(synth_video)], tmp_path / "spool"))
    recorder.wait_for(lambda r: r.count() >= 60, 120, "first predictions")
    # when the broker is SIGKILLed
    mosquitto.proc.kill()
    mosquitto.proc.wait(10)
    time.sleep(0.2)  # the subscriber's last reads
    seen_at_kill = recorder.max_seq()
    # (the proxy holds visiond off the restarted broker until the subscriber has subscribed again: messages the
    # broker takes before that have no subscriber, which is the subscriber's loss, not visiond's)
    proxy.refuse()
    time.sleep(OUTAGE_S)
    mosquitto.start()
    recorder.wait_for(lambda r: r.subscriptions >= 2, 30, "subscriber back")
    proxy.pass_()
    # then visiond reconnects and drains
    _until(d, _drained(d), 45, "drained after the broker restart")
    delivery = _finish(d, recorder, tmp_path / "spool")
    # and the only predictions lost are ones the dead broker had acknowledged but not yet forwarded:
    # the last ones it took before the kill (in flight at most max_inflight of them)
    lost = delivery.missing
    print(f"killed broker lost {len(lost)} acknowledged prediction(s): {lost}")
    assert len(lost) <= MAX_INFLIGHT, delivery
    assert all(seen_at_kill - MAX_INFLIGHT < s <= seen_at_kill + MAX_INFLIGHT for s in lost), (seen_at_kill, delivery)
    assert _whole(delivery, missing_ok=True), delivery


# ---------------------------------------------------------------- 2. it survives its own crash while offline


def test_sigkill_while_offline_then_restart_delivers_every_spooled_prediction(tmp_path, mosquitto, recorder, proxy,
                                                                              line_model, synth_video, daemons):
    # given the broker unreachable (nothing listens behind the proxy's port)
    proxy.refuse()
    spool = tmp_path / "spool"
    cfg = lambda: _cfg(line_model, proxy.port, [_file_cam(synth_video)], spool)  # noqa: E731
    first = daemons(tmp_path / "first", cfg())
    _until(first, lambda: (_metric(first, "visiond_spool_messages") or 0) >= 60, 120, "60 predictions spooled")
    # when visiond is SIGKILLed
    first.send(signal.SIGKILL)
    first.wait(10)
    killed_last, spooled = spool_state(spool)
    # then every prediction it made is on disk (the spool also holds a few defect events)
    print(f"\nkilled with {killed_last} predictions spooled")
    assert killed_last >= 45 and spooled == set(range(1, killed_last + 1))
    # when it starts again (still offline), goes on, and then the broker is reached again
    second = daemons(tmp_path / "second", cfg())
    _until(second, lambda: (_metric(second, "visiond_spool_messages") or 0) >= killed_last + 30, 120,
           "the restarted daemon spooling more")
    proxy.pass_()
    _until(second, _drained(second), 60, "drained")
    # then all N from before the crash arrive, and the restarted daemon continued the seq (never reused one)
    delivery = _finish(second, recorder, spool)
    assert set(range(1, killed_last + 1)) <= set(recorder.seqs())
    assert delivery.produced >= killed_last + 30
    assert _whole(delivery), delivery


# ---------------------------------------------------------------- 3. it starts without a broker


def test_starts_without_a_broker_spools_and_drains_when_it_appears(tmp_path, mosquitto, recorder, proxy, line_model,
                                                                   synth_video, daemons):
    # given no broker at all: connections to visiond's broker port are refused
    proxy.refuse()
    # when visiond starts
    d = daemons(tmp_path / "run", _cfg(line_model, proxy.port, [_file_cam(synth_video)], tmp_path / "spool"))
    d.wait_http()
    # then it runs: classifies, spools, says it is not connected, and health says why
    _until(d, lambda: (_metric(d, "visiond_spool_messages") or 0) >= 30, 120, "predictions spooled")
    assert _metric(d, "visiond_mqtt_connected") == 0
    code, body = d.http("/healthz")
    assert code == 503 and b'"mqtt_connected": false' in body
    assert recorder.count() == 0
    # when the broker appears, then the spool drains and everything arrives
    proxy.pass_()
    took = _until(d, _drained(d), 60, "drained")
    print(f"\ndrained {took:.1f} s after the broker appeared")
    delivery = _finish(d, recorder, tmp_path / "spool")
    assert _whole(delivery), delivery


# ---------------------------------------------------------------- 4. a frozen broker is noticed


def test_frozen_broker_is_noticed_within_one_and_a_half_keepalives(tmp_path, mosquitto, recorder, line_model,
                                                                   synth_video, daemons):
    # given visiond connected straight to the broker with a 2 s keepalive
    d = daemons(tmp_path / "run", _cfg(line_model, mosquitto.port, [_file_cam(synth_video)], tmp_path / "spool"))
    recorder.wait_for(lambda r: r.count() >= 30, 120, "first predictions")
    # when the broker freezes (its sockets stay open, nothing answers)
    os.kill(mosquitto.proc.pid, signal.SIGSTOP)
    try:
        noticed = _until(d, _gauge_is(d, "visiond_mqtt_connected", 0), 15, "mqtt_connected 0", every=0.05)
        time.sleep(1.0)
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
    # then the gauge went to 0 within 1.5 x keepalive (plus a loop tick and our polling, on a busy box)
    print(f"\nfrozen broker noticed after {noticed:.2f} s (keepalive {KEEPALIVE_S} s)")
    assert noticed <= 1.5 * KEEPALIVE_S + 1.0
    # and after SIGCONT it reconnects and the spool drains, nothing lost
    _until(d, _drained(d), 60, "drained after SIGCONT")
    delivery = _finish(d, recorder, tmp_path / "spool")
    assert _whole(delivery), delivery


# ---------------------------------------------------------------- 5. bounded memory and spool


def test_spool_stops_at_its_bound_counts_drops_and_memory_stays_flat(tmp_path, mosquitto, recorder, proxy, line_model,
                                                                     synth_video, daemons):
    # given no broker, a spool bound of 200 and a camera as fast as the model goes
    proxy.refuse()
    spool = tmp_path / "spool"
    d = daemons(tmp_path / "run", _cfg(line_model, proxy.port, [_file_cam(synth_video, fps=0)], spool, spool_max=200))
    # when the spool has overflowed (and caches have warmed up) and predictions keep coming
    _until(d, lambda: (_metric(d, "visiond_spool_dropped_total") or 0) >= 1000, 120, "1000 drops")
    samples = []
    for _ in range(20):
        time.sleep(0.5)
        samples.append((_metric(d, "visiond_spool_messages"), _metric(d, "visiond_spool_dropped_total"),
                        proc_sample(d.proc.pid).rss_kb))
    spool_counts, dropped, rss = zip(*samples)
    early, late = statistics.median(rss[:6]), statistics.median(rss[-6:])
    print(f"\nspool {spool_counts[-1]:.0f}, dropped {dropped[0]:.0f} -> {dropped[-1]:.0f}, "
          f"RSS median {early / 1024:.1f} -> {late / 1024:.1f} MiB (range {min(rss) / 1024:.1f}-{max(rss) / 1024:.1f})")
    # then the spool sits at its bound, the overflow is counted and logged
    assert max(spool_counts) <= 200 and spool_counts[-1] == 200
    assert dropped[-1] > dropped[0] + 100
    assert "spool full (200 messages): dropped the" in d.stderr
    # and memory stays flat (medians: the allocator moves RSS by +-10 MiB from one sample to the next)
    assert late - early < 16 * 1024, f"RSS grew {early} -> {late} kB"
    # when the broker is back, then what arrives plus what was counted as dropped is everything
    proxy.pass_()
    _until(d, _drained(d), 60, "drained")
    total_dropped = _metric(d, "visiond_spool_dropped_total")
    delivery = _finish(d, recorder, spool)
    events, _ = spool_state(spool, "event")
    print(f"dropped_total {total_dropped:.0f}, of which {len(delivery.missing)} predictions and the rest events")
    assert len(delivery.missing) <= total_dropped <= len(delivery.missing) + events, delivery
    assert _whole(delivery, missing_ok=True), delivery


# ---------------------------------------------------------------- 6. a stalled camera is noticed


def test_stalled_rtsp_camera_is_noticed_while_the_other_camera_keeps_publishing(tmp_path, mosquitto, mqtt_recorder,
                                                                                recorder, rtsp_server, line_model,
                                                                                synth_video, daemons):
    # given an RTSP camera and a looping file camera
    statuses = mqtt_recorder("visiond/testbox/+/status")
    read_timeout = 2.0
    rtsp = {"name": "rtsp", "source": rtsp_server.url, "roi": list(synth_video.roi),
            "read_timeout_s": read_timeout, "open_timeout_s": 2}
    d = daemons(tmp_path / "run", _cfg(line_model, mosquitto.port, [rtsp, _file_cam(synth_video, "file")],
                                       tmp_path / "spool"))
    recorder.wait_for(lambda r: r.count("rtsp") >= 10 and r.count("file") >= 10, 120, "both cameras publishing")
    _until(d, _gauge_is(d, "visiond_source_up", 1, camera="rtsp"), 10, "rtsp up")
    # when the RTSP server freezes
    rtsp_server.proc.send_signal(signal.SIGSTOP)
    try:
        noticed = _until(d, _gauge_is(d, "visiond_source_up", 0, camera="rtsp"), read_timeout + 10,
                         "rtsp source_up 0", every=0.05)
        # then it is noticed within read timeout + 2 s, and the camera's status topic says why
        print(f"\nstalled camera noticed after {noticed:.2f} s (read timeout {read_timeout} s)")
        assert noticed <= read_timeout + 2
        statuses.wait_for(lambda ms: any(m.topic.endswith("/rtsp/status") and b'"offline"' in m.payload
                                         and b'"stalled: no frame for' in m.payload for m in ms), 10)
        # and the file camera keeps publishing meanwhile
        files = recorder.count("file")
        recorder.wait_for(lambda r: r.count("file") >= files + 30, 10, "file camera during the stall")
    finally:
        rtsp_server.proc.send_signal(signal.SIGCONT)
    # when the server runs again, then frames resume
    resumed = time.monotonic()
    frames = recorder.count("rtsp")
    _until(d, _gauge_is(d, "visiond_source_up", 1, camera="rtsp"), 60, "rtsp up again")
    recorder.wait_for(lambda r: r.count("rtsp") >= frames + 10, 30, "rtsp frames after SIGCONT")
    print(f"rtsp frames resumed {time.monotonic() - resumed:.1f} s after SIGCONT")
    statuses.wait_for(lambda ms: b'"online"' in [m.payload for m in ms if m.topic.endswith("/rtsp/status")][-1], 10)
    assert _metric(d, "visiond_source_reconnects_total", camera="rtsp") >= 1
    assert d.stop() == 0


# ---------------------------------------------------------------- 7. a dead camera is retried forever


def test_dead_camera_is_retried_without_growing_threads_fds_or_memory(tmp_path, mosquitto, line_model, daemons):
    # given a camera whose RTSP URL nobody serves, with small timeouts
    dead = {"name": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/none", "open_timeout_s": 1,
            "read_timeout_s": 1}
    d = daemons(tmp_path / "run", _cfg(line_model, mosquitto.port, [dead], tmp_path / "spool"))

    def reconnects() -> float:
        return _metric(d, "visiond_source_reconnects_total", camera="dead") or 0

    def settle() -> list:
        """A few samples, taken away from our own /metrics requests (each runs on a short-lived thread)."""
        out = []
        for _ in range(3):
            time.sleep(0.4)
            out.append(proc_sample(d.proc.pid))
        return out

    # when it has retried twice (FFmpeg and the network stack loaded), and then for ~20 s more
    _until(d, lambda: reconnects() >= 2, 60, "two reconnects")
    early, first, since = settle(), reconnects(), time.monotonic()
    _until(d, lambda: reconnects() >= first + 3 and time.monotonic() - since >= 18, 60, "~20 s of reconnects")
    late, last = settle(), reconnects()
    print(f"\nreconnects {first:.0f} -> {last:.0f}; threads {[s.threads for s in early]} -> "
          f"{[s.threads for s in late]}, fds {[s.fds for s in early]} -> {[s.fds for s in late]}, "
          f"RSS {early[0].rss_kb} -> {late[-1].rss_kb} kB")
    # then it keeps retrying, and no thread, fd or memory is left behind by the attempts
    assert last >= first + 3
    assert min(s.threads for s in late) <= max(s.threads for s in early)
    assert min(s.fds for s in late) <= max(s.fds for s in early)
    assert min(s.rss_kb for s in late) - max(s.rss_kb for s in early) < 8 * 1024
    assert _metric(d, "visiond_source_up", camera="dead") == 0
    assert d.stop() == 0


# ---------------------------------------------------------------- 8. a full capture disk is not fatal


class NamespacedDaemon(Daemon):
    """The daemon in a private mount namespace in which `mount_dir` is a tiny tmpfs (gone when it exits)."""

    def __init__(self, tmp: Path, cfg: dict, mount_dir: Path, size: str):
        self.tmp = tmp
        self.metrics_port = cfg.setdefault("metrics", {}).setdefault("port", free_port())
        self.node = cfg.setdefault("node", "testbox")
        self.config = tmp / "visiond.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr_path = tmp / "visiond.stderr"
        self._stderr = open(self.stderr_path, "wb")
        unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
        self.proc = subprocess.Popen([*unshare, "sh", "-c", script, "sh", size, str(mount_dir),
                                      sys.executable, "-m", "visiond", "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)


def test_full_capture_disk_is_counted_and_publishing_goes_on(tmp_path, mosquitto, recorder, line_model, synth_video):
    # given the daemon capturing every frame into a dataset on a 1 MiB tmpfs of its own
    require_binary("unshare", "util-linux")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cfg = _cfg(line_model, mosquitto.port, [_file_cam(synth_video)], tmp_path / "spool")
    cfg["capture"] = {"dataset": str(dataset),
                      "rules": {"sample_rate": 1.0, "max_per_minute": 6000, "dedupe_bits": -1}}
    d = NamespacedDaemon(tmp_path, cfg, dataset, "1m")
    try:
        # when the disk fills up
        _until(d, lambda: (_metric(d, "visiond_capture_write_failures_total", reason="disk_full") or 0) >= 5, 120,
               "ENOSPC counted")
        inbox = Path(f"/proc/{d.proc.pid}/root") / dataset.relative_to("/") / "inbox"  # the daemon's view of it
        disk = os.statvfs(inbox)
        saved = _metric(d, "visiond_capture_saved_total")
        # then publishing goes on
        published = recorder.count()
        recorder.wait_for(lambda r: r.count() >= published + 60, 30, "predictions after the disk filled")
        # and failures are counted, not fatal, and no partial file stays (one seen twice, 0.5 s apart, is left over)
        failures = _metric(d, "visiond_capture_write_failures_total", reason="disk_full")
        first = partial_files(inbox)
        time.sleep(0.5)
        left_over = first & partial_files(inbox)
        print(f"\ntmpfs {disk.f_blocks * disk.f_frsize // 1024} KiB, {disk.f_bavail * disk.f_frsize // 1024} KiB "
              f"free; saved {saved:.0f}, ENOSPC {failures:.0f}; inbox {sorted(p.name for p in inbox.iterdir())}")
        assert failures >= 5 and saved >= 1 and not left_over, left_over
        assert disk.f_bavail * disk.f_frsize < 200 * 1024
        assert "disk_full" in d.stderr and "predictions keep flowing" in d.stderr
        assert d.stop() == 0, d.stderr[-3000:]
    finally:
        d.close()
