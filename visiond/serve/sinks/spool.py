"""The on-disk FIFO of outgoing messages, and the node's `seq` counter.

Messages wait here while the broker is away and leave only when the broker
acknowledged them, so a crash or a power cut loses nothing that was appended.
One sqlite file (WAL, synchronous=FULL): a batch of predictions is one commit,
one fsync. The bound is enforced on append by dropping the oldest rows, which
are counted (`visiond_spool_dropped_total`) and logged, never lost silently.
Rows the publisher has handed to the broker are *held* (`hold`) until their
PUBACK deletes them or the connection is lost (`release`): eviction takes the
oldest unheld rows first, so a message that is about to be acknowledged is not
counted as dropped and then delivered anyway. Rows the broker has acknowledged
but whose delete is still pending (`delivered`; the publisher groups its deletes)
go before anything else: removing them loses nothing, so they are not counted
as dropped, and a new message is never evicted to keep a delivered one.

`seq` lives here too because it must be allocated in the same transaction as
the rows that carry it: a seq is never reused, even after its row is gone.

Thread-safety: writes (append, write, delete) share one connection behind a
lock; reads (peek, oldest_age) use a connection per thread, so the MQTT thread
never waits for the inference thread's fsync (WAL lets readers run beside the
writer); `hold` takes no lock. In the daemon one `SpoolWriter` thread does every
write: a batch's rows and the previous batches' acknowledged deletes share one
transaction (`write`). Deletes alone commit without fsync: losing one in a power
cut only means a duplicate delivery, which at-least-once allows; the next
append's fsync makes them durable anyway.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from visiond.fsutil import sqlite_transaction

log = logging.getLogger(__name__)

FILENAME = "spool.sqlite3"
_DROP_LOG_INTERVAL_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    captured_at REAL NOT NULL,
    camera TEXT NOT NULL,
    correlation BLOB
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# (topic, build_payload(seq) -> bytes, qos, captured_at (wall clock), camera[, stream[, correlation]]):
# stream seqs are gapless; stream None = a payload built elsewhere (an inspection: the results store numbers it);
# correlation = MQTT 5 Correlation Data of a reply to a request's Response Topic
SpoolItem = tuple


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    captured_at: float  # wall clock of the frame/event, for the latency metric
    camera: str
    correlation: bytes | None = None  # MQTT 5 Correlation Data (a reply to a request)


class Spool:
    """Bounded, fsync'd FIFO in `<directory>/spool.sqlite3`; owns the node's seq."""

    def __init__(self, directory: str | Path, max_messages: int, metrics=None):
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self.path = Path(directory) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self._metrics = metrics
        self._lock = threading.Lock()  # the write connection and the in-memory seq/count
        self._db = self._connect()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(messages)")}
        if "correlation" not in columns:  # a spool from before replies existed
            self._db.execute("ALTER TABLE messages ADD COLUMN correlation BLOB")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._next_seq, self._count = self._load_state()
        self._streams: dict[str, int] = {}
        self._held: set[int] = set()  # seqs in flight to the broker (or acked, awaiting delete)
        self._delivered: set[int] = set()  # acked by the broker, delete not yet done
        self._dropped_unlogged = 0
        self._last_drop_log = 0.0
        self._publish_count()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (created on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self._db is None:
                raise sqlite3.ProgrammingError("spool is closed")
            db = self._local.db = self._connect()
            with self._lock:
                self._readers.append(db)
        return db

    def _load_state(self) -> tuple[int, int]:
        """Next seq is past both the stored counter and any row (belt and braces)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        stored = row[0] if row else 1
        max_seq, count = self._db.execute("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM messages").fetchone()
        return max(stored, max_seq + 1), count

    def _stream_next(self, stream: str) -> int:
        """The payload seq a stream (prediction, event) hands out next: gapless per stream."""
        if stream not in self._streams:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"next_seq:{stream}",)).fetchone()
            self._streams[stream] = row[0] if row else 1
        return self._streams[stream]

    @property
    def last_seq(self) -> int:
        """The highest seq handed out so far (0 before the first)."""
        return self._next_seq - 1

    def append(self, items: Sequence[SpoolItem]) -> list[int]:
        """Store a batch in one transaction; returns the consecutive seqs it got."""
        return [m.seq for m in self.write(items)[0]]

    def write(self, items: Sequence[SpoolItem], delete: Sequence[int] = ()) -> tuple[list[SpooledMessage], int]:
        """One transaction (one fsync when anything is appended): store `items`, remove the delivered `delete`.

        Returns the stored messages, in seq order (what the publisher may send without reading them back), and
        how many of the oldest rows the bound evicted to make room (0 in the common case).
        """
        if not items:
            if delete:
                self.delete(delete)
            return [], 0
        with self._lock:
            first = self._next_seq
            counters: dict[str, int] = {}
            rows = []
            seq = first
            for topic, build, qos, captured_at, camera, *rest in items:
                stream = rest[0] if rest else "prediction"
                correlation = rest[1] if len(rest) > 1 else None
                if stream is None:
                    payload = build(0)
                else:
                    n = counters.get(stream) or self._stream_next(stream)
                    counters[stream] = n + 1
                    payload = build(n)
                rows.append((seq, topic, payload, qos, captured_at, camera, correlation))
                seq += 1
            end = seq
            db = self._db
            with sqlite_transaction(db):
                removed = 0
                if delete:
                    before = db.total_changes
                    db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in delete])
                    removed = db.total_changes - before
                if self._delivered and self._count - removed + len(rows) > self.max_messages:
                    # make room with what the broker already has: nothing is lost
                    done = list(self._delivered)  # (one C-level copy: atomic under the GIL)
                    before = db.total_changes
                    db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in done])
                    removed += db.total_changes - before
                    self._delivered.difference_update(done)
                    self._held.difference_update(done)
                over = max(0, self._count - removed + len(rows) - self.max_messages)
                db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (end,))
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               [(f"next_seq:{k}", v) for k, v in counters.items()])
                if over:
                    db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in self._victims(over)])
            self._next_seq = end
            self._streams.update(counters)
            self._held.difference_update(delete)
            self._delivered.difference_update(delete)
            self._count += len(rows) - over - removed
            if over:
                self._note_dropped(over)
        self._publish_count()
        return [SpooledMessage(*r) for r in rows], over

    def _victims(self, n: int) -> list[int]:
        """The `n` seqs to evict: the oldest unheld rows, then (only if too few) the oldest held ones."""
        oldest = [r[0] for r in self._db.execute(
            "SELECT seq FROM messages ORDER BY seq LIMIT ?", (n + len(self._held),))]
        free = [s for s in oldest if s not in self._held]
        if len(free) >= n:
            return free[:n]
        held = [s for s in oldest if s in self._held]
        victims = free + held[: n - len(free)]
        self._held.difference_update(victims)
        return victims

    def hold(self, seq: int) -> None:
        """The publisher handed this row to the broker: evict it last.

        No lock: one set operation is atomic under the GIL, and the publisher must not wait for a commit's fsync.
        """
        self._held.add(seq)

    def delivered(self, seq: int) -> None:
        """The broker acknowledged this row; its delete will follow. Until then it is evicted first (and not counted
        as dropped). No lock, like `hold`."""
        self._delivered.add(seq)

    def release(self, seqs: Sequence[int] | None = None) -> None:
        """These rows are no longer in flight (connection lost); None releases all."""
        with self._lock:
            if seqs is None:
                self._held.clear()
            else:
                self._held.difference_update(seqs)

    def peek(self, after_seq: int, limit: int) -> list[SpooledMessage]:
        """Up to `limit` messages with seq > after_seq, oldest first."""
        rows = self._reader().execute(
            "SELECT seq, topic, payload, qos, captured_at, camera, correlation FROM messages WHERE seq > ? "
            "ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()
        return [SpooledMessage(*r) for r in rows]

    def present(self, seqs: Iterable[int]) -> set[int]:
        """Which of `seqs` are still spooled (the others were delivered or evicted)."""
        seqs, found = list(seqs), set()
        db = self._reader()
        for i in range(0, len(seqs), 500):  # well under SQLite's limit on bound parameters
            part = seqs[i:i + 500]
            found.update(r[0] for r in db.execute(
                f"SELECT seq FROM messages WHERE seq IN ({','.join('?' * len(part))})", part))
        return found

    def delete(self, seqs: Sequence[int]) -> int:
        """Remove delivered messages (one transaction); unknown seqs are ignored."""
        if not seqs:
            return 0
        with self._lock:
            db = self._db
            before = db.total_changes
            with sqlite_transaction(db, durable=False):  # no fsync: see the module docstring
                db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in seqs])
            self._held.difference_update(seqs)
            self._delivered.difference_update(seqs)
            removed = db.total_changes - before
            self._count -= removed
        self._publish_count()
        return removed

    def count(self) -> int:
        return self._count

    def oldest_age(self) -> float:
        """Seconds since the oldest waiting message was captured; 0 when empty."""
        row = self._reader().execute("SELECT captured_at FROM messages ORDER BY seq LIMIT 1").fetchone()
        age = max(0.0, time.time() - row[0]) if row else 0.0
        if self._metrics is not None:
            self._metrics.spool_oldest_age.set(age)
        return age

    def close(self) -> None:
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            if self._db is not None:
                self._db.close()
                self._db = None  # later use fails loudly instead of touching a closed file

    def _publish_count(self) -> None:
        if self._metrics is not None:
            self._metrics.spool_messages.set(self._count)

    def _note_dropped(self, n: int) -> None:
        """Count every drop; log at most once per interval so a full spool can't flood the log."""
        if self._metrics is not None:
            self._metrics.spool_dropped.inc(n)
        self._dropped_unlogged += n
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            log.warning(
                "spool full (%d messages): dropped the %d oldest since the last report",
                self.max_messages, self._dropped_unlogged,
            )
            self._dropped_unlogged = 0
            self._last_drop_log = now


