"""Predictions and events out over MQTT v5, commands in (DESIGN.md, "MQTT").

Everything outgoing goes through the on-disk `Spool` first and leaves it only
on a successful PUBACK (QoS 1/2) or once written to the socket (QoS 0), so a
broker outage or a restart loses nothing below the spool bound. Delivery is
at-least-once: a resend after a reconnect carries the same seq and id.

One thread owns the paho client and runs its own select() loop over the client
socket and a wakeup socketpair, so `submit` (inference thread) only hands the
batch to the spool writer: a prediction leaves within microseconds, and no
other thread ever touches the network or paho. Once a batch is committed the
writer hands the stored messages to this thread in memory; the spool is read
back only when that stream has a gap (after a reconnect, a restart, a denial
or an eviction), and acknowledged messages leave the spool in the writer's
next transaction, so in steady state this thread never waits on the disk.

Retained state (`status` with its last will, `status/detail`, `<camera>/status`)
is kept here and re-published after every reconnect; topics and payloads are
built in `payloads.py`.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import random
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from visiond import __version__
from visiond.config import MqttConfig
from visiond.frames import Prediction
from visiond.serve.metrics import Metrics
from visiond.serve.sinks.payloads import (
    Topics,
    build_event,
    build_prediction,
    build_shadow,
    camera_status_payload,
    recipe_payload,
    status_detail_payload,
)
from visiond.serve.sinks.spool import Spool, SpooledMessage, SpoolWriter

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024  # a command is a small JSON object; more is refused before any handler sees it

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0  # retry of a denied publish
_RECONNECT_MAX_S = 5.0  # a returning broker is reached within ~5 s; jitter keeps a fleet out of lockstep
_STABLE_CONNECTION_S = 10.0  # a connection that lasted this long resets the reconnect backoff
_OFFLINE_ACK_S = 2.0  # at stop, how long the retained `offline` may wait for its ack
_MAX_PEEK = 512
_FRESH_MAX = 8192  # committed messages handed over in memory; beyond, the spool is read back instead
_ACK_FLUSH_N = 512  # acknowledged seqs are deleted in groups: this many, or
_ACK_FLUSH_S = 0.05  # this long after the first of them


# ---------------------------------------------------------------- requests


class Request:
    """MQTT 5 request/response of one command: where the answer goes and what it carries back."""

    __slots__ = ("response_topic", "correlation")

    MAX_TOPIC = 1024

    def __init__(self, response_topic: str | None = None, correlation: bytes | None = None):
        self.response_topic = response_topic
        self.correlation = correlation

    @classmethod
    def of(cls, message) -> Request:
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        return cls(topic or None, bytes(corr) if corr else None)

    def problem(self) -> str | None:
        """Why the Response Topic cannot be answered on (None when it can, or when there is none)."""
        t = self.response_topic
        if t is None:
            return None
        if len(t.encode()) > self.MAX_TOPIC or any(c in t for c in "+#\0") or not t.strip("/"):
            return f"response topic {t[:64]!r}: expected a topic name without wildcards, at most {self.MAX_TOPIC} bytes"
        return None


def _const(payload: bytes):
    return lambda _seq: payload


# ---------------------------------------------------------------- the sink


class MqttSink:
    """Delivers spooled messages to the broker from one thread; see the module docstring."""

    def __init__(
        self,
        cfg: MqttConfig,
        node: str,
        spool: Spool,
        metrics: Metrics,
        on_command: Callable[[str, bytes, "Request"], None] | None = None,
    ):
        self._cfg = cfg
        self._node = node
        self._spool = spool
        self._metrics = metrics
        self._on_command = on_command
        self.topics = Topics(cfg.topic_prefix, node)
        self._where = f"{cfg.host}:{cfg.port}"
        self._count_acked = metrics.mqtt_publish.labels(result="acked")
        self._count_failed = metrics.mqtt_publish.labels(result="failed")
        self._count_denied = metrics.mqtt_publish.labels(result="denied")
        self._latency: dict[str, Any] = {}

        # Retained state, written by any thread under _lock, published by the MQTT thread.
        self._lock = threading.Lock()
        self._retained: dict[str, bytes | None] = {self.topics.status: b"online", self.topics.status_detail: None}
        self._detail: dict[str, Any] = {"node": node, "visiond": __version__}
        self._dirty: set[str] = set()

        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._writer = SpoolWriter(spool, on_written=self._written, on_failed=self._count_failed.inc)
        self._fresh: collections.deque[SpooledMessage] = collections.deque()  # committed, in seq order
        self._stop_deadline: float | None = None
        self._error: BaseException | None = None
        self._connected = False

        # Delivery state: the MQTT thread only.
        self._inflight: dict[int, SpooledMessage] = {}  # mid -> message
        self._inflight_seqs: set[int] = set()
        self._status_mids: dict[int, str] = {}  # mid -> retained topic
        self._acked: list[int] = []  # delivered, not yet deleted (deleted in batches)
        self._acked_since = 0.0  # monotonic time of the oldest seq in _acked
        self._cursor = 0  # highest seq handed to paho on this connection
        self._window = cfg.max_inflight
        self._rewind_at: float | None = None  # when denied messages get their retry
        self._deny_delay = _BACKOFF_MIN_S  # grows while denials repeat; back to the shortest once all got through
        self._denied_seqs: set[int] = set()  # denied and not yet delivered
        self._evicted = False  # the writer evicted rows since the denied seqs were last checked against the spool
        self._denials_logged: set[tuple[str, int]] = set()
        self._backoff = _BACKOFF_MIN_S
        self._next_attempt = 0.0
        self._failures = 0
        self._connected_at = 0.0
        self._last_inbound = 0.0
        self._setup_pending = False
        self._offline_mid: int | None = None  # at stop: the retained `offline` in flight
        self._offline_done = False
        self._offline_until = 0.0
        self._closing = False  # our own DISCONNECT is under way
        self._next_gauges = 0.0
        self.last_loop = time.monotonic()  # the MQTT loop's heartbeat (daemon liveness)

    def _make_client(self) -> paho.Client:
        """Configure everything up front so a bad TLS file fails in the caller, not in the thread."""
        cfg = self._cfg
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"visiond-{self._node}",
            protocol=paho.MQTTv5,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls is not None:
            tls = cfg.tls
            client.tls_set(
                ca_certs=str(tls.ca) if tls.ca else None,
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(tls.insecure)
        client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        client.max_inflight_messages_set(0)  # the window is ours (it also honours the broker's Receive Maximum)
        client.connect_timeout = min(5.0, float(cfg.keepalive_s))
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    # ------------------------------------------------------------ public API (any thread)

    def start(self) -> None:
        """Start the MQTT thread; returns at once, the broker may well be away."""
        self._metrics.mqtt_connected.set(0)
        self._writer.start()
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected

    def alive(self) -> bool:
        """False once a thread of the sink has ended (after stop, or from a bug: see `error`)."""
        return self._thread.is_alive() and self._writer.alive()

    @property
    def spool_write_started(self) -> float:
        """Monotonic start of the spool write in progress (0.0 when none): a hung disk shows here."""
        return self._writer.busy_since

    @property
    def error(self) -> BaseException | None:
        """The exception that killed the MQTT thread, if one did."""
        return self._error

    def submit(self, predictions: Sequence[Prediction]) -> None:
        """Spool a batch (one transaction) and wake the MQTT thread; never touches the network."""
        if not predictions:
            return
        topic, node, qos = self.topics.prediction, self._node, self._cfg.qos
        self._spool_items([
            (topic(p.frame.camera), functools.partial(build_prediction, p, node), qos, p.frame.captured_at, p.frame.camera)
            for p in predictions
        ])

    def submit_event(self, camera: str, event: Mapping[str, Any]) -> None:
        """Spool one event: kind, at (wall seconds), label, score, model."""
        event = dict(event)  # its payload is built later, on the spool writer's thread
        missing = sorted(k for k in ("kind", "at", "label", "score", "model") if event.get(k) is None)
        if missing:
            raise ValueError(f"event for {camera!r} lacks {missing}")
        build = functools.partial(build_event, camera, event, self._node)
        self._spool_items([(self.topics.event(camera), build, self._cfg.qos, float(event["at"]), camera, "event")])

    def submit_shadow(self, camera: str, report: Mapping[str, Any]) -> None:
        """Spool one shadow-mode comparison (its own gapless seq stream, like events)."""
        build = functools.partial(build_shadow, camera, dict(report), self._node)
        self._spool_items([(self.topics.shadow(camera), build, self._cfg.qos, time.time(), camera, "shadow")])

    def submit_inspection(self, camera: str, payload: bytes) -> None:
        """Spool one verdict (built and numbered by the results store) for `<camera>/inspection`."""
        self._spool_items([(self.topics.inspection(camera), _const(payload), max(1, self._cfg.qos), time.time(),
                            camera, None)])

    def submit_reply(self, request: "Request", payload: bytes, camera: str = "") -> None:
        """Spool the answer to a request's MQTT 5 Response Topic, with its Correlation Data."""
        if request.response_topic is None:
            return
        self._spool_items([(request.response_topic, _const(payload), 1, time.time(), camera, None,
                            request.correlation)])

    def set_ready(self, camera: str, state: str) -> None:
        """Retained `<camera>/ready`: ready | busy | error."""
        self._set_retained(self.topics.ready(camera), state.encode())

    def set_recipe(self, name: str | None, models: Mapping[str, Any]) -> None:
        """Retained `recipe`: the recipe in service and its models."""
        self._set_retained(self.topics.recipe, recipe_payload(name, models, time.time()))

    def set_camera_status(self, camera: str, online: bool, reason: str) -> None:
        """Retained JSON on `<camera>/status`: {"state": "online"|"offline", "reason", "at"}."""
        self._set_retained(self.topics.camera_status(camera), camera_status_payload(online, reason, time.time()))

    def set_detail(self, detail: Mapping[str, Any]) -> None:
        """Merge keys into the retained JSON on `status/detail` (model, last_error, ...)."""
        with self._lock:
            self._detail.update(detail)
        self._set_retained(self.topics.status_detail, None)  # built when published

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Deliver what is spooled (up to the timeout), publish retained `offline`, disconnect cleanly.

        What is not acknowledged by then stays in the spool for the next start.
        The broker sees a normal DISCONNECT, so it does not send the last will.
        """
        self._writer.stop(timeout=drain_timeout_s + 5.0)  # every submitted message reaches the spool first
        if self._thread.ident is not None and self._thread.is_alive():
            self._stop_deadline = time.monotonic() + drain_timeout_s
            self._wake()
            self._thread.join(drain_timeout_s + _OFFLINE_ACK_S + self._client.connect_timeout + 2.0)
            if self._thread.is_alive():
                log.error("MQTT thread did not stop in time; leaving it (daemon thread)")
                return
        self._metrics.mqtt_connected.set(0)
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------ helpers for any thread

    def _spool_items(self, items: list) -> None:
        """Hand over to the group-commit writer; the caller never waits on fsync."""
        if self._writer.alive():
            self._writer.put(items)
            return
        try:  # before start() / after stop(): write through
            self._spool.append(items)
        except Exception:
            self._count_failed.inc(len(items))
            log.exception("could not spool %d message(s); they are lost (counted as failed)", len(items))
            return
        self._wake()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted message is in the spool (fsync'd)."""
        return self._writer.flush(timeout)

    def _set_retained(self, topic: str, payload: bytes | None) -> None:
        with self._lock:
            self._retained[topic] = payload
            self._dirty.add(topic)
        self._wake()

    def _written(self, messages: list[SpooledMessage], evicted: int) -> None:
        """The writer committed `messages` (seq order): hand them to the MQTT thread in memory, unless the bound
        evicted rows (then what is in memory may be gone from the spool: the spool is read back instead)."""
        fresh = self._fresh
        if evicted:
            self._evicted = True  # (one assignment: no lock) denied rows may be among them
            fresh.clear()
        elif self._connected and len(fresh) + len(messages) <= _FRESH_MAX:
            fresh.extend(messages)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or stopped

    # ------------------------------------------------------------ the MQTT thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug: make it visible instead of hanging silently
            self._error = exc
            log.critical("MQTT thread died; nothing is delivered until restart", exc_info=True)
        finally:
            self._set_connected(False)
            sock = self._client.socket()
            if sock is not None:
                sock.close()

    def _serve(self) -> None:
        while True:
            now = self.last_loop = time.monotonic()
            self._update_gauges(now)
            stopping = self._stop_deadline is not None
            if self._client.socket() is None:
                if stopping and (now >= self._stop_deadline or self._nothing_to_deliver()):
                    return
                if now >= self._next_attempt:
                    self._attempt_connect()
                else:
                    wake_at = min(self._next_attempt, self._stop_deadline or self._next_attempt, now + 1.0)
                    self._wait(wake_at - now)
                continue
            self._io_step()
            if self._connected:
                self._pump()
                if stopping and self._stop_step():
                    return
            elif stopping and time.monotonic() >= self._stop_deadline:
                return  # still waiting for CONNACK at the deadline; the will covers us

    def _wait(self, timeout: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], max(0.0, timeout))
        if readable:
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _io_step(self) -> None:
        """One select() over the client socket and the wakeup; paho does the protocol."""
        client = self._client
        sock = client.socket()
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes select can't see
        buffered = bool(pending and pending())
        timeout = 0.0 if buffered else self._select_timeout()
        wlist = [sock] if client.want_write() else []
        readable, _, _ = select.select([sock, self._wake_r], wlist, [], timeout)
        if self._wake_r in readable:
            self._drain_wake()
        if sock in readable or buffered:
            self._last_inbound = time.monotonic()
            client.loop_read()
        if client.socket() is not None and client.want_write():
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()
            self._watchdog()

    def _select_timeout(self) -> float:
        """Short enough for paho's keepalive and for our deadlines (retry of denied, stop)."""
        timeout = min(1.0, self._cfg.keepalive_s / 4)
        if self._rewind_at is not None:
            timeout = min(timeout, max(0.01, self._rewind_at - time.monotonic()))
        if self._acked:
            timeout = min(timeout, max(0.001, self._acked_since + _ACK_FLUSH_S - time.monotonic()))
        if self._stop_deadline is not None:
            timeout = min(timeout, 0.05)  # stopping: check drain, deadline and the offline ack often
        return timeout

    def _watchdog(self) -> None:
        """Drop a connection whose broker has been silent for 1.5 x keepalive.

        paho alone notices only after 2 x keepalive (one to send the ping, one to
        give up on it). A healthy broker answers our ping within keepalive, so
        silence beyond 1.5 x means it is frozen. Shutting the socket down makes
        paho see end-of-stream and take its usual connection-lost path.
        """
        if self._connected and time.monotonic() - self._last_inbound > 1.5 * self._cfg.keepalive_s:
            log.warning("broker %s silent for %.1f s (keepalive %d s); dropping the connection",
                        self._where, time.monotonic() - self._last_inbound, self._cfg.keepalive_s)
            try:
                self._client.socket().shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ connecting

    def _attempt_connect(self) -> None:
        self._reset_session()
        try:
            self._client.reconnect()  # TCP (+TLS) connect, bounded by connect_timeout, then CONNECT
        except OSError as exc:  # refused, unreachable, timeout, DNS, TLS handshake
            self._failures += 1
            if self._failures == 1 or self._failures % 20 == 0:
                log.warning("cannot reach broker %s (%s: %s; attempt %d); messages wait in the spool",
                            self._where, type(exc).__name__, exc, self._failures)
            self._schedule_retry()
            return
        self._last_inbound = time.monotonic()

    def _reset_session(self) -> None:
        """Forget the last connection's in-flight state: the spool is the truth, resend from it."""
        self._client.drop_out_messages()
        if self._inflight:
            self._count_failed.inc(len(self._inflight))
        self._inflight.clear()
        self._inflight_seqs.clear()
        self._status_mids.clear()
        self._fresh.clear()  # resent from the spool, from the start
        self._flush_acked(force=True)
        if self._writer.alive():
            self._writer.flush(1.0)  # delivered rows gone before the spool is read again: no needless resend
        self._spool.release()  # nothing is in flight any more: all rows are evictable again
        self._cursor = 0
        self._offline_mid = None
        self._offline_done = False

    def _schedule_retry(self) -> None:
        """Capped exponential backoff with jitter, so a fleet doesn't reconnect in lockstep."""
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2, _RECONNECT_MAX_S)
        self._next_attempt = time.monotonic() + delay

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # paho then closes the socket and calls _on_disconnect
            self._failures += 1
            log.error("broker %s refused the connection: %s (attempt %d); retrying with backoff",
                      self._where, reason_code, self._failures)
            return
        if self._failures:
            log.info("connected to broker %s after %d failed attempt(s)", self._where, self._failures)
        else:
            log.info("connected to broker %s", self._where)
        self._failures = 0
        self._connected_at = time.monotonic()
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        self._window = min(self._cfg.max_inflight, receive_max or 65535)
        self._setup_pending = True
        self._set_connected(True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected
        self._set_connected(False)
        if self._closing:
            return  # our own clean disconnect at stop
        if was_connected:
            log.warning("lost broker %s (%s); messages wait in the spool", self._where, reason_code)
            if time.monotonic() - self._connected_at >= _STABLE_CONNECTION_S:
                self._backoff = _BACKOFF_MIN_S
        self._schedule_retry()

    def _set_connected(self, value: bool) -> None:
        self._connected = value
        self._metrics.mqtt_connected.set(1 if value else 0)

    def _setup_session(self) -> None:
        """After each CONNACK: commands in, and every retained state re-published."""
        self._client.subscribe(self.topics.cmd_filter, options=SubscribeOptions(qos=1, noLocal=True))
        with self._lock:
            self._dirty.update(self._retained)
        self._setup_pending = False

    # ------------------------------------------------------------ delivery

    def _pump(self) -> None:
        self._flush_acked(force=self._stop_deadline is not None)
        if self._setup_pending:
            self._setup_session()
        if self._dirty:
            self._publish_retained()
        if self._rewind_at is not None and time.monotonic() >= self._rewind_at:
            self._rewind_at = None
            self._cursor = 0  # re-offer what was denied; in-flight ones are skipped
        self._fill_window()

    def _flush_acked(self, force: bool = False) -> None:
        """Delete what the broker acknowledged, in groups: with the spool writer's next transaction while it
        runs (this thread never waits on the disk), directly once it has stopped."""
        acked = self._acked
        if not acked:
            return
        if not force and len(acked) < _ACK_FLUSH_N and time.monotonic() - self._acked_since < _ACK_FLUSH_S:
            return
        self._acked = []
        if not self._writer.delete(acked):
            self._spool.delete(acked)

    def _publish_retained(self) -> None:
        with self._lock:
            todo = [(t, p) for t, p in self._retained.items() if t in self._dirty]
            self._dirty.clear()
            detail = dict(self._detail)
        for topic, payload in todo:
            if payload is None:  # status/detail: built now, from the merged dict
                payload = status_detail_payload(detail, time.time())
            info = self._client.publish(topic, payload, qos=1, retain=True)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                with self._lock:
                    self._dirty.add(topic)  # connection went away; republished after the next CONNACK
                return
            self._status_mids[info.mid] = topic

    def _fill_window(self) -> None:
        """Hand spooled messages to paho in seq order while the in-flight window has room: from memory while what
        the writer handed over follows the cursor without a gap, else read back from the spool."""
        free = self._window - len(self._inflight) - len(self._status_mids)
        while free > 0:
            batch = self._take_fresh(free) or self._read_spool(free)
            if not batch:
                return
            for msg in batch:
                self._cursor = msg.seq
                if msg.seq in self._inflight_seqs:
                    continue
                if not self._send(msg):
                    return
                free -= 1
                if free == 0:
                    return

    def _take_fresh(self, n: int) -> list[SpooledMessage]:
        """Up to `n` of the messages the writer handed over that follow the cursor without a gap."""
        fresh, out, nxt = self._fresh, [], self._cursor + 1
        while fresh and len(out) < n:
            seq = fresh[0].seq
            if seq > nxt:
                break  # a gap: the spool has what comes first
            msg = fresh.popleft()
            if seq == nxt:  # (one below it was already sent from the spool: dropped)
                out.append(msg)
                nxt += 1
        return out

    def _read_spool(self, free: int) -> list[SpooledMessage]:
        """The next committed messages after the cursor, read back from the spool."""
        last = self._spool.last_seq  # read before peek: rows up to it are committed
        if self._cursor >= last:
            return []
        batch = self._spool.peek(self._cursor, min(free + len(self._inflight_seqs), _MAX_PEEK))
        if not batch:
            self._cursor = last
        return batch

    def _send(self, msg: SpooledMessage) -> bool:
        """Publish one message; False when the connection is gone."""
        try:
            props = None
            if msg.correlation is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = msg.correlation
            info = self._client.publish(msg.topic, msg.payload, qos=msg.qos, properties=props)
        except ValueError:  # can never succeed (bad topic, too large): drop it loudly, don't block the rest
            log.exception("dropping spooled message seq %d on %s: the client refuses it", msg.seq, msg.topic)
            self._count_failed.inc()
            self._acked.append(msg.seq)
            return True
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self._spool.hold(msg.seq)  # handed to the broker: evicted last, until its delete or a lost connection
        if msg.qos == 0 and info.is_published():  # written at once; on_publish fired before we knew the mid
            self._delivered(msg)
        else:
            self._inflight[info.mid] = msg
            self._inflight_seqs.add(msg.seq)
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid == self._offline_mid:
            if reason_code.is_failure:
                log.error("broker refused the retained offline status: %s", reason_code)
            self._offline_done = True
            return
        topic = self._status_mids.pop(mid, None)
        if topic is not None:
            if reason_code.is_failure:
                log.warning("broker refused retained %s: %s", topic, reason_code)
            return
        msg = self._inflight.pop(mid, None)
        if msg is None:
            return
        self._inflight_seqs.discard(msg.seq)
        if reason_code.is_failure:
            self._denied(msg, reason_code)
        else:
            self._delivered(msg)

    def _delivered(self, msg: SpooledMessage) -> None:
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append(msg.seq)  # still held (see _send) until _flush_acked deletes it
        self._spool.delivered(msg.seq)  # ... and the first to go if the bound needs room before that
        if self._denied_seqs:
            self._denied_seqs.discard(msg.seq)
            if not self._denied_seqs:  # every denied message got through: a new denial starts the delays afresh
                self._deny_delay = _BACKOFF_MIN_S
        self._count_acked.inc()
        if not msg.topic.endswith("/prediction"):
            return  # the latency histogram is capture -> ack of verdicts
        child = self._latency.get(msg.camera)
        if child is None:
            child = self._latency[msg.camera] = self._metrics.latency.labels(camera=msg.camera)
        child.observe(max(0.0, time.time() - msg.captured_at))

    def _denied(self, msg: SpooledMessage, reason_code) -> None:
        """Keep it spooled and offer it again later; a denial is never a success."""
        self._spool.release([msg.seq])
        if self._evicted and self._denied_seqs:
            # denied rows the bound evicted will never get through: without them, the episode may be over
            self._evicted = False
            self._denied_seqs &= self._spool.present(self._denied_seqs)
            if not self._denied_seqs:
                self._deny_delay, self._rewind_at = _BACKOFF_MIN_S, None
        self._denied_seqs.add(msg.seq)
        self._count_denied.inc()
        key = (msg.topic, reason_code.value)
        if key not in self._denials_logged and len(self._denials_logged) < 1000:
            self._denials_logged.add(key)
            log.error("broker denied a message on %s: %s; it stays in the spool and is retried", msg.topic, reason_code)
        if self._rewind_at is None:
            self._rewind_at = time.monotonic() + self._deny_delay
            self._deny_delay = min(self._deny_delay * 2, _BACKOFF_MAX_S)

    # ------------------------------------------------------------ commands

    def _on_message(self, client, userdata, message) -> None:
        verb = message.topic.rsplit("/", 1)[-1]
        if len(message.payload) > MAX_COMMAND_BYTES:
            error = f"command {verb!r} refused: payload of {len(message.payload)} bytes exceeds {MAX_COMMAND_BYTES}"
            log.warning("%s", error)
            self.set_detail({"last_error": error, "last_error_at": time.time()})
            request = Request.of(message)
            if request.response_topic is not None and request.problem() is None:
                self.submit_reply(request, json.dumps({"command": verb[:64], "ok": False, "error": error}).encode())
            return
        if self._on_command is None:
            log.info("command %r ignored: no handler", verb)
            return
        try:
            self._on_command(verb, bytes(message.payload), Request.of(message))
        except Exception:  # a bad command must not stop delivery
            log.exception("command %r failed", verb)

    # ------------------------------------------------------------ stopping

    def _nothing_to_deliver(self) -> bool:
        return self._spool.count() == 0 and not self._inflight and not self._acked

    def _stop_step(self) -> bool:
        """Drain, then retained `offline`, then a clean DISCONNECT; True when done."""
        now = time.monotonic()
        if self._offline_mid is None:
            drained = self._nothing_to_deliver() and not self._dirty and not self._status_mids
            if drained or now >= self._stop_deadline:
                with self._lock:
                    self._retained[self.topics.status] = b"offline"  # a reconnect now must not say online
                info = self._client.publish(self.topics.status, b"offline", qos=1, retain=True)
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._offline_mid = info.mid
                    self._offline_until = now + _OFFLINE_ACK_S
            return False
        if not self._offline_done and now < self._offline_until:
            return False
        if not self._offline_done:
            log.warning("no ack for the retained offline status within %.1f s; disconnecting anyway", _OFFLINE_ACK_S)
        self._disconnect()
        return True

    def _disconnect(self) -> None:
        """Normal DISCONNECT (reason 0): the broker drops the will."""
        client = self._client
        self._closing = True
        client.disconnect()
        end = time.monotonic() + 1.0
        while client.socket() is not None and client.want_write() and time.monotonic() < end:
            select.select([], [client.socket()], [], 0.1)
            client.loop_write()
        self._flush_acked(force=True)
        log.info("disconnected from broker %s", self._where)

    def _update_gauges(self, now: float) -> None:
        if now >= self._next_gauges:
            self._next_gauges = now + 1.0
            self._metrics.spool_messages.set(self._spool.count())
            self._metrics.spool_oldest_age.set(self._spool.oldest_age())
