"""Part inspection under load and faults: 500 triggers at 20 a second, a broker cut and a SIGKILL, a full queue.

A PLC (the harness's Requester: MQTT 5 Response Topic + Correlation Data) drives a
triggered station with 3 ROIs on the looping synthetic line; what it hears is checked
against the line's ground truth, the results store (results.db) and a subscriber on
`<camera>/inspection`. Where the broker is cut, only visiond goes through the TCP
proxy: the PLC and the subscriber stay on the broker, as on a line where one cable fails.
"""

from __future__ import annotations

import signal
import sqlite3
import statistics
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable

import pytest

from daemon_helpers import Daemon
from test_inspect import station_cfg, truth_of
from tools.tcpproxy import TcpProxy
from visiond.harness.requester import Requester

NODE = "testbox"
CAMERA = "station1"
RATE = 20.0  # triggers a second: parts passing a station
INSPECTION = f"/{CAMERA}/inspection"


@pytest.fixture
def daemons():
    """Start daemons with ``daemons(workdir, cfg)``; all are killed at teardown."""
    started: list[Daemon] = []

    def start(workdir: Path, cfg: dict) -> Daemon:
        started.append(Daemon(workdir, cfg))
        return started[-1]

    yield start
    for d in started:
        d.close()


@pytest.fixture
def proxy(mosquitto):
    with TcpProxy(mosquitto.host, mosquitto.port) as p:
        yield p


# ---------------------------------------------------------------- helpers


class Plc:
    """A PLC's trigger discipline: one trigger per part at `rate`, and the same request again (the same
    correlation data) for a part still unanswered `retry_after` seconds after it was last sent."""

    def __init__(self, requester: Requester, rate: float = RATE, retry_after: float = 4.0):
        self.req, self.rate, self.retry_after = requester, rate, retry_after
        self.corr: dict[str, bytes] = {}
        self.sends: Counter[str] = Counter()
        self._last_sent: dict[str, float] = {}

    def trigger(self, part: str) -> None:
        self.corr[part] = self.req.inspect(CAMERA, part, correlation=self.corr.get(part))
        self.sends[part] += 1
        self._last_sent[part] = time.monotonic()

    def unanswered(self) -> list[str]:
        return [p for p, c in self.corr.items() if not self.req.answers(c)]

    def run(self, parts: list[str], timeout: float, steps: list[tuple[Callable[[int], bool], Callable[[], None]]] = ()
            ) -> list[str]:
        """Trigger every part, retrying one overdue part per tick, until every part is answered and every step
        has run, or `timeout` passes; returns the parts still unanswered. `steps` run in order, each once its
        condition (called with the number of parts sent so far) holds: the faults of a test."""
        steps, todo, tick = deque(steps), deque(parts), 1.0 / self.rate
        start = next_tick = time.monotonic()
        while time.monotonic() - start < timeout:
            while steps and steps[0][0](len(parts) - len(todo)):
                steps.popleft()[1]()
            if todo:
                self.trigger(todo.popleft())
            missing = self.unanswered()
            overdue = [p for p in missing if time.monotonic() - self._last_sent[p] >= self.retry_after]
            if overdue:
                self.trigger(min(overdue, key=self._last_sent.get))
            elif not todo and not missing and not steps:
                return []
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.monotonic()))
        return self.unanswered()


def _paced(count: int, rate: float):
    """0..count-1, the i-th at start + i / rate (no drift when a send is slow)."""
    start = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        yield i


def _rows(db_path: Path) -> list[dict]:
    """The results store's rows, in seq order (read while the daemon runs, or after it died)."""
    db = sqlite3.connect(db_path, timeout=30.0)
    try:
        cur = db.execute("SELECT seq, id, job_id, part_id, verdict, reason FROM results ORDER BY seq")
        return [dict(zip(("seq", "id", "job_id", "part_id", "verdict", "reason"), row)) for row in cur]
    finally:
        db.close()


