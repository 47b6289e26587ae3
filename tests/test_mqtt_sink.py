"""The spool and the MQTT sink against a real Mosquitto (DESIGN.md, "MQTT")."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from visiond.config import MqttConfig
from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.serve.metrics import Metrics
from visiond.serve.sinks.mqtt import MAX_COMMAND_BYTES, MqttSink
from visiond.serve.sinks.payloads import Topics, event_payload, prediction_payload
from visiond.serve.sinks.spool import Spool

ROOT = Path(__file__).resolve().parents[1]
NODE = "line1-box"
MODEL = ModelRef("smallcnn", "3f9a1c")
PASSWORD = "s3cr3t-Pa55-must-not-leak"


# ---------------------------------------------------------------- helpers


def prediction(camera: str = "cam1", label: str = "ok", score: float = 0.93, captured_at: float | None = None) -> Prediction:
    frame = Frame(camera=camera, index=0, captured_at=time.time() if captured_at is None else captured_at,
                  captured_mono=time.monotonic(), image=None)
    top = ((label, score), ("scratch", round(1 - score, 3)))
    return Prediction(frame, label, score, top, label == "scratch", MODEL, Timings(0.0021, 0.0034, 0.0061))


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("visiond").joinpath("schemas", name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def publish_one(broker, topic: str, payload: bytes) -> None:
    """Publish like a plant system would (QoS 1, waits for the ack)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def reconfigure(broker, extra: str) -> None:
    """Restart the test's broker with more config lines (ACL, passwords, TLS)."""
    broker.stop()
    with open(broker.conf, "a") as conf:  # started as root, mosquitto would drop to a user that can't read tmp
        conf.write(f"{extra}\nuser {getpass.getuser()}\n")
    broker.start()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


@pytest.fixture
def make_sink(tmp_path, metrics):
    """A factory for started sinks on a spool in tmp_path; all are stopped at teardown."""
    made: list[tuple[MqttSink, Spool]] = []

    def make(broker=None, port: int | None = None, spool_dir: Path | None = None, max_messages: int = 1000,
             on_command=None, **cfg) -> tuple[MqttSink, Spool]:
        spool = Spool(spool_dir or tmp_path / "spool", max_messages, metrics)
        config = MqttConfig(host="127.0.0.1", port=port or broker.port, **cfg)
        sink = MqttSink(config, NODE, spool, metrics, on_command=on_command)
        sink.start()
        made.append((sink, spool))
        return sink, spool

    yield make
    for sink, spool in made:
        sink.stop(drain_timeout_s=0.5)
        spool.close()


# ---------------------------------------------------------------- payloads and topics


def test_prediction_payload_matches_the_schema():
    # given a prediction of a defect class
    p = prediction(label="scratch", score=0.8765432198, captured_at=1_700_000_000.1234567)
    # when it becomes a message
    doc = json.loads(prediction_payload(p, 42, NODE, "0b6c4d5e-8f9a-4b1c-9d2e-3f4a5b6c7d8e"))
    # then it validates and carries exactly the contract's fields
    validator("prediction.schema.json").validate(doc)
    assert doc["captured_at"] == "2023-11-14T22:13:20.123457Z"
    assert doc["score"] == 0.876543 and doc["top"][0] == {"label": "scratch", "score": 0.876543}
    assert doc["latency_ms"] == {"queue": 2.1, "inference": 3.4, "total": 6.1}
    assert doc["model"] == {"name": "smallcnn", "version": "3f9a1c"} and doc["defect"] is True
    assert doc["seq"] == 42 and doc["node"] == NODE and doc["camera"] == "cam1"


def test_schema_rejects_an_unknown_field_and_a_bad_timestamp():
    doc = json.loads(prediction_payload(prediction(), 1, NODE, "0b6c4d5e-8f9a-4b1c-9d2e-3f4a5b6c7d8e"))
    with pytest.raises(jsonschema.ValidationError):
        validator("prediction.schema.json").validate({**doc, "extra": 1})
    with pytest.raises(jsonschema.ValidationError):
        validator("prediction.schema.json").validate({**doc, "captured_at": "2023-11-14 22:13:20"})


