"""`make demo` as a user next to a line runs it: it must never publish into the plant's broker."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visiond.harness.process import free_port, wait_for_port
from visiond.harness.recorder import Recorder

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"


@pytest.mark.slow
def test_the_demo_starts_its_own_broker_and_leaves_one_on_1883_alone(tmp_path, line_model):
    # given a trained model in the demo's folder (so the demo does not train) and, where this box has
    # one, a broker on 1883 standing for the plant's, watched for anything the demo might publish
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(line_model, out / "model.ckpt")
    plant = Recorder("127.0.0.1", 1883, "visiond/demo-box/#").start() if wait_for_port("127.0.0.1", 1883, 0.5) else None
    try:
        # when the demo runs with its defaults
        r = subprocess.run([sys.executable, str(DEMO), "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    finally:
        if plant is not None:
            plant.stop()
    # then it says which broker it used: a private one on another port
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    used = re.search(r"started a private mosquitto on 127\.0\.0\.1:(\d+)", r.stdout)
    assert used and int(used.group(1)) != 1883, r.stdout[-2000:]
    assert f"port: {used.group(1)}" in (out / "demo-run.yaml").read_text()
    assert "received 600 predictions" in r.stdout
    # and its triggered station answered every one of its 30 parts, mostly as the line's ground truth says
    station = re.search(r"station: 30 parts triggered, (\d+) answered \(OK (\d+), NG (\d+), ERROR (\d+)\); "
                        r"verdict = ground truth for (\d+) of", r.stdout)
    assert station, r.stdout[-3000:]
    answered, ok, ng, error, right = map(int, station.groups())
    assert (answered, ok + ng + error) == (30, 30) and ng > 0 and right >= 24, station.group(0)
    assert all(f"P{k:03d}" in r.stdout for k in range(1, 31))
    # and it names one NG part's annotated evidence image, which is there
    evidence = re.search(r"annotated evidence of NG part (P\d{3}): (\S+_annotated\.jpg)$", r.stdout, re.M)
    assert evidence, r.stdout[-2000:]
    image = Path(evidence.group(2))
    assert image.is_relative_to(out.resolve() / "station-spool" / "evidence") and image.read_bytes()[:2] == b"\xff\xd8"
    # and the plant's broker saw nothing of it (retained messages from before the run come with retain set)
    if plant is not None:
        assert [m for m in plant.messages() if not m.retain] == []


def test_a_named_broker_that_does_not_answer_is_a_one_line_error(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path / "d"), "--broker", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"--broker 127.0.0.1:{port}: nothing answers there" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "d").exists()
