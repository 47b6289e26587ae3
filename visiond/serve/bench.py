"""`visiond bench`: decode-only, model-only, a naive per-frame loop and the daemon
pipeline, on one video and one model, with a real broker; `--inspect` measures a
triggered station instead.

Throughput is measured where a subscriber sees it (messages received per
second); latency is capture -> subscriber receipt. CPU seconds per frame come
from the process clock (stages measured alone) and from the daemon's rusage.
A station is measured as a PLC sees it: trigger published -> verdict received on
its response topic, at a steady trigger rate, with the verdicts checked against
the video's ground truth where the video has one (the synthetic line's truth CSV).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from rich.console import Console
from rich.table import Table

from visiond.config import DecideConfig, MqttConfig
from visiond.errors import UserError
from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.harness.broker import Broker, BrokerError
from visiond.harness.child import DaemonProcess
from visiond.harness.recorder import Recorder
from visiond.harness.requester import Requester
from visiond.harness.synthline import read_truth, truth_path
from visiond.models.checkpoint import load_checkpoint
from visiond.models.runtime import Classifier, make_classifier, warm_up
from visiond.preprocess import resize_uint8
from visiond.serve.decide import Decider
from visiond.serve.metrics import Metrics
from visiond.serve.sinks.mqtt import MqttSink
from visiond.serve.sinks.spool import Spool

console = Console(stderr=True)


@dataclass
class BenchOptions:
    video: Path | None = None
    checkpoint: Path | None = None
    json_out: Path | None = None
    frames: int = 1500
    max_batch: int = 16
    broker: str | None = None
    realtime_fps: float = 30.0
    realtime_seconds: float = 10.0
    roi: tuple[int, int, int, int] | None = None
    runtime: str = "torch"  # model.runtime for every measurement: torch | onnxruntime
    model_cache: Path | None = None  # where the ONNX export lives, copied into each daemon's state dir
    inspect_seconds: float = 30.0  # --inspect: how long the triggers come
    inspect_rate: float = 10.0  # --inspect: triggers a second


def _defaults(opts: BenchOptions) -> BenchOptions:
    """Check the inputs and pick the ROI. The CLI fills in a missing video or model (the synthetic line and a
    model trained on it) before this: training is no part of the daemon's half."""
    for what, p in (("--video", opts.video), ("--checkpoint", opts.checkpoint)):
        if p is None:
            raise UserError(f"{what}: none given")
        if not Path(p).exists():
            raise UserError(f"{what} {p}: not found")
    if opts.roi is None:
        opts.roi = default_roi(opts.video)
    return opts


def default_roi(video: Path) -> tuple[int, int, int, int]:
    """The centred square every bench crops (two thirds of the short side, a multiple of 16)."""
    cap = cv2.VideoCapture(str(video))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    cap.release()
    if w <= 0:
        raise UserError(f"--video {video}: OpenCV cannot read it; expected a video file")
    side = min(w, h) * 2 // 3 // 16 * 16
    return (w - side) // 2, (h - side) // 2, side, side