def test_event_payload_matches_the_schema():
    event = {"kind": "defect_started", "at": 1_700_000_000.5, "label": "scratch", "score": 0.91, "model": MODEL}
    doc = json.loads(event_payload("cam1", event, 7, NODE, "0b6c4d5e-8f9a-4b1c-9d2e-3f4a5b6c7d8e"))
    validator("event.schema.json").validate(doc)
    assert doc["at"] == "2023-11-14T22:13:20.500000Z" and doc["kind"] == "defect_started"


def test_topics_follow_the_contract_and_refuse_colliding_camera_names():
    t = Topics("visiond", NODE)
    assert t.status == "visiond/line1-box/status"
    assert t.status_detail == "visiond/line1-box/status/detail"
    assert t.prediction("cam1") == "visiond/line1-box/cam1/prediction"
    assert t.event("cam1") == "visiond/line1-box/cam1/event"
    assert t.camera_status("cam1") == "visiond/line1-box/cam1/status"
    assert t.cmd("reload") == "visiond/line1-box/cmd/reload" and t.cmd_filter == "visiond/line1-box/cmd/+"
    with pytest.raises(ValueError):
        t.prediction("cmd")


# ---------------------------------------------------------------- the spool


def test_seq_is_consecutive_and_continues_after_a_restart(tmp_path):
    # given a spool that handed out seqs and delivered everything
    spool = Spool(tmp_path, 100)
    first = spool.append([("t", lambda s: b"%d" % s, 1, time.time(), "cam1")] * 3)
    second = spool.append([("t", lambda s: b"%d" % s, 1, time.time(), "cam1")] * 2)
    assert first == [1, 2, 3] and second == [4, 5]
    assert [m.payload for m in spool.peek(0, 10)] == [b"1", b"2", b"3", b"4", b"5"]
    spool.delete(first + second)
    spool.close()
    # when the process restarts with an empty spool
    spool = Spool(tmp_path, 100)
    # then seq goes on where it stopped, never reusing one
    assert spool.count() == 0
    assert spool.append([("t", lambda s: b"%d" % s, 1, time.time(), "cam1")]) == [6]
    spool.close()


def test_spool_bound_drops_the_oldest_and_counts_them(tmp_path, metrics, caplog):
    # given a spool bounded to 10 messages
    spool = Spool(tmp_path, 10, metrics)
    # when 15 arrive
    with caplog.at_level(logging.WARNING, logger="visiond.serve.sinks.spool"):
        spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 8)
        spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 7)
    # then the 5 oldest are gone, counted and reported
    assert spool.count() == 10
    assert [m.seq for m in spool.peek(0, 100)] == list(range(6, 16))
    assert sample(metrics, "visiond_spool_dropped_total") == 5
    assert sample(metrics, "visiond_spool_messages") == 10
    assert "dropped the 5 oldest" in caplog.text
    spool.close()


def test_a_full_spool_evicts_messages_in_flight_last_so_drops_count_only_what_is_lost(tmp_path, metrics):
    # given a spool of 10 whose 3 oldest were handed to the broker (awaiting PUBACK)
    spool = Spool(tmp_path, 10, metrics)
    spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 10)
    for seq in (1, 2, 3):
        spool.hold(seq)
    # when 4 more arrive
    spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 4)
    # then the 4 oldest *waiting* ones go; the in-flight ones stay to be acked (and are not counted dropped)
    assert [m.seq for m in spool.peek(0, 100)] == [1, 2, 3] + list(range(8, 15))
    assert sample(metrics, "visiond_spool_dropped_total") == 4
    # when their PUBACKs delete two, and the connection is lost before the third
    spool.delete([1, 2])
    spool.release()
    spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 3)
    # then the released one is the oldest again and is the one that goes (8 + 3 = 11 rows, bound 10)
    assert [m.seq for m in spool.peek(0, 100)] == list(range(8, 18))
    assert sample(metrics, "visiond_spool_dropped_total") == 4 + 1
    spool.close()


