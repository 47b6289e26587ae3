"""Running the real daemon (`python -m visiond run`) in tests, and a model trained on the synthetic line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port

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


class Daemon:
    """`visiond run` as a child process with a config written from a dict."""

    def __init__(self, tmp: Path, cfg: dict, env: dict | None = None):
        self.tmp = tmp
        self.metrics_port = cfg.setdefault("metrics", {}).setdefault("port", free_port())
        cfg.setdefault("spool", {"dir": str(tmp / "spool")})
        cfg.setdefault("node", "testbox")
        self.node = cfg["node"]
        self.config = tmp / "visiond.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr_path = tmp / "visiond.stderr"
        self._stderr = open(self.stderr_path, "wb")
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "visiond", "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr, env=full_env)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the daemon dumps every thread's stack to stderr
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"visiond did not exit within {timeout} s; stderr:\n{self.stderr[-8000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.send(sig)
        return self.wait(timeout)

    def http(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_http(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"visiond exited with {self.proc.returncode}: {self.stderr[-3000:]}")
            try:
                self.http("/metrics")
                return
            except OSError:
                time.sleep(0.2)
        pytest.fail("visiond's /metrics never answered")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def wait_offline(rec, timeout: float, node: str = "testbox") -> None:
    """Until the recorder has seen the node's `offline` status (the daemon's clean stop)."""
    topic = f"visiond/{node}/status"
    rec.wait_for(lambda ms: any(m.topic == topic and m.payload == b"offline" for m in ms), timeout)


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        pairs = dict(p.split("=", 1) for p in lab.rstrip("}").split(",") if "=" in p)
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        if all(pairs.get(k) == str(v) for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise AssertionError(f"metric {name}{labels} not found")
    return total


def schema_validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMAS / name).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
