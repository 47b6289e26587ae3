"""The results store: every verdict on disk before it is published, a gapless seq that survives restarts,
redelivered triggers found again, queries and hourly yield, pruning, and a clear error for a foreign file."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid

import pytest

from visiond.errors import UserError
from visiond.serve.inspect import store as store_module
from visiond.serve.inspect.store import ResultsStore
from visiond.serve.metrics import Metrics

T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z; hour boundary at T0 - 1600 + 3600
HOUR = 3600.0


def verdict_row(**over) -> dict:
    row = {"id": str(uuid.uuid4()), "job_id": uuid.uuid4().hex[:16], "camera": "station1", "part_id": "P-1",
           "trigger_id": None, "door": "mqtt", "recipe": "part-a", "verdict": "OK", "reason": None,
           "triggered_at": T0 - 0.2, "decided_at": T0, "correlation": None, "response_topic": None,
           "rois": [{"name": "screw_left", "label": "ok", "score": 0.97}], "models": {"screw_left": {"name": "m"}},
           "latency_ms": {"burst": 60.0, "inference": 8.5, "total": 70.1}, "evidence": None}
    row.update(over)
    return row


def payload_of(row: dict):
    """What a door publishes: the row's identity and the seq the store handed out."""
    return lambda seq: json.dumps({"id": row["id"], "job_id": row["job_id"], "seq": seq,
                                   "verdict": row["verdict"]}).encode()


def record(store: ResultsStore, **over):
    row = verdict_row(**over)
    return store.record(row, payload_of(row))


def test_seq_is_gapless_and_monotonic_across_restarts_and_pruning(tmp_path):
    # given a store that recorded three verdicts and was closed
    path = tmp_path / "state" / "results.db"
    store = ResultsStore(path)
    first = [record(store).seq for _ in range(3)]
    store.close()
    # when it is reopened, one write fails inside its transaction, and every row is pruned away
    store = ResultsStore(path)
    def failing_payload(seq: int) -> bytes:
        raise RuntimeError("payload failed")

    with pytest.raises(RuntimeError):
        store.record(verdict_row(), failing_payload)
    fourth = record(store, decided_at=T0 - 10 * 86400)
    assert store.prune(keep_days=1, now=T0 + 86400 * 5) == 4
    store.close()
    store = ResultsStore(path)
    fifth = record(store)
    # then seqs ran 1..5 without a gap (the failed write took none) and none was reused after the prune
    assert first == [1, 2, 3] and fourth.seq == 4 and fifth.seq == 5
    assert json.loads(fifth.payload)["seq"] == 5
    assert store.count() == 1 and store.last_seq == 5
    store.close()


def test_a_recorded_verdict_is_on_disk_when_record_returns(tmp_path):
    # given a store with metrics
    metrics = Metrics(process=False)
    path = tmp_path / "results.db"
    store = ResultsStore(path, metrics=metrics)
    # when a verdict with MQTT 5 correlation data is recorded
    row = verdict_row(verdict="NG", correlation=b"\x01\x02", response_topic="plc/replies", evidence=["a/b.jpg"])
    stored = store.record(row, payload_of(row))
    # then another connection (as after a power cut) already sees the row and its payload
    other = sqlite3.connect(path)
    assert other.execute("SELECT seq, payload FROM results WHERE job_id = ?", (row["job_id"],)).fetchone() == (
        stored.seq, stored.payload)
    other.close()
    store.close()
    # and a reopened store gives it back by id and by job_id, JSON decoded, times as epoch seconds
    store = ResultsStore(path)
    got = store.get(row["id"])
    assert got == store.get(row["job_id"])
    assert got["payload"] == {"id": row["id"], "job_id": row["job_id"], "seq": 1, "verdict": "NG"}
    assert got["rois"] == row["rois"] and got["latency_ms"]["total"] == 70.1 and got["evidence"] == ["a/b.jpg"]
    assert got["correlation"] == b"\x01\x02" and got["decided_at"] == T0 and got["verdict"] == "NG"
    assert store.get("no-such-job") is None
    assert metrics.results_rows._value.get() == 1
    store.close()


def test_a_failed_write_is_counted_raised_and_takes_no_seq(tmp_path):
    metrics = Metrics(process=False)
    store = ResultsStore(tmp_path / "results.db", metrics=metrics)
    first = record(store, job_id="job-1")
    # when a second verdict reuses the job id
    with pytest.raises(sqlite3.IntegrityError):
        record(store, job_id="job-1")
    # then the failure is counted, the row count is unchanged and the next verdict gets the next seq
    assert metrics.results_write_failures._value.get() == 1
    assert store.count() == 1 and record(store).seq == first.seq + 1
    store.close()


