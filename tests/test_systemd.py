"""systemd/visiond.service: it verifies cleanly, its exposure stays low, and its syscall filter lets visiond run.

`systemd-analyze verify` checks that ExecStart names an executable. The unit names the
production path (/opt/visiond/venv/bin/visiond), absent here, so verify runs on a copy whose
ExecStart points at this checkout's venv; nothing else in the copy changes.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from conftest import free_port, require_binary

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "visiond.service"
PRODUCTION_EXEC = "/opt/visiond/venv/bin/visiond"
MAX_EXPOSURE = 2.5


def _settings(unit: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the unit (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_unit_runs_visiond_as_promised():
    s = _settings(UNIT)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [f"{PRODUCTION_EXEC} run --config /etc/visiond/visiond.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30"] and s["Restart"] == ["on-failure"] and s["TimeoutStopSec"] == ["20"]
    assert s["DynamicUser"] == ["yes"] and s["StateDirectory"] == ["visiond"]
    assert s["ConfigurationDirectory"] == ["visiond"] and s["SupplementaryGroups"] == ["video"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"] and s["PrivateTmp"] == ["yes"]
    assert s["DevicePolicy"] == ["closed"] and s["DeviceAllow"] == ["char-video4linux rw"]
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert s["UnsetEnvironment"] == ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    assert "@system-service" in s["SystemCallFilter"]


def test_systemd_analyze_verify_is_silent(tmp_path):
    # given the unit, with ExecStart pointing at this checkout's visiond (verify wants an executable)
    analyze = require_binary("systemd-analyze", "systemd")
    local = Path(sys.executable).parent / "visiond"
    assert local.is_file(), f"{local} missing: pip install -e . in the venv"
    text = UNIT.read_text()
    assert PRODUCTION_EXEC in text
    copy = tmp_path / "visiond.service"
    copy.write_text(text.replace(PRODUCTION_EXEC, str(local)))
    # when systemd checks it (no man pages here: --man=no)
    res = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    # then it has nothing to say
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res


def test_systemd_analyze_security_exposure_is_below_2_5():
    analyze = require_binary("systemd-analyze", "systemd")
    res = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True,
                         text=True, timeout=60)
    found = re.search(r"Overall exposure level for visiond\.service: (\d+(?:\.\d+)?)", res.stdout)
    assert found, res.stdout[-2000:] + res.stderr[-2000:]
    assert float(found.group(1)) < MAX_EXPOSURE, res.stdout


def _expand(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a `@group`, nested groups included."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    text = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True, check=True,
                          timeout=30).stdout
    calls: set[str] = set()
    for line in text.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        calls |= _expand(analyze, name, seen) if name.startswith("@") else {name}
    return calls


def _allowed_by_unit(analyze: str) -> set[str]:
    allowed: set[str] = set()
    for rule in _settings(UNIT)["SystemCallFilter"]:
        deny = rule.startswith("~")
        names = set()
        for item in rule.lstrip("~").split():
            names |= _expand(analyze, item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_every_system_call_visiond_makes_passes_the_units_filter(tmp_path, mosquitto, line_model):
    # given visiond under strace: a folder camera, a camera that never answers, the broker, the audit trail
    analyze = require_binary("systemd-analyze", "systemd")
    strace = require_binary("strace", "strace")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    cfg = {"node": "testbox", "cameras": [{"name": "f", "source": str(folder)},
                                          {"name": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/x",
                                           "open_timeout_s": 1}],
           "model": {"checkpoint": str(line_model)}, "spool": {"dir": str(tmp_path / "spool")},
           "mqtt": {"host": mosquitto.host, "port": mosquitto.port}, "jsonl": {"path": str(tmp_path / "v.jsonl")},
           "metrics": {"port": free_port()}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    trace = tmp_path / "trace"
    stderr = open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen([strace, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "visiond", "run",
                             "--config", str(tmp_path / "c.yaml")], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # when it has started, classified the folder and served /metrics, then stops on SIGTERM
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "v.jsonl").exists() and len((tmp_path / "v.jsonl").read_text().splitlines()) == 5:
                break
            time.sleep(0.5)
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{cfg['metrics']['port']}/metrics", timeout=10).read()
        time.sleep(2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:  # strace's child: visiond itself
            subprocess.run(["kill", "-TERM", pid], check=False)
        assert proc.wait(60) == 0, (tmp_path / "stderr").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        stderr.close()
    used = set(re.findall(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)[( ]", trace.read_text(), re.M))
    assert {"openat", "sendto", "fdatasync"} <= used, sorted(used)  # the trace saw real work
    # then every call it made is one the unit allows: none would fail with EPERM under systemd
    # (sqlite calls fchown only when running as root, which DynamicUser never is)
    refused = used - _allowed_by_unit(analyze) - {"fchown"}
    assert not refused, f"the unit's SystemCallFilter would refuse {sorted(refused)}"
