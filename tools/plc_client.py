"""One inspection through one of visiond's doors, as a PLC program would ask for it: read this to write your own.

    python tools/plc_client.py modbus HOST PORT --base 0 --part 123              # Trigger -> Busy -> Result -> Ack
    python tools/plc_client.py opcua opc.tcp://HOST:PORT NODE CAMERA --part 123  # calls <node>.<camera>.Inspect
    python tools/plc_client.py mqtt HOST PORT NODE CAMERA --part 123             # cmd/inspect, MQTT 5 request/response

Prints `part <id>: <OK|NG|ERROR>` and what came with it; exits 1 with a one-line reason when no verdict came.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def modbus(a) -> str:
    from pymodbus.client import ModbusTcpClient

    plc = ModbusTcpClient(a.host, port=a.port, timeout=3)
    if not plc.connect():
        sys.exit(f"cannot connect to {a.host}:{a.port}")

    def ok(r):  # a Modbus exception (wrong base or unit, a read-only address) ends the script with its code
        if r.isError():
            sys.exit(f"Modbus exception at base {a.base} unit {a.unit}: {r}")
        return r

    def coils():  # Trigger, Ready, Busy, ResultOk, ResultNg, Error, Ack
        return ok(plc.read_coils(a.base, count=7, device_id=a.unit)).bits[:7]

    def regs():  # part id high, part id low, recipe number, ResultCounter, error reason
        return ok(plc.read_holding_registers(a.base, count=5, device_id=a.unit)).registers

    if not coils()[1]:
        sys.exit(f"station not Ready (coils {coils()}): camera down, or a handshake waits for its Ack")
    counter = regs()[3]
    ok(plc.write_registers(a.base, [a.part >> 16, a.part & 0xFFFF], device_id=a.unit))  # 1. part id (uint32)
    ok(plc.write_coil(a.base + 0, True, device_id=a.unit))  # 2. Trigger = 1; visiond answers Busy = 1
    end = time.monotonic() + 10
    while regs()[3] == counter:  # 3. wait until ResultCounter steps: the result bits are set
        if time.monotonic() > end:
            sys.exit(f"part {a.part}: no result within 10 s")
        time.sleep(0.01)
    _, _, _, good, bad, _, _ = coils()
    reason, counter = regs()[4], regs()[3]
    ok(plc.write_coil(a.base + 6, True, device_id=a.unit))  # 4. Ack = 1; visiond clears the bits and sets Ready
    plc.close()
    return f"{'OK' if good else 'NG' if bad else 'ERROR'} (ResultCounter {counter}, reason code {reason})"


def opcua(a) -> str:
    from asyncua import ua
    from asyncua.sync import Client

    with Client(a.url, timeout=15) as client:
        ns = client.get_namespace_index(f"urn:visiond:{a.node}")
        station = client.get_node(f"ns={ns};s={a.node}.{a.camera}")  # node ids are stable strings: hard-code them
        inspect = ua.NodeId.from_string(f"ns={ns};s={a.node}.{a.camera}.Inspect")
        job, verdict, _ = station.call_method(inspect, a.part, a.recipe)  # waits for the stored verdict
    return f"{verdict} (job {job})"


def mqtt(a) -> str:
    from visiond.harness.requester import Requester

    with Requester(a.host, a.port, a.node) as plc:
        doc = plc.answer(plc.inspect(a.camera, a.part, **({"recipe": a.recipe} if a.recipe else {})), 10)
    return f"{doc['verdict']} (job {doc['job_id']}{', reason ' + doc['reason'] if doc.get('reason') else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    doors = parser.add_subparsers(dest="door", required=True)
    for door, positional in (("modbus", "host port"), ("opcua", "url node camera"), ("mqtt", "host port node camera")):
        p = doors.add_parser(door)
        for name in positional.split():
            p.add_argument(name, type=int if name == "port" else str)
        if door == "modbus":
            p.add_argument("--base", type=int, default=0, help="the station's first coil and register (0-based)")
            p.add_argument("--unit", type=int, default=1)
            p.add_argument("--part", type=int, required=True, help="part id, 0 to 4294967295")
        else:
            p.add_argument("--part", required=True)
            p.add_argument("--recipe", default="", help="a recipe to inspect the part under (default: the one serving)")
    a = parser.parse_args()
    logging.disable(logging.ERROR)  # the client libraries' own log lines; the one line below says it all
    if a.door == "modbus" and not 0 <= a.part <= 0xFFFFFFFF:
        parser.error(f"--part: got {a.part}, expected 0 to 4294967295 (two registers)")
    try:
        print(f"part {a.part}: {dict(modbus=modbus, opcua=opcua, mqtt=mqtt)[a.door](a)}")
    except Exception as exc:  # connection refused, a timeout, a Bad status from the server: one line
        sys.exit(f"{a.door}: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
