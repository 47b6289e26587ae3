"""Three doors, one inspection core: MQTT, OPC UA and Modbus TCP against `visiond run` as a child process.

The daemon reads a config with `opcua.enabled` and `modbus.enabled` on free loopback ports, so what is tested
is its own wiring (DESIGN.md "Inspecting parts"): the doors it starts, the store they share, the inspection
topic every verdict goes to. Clients are the ones a plant would use: the harness's MQTT 5 Requester (a PLC's
request/response), `asyncua.Client` and `pymodbus`' ModbusTcpClient, and tools/plc_client.py as a user runs it.
Each trigger -> verdict latency is measured by the client that asked and printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import queue
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from asyncua import Client, ua
from pymodbus.client import ModbusTcpClient

from conftest import ROOT, Mosquitto, require_binary
from daemon_helpers import Daemon
from mqtt_helpers import MqttRecorder
from test_inspect import station_cfg, truth_of
from visiond.harness.process import free_port
from visiond.harness.requester import Requester

NODE = "testbox"
CAMERA = "station1"
NAMESPACE = f"urn:visiond:{NODE}"
ACK_TIMEOUT_S = 2.0
INSPECTION = f"/{CAMERA}/inspection"
TOOL = ROOT / "tools" / "plc_client.py"
TRIGGER, READY, BUSY, RESULT_OK, RESULT_NG, ERROR, ACK = range(7)  # the station's coils (README "Modbus TCP")
COUNTER, REASON = 3, 4  # its holding registers


# ---------------------------------------------------------------- the line: broker, daemon, clients


@dataclass
class Line:
    tmp: Path
    broker: Mosquitto
    daemon: Daemon
    rec: MqttRecorder
    opcua_url: str
    modbus_port: int

    def rows(self, part_ids) -> dict[str, list[dict]]:
        """The results store's rows of these parts, by part id (what `visiond results` reads)."""
        part_ids = [str(p) for p in part_ids]
        db = sqlite3.connect(f"file:{self.tmp / 'spool' / 'results.db'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            found = db.execute(f"SELECT * FROM results WHERE part_id IN ({','.join('?' * len(part_ids))})",
                               part_ids).fetchall()
        finally:
            db.close()
        out: dict[str, list[dict]] = {p: [] for p in part_ids}
        for row in found:
            out[row["part_id"]].append(dict(row))
        return out

    def published(self, job_ids, timeout: float = 15.0) -> dict[str, list[dict]]:
        """The `<camera>/inspection` messages of these jobs, once each job has at least one."""
        jobs = set(job_ids)

        def got():
            return {d["job_id"] for d in self.rec.json_payloads(INSPECTION) if d["job_id"] in jobs}

        self.rec.wait_for(lambda _: got() == jobs, timeout, f"{len(jobs)} inspection messages")
        out: dict[str, list[dict]] = {j: [] for j in jobs}
        for doc in self.rec.json_payloads(INSPECTION):
            if doc["job_id"] in jobs:
                out[doc["job_id"]].append(doc)
        return out

    def metric(self, name: str, **labels) -> float:
        return self.daemon.metric(name, **labels) or 0.0

    def plc(self) -> Plc:
        return Plc("127.0.0.1", self.modbus_port)


def start_line(tmp: Path, cfg: dict, broker: Mosquitto) -> Line:
    """The daemon with both doors on free loopback ports (defaults otherwise: station1 at unit 1, base 0)."""
    opcua_port, modbus_port = free_port(), free_port()
    cfg.update(node=NODE, opcua={"enabled": True, "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}"},
               modbus={"enabled": True, "port": modbus_port, "ack_timeout_s": ACK_TIMEOUT_S})
    rec = MqttRecorder(broker.host, broker.port, f"visiond/{NODE}/#").start()
    daemon = Daemon(tmp, cfg)
    try:
        daemon.until(lambda: any(m.topic.endswith(f"{CAMERA}/ready") and m.payload == b"ready"
                                 for m in rec.messages()), 120, f"{CAMERA} ready")
        daemon.until(lambda: listening(opcua_port) and listening(modbus_port), 30, "the OPC UA and Modbus ports")
    except BaseException:
        daemon.close()
        rec.stop()
        raise
    return Line(tmp, broker, daemon, rec, f"opc.tcp://127.0.0.1:{opcua_port}", modbus_port)