def test_a_redelivered_trigger_is_found_within_the_window_and_not_after(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    by_corr = record(store, correlation=b"req-7", decided_at=T0)
    by_trigger = record(store, part_id="P-9", trigger_id="T-3", decided_at=T0 + 5)
    # when the same triggers come again five minutes later
    later = T0 + 300
    # then each is found with its stored payload, so it can be answered unchanged
    assert store.find_duplicate("station1", b"req-7", "P-other", None, now=later) == by_corr
    assert store.find_duplicate("station1", b"other", "P-9", "T-3", now=later) == by_trigger
    # and not after the window, nor for another camera, another trigger id, or without ids to match
    assert store.find_duplicate("station1", b"req-7", None, None, now=T0 + 601) is None
    assert store.find_duplicate("station1", None, "P-9", "T-3", now=T0 + 606) is None
    assert store.find_duplicate("station1", None, "P-9", "T-3", within_s=1000, now=T0 + 606) == by_trigger
    assert store.find_duplicate("station2", b"req-7", "P-9", "T-3", now=later) is None
    assert store.find_duplicate("station1", None, "P-9", "T-4", now=later) is None
    assert store.find_duplicate("station1", b"", "P-9", None, now=later) is None
    store.close()


def test_query_filters_by_time_camera_verdict_and_part(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    a = record(store, camera="station1", verdict="OK", part_id="A", decided_at=T0)
    b = record(store, camera="station1", verdict="NG", part_id="B", decided_at=T0 + 10)
    c = record(store, camera="station2", verdict="NG", part_id="C", decided_at=T0 + 20)
    d = record(store, camera="station2", verdict="ERROR", part_id="A", reason="deadline", decided_at=T0 + 30)

    def jobs(**kw):
        return [r["job_id"] for r in store.query(**kw)]

    assert jobs() == [d.job_id, c.job_id, b.job_id, a.job_id]
    assert jobs(newest_first=False, limit=2) == [a.job_id, b.job_id]
    assert jobs(verdict="NG") == [c.job_id, b.job_id]
    assert jobs(camera="station2") == [d.job_id, c.job_id]
    assert jobs(part_id="A") == [d.job_id, a.job_id]
    assert jobs(since=T0 + 10, until=T0 + 30) == [c.job_id, b.job_id]
    assert jobs(camera="station1", verdict="ERROR") == []
    row = store.query(verdict="ERROR")[0]
    assert row["reason"] == "deadline" and "payload" not in row and row["seq"] == d.seq
    store.close()


def test_summary_counts_and_yield_per_camera_and_hour(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    hour = (T0 // HOUR) * HOUR
    for verdict in ("OK", "OK", "OK", "NG"):
        record(store, verdict=verdict, decided_at=hour + 100)
    record(store, verdict="ERROR", decided_at=hour + HOUR + 5)
    record(store, camera="station2", verdict="NG", decided_at=hour + 200)
    rows = store.summary()
    assert rows == [
        {"camera": "station1", "hour": hour, "ok": 3, "ng": 1, "error": 0, "total": 4, "yield": 0.75},
        {"camera": "station1", "hour": hour + HOUR, "ok": 0, "ng": 0, "error": 1, "total": 1, "yield": 0.0},
        {"camera": "station2", "hour": hour, "ok": 0, "ng": 1, "error": 0, "total": 1, "yield": 0.0},
    ]
    assert [r["hour"] for r in store.summary(since=hour + HOUR)] == [hour + HOUR]
    assert [r["camera"] for r in store.summary(camera="station2")] == ["station2"]
    store.close()


def test_prune_deletes_only_rows_older_than_keep_days_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_CHUNK", 3)  # several commits for the old rows
    metrics = Metrics(process=False)
    store = ResultsStore(tmp_path / "results.db", metrics=metrics)
    old = [record(store, decided_at=T0 - 91 * 86400 + i) for i in range(7)]
    young = [record(store, decided_at=T0 - 89 * 86400 + i) for i in range(2)]
    assert store.prune(keep_days=90, now=T0) == 7
    assert [r["job_id"] for r in store.query(newest_first=False)] == [y.job_id for y in young]
    assert store.get(old[0].job_id) is None
    assert store.count() == 2 and metrics.results_rows._value.get() == 2
    assert store.prune(keep_days=90, now=T0) == 0
    # and keep_days 0 (the config's "keep all") deletes nothing, however old
    assert store.prune(keep_days=0, now=T0 + 10_000 * 86400) == 0 and store.count() == 2
    store.close()


def test_concurrent_records_from_four_cameras_get_unique_gapless_seqs(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    got: list = []
    errors: list = []
    lock = threading.Lock()

    def camera(name: str) -> None:
        try:
            for _ in range(40):
                s = record(store, camera=name)
                with lock:
                    got.append(s)
        except Exception as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=camera, args=(f"station{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    # meanwhile another thread (as the MQTT one) reads
    while any(t.is_alive() for t in threads):
        store.find_duplicate("station1", b"x", "P-1", "T", now=T0)
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(s.seq for s in got) == list(range(1, 161))
    assert all(json.loads(s.payload)["seq"] == s.seq for s in got)
    assert store.count() == 160 and len({r["seq"] for r in store.query()}) == 160
    store.close()


def test_a_file_that_is_not_a_results_store_is_refused_in_one_line(tmp_path):
    # given a file of garbage and a SQLite file of something else (the spool) where results.db should be
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database\n" * 200)
    other = tmp_path / "spool.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE messages (seq INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    # when a store is opened on each
    # then the error names the file and what was expected, one line, and neither file was changed
    for path in (garbage, other):
        before = path.read_bytes()
        with pytest.raises(UserError) as err:
            ResultsStore(path)
        assert str(path) in str(err.value) and "expected visiond's results.db" in str(err.value)
        assert "\n" not in str(err.value)
        assert path.read_bytes() == before
    with pytest.raises(UserError, match="not a readable SQLite database"):
        ResultsStore(garbage, read_only=True)


def test_a_read_only_store_never_creates_a_file_and_refuses_writes(tmp_path):
    path = tmp_path / "results.db"
    with pytest.raises(UserError, match=f"no results store at {path}"):
        ResultsStore(path, read_only=True)
    assert not path.exists()
    writer = ResultsStore(path)
    stored = record(writer)
    # while the daemon's store stays open, a read-only one reads beside it
    with ResultsStore(path, read_only=True) as reader:
        assert reader.count() == 1 and reader.last_seq == 1 and reader.get(stored.id)["seq"] == 1
        with pytest.raises(sqlite3.ProgrammingError, match="read-only"):
            record(reader)
    writer.close()
