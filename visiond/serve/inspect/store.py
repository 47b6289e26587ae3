"""The results store: every inspection verdict, on disk before anyone hears of it.

A verdict is a row in one SQLite file (WAL, synchronous=FULL), committed with an
fsync before its payload is published, so a PLC that was told OK can always find
that OK again (`visiond results`), and a trigger redelivered by MQTT QoS 1 is
answered from here with the same id and job_id instead of being inspected twice.

The inspection stream's `seq` is allocated in the same transaction as the row,
from a counter in the `meta` table: gapless (a failed write rolls back and takes
no seq), monotonic across restarts, never reused after old rows are pruned.

Thread-safety (as the spool): writes (record, prune) share one connection behind
a lock; reads (find_duplicate, get, query, summary) use a connection per thread,
so the MQTT thread never waits for a camera thread's fsync. `read_only=True`
opens an existing file with `mode=ro` for the command line, which must never
create or change a store.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from visiond.errors import UserError
from visiond.fsutil import sqlite_transaction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PRUNE_CHUNK = 5000
VERDICTS = ("OK", "NG", "ERROR")
DOORS = ("mqtt", "http", "opcua", "modbus")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL UNIQUE,
    camera TEXT NOT NULL,
    part_id TEXT,
    trigger_id TEXT,
    door TEXT NOT NULL,
    recipe TEXT,
    verdict TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    triggered_at REAL NOT NULL,
    decided_at REAL NOT NULL,
    correlation BLOB,
    response_topic TEXT,
    rois TEXT NOT NULL,
    models TEXT NOT NULL,
    latency_ms TEXT NOT NULL,
    evidence TEXT,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS results_decided_at ON results (decided_at);
CREATE INDEX IF NOT EXISTS results_camera ON results (camera, decided_at);
CREATE INDEX IF NOT EXISTS results_verdict ON results (verdict, decided_at);
CREATE INDEX IF NOT EXISTS results_part_id ON results (part_id);
CREATE INDEX IF NOT EXISTS results_correlation ON results (correlation) WHERE correlation IS NOT NULL;
CREATE INDEX IF NOT EXISTS results_trigger ON results (camera, part_id, trigger_id) WHERE trigger_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS unspooled (seq INTEGER PRIMARY KEY);  -- stored, not yet known to be on the MQTT spool
"""

# column -> default when the row leaves it out (None: the row must give it)
_REQUIRED = ("id", "job_id", "camera", "part_id", "door", "verdict", "triggered_at", "decided_at")
_OPTIONAL: dict[str, Callable[[], Any]] = {
    "trigger_id": lambda: None, "recipe": lambda: None, "reason": lambda: None, "detail": lambda: None,
    "correlation": lambda: None, "response_topic": lambda: None, "rois": list, "models": dict, "latency_ms": dict,
    "evidence": lambda: None,
}
_JSON_COLUMNS = ("rois", "models", "latency_ms", "evidence")
_COLUMNS = ("seq", "id", "job_id", "camera", "part_id", "trigger_id", "door", "recipe", "verdict", "reason", "detail",
            "triggered_at", "decided_at", "correlation", "response_topic", "rois", "models", "latency_ms", "evidence")
_SELECT = ", ".join(_COLUMNS)
_INSERT = f"INSERT INTO results ({_SELECT}, payload) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"


@dataclass(frozen=True, slots=True)
class Stored:
    """A verdict as it was written: what a door sends (again) for it."""

    seq: int
    payload: bytes
    id: str
    job_id: str