def stop_line(line: Line) -> None:
    try:
        code = line.daemon.stop()
    finally:
        line.daemon.close()
        line.rec.stop()
    assert code == 0, f"visiond exited with {code}:\n{line.daemon.stderr[-3000:]}"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def line(tmp_path_factory, line_model, synth_video):
    """One daemon for the module: a triggered station on the looping synthetic line file, 3 ROIs."""
    tmp = tmp_path_factory.mktemp("doors")
    (tmp / "broker").mkdir()
    broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp / "broker")
    broker.start()
    try:
        started = start_line(tmp / "daemon", station_cfg(line_model, broker, synth_video), broker)
        yield started
        stop_line(started)
    finally:
        broker.stop()


@dataclass
class Answer:
    """What a door told the PLC that asked: the verdict, the job when the door names it, the inspection payload
    when it carries one, the result registers for Modbus, and trigger -> verdict seconds."""

    verdict: str
    latency_s: float
    job_id: str | None = None
    doc: dict | None = None
    coils: list[bool] = field(default_factory=list)
    regs: list[int] = field(default_factory=list)


class Plc:
    """A PLC program on the station's Modbus block (unit 1, base 0), over one connection."""

    def __init__(self, host: str, port: int):
        self.client = ModbusTcpClient(host, port=port, timeout=3, retries=0)
        assert self.client.connect(), f"cannot connect to {host}:{port}"

    def coils(self) -> list[bool]:
        r = self.client.read_coils(0, count=7, device_id=1)
        assert not r.isError(), r
        return list(r.bits[:7])

    def regs(self) -> list[int]:
        r = self.client.read_holding_registers(0, count=16, device_id=1)
        assert not r.isError(), r
        return list(r.registers)

    def trigger(self, part: int) -> None:
        assert not self.client.write_registers(0, [part >> 16, part & 0xFFFF], device_id=1).isError()
        self.set_trigger()

    def set_trigger(self) -> None:
        assert not self.client.write_coil(TRIGGER, True, device_id=1).isError()

    def wait_coils(self, pred, timeout: float, what: str) -> list[bool]:
        end = time.monotonic() + timeout
        while not pred(coils := self.coils()):
            assert time.monotonic() < end, f"{what}: coils still {coils}"
            time.sleep(0.005)
        return coils

    def handshake(self, part: int) -> Answer:
        """Ready? part id, Trigger, until ResultCounter steps, read, Ack, until Ready (the next part may come)."""
        self.wait_coils(lambda c: c[READY], 10, f"Ready before part {part}")
        before = self.regs()[COUNTER]
        t0 = time.monotonic()
        self.trigger(part)
        while (regs := self.regs())[COUNTER] == before:
            assert time.monotonic() - t0 < 10, f"part {part}: no result within 10 s"
            time.sleep(0.002)
        latency = time.monotonic() - t0
        coils = self.coils()
        assert not self.client.write_coil(ACK, True, device_id=1).isError()
        self.wait_coils(lambda c: c[READY] and not any(c[k] for k in (TRIGGER, RESULT_OK, RESULT_NG, ERROR)), 5,
                        f"cleared after the Ack of part {part}")
        verdict = "OK" if coils[RESULT_OK] else "NG" if coils[RESULT_NG] else "ERROR"
        assert coils[RESULT_OK] + coils[RESULT_NG] + coils[ERROR] == 1 and not coils[BUSY], coils
        assert regs[COUNTER] == (before + 1) & 0xFFFF, (before, regs[COUNTER])  # one step: this part's verdict
        return Answer(verdict, latency, coils=coils, regs=regs)

    def close(self) -> None:
        self.client.close()