class SpoolWriter:
    """Group commit in front of the spool: producers hand batches over and go on;
    one thread writes everything queued in one transaction (one fsync).

    The inference thread then never waits on the disk (an SD card's fsync can take
    tens of ms), and under load many batches share one fsync. A bound keeps memory
    finite: when the disk falls that far behind, `put` blocks, and frames back up
    into the camera queues, where the drop policy counts them.

    The publisher hands its acknowledged seqs here too (`delete`): they leave the
    spool in the same transaction as the next batch, so the publisher's thread never
    waits on the disk either. `on_written(messages, evicted)` gets what was stored,
    for the publisher to send from memory.
    """

    def __init__(self, spool: Spool, on_written: Callable[[list[SpooledMessage], int], None],
                 on_failed: Callable[[int], None], max_pending: int = 20_000):
        self._spool, self._on_written, self._on_failed = spool, on_written, on_failed
        self._max = max_pending
        self._pending: list = []
        self._deletes: list[int] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self.busy_since = 0.0  # monotonic start of the write in progress, 0.0 when idle (daemon liveness)
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, items: list) -> None:
        with self._cond:
            while len(self._pending) >= self._max and not self._stopping and self._thread.is_alive():
                self._cond.wait(0.5)
            self._pending.extend(items)
            self._cond.notify_all()

    def delete(self, seqs: Sequence[int]) -> bool:
        """Queue delivered seqs for deletion with the next write; False when the writer no longer runs (then the
        caller deletes them itself)."""
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                return False
            self._deletes.extend(seqs)
            self._cond.notify_all()
            return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything handed over so far is on disk (and every queued delete done)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._deletes or self._busy) and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return not self._pending

    def stop(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._deletes and not self._stopping:
                    self._cond.wait()
                if not self._pending and not self._deletes and self._stopping:
                    return
                items, self._pending = self._pending, []
                deletes, self._deletes = self._deletes, []
                self._busy = True
                self.busy_since = time.monotonic()
                self._cond.notify_all()
            try:
                if items:
                    written = self._spool.write(items, deletes)
                else:
                    self._spool.delete(deletes)  # no fsync (see the module docstring)
            except Exception:  # a full or broken disk must not end the stage; count and go on
                if items:
                    self._on_failed(len(items))
                    log.exception("could not spool %d message(s); they are lost (counted as failed)", len(items))
                    try:  # the delivered ones still leave (their delete went down with the failed transaction)
                        self._spool.delete(deletes)
                    except Exception:
                        log.exception("could not delete %d delivered message(s); they may be sent again",
                                      len(deletes))
                else:
                    log.exception("could not delete %d delivered message(s); they may be sent again", len(deletes))
            else:
                if items:
                    self._on_written(*written)
            finally:
                with self._cond:
                    self._busy = False
                    self.busy_since = 0.0
                    self._cond.notify_all()