def _wait_ready(rec, d: Daemon, timeout: float = 90) -> None:
    """Until the station says `ready` (retained), failing with the daemon's log if it died first."""
    def ready(ms):
        if d.proc.poll() is not None:
            raise RuntimeError(f"visiond exited with {d.proc.returncode}:\n{d.stderr[-3000:]}")
        return any(m.topic == f"visiond/{NODE}/{CAMERA}/ready" and m.payload == b"ready" for m in ms)

    rec.wait_for(ready, timeout, f"{CAMERA} ready")


def _latency_figures(latencies: list[float]) -> str:
    ms = sorted(x * 1e3 for x in latencies)
    pct = statistics.quantiles(ms, n=100)
    return f"trigger -> answer p50 {pct[49]:.0f} ms, p99 {pct[98]:.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"


# ---------------------------------------------------------------- 1. 500 parts at 20 a second


def test_500_triggers_at_20_a_second_each_answered_once_with_its_correlation(tmp_path, mosquitto, mqtt_recorder,
                                                                             line_model, synth_video, daemons):
    # given a triggered station with 3 ROIs (a 60 fps camera, 3-frame bursts), a subscriber and a PLC
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    d = daemons(tmp_path, station_cfg(line_model, mosquitto, synth_video))
    _wait_ready(rec, d)
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        # when 500 parts pass at 20 a second, one trigger each with its own correlation data
        corrs: dict[str, bytes] = {}
        started = time.monotonic()
        for i in _paced(500, RATE):
            corrs[f"part-{i:04d}"] = plc.inspect(CAMERA, f"part-{i:04d}")
        sent_s = time.monotonic() - started
        missing = plc.wait_all(list(corrs.values()), 60)
        answered_s = time.monotonic() - started
        assert not missing, f"{len(missing)} of 500 triggers unanswered; stderr: {d.stderr[-3000:]}"
        assert d.stop() == 0, d.stderr[-3000:]  # drains: a stray second answer would be out by now
        time.sleep(0.5)
        answers = {part: plc.answers(c) for part, c in corrs.items()}
        latencies = [plc.latency_s(c) for c in corrs.values()]
    docs = [got[0] for got in answers.values()]
    verdicts = Counter((doc["verdict"], doc["reason"]) for doc in docs)
    daemon_ms = sorted(doc["latency_ms"]["total"] for doc in docs)
    right = sum(doc["verdict"] == truth_of(doc, synth_video.truth) for doc in docs)
    print(f"\n500 triggers sent in {sent_s:.1f} s ({500 / sent_s:.1f}/s), all answered {answered_s:.1f} s after the "
          f"first; {_latency_figures(latencies)}; in the daemon p50 {daemon_ms[249]:.0f} ms, "
          f"p99 {daemon_ms[494]:.0f} ms; verdicts {dict(verdicts)}, {right} of 500 match the truth")
    # then every part got exactly one answer: its own (correlation data and part id)
    assert all(len(got) == 1 for got in answers.values()), {p: len(g) for p, g in answers.items() if len(g) != 1}
    assert all(got[0]["part_id"] == part for part, got in answers.items())
    # and the station kept up: no trigger was refused or ran past its deadline
    assert all(doc["verdict"] in ("OK", "NG") for doc in docs), verdicts
    # and the verdicts match the line's ground truth at the model's accuracy
    assert right / len(docs) >= 0.85, Counter((truth_of(doc, synth_video.truth), doc["verdict"]) for doc in docs)
    # and the store holds 500 rows, the same verdicts
    rows = _rows(tmp_path / "spool" / "results.db")
    assert len(rows) == 500
    assert {r["id"] for r in rows} == {doc["id"] for doc in docs}
    # and the inspection topic carried each of them once, seq 1..500 without a gap
    rec.wait_for(lambda ms: sum(m.topic.endswith(INSPECTION) for m in ms) >= 500, 20, "500 inspections")
    published = rec.json_payloads(INSPECTION)
    assert sorted(p["seq"] for p in published) == list(range(1, 501))
    assert {p["id"] for p in published} == {doc["id"] for doc in docs}


# ---------------------------------------------------------------- 2. a broker cut and a SIGKILL