async def inspect_call(client: Client, ns: int, part: str) -> tuple[str, str, str]:
    station = client.get_node(ua.NodeId(f"{NODE}.{CAMERA}", ns))
    return await station.call_method(ua.NodeId(f"{NODE}.{CAMERA}.Inspect", ns), ua.Variant(part, ua.VariantType.String),
                                      ua.Variant("", ua.VariantType.String))


async def opcua_inspect(url: str, part: str) -> Answer:
    async with Client(url, timeout=15) as client:
        ns = await client.get_namespace_index(NAMESPACE)
        t0 = time.monotonic()
        job, verdict, result = await inspect_call(client, ns, part)
        return Answer(verdict, time.monotonic() - t0, job, json.loads(result))


def percentiles(values: list[float]) -> str:
    """p50 and p99 in ms (nearest rank), for the report a test prints."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return f"p50 {rank(0.5):.0f} ms, p99 {rank(0.99):.0f} ms (n={len(ordered)})"


class Workers:
    """Threads that run a PLC loop each; an exception in one is re-raised by `join`."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, target, *args) -> None:
        def run():
            try:
                target(*args)
            except BaseException as exc:  # re-raised in the test's thread
                self.errors.append(exc)

        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a client loop did not finish"
        if self.errors:
            raise self.errors[0]


# ---------------------------------------------------------------- one trigger stream, three doors


PARTS = 60
PERIOD_S = 0.15  # a part every 150 ms, each door in turn


def opcua_plc(url: str, parts: queue.Queue, out: dict) -> None:
    """One OPC UA session calling Inspect for each part it is handed, as a PLC calls it per part."""

    async def run():
        async with Client(url, timeout=15) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            loop = asyncio.get_running_loop()
            while (part := await loop.run_in_executor(None, parts.get)) is not None:
                t0 = time.monotonic()
                job, verdict, result = await inspect_call(client, ns, part)
                out[part] = Answer(verdict, time.monotonic() - t0, job, json.loads(result))

    asyncio.run(run())


def modbus_plc(line: Line, parts: queue.Queue, out: dict) -> None:
    plc = line.plc()
    try:
        while (part := parts.get()) is not None:
            out[part] = plc.handshake(int(part))
    finally:
        plc.close()


def test_the_three_doors_answer_one_trigger_stream_with_the_stored_and_published_verdicts(line, synth_video):
    # given the daemon's three doors and a PLC on each, the parts of one stream handed to them in turn
    doors = {str(10_000 + i): ("mqtt", "opcua", "modbus")[i % 3] for i in range(PARTS)}
    triggers = {d: line.metric("visiond_triggers_total", camera=CAMERA, door=d) for d in ("mqtt", "opcua", "modbus")}
    handed = {"opcua": queue.Queue(), "modbus": queue.Queue()}
    answers: dict[str, Answer] = {}
    workers = Workers()
    workers.start(opcua_plc, line.opcua_url, handed["opcua"], answers)
    workers.start(modbus_plc, line, handed["modbus"], answers)
    corrs = {}
    with Requester(line.broker.host, line.broker.port, NODE) as mqtt_plc:
        # when a part passes every 150 ms, its door triggering it
        t0 = time.monotonic()
        for i, (part, door) in enumerate(doors.items()):
            time.sleep(max(0.0, t0 + i * PERIOD_S - time.monotonic()))
            if door == "mqtt":
                corrs[part] = mqtt_plc.inspect(CAMERA, part)
            else:
                handed[door].put(part)
        for q in handed.values():
            q.put(None)
        workers.join(60)
        missing = mqtt_plc.wait_all(list(corrs.values()), 30)
        assert not missing, f"{len(missing)} MQTT triggers unanswered"
        time.sleep(0.5)  # a second answer to any of them would arrive by now
        for part, corr in corrs.items():
            got = mqtt_plc.answers(corr)
            assert len(got) == 1, (part, got)
            answers[part] = Answer(got[0]["verdict"], mqtt_plc.latency_s(corr), got[0]["job_id"], got[0])
    # then every part was answered, by its own door, with OK or NG
    assert sorted(answers) == sorted(doors)
    assert {p: a.verdict for p, a in answers.items() if a.verdict not in ("OK", "NG")} == {}
    # and each is one row of the results store naming that door, with the verdict the door gave
    rows = line.rows(doors)
    assert {p: len(r) for p, r in rows.items() if len(r) != 1} == {}
    for part, door in doors.items():
        row, answer = rows[part][0], answers[part]
        assert (row["door"], row["verdict"]) == (door, answer.verdict), part
        if answer.doc is not None:  # MQTT and OPC UA carry the stored payload itself
            assert answer.job_id == row["job_id"] and answer.doc == json.loads(row["payload"]), part
        else:  # Modbus: the block showed this part's ROI scores, not those of another door's part decided meanwhile
            scores = [answer.regs[11 + 2 * k] for k in range(len(json.loads(row["rois"])))]
            assert scores == [round(r["score"] * 1000) for r in json.loads(row["rois"])], part
    # and the inspection topic carried each stored verdict once, the same document
    published = line.published(r[0]["job_id"] for r in rows.values())
    for part, (row,) in rows.items():
        assert published[row["job_id"]] == [json.loads(row["payload"])], part
    # and every door counted its 20 triggers
    counted = {d: line.metric("visiond_triggers_total", camera=CAMERA, door=d) - n for d, n in triggers.items()}
    assert counted == {"mqtt": 20, "opcua": 20, "modbus": 20}
    # and the verdicts are right for the parts the line showed, whichever door asked
    docs = {p: json.loads(r[0]["payload"]) for p, r in rows.items()}
    right = Counter(doors[p] for p, doc in docs.items() if doc["verdict"] == truth_of(doc, synth_video.truth))
    assert sum(right.values()) / PARTS >= 0.85, right
    for door in ("mqtt", "opcua", "modbus"):
        print(f"\n{door} trigger -> verdict: {percentiles([a.latency_s for p, a in answers.items() if doors[p] == door])}"
              f", {right[door]}/20 right")


