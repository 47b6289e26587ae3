"""Honest liveness for systemd: which stage died, which one stalls, and a one-line status.

The daemon pings the watchdog only while capture, inference and publishing all
make progress, so systemd restarts a hung visiond (WatchdogSec in the unit).
What counts as progress:

- inference: the worker's loop turned within INFERENCE_STALL_S (it turns at
  least every 0.25 s when idle, so only a batch or a sink stuck in a call
  exceeds it: a hung disk under the spool, a wedged device);
- publishing: the MQTT thread is alive and its loop turned within
  PUBLISH_STALL_S (CONNECT_STALL_S while it is not connected: DNS, TCP connect
  and TLS handshake block the thread by design, each with its own timeout),
  and no spool write (the writer thread's fsync'd commit) is older than
  PUBLISH_STALL_S: nothing is persisted while it hangs;
- capture: no camera's thread sits inside one open or read far past the
  timeout it was given. FFmpeg and V4L2 honour their timeouts, so a dead or
  stalled camera times out, reconnects with backoff and keeps the pings going
  (restarting would not bring it back); a call past its timeout plus
  CAPTURE_GRACE_S is a wedged driver or file system that only a restart clears.
"""

from __future__ import annotations

import time
from typing import Protocol, Sequence

INFERENCE_STALL_S = 10.0
PUBLISH_STALL_S = 10.0
CONNECT_STALL_S = 60.0
CAPTURE_GRACE_S = 10.0


class _Source(Protocol):
    camera: str
    error: BaseException | None

    def blocked(self, now: float) -> tuple[str, float, float] | None: ...


def dead_stage(worker, mqtt, sources: Sequence[_Source]) -> str | None:
    """One line naming a stage thread killed by an exception; None while none is.

    Sources come first: a crashed camera closes its queue, and with it the
    inference thread may end normally a moment later.
    """
    for s in sources:
        if s.error is not None:
            return f"camera {s.camera}: capture thread died ({_short(s.error)})"
    if worker.error is not None:
        return f"inference thread died ({_short(worker.error)})"
    if not mqtt.alive():
        return f"MQTT thread died ({_short(mqtt.error) if mqtt.error is not None else 'no exception recorded'})"
    return None


def stalls(worker, mqtt, sources: Sequence[_Source], now: float | None = None) -> list[str]:
    """Why the watchdog must not be pinged now (empty when every stage makes progress)."""
    now = time.monotonic() if now is None else now
    found = []
    silent = now - worker.last_progress
    if silent > INFERENCE_STALL_S:
        found.append(f"inference stalled: its loop has not turned for {silent:.0f} s")
    limit = PUBLISH_STALL_S if mqtt.connected else CONNECT_STALL_S
    silent = now - mqtt.last_loop
    if silent > limit:
        found.append(f"publishing stalled: the MQTT loop has not turned for {silent:.0f} s")
    started = mqtt.spool_write_started
    if started and now - started > PUBLISH_STALL_S:
        found.append(f"publishing stalled: a spool write has been in progress for {now - started:.0f} s")
    for s in sources:
        blocked = s.blocked(now)
        if blocked is not None and blocked[1] > blocked[2] + CAPTURE_GRACE_S:
            what, seconds, timeout = blocked
            found.append(f"capture stalled: camera {s.camera} has been inside one {what} for {seconds:.0f} s "
                         f"(its timeout is {timeout:g} s)")
    return found


def summary(worker, mqtt, spool, cameras: Sequence[str], fresh_s: float, now: float | None = None) -> str:
    """The running state in one line for `systemctl status` (STATUS=)."""
    now = time.monotonic() if now is None else now
    streaming = sum(1 for c in cameras if now - worker.last_frame.get(c, float("-inf")) <= fresh_s)
    broker = "broker connected" if mqtt.connected else "broker unreachable"
    return (f"{streaming}/{len(cameras)} camera(s) streaming, {worker.frames_done} frames classified, "
            f"{broker}, {spool.count()} spooled")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
