"""The fault suite: what the daemon promises under faults (broker cuts, crashes, a frozen broker, a full spool,
stalled or dead cameras, a full capture disk) run end to end against the real daemon, one table out.

    python tools/faults.py [--quick] [--only NAME ...] [--keep]

Private parts only: a mosquitto on a free port, tools/tcpproxy.py between it
and visiond, tools/rtsp_server.py (system python), a rendered line video and a
model (demo-out/model.ckpt when present, else one trained here). A subscriber
connected straight to the broker records every prediction `seq`; after each
scenario the daemon stops and its spool is read, so "missing" means produced,
not delivered and not waiting in the spool either. Outages last 20 s (3 s with
--quick). Exit status 1 when any promise failed.

The broker, the subscriber and the child daemon come from visiond.harness; the
accounting half of this file (SeqRecorder, spool_state, account, proc_sample) is
shared with tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: tools.* must import
    sys.path.insert(0, str(ROOT))

from tools.tcpproxy import ProxyProcess  # noqa: E402
from visiond.harness.broker import Broker  # noqa: E402
from visiond.harness.child import DaemonProcess  # noqa: E402
from visiond.harness.process import free_port  # noqa: E402
from visiond.harness.recorder import Recorder  # noqa: E402

PREDICTIONS = "visiond/+/+/prediction"


# ---------------------------------------------------------------- the plant's subscriber


class SeqRecorder:
    """(seq, id, camera) of every prediction, in arrival order, from a harness Recorder straight on the broker.

    The recorder reconnects by itself after a broker restart; `subscriptions`
    counts its SUBACKs, so a scenario can wait until the subscriber is back
    before letting visiond through again.
    """

    def __init__(self, host: str, port: int, topic_filter: str = PREDICTIONS):
        self.recorder = Recorder(host, port, topic_filter)

    def start(self, timeout: float = 10.0) -> SeqRecorder:
        self.recorder.start(timeout)
        return self

    def stop(self) -> None:
        self.recorder.stop()

    @property
    def subscriptions(self) -> int:
        return self.recorder.subscriptions

    def records(self) -> list[tuple[int, str, str]]:
        return [(int(d["seq"]), str(d["id"]), str(d["camera"])) for d in self.recorder.json_payloads()]

    def seqs(self) -> list[int]:
        return [r[0] for r in self.records()]

    def count(self, camera: str | None = None) -> int:
        return sum(1 for r in self.records() if camera is None or r[2] == camera)

    def max_seq(self) -> int:
        return max(self.seqs(), default=0)

    def wait_for(self, predicate: Callable[[SeqRecorder], bool], timeout: float, what: str = "condition") -> float:
        """Seconds it took; TimeoutError (with what arrived) if the predicate stays false."""
        start = time.monotonic()
        try:
            self.recorder.wait_for(lambda _messages: predicate(self), timeout, what)
        except TimeoutError:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s ({self.count()} predictions received, "
                               f"max seq {self.max_seq()})") from None
        return time.monotonic() - start


# ---------------------------------------------------------------- accounting


def spool_state(spool_dir: str | Path, stream: str = "prediction") -> tuple[int, set[int]]:
    """(the last seq of a stream the node handed out, that stream's seqs still spooled); daemon stopped."""
    db = sqlite3.connect(Path(spool_dir) / "spool.sqlite3", timeout=10)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (f"next_seq:{stream}",)).fetchone()
        spooled = {json.loads(p)["seq"] for (p,) in
                   db.execute("SELECT payload FROM messages WHERE topic LIKE ?", (f"%/{stream}",))}
    finally:
        db.close()
    return (row[0] - 1 if row else 0), spooled


@dataclass(frozen=True)
class Delivery:
    """What the subscriber got of predictions 1..produced."""

    produced: int
    received: int  # messages, duplicates included
    missing: tuple[int, ...]  # produced, never received, not in the spool either
    duplicated: int  # messages beyond the first of their seq (at-least-once resends)
    reused: tuple[int, ...]  # seqs that arrived with two different ids: a seq handed out twice
    spooled: int  # still waiting in the spool when the daemon stopped
    out_of_order: int  # seqs whose first arrival came after a higher seq's (the spool drains in order)

    def __str__(self) -> str:
        return (f"produced {self.produced}, received {self.received}, missing {len(self.missing)}"
                f"{' ' + _ranges(self.missing) if self.missing else ''}, duplicated {self.duplicated}, "
                f"seq reused {len(self.reused)}, out of order {self.out_of_order}, still spooled {self.spooled}")


