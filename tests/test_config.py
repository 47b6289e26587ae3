"""Config: a bad file gets one clear line per problem, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visiond.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def _base(tmp_path: Path) -> dict:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    return {"cameras": [{"name": "line1", "source": "line.mp4"}], "model": {"checkpoint": str(ckpt)}}


def _run_check(tmp_path: Path, cfg, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "visiond", "config", "check", str(path)], capture_output=True,
                          text=True, env=env, timeout=60)


BAD = [
    ("unknown key", lambda c: c.update(colour="red"), "colour: unknown key"),
    ("unknown nested key", lambda c: c["mqtt"].update(hots="x") if "mqtt" in c else c.update(mqtt={"hots": "x"}),
     "mqtt.hots: unknown key"),
    ("wrong type", lambda c: c["model"].update(max_batch="many"), "model.max_batch: got 'many'"),
    ("port out of range", lambda c: c.update(mqtt={"port": 70000}), "mqtt.port: got 70000"),
    ("metrics port out of range", lambda c: c.update(metrics={"port": -1}), "metrics.port: got -1"),
    ("missing checkpoint key", lambda c: c["model"].pop("checkpoint"), "model.checkpoint: required key is missing"),
    ("missing checkpoint file", lambda c: c["model"].update(checkpoint="/nonexistent/m.ckpt"),
     "model.checkpoint: got '/nonexistent/m.ckpt', expected an existing checkpoint file"),
    ("bad URL scheme", lambda c: c["cameras"][0].update(source="ftp://cam/x"), "cameras[0].source"),
    ("URL without host", lambda c: c["cameras"][0].update(source="rtsp://"), "expected a host"),
    ("no cameras", lambda c: c.update(cameras=[]), "cameras: got [], expected"),
    ("bad policy", lambda c: c["cameras"][0].update(policy="sometimes"), "cameras[0].policy: got 'sometimes'"),
    ("bad roi", lambda c: c["cameras"][0].update(roi=[0, 0, -5, 10]), "cameras[0].roi"),
    ("duplicate camera", lambda c: c["cameras"].append({"name": "line1", "source": "b.mp4"}), "repeated: line1"),
    ("bad device", lambda c: c["model"].update(device="tpu"), "model.device: got 'tpu'"),
    ("threshold above 1", lambda c: c.update(decide={"threshold": 1.5}), "decide.threshold"),
    ("huge batch", lambda c: c["model"].update(max_batch=10**9), "model.max_batch: got 1000000000"),
    ("bad qos", lambda c: c.update(mqtt={"qos": 3}), "mqtt.qos: got 3"),
    ("missing env secret", lambda c: c.update(mqtt={"password": "${VISIOND_NOPE_PASSWORD}"}),
     "mqtt.password: environment variable VISIOND_NOPE_PASSWORD is not set"),
]


@pytest.mark.parametrize("name,mutate,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, name, mutate, expected):
    # given a valid config with one thing wrong
    cfg = _base(tmp_path)
    mutate(cfg)
    # when it is checked
    res = _run_check(tmp_path, cfg)
    # then: exit 2, the problem named on one line, no traceback
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert any(expected in ln for ln in lines), lines
    assert all(ln.startswith("visiond: error: ") for ln in lines), lines


@pytest.mark.parametrize("text,expected", [
    ("cameras: [\n  {name: a", "invalid YAML"),
    ("- just\n- a list\n", "expected a YAML mapping"),
    ("", "expected a YAML mapping"),
])
def test_unparseable_yaml(tmp_path, text, expected):
    res = _run_check(tmp_path, text)
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr


def test_unreadable_and_missing_files(tmp_path):
    res = subprocess.run([sys.executable, "-m", "visiond", "config", "check", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "cannot read config" in res.stderr
    res = subprocess.run([sys.executable, "-m", "visiond", "run", "--config", str(tmp_path / "no.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "config file not found" in res.stderr and "Traceback" not in res.stderr


def test_several_problems_reported_together(tmp_path):
    cfg = _base(tmp_path)
    cfg["mqtt"] = {"port": 0, "qos": 5}
    res = _run_check(tmp_path, cfg)
    assert res.returncode == 2
    assert "mqtt.port" in res.stderr and "mqtt.qos" in res.stderr


def test_secret_comes_from_env_and_is_never_shown(tmp_path):
    cfg = _base(tmp_path)
    cfg["mqtt"] = {"password": "${VISIOND_MQTT_PASSWORD}", "port": "not-a-port"}
    cfg["cameras"][0]["source"] = "rtsp://u:${VISIOND_CAM_PASSWORD}@10.0.0.5/s"
    parsed_env = {"VISIOND_MQTT_PASSWORD": "hunter2", "VISIOND_CAM_PASSWORD": "sesame"}
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, env=parsed_env)
    assert "hunter2" not in str(err.value) and "sesame" not in str(err.value)
    cfg["mqtt"].pop("port")
    ok = parse_config(cfg, env=parsed_env)
    assert ok.mqtt.password.get_secret_value() == "hunter2"
    assert ok.cameras[0].source == "rtsp://u:sesame@10.0.0.5/s"
    assert "hunter2" not in repr(ok)


def test_defaults_are_safe():
    cfg = parse_config({"cameras": [{"name": "a", "source": "0"}], "model": {"checkpoint": "m.ckpt"}}, env={})
    assert cfg.metrics.bind == "127.0.0.1"
    assert cfg.mqtt.host == "127.0.0.1" and cfg.mqtt.qos == 1
    assert cfg.node  # host name


@pytest.mark.parametrize("name", ["factory-line.yaml", "demo.yaml"])
def test_shipped_examples_parse(name):
    env = {"VISIOND_CAM_PASSWORD": "x", "VISIOND_MQTT_PASSWORD": "y"}
    cfg = load_config(ROOT / "configs" / name, env=env)
    assert cfg.cameras