class _Frames:
    """Reads the video in a loop, as a camera that never ends."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.cap = self._open()

    def _open(self):
        """Opened as the daemon opens files: FFmpeg with one decode thread."""
        return cv2.VideoCapture(self.path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])

    def read(self) -> np.ndarray:
        return self.read_stamped()[0]

    def read_stamped(self) -> tuple[np.ndarray, float]:
        """A frame and its capture time, stamped where the daemon stamps it: after grab, before retrieve."""
        if not self.cap.grab():
            self.cap.release()
            self.cap = self._open()
            if not self.cap.grab():
                raise UserError(f"{self.path}: no frames could be decoded")
        stamp = time.time()
        ok, img = self.cap.retrieve()
        if not ok:
            raise UserError(f"{self.path}: a frame could not be decoded")
        return img, stamp


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def bench_decode(opts: BenchOptions) -> dict:
    src = _Frames(opts.video)
    src.read()
    w0, c0 = _clock()
    for _ in range(opts.frames):
        src.read()
    w1, c1 = _clock()
    return {"fps": opts.frames / (w1 - w0), "cpu_s_per_frame": (c1 - c0) / opts.frames}


def bench_preprocess(opts: BenchOptions, spec) -> dict:
    src = _Frames(opts.video)
    x, y, w, h = opts.roi
    imgs = [src.read()[y:y + h, x:x + w] for _ in range(64)]
    n = max(opts.frames, 1000)
    w0, c0 = _clock()
    for i in range(n):
        resize_uint8(imgs[i % 64], spec)
    w1, c1 = _clock()
    return {"fps": n / (w1 - w0), "cpu_s_per_frame": (c1 - c0) / n}


def bench_model(clf: Classifier, max_batch: int) -> dict:
    """`measure_model` at batch 1, 2, 4, ... up to max_batch."""
    out = {}
    b = 1
    while b <= max_batch:
        out[b] = measure_model(clf, b)
        b *= 2
    return out


def measure_model(clf: Classifier, batch: int, seconds: float = 1.0) -> dict:
    """The model stage alone on a spec-sized uint8 batch, repeated for `seconds` (at least 5 calls) after three
    warm-up calls: throughput, CPU per frame (process clock: a runtime that spins its threads pays for them) and
    one call's p50/p99."""
    s = clf.spec
    x = np.random.default_rng(0).integers(0, 256, (batch, s.height, s.width, s.channels), dtype=np.uint8)
    for _ in range(3):
        clf.predict(x)
    calls = []
    w0, c0 = _clock()
    while time.perf_counter() - w0 < seconds or len(calls) < 5:
        t = time.perf_counter()
        clf.predict(x)
        calls.append(time.perf_counter() - t)
    w1, c1 = _clock()
    frames = len(calls) * batch
    ms = np.array(calls) * 1000
    return {"fps": frames / (w1 - w0), "cpu_s_per_frame": (c1 - c0) / frames,
            "call_p50_ms": float(np.percentile(ms, 50)), "call_p99_ms": float(np.percentile(ms, 99))}


def _received(rec: Recorder) -> list[tuple[float, dict]]:
    """(arrival time, decoded payload) of every message the subscriber got."""
    return [(t, json.loads(m.payload)) for t, m in rec.arrivals()]


def captured_at(p: dict) -> float:
    """A payload's capture time (epoch seconds)."""
    return dt.datetime.fromisoformat(p["captured_at"].replace("Z", "+00:00")).timestamp()


