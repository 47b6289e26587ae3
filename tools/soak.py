"""Soak: visiond at twice its throughput with the broker unreachable, for minutes: spool and memory stay bounded.

    python tools/soak.py [--minutes 10] [--spool-max 10000]

First a calibration run measures what the daemon classifies per second when
saturated (one looping file camera, fps 0, every frame kept). Then the soak
offers twice that through two looping cameras paced at that rate each, with the
live policy (the queue keeps the newest frames and counts the rest), while
nothing listens on the broker port: every prediction goes to the spool, which
must stop at its bound and count what it pushes out. Printed: RSS at start and
end (and its peak), threads, fds, the spool count and the drops, once a minute
and at the end. Exit status 1 if the spool passed its bound or RSS grew more
than 64 MiB from the first sample after warm-up to the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tools.faults import line_video_and_model, proc_sample  # noqa: E402
from visiond.harness.child import DaemonProcess  # noqa: E402
from visiond.harness.process import free_port  # noqa: E402

console = Console(width=140)


def _cfg(model: Path, video: Path, roi, cameras: list[tuple[str, float, str]], spool: Path, spool_max: int) -> dict:
    return {"node": "soak",
            "cameras": [{"name": name, "source": str(video), "loop": True, "fps": fps, "policy": policy,
                         "roi": list(roi)} for name, fps, policy in cameras],
            "model": {"checkpoint": str(model), "max_batch": 16},
            "decide": {"defect_classes": ["scratch", "spot"]},
            "mqtt": {"host": "127.0.0.1", "port": free_port(), "keepalive_s": 5},  # nothing listens there
            "spool": {"dir": str(spool), "max_messages": spool_max}}


def _predictions(v: DaemonProcess) -> float:
    return v.metric("visiond_predictions_total") or 0.0


def calibrate(workdir: Path, model: Path, video: Path, roi, seconds: float = 20.0) -> float:
    """Predictions per second of the saturated daemon (after a warm-up)."""
    cfg = _cfg(model, video, roi, [("cal", 0, "every")], workdir / "cal-spool", 1000)
    v = DaemonProcess(workdir / "calibrate", cfg, cwd=ROOT)
    try:
        v.until(lambda: _predictions(v) >= 200, 120, "warm-up")
        n0, t0 = _predictions(v), time.monotonic()
        time.sleep(seconds)
        rate = (_predictions(v) - n0) / (time.monotonic() - t0)
    finally:
        v.stop()
        v.close()
    return rate


def soak(workdir: Path, model: Path, video: Path, roi, rate: float, minutes: float, spool_max: int) -> bool:
    per_camera = round(rate, 1)
    cfg = _cfg(model, video, roi, [("soak1", per_camera, "latest"), ("soak2", per_camera, "latest")],
               workdir / "soak-spool", spool_max)
    v = DaemonProcess(workdir / "soak", cfg, cwd=ROOT)
    table = Table(title=f"soak: 2 cameras x {per_camera} fps offered (2 x the saturated {rate:.0f}/s), "
                        f"broker unreachable, spool bound {spool_max}")
    for col in ("t", "RSS MiB", "anon MiB", "threads", "fds", "captured/s", "classified/s", "queue drops",
                "spool", "spool drops"):
        table.add_column(col, justify="right")
    ok = True
    try:
        v.until(lambda: _predictions(v) >= 100, 120, "first predictions")
        start = time.monotonic()
        rows, last = [], None
        end = start + minutes * 60
        while True:
            now = time.monotonic()
            sample = proc_sample(v.proc.pid)
            row = {"t": now - start, "rss": sample.rss_kb / 1024, "anon": sample.anon_kb / 1024,
                   "threads": sample.threads, "fds": sample.fds,
                   "captured": v.metric("visiond_frames_captured_total") or 0, "classified": _predictions(v),
                   "qdrops": v.metric("visiond_frames_dropped_total", reason="queue_full") or 0,
                   "spool": v.metric("visiond_spool_messages") or 0,
                   "sdrops": v.metric("visiond_spool_dropped_total") or 0}
            if last is not None:
                dt = row["t"] - last["t"]
                table.add_row(f"{row['t']:.0f}s", f"{row['rss']:.1f}", f"{row['anon']:.1f}", str(row["threads"]),
                              str(row["fds"]), f"{(row['captured'] - last['captured']) / dt:.0f}",
                              f"{(row['classified'] - last['classified']) / dt:.0f}", f"{row['qdrops']:.0f}",
                              f"{row['spool']:.0f}", f"{row['sdrops']:.0f}")
            else:
                table.add_row("0s", f"{row['rss']:.1f}", f"{row['anon']:.1f}", str(row["threads"]), str(row["fds"]),
                              "", "", "",
                              f"{row['spool']:.0f}", f"{row['sdrops']:.0f}")
            rows.append(row)
            last = row
            if now >= end:
                break
            time.sleep(min(60.0, max(1.0, minutes * 60 / 10), end - now))
        code = v.stop()
    finally:
        v.close()
    console.print(table)
    first = rows[1] if len(rows) > 2 else rows[0]  # the first minute: caches, allocator and spool warmed up
    rss_limit = first["rss"] + 64
    peak_spool = max(r["spool"] for r in rows)
    console.print(f"RSS start {rows[0]['rss']:.1f} MiB, after warm-up {first['rss']:.1f}, end {rows[-1]['rss']:.1f}, "
                  f"peak {max(r['rss'] for r in rows):.1f} (anon {rows[0]['anon']:.1f} -> {rows[-1]['anon']:.1f}); "
                  f"spool {rows[-1]['spool']:.0f} (peak {peak_spool:.0f}, "
                  f"bound {spool_max}); spool drops {rows[-1]['sdrops']:.0f}; queue drops {rows[-1]['qdrops']:.0f}; "
                  f"exit {code}")
    if peak_spool > spool_max:
        console.print(f"[red]spool passed its bound: {peak_spool:.0f} > {spool_max}")
        ok = False
    if rows[-1]["rss"] > rss_limit:
        console.print(f"[red]RSS grew: {first['rss']:.1f} -> {rows[-1]['rss']:.1f} MiB (limit {rss_limit:.1f})")
        ok = False
    if "spool full" not in v.stderr:
        console.print("[red]no 'spool full' line in the log")
        ok = False
    return ok and code == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="visiond soak: 2 x throughput, broker unreachable, bounded spool.")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--spool-max", type=int, default=10_000, help="spool.max_messages (default 10000)")
    parser.add_argument("--rate", type=float, default=None, help="skip calibration: the saturated rate per second")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="visiond-soak-"))
    try:
        video, roi, model = line_video_and_model(workdir, lambda m: console.print(f"soak: {m}"))
        rate = args.rate or calibrate(workdir, model, video, roi)
        console.print(f"soak: the saturated daemon classifies {rate:.0f} frames/s; offering {2 * rate:.0f}/s")
        ok = soak(workdir, model, video, roi, rate, args.minutes, args.spool_max)
    finally:
        if args.keep:
            console.print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