def test_a_full_spool_makes_room_with_delivered_rows_before_dropping_a_new_one(tmp_path, metrics):
    # given a spool at its bound of 5, every row handed to the broker and acknowledged, their deletes not yet done
    spool = Spool(tmp_path, 5, metrics)
    spool.append([("t", lambda s: b"x", 1, time.time(), "cam1")] * 5)
    for seq in range(1, 6):
        spool.hold(seq)
        spool.delivered(seq)
    # when a new verdict arrives
    spool.append([("t", lambda s: b"new", 1, time.time(), "cam2")])
    # then it is kept, the delivered rows made room, and nothing counts as dropped
    assert [(m.seq, m.camera) for m in spool.peek(0, 100)] == [(6, "cam2")]
    assert spool.count() == 1 and sample(metrics, "visiond_spool_dropped_total") == 0
    # and the late deletes of the delivered rows change nothing
    assert spool.delete([1, 2, 3, 4, 5]) == 0 and spool.count() == 1
    spool.close()


def test_a_batch_is_one_transaction_and_cheap(tmp_path):
    # given a batch of 16 predictions
    spool = Spool(tmp_path, 100_000)
    items = [("visiond/n/cam1/prediction", lambda s: b"x" * 400, 1, time.time(), "cam1")] * 16
    statements: list[str] = []
    spool._db.set_trace_callback(statements.append)  # the write connection: count the commits (fsyncs)
    # when it is appended
    spool.append(items)
    # then it costs one commit, hence one fsync
    assert sum(s.strip().upper() == "COMMIT" for s in statements) == 1
    spool._db.set_trace_callback(None)
    costs = []
    for _ in range(30):
        start = time.perf_counter()
        spool.append(items)
        costs.append(time.perf_counter() - start)
    spool.close()
    # and stays in the millisecond range (loose: shared CI disks have fsync spikes; ~0.3-3 ms typical)
    assert sorted(costs)[len(costs) // 2] < 0.025


# ---------------------------------------------------------------- delivery


def test_predictions_arrive_in_seq_order_and_validate(mosquitto, mqtt_recorder, make_sink, metrics):
    # given a plant subscriber and a connected sink
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    # when two batches are submitted
    sink.submit([prediction("cam1"), prediction("cam2"), prediction("cam1")])
    sink.submit([prediction("cam2")] * 5)
    # then all arrive in seq order, valid, and leave the spool once acknowledged
    recorder.wait_for(lambda ms: len(ms) == 8)
    docs = recorder.json_payloads("/prediction")
    assert [d["seq"] for d in docs] == list(range(1, 9))
    check = validator("prediction.schema.json")
    for doc in docs:
        check.validate(doc)
    wait_until(lambda: spool.count() == 0, what="spool drained")
    assert sample(metrics, "visiond_mqtt_publish_total", result="acked") == 8
    assert sample(metrics, "visiond_latency_seconds_count", camera="cam2") == 6
    assert sample(metrics, "visiond_mqtt_connected") == 1


def test_qos0_messages_leave_the_spool_once_written(mosquitto, mqtt_recorder, make_sink):
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto, qos=0)
    wait_until(lambda: sink.connected, what="connected")
    sink.submit([prediction()] * 4)
    recorder.wait_for(lambda ms: len(ms) == 4)
    wait_until(lambda: spool.count() == 0, what="spool drained")


def test_events_go_out_on_the_event_topic_with_their_own_seq(mosquitto, mqtt_recorder, make_sink):
    recorder = mqtt_recorder("visiond/+/+/+")
    sink, _ = make_sink(mosquitto)
    # when a prediction and then the event it caused are submitted
    sink.submit([prediction("cam1", "scratch", 0.8)])
    sink.submit_event("cam1", {"kind": "defect_started", "label": "scratch", "score": 0.8,
                               "model": {"name": "smallcnn", "version": "3f9a1c"}, "at": time.time()})
    # then the event validates and counts its own seq, so predictions' seq stays gapless
    recorder.wait_for(lambda ms: any(m.topic.endswith("/event") for m in ms))
    [event] = recorder.json_payloads("/event")
    validator("event.schema.json").validate(event)
    assert event["seq"] == 1 and event["kind"] == "defect_started" and event["camera"] == "cam1"
    sink.submit([prediction("cam1", "ok", 0.9)])
    recorder.wait_for(lambda ms: len([m for m in ms if m.topic.endswith("/prediction")]) == 2)
    assert [p["seq"] for p in recorder.json_payloads("/prediction")] == [1, 2]


