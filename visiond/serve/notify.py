"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET (READY=1, WATCHDOG=1, ...)."""

from __future__ import annotations

import os
import socket


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec (as systemd advises), when systemd asked for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None


def sd_notify(state: str) -> bool:
    """Send one notify message; False when not run under systemd or the send fails."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
