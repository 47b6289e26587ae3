"""A real MQTT subscriber for tests: it records what a plant system would receive."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class MqttRecorder:
    """Subscribes to ``topic_filter`` on a broker and keeps every message, thread-safely.

    Reconnects and resubscribes by itself, so it keeps recording across a broker restart.
    """

    def __init__(self, host: str, port: int, topic_filter: str = "#", qos: int = 1):
        self.host, self.port, self.topic_filter, self.qos = host, port, topic_filter, qos
        self._messages: list[Message] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._error: str | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)

    def start(self, timeout: float = 10.0) -> MqttRecorder:
        """Connect and return once the broker has acknowledged the subscription."""
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout) or self._error:
            self.stop()
            where = f"MqttRecorder on {self.host}:{self.port} {self.topic_filter!r}"
            raise RuntimeError(f"{where}: {self._error or 'no SUBACK'}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttRecorder:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            self._error = f"connect refused: {reason_code}"
            self._subscribed.set()
            return
        client.subscribe(self.topic_filter, qos=self.qos)

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties) -> None:
        failures = [str(code) for code in reason_codes if code.is_failure]
        if failures:
            self._error = f"subscribe refused: {failures}"
        self._subscribed.set()

    def _on_message(self, _client, _userdata, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            self._messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._changed.notify_all()

    def messages(self, topic_filter: str | None = None) -> list[Message]:
        """A snapshot of the messages so far, optionally only those matching an MQTT filter."""
        with self._changed:
            snapshot = list(self._messages)
        if topic_filter is None:
            return snapshot
        return [m for m in snapshot if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def json_payloads(self, suffix: str) -> list[Any]:
        """Decoded JSON payloads of the messages whose topic ends with ``suffix``."""
        return [json.loads(m.payload) for m in self.messages() if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Callable[[list[Message]], Any], timeout: float = 10.0) -> list[Message]:
        """Block until ``predicate(messages)`` is truthy; fail the test with what arrived if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._messages)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self._messages[-10:]]
                    raise AssertionError(f"no match within {timeout}s; {len(self._messages)} messages, last: {seen}")
                self._changed.wait(remaining)
            return list(self._messages)
