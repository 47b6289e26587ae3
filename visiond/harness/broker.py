"""A throwaway Mosquitto for `visiond bench` and the demo: no torch import, nothing kept."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

from visiond.errors import UserError


def start_private_broker() -> tuple[subprocess.Popen, int]:
    """A throwaway mosquitto on a free 127.0.0.1 port (bench and demo); the caller terminates it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = Path(tempfile.mkdtemp(prefix="visiond-broker-")) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise UserError("could not start a private mosquitto; install the Debian package 'mosquitto' (or pass --broker)")