def account(records: Iterable[tuple[int, str, str]], produced: int, spooled: set[int]) -> Delivery:
    records = list(records)
    ids: dict[int, set[str]] = defaultdict(set)
    for seq, msg_id, _camera in records:
        ids[seq].add(msg_id)
    counts = Counter(seq for seq, _, _ in records)
    missing = tuple(s for s in range(1, produced + 1) if s not in counts and s not in spooled)
    first_seen: set[int] = set()
    highest, late = 0, 0
    for seq, _, _ in records:
        if seq not in first_seen:
            first_seen.add(seq)
            late += seq < highest
            highest = max(highest, seq)
    return Delivery(produced, len(records), missing, sum(n - 1 for n in counts.values()),
                    tuple(sorted(s for s, v in ids.items() if len(v) > 1)), len(spooled), late)


def _ranges(seqs: Iterable[int]) -> str:
    """[3, 4, 5, 9] -> '3-5,9' (first 10 runs)."""
    runs: list[list[int]] = []
    for s in sorted(seqs):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs[:10])
    return text + (",..." if len(runs) > 10 else "")


def partial_files(inbox: Path) -> set[str]:
    """What a capture inbox holds that is not a whole item: temp files, an image or a sidecar alone."""
    try:
        names = {p.name for p in inbox.iterdir()}
    except FileNotFoundError:
        return set()
    images = {n[:-4] for n in names if n.endswith(".png") and not n.startswith(".")}
    sidecars = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
    return {n for n in names if n.startswith(".") or n.endswith(".tmp")} | (images ^ sidecars)


# ---------------------------------------------------------------- the process


@dataclass(frozen=True)
class ProcSample:
    rss_kb: int
    threads: int
    fds: int
    anon_kb: int  # RssAnon: the heap, without the mapped libraries


