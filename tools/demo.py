"""`make demo`: a synthetic line, a model trained on it, and visiond classifying it live.

Steps: render the line video + labelled crops -> train a small CNN (skipped
when demo-out/model.ckpt exists) -> start a private mosquitto on a free port
(never a broker that happens to listen on 1883: next to a line that is the
plant's; `--broker HOST:PORT` names one on purpose) -> run `visiond run`
on the video at camera speed -> print what a subscriber receives, the accuracy
against the line's ground truth, and a /metrics summary -> stop cleanly ->
run the same line as a triggered inspection station: the demo plays the PLC,
sends one MQTT 5 trigger per part as it passes the camera (its timing taken
from the line's ground truth and the camera's frame clock), and prints each
part's verdict against the truth, with one NG part's annotated evidence image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools import synthline  # noqa: E402
from visiond.harness.broker import Broker  # noqa: E402
from visiond.harness.child import metric_sum  # noqa: E402
from visiond.harness.process import free_port, wait_for_port  # noqa: E402
from visiond.harness.recorder import Recorder  # noqa: E402
from visiond.harness.requester import Requester  # noqa: E402

OUT = ROOT / "demo-out"
NODE_TOPICS = ["visiond/demo-box/+/prediction", "visiond/demo-box/status", "visiond/demo-box/+/event"]
console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="visiond on a synthetic line: render, train, serve, show.")
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out",
                    help="folder for the video, the model and the run (default: demo-out/)")
    ap.add_argument("--broker", metavar="HOST:PORT",
                    help="publish to this MQTT broker (default: a private mosquitto on a free port)")
    args = ap.parse_args(argv)
    if args.broker is not None:
        host, _, port = args.broker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            ap.error(f"--broker {args.broker!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
        args.broker = (host, int(port))
    return args


def prepare_data() -> tuple[Path, list[str]]:
    video = OUT / "line.mp4"
    if not synthline.truth_path(video).exists():
        console.print("[bold]1/5[/] rendering the synthetic line (600 frames) and labelled crops")
        synthline.render_video(video, frames=600, seed=7)
        synthline.render_images(OUT / "images", per_class=200, seed=11)
    else:
        console.print("[bold]1/5[/] synthetic line already rendered")
    return video, synthline.read_truth(synthline.truth_path(video))


def train_model() -> Path:
    ckpt = OUT / "model.ckpt"
    if ckpt.exists():
        console.print(f"[bold]2/5[/] model already trained: {ckpt}")
        return ckpt
    console.print("[bold]2/5[/] training a small CNN on the crops")
    cmd = [sys.executable, "-m", "visiond", "train", str(OUT / "images"), "--arch", "smallcnn", "--out", str(ckpt),
           "--epochs", "15", "--image-size", "64", "--seed", "1", "--augment", "none"]
    subprocess.run(cmd, check=True)
    return ckpt


def write_config(ckpt: Path, video: Path, host: str, port: int, metrics_port: int) -> Path:
    x, y, w, h = synthline.default_roi()
    cfg = OUT / "demo-run.yaml"
    shutil.rmtree(OUT / "spool", ignore_errors=True)  # a fresh run: frame i <-> i-th message
    cfg.write_text(f"""node: demo-box
cameras:
  - name: line1
    source: {video}
    fps: 30
    roi: [{x}, {y}, {w}, {h}]
model:
  checkpoint: {ckpt}
decide:
  defect_classes: [scratch, spot]
mqtt:
  host: {host}
  port: {port}
spool:
  dir: {OUT / 'spool'}
http:
  port: {metrics_port}