# ---------------------------------------------------------------- abuse on two doors, the third keeps flowing


def mbap(pdu: bytes, unit: int, tid: int, pid: int = 0) -> bytes:
    return tid.to_bytes(2, "big") + pid.to_bytes(2, "big") + (len(pdu) + 1).to_bytes(2, "big") + bytes([unit]) + pdu


def flood_modbus(port: int, stop: threading.Event, stats: Counter) -> None:
    """Garbage at the Modbus port until `stop`: random bytes, frames cut in half, undecodable and oversized frames,
    several on one connection, and connections opened and dropped."""
    rng = random.Random(5)

    def garbage(kind: str) -> bytes:
        if kind == "random":
            return rng.randbytes(rng.randint(1, 300))
        if kind == "half":
            frame = mbap(b"\x03\x00\x00\x00\x10", 1, rng.getrandbits(16))
            return frame[:rng.randint(1, len(frame) - 1)]
        if kind == "bad_function":
            return mbap(bytes([rng.choice((0x41, 0x63, 0x7f))]) + rng.randbytes(4), 1, rng.getrandbits(16))
        return mbap(b"\x10" + rng.randbytes(600), 2, rng.getrandbits(16))  # longer than any Modbus frame

    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError as exc:  # the port stopped accepting: what the test must not see
            stats[f"connect failed: {type(exc).__name__}"] += 1
            continue
        try:
            if rng.random() < 0.2:
                stats["dropped"] += 1  # opened and closed, nothing sent
                continue
            for _ in range(rng.randint(1, 8)):
                kind = rng.choice(("random", "half", "bad_function", "oversized"))
                s.sendall(garbage(kind))
                stats[kind] += 1
            if rng.random() < 0.3:  # sometimes read what came back before dropping the connection
                s.settimeout(0.02)
                s.recv(260)
        except OSError:  # the server may drop a connection that sends garbage, or not answer it
            stats["unanswered or dropped by the server"] += 1
        finally:
            s.close()