def test_broker_cut_and_sigkill_lose_no_verdict_and_redelivered_triggers_are_not_reinspected(
        tmp_path, mosquitto, mqtt_recorder, proxy, line_model, synth_video, daemons):
    # given a station that reaches the broker through the proxy, and a PLC and a subscriber on the broker itself
    spool = tmp_path / "spool"

    def cfg() -> dict:
        c = station_cfg(line_model, mosquitto, synth_video)
        c["mqtt"].update(host=proxy.host, port=proxy.port, keepalive_s=2)
        c["spool"] = {"dir": str(spool)}
        return c

    rec = mqtt_recorder(f"visiond/{NODE}/#")
    first = daemons(tmp_path / "first", cfg())
    _wait_ready(rec, first)
    run: dict = {"daemon": first}

    def reconnect() -> None:
        run["connected_during_cut"] = first.metric("visiond_mqtt_connected")
        proxy.pass_()
        run["inspected_at_reconnect"] = first.metric("visiond_inspections_total", camera=CAMERA)

    def flowing(sent: int) -> bool:  # connected again, and verdicts flowing: 20 more since the cut ended
        return sent >= 140 and first.metric("visiond_mqtt_connected") == 1 and \
            first.metric("visiond_inspections_total", camera=CAMERA) >= run["inspected_at_reconnect"] + 20

    def crash() -> None:  # SIGKILL, then the same daemon again on the same spool and store
        first.send(signal.SIGKILL)
        first.wait(10)
        run["rows_at_kill"] = len(_rows(spool / "results.db"))
        run["daemon"] = daemons(tmp_path / "second", cfg())

    parts = [f"part-{i:04d}" for i in range(200)]
    with Requester(mosquitto.host, mosquitto.port, NODE) as requester:
        plc = Plc(requester, RATE, retry_after=4.0)
        # when 200 parts pass at 20 a second; the broker is cut off for 3 s after 2 s; visiond is SIGKILLed once
        # verdicts flow again (7 s or later) and restarted; the PLC triggers again (same correlation data) a part
        # still unanswered after 4 s
        steps = [(lambda sent: sent >= 40, proxy.reset), (lambda sent: sent >= 100, reconnect), (flowing, crash)]
        unanswered = plc.run(parts, timeout=75, steps=steps)
        assert "rows_at_kill" in run, f"visiond never got back to work after the cut: {first.stderr[-3000:]}"
        second = run["daemon"]
        assert not unanswered, f"{len(unanswered)} parts unanswered: {unanswered[:10]}; stderr: {second.stderr[-3000:]}"
        # and the first 10 triggers are delivered once more (as a QoS 1 redelivery would), long after their verdict
        again = parts[:10]
        before = {p: len(requester.answers(plc.corr[p])) for p in again}
        for part in again:
            plc.trigger(part)
        second.until(lambda: all(len(requester.answers(plc.corr[p])) > before[p] for p in again), 20,
                     "answers to the redelivered triggers")
        received = second.metric("visiond_triggers_total", camera=CAMERA)
        inspected = second.metric("visiond_inspections_total", camera=CAMERA)
        assert second.stop() == 0, second.stderr[-3000:]  # drains the spool: every verdict goes out
        time.sleep(0.5)
        answers = {p: requester.answers(plc.corr[p]) for p in parts}
    rows = _rows(spool / "results.db")
    stored = {r["id"]: r for r in rows}
    try:
        rec.wait_for(lambda ms: stored.keys() <= {p["id"] for p in rec.json_payloads(INSPECTION)}, 20,
                     "every stored verdict published")
    except TimeoutError:
        pass  # the assertions below name what is missing
    published = rec.json_payloads(INSPECTION)
    retried = sum(n > 1 for n in plc.sends.values())
    print(f"\n{sum(plc.sends.values())} triggers for {len(parts)} parts ({retried} parts sent again); "
          f"{sum(len(a) for a in answers.values())} answers; rows at the kill {run['rows_at_kill']}, at the end "
          f"{len(rows)}; the restarted daemon took {received:.0f} triggers and inspected {inspected:.0f}; "
          f"verdicts {dict(Counter((r['verdict'], r['reason']) for r in rows))}")
    # then the cut and the crash happened mid-run
    assert run["connected_during_cut"] == 0
    assert 0 < run["rows_at_kill"] < len(parts)
    # and every part has an answer, and all the answers one part got are one verdict (same id and job id)
    for part, got in answers.items():
        assert got and all(a["part_id"] == part for a in got), (part, got)
        assert len({(a["id"], a["job_id"]) for a in got}) == 1, (part, [(a["id"], a["job_id"]) for a in got])
    # and the store holds one row per part, the verdict the PLC was told
    assert sorted(r["part_id"] for r in rows) == parts, Counter(r["part_id"] for r in rows).most_common(3)
    assert all(stored[got[0]["id"]]["part_id"] == part for part, got in answers.items())
    # and the redelivered triggers were answered from the store, not inspected again
    assert all(len(answers[p]) > before[p] for p in again)
    assert len(rows) == run["rows_at_kill"] + inspected
    assert received - inspected >= len(again)
    # and the subscriber got every stored verdict on the inspection topic, with the store's seq, gapless from 1
    lost = sorted(stored.keys() - {p["id"] for p in published})
    assert not lost, f"{len(lost)} stored verdicts never published: {[stored[i] for i in lost[:5]]}"
    assert {p["id"] for p in published} <= stored.keys()
    assert all(p["seq"] == stored[p["id"]]["seq"] for p in published)
    assert sorted({p["seq"] for p in published}) == list(range(1, len(rows) + 1))


