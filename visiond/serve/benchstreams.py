"""`visiond bench --streams`: how many 30 fps cameras this box inspects, and what one camera costs.

A plant's question, answered the way a plant would see it: the real daemon (a child
process, `visiond.harness`) with N cameras, each a live-camera stand-in at `fps` (the
video file looped and paced at `fps: 30`, or with `--rtsp` the GStreamer RTSP server
`tools/rtsp_server.py`, one stream per camera), a private mosquitto, and a subscriber
that records each prediction's capture -> receipt time (an upper bound of the daemon's
capture -> broker-ack, one loopback hop more). Cameras run with `policy: latest`, as
live cameras do: a daemon that cannot keep up drops frames (counted in its metrics)
instead of slowing the camera down.

N is raised (1, 2, 4, ... then bisected) until a run fails; a run of N holds when, over
`hold_s` seconds after a warm-up, no frame was dropped, every camera was captured at
>= 95 % of `fps` and delivered at >= 95 %, and the p99 latency stayed <= the limit
(100 ms). The report: the largest N that held (0 with the first failure's reason when
even one camera does not), and at that N the CPU-ms per camera-frame of the daemon and
the broker together (from /proc, over the measured window) and the daemon's RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visiond.errors import UserError
from visiond.harness.broker import Broker, BrokerError
from visiond.harness.child import DaemonProcess, metric_sum
from visiond.harness.recorder import Recorder
from visiond.serve.bench import _f, captured_at, default_roi, percentiles, proc_cpu, rss_mb

console = Console(stderr=True)

NODE = "streams"
SYSTEM_PYTHON = "/usr/bin/python3"  # GStreamer's RTSP server comes with the system python (python3-gi)
RTSP_SERVER = Path(__file__).resolve().parents[2] / "tools" / "rtsp_server.py"
RATE_FLOOR = 0.95  # captured and delivered, as a share of cameras x fps x seconds


@dataclass
class StreamsOptions:
    video: Path
    checkpoint: Path
    runtime: str = "torch"
    fps: float = 30.0
    hold_s: float = 60.0  # a run of N must hold this long
    warmup_s: float = 5.0  # after every camera's first prediction, before the window opens
    p99_limit_ms: float = 100.0
    max_streams: int = 64
    rtsp: bool = False
    max_batch: int | str = "auto"  # the daemons' model.max_batch
    threads: int = 1
    roi: tuple[int, int, int, int] | None = None
    json_out: Path | None = None
    model_cache: Path | None = None  # an ONNX export to hand to each daemon (onnxruntime, openvino)
    progress: bool = True
    trials: list[dict] = field(default_factory=list)


def _check(opts: StreamsOptions) -> None:
    for what, p in (("--video", opts.video), ("--checkpoint", opts.checkpoint)):
        if not Path(p).exists():
            raise UserError(f"{what} {p}: not found")
    if not 1 <= opts.max_streams <= 1024:
        raise UserError(f"--max-streams {opts.max_streams}: expected 1..1024")
    if opts.hold_s <= 0 or opts.fps <= 0 or opts.p99_limit_ms <= 0:
        raise UserError(f"--hold {opts.hold_s:g}, --realtime-fps {opts.fps:g} and --p99-ms {opts.p99_limit_ms:g}: "
                        "expected all > 0")


class RtspServer:
    """tools/rtsp_server.py under the system python: one URL, every client its own stream from frame 0."""

    def __init__(self, video: Path, workdir: Path, timeout: float = 20.0):
        if not RTSP_SERVER.exists() or not os.access(SYSTEM_PYTHON, os.X_OK):
            raise UserError(f"--rtsp needs {RTSP_SERVER} (a source checkout) and {SYSTEM_PYTHON} with python3-gi "
                            "and gir1.2-gst-rtsp-server-1.0")
        self._log = workdir / "rtsp_server.stderr"
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), "--port", "0", "--path", "/line",
                                          "--video", str(video)], stdout=subprocess.PIPE, stderr=log, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = lines[0] if lines else ""
        if not line.startswith("READY "):
            self.stop()
            raise UserError(f"--rtsp: tools/rtsp_server.py did not become ready ({line.strip()!r}): "
                            f"{self._log.read_text(errors='replace').strip()[-500:]}")
        self.url = line.split()[1]

    def stop(self) -> None:
        from visiond.harness.process import stop_process

        stop_process(self.proc)


def _counters(daemon: DaemonProcess) -> tuple[float, float, dict[str, float]]:
    """(frames captured, frames dropped, dropped by reason) over all cameras, from the daemon's /metrics."""
    status, body = daemon.http("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    text = body.decode()
    reasons: dict[str, float] = {}
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "visiond_frames_dropped_total" and s.value:
                reasons[s.labels.get("reason", "?")] = reasons.get(s.labels.get("reason", "?"), 0.0) + s.value
    return metric_sum(text, "visiond_frames_captured_total") or 0.0, sum(reasons.values()), reasons


def _config(opts: StreamsOptions, n: int, source: str, host: str, port: int, spool: Path) -> dict:
    x, y, w, h = opts.roi
    live = source.startswith("rtsp://")
    cams = [{"name": f"cam{i + 1}", "source": source, "fps": opts.fps, "policy": "latest", "roi": [x, y, w, h],
             **({} if live else {"loop": True})} for i in range(n)]
    return {"node": NODE, "cameras": cams,
            "model": {"checkpoint": str(Path(opts.checkpoint).resolve()), "max_batch": opts.max_batch,
                      "runtime": opts.runtime, "threads": opts.threads},
            "mqtt": {"host": host, "port": port}, "spool": {"dir": str(spool)}, "logging": {"level": "warning"}}


def _wait_all_publishing(daemon: DaemonProcess, rec: Recorder, n: int, timeout: float = 180.0) -> None:
    """Until every camera has published a prediction (model loaded, streams open); a daemon that exits says why."""
    end = time.monotonic() + timeout
    while len({m.topic for m in rec.messages()}) < n:
        if daemon.proc.poll() is not None:
            raise UserError(f"bench --streams: the daemon exited ({daemon.proc.returncode}) with {n} camera(s): "
                            f"{daemon.stderr.strip()[-1500:]}")
        if time.monotonic() > end:
            seen = len({m.topic for m in rec.messages()})
            raise UserError(f"bench --streams: only {seen} of {n} cameras published within {timeout:g} s: "
                            f"{daemon.stderr.strip()[-1500:]}")
        time.sleep(0.1)


def trial(opts: StreamsOptions, n: int, source: str, broker: Broker, on_second=None) -> dict:
    """The daemon with n cameras for warm-up + hold seconds; the window's figures and whether it held."""
    work = Path(tempfile.mkdtemp(prefix="visiond-streams-"))
    spool = work / "spool"
    if opts.model_cache is not None:  # the daemon finds the export where it caches it: no export per run
        shutil.copytree(opts.model_cache, spool / "models")
    rec = Recorder(broker.host, broker.port, f"visiond/{NODE}/+/prediction").start()
    daemon = DaemonProcess(work, _config(opts, n, source, broker.host, broker.port, spool))
    try:
        _wait_all_publishing(daemon, rec, n)
        daemon.wait_http()
        time.sleep(opts.warmup_s)
        cap0, drop0, reasons0 = _counters(daemon)
        cpu_d0, cpu_b0, t0 = proc_cpu(daemon.proc.pid), proc_cpu(broker.proc.pid), time.time()
        early = None
        while time.time() - t0 < opts.hold_s:
            time.sleep(min(1.0, max(0.0, opts.hold_s - (time.time() - t0))))
            if daemon.proc.poll() is not None:
                raise UserError(f"bench --streams: the daemon exited ({daemon.proc.returncode}) with {n} camera(s): "
                                f"{daemon.stderr.strip()[-1500:]}")
            if _counters(daemon)[1] > drop0:  # a drop already fails the run: no need to wait out the hold
                early = time.time() - t0
                break
            if on_second:
                on_second()
        cpu_d1, cpu_b1, t1 = proc_cpu(daemon.proc.pid), proc_cpu(broker.proc.pid), time.time()
        cap1, drop1, reasons1 = _counters(daemon)
        rss, rss_peak = rss_mb(daemon.proc.pid)
        time.sleep(min(1.0, opts.p99_limit_ms / 1000 * 2))  # frames captured before t1 still on their way
        arrivals = rec.arrivals()
        exit_code = daemon.stop()
    finally:
        daemon.close()
        rec.stop()
        shutil.rmtree(work, ignore_errors=True)
    lat, delivered = [], 0
    for t, m in arrivals:
        captured = captured_at(json.loads(m.payload))
        if t0 <= captured < t1:
            delivered += 1
            lat.append((t - captured) * 1000)
    seconds = t1 - t0
    expected = n * opts.fps * seconds
    dropped = {r: v - reasons0.get(r, 0.0) for r, v in reasons1.items() if v - reasons0.get(r, 0.0) > 0}
    p = percentiles(lat)
    p50, p99 = p["p50"], p["p99"]
    cpu_daemon, cpu_broker = cpu_d1 - cpu_d0, cpu_b1 - cpu_b0
    out = {"streams": n, "seconds": round(seconds, 2), "captured_fps_per_camera": (cap1 - cap0) / seconds / n,
           "delivered_fps_per_camera": delivered / seconds / n, "dropped": int(drop1 - drop0),
           "dropped_by_reason": {r: int(v) for r, v in dropped.items()},
           "latency_p50_ms": p50, "latency_p99_ms": p99,
           "cpu_ms_per_camera_frame": (cpu_daemon + cpu_broker) * 1000 / delivered if delivered else None,
           "daemon_cpu_ms_per_camera_frame": cpu_daemon * 1000 / delivered if delivered else None,
           "broker_cpu_ms_per_camera_frame": cpu_broker * 1000 / delivered if delivered else None,
           "cores_busy": (cpu_daemon + cpu_broker) / seconds, "rss_mb": rss, "rss_peak_mb": rss_peak,
           "exit_code": exit_code}
    reasons = []
    if out["dropped"]:
        why = ", ".join(f"{r} {v}" for r, v in out["dropped_by_reason"].items())
        reasons.append(f"{out['dropped']} frames dropped ({why})" + (f" within {early:.0f} s" if early else ""))
    if cap1 - cap0 < RATE_FLOOR * expected:
        reasons.append(f"captured {out['captured_fps_per_camera']:.1f} fps per camera of {opts.fps:g}")
    if delivered < RATE_FLOOR * expected:
        reasons.append(f"delivered {out['delivered_fps_per_camera']:.1f} fps per camera of {opts.fps:g}")
    if p99 is not None and p99 > opts.p99_limit_ms:
        reasons.append(f"p99 capture -> broker {p99:.1f} ms > {opts.p99_limit_ms:g} ms")
    out["held"] = not reasons
    out["reason"] = "; ".join(reasons) or None
    return out


def _counts(max_streams: int):
    """1, 2, 4, ... until a run fails (or the cap), then the bisection between the last good and the first bad."""
    good, bad, n = 0, None, 1
    while True:
        held = yield n
        if held:
            good = n
        else:
            bad = n
        if bad is None:
            if n >= max_streams:
                return
            n = min(2 * n, max_streams)
        else:
            if bad - good <= 1:
                return
            n = (good + bad) // 2


def run_streams(opts: StreamsOptions) -> dict:
    """Search for the largest N that holds; print the table, write JSON if asked, return the report."""
    _check(opts)
    if opts.roi is None:
        opts.roi = default_roi(opts.video)
    try:
        broker = Broker(options=["max_queued_messages 100000"]).start()
    except BrokerError as exc:
        raise UserError(f"could not start a private mosquitto: {exc}") from None
    scratch = Path(tempfile.mkdtemp(prefix="visiond-streams-"))
    server = None
    try:
        model = _prepare_model(opts, scratch / "models")
        opts.runtime = model["runtime"]  # `auto` resolved here, so every daemon runs what the report names
        if opts.rtsp:
            server = RtspServer(Path(opts.video).resolve(), scratch)
        source = server.url if server else str(Path(opts.video).resolve())
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                      TimeElapsedColumn(), console=console, disable=not opts.progress) as bar:
            search = _counts(opts.max_streams)
            n = next(search)
            while True:
                task = bar.add_task(f"{n} camera(s) at {opts.fps:g} fps ({model['runtime']})", total=opts.hold_s)
                result = trial(opts, n, source, broker, on_second=lambda t=task: bar.advance(t, 1))
                bar.update(task, completed=opts.hold_s,
                           description=f"{n} camera(s): {'held' if result['held'] else 'failed: ' + result['reason']}")
                opts.trials.append(result)
                try:
                    n = search.send(result["held"])
                except StopIteration:
                    break
    finally:
        if server:
            server.stop()
        broker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report = _report(opts, source, model)
    _print(report)
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=2))
    return report