def kill_opcua_clients(url: str, stop: threading.Event, stats: Counter, parts: list[str]) -> None:
    """OPC UA clients that connect, call Inspect and die mid-call until `stop`: the socket aborted under the call
    (a PLC losing power), or the call cancelled and the socket closed without CloseSession."""
    rng = random.Random(9)

    async def one(n: int) -> None:
        client = Client(url, timeout=5)
        await client.connect()
        ns = await client.get_namespace_index(NAMESPACE)
        parts.append(f"killed-{n}")
        call = asyncio.create_task(inspect_call(client, ns, parts[-1]))
        await asyncio.sleep(rng.uniform(0.005, 0.08))
        if call.done():
            stats["finished_first"] += 1
        elif n % 2:
            call.cancel()
            client.uaclient.protocol.transport.close()
            stats["cancelled"] += 1
        else:
            client.uaclient.protocol.transport.abort()
            stats["aborted"] += 1
        # asyncio.run cancels what the dead client left running (its keepalive and renew loops)

    n = 0
    while not stop.is_set():
        try:
            asyncio.run(one(n))
        except Exception:  # a dead client's leftovers; the count is what matters
            stats["client_error"] += 1
        n += 1
        time.sleep(0.2)


def test_garbage_on_modbus_and_clients_killed_mid_inspect_leave_the_mqtt_door_flowing(line):
    # given a flood of garbage at the Modbus port and OPC UA clients killed mid-Inspect, both under way
    stop = threading.Event()
    flood, kills, killed_parts = Counter(), Counter(), []
    malformed = line.metric("visiond_door_refusals_total", door="modbus", reason="malformed")
    abuse = Workers()
    abuse.start(flood_modbus, line.modbus_port, stop, flood)
    abuse.start(kill_opcua_clients, line.opcua_url, stop, kills, killed_parts)
    time.sleep(0.5)
    with Requester(line.broker.host, line.broker.port, NODE) as plc:
        try:
            # when an MQTT PLC sends 40 triggers at 10 a second meanwhile
            corrs, t0 = [], time.monotonic()
            for i in range(40):
                time.sleep(max(0.0, t0 + i * 0.1 - time.monotonic()))
                corrs.append(plc.inspect(CAMERA, str(20_000 + i)))
            missing = plc.wait_all(corrs, 30)
        finally:
            stop.set()
            abuse.join(30)
        latencies = [plc.latency_s(c) for c in corrs if plc.answers(c)]
        answers = [plc.answers(c) for c in corrs]
    print(f"\nunder abuse: {40 - len(missing)}/40 MQTT triggers answered, {percentiles(latencies)}; "
          f"modbus garbage {dict(flood)}; opcua clients {dict(kills)}")
    # then every MQTT trigger was answered once, with OK or NG
    assert not missing, f"{len(missing)} of 40 unanswered; {line.daemon.stderr[-3000:]}"
    assert [len(a) for a in answers] == [1] * 40
    assert Counter(a[0]["verdict"] for a in answers).keys() <= {"OK", "NG"}, [a[0].get("reason") for a in answers]
    # and the abuse really happened: garbage was refused as malformed, clients died mid-call
    assert sum(flood.values()) >= 500 and not any(k.startswith("connect failed") for k in flood), flood
    assert line.metric("visiond_door_refusals_total", door="modbus", reason="malformed") > malformed
    assert kills["cancelled"] + kills["aborted"] >= 5, kills
    # and a call whose client died was inspected at most once (its verdict is stored: the PLC can look it up)
    stored = line.rows(killed_parts)
    assert max(len(r) for r in stored.values()) <= 1 and all(r[0]["door"] == "opcua" for r in stored.values() if r)
    print(f"verdicts stored for {sum(map(len, stored.values()))} of {len(killed_parts)} calls of killed clients")
    # and afterwards a Modbus handshake and an OPC UA Inspect still work
    plc = line.plc()
    try:
        handshake = plc.handshake(20_100)
    finally:
        plc.close()
    inspected = asyncio.run(opcua_inspect(line.opcua_url, "20101"))
    rows = line.rows(["20100", "20101"])
    assert (handshake.verdict, rows["20100"][0]["door"]) == (rows["20100"][0]["verdict"], "modbus")
    assert (inspected.verdict, inspected.job_id) == (rows["20101"][0]["verdict"], rows["20101"][0]["job_id"])
    assert inspected.verdict in ("OK", "NG")