""")
    return cfg


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return r.read().decode()
    except OSError:
        return ""


def metric_summary(text: str) -> Table:
    table = Table(title="/metrics (last scrape)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    wanted = ("visiond_frames_captured_total", "visiond_predictions_total", "visiond_frames_dropped_total",
              "visiond_mqtt_publish_total", "visiond_batch_size_count", "visiond_batch_size_sum",
              "visiond_inference_seconds_sum", "visiond_mqtt_connected", "visiond_model_info", "visiond_spool_messages")
    for line in text.splitlines():
        if line.startswith(wanted) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if float(value) != 0 or "connected" in name or "model_info" in name:
                table.add_row(name, value)
    return table


def run_daemon(cfg: Path, host: str, port: int, metrics_port: int, truth: list[str]) -> int:
    console.print("[bold]4/5[/] visiond run (the video plays at 30 fps; Ctrl-C stops early)")
    sub = Recorder(host, port, NODE_TOPICS).start()
    proc = subprocess.Popen([sys.executable, "-m", "visiond", "run", "--config", str(cfg)])
    last_metrics, shown = "", 0
    try:
        while proc.poll() is None:
            time.sleep(1)
            last_metrics = scrape(metrics_port) or last_metrics
            preds = sub.json_payloads("/prediction")[shown:]
            shown += len(preds)
            if preds:
                p = preds[-1]
                console.print(f"  seq={p['seq']:>5} {p['camera']} {p['label']:<8} score={p['score']:.3f} "
                              f"defect={str(p['defect']):<5} latency={p['latency_ms']['total']:.1f} ms "
                              f"[dim](+{len(preds)} msgs)[/]")
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        interrupted = True
    else:
        interrupted = False
    code = proc.wait(timeout=30)
    time.sleep(0.5)
    sub.stop()
    report(sub, truth)
    console.print(metric_summary(last_metrics))
    if interrupted:
        raise KeyboardInterrupt
    return code


def report(sub: Recorder, truth: list[str]) -> None:
    preds = sorted(sub.json_payloads("/prediction"), key=lambda p: p["seq"])
    if not preds:
        console.print("[red]no predictions received[/]")
        return
    # seq continues across runs (it survives restarts): map back to frame index by order
    right = sum(1 for i, p in enumerate(preds) if i < len(truth) and p["label"] == truth[i])
    n = min(len(preds), len(truth))
    console.print(f"\nreceived {len(preds)} predictions for {len(truth)} frames; "
                  f"accuracy against the line's ground truth: {right / max(n, 1):.1%}")
    status = [m.payload.decode() for m in sub.messages("visiond/demo-box/status")]
    console.print(f"defect events: {len(sub.json_payloads('/event'))}; status messages seen: {status}")
    console.print("one message as a subscriber sees it:")
    console.print_json(json.dumps(preds[len(preds) // 2]))


# --------------------------------------------------------------------------- 5/5: a triggered inspection station

STATION = "station1"
STATION_FPS = 60  # the line at twice the video's speed: a part every ~0.35 s, 30 parts in about 11 s
STATION_PARTS = 30
# Three inspection points, three crops per frame as a station checking a screw, a label and a seam would send:
# the line's ROI and the same square 16 px to either side (the demo's model knows only this view of a part:
# shifted further, or up or down, it misjudges parts), each with its own defect threshold.
# (name, x shift, threshold or None for decide's)
STATION_ROIS = (("centre", 0, None), ("left", -16, 0.4), ("right", 16, 0.6))
DEFECTS = ("scratch", "spot")


def write_station_config(ckpt: Path, video: Path, host: str, port: int, metrics_port: int) -> Path:
    x, y, w, h = synthline.default_roi()
    cfg = OUT / "demo-station.yaml"
    spool = OUT / "station-spool"
    shutil.rmtree(spool, ignore_errors=True)  # a fresh results store and evidence folder per run
    rois = "\n".join(f"      - {{name: {name}, rect: [{x + dx}, {y}, {w}, {h}]"
                     + ("" if t is None else f", threshold: {t}") + "}" for name, dx, t in STATION_ROIS)
    cfg.write_text(f"""node: demo-box
cameras:
  - name: {STATION}
    source: {video}
    fps: {STATION_FPS}
    loop: true
    mode: triggered
    rois:
{rois}
    inspect: {{frames: 3, interval_ms: 0, deadline_ms: 2000, queue: 8}}
model:
  checkpoint: {ckpt}
decide:
  defect_classes: [{", ".join(DEFECTS)}]
evidence:
  save: ng
mqtt:
  host: {host}
  port: {port}
spool:
  dir: {spool}
http:
  port: {metrics_port}
logging:
  level: warning
""")
    return cfg


@dataclass(frozen=True)
class PartPass:
    """One part lying whole inside the ROI, video frames `first`..`last`: what the PLC's photo-eye would see."""

    first: int
    last: int
    kind: str


def parts_on_line(truth: list[str]) -> list[PartPass]:
    """Every part's pass in one play of the video (the ground truth's runs), leaving out those the loop cuts."""
    passes, start = [], None
    for i, label in enumerate([*truth, "empty"]):
        if start is not None and label != truth[start]:
            passes.append(PartPass(start, i - 1, truth[start]))
            start = None
        if start is None and label != "empty":
            start = i
    return [p for p in passes if p.first > 0 and p.last < len(truth) - 1]