def _prepare_model(opts: StreamsOptions, cache: Path) -> dict:
    """Load the model once here: an export (onnxruntime, openvino) is made now and handed to every daemon."""
    from visiond.models.checkpoint import CheckpointError, load_checkpoint
    from visiond.models.runtime import make_classifier

    try:
        ckpt = load_checkpoint(opts.checkpoint)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    with console.status(f"loading {ckpt.arch} on {opts.runtime} (an export is made once)"):
        clf = make_classifier(ckpt, runtime=opts.runtime, device="cpu", threads=opts.threads, cache_dir=cache)
    if clf.runtime != opts.runtime and opts.runtime != "auto":
        raise UserError(f"--runtime {opts.runtime}: the model cannot run on it (see the warning above)")
    opts.model_cache = cache if any(cache.glob("*.onnx")) else None
    s = ckpt.spec
    return {"arch": ckpt.arch, "version": ckpt.version, "input": [s.height, s.width, s.channels],
            "runtime": clf.runtime}


def _report(opts: StreamsOptions, source: str, model: dict) -> dict:
    held = [t for t in opts.trials if t["held"]]
    best = max(held, key=lambda t: t["streams"]) if held else None
    failed = [t for t in opts.trials if not t["held"]]
    first_bad = min(failed, key=lambda t: t["streams"]) if failed else None
    return {
        "machine": {"cores": os.cpu_count() or 1, "runtime": model["runtime"], "threads": opts.threads},
        "model": {k: model[k] for k in ("arch", "version", "input")},
        "source": "rtsp" if source.startswith("rtsp://") else "file", "video": str(opts.video),
        "fps": opts.fps, "hold_s": opts.hold_s, "p99_limit_ms": opts.p99_limit_ms,
        "max_streams_tried": opts.max_streams,
        "max_streams": best["streams"] if best else 0,
        "at_max": best,
        "stopped_by": first_bad["reason"] if first_bad else f"the cap, --max-streams {opts.max_streams}",
        "trials": opts.trials,
    }


