"""Nothing let in, nothing let out: the daemon over TLS with a password, refused logins and ACL denials,
local-only HTTP listeners, and secrets that never reach logs, metrics or MQTT.

The broker is a real Mosquitto with two listeners (`per_listener_settings`): a TLS one whose certificate
a CA made by the test signed, with a password file (and an ACL where a test needs one), which is what
visiond talks to; and a plain anonymous one on 127.0.0.1 for the test's own subscriber (the plant side).
The sink-level TLS, password and ACL tests are in test_mqtt_sink.py; these run the whole daemon.
"""

from __future__ import annotations

import getpass
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from conftest import free_port, require_binary, wait_for_port
from daemon_helpers import Daemon, metric_value

MQTT_PASSWORD = "mqtt-Pa55word-never-shown"
CAMERA_PASSWORD = "cam-s3cret-never-shown"


def make_certificates(d: Path) -> None:
    """A private CA and a server certificate it signed for 127.0.0.1 (EC P-256, valid two days)."""
    openssl = require_binary("openssl", "openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=visiond test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


class SecureBroker:
    """The test's mosquitto, reconfigured: plain anonymous listener for the test, TLS + password for visiond."""

    def __init__(self, mosquitto, acl: str | None = None):
        self.mosquitto = mosquitto
        d = mosquitto.workdir
        make_certificates(d)
        passwd = require_binary("mosquitto_passwd", "mosquitto")
        subprocess.run([passwd, "-b", "-c", str(d / "passwords"), "visiond", MQTT_PASSWORD], check=True, timeout=30)
        self.ca = d / "ca.pem"
        self.tls_port = free_port()
        acl_line = ""
        if acl is not None:
            (d / "acl").write_text(acl)
            acl_line = f"acl_file {d / 'acl'}\n"
        mosquitto.stop()
        mosquitto.conf.write_text(
            "per_listener_settings true\n"
            f"listener {mosquitto.port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\ncafile {self.ca}\ncertfile {d / 'server.pem'}\n"
            f"keyfile {d / 'server.key'}\nallow_anonymous false\npassword_file {d / 'passwords'}\n{acl_line}"
            "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot read tmp
        )
        mosquitto.start()
        assert wait_for_port("127.0.0.1", self.tls_port, 10), mosquitto.log.read_text()[-2000:]

    def mqtt_config(self, password: str = "${VISIOND_MQTT_PASSWORD}") -> dict:
        return {"host": "127.0.0.1", "port": self.tls_port, "tls": {"ca": str(self.ca)}, "username": "visiond",
                "password": password, "keepalive_s": 5}

    @property
    def log(self) -> str:
        return self.mosquitto.log.read_text(errors="replace")


def _folder(tmp: Path, n: int) -> Path:
    folder = tmp / "frames"
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((64, 64, 3), 30 * i, np.uint8))
    return folder


def _dead_camera() -> dict:
    # an unencoded @ in the password: the redaction must hide all of it, not just up to the first @
    return {"name": "dead", "source": f"rtsp://inspect:{CAMERA_PASSWORD}@x@127.0.0.1:{free_port()}/stream1",
            "open_timeout_s": 1, "read_timeout_s": 1}


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, hex_port = address.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words, host order
            found.add(socket.inet_ntop(family, raw))
    return found


def _assert_no_secrets(where: str, text: str) -> None:
    for secret in (MQTT_PASSWORD, CAMERA_PASSWORD, "x@127.0.0.1"):
        assert secret not in text, f"{secret!r} leaked into {where}"


def test_the_daemon_publishes_over_tls_with_a_password_and_leaks_nothing(tmp_path, mosquitto, mqtt_recorder,
                                                                          line_model, rtsp_server, synth_video):
    # given a broker that only speaks TLS with a password to visiond, and cameras whose URLs carry passwords
    broker = SecureBroker(mosquitto)
    rec = mqtt_recorder("#")
    live = rtsp_server.url.replace("rtsp://", f"rtsp://inspect:{CAMERA_PASSWORD}@")
    cams = [{"name": "folder", "source": str(_folder(tmp_path, 5))},
            {"name": "rtsp", "source": live, "roi": list(synth_video.roi)}, _dead_camera()]
    cfg = {"cameras": cams, "model": {"checkpoint": str(line_model)}, "mqtt": broker.mqtt_config(),
           "logging": {"level": "debug"}}
    d = Daemon(tmp_path, cfg, env={"VISIOND_MQTT_PASSWORD": MQTT_PASSWORD})
    try:
        d.wait_http()
        # when it runs, then its predictions reach the plant through the broker
        rec.wait_for(lambda ms: sum(m.topic == "visiond/testbox/folder/prediction" for m in ms) == 5, 60)
        rec.wait_for(lambda ms: sum(m.topic == "visiond/testbox/rtsp/prediction" for m in ms) >= 10, 60)
        # and they came over the TLS listener, logged in as visiond
        assert f"on port {broker.tls_port}" in broker.log and "u'visiond'" in broker.log, broker.log[-2000:]
        metrics = d.http("/metrics")[1].decode()
        assert metric_value(metrics, "visiond_mqtt_connected") == 1
        # and /metrics and /healthz listen on 127.0.0.1 only (the default bind)
        assert listening_addresses(d.metrics_port) == {"127.0.0.1"}
        # and no password shows in metrics, health, or anything published (topics, payloads, statuses)
        _assert_no_secrets("/metrics", metrics)
        _assert_no_secrets("/healthz", d.http("/healthz")[1].decode())
        # (the dead camera's thread reports its status on its own time: the predictions say nothing of it)
        rec.wait_for(lambda _ms: rec.messages("visiond/testbox/dead/status"), 10, "dead/status")
        for m in rec.messages():
            _assert_no_secrets(f"MQTT message on {m.topic}", m.topic + m.payload.decode(errors="replace"))
        dead = [json.loads(m.payload) for m in rec.messages("visiond/testbox/dead/status")]
        assert dead and "inspect:***@127.0.0.1" in dead[-1]["reason"], dead
        assert d.stop() == 0
    finally:
        d.close()
    # and the debug log names the cameras' URLs only with the password masked
    assert "rtsp://inspect:***@" in d.stderr
    _assert_no_secrets("the debug log", d.stderr)


