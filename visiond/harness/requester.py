"""A PLC's side of MQTT 5 request/response: triggers out with Response Topic and Correlation Data, verdicts back.

Used by the tests, `visiond bench --inspect` and the demo, so all three drive the
stations the way Beckhoff's PLC MQTT library or Node-RED do: one request per part,
its correlation data echoed on the answer, and a retry with the same correlation
data when no answer comes (the daemon answers a repeat from its results store).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Requester:
    """Sends `cmd/inspect` requests and collects the answers by correlation data."""

    def __init__(self, host: str, port: int, node: str, prefix: str = "visiond"):
        self.node, self.prefix = node, prefix
        self.client_id = f"plc-{uuid.uuid4().hex[:8]}"
        self.response_topic = f"plc/{self.client_id}/answers"
        self._answers: dict[bytes, list[tuple[float, Any]]] = {}
        self._sent: dict[bytes, float] = {}
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self._host, self._port = host, port

    def start(self, timeout: float = 10.0) -> Requester:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError(f"requester on {self._host}:{self._port}: no SUBACK within {timeout:g} s")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Requester:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.response_topic, qos=1)

    def _on_message(self, _client, _userdata, msg) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"unparsable": bytes(msg.payload)}
        with self._cond:
            self._answers.setdefault(bytes(corr or b""), []).append((time.monotonic(), doc))
            self._cond.notify_all()

    def inspect(self, camera: str, part_id: str, *, correlation: bytes | None = None, qos: int = 1,
                response: bool = True, **extra) -> bytes:
        """Publish one trigger; returns its correlation data (new unless given: a retry passes the old one)."""
        corr = correlation or uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        if response:
            props.ResponseTopic = self.response_topic
            props.CorrelationData = corr
        body = {"camera": camera, "part_id": part_id, **extra}
        with self._cond:
            self._sent.setdefault(corr, time.monotonic())
        self._client.publish(f"{self.prefix}/{self.node}/cmd/inspect", json.dumps(body), qos=qos, properties=props)
        return corr

    def send_raw(self, payload: bytes, correlation: bytes | None = None, verb: str = "inspect") -> bytes:
        """Any bytes as a command (malformed JSON, oversized, ...), with a response topic to hear the refusal."""
        corr = correlation or uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.response_topic
        props.CorrelationData = corr
        self._client.publish(f"{self.prefix}/{self.node}/cmd/{verb}", payload, qos=1, properties=props)
        return corr

    def answers(self, corr: bytes) -> list[Any]:
        with self._cond:
            return [doc for _, doc in self._answers.get(corr, [])]

    def answer(self, corr: bytes, timeout: float) -> Any:
        """The first answer to `corr`; TimeoutError when none comes."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._answers.get(corr):
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to correlation {corr.hex()} within {timeout:g} s")
                self._cond.wait(left)
            return self._answers[corr][0][1]

    def latency_s(self, corr: bytes) -> float | None:
        """Request sent -> first answer received, seconds."""
        with self._cond:
            got = self._answers.get(corr)
            return got[0][0] - self._sent[corr] if got and corr in self._sent else None

    def wait_all(self, corrs: list[bytes], timeout: float) -> list[bytes]:
        """Until every correlation has an answer; returns those still unanswered at the timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = [c for c in corrs if not self._answers.get(c)]
                left = end - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(min(left, 0.5))
