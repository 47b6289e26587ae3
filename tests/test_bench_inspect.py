"""`visiond bench --inspect`: a triggered station with 3 ROIs, driven by a PLC over MQTT 5 against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_inspect_answers_every_trigger_and_reports_latency_and_accuracy(tmp_path, synth_video, line_model):
    # given the synthetic line (30 fps, with its truth CSV) and a small model trained on it
    out = tmp_path / "inspect.json"
    # when the station bench runs for 5 s at its default 10 triggers a second
    r = subprocess.run([sys.executable, "-m", "visiond", "bench", "--inspect", "--seconds", "5",
                        "--video", str(synth_video.path), "--checkpoint", str(line_model), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["inspect"]
    # then every one of the 50 triggers got exactly one verdict, none of them an ERROR
    assert (s["triggers"], s["answered"], s["unanswered"], s["answered_more_than_once"]) == (50, 50, 0, 0), s
    assert s["verdicts"]["ERROR"] == 0 and s["errors"] == {}, s["errors"]
    assert s["verdicts"]["OK"] + s["verdicts"]["NG"] == 50 and s["verdicts"]["NG"] > 0
    assert (s["rois"], s["rate_hz"], s["camera_fps"]) == (3, 10.0, 30.0)
    # and the verdicts agree with the line's ground truth at the model's accuracy
    assert s["judged"] == 50 and s["accuracy"] >= 0.8, s["accuracy"]
    # and the latency is the PLC's: ordered percentiles, at least the wait for a 3-frame burst at 30 fps
    # (the third frame comes two frame periods after the first), and more than the daemon's own share of it
    lat = s["latency_ms"]
    assert 2 * 1000 / 30 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"] < 2000, lat
    assert s["daemon_ms"]["burst"]["p50"] < s["daemon_ms"]["total"]["p50"] < lat["p50"], s["daemon_ms"]
    assert s["exit_code"] == 0 and s["cpu_s_per_trigger"] > 0
    assert result["model"]["arch"] == "smallcnn" and result["machine"]["cores"] >= 1
    # and the table and its summary line say the same
    row = next(line for line in r.stdout.splitlines() if "trigger -> verdict (PLC)" in line)
    assert [c.strip() for c in row.split("│")][2] == f"{lat['p50']:.1f}", row
    assert "50 triggers, 50 answered (OK " in r.stdout and ", 0 unanswered;" in r.stdout


def test_bench_inspect_refuses_a_non_positive_duration_in_one_line():
    r = subprocess.run([sys.executable, "-m", "visiond", "bench", "--inspect", "--seconds", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "visiond: error: --seconds 0 and --rate 10: expected both > 0", r.stderr