def _print(r: dict) -> None:
    t = Table(title=f"visiond bench --streams — {r['model']['arch']} {r['model']['input']} on {r['machine']['runtime']}, "
                    f"{r['source']} cameras at {r['fps']:g} fps, {r['machine']['cores']} cores")
    for col in ("cameras", "held", "captured fps/cam", "dropped", "p50 ms", "p99 ms", "CPU ms/cam-frame", "RSS MB"):
        t.add_column(col, justify="right")
    for x in sorted(r["trials"], key=lambda x: x["streams"]):
        t.add_row(str(x["streams"]), "yes" if x["held"] else "no", _f(x["captured_fps_per_camera"]), str(x["dropped"]),
                  _f(x["latency_p50_ms"]), _f(x["latency_p99_ms"]), _f(x["cpu_ms_per_camera_frame"], "{:.2f}"),
                  _f(x["rss_mb"], "{:.0f}"))
    Console().print(t)
    best = r["at_max"]
    cost = (f"; at {r['max_streams']}: {_f(best['cpu_ms_per_camera_frame'], '{:.2f}')} CPU-ms per camera-frame "
            f"(daemon {_f(best['daemon_cpu_ms_per_camera_frame'], '{:.2f}')}, broker "
            f"{_f(best['broker_cpu_ms_per_camera_frame'], '{:.2f}')}), daemon RSS {_f(best['rss_mb'], '{:.0f}')} MB"
            if best else "")
    Console().print(f"largest N that held {r['hold_s']:g} s: {r['max_streams']}{cost}; stopped by: {r['stopped_by']}",
                    soft_wrap=True)
