"""Running the real daemon (`python -m visiond run`) in tests, and a model trained on the synthetic line."""

from __future__ import annotations

import json
from pathlib import Path

from visiond.harness.child import DaemonProcess, metric_sum

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "visiond" / "schemas"


def trained_line_model(base: Path, images: Path) -> Path:
    """A smallcnn trained on the synthetic line crops, once per test session (cached on disk)."""
    from visiond.train.loop import TrainOptions, train

    out = base / "line_model" / "line.ckpt"
    if not out.exists():
        train(TrainOptions(data=images, out=out, arch="smallcnn", epochs=12, image_size=64, seed=3,
                           augment="none", progress=False))
    return out


def line_cfg(checkpoint: Path, mosquitto, cameras: list[dict], defect_classes=("scratch", "spot"), **extra) -> dict:
    """A daemon config for the synthetic line on the test's broker; dict extras are merged into defaults."""
    cfg = {"cameras": cameras, "model": {"checkpoint": str(checkpoint), "max_batch": 8},
           "decide": {"defect_classes": list(defect_classes)},
           "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "keepalive_s": 5}}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class Daemon(DaemonProcess):
    """`visiond run` as a child process (the harness's), on node "testbox" with its config and spool in `tmp`."""

    def __init__(self, tmp: Path, cfg: dict, env: dict | None = None):
        self.tmp = tmp
        self.node = cfg.setdefault("node", "testbox")
        super().__init__(tmp, cfg, env=env)


def run_to_end(tmp: Path, cfg: dict, timeout: float = 120) -> Daemon:
    """`visiond run` on sources that end (files): waits until it stops on its own, failing with its stderr
    unless it exits 0; the stopped Daemon is returned for its stderr and spool."""
    d = Daemon(tmp, cfg)
    try:
        assert d.wait(timeout) == 0, d.stderr[-3000:]
    finally:
        d.close()
    return d


def wait_offline(rec, timeout: float, node: str = "testbox") -> None:
    """Until the recorder has seen the node's `offline` status (the daemon's clean stop)."""
    topic = f"visiond/{node}/status"
    rec.wait_for(lambda ms: any(m.topic == topic and m.payload == b"offline" for m in ms), timeout)


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = metric_sum(text, name, **labels)
    if total is None:
        raise AssertionError(f"metric {name}{labels} not found")
    return total


def schema_validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