# ---------------------------------------------------------------- a missing Ack


def test_a_missing_modbus_ack_refuses_the_next_part_until_the_ack_timeout_and_leaves_no_bit_set(line):
    # given a Modbus handshake whose result the PLC never acknowledges
    plc = line.plc()
    try:
        plc.wait_coils(lambda c: c[READY], 10, "Ready")
        before = plc.regs()[COUNTER]
        busy = line.metric("visiond_door_refusals_total", door="modbus", reason="busy")
        plc.trigger(30_001)
        plc.wait_coils(lambda c: not c[BUSY] and (c[RESULT_OK] or c[RESULT_NG] or c[ERROR]), 10, "result of 30001")
        shown_at = time.monotonic()
        # when the PLC writes the next part id and sets Trigger, then sets Trigger again
        plc.trigger(30_002)
        refused = (plc.coils(), plc.regs())
        plc.set_trigger()
        again = (plc.coils(), plc.regs())
        # then both are refused: Error with reason 3 (busy), no other result bit, Ready off, no verdict counted
        for coils, regs in (refused, again):
            assert coils[ERROR] and coils[TRIGGER] and not any(coils[k] for k in (READY, BUSY, RESULT_OK, RESULT_NG))
            assert (regs[REASON], regs[COUNTER]) == (3, (before + 1) & 0xFFFF)
        # and at the ack timeout every bit is cleared and stays cleared, Ready again
        cleared = plc.wait_coils(lambda c: c[READY], ACK_TIMEOUT_S + 3, "cleared by the ack timeout")
        waited = time.monotonic() - shown_at
        for _ in range(10):
            assert plc.coils() == cleared == [False, True, False, False, False, False, False]
            assert plc.regs()[REASON] == 0
            time.sleep(0.05)
        # and part 30002 was never inspected; its next handshake is answered as usual
        assert line.rows(["30002"])["30002"] == []
        answer = plc.handshake(30_002)
    finally:
        plc.close()
    assert ACK_TIMEOUT_S - 0.2 <= waited <= ACK_TIMEOUT_S + 1.0, waited
    assert answer.regs[COUNTER] == (before + 2) & 0xFFFF
    assert [r["verdict"] for r in line.rows(["30002"])["30002"]] == [answer.verdict]
    assert line.metric("visiond_door_refusals_total", door="modbus", reason="busy") == busy + 2
    assert f"no Ack within {ACK_TIMEOUT_S:g} s of the result of part 30001" in line.daemon.stderr


# ---------------------------------------------------------------- tools/plc_client.py


def test_plc_client_gets_the_stored_verdict_through_each_door(line):
    # given the running daemon; when a user runs tools/plc_client.py once per door, a part each
    runs = {"40001": ["modbus", "127.0.0.1", str(line.modbus_port), "--base", "0", "--part", "40001"],
            "40002": ["opcua", line.opcua_url, NODE, CAMERA, "--part", "40002"],
            "40003": ["mqtt", line.broker.host, str(line.broker.port), NODE, CAMERA, "--part", "40003"]}
    out = {part: subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)
           for part, args in runs.items()}
    # then each printed the verdict the store holds for its part, which came through that door
    rows = line.rows(runs)
    for part, args in runs.items():
        assert out[part].returncode == 0, out[part].stderr
        (row,) = rows[part]
        assert row["door"] == args[0]
        assert out[part].stdout.startswith(f"part {part}: {row['verdict']} ("), out[part].stdout
        if args[0] != "modbus":
            assert f"job {row['job_id']}" in out[part].stdout
    # and the Modbus run acknowledged its result: the station is Ready, no result bit left
    plc = line.plc()
    try:
        assert plc.coils() == [False, True, False, False, False, False, False]
    finally:
        plc.close()


# ---------------------------------------------------------------- a real RTSP stream, 200 Inspect calls


