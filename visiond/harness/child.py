"""`python -m visiond run` as a child process: the real daemon, as systemd or a shell would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import yaml
from prometheus_client.parser import text_string_to_metric_families

from visiond.harness.process import free_port


def metric_sum(text: str, name: str, **labels) -> float | None:
    """Sum of the samples of `name` in a /metrics text whose labels include `labels`; None if there are none."""
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == str(v) for k, v in labels.items()):
                total = (total or 0.0) + sample.value
    return total


class DaemonProcess:
    """The daemon on a config written from a dict into `workdir`, its stderr kept in `workdir/visiond.stderr`.

    The config gets a free metrics port and a spool in `workdir` unless it names
    its own, so a child never touches the system's. `wrap` is a command the daemon
    runs inside (`unshare ... sh -c '...' sh`), `env` adds to the environment.
    """

    def __init__(self, workdir: Path, cfg: dict, *, env: dict | None = None, wrap: list[str] | None = None,
                 cwd: Path | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        web = "metrics" if "metrics" in cfg and "http" not in cfg else "http"  # an old config keeps its section
        self.metrics_port = cfg.setdefault(web, {}).setdefault("port", free_port())
        cfg.setdefault("spool", {"dir": str(workdir / "spool")})
        self.config = workdir / "visiond.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.stderr_path = workdir / "visiond.stderr"
        self._stderr = open(self.stderr_path, "wb")
        command = [*(wrap or []), sys.executable, "-m", "visiond", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr, cwd=cwd,
                                     env=dict(os.environ, **(env or {})))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        """The exit code; a daemon still running after `timeout` dumps its threads' stacks, is killed, and raises."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError(f"visiond did not exit within {timeout:g} s; stderr:\n{self.stderr[-8000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """SIGTERM (the clean stop) and its exit code."""
        if self.proc.poll() is None:
            self.send(sig)
        return self.wait(timeout)

    def close(self) -> None:
        """SIGKILL if still running (teardown), and close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()

    def http(self, path: str) -> tuple[int, bytes]:
        """GET on the metrics port: (status, body); OSError while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str, **labels) -> float | None:
        """The current value summed over matching series; None while /metrics does not answer or has none."""
        try:
            return metric_sum(self.http("/metrics")[1].decode(), name, **labels)
        except OSError:
            return None

    def until(self, condition: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> float:
        """Seconds until `condition()` held; RuntimeError with the log if the daemon exits, TimeoutError if slow."""
        start = time.monotonic()
        while not condition():
            if self.proc.poll() is not None:
                raise RuntimeError(f"visiond exited with {self.proc.returncode} while waiting for {what}:\n"
                                   f"{self.stderr[-3000:]}")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{what}: not within {timeout:g} s\n{self.stderr[-3000:]}")
            time.sleep(every)
        return time.monotonic() - start

    def wait_http(self, timeout: float = 60) -> None:
        """Until /metrics answers: the daemon is up (config loaded, model on its device)."""
        self.until(self._answers, timeout, "/metrics to answer", every=0.2)

    def _answers(self) -> bool:
        try:
            self.http("/metrics")
            return True
        except OSError:
            return False