def proc_sample(pid: int) -> ProcSample:
    """VmRSS, thread count, open fds and RssAnon of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return ProcSample(int(fields["VmRSS"][0]), int(fields["Threads"][0]), fds, int(fields["RssAnon"][0]))


# ---------------------------------------------------------------- the fault suite (CLI)

SYSTEM_PYTHON = "/usr/bin/python3"
KEEPALIVE_S = 2
MAX_INFLIGHT = 64
DEMO_MODEL = ROOT / "demo-out" / "model.ckpt"


class Failed(Exception):
    """A promise did not hold; the message says how."""


class Visiond(DaemonProcess):
    """The harness's child daemon on node "faults", in `workdir/name`, with the suite's two spool questions."""

    def __init__(self, workdir: Path, name: str, cfg: dict, wrap: list[str] | None = None):
        cfg.setdefault("node", "faults")
        super().__init__(workdir / name, cfg, wrap=wrap, cwd=ROOT)

    def drained(self) -> bool:
        """Connected, and the spool down to what a steady 30 fps keeps in flight."""
        return self.metric("visiond_mqtt_connected") == 1 and self.spooled() <= 10

    def spooled(self) -> float:
        return self.metric("visiond_spool_messages") or 0


@dataclass
class Row:
    fault: str
    expected: str
    received: str = ""
    missing: str = "-"
    duplicated: str = "-"
    recovery: str = "-"
    ok: bool = False
    note: str = ""


@dataclass
class Suite:
    """Everything the scenarios share: work dir, broker, proxy, model, video, durations."""

    workdir: Path
    quick: bool
    model: Path = None
    video: Path = None
    roi: tuple = None
    broker: Broker = None
    proxy: object = None
    procs: list = field(default_factory=list)

    @property
    def outage_s(self) -> float:
        return 3.0 if self.quick else 20.0

    def cfg(self, port: int, cameras: list[dict], spool: str, spool_max: int = 1_000_000, **extra) -> dict:
        cfg = {"cameras": cameras, "model": {"checkpoint": str(self.model), "max_batch": 16},
               "decide": {"defect_classes": ["scratch", "spot"]},
               "mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": KEEPALIVE_S},
               "spool": {"dir": str(self.workdir / spool), "max_messages": spool_max}}
        cfg.update(extra)
        return cfg

    def file_cam(self, name: str = "line1", fps: float = 30) -> dict:
        return {"name": name, "source": str(self.video), "loop": True, "fps": fps, "roi": list(self.roi)}

    def visiond(self, name: str, cfg: dict, wrap: list[str] | None = None) -> Visiond:
        v = Visiond(self.workdir, name, cfg, wrap)
        self.procs.append(v)
        return v

    def recorder(self) -> SeqRecorder:
        rec = SeqRecorder(self.broker.host, self.broker.port).start()
        self.procs.append(rec)
        return rec

    def finish(self, v: Visiond, rec: SeqRecorder, spool: str) -> Delivery:
        if v.stop() != 0:
            raise Failed(f"visiond exited with {v.proc.returncode} at SIGTERM: {v.stderr[-600:]}")
        produced, spooled = spool_state(self.workdir / spool)
        try:  # delivery is in seq order: once the last one is in, all that will come has come
            rec.wait_for(lambda r: not produced or produced in spooled or produced in r.seqs(), 20, "the last seq")
        except TimeoutError:
            pass
        return account(rec.records(), produced, spooled)

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                if isinstance(p, Visiond):
                    p.close()
                else:
                    p.stop()
            except Exception as exc:  # one stuck part must not leave the others running
                print(f"faults: cleanup of {type(p).__name__}: {exc!r}", file=sys.stderr)
        self.procs.clear()


def _delivery_row(row: Row, d: Delivery, allowed_missing: int = 0) -> Row:
    row.received = f"{d.received - d.duplicated}/{d.produced} seqs"
    row.missing = str(len(d.missing))
    row.duplicated = str(d.duplicated)
    row.ok = len(d.missing) <= allowed_missing and not d.reused and d.spooled == 0 and not d.out_of_order
    if d.out_of_order:
        row.note += f" {d.out_of_order} first arrivals out of seq order"
    if d.reused:
        row.note += f" seq reused: {_ranges(d.reused)}"
    if d.spooled:
        row.note += f" {d.spooled} left in the spool"
    return row


# ---------------------------------------------------------------- scenarios


def broker_cuts(s: Suite) -> Row:
    """Promise 1: the proxy resets, black-holes, slows and resets the broker connection while visiond publishes."""
    out = s.outage_s
    faults = [("reset", s.proxy.reset), ("blackhole", s.proxy.blackhole), ("delay 500 ms", lambda: s.proxy.delay(500)),
              ("reset", s.proxy.reset)]
    row = Row(f"broker unreachable: proxy {', '.join(n for n, _ in faults)}; {out:.0f} s each, 30 fps",
              "every seq arrives; dups counted")
    rec = s.recorder()
    v = s.visiond("cuts", s.cfg(s.proxy.port, [s.file_cam()], "cuts-spool"))
    rec.wait_for(lambda r: r.count() >= 30, 120, "first predictions")
    times = []
    for name, fault in faults:
        fault()
        time.sleep(max(out, 1.5 * KEEPALIVE_S + 1.5) if name == "blackhole" else out)  # past the keepalive watchdog
        s.proxy.pass_()
        times.append(f"{name} {v.until(v.drained, 120, f'drained after {name}'):.1f}s")
    row.recovery = ", ".join(times)
    return _delivery_row(row, s.finish(v, rec, "cuts-spool"))


def broker_killed(s: Suite) -> Row:
    """Promise 1: mosquitto SIGKILLed (persistence off) and restarted; its acked-undelivered loss is counted apart."""
    row = Row(f"mosquitto SIGKILL, down {s.outage_s:.0f} s, restarted (persistence off)",
              f"all arrive but what the dead broker had acked (<= {MAX_INFLIGHT})")
    rec = s.recorder()
    v = s.visiond("kill", s.cfg(s.proxy.port, [s.file_cam()], "kill-spool"))
    rec.wait_for(lambda r: r.count() >= 60, 120, "first predictions")
    s.broker.kill()
    time.sleep(0.2)
    seen = rec.max_seq()
    s.proxy.refuse()  # visiond waits until the subscriber is back on the restarted broker
    time.sleep(s.outage_s)
    subs = rec.subscriptions
    s.broker.start()
    rec.wait_for(lambda r: r.subscriptions > subs, 30, "subscriber back")
    s.proxy.pass_()
    row.recovery = f"{v.until(v.drained, 120, 'drained'):.1f}s"
    d = s.finish(v, rec, "kill-spool")
    _delivery_row(row, d, allowed_missing=MAX_INFLIGHT)
    in_window = all(seen - MAX_INFLIGHT < x <= seen + MAX_INFLIGHT for x in d.missing)
    row.ok = row.ok and in_window
    row.missing = f"{len(d.missing)} (acked by the dead broker)" if in_window else \
        f"{len(d.missing)} {_ranges(d.missing)}"
    return row


def daemon_killed_offline(s: Suite) -> Row:
    """Promise 2: SIGKILL visiond while the broker is unreachable; restart; broker back: all N arrive."""

    row = Row("visiond SIGKILL while offline, restart, then broker back", "all N spooled arrive; seq continues")
    rec = s.recorder()
    s.proxy.refuse()
    cfg = lambda: s.cfg(s.proxy.port, [s.file_cam()], "crash-spool")  # noqa: E731
    first = s.visiond("crash-1", cfg())
    first.until(lambda: first.spooled() >= 60, 120, "60 spooled")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    n, spooled = spool_state(s.workdir / "crash-spool")
    if spooled != set(range(1, n + 1)):
        raise Failed(f"after SIGKILL the spool holds {len(spooled)} of the {n} predictions made")
    second = s.visiond("crash-2", cfg())
    second.until(lambda: second.spooled() >= n + 30, 120, "restarted daemon spooling")
    s.proxy.pass_()
    row.recovery = f"{second.until(second.drained, 120, 'drained'):.1f}s"
    d = s.finish(second, rec, "crash-spool")
    _delivery_row(row, d)
    got = set(rec.seqs())
    row.received = f"{len(got & set(range(1, n + 1)))}/{n} of the crashed run; {row.received} in all"
    row.ok = row.ok and set(range(1, n + 1)) <= got and d.produced > n
    return row


def no_broker_at_start(s: Suite) -> Row:
    """Promise 3: start with nothing listening on the broker port, spool, drain when it appears."""
    row = Row("no broker at start (connection refused), appears later", "runs, spools, drains all")
    rec = s.recorder()
    s.proxy.refuse()
    v = s.visiond("nobroker", s.cfg(s.proxy.port, [s.file_cam()], "nobroker-spool"))
    v.until(lambda: v.spooled() >= 30, 120, "spooling without a broker")
    if v.metric("visiond_mqtt_connected") != 0:
        raise Failed("visiond_mqtt_connected is not 0 without a broker")
    time.sleep(s.outage_s)
    s.proxy.pass_()
    row.recovery = f"{v.until(v.drained, 120, 'drained'):.1f}s"
    return _delivery_row(row, s.finish(v, rec, "nobroker-spool"))


def frozen_broker(s: Suite) -> Row:
    """Promise 4: SIGSTOP mosquitto: connected 0 within 1.5 x keepalive; SIGCONT: drains."""

    limit = 1.5 * KEEPALIVE_S
    row = Row(f"mosquitto SIGSTOP {max(s.outage_s, limit + 1):.0f} s (keepalive {KEEPALIVE_S} s)",
              f"mqtt_connected 0 within {limit:.1f} s; drains after SIGCONT")
    rec = s.recorder()
    v = s.visiond("frozen", s.cfg(s.broker.port, [s.file_cam()], "frozen-spool"))
    rec.wait_for(lambda r: r.count() >= 30, 120, "first predictions")
    s.broker.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        noticed = v.until(lambda: v.metric("visiond_mqtt_connected") == 0, 20, "connected 0", every=0.05)
        time.sleep(max(0.0, max(s.outage_s, limit + 1) - (time.monotonic() - frozen)))
    finally:
        s.broker.proc.send_signal(signal.SIGCONT)
    drained = v.until(v.drained, 120, "drained after SIGCONT")
    row.recovery = f"noticed {noticed:.1f}s; drained {drained:.1f}s"
    _delivery_row(row, s.finish(v, rec, "frozen-spool"))
    row.ok = row.ok and noticed <= limit + 0.75  # a loop tick and our polling
    return row


def bounded_spool(s: Suite) -> Row:
    """Promise 5: broker away at full speed with a 200-message spool: stops at the bound, drops counted, RSS flat."""
    stretch = 10.0 if s.quick else 30.0
    row = Row(f"broker away {stretch:.0f} s at full speed, spool bound 200",
              "spool stops at 200; drops counted + logged; RSS flat")
    rec = s.recorder()
    s.proxy.refuse()
    v = s.visiond("bound", s.cfg(s.proxy.port, [s.file_cam(fps=0)], "bound-spool", spool_max=200))
    v.until(lambda: (v.metric("visiond_spool_dropped_total") or 0) > 0, 120, "first drop")
    samples = []
    end = time.monotonic() + stretch
    while time.monotonic() < end:
        time.sleep(0.5)
        samples.append((v.spooled(), proc_sample(v.proc.pid).rss_kb))
    s.proxy.pass_()
    row.recovery = f"{v.until(v.drained, 120, 'drained'):.1f}s"
    dropped = v.metric("visiond_spool_dropped_total") or 0  # final: nothing is dropped once the broker is back
    d = s.finish(v, rec, "bound-spool")
    events, _ = spool_state(s.workdir / "bound-spool", "event")
    counts, rss = zip(*samples)
    early, late = statistics.median(rss[:6]), statistics.median(rss[-6:])  # the allocator moves RSS +-10 MiB
    row.received = (f"spool max {max(counts):.0f}; RSS {early / 1024:.0f}->{late / 1024:.0f} MiB; "
                    f"{d.received - d.duplicated}/{d.produced} seqs")
    row.missing = f"{len(d.missing)} (all counted: dropped_total {dropped:.0f})"
    row.duplicated = str(d.duplicated)
    row.ok = (max(counts) <= 200 and counts[-1] == 200 and "spool full (200 messages)" in v.stderr
              and late - early < 16 * 1024 and len(d.missing) <= dropped <= len(d.missing) + events
              and not d.reused)
    return row


def stalled_camera(s: Suite, rtsp_url: str, rtsp_proc) -> Row:
    """Promise 6: RTSP server SIGSTOPped: source_up 0 within read timeout + 2 s; the file camera goes on."""

    read_timeout = 2.0
    row = Row(f"RTSP server SIGSTOP {max(s.outage_s, read_timeout + 4):.0f} s (read timeout {read_timeout:.0f} s), "
              "beside a file camera",
              f"source_up 0 within {read_timeout + 2:.0f} s, status says why; other camera publishes; resumes")
    rec = s.recorder()
    status = Recorder(s.broker.host, s.broker.port, "visiond/faults/rtsp/status").start()
    s.procs.append(status)
    rtsp = {"name": "rtsp", "source": rtsp_url, "roi": list(s.roi), "read_timeout_s": read_timeout,
            "open_timeout_s": 2}
    v = s.visiond("stall", s.cfg(s.broker.port, [rtsp, s.file_cam("file")], "stall-spool"))
    rec.wait_for(lambda r: r.count("rtsp") >= 10 and r.count("file") >= 10, 120, "both cameras")
    stall_s = max(s.outage_s, read_timeout + 4)
    files = rec.count("file")
    rtsp_proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        noticed = v.until(lambda: v.metric("visiond_source_up", camera="rtsp") == 0, 30, "rtsp down", every=0.05)
        time.sleep(max(0.0, stall_s - (time.monotonic() - stopped)))
        during = rec.count("file") - files
    finally:
        rtsp_proc.send_signal(signal.SIGCONT)
    frames = rec.count("rtsp")
    resumed = rec.wait_for(lambda r: r.count("rtsp") >= frames + 10, 90, "rtsp frames after SIGCONT")
    why = stall_reason(status)
    row.received = f"source_up 0 after {noticed:.1f}s; status '{why}'; file camera +{during} during the stall"
    row.recovery = f"{resumed:.1f}s after SIGCONT"
    row.ok = noticed <= read_timeout + 2 and during >= 15 * stall_s and "stalled" in why \
        and v.stop() == 0
    return row


def stall_reason(status: Recorder) -> str:
    """The last "offline: stalled ..." a camera's status topic posted, else its last state and reason."""
    reasons = [f"{d['state']}: {d['reason']}" for d in status.json_payloads()]
    offline = [r for r in reasons if r.startswith("offline") and "stalled" in r]
    return offline[-1] if offline else (reasons[-1] if reasons else "")