class ResultsStore:
    """One SQLite file of verdicts; owns the inspection stream's seq."""

    def __init__(self, path: str | Path, metrics=None, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._metrics = metrics
        self._lock = threading.Lock()  # the write connection, the seq and the count
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._db: sqlite3.Connection | None = None
        self._next_seq = 1
        self._count = 0
        if read_only:
            if not self.path.is_file():
                raise UserError(f"no results store at {self.path} (expected the daemon's results.db; "
                                "is results enabled / the path right?)")
            self._guard(lambda: self._check_schema(self._reader()))
        else:
            self._guard(self._open_for_writing)
            self._publish_count()

    # -- opening ---------------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False, timeout=30.0)
        else:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA synchronous=FULL")
        return db

    def _open_for_writing(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"results store {self.path}: cannot create its directory ({exc.strerror}); "
                            "expected a writable path (results.db)") from None
        db = self._db = self._connect()
        self._check_schema(db, allow_empty=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        max_seq, self._count = db.execute("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM results").fetchone()
        self._next_seq = max(row[0] if row else 1, max_seq + 1)  # past both the counter and any row

    def _check_schema(self, db: sqlite3.Connection, allow_empty: bool = False) -> None:
        """A file of another kind (the spool, some other database) is refused, not written into."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and allow_empty:
            return
        if not {"results", "meta"} <= tables:
            shown = ", ".join(sorted(tables)) or "none"
            raise UserError(f"results store {self.path}: a SQLite file of something else (tables: {shown}); "
                            "expected visiond's results.db")
        columns = {r[1] for r in db.execute("PRAGMA table_info(results)")}
        missing = sorted((set(_COLUMNS) | {"payload"}) - columns)
        if missing:
            raise UserError(f"results store {self.path}: its results table lacks {', '.join(missing)}; "
                            "expected visiond's results.db")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row and row[0] > SCHEMA_VERSION:
            raise UserError(f"results store {self.path}: schema {row[0]} is newer than this visiond's "
                            f"({SCHEMA_VERSION}); expected a store written by this version or an older one")

    def _guard(self, opening: Callable[[], None]) -> None:
        """SQLite's own errors at open become one line naming the file; nothing is left open."""
        try:
            opening()
        except sqlite3.DatabaseError as exc:
            self.close()
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise UserError(f"results store {self.path}: not a readable SQLite database ({exc}); expected "
                                "visiond's results.db (move the file aside to start a new store)") from None
            raise UserError(f"results store {self.path}: cannot open ({exc}); expected a readable"
                            f"{'' if self.read_only else ' and writable'} SQLite file") from None
        except UserError:
            self.close()
            raise

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (created on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise sqlite3.ProgrammingError("results store is closed")
            db = self._local.db = self._connect()
            with self._lock:
                self._readers.append(db)
        return db

    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("results store is closed" if self._closed
                                           else "results store was opened read-only")
        return self._db

    # -- writing ---------------------------------------------------------------------------------------------------

    def record(self, row: dict, build: Callable[[int], bytes]) -> Stored:
        """Store a verdict with the next seq; `build(seq)` makes its payload inside the transaction."""
        try:
            values = _row_values(row)
            with self._lock:
                seq = self._next_seq
                with sqlite_transaction(self._writer()) as db:
                    payload = build(seq)
                    if not isinstance(payload, (bytes, bytearray, memoryview)):
                        raise TypeError(f"build(seq) must return bytes, got {type(payload).__name__}")
                    payload = bytes(payload)
                    db.execute(_INSERT, (seq, *values, payload))
                    db.execute("INSERT INTO unspooled VALUES (?)", (seq,))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (seq + 1,))
                self._next_seq = seq + 1
                self._count += 1
        except Exception:
            if self._metrics is not None:
                self._metrics.results_write_failures.inc()
            raise
        self._publish_count()
        return Stored(seq, payload, row["id"], row["job_id"])

    def unspooled(self) -> list[tuple[int, str, bytes]]:
        """(seq, camera, payload) of the verdicts stored but not yet marked spooled: a crash fell in between."""
        return self._reader().execute("SELECT r.seq, r.camera, r.payload FROM unspooled u JOIN results r "
                                      "ON r.seq = u.seq ORDER BY r.seq").fetchall()

    def mark_spooled(self, seqs: list[int]) -> None:
        """These verdicts are on the MQTT spool (fsync'd): a restart need not publish them again."""
        with self._lock, sqlite_transaction(self._writer()) as db:
            db.executemany("DELETE FROM unspooled WHERE seq = ?", [(s,) for s in seqs])

    def prune(self, keep_days: float, now: float | None = None) -> int:
        """Delete rows decided more than `keep_days` ago, a chunk per commit so record() waits at most one chunk.

        0 keeps everything, as `results.keep_days: 0` means in the config."""
        if not keep_days >= 0:
            raise ValueError(f"keep_days must be >= 0, got {keep_days}")
        if keep_days == 0:
            return 0
        cutoff = (time.time() if now is None else now) - keep_days * 86400.0
        removed = 0
        while True:
            with self._lock:
                with sqlite_transaction(self._writer(), durable=False) as db:  # a lost delete: the next prune
                    cur = db.execute("DELETE FROM results WHERE seq IN (SELECT seq FROM results "
                                     "WHERE decided_at < ? ORDER BY decided_at LIMIT ?)", (cutoff, PRUNE_CHUNK))
                self._count -= cur.rowcount
                removed += cur.rowcount
            if cur.rowcount < PRUNE_CHUNK:
                break
        self._publish_count()
        if removed:
            log.info("results store: pruned %d verdict(s) decided more than %g day(s) ago", removed, keep_days)
        return removed

    # -- reading ---------------------------------------------------------------------------------------------------

    def find_duplicate(self, camera: str, correlation: bytes | None, part_id: str | None, trigger_id: str | None,
                       within_s: float = 600, now: float | None = None) -> Stored | None:
        """The stored verdict a redelivered trigger already got: same camera and either the same MQTT 5
        correlation data, or the same part_id + trigger_id, decided within `within_s`."""
        since = (time.time() if now is None else now) - within_s
        db = self._reader()
        sql = "SELECT seq, payload, id, job_id FROM results WHERE {} AND decided_at >= ? ORDER BY seq DESC LIMIT 1"
        if correlation:
            row = db.execute(sql.format("correlation = ? AND camera = ?"), (bytes(correlation), camera, since)).fetchone()
            if row:
                return Stored(*row)
        if part_id and trigger_id:
            row = db.execute(sql.format("camera = ? AND part_id = ? AND trigger_id = ?"),
                             (camera, part_id, trigger_id, since)).fetchone()
            if row:
                return Stored(*row)
        return None

    def get(self, key: str) -> dict | None:
        """One verdict by id or job_id, with its payload decoded; None when there is none."""
        row = self._reader().execute(f"SELECT {_SELECT}, payload FROM results WHERE id = ? OR job_id = ? LIMIT 1",
                                     (key, key)).fetchone()
        if row is None:
            return None
        out = _row_dict(row[:-1])
        out["payload"] = json.loads(row[-1])
        return out

    def iterate(self, since: float | None = None, until: float | None = None, camera: str | None = None,
                verdict: str | None = None, part_id: str | None = None, limit: int | None = None,
                newest_first: bool = True) -> Iterator[dict]:
        """The verdicts matching every filter given (since <= decided_at < until), one at a time."""
        where, args = _filters(since, until, camera, verdict, part_id)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_SELECT} FROM results{where} ORDER BY decided_at {order}, seq {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        for row in self._reader().execute(sql, args):
            yield _row_dict(row)

    def query(self, since: float | None = None, until: float | None = None, camera: str | None = None,
              verdict: str | None = None, part_id: str | None = None, limit: int | None = None,
              newest_first: bool = True) -> list[dict]:
        """As `iterate`, as a list (no payloads: the row's columns carry everything but the node name)."""
        return list(self.iterate(since, until, camera, verdict, part_id, limit, newest_first))

    def summary(self, since: float | None = None, camera: str | None = None) -> list[dict]:
        """OK/NG/ERROR counts and yield (ok / total) per camera and UTC hour, by camera then hour."""
        where, args = _filters(since, None, camera, None, None)
        rows = self._reader().execute(
            "SELECT camera, CAST(decided_at / 3600 AS INTEGER) * 3600 AS hour, SUM(verdict = 'OK'), "
            f"SUM(verdict = 'NG'), SUM(verdict = 'ERROR'), COUNT(*) FROM results{where} "
            "GROUP BY camera, hour ORDER BY camera, hour", args).fetchall()
        return [{"camera": cam, "hour": float(hour), "ok": ok, "ng": ng, "error": err, "total": total,
                 "yield": ok / total if total else None} for cam, hour, ok, ng, err, total in rows]

    def count(self) -> int:
        """Rows held now."""
        if self.read_only:
            return self._reader().execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self._count

    @property
    def last_seq(self) -> int:
        """The highest seq handed out so far (0 before the first); read-only stores read it from the file."""
        if self.read_only:
            row = self._reader().execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            return (row[0] if row else 1) - 1
        return self._next_seq - 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for db in self._readers:
                db.close()
            self._readers.clear()
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _publish_count(self) -> None:
        if self._metrics is not None:
            self._metrics.results_rows.set(self._count)


def _row_values(row: dict) -> tuple:
    """The row's columns in insert order (seq and payload aside); a wrong key or value is a programming error."""
    unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
    missing = [k for k in _REQUIRED if k not in row]
    if unknown or missing:
        raise ValueError(f"results row: unknown keys {unknown}, missing keys {missing}")
    if row["verdict"] not in VERDICTS:
        raise ValueError(f"results row: verdict {row['verdict']!r}, expected one of {', '.join(VERDICTS)}")
    if row["door"] not in DOORS:
        raise ValueError(f"results row: door {row['door']!r}, expected one of {', '.join(DOORS)}")
    for key in ("triggered_at", "decided_at"):
        if not isinstance(row[key], (int, float)) or not math.isfinite(row[key]):
            raise ValueError(f"results row: {key} {row[key]!r}, expected epoch seconds")
    full = {k: row[k] if k in row else _OPTIONAL[k]() for k in _COLUMNS[1:]}
    for key in _JSON_COLUMNS:
        full[key] = None if full[key] is None else json.dumps(full[key], separators=(",", ":"), ensure_ascii=False)
    if full["correlation"] is not None:
        full["correlation"] = bytes(full["correlation"]) or None
    full["triggered_at"], full["decided_at"] = float(full["triggered_at"]), float(full["decided_at"])
    return tuple(full[k] for k in _COLUMNS[1:])


def _row_dict(row: tuple) -> dict:
    out = dict(zip(_COLUMNS, row))
    for key in _JSON_COLUMNS:
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def _filters(since, until, camera, verdict, part_id) -> tuple[str, list]:
    clauses, args = [], []
    for clause, value in (("decided_at >= ?", since), ("decided_at < ?", until), ("camera = ?", camera),
                          ("verdict = ?", verdict), ("part_id = ?", part_id)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