# ---------------------------------------------------------------- 3. a full queue


def test_queue_full_answers_busy_at_once_and_nothing_is_dropped(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                                synth_video, daemons):
    # given a station whose queue holds 2 triggers, each inspection ~1 s (10 frames 100 ms apart), a long deadline
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    d = daemons(tmp_path, station_cfg(line_model, mosquitto, synth_video, frames=10, interval_ms=100, queue=2,
                                      deadline_ms=30000))
    _wait_ready(rec, d)
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        # when 10 triggers arrive at once
        corrs = [plc.inspect(CAMERA, f"part-{i}") for i in range(10)]
        missing = plc.wait_all(corrs, 30)
        assert not missing, f"{len(missing)} of 10 triggers unanswered; stderr: {d.stderr[-3000:]}"
        rejected = d.metric("visiond_triggers_rejected_total", camera=CAMERA, reason="busy")
        assert d.stop() == 0, d.stderr[-3000:]
        time.sleep(0.5)
        answers = [plc.answers(c) for c in corrs]
        latency = [plc.latency_s(c) for c in corrs]
    docs = [got[0] for got in answers]
    busy = [i for i, doc in enumerate(docs) if doc["verdict"] == "ERROR" and doc["reason"] == "busy"]
    done = [i for i, doc in enumerate(docs) if doc["verdict"] in ("OK", "NG")]
    slowest_busy = max((latency[i] for i in busy), default=float("nan"))
    first_done = min((latency[i] for i in done), default=float("nan"))
    print(f"\nbusy {len(busy)}, inspected {len(done)}; busy answered within {slowest_busy:.3f} s, "
          f"first inspection after {first_done:.3f} s")
    # then each trigger got one answer: inspected (the running one and the 2 queued) or refused busy
    assert all(len(got) == 1 and got[0]["part_id"] == f"part-{i}" for i, got in enumerate(answers)), answers
    assert sorted(busy + done) == list(range(10)), [(doc["verdict"], doc["reason"]) for doc in docs]
    assert 2 <= len(done) <= 3
    # and the refusals came at once, before the first inspection was done
    assert slowest_busy < first_done
    # and the busy metric counts exactly the busy answers
    assert rejected == len(busy)
    # and every answer is a stored verdict, published with a gapless seq
    rows = _rows(tmp_path / "spool" / "results.db")
    assert {r["id"] for r in rows} == {doc["id"] for doc in docs}
    rec.wait_for(lambda ms: sum(m.topic.endswith(INSPECTION) for m in ms) >= 10, 20, "10 inspections")
    assert sorted(p["seq"] for p in rec.json_payloads(INSPECTION)) == list(range(1, 11))