INSPECT_CALLS = 200


class Changes:
    """A subscription handler: every value LastVerdict and ResultSequence reported, in order."""

    def __init__(self):
        self.values: dict[str, list] = {"LastVerdict": [], "ResultSequence": []}

    def datachange_notification(self, node, val, data) -> None:
        self.values[node.nodeid.Identifier.rsplit(".", 1)[1]].append(val)


async def wait_until(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.05)


def collapse(values: list) -> list:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def test_200_inspect_calls_on_an_rtsp_station_match_the_store_and_mqtt_and_subscribers_see_every_verdict(
        tmp_path, mosquitto, line_model, synth_video, rtsp_server_factory):
    # given a station fed by a real RTSP stream of the synthetic line, and an OPC UA client subscribed to
    # LastVerdict and ResultSequence
    server = rtsp_server_factory(synth_video.path)
    cfg = station_cfg(line_model, mosquitto, synth_video)
    cfg["cameras"][0]["source"] = server.url
    for key in ("loop", "fps"):  # a live stream: neither looped nor paced by visiond
        del cfg["cameras"][0][key]
    line = start_line(tmp_path, cfg, mosquitto)

    async def plc():
        async with Client(line.opcua_url, timeout=15) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            changes = Changes()
            sub = await client.create_subscription(10, changes)
            await sub.subscribe_data_change([client.get_node(ua.NodeId(f"{NODE}.{CAMERA}.{n}", ns))
                                             for n in ("LastVerdict", "ResultSequence")], queuesize=1000)
            await wait_until(lambda: all(changes.values.values()), 10, "the subscription's first values")
            # when Inspect is called 200 times, a part each
            calls = []
            t0 = time.monotonic()
            for i in range(INSPECT_CALLS):
                start = time.monotonic()
                job, verdict, result = await inspect_call(client, ns, str(50_000 + i))
                calls.append(Answer(verdict, time.monotonic() - start, job, json.loads(result)))
            wall = time.monotonic() - t0
            seq0 = changes.values["ResultSequence"][0]
            await wait_until(lambda: changes.values["ResultSequence"][-1] == seq0 + INSPECT_CALLS, 10,
                             "every sequence step")
            await sub.delete()
            return calls, changes.values, wall

    try:
        calls, seen, wall = asyncio.run(plc())
        rows = line.rows(str(50_000 + i) for i in range(INSPECT_CALLS))
        published = line.published(a.job_id for a in calls)
    finally:
        stop_line(line)
    print(f"\nopcua Inspect on RTSP: {INSPECT_CALLS} calls in {wall:.1f} s, {percentiles([a.latency_s for a in calls])}")
    # then each call got its own part's verdict, OK or NG, from frames captured after its trigger
    for i, answer in enumerate(calls):
        doc = answer.doc
        assert (doc["part_id"], doc["door"], doc["job_id"], doc["verdict"]) == (str(50_000 + i), "opcua",
                                                                              answer.job_id, answer.verdict)
        assert answer.verdict in ("OK", "NG"), (doc["reason"], doc["detail"])
        triggered = dt.datetime.fromisoformat(doc["triggered_at"])
        assert all(dt.datetime.fromisoformat(f["captured_at"]) >= triggered for f in doc["frames"]), doc["frames"]
    # and each equals its job's row in the results store and its message on the inspection topic
    for i, answer in enumerate(calls):
        (row,) = rows[str(50_000 + i)]
        assert (row["job_id"], json.loads(row["payload"])) == (answer.job_id, answer.doc)
        assert published[answer.job_id] == [answer.doc]
    # and the subscriber saw every change of LastVerdict, and ResultSequence step once per verdict
    verdicts = [a.verdict for a in calls]
    assert seen["LastVerdict"] == collapse([seen["LastVerdict"][0], *verdicts])
    assert seen["ResultSequence"] == list(range(seen["ResultSequence"][0], seen["ResultSequence"][0] + INSPECT_CALLS + 1))
    assert set(verdicts) == {"OK", "NG"}, Counter(verdicts)  # the line has defects: both were seen
