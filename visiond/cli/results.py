"""`visiond results list|show|export|summary`: read the daemon's inspection verdicts.

The command line only reads: the store is opened with SQLite's `mode=ro`, so a
wrong path is reported, never created, and the daemon may keep writing meanwhile
(WAL lets readers run beside the writer). Times print as RFC 3339 UTC, as in the
payloads.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from visiond.errors import UserError
from visiond.timefmt import rfc3339

DEFAULT_DB = Path("/var/lib/visiond/results.db")
FORMATS = ("table", "csv", "jsonl")
VERDICTS = ("OK", "NG", "ERROR")
FIELDS = ("seq", "id", "job_id", "camera", "part_id", "trigger_id", "door", "recipe", "verdict", "reason", "detail",
          "triggered_at", "decided_at", "correlation", "response_topic", "rois", "models", "latency_ms", "evidence")
SUMMARY_FIELDS = ("camera", "hour", "ok", "ng", "error", "total", "yield")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_VERDICT_STYLE = {"OK": "green", "NG": "bold red", "ERROR": "yellow"}

results_app = typer.Typer(name="results", help="Inspection verdicts kept by the daemon (read-only).",
                          no_args_is_help=True, add_completion=False)

_DB = typer.Option(None, "--db", help=f"The results store (default: from --config, else {DEFAULT_DB}).")
_CONFIG = typer.Option(None, "--config", "-c", help="The daemon's YAML config; its results store is read.")
_SINCE = typer.Option(None, "--since", help="Decided at or after: 2026-12-01, 2026-12-01T08:00:00Z (UTC when no "
                                            "offset) or an age such as 30m, 24h, 7d.")
_UNTIL = typer.Option(None, "--until", help="Decided before (same forms as --since).")
_CAMERA = typer.Option(None, "--camera", help="Only this station.")
_VERDICT = typer.Option(None, "--verdict", help="Only OK, NG or ERROR.")
_PART = typer.Option(None, "--part", help="Only this part id.")
_OUT = typer.Option(None, "--out", "-o", help="Write here (replaced whole) instead of to stdout.")


def parse_time(value: str | None, option: str, now: float | None = None) -> float | None:
    """Epoch seconds for an RFC 3339 / ISO time or date (UTC when it has no offset) or an age before `now`."""
    if value is None:
        return None
    age = _AGE.match(value)
    if age:
        return (time.time() if now is None else now) - float(age[1]) * _UNIT_S[age[2]]
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"{option}: got {value!r}, expected an RFC 3339 time or date (2026-12-01, "
                        "2026-12-01T08:00:00Z; UTC when no offset) or an age (30m, 24h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def resolve_db(db: Path | None, config: Path | None) -> Path:
    """--db, else the config's `results.db` (or `<spool.dir>/results.db` when it has none), else the default."""
    if db is not None:
        return db
    if config is not None:
        from visiond.config import load_config

        cfg = load_config(config)
        configured = getattr(getattr(cfg, "results", None), "db", None)
        return Path(configured) if configured is not None else Path(cfg.spool.dir) / "results.db"
    return DEFAULT_DB


def _open(db: Path | None, config: Path | None):
    from visiond.serve.inspect.store import ResultsStore

    return ResultsStore(resolve_db(db, config), read_only=True)


def _choice(value: str, option: str, choices: tuple[str, ...], upper: bool = False) -> str:
    v = value.upper() if upper else value.lower()
    if v not in choices:
        raise UserError(f"{option}: got {value!r}, expected one of {', '.join(choices)}")
    return v


def _filters(since, until, camera, verdict, part) -> dict:
    start, end = parse_time(since, "--since"), parse_time(until, "--until")
    if start is not None and end is not None and start >= end:
        raise UserError(f"--since {since!r} is not before --until {until!r}; expected an earlier --since")
    return {"since": start, "until": end, "camera": camera, "part_id": part,
            "verdict": _choice(verdict, "--verdict", VERDICTS, upper=True) if verdict is not None else None}