def test_a_wrong_password_is_refused_retried_with_backoff_and_never_reported_connected(tmp_path, mosquitto,
                                                                                         mqtt_recorder, line_model):
    # given a daemon with the wrong broker password, logging JSON at debug level
    broker = SecureBroker(mosquitto)
    rec = mqtt_recorder("#")
    cams = [{"name": "folder", "source": str(_folder(tmp_path, 3))}, _dead_camera()]
    cfg = {"cameras": cams, "model": {"checkpoint": str(line_model)},
           "mqtt": broker.mqtt_config("${VISIOND_MQTT_PASSWORD}"), "logging": {"level": "debug", "json": True}}
    d = Daemon(tmp_path, cfg, env={"VISIOND_MQTT_PASSWORD": "not-" + MQTT_PASSWORD})
    try:
        d.wait_http()
        # when it runs for a while, then it is never connected, and its predictions wait in the spool
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = d.http("/metrics")[1].decode()
            assert metric_value(metrics, "visiond_mqtt_connected") == 0
            time.sleep(0.5)
        assert metric_value(metrics, "visiond_spool_messages") == 3
        assert d.proc.poll() is None
        refusals = []
        for line in d.stderr.splitlines():
            if line.startswith("{"):
                record = json.loads(line)  # every visiond line is one JSON object
                if "refused the connection" in record["msg"]:
                    refusals.append(record)
        # and the log names the broker's reason, and retries back off instead of spinning
        assert len(refusals) >= 3, d.stderr[-3000:]
        assert all("Bad user name or password" in r["msg"] or "Not authorized" in r["msg"] for r in refusals)
        stamps = [time.mktime(time.strptime(r["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float(r["ts"][19:23])
                  for r in refusals]
        assert len(refusals) <= 10 and stamps[-1] - stamps[-2] > stamps[1] - stamps[0], [r["ts"] for r in refusals]
        assert not any("connected to broker" in line for line in d.stderr.splitlines())
        assert d.stop() == 0
    finally:
        d.close()
    # and nothing reached the plant, not even a retained online
    assert rec.messages("visiond/#") == []
    _assert_no_secrets("the JSON debug log", d.stderr)
    assert "not-" + MQTT_PASSWORD not in d.stderr


def test_an_acl_denial_is_counted_retried_and_the_predictions_stay_spooled(tmp_path, mosquitto, mqtt_recorder,
                                                                            line_model):
    # given a broker whose ACL lets visiond write its statuses but not predictions
    acl = ("user visiond\ntopic readwrite visiond/+/status\ntopic readwrite visiond/+/status/#\n"
           "topic readwrite visiond/+/+/status\ntopic read visiond/+/cmd/#\n")
    broker = SecureBroker(mosquitto, acl=acl)
    rec = mqtt_recorder("visiond/#")
    cams = [{"name": "folder", "source": str(_folder(tmp_path, 3))}, _dead_camera()]
    d = Daemon(tmp_path, {"cameras": cams, "model": {"checkpoint": str(line_model)}, "mqtt": broker.mqtt_config()},
               env={"VISIOND_MQTT_PASSWORD": MQTT_PASSWORD})
    try:
        d.wait_http()
        rec.wait_for(lambda ms: any(m.topic == "visiond/testbox/status" and m.payload == b"online" for m in ms), 60)
        # when the predictions are published, then each is denied (reason >= 0x80), counted, and offered again
        deadline = time.monotonic() + 60
        denied = 0.0
        while time.monotonic() < deadline and denied < 6:
            metrics = d.http("/metrics")[1].decode()
            denied = metric_value(metrics, "visiond_mqtt_publish_total", result="denied")
            time.sleep(0.5)
        assert denied >= 6, metrics  # 3 predictions, each denied at least twice
        # and never counted as a success: they stay in the spool, and the plant got none
        assert metric_value(metrics, "visiond_mqtt_publish_total", result="acked") == 0
        assert metric_value(metrics, "visiond_spool_messages") == 3
        assert metric_value(metrics, "visiond_mqtt_connected") == 1
        assert rec.messages("visiond/+/+/prediction") == []
        assert "broker denied a message on visiond/testbox/folder/prediction: Not authorized" in d.stderr
        assert d.stop() == 0
    finally:
        d.close()
    # and after a clean stop the denied predictions are still on disk for when the ACL is fixed
    import sqlite3

    with sqlite3.connect(tmp_path / "spool" / "spool.sqlite3") as db:
        topics = [t for (t,) in db.execute("SELECT topic FROM messages")]
    assert topics.count("visiond/testbox/folder/prediction") == 3


def test_the_labelling_page_listens_on_127_0_0_1_by_default(tmp_path):
    # given `visiond label` started with no --bind
    (tmp_path / "dataset").mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visiond", "label", str(tmp_path / "dataset"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_port("127.0.0.1", port, 60, proc), proc.stderr.read() if proc.poll() is not None else ""
        # then it is reachable from this machine only
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