class LineClock:
    """When the station's camera captures frame i (counted from its start, the video looping): extrapolated at the
    camera's fps from the newest frame the daemon told of (/metrics at first, then each verdict's burst)."""

    def __init__(self, fps: float):
        self.fps = fps
        self.index, self.wall = -1, 0.0

    def sync(self, index: int, wall: float) -> None:
        if index > self.index:
            self.index, self.wall = index, wall

    def index_at(self, wall: float) -> float:
        return self.index + (wall - self.wall) * self.fps

    def wall_of(self, index: int) -> float:
        return self.wall + (index - self.index) / self.fps


def _wall(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _next_pass(passes: list[PartPass], length: int, after: float) -> tuple[int, PartPass]:
    """The first pass whose aim (the frame before its middle: a 3-frame burst is centred on the part) is after
    frame `after`."""
    loop = max(0, int(after) // length)
    while True:
        for p in passes:
            aim = loop * length + (p.first + p.last) // 2 - 1
            if aim > after:
                return aim, p
        loop += 1


def _wait_station(proc: subprocess.Popen, ready: Recorder, metrics_port: int, clock: LineClock) -> None:
    """Until the station says ready and its camera's first frames are counted (a retained `ready` from an earlier
    run on a named broker does not count without them); the clock starts from those."""
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None:
        text = scrape(metrics_port)
        count = metric_sum(text, "visiond_frames_captured_total", camera=STATION) if text else None
        last = metric_sum(text, "visiond_source_last_frame_timestamp_seconds", camera=STATION) if text else None
        shown = [m.payload for m in ready.messages()]
        if count and last and shown and shown[-1] == b"ready":
            clock.sync(int(count) - 1, last)
            return
        time.sleep(0.1)
    raise RuntimeError("the station did not become ready within 60 s" if proc.poll() is None
                       else f"visiond exited ({proc.returncode}) before the station was ready")


def trigger_parts(plc: Requester, clock: LineClock, truth: list[str], count: int) -> list[tuple[str, PartPass, bytes]]:
    """One trigger per part, sent just before the part's middle frame: (part id, its pass, correlation data)."""
    passes = parts_on_line(truth)
    sent: list[tuple[str, PartPass, bytes]] = []
    aim = -1
    for k in range(count):
        for _, _, corr in sent:  # the newest frame any verdict names keeps the clock true across the video's loops
            for doc in plc.answers(corr)[:1]:
                for f in doc.get("frames", []):
                    clock.sync(f["index"], _wall(f["captured_at"]))
        aim, part = _next_pass(passes, len(truth), max(aim, clock.index_at(time.time()) + 1))
        time.sleep(max(0.0, clock.wall_of(aim) - 0.4 / clock.fps - time.time()))
        part_id = f"P{k + 1:03d}"
        sent.append((part_id, part, plc.inspect(STATION, part_id)))
    return sent


def _truth_of(doc: dict, truth: list[str]) -> str:
    """The part's ground truth as the camera saw it: NG when any burst frame shows a defect."""
    return "NG" if any(truth[f["index"] % len(truth)] in DEFECTS for f in doc["frames"]) else "OK"


def station_table(rows: list[tuple[str, PartPass, dict | None, float | None]], truth: list[str]) -> Table:
    table = Table(title=f"{STATION}: a trigger per part, {len(STATION_ROIS)} ROIs (label:score), 3-frame bursts",
                  box=box.SIMPLE_HEAD, padding=0, pad_edge=False, show_edge=False)  # fits 80 columns
    for col in ("part", "belt", "frames", "truth", "verdict", *(n for n, _, _ in STATION_ROIS), "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left", no_wrap=True)
    for part_id, part, doc, latency in rows:
        if doc is None:
            table.add_row(part_id, part.kind, "", "", "[red]no answer[/]")
            continue
        frames = [f["index"] % len(truth) for f in doc["frames"]]
        expected = _truth_of(doc, truth) if frames else "-"
        verdict = doc["verdict"] if doc["verdict"] != "ERROR" else f"ERROR {doc['reason']}"
        colour = "green" if doc["verdict"] == expected else "red"
        rois = {r["name"]: ("[red]{}[/]" if r["defect"] else "{}").format(f"{r['label']}:{r['score']:.2f}")
                for r in doc["rois"]}
        table.add_row(part_id, part.kind, "-".join(str(i) for i in frames[:1] + frames[-1:]), expected,
                      f"[{colour}]{verdict}[/]", *(rois.get(n, "") for n, _, _ in STATION_ROIS),
                      f"{latency * 1e3:.0f}" if latency is not None else "")
    return table


def _evidence_image(rows, evidence_dir: Path, timeout: float = 10.0) -> tuple[str, Path] | None:
    """One NG part's annotated image, once the daemon's evidence writer (a thread of its own) has written it."""
    for part_id, _, doc, _ in rows:
        if doc and doc["verdict"] == "NG" and doc["evidence"]:
            image = evidence_dir / next(p for p in doc["evidence"] if p.endswith("_annotated.jpg"))
            end = time.monotonic() + timeout
            while not image.exists() and time.monotonic() < end:
                time.sleep(0.1)
            return part_id, image
    return None


def run_station(cfg: Path, host: str, port: int, metrics_port: int, truth: list[str]) -> int:
    console.print(f"[bold]5/5[/] a triggered inspection station on the same line ({STATION_FPS} fps): the demo is "
                  f"the PLC, one trigger per part over MQTT 5, {STATION_PARTS} parts")
    ready = Recorder(host, port, f"visiond/demo-box/{STATION}/ready").start()
    proc = subprocess.Popen([sys.executable, "-m", "visiond", "run", "--config", str(cfg)])
    rows: list = []
    try:
        clock = LineClock(STATION_FPS)
        _wait_station(proc, ready, metrics_port, clock)
        with Requester(host, port, "demo-box") as plc:
            sent = trigger_parts(plc, clock, truth, STATION_PARTS)
            plc.wait_all([corr for _, _, corr in sent], timeout=10)
            rows = [(pid, part, (plc.answers(c) or [None])[0], plc.latency_s(c)) for pid, part, c in sent]
        evidence = _evidence_image(rows, OUT / "station-spool" / "evidence")
    except RuntimeError as exc:
        console.print(f"[red]station: {exc}[/]")
        return 1
    finally:  # Ctrl-C too: the daemon stops the way it always does
        ready.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    return station_report(rows, truth, evidence) or code


def station_report(rows, truth: list[str], evidence: tuple[str, Path] | None) -> int:
    console.print(station_table(rows, truth))
    docs = [doc for _, _, doc, _ in rows if doc is not None]
    counts = {v: sum(d["verdict"] == v for d in docs) for v in ("OK", "NG", "ERROR")}
    right = sum(d["verdict"] == _truth_of(d, truth) for d in docs if d["frames"])
    latencies = sorted(lat for *_, lat in rows if lat is not None)
    p50 = f"{latencies[len(latencies) // 2] * 1e3:.0f} ms" if latencies else "-"
    console.print(f"station: {len(rows)} parts triggered, {len(docs)} answered (OK {counts['OK']}, NG {counts['NG']}, "
                  f"ERROR {counts['ERROR']}); verdict = ground truth for {right} of {len(docs)}; "
                  f"trigger -> verdict p50 {p50}", soft_wrap=True, highlight=False)
    if evidence is not None:
        console.print(f"annotated evidence of NG part {evidence[0]}: {evidence[1]}", soft_wrap=True, highlight=False)
    else:
        console.print("[yellow]no NG part among these: no evidence image to show[/]")
    return 0 if rows and len(docs) == len(rows) else 1


def main(argv: list[str] | None = None) -> int:
    global OUT
    args = parse_args(argv)
    OUT = args.out.resolve()
    if args.broker is not None and not wait_for_port(*args.broker, timeout=0.5):
        console.print(f"[red]--broker {args.broker[0]}:{args.broker[1]}: nothing answers there; "
                      "expected a running MQTT broker (or leave --broker out for a private one)")
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    video, truth = prepare_data()
    ckpt = train_model()
    broker = None
    if args.broker is not None:
        host, port = args.broker
        console.print(f"[bold]3/5[/] using the broker you named: {host}:{port}")
    else:
        broker = Broker(options=["max_queued_messages 100000"]).start()
        host, port = "127.0.0.1", broker.port
        console.print(f"[bold]3/5[/] started a private mosquitto on 127.0.0.1:{port} "
                      "(a broker on this box's 1883 is left alone; --broker HOST:PORT to use one)")
    try:
        metrics_port = free_port()
        code = run_daemon(write_config(ckpt, video, host, port, metrics_port), host, port, metrics_port, truth)
        metrics_port = free_port()
        station = run_station(write_station_config(ckpt, video, host, port, metrics_port), host, port, metrics_port,
                              truth)
        return code or station
    except KeyboardInterrupt:
        return 130
    finally:
        if broker:
            broker.close()


if __name__ == "__main__":
    sys.exit(main())