def test_messages_wait_while_the_broker_is_away_and_arrive_in_order_after_restart(
    mosquitto, mqtt_recorder, make_sink, tmp_path, metrics
):
    # given no broker
    mosquitto.stop()
    # when the daemon starts anyway and classifies frames
    started = time.monotonic()
    sink, spool = make_sink(mosquitto)
    assert time.monotonic() - started < 0.5, "start() must not wait for the broker"
    sink.submit([prediction("cam1")] * 3)
    sink.submit([prediction("cam2")] * 2)
    time.sleep(1.0)
    # then they wait in the spool, and the process can stop with them still there
    assert not sink.connected and sink.alive()
    assert spool.count() == 5 and sample(metrics, "visiond_spool_messages") == 5
    sink.stop(drain_timeout_s=0.3)
    spool.close()
    # when the broker is back and the daemon starts again on the same spool
    mosquitto.start()
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto, spool_dir=tmp_path / "spool")
    recorder.wait_for(lambda ms: len(ms) == 5)
    sink.submit([prediction("cam1")])
    # then everything arrives in order, and seq continues across the restart
    recorder.wait_for(lambda ms: len(ms) == 6)
    assert [d["seq"] for d in recorder.json_payloads("/prediction")] == [1, 2, 3, 4, 5, 6]
    wait_until(lambda: spool.count() == 0, what="spool drained")


def test_a_running_sink_reconnects_and_resends_after_a_broker_outage(mosquitto, mqtt_recorder, make_sink, metrics):
    # given a connected sink
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    # when the broker goes away, frames keep coming, and the broker returns
    mosquitto.stop()
    wait_until(lambda: sample(metrics, "visiond_mqtt_connected") == 0, what="connected gauge at 0")
    sink.submit([prediction()] * 4)
    time.sleep(0.3)
    assert spool.count() == 4
    mosquitto.start()
    # then the sink reconnects by itself and the broker acknowledges all of it
    wait_until(lambda: sink.connected and spool.count() == 0, timeout=40, what="reconnected and drained")
    assert sample(metrics, "visiond_mqtt_publish_total", result="acked") == 4
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink.submit([prediction()])
    recorder.wait_for(lambda ms: len(ms) == 1)
    assert [d["seq"] for d in recorder.json_payloads("/prediction")] == [5]


def test_a_connected_sink_sends_from_memory_and_reads_the_spool_back_only_after_an_outage(
    mosquitto, mqtt_recorder, make_sink, metrics
):
    # given a connected sink whose spool counts its reads and its commits
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    reads, commits = [], []
    peek = spool.peek
    spool.peek = lambda after, limit: reads.append(after) or peek(after, limit)
    spool._db.set_trace_callback(lambda s: commits.append(s) if s.strip().upper() == "COMMIT" else None)
    # when 20 batches of 8 go out
    for _ in range(20):
        sink.submit([prediction()] * 8)
    recorder.wait_for(lambda ms: len(ms) == 160)
    wait_until(lambda: spool.count() == 0, what="spool drained")
    # then none was read back from the disk (the spool stays the durable copy, written before each send),
    # and the acknowledged rows left in groups, not one transaction per message
    assert reads == []
    assert len(commits) <= 20 + 20, f"{len(commits)} commits for 20 batches"
    # when the broker goes away while frames come, and returns
    mosquitto.stop()
    wait_until(lambda: not sink.connected, what="disconnected")
    sink.submit([prediction()] * 4)
    mosquitto.start()
    # then those are read back from the spool and arrive, seq gapless
    wait_until(lambda: sink.connected and spool.count() == 0, timeout=40, what="reconnected and drained")
    assert reads, "after an outage the spool is read back"
    late = mqtt_recorder("visiond/+/+/prediction")
    sink.submit([prediction()])
    late.wait_for(lambda ms: len(ms) == 1)
    assert [d["seq"] for d in late.json_payloads("/prediction")] == [165]
    # (the subscriber's copy can arrive before the sink has the broker's PUBACK)
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="acked") >= 165, what="165 acked")
    assert sample(metrics, "visiond_mqtt_publish_total", result="acked") == 165