def dead_camera(s: Suite) -> Row:
    """Promise 7: an RTSP URL nobody serves: retried forever, threads/fds/RSS flat."""
    span = 15.0 if s.quick else 60.0
    row = Row(f"dead RTSP camera, retried for {span:.0f} s", "reconnects grow; threads, fds, RSS flat")
    dead = {"name": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/none", "open_timeout_s": 1,
            "read_timeout_s": 1}
    v = s.visiond("dead", s.cfg(s.broker.port, [dead], "dead-spool"))
    reconnects = lambda: v.metric("visiond_source_reconnects_total", camera="dead") or 0  # noqa: E731
    v.until(lambda: reconnects() >= 2, 60, "two reconnects")
    time.sleep(0.4)
    early, first, since = proc_sample(v.proc.pid), reconnects(), time.monotonic()
    v.until(lambda: time.monotonic() - since >= span and reconnects() >= first + 3, span + 60, "reconnects")
    time.sleep(0.4)
    late, last = proc_sample(v.proc.pid), reconnects()
    row.received = (f"reconnects {first:.0f}->{last:.0f}; threads {early.threads}->{late.threads}; "
                    f"fds {early.fds}->{late.fds}; RSS {early.rss_kb // 1024}->{late.rss_kb // 1024} MiB")
    row.ok = (last >= first + 3 and late.threads <= early.threads and late.fds <= early.fds
              and late.rss_kb - early.rss_kb < 8 * 1024 and v.stop() == 0)
    return row


