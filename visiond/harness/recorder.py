"""A real MQTT subscriber: it records what a plant system would receive, and when."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Callable, NamedTuple, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Recorder:
    """Subscribes to one or more topic filters and keeps every message with its arrival time, thread-safely.

    Reconnects and resubscribes by itself (within a second), so it keeps recording
    across a broker restart; `subscriptions` counts the SUBACKs, so a caller can wait
    until it is back.
    """

    def __init__(self, host: str, port: int, topic_filter: str | Sequence[str] = "#", qos: int = 1):
        self.host, self.port, self.qos = host, port, qos
        self.topic_filters = [topic_filter] if isinstance(topic_filter, str) else list(topic_filter)
        self.subscriptions = 0
        self._messages: list[Message] = []
        self._arrivals: list[float] = []
        self._decoded: dict[int, Any] = {}  # message index -> its JSON payload, decoded once
        self._changes = 0
        self._changed = threading.Condition()
        self._error: str | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"recorder-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=1)

    def start(self, timeout: float = 10.0) -> Recorder:
        """Connect and return once the broker has acknowledged the subscription."""
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        with self._changed:
            subscribed = self._changed.wait_for(lambda: self.subscriptions or self._error, timeout)
        if not subscribed or self._error:
            self.stop()
            where = f"recorder on {self.host}:{self.port} {self.topic_filters}"
            raise RuntimeError(f"{where}: {self._error or 'no SUBACK'}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            with self._changed:
                self._error = f"connect refused: {reason_code}"
                self._changed.notify_all()
            return
        client.subscribe([(f, self.qos) for f in self.topic_filters])

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        with self._changed:
            if failures:
                self._error = f"subscribe refused: {failures}"
            else:
                self.subscriptions += 1
            self._changes += 1
            self._changed.notify_all()

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        arrived = time.time()
        with self._changed:
            self._messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._arrivals.append(arrived)
            self._changes += 1
            self._changed.notify_all()

    def count(self) -> int:
        with self._changed:
            return len(self._messages)

    def messages(self, topic_filter: str | None = None) -> list[Message]:
        """A snapshot of the messages so far, optionally only those matching an MQTT filter."""
        return [m for _, m in self.arrivals(topic_filter)]

    def arrivals(self, topic_filter: str | None = None) -> list[tuple[float, Message]]:
        """(wall-clock arrival time, message) so far: latency is arrival minus the payload's capture time."""
        with self._changed:
            snapshot = list(zip(self._arrivals, self._messages))
        if topic_filter is None:
            return snapshot
        return [(t, m) for t, m in snapshot if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def json_payloads(self, suffix: str = "") -> list[Any]:
        """Decoded JSON payloads of the messages whose topic ends with `suffix`, in arrival order.

        Each payload is decoded once, so polling a long recording stays cheap.
        """
        with self._changed:
            snapshot = list(self._messages)
        docs = []
        for i, m in enumerate(snapshot):
            if m.topic.endswith(suffix):
                if i not in self._decoded:
                    self._decoded[i] = json.loads(m.payload)
                docs.append(self._decoded[i])
        return docs

    def wait_for(self, predicate: Callable[[list[Message]], Any], timeout: float = 10.0,
                 what: str = "a match") -> list[Message]:
        """The messages once `predicate(messages)` is truthy; TimeoutError naming what arrived if it stays false.

        The predicate runs outside the lock, on each change and at least every half second.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen, snapshot = self._changes, list(self._messages)
            if predicate(snapshot):
                return snapshot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = [(m.topic, m.payload[:80]) for m in snapshot[-10:]]
                raise TimeoutError(f"{what}: not within {timeout:g} s; {len(snapshot)} messages, last: {last}")
            with self._changed:
                if self._changes == seen:
                    self._changed.wait(min(remaining, 0.5))