def test_a_frozen_broker_is_noticed_within_one_and_a_half_keepalives(mosquitto, make_sink, metrics):
    # given a connected sink with a 2 s keepalive
    sink, _ = make_sink(mosquitto, keepalive_s=2)
    wait_until(lambda: sink.connected, what="connected")
    # when the broker freezes (the TCP connection stays open)
    os.kill(mosquitto.proc.pid, signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        wait_until(lambda: sample(metrics, "visiond_mqtt_connected") == 0, timeout=6, what="disconnect noticed")
        # then the gauge tells the truth within 1.5 x keepalive (plus a loop tick)
        assert time.monotonic() - frozen < 3.0 + 0.7
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
    wait_until(lambda: sink.connected, timeout=40, what="reconnected")


def test_a_denied_publish_is_never_a_success_and_is_retried(mosquitto, mqtt_recorder, make_sink, metrics):
    # given a broker whose ACL forbids writing cam1's topics
    acl = mosquitto.workdir / "acl"
    acl.write_text("topic readwrite visiond/+/status\ntopic readwrite visiond/+/status/#\n"
                   "topic readwrite visiond/+/cmd/#\ntopic readwrite visiond/+/cam2/#\ntopic read visiond/#\n")
    reconfigure(mosquitto, f"acl_file {acl}")
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    # when predictions of both cameras go out
    sink.submit([prediction("cam1"), prediction("cam2")])
    # then cam2's arrives, cam1's stays spooled, counted as denied (again on each retry), never acked
    recorder.wait_for(lambda ms: len(ms) == 1)
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= 2, what="denied twice")
    assert sample(metrics, "visiond_mqtt_publish_total", result="acked") == 1
    assert [m.camera for m in spool.peek(0, 10)] == ["cam1"]


def test_once_denied_messages_got_through_the_next_denial_is_retried_at_the_shortest_delay(
    mosquitto, mqtt_recorder, make_sink, metrics
):
    # given a broker that denies cam1's topics, and a sink that retried cam1's prediction with a growing delay
    acl = mosquitto.workdir / "acl"
    open_to = "topic readwrite visiond/+/status\ntopic readwrite visiond/+/status/#\ntopic readwrite visiond/+/cmd/#\n"
    deny_cam1 = open_to + "topic readwrite visiond/+/cam2/#\ntopic read visiond/#\n"
    acl.write_text(deny_cam1)
    reconfigure(mosquitto, f"acl_file {acl}")
    recorder = mqtt_recorder("visiond/+/+/prediction")
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    sink.submit([prediction("cam1")])
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= 3, what="denied 3 times")

    def reload_acl(text: str) -> None:
        acl.write_text(text)
        os.kill(mosquitto.proc.pid, signal.SIGHUP)  # mosquitto re-reads its ACL file
        time.sleep(0.3)

    # when the ACL lets it through and the spool drains
    reload_acl(open_to + "topic readwrite visiond/#\n")
    recorder.wait_for(lambda ms: len(ms) == 1, timeout=15)
    wait_until(lambda: spool.count() == 0, what="spool drained")
    # and cam1 is denied again
    reload_acl(deny_cam1)
    denied = sample(metrics, "visiond_mqtt_publish_total", result="denied")
    sink.submit([prediction("cam1")])
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= denied + 1, what="denied")
    # then its retry comes after the shortest delay (0.5 s), not the one the last denials grew to (4 s)
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= denied + 2, timeout=2.5,
               what="the retry at the shortest delay")


def test_denied_messages_the_spool_bound_evicted_no_longer_hold_the_retry_delay_long(
    mosquitto, mqtt_recorder, make_sink, metrics
):
    # given a broker that denies cam1's topics, a spool bound of 20 messages, and cam1's prediction denied four
    # times (its next retry 8 s away)
    acl = mosquitto.workdir / "acl"
    open_to = "topic readwrite visiond/+/status\ntopic readwrite visiond/+/status/#\ntopic readwrite visiond/+/cmd/#\n"
    acl.write_text(open_to + "topic readwrite visiond/+/cam2/#\ntopic read visiond/#\n")
    reconfigure(mosquitto, f"acl_file {acl}")
    recorder = mqtt_recorder("visiond/+/cam2/prediction")
    sink, spool = make_sink(mosquitto, max_messages=20)
    wait_until(lambda: sink.connected, what="connected")
    sink.submit([prediction("cam1")])
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= 4, what="denied 4 times")
    # when cam2's verdicts overflow the spool, evicting the denied one (the oldest row not in flight)
    for _ in range(3):
        sink.submit([prediction("cam2") for _ in range(20)])
        time.sleep(0.05)
    recorder.wait_for(lambda ms: len(ms) >= 40, timeout=15)
    wait_until(lambda: "cam1" not in {m.camera for m in spool.peek(0, 100)}, what="the denied row evicted")
    # and a new cam1 verdict is denied
    denied = sample(metrics, "visiond_mqtt_publish_total", result="denied")
    sink.submit([prediction("cam1")])
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= denied + 1, what="denied")
    # then it is retried at the shortest delays (0.5 s, then 1 s), not after the 8 s the evicted one grew to
    wait_until(lambda: sample(metrics, "visiond_mqtt_publish_total", result="denied") >= denied + 3, timeout=3.5,
               what="two retries at the shortest delays")