def capture_disk_full(s: Suite) -> Row:
    """Promise 8: capture into a 1 MiB tmpfs in a private mount namespace: ENOSPC counted, publishing goes on."""

    if shutil.which("unshare") is None:
        raise Failed("unshare not found: install the Debian package util-linux")
    row = Row("capture disk full (1 MiB tmpfs, unshare -m)", "publishing goes on; ENOSPC counted; no partial files")
    rec = s.recorder()
    dataset = s.workdir / "capture-dataset"
    dataset.mkdir(exist_ok=True)
    cfg = s.cfg(s.broker.port, [s.file_cam()], "capture-spool",
                capture={"dataset": str(dataset), "rules": {"sample_rate": 1.0, "max_per_minute": 6000,
                                                            "dedupe_bits": -1}})
    wrap = ["unshare", "-m" if os.geteuid() == 0 else "-rm", "sh", "-c",
            'mount -t tmpfs -o size=1m tmpfs "$1" && shift && exec "$@"', "sh", str(dataset)]
    v = s.visiond("capture", cfg, wrap)
    v.until(lambda: (v.metric("visiond_capture_write_failures_total", reason="disk_full") or 0) >= 5, 120, "ENOSPC")
    inbox = Path(f"/proc/{v.proc.pid}/root") / dataset.relative_to("/") / "inbox"
    published = rec.count()
    took = rec.wait_for(lambda r: r.count() >= published + 60, 60, "predictions after the disk filled")
    first = partial_files(inbox)
    time.sleep(0.5)
    left = first & partial_files(inbox)
    failures = v.metric("visiond_capture_write_failures_total", reason="disk_full") or 0
    saved = v.metric("visiond_capture_saved_total") or 0
    row.received = (f"saved {saved:.0f}, ENOSPC {failures:.0f}; +60 published in {took:.1f}s; "
                    f"partial files: {len(left)}")
    row.ok = not left and failures >= 5 and v.stop() == 0
    return row


