"""The JSONL audit trail: every verdict one line with its batch, appended across restarts, rotated by size."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

import numpy as np

from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.serve.sinks.jsonl import JsonlSink

_IMAGE = np.zeros((2, 2, 3), np.uint8)
CAPTURED_AT = 1_700_000_000.123457


def _prediction(camera: str, index: int, batch: int, label: str = "ok", score: float = 0.9123456789,
                defect: bool = False) -> Prediction:
    frame = Frame(camera, index, CAPTURED_AT + index, 0.0, _IMAGE)
    return Prediction(frame, label, score, ((label, score),), defect, ModelRef("line", "0123abcd4567ef89"),
                      Timings(queue_s=0.001, inference_s=0.004, total_s=0.0061234), batch)


def _batch(camera: str, first: int, size: int, batch: int) -> list[Prediction]:
    return [_prediction(camera, i, batch) for i in range(first, first + size)]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_verdict_is_one_line_with_its_frame_batch_and_model(tmp_path):
    # given a sink in a directory that does not exist yet
    path = tmp_path / "audit" / "verdicts.jsonl"
    sink = JsonlSink(path, "line1-box")
    # when two batches of two cameras are submitted
    sink.submit([_prediction("left", 0, 1), _prediction("right", 0, 1, "scratch", 0.75, True)])
    sink.submit([_prediction("left", 1, 2)])
    # then each verdict is on its own line, readable while the sink is still open (line-buffered)
    records = _records(path)
    sink.close()
    assert records[1] == {"node": "line1-box", "camera": "right", "frame": 0,
                          "captured_at": "2023-11-14T22:13:20.123457Z", "batch": 1, "label": "scratch",
                          "score": 0.75, "defect": True, "model": "0123abcd4567ef89", "latency_ms": 6.123}
    assert [(r["camera"], r["frame"], r["batch"]) for r in records] == [("left", 0, 1), ("right", 0, 1),
                                                                        ("left", 1, 2)]
    assert records[0]["score"] == 0.912346
    assert dt.datetime.fromisoformat(records[2]["captured_at"].replace("Z", "+00:00")).timestamp() == (
        CAPTURED_AT + 1)


def test_a_restart_appends_to_the_trail(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    first = JsonlSink(path, "box")
    first.submit(_batch("cam", 0, 3, 1))
    first.close()
    # when the daemon starts again and classifies more, then the earlier lines are still there, first
    second = JsonlSink(path, "box")
    second.submit(_batch("cam", 3, 2, 1))
    second.close()
    assert [r["frame"] for r in _records(path)] == [0, 1, 2, 3, 4]


def test_rotation_keeps_the_newest_files_whole_and_in_order(tmp_path):
    # given a sink that rotates past 1 kB and keeps two rotated files
    path = tmp_path / "verdicts.jsonl"
    sink = JsonlSink(path, "box", max_bytes=1024, keep=2)
    # when 40 batches of 3 verdicts (about 25 kB) are written
    for n in range(40):
        sink.submit(_batch("cam", 3 * n, 3, n + 1))
    sink.close()
    # then the current file and two rotated ones exist, none beyond them
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["verdicts.jsonl", "verdicts.jsonl.1", "verdicts.jsonl.2"]
    # and a rotated file is only a little past the bound (rotation follows the batch that crossed it)
    for name in names[1:]:
        assert 1024 < (tmp_path / name).stat().st_size < 1024 + 3 * 300
    # and oldest to newest, the files hold the last verdicts written, every line whole, none repeated or torn
    frames = [r["frame"] for name in ("verdicts.jsonl.2", "verdicts.jsonl.1", "verdicts.jsonl")
              for r in _records(tmp_path / name)]
    assert frames == list(range(frames[0], 120)) and frames[0] > 0
    # and no batch is split between two files
    for name in names:
        batches = [r["batch"] for r in _records(tmp_path / name)]
        assert all(batches.count(b) == 3 for b in set(batches)), name


def test_a_pipe_to_a_log_shipper_is_written_and_never_rotated(tmp_path):
    # given the trail is a named pipe read by a log shipper
    path = tmp_path / "verdicts.jsonl"
    os.mkfifo(path)
    received: list[bytes] = []

    def ship() -> None:
        with open(path, "rb") as pipe:
            received.append(pipe.read())

    shipper = threading.Thread(target=ship, daemon=True)
    shipper.start()
    # when far more than max_bytes go through it
    sink = JsonlSink(path, "box", max_bytes=1024, keep=2)
    for n in range(20):
        sink.submit(_batch("cam", 3 * n, 3, n + 1))
    sink.close()
    shipper.join(10)
    # then the shipper got every line and no rotated file appeared beside the pipe
    lines = received[0].decode().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == list(range(60))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verdicts.jsonl"]