def _summary(recv: list[tuple[float, dict]], trim: float = 0.1) -> dict:
    """Throughput over the middle of the run (no start-up or drain), latency over all of it."""
    if len(recv) < 10:
        return {"fps": 0.0, "latency_p50_ms": None, "latency_p99_ms": None, "messages": len(recv)}
    times = np.array([t for t, _ in recv])
    a, b = int(len(times) * trim), int(len(times) * (1 - trim)) - 1
    lat = np.array([(t - captured_at(p)) * 1000 for t, p in recv])
    return {"fps": (b - a) / max(times[b] - times[a], 1e-9), "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)), "messages": len(recv)}


def naive_loop(opts: BenchOptions, clf: Classifier, host: str, port: int, frames: int, fps: float = 0) -> dict:
    """The simplest loop, the baseline the pipeline must beat: read -> preprocess -> model(batch of 1) -> publish,
    one frame at a time."""
    decider = Decider(clf.classes, DecideConfig(defect_classes=[]))
    sub = Recorder(host, port, "bench/naive/#").start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(host, port)
    pub.loop_start()
    src = _Frames(opts.video)
    x, y, w, h = opts.roi
    period = 1.0 / fps if fps else 0.0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t_next = time.perf_counter()
    for seq in range(frames):
        if period:
            t_next += period
            time.sleep(max(0.0, t_next - time.perf_counter()))
        img, cap_at = src.read_stamped()
        px = resize_uint8(img[y:y + h, x:x + w], clf.spec)[None]
        v = decider.decide(clf.predict(px))[0]
        payload = {"seq": seq, "label": v.label, "score": v.score,
                   "captured_at": dt.datetime.fromtimestamp(cap_at, dt.timezone.utc).isoformat().replace("+00:00", "Z")}
        pub.publish("bench/naive/prediction", json.dumps(payload), qos=1)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.time() + 10
    while sub.count() < frames and time.time() < deadline:
        time.sleep(0.05)
    pub.loop_stop()
    pub.disconnect()
    sub.stop()
    out = _summary(_received(sub))
    out["cpu_s_per_frame"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / frames
    return out


def pipeline(opts: BenchOptions, host: str, port: int, frames: int, fps: float = 0, batch: int | None = None) -> dict:
    """The real daemon (`visiond run` in a child process) on the looped video, its model.max_batch `batch`
    (default --max-batch)."""
    batch = batch or opts.max_batch
    work = Path(tempfile.mkdtemp(prefix="visiond-bench-"))
    x, y, w, h = opts.roi
    cfg = work / "bench.yaml"
    cfg.write_text(json.dumps({
        "node": "bench",
        "cameras": [{"name": "cam", "source": str(Path(opts.video).resolve()), "fps": fps, "loop": True,
                     "policy": "every", "queue_size": max(2 * batch, 8), "roi": [x, y, w, h]}],
        "model": {"checkpoint": str(Path(opts.checkpoint).resolve()), "max_batch": batch,
                  "runtime": opts.runtime},
        "mqtt": {"host": host, "port": port}, "spool": {"dir": str(work / "spool")},
        "http": {"enabled": False}, "logging": {"level": "warning"},
    }))
    if opts.model_cache is not None:  # the daemon finds the export where it caches it: no second export
        shutil.copytree(opts.model_cache, work / "spool" / "models")
    sub = Recorder(host, port, "visiond/bench/cam/prediction").start()
    proc = subprocess.Popen([sys.executable, "-m", "visiond", "run", "--config", str(cfg)])
    # start-up (imports, model load, warm-up) may take minutes on a busy box with a large model; then the frames
    deadline, started = time.time() + 180, False
    marks: dict[str, tuple[int, float]] = {}  # steady-state CPU: between 10 % and 90 % of the messages
    while sub.count() < frames and time.time() < deadline and proc.poll() is None:
        n = sub.count()
        if n and not started:
            started, deadline = True, time.time() + 60 + frames / max(fps, 10)
        for name, at in (("a", 0.1), ("b", 0.9)):
            if name not in marks and n >= frames * at:
                marks[name] = (n, proc_cpu(proc.pid))
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, status, ru = os.wait4(proc.pid, 0)
    time.sleep(0.3)
    sub.stop()
    shutil.rmtree(work, ignore_errors=True)
    out = _summary(_received(sub)[:frames])
    if "a" in marks and "b" in marks and marks["b"][0] > marks["a"][0]:
        cpu = (marks["b"][1] - marks["a"][1]) / (marks["b"][0] - marks["a"][0])
    else:
        cpu = (ru.ru_utime + ru.ru_stime) / max(sub.count(), 1)
    out.update(cpu_s_per_frame=cpu, rss_max_mb=ru.ru_maxrss / 1024, exit_code=os.waitstatus_to_exitcode(status))
    return out


# --------------------------------------------------------------------------- deliver only: sink, spool, broker


DELIVER_OUTSTANDING = 1024  # submitted but not yet received: enough to keep every stage busy, bounded memory


def _thread_cpu(thread: threading.Thread | None) -> float:
    """CPU seconds of one thread of this process (0.0 when it is gone or unknown)."""
    if thread is None or thread.ident is None:
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, ValueError):
        return 0.0


def _new_paho_thread(before: set[threading.Thread]) -> threading.Thread | None:
    """The paho network thread a recorder started since `before` (all of the subscriber's work runs on it)."""
    found = [t for t in threading.enumerate() if t not in before and t.name.startswith("paho-mqtt-client-")]
    return found[0] if len(found) == 1 else None


def _precomputed(classes: Sequence[str], n: int) -> list[tuple]:
    """(label, score, top, defect) verdicts as the decider makes them, cycling through the classes."""
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        other = classes[(i + 1) % len(classes)]
        score = 0.5 + (i % 50) / 100.0
        out.append((label, score, ((label, score), (other, round(1 - score, 6))), i % 7 == 0))
    return out


def bench_deliver(opts: BenchOptions, classes: Sequence[str], host: str, port: int, broker_pid: int | None,
                  frames: int) -> dict:
    """The daemon's delivery alone: the same MqttSink, spool and payload code on precomputed verdicts, submitted in
    batches of max_batch as fast as the subscriber receives them (at most DELIVER_OUTSTANDING in between), with the
    CPU of this process's sink threads, the broker and the subscriber per message."""
    work = Path(tempfile.mkdtemp(prefix="visiond-bench-deliver-"))
    metrics = Metrics(process=False)
    spool = Spool(work, max(1_000_000, 2 * frames), metrics)
    sink = MqttSink(MqttConfig(host=host, port=port), "bench", spool, metrics)
    before = set(threading.enumerate())
    sub = Recorder(host, port, "visiond/bench/cam/prediction").start()
    sub_thread = _new_paho_thread(before)
    verdicts = _precomputed(list(classes), 256)
    model = ModelRef("bench", "deliver")
    sink.start()
    try:
        end = time.monotonic() + 10
        while not sink.connected and time.monotonic() < end:
            time.sleep(0.01)
        if not sink.connected:
            raise UserError(f"bench: the MQTT sink could not connect to {host}:{port}")
        marks: dict[str, tuple[int, float, float, float | None]] = {}
        submitted, batch, deadline = 0, max(1, opts.max_batch), time.monotonic() + 60 + frames / 200
        while time.monotonic() < deadline:
            n = sub.count()
            for name, at in (("a", 0.1), ("b", 0.9)):  # (before the end: the last poll may be the first past 90 %)
                if name not in marks and n >= frames * at:
                    marks[name] = (n, time.process_time(), _thread_cpu(sub_thread),
                                   proc_cpu(broker_pid) if broker_pid else None)
            if n >= frames:
                break
            if submitted < frames and submitted - n < DELIVER_OUTSTANDING:
                k = min(batch, frames - submitted)
                now_wall, now_mono = time.time(), time.monotonic()
                preds = []
                for i in range(submitted, submitted + k):
                    label, score, top, defect = verdicts[i % len(verdicts)]
                    preds.append(Prediction(Frame("cam", i, now_wall, now_mono, None), label, score, top, defect,
                                            model, Timings(0.0005, 0.002, 0.0025), i // batch))
                sink.submit(preds)
                submitted += k
                continue
            time.sleep(0.001)
    finally:
        sink.stop(drain_timeout_s=2.0)
        spool.close()
        sub.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = _summary(_received(sub)[:frames])
    out["batch"] = batch
    if "a" in marks and "b" in marks and marks["b"][0] > marks["a"][0]:
        (na, ca, sa, ba), (nb, cb, sb, bb) = marks["a"], marks["b"]
        msgs = nb - na
        sub_cpu = (sb - sa) / msgs
        out["cpu_s_per_frame_parts"] = {
            "visiond": (cb - ca) / msgs - sub_cpu, "broker": None if ba is None else (bb - ba) / msgs,
            "subscriber": sub_cpu}
    else:
        out["cpu_s_per_frame_parts"] = {"visiond": None, "broker": None, "subscriber": None}
    parts = [v for v in out["cpu_s_per_frame_parts"].values() if v is not None]
    out["cpu_s_per_frame"] = sum(parts) if parts else None
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker(opts: BenchOptions):
    if opts.broker:
        host, _, port = opts.broker.rpartition(":")
        return None, host or "127.0.0.1", int(port)
    try:
        broker = Broker(options=["max_queued_messages 100000"]).start()
    except BrokerError as exc:
        raise UserError(f"could not start a private mosquitto: {exc} (or pass --broker)") from None
    return broker, broker.host, broker.port


def _load_model(opts: BenchOptions, cache: Path):
    """The checkpoint and its classifier; an ONNX export is kept in `cache` for the daemons to reuse."""
    ckpt = load_checkpoint(opts.checkpoint)
    clf = make_classifier(ckpt, runtime=opts.runtime, device="auto", threads=1, cache_dir=cache)
    opts.model_cache = cache if clf.runtime in ("onnxruntime", "openvino") else None
    return ckpt, clf


def _about(opts: BenchOptions, clf: Classifier) -> dict:
    """What every bench result starts with: the machine, the model and the video."""
    return {"machine": {"cores": os.cpu_count() or 1, "device": clf.device, "runtime": clf.runtime},
            "model": {"name": clf.name, "arch": clf.arch, "version": clf.version,
                      "input": [clf.spec.height, clf.spec.width, clf.spec.channels]},
            "video": str(opts.video)}


def run_bench(opts: BenchOptions) -> dict:
    opts = _defaults(opts)
    cache = Path(tempfile.mkdtemp(prefix="visiond-bench-models-"))
    _, clf = _load_model(opts, cache)
    warm_up(clf, opts.max_batch, [(opts.roi[3], opts.roi[2], 3)])  # the crops the model gets
    broker, host, port = _broker(opts)
    try:
        with console.status("decode only"):
            decode = bench_decode(opts)
        with console.status("preprocess only"):
            prep = bench_preprocess(opts, clf.spec)
        with console.status("model only, batch 1..max"):
            model = bench_model(clf, opts.max_batch)
        with console.status("deliver only: sink, spool, broker and subscriber at saturation"):
            deliver = bench_deliver(opts, clf.classes, host, port, broker.proc.pid if broker else None,
                                    2 * opts.frames)
        with console.status("naive per-frame loop"):
            naive = naive_loop(opts, clf, host, port, opts.frames)
        # the daemon as a plant would set it after this run: model.max_batch at the model's best batch here (a
        # larger batch can be slower: mobilenet_v3_small at 224 on 2 cores does 261 fps at 8, 185 at 16)
        best_b = best_batch(model)
        with console.status(f"daemon pipeline at saturation (model.max_batch {best_b})"):
            pipe = pipeline(opts, host, port, opts.frames, batch=best_b)
        rt_frames = int(opts.realtime_fps * opts.realtime_seconds)
        with console.status(f"real time: naive loop at {opts.realtime_fps:g} fps"):
            naive_rt = naive_loop(opts, clf, host, port, rt_frames, fps=opts.realtime_fps)
        with console.status(f"real time: pipeline at {opts.realtime_fps:g} fps"):
            pipe_rt = pipeline(opts, host, port, rt_frames, fps=opts.realtime_fps, batch=best_b)
    finally:
        if broker:
            broker.close()
        shutil.rmtree(cache, ignore_errors=True)
    result = _assemble(opts, clf, decode, prep, model, deliver, naive, pipe, naive_rt, pipe_rt)
    _print(result)
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(result, indent=2))
    return result


def best_batch(model: dict) -> int:
    """The batch size at which the model stage alone runs fastest."""
    return max(model, key=lambda b: model[b]["fps"])


def limit_of(decode: dict, prep: dict, model: dict, deliver: dict, cores: int) -> dict:
    """The most a pipeline on this box can do: the slowest stage alone, or the cores divided by the CPU that
    one frame costs in all four stages (decode, preprocess, model at its best batch, deliver) together."""
    best_b = best_batch(model)
    cpu = {"decode": decode["cpu_s_per_frame"], "preprocess": prep["cpu_s_per_frame"],
           "model": model[best_b]["cpu_s_per_frame"], "deliver": deliver.get("cpu_s_per_frame") or 0.0}
    cpu_needed = sum(cpu.values())
    terms = {"decode": decode["fps"], f"model@{best_b}": model[best_b]["fps"], "deliver": deliver["fps"],
             "cpu": cores / cpu_needed if cpu_needed > 0 else float("inf")}
    binds = min(terms, key=lambda k: terms[k])
    return {"fps": terms[binds], "binds": binds, "terms": terms, "cpu_s_per_frame": cpu, "cores": cores,
            "formula": f"min(decode, model@{best_b}, deliver, cores / (decode + preprocess + model + deliver "
                       "CPU-s per frame))"}


def _assemble(opts, clf, decode, prep, model, deliver, naive, pipe, naive_rt, pipe_rt) -> dict:
    best_b = best_batch(model)
    cores = os.cpu_count() or 1
    limit = limit_of(decode, prep, model, deliver, cores)
    stages_cpu = sum(limit["cpu_s_per_frame"].values()) - (deliver.get("cpu_s_per_frame") or 0.0) + \
        (deliver["cpu_s_per_frame_parts"].get("visiond") or 0.0)
    return {
        **_about(opts, clf), "frames": opts.frames,
        "decode_only": decode, "preprocess_only": prep,
        "model_only": {str(b): v for b, v in model.items()}, "model_best_batch": best_b,
        "deliver_only": deliver,
        "cpu_bound_fps": limit["terms"]["cpu"], "limit_fps": limit["fps"], "limit": limit,
        "naive": naive, "pipeline": {**pipe, "max_batch": best_b},
        # the daemon's CPU per frame beyond what its stages cost alone: the worker's batching and bookkeeping
        "pipeline_unaccounted_cpu_s_per_frame": pipe["cpu_s_per_frame"] - stages_cpu,
        "ratio_to_limit": pipe["fps"] / limit["fps"] if limit["fps"] else None,
        "ratio_to_naive": pipe["fps"] / naive["fps"] if naive["fps"] else None,
        "realtime": {"fps": opts.realtime_fps, "naive": naive_rt, "pipeline": pipe_rt,
                     "p50_difference_ms": (pipe_rt["latency_p50_ms"] or 0) - (naive_rt["latency_p50_ms"] or 0)},
    }


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def _print(r: dict) -> None:
    t = Table(title=f"visiond bench — {r['model']['arch']} {r['model']['input']} on {r['machine']['device']} "
                    f"({r['machine']['runtime']}), "
                    f"{r['machine']['cores']} cores")
    for col in ("run", "fps", "p50 ms", "p99 ms", "CPU ms/frame"):
        t.add_column(col, justify="right" if col != "run" else "left")
    t.add_row("decode only", _f(r["decode_only"]["fps"]), "", "", _f(r["decode_only"]["cpu_s_per_frame"] * 1e3, "{:.3f}"))
    t.add_row("preprocess only", _f(r["preprocess_only"]["fps"]), "", "",
              _f(r["preprocess_only"]["cpu_s_per_frame"] * 1e3, "{:.3f}"))
    for b, v in r["model_only"].items():
        t.add_row(f"model only, batch {b}", _f(v["fps"]), "", "", _f(v["cpu_s_per_frame"] * 1e3, "{:.3f}"))
    d = r["deliver_only"]
    t.add_row(f"deliver only, batch {d['batch']}", _f(d["fps"]), _f(d["latency_p50_ms"], "{:.2f}"),
              _f(d["latency_p99_ms"], "{:.2f}"), _f(None if d["cpu_s_per_frame"] is None else d["cpu_s_per_frame"] * 1e3,
                                                     "{:.3f}"))
    for name, v in (("naive loop", r["naive"]), (f"pipeline, max_batch {r['model_best_batch']}", r["pipeline"]),
                    (f"naive @ {r['realtime']['fps']:g} fps", r["realtime"]["naive"]),
                    (f"pipeline @ {r['realtime']['fps']:g} fps, max_batch {r['model_best_batch']}",
                     r["realtime"]["pipeline"])):
        t.add_row(name, _f(v["fps"]), _f(v["latency_p50_ms"], "{:.2f}"), _f(v["latency_p99_ms"], "{:.2f}"),
                  _f(v["cpu_s_per_frame"] * 1e3, "{:.3f}"))
    Console().print(t)
    lim = r["limit"]
    terms = ", ".join(f"{k} {v:.0f}" for k, v in lim["terms"].items())
    parts = ", ".join(f"{k} {_f(v * 1e3 if v is not None else None, '{:.3f}')}"
                      for k, v in r["deliver_only"]["cpu_s_per_frame_parts"].items())
    Console().print(f"deliver CPU ms per message: {parts}")
    Console().print(f"limit {lim['fps']:.0f} fps = {lim['formula']} = min({terms}); {lim['binds']} binds; "
                    f"ratio_to_limit {_f(r['ratio_to_limit'], '{:.2f}')}, ratio_to_naive {_f(r['ratio_to_naive'], '{:.2f}')}, "
                    f"real-time p50 difference {r['realtime']['p50_difference_ms']:+.2f} ms; daemon CPU beyond its stages "
                    f"{r['pipeline_unaccounted_cpu_s_per_frame'] * 1e3:+.3f} ms/frame", soft_wrap=True)


# --------------------------------------------------------------------------- --inspect: a triggered station

STATION = "station"
# Three inspection points on the camera's ROI, each with its own defect threshold: three crops per frame, as a
# station checking a screw, a label and a seam would send, on a region the model was trained on.
STATION_ROIS = (("centre", None), ("centre_strict", 0.3), ("centre_lax", 0.7))
BURST = {"frames": 3, "interval_ms": 30, "deadline_ms": 2000, "queue": 8}  # DESIGN.md's station defaults


def _defect_classes(ckpt, path: Path) -> list[str]:
    """The labels that make a part NG: the checkpoint's own, else the synthetic line's defects it knows."""
    named = ckpt.meta.get("defect_classes") or ("scratch", "spot")
    chosen = [c for c in named if c in ckpt.classes]
    if not chosen:
        raise UserError(f"--checkpoint {path}: names no defect class among its classes {list(ckpt.classes)}; "
                        "--inspect needs a model trained with --defect-classes")
    return chosen


def _station_cfg(opts: BenchOptions, host: str, port: int, defects: list[str], spool: Path) -> dict:
    x, y, w, h = opts.roi
    rois = [{"name": name, "rect": [x, y, w, h], **({} if t is None else {"threshold": t})} for name, t in STATION_ROIS]
    return {
        "node": "bench",
        "cameras": [{"name": STATION, "source": str(Path(opts.video).resolve()), "fps": opts.realtime_fps,
                     "loop": True, "mode": "triggered", "rois": rois, "inspect": dict(BURST)}],
        "model": {"checkpoint": str(Path(opts.checkpoint).resolve()), "max_batch": opts.max_batch,
                  "runtime": opts.runtime},
        "decide": {"defect_classes": defects},
        "mqtt": {"host": host, "port": port}, "spool": {"dir": str(spool)},
        "http": {"enabled": False}, "logging": {"level": "warning"},
    }


def _wait_ready(daemon: DaemonProcess, ready: Recorder, timeout: float = 120.0) -> None:
    """Until the station says `ready` (camera streaming, model loaded); a daemon that exits says why."""
    end = time.monotonic() + timeout
    while True:
        shown = [m.payload for m in ready.messages()]
        if shown and shown[-1] == b"ready":
            return
        if daemon.proc.poll() is not None:
            raise UserError(f"bench --inspect: the daemon exited ({daemon.proc.returncode}) before its station was "
                            f"ready: {daemon.stderr.strip()[-1500:]}")
        if time.monotonic() > end:
            raise UserError(f"bench --inspect: the station was not ready within {timeout:g} s "
                            f"(it said {[p.decode() for p in shown]}): {daemon.stderr.strip()[-1500:]}")
        time.sleep(0.05)


def _drive(plc: Requester, seconds: float, rate: float) -> list[bytes]:
    """One trigger per part at a steady rate (a fixed schedule: a late send does not shift the next ones)."""
    sent, start = [], time.monotonic()
    for i in range(max(1, round(seconds * rate))):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        sent.append(plc.inspect(STATION, f"part-{i}"))
    return sent


def inspect_station(opts: BenchOptions, host: str, port: int, defects: list[str]) -> dict:
    """The real daemon with one triggered station on the looped video, driven by a PLC over MQTT 5."""
    work = Path(tempfile.mkdtemp(prefix="visiond-bench-inspect-"))
    cfg = _station_cfg(opts, host, port, defects, work / "spool")
    if opts.model_cache is not None:  # the daemon finds the export where it caches it: no second export
        shutil.copytree(opts.model_cache, work / "spool" / "models")
    ready = Recorder(host, port, f"visiond/bench/{STATION}/ready").start()
    daemon = DaemonProcess(work, cfg)
    try:
        _wait_ready(daemon, ready)
        with Requester(host, port, "bench") as plc:
            cpu0 = proc_cpu(daemon.proc.pid)
            sent = _drive(plc, opts.inspect_seconds, opts.inspect_rate)
            plc.wait_all(sent, BURST["deadline_ms"] / 1000 + 10)
            cpu1 = proc_cpu(daemon.proc.pid)
            answers = [(plc.answers(c), plc.latency_s(c)) for c in sent]
        rss = rss_mb(daemon.proc.pid)[1]
        code = daemon.stop()
    finally:
        daemon.close()
        ready.stop()
        shutil.rmtree(work, ignore_errors=True)
    truth_csv = truth_path(opts.video)
    truth = read_truth(truth_csv) if truth_csv.exists() else None
    out = _inspect_summary(answers, truth, defects)
    out.update(camera_fps=opts.realtime_fps, rois=len(STATION_ROIS), burst=dict(BURST), rate_hz=opts.inspect_rate,
               seconds=opts.inspect_seconds, cpu_s_per_trigger=(cpu1 - cpu0) / len(sent), rss_max_mb=rss,
               exit_code=code)
    return out


def rss_mb(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM): a running process's resident memory now and at its peak, in MiB."""
    now = peak = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return now, peak


def percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    a = np.array(values_ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def truth_of(doc: dict, truth: list[str], defects: list[str]) -> str:
    """A part's ground truth from its burst: NG when any of its frames shows a defect (the `worst` rule)."""
    labels = [truth[f["index"] % len(truth)] for f in doc["frames"]]
    return "NG" if any(label in defects for label in labels) else "OK"


def _inspect_summary(answers: list[tuple[list, float | None]], truth: list[str] | None, defects: list[str]) -> dict:
    """Counts, latency and accuracy from (answers to a trigger, trigger -> first answer seconds), one per trigger."""
    docs = [got[0] for got, _ in answers if got]
    verdicts = {v: sum(d.get("verdict") == v for d in docs) for v in ("OK", "NG", "ERROR")}
    errors: dict[str, int] = {}
    for d in docs:
        if d.get("verdict") == "ERROR":
            errors[str(d.get("reason"))] = errors.get(str(d.get("reason")), 0) + 1
    judged = [(d["verdict"], truth_of(d, truth, defects)) for d in docs if truth and d.get("verdict") in ("OK", "NG")]
    decided = [d["latency_ms"] for d in docs if d.get("verdict") in ("OK", "NG")]
    return {
        "triggers": len(answers), "answered": len(docs), "unanswered": len(answers) - len(docs),
        "answered_more_than_once": sum(len(got) > 1 for got, _ in answers),
        "verdicts": verdicts, "errors": errors,
        "accuracy": sum(v == t for v, t in judged) / len(judged) if judged else None, "judged": len(judged),
        "latency_ms": percentiles([s * 1e3 for _, s in answers if s is not None]),
        "daemon_ms": {k: percentiles([lat[k] for lat in decided]) for k in ("burst", "inference", "total")},
    }


def run_bench_inspect(opts: BenchOptions) -> dict:
    """`visiond bench --inspect`: trigger -> verdict latency of a triggered station with 3 ROIs, and its accuracy."""
    if opts.inspect_seconds <= 0 or opts.inspect_rate <= 0:
        raise UserError(f"--seconds {opts.inspect_seconds:g} and --rate {opts.inspect_rate:g}: expected both > 0")
    opts = _defaults(opts)
    cache = Path(tempfile.mkdtemp(prefix="visiond-bench-models-"))
    try:
        ckpt, clf = _load_model(opts, cache)
        defects = _defect_classes(ckpt, opts.checkpoint)
        broker, host, port = _broker(opts)
        try:
            with console.status(f"triggered station: {opts.inspect_rate:g} triggers/s for {opts.inspect_seconds:g} s, "
                                f"{len(STATION_ROIS)} ROIs"):
                station = inspect_station(opts, host, port, defects)
        finally:
            if broker:
                broker.close()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {**_about(opts, clf), "inspect": station}
    _print_inspect(result)
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(result, indent=2))
    return result


def _print_inspect(r: dict) -> None:
    s, b = r["inspect"], r["inspect"]["burst"]
    t = Table(title=f"visiond bench --inspect — {s['rate_hz']:g} triggers/s, {s['rois']} ROIs, camera "
                    f"{s['camera_fps']:g} fps; {r['model']['arch']} {r['model']['input']} on {r['machine']['device']} "
                    f"({r['machine']['runtime']}), {r['machine']['cores']} cores")
    for col in ("run", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right" if col != "run" else "left")
    for name, d in (("trigger -> verdict (PLC)", s["latency_ms"]),
                    (f"  burst of {b['frames']} (daemon)", s["daemon_ms"]["burst"]),
                    ("  inference (daemon)", s["daemon_ms"]["inference"]),
                    ("  trigger -> decided (daemon)", s["daemon_ms"]["total"])):
        t.add_row(name, *(_f(d[k], "{:.1f}") for k in ("p50", "p95", "p99", "max")))
    Console().print(t)
    v = s["verdicts"]
    errors = ", ".join(f"{k} {n}" for k, n in s["errors"].items()) or "none"
    Console().print(f"{s['triggers']} triggers, {s['answered']} answered (OK {v['OK']}, NG {v['NG']}, ERROR {v['ERROR']}; "
                    f"reasons: {errors}), {s['unanswered']} unanswered; accuracy against the truth "
                    f"{_f(s['accuracy'], '{:.1%}')} over {s['judged']}; burst {b['frames']} frames "
                    f"{b['interval_ms']:g} ms apart; daemon CPU {_f(s['cpu_s_per_trigger'] * 1e3, '{:.1f}')} ms per "
                    "trigger (its camera's decoding included)", soft_wrap=True)