# ---------------------------------------------------------------- setup and the table


def line_video_and_model(workdir: Path, log: Callable[[str], None]) -> tuple[Path, tuple, Path]:
    """A 300-frame line video rendered here, its ROI, and demo-out/model.ckpt (or a model trained here)."""
    from tools import synthline

    video = workdir / "line.mp4"
    log("rendering a 300-frame line video")
    synthline.render_video(video, 300, 7)
    model = DEMO_MODEL
    if not model.exists():
        from visiond.train.loop import TrainOptions, train

        log("training a small model (no demo-out/model.ckpt)")
        images = workdir / "images"
        synthline.render_images(images, 80, 7)
        model = workdir / "line.ckpt"
        train(TrainOptions(data=images, out=model, arch="smallcnn", epochs=12, image_size=64, seed=3,
                           augment="none", progress=False))
    log(f"model {model}")
    return video, synthline.default_roi(640, 480), model


def _prepare(s: Suite) -> None:


    console = Console(stderr=True)
    s.video, s.roi, s.model = line_video_and_model(s.workdir, lambda m: console.print(f"faults: {m}"))
    # max_queued_messages 0: a slow recorder must not lose messages to the broker's queue bound
    s.broker = Broker(s.workdir, options=["max_queued_messages 0"]).start()
    s.proxy = ProxyProcess("127.0.0.1", s.broker.port)


