"""`visiond results`: an operator lists, filters, exports and summarises the daemon's verdicts, and a wrong
option or path gets one line and exit 2."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from visiond.cli.app import app
from visiond.cli.results import FIELDS
from visiond.serve.inspect.store import ResultsStore

HOUR0 = 1_796_112_000.0  # 2026-12-01T08:00:00Z
runner = CliRunner()


def visiond(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visiond", *args], capture_output=True, text=True, timeout=120)


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(name="store")
def store_fixture(tmp_path) -> tuple[Path, list[dict]]:
    """A results store, closed, holding five verdicts of two stations between 08:10 and 09:20 on 2026-12-01."""
    path = tmp_path / "results.db"
    rows = []
    store = ResultsStore(path)
    for i, (camera, verdict, minute) in enumerate([("station1", "OK", 10), ("station1", "NG", 20),
                                                   ("station1", "OK", 30), ("station2", "ERROR", 40),
                                                   ("station1", "OK", 80)]):
        row = {"id": str(uuid.uuid4()), "job_id": f"job-{i}", "camera": camera, "part_id": f"P-{i}",
               "trigger_id": None, "door": "modbus", "recipe": "part-a", "verdict": verdict,
               "reason": "deadline" if verdict == "ERROR" else None, "triggered_at": HOUR0 + minute * 60 - 0.1,
               "decided_at": HOUR0 + minute * 60, "correlation": b"\xab\x01" if i == 0 else None,
               "response_topic": None,
               "rois": [] if verdict == "ERROR" else [{"name": "screw", "label": verdict.lower(), "score": 0.91}],
               "models": {}, "latency_ms": {"burst": 50.0, "inference": 9.0, "total": 99.25}, "evidence": None}
        payload = {"schema": "visiond.inspection/1", "job_id": row["job_id"], "verdict": verdict, "part_id": f"P-{i}"}
        store.record(row, lambda seq, p=payload: json.dumps({**p, "seq": seq}).encode())
        rows.append(row)
    store.close()
    return path, rows


def test_list_shows_the_newest_verdicts_in_a_table(store):
    path, rows = store
    out = invoke("results", "list", "--db", str(path))
    lines = [line for line in out.splitlines() if "job-" in line]
    # then every verdict is a line, newest first, with its time, station, verdict, ROI and latency
    assert [line.split()[-2] for line in lines] == ["job-4", "job-3", "job-2", "job-1", "job-0"]
    assert "2026-12-01T08:20:00.000000Z" in lines[3] and "station1" in lines[3] and " NG " in lines[3]
    assert "screw=ng:0.91" in lines[3] and "99.2" in lines[3] and "part-a" in lines[3]
    assert "deadline" in lines[1] and "ERROR" in lines[1]
    assert [line.split()[-2] for line in invoke("results", "list", "--db", str(path), "-n", "2").splitlines()
            if "job-" in line] == ["job-4", "job-3"]


def test_list_filters_by_verdict_station_and_time(store):
    path, _ = store

    def jobs(*args: str) -> list[str]:
        out = invoke("results", "list", "--db", str(path), "--format", "jsonl", *args)
        return [json.loads(line)["job_id"] for line in out.splitlines()]

    assert jobs("--verdict", "NG") == ["job-1"]
    assert jobs("--verdict", "ok", "--camera", "station1") == ["job-4", "job-2", "job-0"]
    assert jobs("--since", "2026-12-01T08:30:00Z", "--until", "2026-12-01T09:00:00Z") == ["job-3", "job-2"]
    assert jobs("--since", "2026-12-02") == []
    assert jobs("--part", "P-3") == ["job-3"]


def test_csv_has_a_header_and_one_line_per_verdict_with_every_column(store, tmp_path):
    path, rows = store
    out_file = tmp_path / "out.csv"
    invoke("results", "list", "--db", str(path), "--format", "csv", "--out", str(out_file))
    lines = out_file.read_text().splitlines()
    assert len(lines) == 1 + len(rows)
    records = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert tuple(records[0]) == FIELDS
    oldest = records[-1]
    assert oldest["job_id"] == "job-0" and oldest["decided_at"] == "2026-12-01T08:10:00.000000Z"
    assert oldest["correlation"] == "ab01" and json.loads(oldest["rois"])[0]["label"] == "ok"
    assert json.loads(oldest["latency_ms"])["total"] == 99.25 and oldest["trigger_id"] == ""


def test_export_writes_every_verdict_as_json_lines(store, tmp_path):
    path, rows = store
    out = invoke("results", "export", "--db", str(path))
    exported = [json.loads(line) for line in out.splitlines()]
    assert len(exported) == len(rows) and set(exported[0]) == set(FIELDS)
    by_job = {e["job_id"]: e for e in exported}
    assert by_job["job-3"]["verdict"] == "ERROR" and by_job["job-3"]["reason"] == "deadline"
    assert by_job["job-3"]["rois"] == [] and by_job["job-0"]["triggered_at"] == "2026-12-01T08:09:59.900000Z"
    assert [e["seq"] for e in exported] == [5, 4, 3, 2, 1]
    target = tmp_path / "ng.csv"
    invoke("results", "export", "--db", str(path), "--verdict", "NG", "--format", "csv", "-o", str(target))
    assert len(target.read_text().splitlines()) == 2


def test_show_prints_the_stored_payload_by_job_id_or_id(store):
    path, rows = store
    by_job = json.loads(invoke("results", "show", "job-1", "--db", str(path)))
    assert by_job == {"schema": "visiond.inspection/1", "job_id": "job-1", "verdict": "NG", "part_id": "P-1", "seq": 2}
    assert json.loads(invoke("results", "show", rows[1]["id"], "--db", str(path))) == by_job


def test_summary_counts_and_yield_per_station_and_hour_with_totals(store):
    path, _ = store
    out = invoke("results", "summary", "--db", str(path), "--format", "csv")
    got = [(r["camera"], r["hour"], r["ok"], r["ng"], r["error"], r["total"], r["yield"])
           for r in csv.DictReader(io.StringIO(out))]
    assert got == [
        ("station1", "2026-12-01T08:00:00.000000Z", "2", "1", "0", "3", str(2 / 3)),
        ("station1", "2026-12-01T09:00:00.000000Z", "1", "0", "0", "1", "1.0"),
        ("station1", "total", "3", "1", "0", "4", "0.75"),
        ("station2", "2026-12-01T08:00:00.000000Z", "0", "0", "1", "1", "0.0"),
        ("station2", "total", "0", "0", "1", "1", "0.0"),
    ]
    table = invoke("results", "summary", "--db", str(path), "--camera", "station1")
    assert "66.7%" in table and "75.0%" in table and "station2" not in table
    assert [json.loads(line)["hour"] for line in invoke("results", "summary", "--db", str(path), "--format", "jsonl",
                                                        "--since", "2026-12-01T09:00:00Z").splitlines()] == [
        "2026-12-01T09:00:00.000000Z", "total"]


def test_relative_since_counts_back_from_now(tmp_path):
    path = tmp_path / "results.db"
    store = ResultsStore(path)
    now = time.time()
    for job, age_h in (("recent", 1), ("old", 30)):
        row = {"id": str(uuid.uuid4()), "job_id": job, "camera": "station1", "part_id": "P", "door": "http",
               "verdict": "OK", "triggered_at": now - age_h * 3600, "decided_at": now - age_h * 3600}
        store.record(row, lambda seq: b"{}")
    store.close()
    assert [json.loads(line)["job_id"] for line in invoke(
        "results", "export", "--db", str(path), "--since", "24h").splitlines()] == ["recent"]
    assert len(invoke("results", "export", "--db", str(path), "--since", "2d").splitlines()) == 2


def test_the_store_is_found_through_the_daemon_config(store, tmp_path):
    path, _ = store
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    config = tmp_path / "visiond.yaml"
    config.write_text(yaml.safe_dump({"cameras": [{"name": "station1", "source": "line.mp4"}],
                                      "model": {"checkpoint": str(ckpt)}, "spool": {"dir": str(tmp_path)}}))
    assert "job-4" in invoke("results", "list", "--config", str(config))
    # and a config naming its results.db elsewhere is read there
    elsewhere = tmp_path / "elsewhere" / "verdicts.db"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    config.write_text(yaml.safe_dump({"cameras": [{"name": "station1", "source": "line.mp4"}],
                                      "model": {"checkpoint": str(ckpt)}, "spool": {"dir": str(tmp_path)},
                                      "results": {"db": str(elsewhere)}}))
    assert "job-4" in invoke("results", "list", "--config", str(config))


@pytest.mark.parametrize("args, named", [
    (["--since", "yesterday"], "--since: got 'yesterday', expected an RFC 3339 time or date"),
    (["--until", "24"], "--until: got '24', expected"),
    (["--verdict", "BAD"], "--verdict: got 'BAD', expected one of OK, NG, ERROR"),
    (["--format", "xml"], "--format: got 'xml', expected one of table, csv, jsonl"),
])
def test_a_bad_option_is_one_line_naming_it_and_exit_2(store, args, named):
    path, _ = store
    r = visiond("results", "list", "--db", str(path), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and named in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_a_missing_store_is_one_line_and_is_not_created(tmp_path):
    path = tmp_path / "nowhere" / "results.db"
    for command in (["list"], ["summary"], ["show", "job-1"], ["export"]):
        r = visiond("results", *command, "--db", str(path))
        assert r.returncode == 2
        assert r.stderr == (f"visiond: error: no results store at {path} (expected the daemon's results.db; "
                            "is results enabled / the path right?)\n")
    assert not path.parent.exists()


def test_an_unknown_job_is_one_line(store):
    path, _ = store
    r = visiond("results", "show", "job-99", "--db", str(path))
    assert r.returncode == 2 and r.stderr == f"visiond: error: no verdict with id or job_id 'job-99' in {path}\n"
