"""`make demo`: a synthetic line, a model trained on it, and visiond classifying it live.

Steps: render the line video + labelled crops -> train a small CNN (skipped
when demo-out/model.ckpt exists) -> start a private mosquitto on a free port
(never a broker that happens to listen on 1883: next to a line that is the
plant's; `--broker HOST:PORT` names one on purpose) -> run `visiond run`
on the video at camera speed -> print what a subscriber receives, the accuracy
against the line's ground truth, and a /metrics summary -> stop cleanly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools import synthline  # noqa: E402
from visiond.harness.broker import Broker  # noqa: E402
from visiond.harness.process import free_port, wait_for_port  # noqa: E402
from visiond.harness.recorder import Recorder  # noqa: E402

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
        console.print("[bold]1/4[/] rendering the synthetic line (600 frames) and labelled crops")
        synthline.render_video(video, frames=600, seed=7)
        synthline.render_images(OUT / "images", per_class=200, seed=11)
    else:
        console.print("[bold]1/4[/] synthetic line already rendered")
    return video, synthline.read_truth(synthline.truth_path(video))


def train_model() -> Path:
    ckpt = OUT / "model.ckpt"
    if ckpt.exists():
        console.print(f"[bold]2/4[/] model already trained: {ckpt}")
        return ckpt
    console.print("[bold]2/4[/] training a small CNN on the crops")
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
metrics:
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
    console.print("[bold]4/4[/] visiond run (the video plays at 30 fps; Ctrl-C stops early)")
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
    code = proc.wait(timeout=30)
    time.sleep(0.5)
    sub.stop()
    report(sub, truth)
    console.print(metric_summary(last_metrics))
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
        console.print(f"[bold]3/4[/] using the broker you named: {host}:{port}")
    else:
        broker = Broker(options=["max_queued_messages 100000"]).start()
        host, port = "127.0.0.1", broker.port
        console.print(f"[bold]3/4[/] started a private mosquitto on 127.0.0.1:{port} "
                      "(a broker on this box's 1883 is left alone; --broker HOST:PORT to use one)")
    try:
        metrics_port = free_port()
        return run_daemon(write_config(ckpt, video, host, port, metrics_port), host, port, metrics_port, truth)
    finally:
        if broker:
            broker.close()


if __name__ == "__main__":
    sys.exit(main())