@contextlib.contextmanager
def _output(out: Path | None) -> Iterator[IO[str]]:
    """--out replaced whole (a failed export leaves no half file), else stdout; a closed pipe (| head) ends quietly."""
    if out is None:
        try:
            yield sys.stdout
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return
    from visiond.fsutil import atomic_replace

    if not out.parent.is_dir() or out.is_dir():
        raise UserError(f"--out: got '{out}', expected a file in an existing directory")
    with atomic_replace(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        yield fh


def _flat(row: dict) -> dict:
    """A row for csv/jsonl: times as RFC 3339, correlation data as hex."""
    out = {k: row.get(k) for k in FIELDS}
    for key in ("triggered_at", "decided_at"):
        out[key] = rfc3339(row[key])
    if out["correlation"] is not None:
        out["correlation"] = bytes(out["correlation"]).hex()
    return out


def _write_csv(fh: IO[str], rows: Iterable[dict], fields: tuple[str, ...]) -> None:
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(fields)
    for row in rows:
        w.writerow(["" if row[k] is None else json.dumps(row[k], separators=(",", ":"), ensure_ascii=False)
                    if isinstance(row[k], (dict, list)) else row[k] for k in fields])


def _write_jsonl(fh: IO[str], rows: Iterable[dict]) -> None:
    for row in rows:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _console(fh: IO[str]) -> Console:
    """A terminal gets its width; a pipe or a file gets lines long enough not to wrap a job id."""
    tty = fh.isatty() if hasattr(fh, "isatty") else False
    return Console(file=fh, width=None if tty else 250, force_terminal=None if tty else False)


def _rois(rois: list | None) -> str:
    parts = []
    for r in rois or []:
        score = r.get("score")
        parts.append(f"{r.get('name')}={r.get('label')}" + (f":{score:.2f}" if isinstance(score, (int, float)) else ""))
    return " ".join(parts)


def _rows_table(rows: list[dict]) -> Table:
    t = Table()
    for name in ("decided_at", "camera", "part_id", "verdict", "reason", "recipe", "rois", "total ms", "job_id"):
        t.add_column(name, justify="right" if name == "total ms" else "left",
                     no_wrap=name in ("decided_at", "job_id", "verdict"))
    for r in rows:
        total = (r.get("latency_ms") or {}).get("total")
        t.add_row(rfc3339(r["decided_at"]), r["camera"], r["part_id"] or "",
                  f"[{_VERDICT_STYLE.get(r['verdict'], '')}]{r['verdict']}[/]", r["reason"] or "", r["recipe"] or "",
                  _rois(r.get("rois")), f"{total:.1f}" if isinstance(total, (int, float)) else "", r["job_id"])
    return t


def _write_rows(rows: Iterable[dict], fmt: str, out: Path | None, title: str) -> None:
    with _output(out) as fh:
        if fmt == "table":
            rows = list(rows)
            console = _console(fh)
            console.print(title if rows else f"{title}: none", highlight=False)
            if rows:
                console.print(_rows_table(rows))
        elif fmt == "csv":
            _write_csv(fh, (_flat(r) for r in rows), FIELDS)
        else:
            _write_jsonl(fh, (_flat(r) for r in rows))


@results_app.command("list")
def list_cmd(
    db: Optional[Path] = _DB, config: Optional[Path] = _CONFIG, since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL, camera: Optional[str] = _CAMERA, verdict: Optional[str] = _VERDICT,
    part: Optional[str] = _PART,
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many, newest first (0 = all)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or jsonl (csv and jsonl carry every column)."),
    out: Optional[Path] = _OUT,
) -> None:
    """The latest verdicts, newest first."""
    fmt = _choice(fmt, "--format", FORMATS)
    if limit < 0:
        raise UserError(f"--limit: got {limit}, expected 0 (all) or more")
    filters = _filters(since, until, camera, verdict, part)
    with _open(db, config) as store:
        rows = store.iterate(**filters, limit=limit or None)
        _write_rows(rows, fmt, out, f"verdicts in {store.path}")


@results_app.command("show")
def show_cmd(
    key: str = typer.Argument(..., metavar="ID", help="The verdict's id or job_id."),
    db: Optional[Path] = _DB, config: Optional[Path] = _CONFIG,
) -> None:
    """One verdict's payload, as it was published."""
    with _open(db, config) as store:
        row = store.get(key)
        if row is None:
            raise UserError(f"no verdict with id or job_id {key!r} in {store.path}")
    typer.echo(json.dumps(row["payload"], indent=2, ensure_ascii=False))


@results_app.command("export")
def export_cmd(
    db: Optional[Path] = _DB, config: Optional[Path] = _CONFIG, since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL, camera: Optional[str] = _CAMERA, verdict: Optional[str] = _VERDICT,
    part: Optional[str] = _PART,
    limit: int = typer.Option(0, "--limit", "-n", help="At most this many, newest first (0 = all)."),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl or csv; every column."),
    out: Optional[Path] = _OUT,
) -> None:
    """Every matching verdict (newest first, as list), for a spreadsheet or another system."""
    fmt = _choice(fmt, "--format", ("jsonl", "csv"))
    if limit < 0:
        raise UserError(f"--limit: got {limit}, expected 0 (all) or more")
    filters = _filters(since, until, camera, verdict, part)
    with _open(db, config) as store:
        _write_rows(store.iterate(**filters, limit=limit or None), fmt, out, "")


def _summary_rows(hours: list[dict]) -> list[dict]:
    """Hourly rows, each camera's followed by its total (hour "total")."""
    out: list[dict] = []
    for i, h in enumerate(hours):
        out.append({**h, "hour": rfc3339(h["hour"])})
        if i + 1 == len(hours) or hours[i + 1]["camera"] != h["camera"]:
            mine = [x for x in hours if x["camera"] == h["camera"]]
            sums = {k: sum(x[k] for x in mine) for k in ("ok", "ng", "error", "total")}
            out.append({"camera": h["camera"], "hour": "total", **sums,
                        "yield": sums["ok"] / sums["total"] if sums["total"] else None})
    return out


@results_app.command("summary")
def summary_cmd(
    db: Optional[Path] = _DB, config: Optional[Path] = _CONFIG, since: Optional[str] = _SINCE,
    camera: Optional[str] = _CAMERA,
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or jsonl."),
    out: Optional[Path] = _OUT,
) -> None:
    """OK / NG / ERROR counts and yield (OK / all) per station and UTC hour, and per station in all."""
    fmt = _choice(fmt, "--format", FORMATS)
    start = parse_time(since, "--since")
    with _open(db, config) as store:
        rows = _summary_rows(store.summary(since=start, camera=camera))
        path = store.path
    with _output(out) as fh:
        if fmt == "csv":
            _write_csv(fh, rows, SUMMARY_FIELDS)
        elif fmt == "jsonl":
            _write_jsonl(fh, rows)
        elif not rows:
            _console(fh).print(f"yield in {path}: no verdicts", highlight=False)
        else:
            t = Table()
            for name in SUMMARY_FIELDS:
                t.add_column(name, justify="left" if name in ("camera", "hour") else "right")
            for r in rows:
                style = "bold" if r["hour"] == "total" else None
                t.add_row(r["camera"], r["hour"], str(r["ok"]), str(r["ng"]), str(r["error"]), str(r["total"]),
                          "" if r["yield"] is None else f"{100 * r['yield']:.1f}%", style=style,
                          end_section=r["hour"] == "total")
            console = _console(fh)
            console.print(f"yield in {path}", highlight=False)
            console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(results_app, name="results")
