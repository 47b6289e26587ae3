"""`tools/gpu_check.py --dry-run`: the GPU check's whole code path on the CPU, so it runs first time on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("machine", "parity", "model_fps", "resize_paths", "nvdec", "amp_train_step", "streams")
NO_GPU = "no CUDA GPU on this machine"


def _run(args: list[str], out: Path | None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    proc = _run(["--dry-run"], out)
    return proc, out


def test_the_dry_run_writes_every_section_under_out(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    for name in SECTIONS:
        assert report[name]["status"] == "ok", (name, report[name].get("error"), report[name].get("traceback"))
    # model-only speed per runtime, arch and batch
    rows = report["model_fps"]["rows"]
    assert {(r["runtime"], r["arch"]) for r in rows if r["runtime"] == "torch"} == {
        ("torch", "resnet18"), ("torch", "mobilenet_v3_small")}
    assert any(r["runtime"] == "onnxruntime" for r in rows)
    assert all(r["fps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    # the two resize paths side by side, plain and pipelined
    assert {r["path"] for r in report["resize_paths"]["rows"]} == {
        "cpu-resize", "gpu-resize", "cpu-resize-pipelined", "gpu-resize-pipelined"}
    # decode, one training step, and the streams search ran for real
    assert report["nvdec"]["opencv_frames"] == report["nvdec"]["video"]["frames"] and report["nvdec"]["opencv_fps"] > 0
    assert report["amp_train_step"]["loss_finite"] is True and report["amp_train_step"]["step_ms"] > 0
    trials = report["streams"]["trials"]
    assert trials and trials[0]["streams"] == 1 and trials[0]["delivered_share"] > 0
    assert report["streams"]["largest_streams"] == max([0] + [t["streams"] for t in trials if t["holds"]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: its figures are measured, not skipped")
def test_on_a_cpu_the_gpu_only_figures_are_skipped_with_their_reason(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["machine"]["gpu_skipped"] == NO_GPU
    assert report["model_fps"]["skipped"]["peak_gpu_mb"] == NO_GPU
    assert all(r["peak_gpu_mb"] is None for r in report["model_fps"]["rows"])
    assert report["model_fps"]["skipped"]["torch resnet18 fp16"] == "fp16 runs on CUDA only (the CPU keeps fp32)"
    assert report["resize_paths"]["skipped"]["gpu-resize on a GPU"].startswith(NO_GPU)
    assert report["nvdec"]["nvdec_fps"] == {"skipped": NO_GPU}
    assert report["amp_train_step"]["skipped"]["fp16 + GradScaler"].startswith(NO_GPU)
    assert report["streams"]["skipped"]["nvdec decode"] == NO_GPU
    for row in report["parity"]["rows"]:
        assert row["max_prob_diff_fp16"] == {"skipped": "fp16 runs on CUDA only (the CPU keeps fp32)"}
        assert row["max_prob_diff_bf16"] < 0.05 and row["gpu_resize_max_level_diff"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the full check would run")
def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path):
    proc = _run([], tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU on this machine; run it on a GPU machine, or with --dry-run to check the code path "
        "on the CPU"]
    assert not (tmp_path / "gpu_check.json").exists()


def test_an_out_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    proc = _run(["--dry-run", "--out", str(blocker / "sub")], None, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpu_check: --out {blocker / 'sub'}: cannot create it")
