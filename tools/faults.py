"""The fault suite: issue 5's promises run end to end against the real daemon, one table out.

    python tools/faults.py [--quick] [--only NAME ...] [--keep]

Private parts only: a mosquitto on a free port, tools/tcpproxy.py between it
and visiond, tools/rtsp_server.py (system python), a rendered line video and a
model (demo-out/model.ckpt when present, else one trained here). A subscriber
connected straight to the broker records every prediction `seq`; after each
scenario the daemon stops and its spool is read, so "missing" means produced,
not delivered and not waiting in the spool either. Outages last 20 s (3 s with
--quick). Exit status 1 when any promise failed.

The harness half of this file (SeqRecorder, spool_state, account, proc_sample)
is shared with tests/test_faults.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

PREDICTIONS = "visiond/+/+/prediction"


# ---------------------------------------------------------------- the plant's subscriber


class SeqRecorder:
    """Subscribes straight to the broker and keeps (seq, id, camera) of every prediction, in arrival order.

    Reconnects by itself (fast) after a broker restart; `subscriptions` counts
    SUBACKs, so a test can wait until the subscriber is back before letting
    visiond through again.
    """

    def __init__(self, host: str, port: int, topic_filter: str = PREDICTIONS):
        self.host, self.port, self.topic_filter = host, port, topic_filter
        self._lock = threading.Lock()
        self._records: list[tuple[int, str, str]] = []
        self.subscriptions = 0
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-{uuid.uuid4().hex[:8]}",
                                   protocol=paho.MQTTv5)
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> SeqRecorder:
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self.wait_for(lambda r: r.subscriptions >= 1, timeout, "the recorder's SUBACK")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties) -> None:
        if not any(code.is_failure for code in reason_codes):
            with self._lock:
                self.subscriptions += 1

    def _on_message(self, _client, _userdata, msg) -> None:
        doc = json.loads(msg.payload)
        with self._lock:
            self._records.append((int(doc["seq"]), str(doc["id"]), str(doc["camera"])))

    def records(self) -> list[tuple[int, str, str]]:
        with self._lock:
            return list(self._records)

    def seqs(self) -> list[int]:
        return [r[0] for r in self.records()]

    def count(self, camera: str | None = None) -> int:
        return sum(1 for r in self.records() if camera is None or r[2] == camera)

    def max_seq(self) -> int:
        return max(self.seqs(), default=0)

    def wait_for(self, predicate: Callable[[SeqRecorder], bool], timeout: float, what: str = "condition") -> float:
        """Seconds it took; TimeoutError (with what arrived) if the predicate stays false."""
        start = time.monotonic()
        while not predicate(self):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s ({self.count()} predictions received, "
                                   f"max seq {self.max_seq()})")
            time.sleep(0.05)
        return time.monotonic() - start


# ---------------------------------------------------------------- accounting


def spool_state(spool_dir: str | Path) -> tuple[int, set[int]]:
    """(the last prediction seq the node handed out, the prediction seqs still spooled); daemon stopped."""
    db = sqlite3.connect(Path(spool_dir) / "spool.sqlite3", timeout=10)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'next_seq:prediction'").fetchone()
        spooled = {json.loads(p)["seq"] for (p,) in
                   db.execute("SELECT payload FROM messages WHERE topic LIKE '%/prediction'")}
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

    def __str__(self) -> str:
        return (f"produced {self.produced}, received {self.received}, missing {len(self.missing)}"
                f"{' ' + _ranges(self.missing) if self.missing else ''}, duplicated {self.duplicated}, "
                f"seq reused {len(self.reused)}, still spooled {self.spooled}")


def account(records: Iterable[tuple[int, str, str]], produced: int, spooled: set[int]) -> Delivery:
    records = list(records)
    ids: dict[int, set[str]] = defaultdict(set)
    for seq, msg_id, _camera in records:
        ids[seq].add(msg_id)
    counts = Counter(seq for seq, _, _ in records)
    missing = tuple(s for s in range(1, produced + 1) if s not in counts and s not in spooled)
    return Delivery(produced, len(records), missing, sum(n - 1 for n in counts.values()),
                    tuple(sorted(s for s, v in ids.items() if len(v) > 1)), len(spooled))


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


# ---------------------------------------------------------------- the process


@dataclass(frozen=True)
class ProcSample:
    rss_kb: int
    threads: int
    fds: int


def proc_sample(pid: int) -> ProcSample:
    """VmRSS, thread count and open fds of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return ProcSample(int(fields["VmRSS"][0]), int(fields["Threads"][0]), fds)
