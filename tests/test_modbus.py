"""The Modbus TCP door against a real pymodbus client: the PLC handshake, a missing Ack, read-only registers and
garbage on the port, on a daemon running in this process with a triggered station on the synthetic line."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time

import pytest
from pymodbus.client import ModbusTcpClient

from conftest import Mosquitto, require_binary
from daemon_helpers import line_cfg
from visiond.config import MODBUS_BLOCK, parse_config
from visiond.serve.daemon import Daemon
from visiond.serve.doors.modbus import (
    ACK,
    BUSY,
    COUNTER,
    ERROR,
    NO_CLASS,
    PART_HI,
    READY,
    REASON,
    RECIPE,
    RESULT_NG,
    RESULT_OK,
    ROI_BASE,
    TRIGGER,
    ModbusDoor,
)

BASE, UNIT = 300, 3  # not the defaults: the door must honour the station's block
ACK_TIMEOUT_S = 1.5
ROIS = ("centre", "centre_strict", "centre_lax")


class Plc:
    """What a PLC program does, over one Modbus TCP connection."""

    def __init__(self, host: str, port: int):
        self.client = ModbusTcpClient(host, port=port, timeout=3, retries=0)
        assert self.client.connect(), f"cannot connect to {host}:{port}"

    def coils(self) -> list[bool]:
        r = self.client.read_coils(BASE, count=7, device_id=UNIT)
        assert not r.isError(), r
        return list(r.bits[:7])

    def regs(self, count: int = ROI_BASE + 2 * len(ROIS)) -> list[int]:
        r = self.client.read_holding_registers(BASE, count=count, device_id=UNIT)
        assert not r.isError(), r
        return list(r.registers)

    def trigger(self, part: int) -> None:
        assert not self.client.write_registers(BASE + PART_HI, [part >> 16, part & 0xFFFF], device_id=UNIT).isError()
        self.set_trigger()

    def set_trigger(self) -> None:
        assert not self.client.write_coil(BASE + TRIGGER, True, device_id=UNIT).isError()

    def ack(self) -> None:
        assert not self.client.write_coil(BASE + ACK, True, device_id=UNIT).isError()

    def wait_coils(self, pred, timeout: float, what: str) -> list[bool]:
        end = time.monotonic() + timeout
        while True:
            coils = self.coils()
            if pred(coils):
                return coils
            assert time.monotonic() < end, f"{what}: coils still {coils}"
            time.sleep(0.005)

    def close(self) -> None:
        self.client.close()


class Rig:
    """visiond in this process (Daemon.run on a thread) with the Modbus door on its inspection core."""

    def __init__(self, tmp, line_model, synth_video):
        self.broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp)
        self.broker.start()
        x, y, w, h = synth_video.roi
        cam = {"name": "station1", "source": str(synth_video.path), "loop": True, "fps": 60, "mode": "triggered",
               "rois": [{"name": "centre", "rect": [x, y, w, h]},
                        {"name": "centre_strict", "rect": [x, y, w, h], "threshold": 0.3},
                        {"name": "centre_lax", "rect": [x, y, w, h], "threshold": 0.7}],
               "inspect": {"frames": 3, "interval_ms": 0, "deadline_ms": 3000, "queue": 16}}
        cfg = line_cfg(line_model, self.broker, [cam], node="testbox", spool={"dir": str(tmp / "spool")},
                       metrics={"enabled": False},
                       recipes={"part-b": {},  # config order, not sorted order, numbers them: 1 = part-b, 2 = part-a
                                "part-a": {"cameras": {"station1": {"rois": [{"name": "centre", "rect": [x, y, w, h]}]}}}},
                       modbus={"enabled": True, "port": 0, "stations": {"station1": {"base": BASE, "unit": UNIT}},
                               "ack_timeout_s": ACK_TIMEOUT_S})
        self.daemon = Daemon(parse_config(cfg, env={}))
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while self.daemon.inspection.state("station1") != "ready":
            assert time.monotonic() < end and self.thread.is_alive(), "station1 never became ready"
            time.sleep(0.05)
        self.door = next(d for d in self.daemon.doors if isinstance(d, ModbusDoor))  # the daemon's own door
        self.db = tmp / "spool" / "results.db"

    def plc(self) -> Plc:
        return Plc(*self.door.address)

    def rows(self, part: int) -> list[dict]:
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM results WHERE camera = 'station1' AND part_id = ?",
                                                (str(part),))]
        finally:
            db.close()

    def refusals(self, reason: str) -> float:
        return self.daemon.metrics.registry.get_sample_value("visiond_door_refusals_total",
                                                             {"door": "modbus", "reason": reason}) or 0.0

    def triggers(self) -> float:
        return self.daemon.metrics.registry.get_sample_value("visiond_triggers_total",
                                                             {"camera": "station1", "door": "modbus"}) or 0.0

    def close(self) -> None:
        self.door.stop()
        self.daemon.stop_event.set()
        self.thread.join(30)
        self.broker.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, line_model, synth_video):
    rig = Rig(tmp_path_factory.mktemp("modbus"), line_model, synth_video)
    yield rig
    rig.close()
    assert not rig.thread.is_alive(), "the daemon did not stop"


@pytest.fixture
def plc(rig):
    plc = rig.plc()
    plc.wait_coils(lambda c: c[READY], ACK_TIMEOUT_S + 5, "station ready before the test")
    yield plc
    plc.close()


def handshake(plc: Plc, part: int, retry: bool = False) -> tuple[list[bool], list[int], list[int]]:
    """Part id, Trigger, wait for the counter to step, read, Ack: (result coils, registers, counters seen)."""
    before = plc.regs()[COUNTER]
    plc.trigger(part)
    if retry:  # the PLC heard no answer and sends the same write again
        plc.set_trigger()
    seen = []
    end = time.monotonic() + 10
    while True:
        regs = plc.regs()
        seen.append(regs[COUNTER])
        if regs[COUNTER] != before:
            break
        assert time.monotonic() < end, f"part {part}: no verdict within 10 s"
        time.sleep(0.005)
    coils = plc.coils()
    plc.ack()
    return coils, regs, seen


def test_the_full_handshake_50_times_answers_each_part_once_with_the_stored_verdict(rig, plc):
    # given a PLC on the station's block (unit 3, base 300) and a ready station
    assert rig.door.address[1] > 0
    classes = {p.name: list(p.decider.classes) for p in rig.daemon.slot.active.plans("station1")}
    first = plc.regs()[COUNTER]
    counters = [first]
    triggers = rig.triggers()
    results = {}
    for i in range(50):
        # when the PLC runs the handshake for part 70000+i (above 65535: both words count), every 10th with a
        # retried Trigger write
        part = 70000 + i
        assert plc.coils()[READY]
        coils, regs, seen = handshake(plc, part, retry=i % 10 == 0)
        counters += [c for c in seen if c != counters[-1]]
        results[part] = (coils, regs)
        # then the result came with Busy cleared, and the Ack clears the bits and Trigger and sets Ready
        assert not coils[BUSY] and coils[TRIGGER] and not coils[READY], coils
        after = plc.coils()
        assert not any(after[k] for k in (TRIGGER, BUSY, RESULT_OK, RESULT_NG, ERROR)) and after[READY], after
        assert plc.regs()[REASON] == 0
    # then the counter stepped by one per handshake, every step seen once
    assert counters == [(first + k) & 0xFFFF for k in range(51)], counters
    # and each part was inspected once (a retried write is no second inspection), through the Modbus door, and
    # its bits, reason and ROI registers are those of its stored verdict
    verdicts = []
    for part, (coils, regs) in results.items():
        rows = rig.rows(part)
        assert len(rows) == 1, (part, rows)
        row = rows[0]
        assert row["door"] == "modbus" and row["trigger_id"]
        verdicts.append(row["verdict"])
        assert [coils[RESULT_OK], coils[RESULT_NG], coils[ERROR]] == [row["verdict"] == v for v in ("OK", "NG", "ERROR")]
        assert regs[REASON] == 0, (part, row["reason"], row["detail"])
        for k, roi in enumerate(json.loads(row["rois"])):
            assert roi["name"] == ROIS[k]
            assert regs[ROI_BASE + 2 * k] == classes[roi["name"]].index(roi["label"])
            assert regs[ROI_BASE + 2 * k + 1] == round(roi["score"] * 1000)
    assert set(verdicts) == {"OK", "NG"}, verdicts  # the line has defects: both bits were exercised
    assert len({row["trigger_id"] for part in results for row in rig.rows(part)}) == 50
    assert rig.triggers() == triggers + 50  # the retried writes were no triggers


def test_a_missing_ack_refuses_the_next_trigger_as_busy_until_the_ack_timeout(rig, plc):
    # given a handshake whose result the PLC never acknowledges
    before = plc.regs()[COUNTER]
    plc.trigger(111)
    plc.wait_coils(lambda c: not c[BUSY] and (c[RESULT_OK] or c[RESULT_NG] or c[ERROR]), 10, "result of part 111")
    shown_at = time.monotonic()
    refused = rig.refusals("busy")
    # when the PLC writes the next part id and sets Trigger again
    plc.trigger(222)
    # then it is refused at once: Error with reason 3 (busy), no other result bit, no verdict counted
    coils = plc.coils()
    regs = plc.regs()
    assert coils[ERROR] and not coils[RESULT_OK] and not coils[RESULT_NG] and not coils[BUSY] and not coils[READY]
    assert regs[REASON] == 3 and regs[COUNTER] == (before + 1) & 0xFFFF
    assert rig.refusals("busy") == refused + 1
    # and stays refused (a second attempt too) until the ack timeout clears the block
    plc.set_trigger()
    assert plc.coils()[ERROR] and plc.regs()[REASON] == 3
    cleared = plc.wait_coils(lambda c: c[READY], ACK_TIMEOUT_S + 3, "cleared by the ack timeout")
    waited = time.monotonic() - shown_at
    assert ACK_TIMEOUT_S - 0.2 <= waited <= ACK_TIMEOUT_S + 1.5, waited
    assert not any(cleared[k] for k in (TRIGGER, BUSY, RESULT_OK, RESULT_NG, ERROR)), cleared
    assert plc.regs()[REASON] == 0
    # and part 222 was never inspected; the next handshake for it works
    assert rig.rows(222) == []
    coils, regs, _ = handshake(plc, 222)
    assert regs[COUNTER] == (before + 2) & 0xFFFF
    assert len(rig.rows(222)) == 1 and coils[RESULT_OK] + coils[RESULT_NG] + coils[ERROR] == 1


def test_writes_to_read_only_addresses_get_an_exception_and_change_nothing(rig, plc):
    # given a ready station with part id 5 written and a known snapshot of its block
    c = plc.client
    assert not c.write_registers(BASE + PART_HI, [0, 5], device_id=UNIT).isError()
    coils, regs = plc.coils(), plc.regs()
    read_only = rig.refusals("read_only")
    # when the PLC writes a result coil, the counter, a block reaching into the counter, all seven coils at once,
    # and a recipe number that is not configured
    answers = [c.write_coil(BASE + RESULT_OK, True, device_id=UNIT),
               c.write_register(BASE + COUNTER, 999, device_id=UNIT),
               c.write_registers(BASE + PART_HI, [0, 6, 0, 7], device_id=UNIT),
               c.write_coils(BASE, [True] * 7, device_id=UNIT),
               c.write_register(BASE + RECIPE, len(rig.daemon.cfg.recipes) + 1, device_id=UNIT)]
    # then each gets the Modbus exception: ILLEGAL_DATA_ADDRESS (2), the recipe ILLEGAL_DATA_VALUE (3)
    assert [getattr(a, "exception_code", None) for a in answers] == [2, 2, 2, 2, 3], answers
    assert rig.refusals("read_only") == read_only + 4
    # and nothing changed: no bit, no register, no inspection started (Trigger in the 7-coil write was refused too)
    assert plc.coils() == coils and plc.regs() == regs
    assert regs[PART_HI + 1] == 5 and rig.rows(6) == []
    # and reads outside the block, of tables not in the map or of another unit are refused, not answered with zeros
    assert c.read_holding_registers(BASE + MODBUS_BLOCK - 1, count=2, device_id=UNIT).exception_code == 2
    assert c.read_discrete_inputs(BASE, count=7, device_id=UNIT).exception_code == 2
    assert c.read_coils(BASE, count=7, device_id=UNIT + 1).exception_code == 0x0B
    # and registers of ROIs the station does not have read as "no class"
    assert plc.regs(ROI_BASE + 2 * len(ROIS) + 2)[ROI_BASE + 2 * len(ROIS)] == NO_CLASS


def _mbap(payload: bytes, tid: int = 1, unit: int = UNIT, pid: int = 0) -> bytes:
    return tid.to_bytes(2, "big") + pid.to_bytes(2, "big") + (len(payload) + 1).to_bytes(2, "big") + bytes([unit]) \
        + payload


def test_garbage_on_the_port_does_not_stop_the_server(rig, plc):
    # given the door listening and a PLC connected
    host, port = rig.door.address
    malformed = rig.refusals("malformed")
    # when other connections send garbage: random bytes, an unknown function code, a register read cut short,
    # a wrong protocol id, a frame longer than any Modbus frame, and a connection dropped mid-frame
    frames = [bytes(range(256)) * 3, _mbap(b"\x63\x00\x01"), _mbap(b"\x03\x01"), _mbap(b"\x03\x00\x00\x00\x01", pid=7),
              _mbap(b"\x10" + b"\xff" * 600), b"\x00\x01\x00\x00\x00\x06"]
    answers = []
    for frame in frames:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(frame)
            s.settimeout(0.3)
            try:
                answers.append(s.recv(260))
            except (TimeoutError, ConnectionResetError):
                answers.append(b"")
    # then an undecodable frame is answered with an exception response (ILLEGAL_FUNCTION) and counted
    assert [len(a) == 9 and a[7] & 0x80 and a[8] == 1 for a in answers[1:3]] == [True, True], answers
    assert rig.refusals("malformed") > malformed
    # and the server thread lives, the connected PLC and a new one still run the handshake
    assert rig.door.alive()
    coils, _, _ = handshake(plc, 333)
    assert coils[RESULT_OK] + coils[RESULT_NG] + coils[ERROR] == 1
    second = rig.plc()
    try:
        second.wait_coils(lambda c: c[READY], 5, "ready after the Ack")
        coils, _, _ = handshake(second, 334)
        assert coils[RESULT_OK] + coils[RESULT_NG] + coils[ERROR] == 1
    finally:
        second.close()
    assert len(rig.rows(333)) == 1 and len(rig.rows(334)) == 1


def test_the_recipe_number_selects_recipes_in_config_order(rig, plc):
    # given recipes part-b (the config's ROIs) and part-a (one ROI), in that order in the config
    c = plc.client
    # when the PLC writes recipe number 2 and runs a handshake
    assert not c.write_register(BASE + RECIPE, 2, device_id=UNIT).isError()
    _, regs, _ = handshake(plc, 444)
    # then the part was inspected under part-a, the second recipe, and only its one ROI has a result
    row = rig.rows(444)[0]
    assert row["recipe"] == "part-a" and row["verdict"] in ("OK", "NG"), (row["reason"], row["detail"])
    assert regs[RECIPE] == 2 and regs[ROI_BASE] != NO_CLASS and regs[ROI_BASE + 2] == NO_CLASS
    # when it writes 1, then 0 (keep what serves), a handshake after each
    assert not c.write_register(BASE + RECIPE, 1, device_id=UNIT).isError()
    plc.wait_coils(lambda c: c[READY], 5, "ready after the Ack")
    _, regs, _ = handshake(plc, 445)
    assert not c.write_register(BASE + RECIPE, 0, device_id=UNIT).isError()
    plc.wait_coils(lambda c: c[READY], 5, "ready after the Ack")
    handshake(plc, 446)
    # then both ran under part-b with its three ROIs
    assert [rig.rows(p)[0]["recipe"] for p in (445, 446)] == ["part-b", "part-b"]
    assert all(regs[ROI_BASE + 2 * k] != NO_CLASS for k in range(len(ROIS)))
