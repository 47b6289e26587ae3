"""`visiond bench --model-only`: the model stage of each CPU runtime side by side, on one checkpoint.

The same measurement as `visiond bench`'s "model only" rows (a spec-sized uint8 batch, repeated for
`seconds` per batch size after three warm-up calls), for torch, onnxruntime and openvino one after the
other in this process, each with `threads` intra-op threads: throughput, CPU-ms per frame (process
clock, so a runtime that spins its threads pays for them) and the p50/p99 of one call.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from visiond.errors import UserError
from visiond.models.checkpoint import CheckpointError, load_checkpoint
from visiond.models.runtime import make_classifier
from visiond.serve.bench import measure_model

CPU_RUNTIMES = ("torch", "onnxruntime", "openvino")
console = Console(stderr=True)


def measure(clf, batch: int, seconds: float = 1.0) -> dict:
    """`visiond bench`'s model-only measurement, its CPU in ms per frame."""
    row = measure_model(clf, batch, seconds)
    return {"fps": row["fps"], "cpu_ms_per_frame": row["cpu_s_per_frame"] * 1000,
            "call_p50_ms": row["call_p50_ms"], "call_p99_ms": row["call_p99_ms"]}


def run_model_only(checkpoint: Path, *, runtimes=CPU_RUNTIMES, max_batch: int = 16, threads: int = 1,
                   seconds: float = 1.0, json_out: Path | None = None) -> dict:
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch]
    out: dict = {"machine": {"cores": os.cpu_count() or 1, "threads": threads},
                 "model": {"name": ckpt.name, "arch": ckpt.arch, "version": ckpt.version,
                           "input": [ckpt.spec.height, ckpt.spec.width, ckpt.spec.channels]},
                 "runtimes": {}}
    with tempfile.TemporaryDirectory(prefix="visiond-bench-models-") as cache:
        for runtime in runtimes:
            with console.status(f"{runtime}: loading {ckpt.arch} (an export is made once)"):
                clf = make_classifier(ckpt, runtime=runtime, device="cpu", precision="fp32", threads=threads,
                                      cache_dir=Path(cache))
            if clf.runtime != runtime:
                out["runtimes"][runtime] = {"error": f"served by {clf.runtime} instead (see the warning above)"}
                continue
            rows = {}
            for b in batches:
                with console.status(f"{runtime}: model only, batch {b}"):
                    rows[str(b)] = measure(clf, b, seconds)
            best = max(rows, key=lambda k: rows[k]["fps"])
            out["runtimes"][runtime] = {"batches": rows, "best_batch": int(best)}
            del clf
    _print(out)
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2))
    return out


def _print(r: dict) -> None:
    m = r["model"]
    t = Table(title=f"visiond bench --model-only — {m['arch']} {m['input']}, {r['machine']['threads']} thread(s), "
                    f"{r['machine']['cores']} cores")
    for col in ("runtime", "batch", "fps", "CPU ms/frame", "call p50 ms", "call p99 ms"):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    for runtime, v in r["runtimes"].items():
        if "error" in v:
            t.add_row(runtime, "-", v["error"], "", "", "")
            continue
        for b, row in v["batches"].items():
            t.add_row(runtime, b, f"{row['fps']:.1f}", f"{row['cpu_ms_per_frame']:.2f}", f"{row['call_p50_ms']:.2f}",
                      f"{row['call_p99_ms']:.2f}")
    Console().print(t)