def _start_rtsp(s: Suite):

    proc = subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "tools" / "rtsp_server.py"), "--port", "0", "--path", "/line",
                             "--video", str(s.video)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise Failed(f"tools/rtsp_server.py did not start ({line!r})")
    return line.split()[1], proc


SCENARIOS = ("cuts", "broker-kill", "crash", "no-broker", "frozen", "bound", "stall", "dead-camera", "capture-disk")


def _run_one(s: Suite, name: str) -> Row:
    if name == "stall":
        url, proc = _start_rtsp(s)
        try:
            return stalled_camera(s, url, proc)
        finally:

            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(10)
    fn = {"cuts": broker_cuts, "broker-kill": broker_killed, "crash": daemon_killed_offline,
          "no-broker": no_broker_at_start, "frozen": frozen_broker, "bound": bounded_spool,
          "dead-camera": dead_camera, "capture-disk": capture_disk_full}[name]
    return fn(s)


def main(argv: list[str] | None = None) -> int:


    parser = argparse.ArgumentParser(description="Run the fault scenarios against the real daemon.")
    parser.add_argument("--quick", action="store_true", help="3 s outages instead of 20 s")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="visiond-faults-"))
    s = Suite(workdir, args.quick)
    console = Console(width=max(160, Console().width))
    rows: list[Row] = []
    started = time.monotonic()
    try:
        _prepare(s)
        for name in args.only or SCENARIOS:
            Console(stderr=True).print(f"faults: {name} ...")
            t0 = time.monotonic()
            try:
                row = _run_one(s, name)
            except Exception as exc:  # a broken scenario is a failed row, the others still run
                row = Row(name, "-", note=f"{type(exc).__name__}: {exc}")
            finally:
                s.cleanup()
                s.proxy.pass_()
                if s.broker.proc.poll() is not None:
                    s.broker.start()
            row.note = (row.note + f" [{time.monotonic() - t0:.0f}s]").strip()
            rows.append(row)
    finally:
        s.cleanup()
        if s.proxy is not None:
            s.proxy.stop()
        if s.broker is not None:
            s.broker.stop()  # the one running now (a killed one was restarted as a new process)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    table = Table(title=f"visiond fault suite ({'quick' if args.quick else 'full'}, "
                        f"{time.monotonic() - started:.0f} s)", show_lines=True)
    for col in ("fault injected", "expected", "received", "missing", "duplicated", "recovery time", "result"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.fault, r.expected, r.received, r.missing, r.duplicated, r.recovery,
                      ("[green]PASS" if r.ok else "[red]FAIL") + (f"\n{r.note}" if r.note else ""))
    console.print(table)
    if args.keep:
        console.print(f"work directory kept: {workdir}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