# ---------------------------------------------------------------- status, will, commands


def test_status_is_retained_online_then_offline_after_stop(mosquitto, mqtt_recorder, make_sink, metrics):
    recorder = mqtt_recorder(f"visiond/{NODE}/#")
    # given a started sink with one camera
    sink, _ = make_sink(mosquitto)
    sink.set_camera_status("cam1", True, "stream opened")
    sink.set_detail({"model": {"name": "smallcnn", "version": "3f9a1c"}})
    # then the node says online, the camera says why it is online, the detail names the model
    recorder.wait_for(lambda ms: (f"visiond/{NODE}/status", b"online", False) in ms)
    cam = recorder.wait_for(lambda ms: any(m.topic.endswith("/cam1/status") for m in ms))
    state = json.loads([m for m in cam if m.topic.endswith("/cam1/status")][-1].payload)
    assert state["state"] == "online" and state["reason"] == "stream opened"
    # (had the sink connected between set_camera_status and set_detail, the detail naming the model comes after
    # cam1/status)
    recorder.wait_for(lambda _ms: any("model" in d for d in recorder.json_payloads("/status/detail")), 10,
                      "status/detail naming the model")
    assert recorder.json_payloads("/status/detail")[-1]["model"]["version"] == "3f9a1c"
    # when it stops
    sink.stop()
    # then offline is published, retained, before a clean disconnect
    recorder.wait_for(lambda ms: ms[-1].topic == f"visiond/{NODE}/status" and ms[-1].payload == b"offline")
    assert not sink.alive() and sink.error is None
    assert sample(metrics, "visiond_mqtt_connected") == 0
    late = mqtt_recorder(f"visiond/{NODE}/status")
    late.wait_for(lambda ms: ms == [(f"visiond/{NODE}/status", b"offline", True)])


def test_a_killed_daemon_leaves_the_last_will(mosquitto, mqtt_recorder, tmp_path):
    recorder = mqtt_recorder(f"visiond/{NODE}/status")
    script = textwrap.dedent(f"""
        import sys, time
        from visiond.config import MqttConfig
        from visiond.serve.metrics import Metrics
        from visiond.serve.sinks.spool import Spool
        from visiond.serve.sinks.mqtt import MqttSink
        metrics = Metrics(process=False)
        sink = MqttSink(MqttConfig(port={mosquitto.port}), {NODE!r}, Spool({str(tmp_path)!r}, 100), metrics)
        sink.start()
        while not sink.connected:
            time.sleep(0.01)
        print("READY", flush=True)
        time.sleep(60)
    """)
    # given a daemon in its own process, connected
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        recorder.wait_for(lambda ms: ms and ms[-1].payload == b"online")
        # when it is killed without a chance to say goodbye
        proc.kill()
        proc.wait(5)
        # then the broker publishes its will
        recorder.wait_for(lambda ms: ms[-1].payload == b"offline", timeout=5)
    finally:
        proc.kill()
        proc.wait(5)


def test_commands_reach_the_callback_and_a_failing_one_does_not_stop_the_sink(mosquitto, mqtt_recorder, make_sink):
    received = []

    def on_command(verb: str, payload: bytes, request=None) -> None:
        if verb == "boom":
            raise RuntimeError("handler bug")
        received.append((verb, payload))

    recorder = mqtt_recorder(f"visiond/{NODE}/status/detail")
    sink, _ = make_sink(mosquitto, on_command=on_command)
    wait_until(lambda: sink.connected, what="connected")
    recorder.wait_for(lambda ms: len(ms) >= 1)  # session set up (subscription comes first)
    # when commands arrive, one of them breaks the handler, one is too large
    publish_one(mosquitto, f"visiond/{NODE}/cmd/boom", b"{}")
    publish_one(mosquitto, f"visiond/{NODE}/cmd/capture", b'{"camera": "cam1", "id": "c-1"}')
    publish_one(mosquitto, f"visiond/{NODE}/cmd/reload", b"x" * (MAX_COMMAND_BYTES + 1))
    # then the good one is handled, the thread lives, the oversized one is refused and reported
    wait_until(lambda: received == [("capture", b'{"camera": "cam1", "id": "c-1"}')], what="command handled")
    recorder.wait_for(lambda ms: "last_error" in json.loads(ms[-1].payload))
    assert "reload" in recorder.json_payloads("/status/detail")[-1]["last_error"]
    assert sink.alive() and received == [("capture", b'{"camera": "cam1", "id": "c-1"}')]


