"""A private Mosquitto on 127.0.0.1 and a free port: tests, tools and `visiond bench` never touch port 1883."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

from visiond.harness.process import free_port, stop_process, wait_for_port


class BrokerError(RuntimeError):
    """mosquitto is missing or did not listen; the message says which and what to do."""


def find_mosquitto() -> str | None:
    """The mosquitto binary, also where Debian puts it (/usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin:/usr/bin")


class Broker:
    """One mosquitto process with its config and log in `workdir`; `stop()` then `start()` is an outage on the port.

    The config file is written once; a caller may rewrite or extend it between a
    stop and a start (ACLs, passwords, TLS listeners). Without a workdir the broker
    makes a temporary one and removes it at `close()`.
    """

    host = "127.0.0.1"

    def __init__(self, workdir: Path | None = None, *, binary: str | None = None, options: Iterable[str] = (),
                 persistence_dir: Path | None = None):
        """`options` are extra mosquitto.conf lines, written after the listener line (so listener options apply).

        `persistence_dir` keeps retained messages and sessions across a stop and a start.
        """
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto not found: install the Debian package 'mosquitto' (apt-get install mosquitto)")
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="visiond-broker-")) if workdir is None else Path(workdir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        persistence = "persistence false\n"
        if persistence_dir is not None:  # run as root, mosquitto would drop to a user that cannot write there
            persistence = f"persistence true\npersistence_location {persistence_dir}/\nuser {getpass.getuser()}\n"
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\n" + "".join(f"{line}\n" for line in options)
            + persistence + "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        )

    def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto on the config file and return once it accepts connections."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        if not wait_for_port(self.host, self.port, timeout, self.proc):
            self.stop()
            raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port}: "
                              f"{self.log.read_text(errors='replace')[-2000:]}")
        return self

    def stop(self) -> None:
        """A clean stop (SIGTERM, SIGKILL after 5 s); `start()` brings it back on the same port."""
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL: a crash that loses whatever the broker held in memory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Stop, and remove the work directory if the broker made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        try:
            return self.start()
        except BrokerError:
            self.close()
            raise

    def __exit__(self, *exc_info) -> None:
        self.close()