def test_the_password_never_reaches_the_log(mosquitto, make_sink, caplog, free_port, tmp_path):
    caplog.set_level(logging.DEBUG)
    # given sinks with credentials, one reaching the broker and one a closed port
    good, spool = make_sink(mosquitto, username="visiond", password=PASSWORD)
    bad, _ = make_sink(port=free_port, username="visiond", password=PASSWORD, spool_dir=tmp_path / "other")
    wait_until(lambda: good.connected, what="connected")
    good.submit([prediction()])
    wait_until(lambda: spool.count() == 0, what="delivered")
    time.sleep(1.0)
    good.stop()
    bad.stop(drain_timeout_s=0.2)
    # then nothing logged carries the password
    assert "cannot reach broker" in caplog.text
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


def test_a_thread_killed_by_a_bug_is_visible(mosquitto, mqtt_recorder, make_sink, metrics):
    recorder = mqtt_recorder(f"visiond/{NODE}/status")
    # given a connected sink
    sink, spool = make_sink(mosquitto)
    wait_until(lambda: sink.connected, what="connected")
    # when its spool disappears under it (a bug in the daemon's stop order)
    spool.close()
    # then the thread ends, says why, the gauge drops and the broker sends the will
    wait_until(lambda: not sink.alive(), timeout=5, what="thread ended")
    assert isinstance(sink.error, sqlite3.ProgrammingError)
    assert sample(metrics, "visiond_mqtt_connected") == 0
    recorder.wait_for(lambda ms: ms[-1].payload == b"offline")


def test_refused_credentials_are_logged_with_the_reason_and_retried(mosquitto, make_sink, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    # given a broker that knows only visiond with another password
    passwords = mosquitto.workdir / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "visiond", "the-right-one"], check=True)
    reconfigure(mosquitto, f"allow_anonymous false\npassword_file {passwords}")
    # when the sink logs in with the wrong one
    sink, spool = make_sink(mosquitto, username="visiond", password=PASSWORD)
    sink.submit([prediction()])
    # then the refusal is logged with the broker's reason, retried, and nothing is lost or leaked
    wait_until(lambda: caplog.text.count("refused the connection") >= 2, timeout=10, what="two refusals")
    assert "Not authorized" in caplog.text or "Bad user name or password" in caplog.text
    assert sink.alive() and not sink.connected and spool.count() == 1
    assert PASSWORD not in caplog.text
    # and the right password gets through
    good, good_spool = make_sink(mosquitto, username="visiond", password="the-right-one", spool_dir=tmp_path / "good",
                                 client_id="visiond-good")
    good.submit([prediction()])
    wait_until(lambda: good.connected and good_spool.count() == 0, what="delivered with the right password")


def test_tls_with_a_private_ca(mosquitto, mqtt_recorder, make_sink, free_port):
    # given a broker with a TLS listener whose certificate a private CA signed for 127.0.0.1
    d = mosquitto.workdir
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=visiond test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    reconfigure(mosquitto, f"listener {free_port} 127.0.0.1\ncafile {d / 'ca.pem'}\n"
                           f"certfile {d / 'server.pem'}\nkeyfile {d / 'server.key'}")
    recorder = mqtt_recorder("visiond/+/+/prediction")
    # when the sink connects over TLS, trusting that CA
    sink, spool = make_sink(port=free_port, tls={"ca": d / "ca.pem"})
    sink.submit([prediction()])
    # then the prediction arrives
    recorder.wait_for(lambda ms: len(ms) == 1)
    wait_until(lambda: spool.count() == 0, what="acknowledged over TLS")
