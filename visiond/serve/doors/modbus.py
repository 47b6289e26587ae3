"""The Modbus TCP door: a PLC triggers a station's inspection with coils and holding registers (pymodbus server).

PLCs speak Modbus, not JSON, so each station (a triggered camera named in `modbus.stations`; with that list
empty, every triggered camera in config order at base 0, 150, 300, ... of unit 1) owns the protocol addresses
base .. base+149 of its unit in both the coil and the holding-register table (0-based protocol addresses:
a PLC's 00001/40001 notation adds 1). The map, R/W as seen by the PLC:

    coil base+0 Trigger W   base+1 Ready R   base+2 Busy R   base+3 ResultOk R   base+4 ResultNg R
         base+5 Error R     base+6 Ack W
    holding base+0..1 part id W (uint32, high word first)   base+2 recipe number W (1-based, config order; 0 = keep)
            base+3 ResultCounter R (+1 per verdict, 65535 -> 0)   base+4 error reason R (0 none, 1 deadline,
            2 camera down, 3 busy, 4 model, 5 other)   base+10+2k / base+11+2k ROI k: class index, score x 1000 R
            (ROI order of the station's config; class 65535 = no result for that ROI)

Handshake: the PLC writes the part id (and recipe number), then Trigger = 1. visiond sets Busy, clears Ready and
asks the inspection core (the same queue, deadline, store and evidence as every door). With the verdict stored it
sets exactly one of ResultOk/ResultNg/Error, the reason code and the ROI registers, increments ResultCounter and
clears Busy, all at once. The PLC reads them and sets Ack; visiond clears the result bits, the reason, Trigger
and Ack and sets Ready (the counter and ROI registers keep the last result). An Ack while Busy is ignored.

Trigger stays 1 from the accepted trigger to the Ack (or the ack timeout), so a Modbus retry of the Trigger write
(the PLC got no answer and sends it again) never starts a second inspection. A Trigger while a handshake is open
is a new part, refused, only when the PLC wrote the part id since the open handshake's Trigger: Error = 1 with
reason 3 (busy), nothing inspected, until Ack or `ack_timeout_s` after the verdict (then the results are cleared
and the timeout logged). Each accepted trigger gets its own trigger id (a token of this start and a per-station
count), so the core's dedupe (same part id and trigger id within 10 min) never answers a second inspection of the
same part from the store, across restarts too. Only verdicts of this door's triggers touch the block: a PLC reading
its result between the bits and the Ack must not see another door's part in the ROI registers.

Writes to read-only addresses are refused with ILLEGAL_ADDRESS (02) and change nothing; a recipe number that is
not configured with ILLEGAL_VALUE (03); a unit without a station with GATEWAY_NO_RESPONSE (0B). The server runs
on its own thread and event loop; Modbus has no authentication, so a bind beyond loopback is logged loudly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer

from visiond.config import MODBUS_BLOCK, Config, ModbusStationConfig
from visiond.errors import UserError
from visiond.serve.inspect.service import InspectionService, Trigger
from visiond.serve.metrics import Metrics

log = logging.getLogger(__name__)

TRIGGER, READY, BUSY, RESULT_OK, RESULT_NG, ERROR, ACK = range(7)  # coil offsets
PART_HI, PART_LO, RECIPE, COUNTER, REASON = range(5)  # holding-register offsets
ROI_BASE = 10  # ROI k: class index at ROI_BASE + 2k, score x 1000 at ROI_BASE + 2k + 1
MAX_ROIS = 64  # config: rois max_length
NO_CLASS = 0xFFFF
WRITABLE_COILS = frozenset({TRIGGER, ACK})
WRITABLE_REGS = frozenset({PART_HI, PART_LO, RECIPE})
REASON_CODES = {"deadline": 1, "camera_down": 2, "busy": 3, "model": 4, "roi": 4}
OTHER_REASON = 5
COIL_CODES = frozenset({1, 5, 15})
REGISTER_CODES = frozenset({3, 6, 16, 22, 23})
_SWEEP_S = 0.1  # how often the ack timeout is checked
_START_TIMEOUT_S = 10.0

assert ROI_BASE + 2 * MAX_ROIS <= MODBUS_BLOCK


class StationBlock:
    """One station's coils and registers and its side of the handshake. Callers hold the door's lock."""

    def __init__(self, camera: str, base: int, unit: int):
        self.camera, self.base, self.unit = camera, base, unit
        self.coils = [False] * MODBUS_BLOCK
        self.regs = [0] * MODBUS_BLOCK
        for k in range(MAX_ROIS):
            self.regs[ROI_BASE + 2 * k] = NO_CLASS
        self.phase = "free"  # free -> busy (inspecting) -> done (results shown until Ack) -> free
        self.job = 0  # handshakes accepted; a verdict must carry the open one's
        self.part = ""  # the open handshake's part id
        self.new_part = False  # the PLC wrote a part id since the open handshake's Trigger
        self.refused = False  # a new part's Trigger was refused: Error/busy shown until Ack
        self.done_at = 0.0
        self.camera_ok = False

    def contains(self, address: int, count: int) -> bool:
        return self.base <= address and address + count <= self.base + MODBUS_BLOCK

    def trigger(self) -> str:
        """Trigger written 1: "start" (a handshake opens), "repeat" (a retry: nothing changes), "refuse" (a new
        part while the handshake is open) or "refused" (another such Trigger after the first refusal)."""
        if self.phase == "free":
            self.job += 1
            self.phase, self.new_part, self.refused = "busy", False, False
            self.part = str(self.regs[PART_HI] << 16 | self.regs[PART_LO])
            self._show(busy=True)
            self.regs[REASON] = 0
            return "start"
        if not self.new_part:
            return "repeat"
        if self.refused:
            return "refused"
        self.refused = True
        self._show(busy=self.phase == "busy", error=True)
        self.regs[REASON] = REASON_CODES["busy"]
        return "refuse"

    def ack(self) -> bool:
        """Ack written 1: the open handshake closes when its results are shown (not while Busy)."""
        self.coils[ACK] = True  # reads back 1 until the loop's next turn (the write's echo), then 0
        if self.phase != "done":
            return False
        self.close()
        return True

    def write_part(self) -> None:
        if self.phase != "free":
            self.new_part = True

    def result(self, job: int, verdict: str, reason: str | None, rois: Sequence[tuple[int, int]], now: float) -> bool:
        """The open handshake's verdict: bits, reason, ROI registers and counter change together."""
        if job != self.job or self.phase != "busy":
            return False
        for k in range(MAX_ROIS):
            self.regs[ROI_BASE + 2 * k], self.regs[ROI_BASE + 2 * k + 1] = rois[k] if k < len(rois) else (NO_CLASS, 0)
        self.regs[COUNTER] = (self.regs[COUNTER] + 1) & 0xFFFF
        self.phase, self.done_at = "done", now
        if self.refused:  # a new part was refused meanwhile: that stays the answer until Ack
            self._show(error=True)
            return True
        self._show(ok=verdict == "OK", ng=verdict == "NG", error=verdict not in ("OK", "NG"))
        self.regs[REASON] = 0 if verdict in ("OK", "NG") else REASON_CODES.get(reason or "", OTHER_REASON)
        return True

    def close(self) -> None:
        self.phase, self.new_part, self.refused, self.part = "free", False, False, ""
        self.coils[TRIGGER] = False
        self.regs[REASON] = 0
        self._show()

    def set_camera_ok(self, ok: bool) -> None:
        self.camera_ok = ok
        if self.phase == "free":
            self.coils[READY] = ok

    def _show(self, *, busy: bool = False, ok: bool = False, ng: bool = False, error: bool = False) -> None:
        c = self.coils
        c[TRIGGER] = self.phase != "free"
        c[READY] = self.phase == "free" and self.camera_ok
        c[BUSY], c[RESULT_OK], c[RESULT_NG], c[ERROR] = busy, ok, ng, error


class RegisterStore(ModbusServerContext):
    """The datastore pymodbus' server reads and writes through, over the door's station blocks.

    pymodbus 3.16 deprecates its datastores for a simulator model; a ModbusServerContext that holds neither
    (`simdevices` empty, `old_simulator` set) is called directly with each request's unit, function code,
    address and values, which is all a register map with a handshake behind it needs.
    """

    def __init__(self, door: ModbusDoor):  # no super().__init__: it builds the device model this replaces
        self.simdevices: list = []
        self.old_simulator = True
        self._door = door

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):
        try:
            return self._door.read(device_id, func_code, address, count)
        except Exception:  # never let a request take the server down
            log.exception("modbus: read of unit %s address %s failed", device_id, address)
            return ExcCodes.DEVICE_FAILURE

    async def async_setValues(self, device_id: int, func_code: int, address: int, values) -> ExcCodes | None:
        try:
            return self._door.write(device_id, func_code, address, list(values))
        except Exception:
            log.exception("modbus: write to unit %s address %s failed", device_id, address)
            return ExcCodes.DEVICE_FAILURE

    def device_ids(self) -> list[int]:
        return self._door.units()


class ModbusDoor:
    """The Modbus TCP server of the triggered stations, on its own thread and event loop (see the module doc)."""

    def __init__(self, cfg: Config, service: InspectionService, control: Any, metrics: Metrics,
                 set_detail: Callable[[dict], None]):
        self.cfg = cfg.modbus
        self._service = service
        self._control = control
        self._metrics = metrics
        self._set_detail = set_detail
        self.recipes = list(cfg.recipes)  # recipe number n = the n-th recipe in the config (1-based)
        layout = self.cfg.stations or {name: ModbusStationConfig(base=i * MODBUS_BLOCK, unit=1)
                                       for i, name in enumerate(service.stations)}
        self.blocks = {name: StationBlock(name, st.base, st.unit) for name, st in layout.items()}
        self._by_unit: dict[int, list[StationBlock]] = {}
        for block in self.blocks.values():
            self._by_unit.setdefault(block.unit, []).append(block)
        self._lock = threading.Lock()
        self._boot = uuid.uuid4().hex[:8]  # trigger ids stay unique across restarts
        self._warned: set[tuple] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._listening = threading.Event()
        self._start_error: str | None = None
        self._address: tuple[str, int] | None = None

    # ---- lifecycle ------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on (the picked one for port 0); valid after start()."""
        if self._address is None:
            raise RuntimeError("the Modbus door is not listening")
        return self._address

    def start(self) -> None:
        """Listen, then return; UserError (one line) when the address cannot be bound."""
        self._service.on_ready(self._state_changed)
        with self._lock:
            for block in self.blocks.values():
                block.set_camera_ok(self._service.state(block.camera) != "error")
        # pymodbus logs a line per undecodable frame: a flood under abuse. The door logs its own refusals and
        # counts undecodable frames (visiond_door_refusals_total{door="modbus",reason="malformed"}).
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._run, name="modbus", daemon=True)
        self._thread.start()
        if not self._listening.wait(_START_TIMEOUT_S):
            raise UserError(f"modbus: the server did not start listening within {_START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            raise UserError(self._start_error)
        host, port = self._address
        log.info("modbus: listening on %s:%d; %s; recipe numbers: %s", host, port,
                 ", ".join(f"{b.camera} at unit {b.unit} base {b.base}" for b in self.blocks.values()),
                 ", ".join(f"{i} = {name}" for i, name in enumerate(self.recipes, 1)) or "none configured")
        detail: dict = {"modbus": {"address": f"{host}:{port}", "recipes": self.recipes,
                                   "stations": {b.camera: {"unit": b.unit, "base": b.base}
                                                for b in self.blocks.values()}}}
        if not is_loopback(self.cfg.bind):
            warning = (f"Modbus TCP listens on {host}:{port}, beyond this box; Modbus has no authentication: "
                       "anyone who reaches the port can trigger inspections and switch recipes")
            log.warning("!!! %s; bind it to 127.0.0.1 or firewall the port to the PLC !!!", warning)
            detail["modbus_warning"] = warning
        self._set_detail(detail)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection; open handshakes are abandoned (their verdicts are stored)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("modbus: the server thread did not stop within %.0f s", timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as exc:
            log.exception("modbus: the server failed")
            if not self._listening.is_set():
                self._start_error = f"modbus: the server failed to start ({exc.__class__.__name__}: {exc})"
        finally:
            self._listening.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        bind, port = self.cfg.bind, self.cfg.port
        server = ModbusTcpServer(RegisterStore(self), address=(bind, port), trace_pdu=self._traced)
        if not await server.listen():
            self._start_error = f"modbus: cannot listen on {bind}:{port} ({bind_problem(bind, port)})"
            return
        self._address = tuple(server.transport.sockets[0].getsockname()[:2])
        self._listening.set()
        sweeper = asyncio.create_task(self._sweep())
        try:
            await self._stopping.wait()
        finally:
            sweeper.cancel()
            await server.shutdown()

    async def _sweep(self) -> None:
        timeout = self.cfg.ack_timeout_s
        while True:
            await asyncio.sleep(_SWEEP_S)
            if not timeout:
                continue
            now = time.monotonic()
            with self._lock:
                expired = [(b.camera, b.part, b.regs[COUNTER]) for b in self.blocks.values()
                           if b.phase == "done" and now - b.done_at >= timeout]
                for name, _, _ in expired:
                    self.blocks[name].close()
            for name, part, counter in expired:
                log.warning("modbus station %s: no Ack within %g s of the result of part %s (counter %d); "
                            "results cleared, Ready again", name, timeout, part, counter)

    # ---- requests (the server's event loop) -------------------------------------------
    def units(self) -> list[int]:
        return sorted(self._by_unit)

    def read(self, unit: int, func_code: int, address: int, count: int) -> list | ExcCodes:
        found = self._locate(unit, func_code, address, count)
        if isinstance(found, ExcCodes):
            return found
        block, offset = found
        with self._lock:
            table = block.coils if func_code in COIL_CODES else block.regs
            return list(table[offset:offset + count])

    def write(self, unit: int, func_code: int, address: int, values: list) -> ExcCodes | None:
        found = self._locate(unit, func_code, address, len(values))
        if isinstance(found, ExcCodes):
            return found
        block, offset = found
        coils = func_code in COIL_CODES
        writable = WRITABLE_COILS if coils else WRITABLE_REGS
        offsets = range(offset, offset + len(values))
        if not set(offsets) <= writable:
            return self._refuse("read_only", ExcCodes.ILLEGAL_ADDRESS, block, func_code, address, len(values))
        if coils:
            return self._write_coils(block, dict(zip(offsets, values)))
        recipe = dict(zip(offsets, values)).get(RECIPE)
        if recipe is not None and not 0 <= recipe <= len(self.recipes):
            return self._refuse("bad_value", ExcCodes.ILLEGAL_VALUE, block, func_code, address, len(values),
                                f"recipe number {recipe}: expected 0 (keep) or 1..{len(self.recipes)}")
        with self._lock:
            switch = recipe is not None and recipe != 0 and recipe != block.regs[RECIPE]
            for off, value in zip(offsets, values):
                block.regs[off] = int(value) & 0xFFFF
            if PART_HI in offsets or PART_LO in offsets:
                block.write_part()
        if switch:
            self._switch_recipe(self.recipes[recipe - 1])
        return None

    def _write_coils(self, block: StationBlock, values: dict[int, bool]) -> None:
        for offset, value in values.items():
            if not value:
                continue  # visiond clears Trigger and Ack itself; a 0 written to them changes nothing
            if offset == ACK:
                with self._lock:
                    block.ack()
                self._loop.call_soon(self._release_ack, block)
                continue
            with self._lock:
                outcome = block.trigger()
                job, part, recipe = block.job, block.part, block.regs[RECIPE]
            if outcome == "start":
                self._submit(block, job, part, recipe)
            elif outcome in ("refuse", "refused"):
                self._metrics.door_refusals.labels(door="modbus", reason="busy").inc()
                level = logging.WARNING if outcome == "refuse" else logging.DEBUG  # a PLC may keep trying
                log.log(level, "modbus station %s: Trigger for a new part refused: the handshake of part %s is not "
                        "acknowledged (Error, reason 3 busy until Ack or the ack timeout)", block.camera, part)
        return None

    def _release_ack(self, block: StationBlock) -> None:
        with self._lock:
            block.coils[ACK] = False

    def _locate(self, unit: int, func_code: int, address: int, count: int) -> tuple[StationBlock, int] | ExcCodes:
        blocks = self._by_unit.get(unit)
        if blocks is None:
            self._metrics.door_refusals.labels(door="modbus", reason="bad_address").inc()
            return ExcCodes.GATEWAY_NO_RESPONSE
        if func_code in COIL_CODES or func_code in REGISTER_CODES:
            for block in blocks:
                if block.contains(address, count):
                    return block, address - block.base
        # discrete inputs and input registers (FC 2, 4) are not in the map; nor is an address outside every block
        self._metrics.door_refusals.labels(door="modbus", reason="bad_address").inc()
        return ExcCodes.ILLEGAL_ADDRESS

    def _refuse(self, reason: str, code: ExcCodes, block: StationBlock, func_code: int, address: int, count: int,
                why: str | None = None) -> ExcCodes:
        self._metrics.door_refusals.labels(door="modbus", reason=reason).inc()
        key = (block.camera, reason, func_code, address, count)
        if key not in self._warned and len(self._warned) < 1000:  # once per kind of write: a PLC repeats them
            self._warned.add(key)
            table = "coil" if func_code in COIL_CODES else "holding register"
            log.warning("modbus station %s: write of %d %s(s) at %d (FC %d) refused: %s", block.camera, count, table,
                        address, func_code, why or "read-only address (see the register map)")
        return code

    def _traced(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        """pymodbus answers a frame it cannot decode with ILLEGAL_FUNCTION: counted as malformed."""
        try:
            if sending and isinstance(pdu, ExceptionResponse) and pdu.exception_code == ExcCodes.ILLEGAL_FUNCTION:
                self._metrics.door_refusals.labels(door="modbus", reason="malformed").inc()
        except Exception:
            log.exception("modbus: counting a refused frame failed")
        return pdu

    # ---- the core ------------------------------------------------------------------
    def _submit(self, block: StationBlock, job: int, part: str, recipe: int) -> None:
        trigger = Trigger(camera=block.camera, part_id=part, door="modbus", trigger_id=f"{self._boot}-{job}",
                          recipe=self.recipes[recipe - 1] if recipe else None,
                          reply=lambda payload: self._answered(block, job, payload))
        try:
            self._service.trigger(trigger)
        except ValueError as exc:  # not expected: the config names triggered stations, part ids are numbers
            log.error("modbus station %s: trigger for part %s refused by the core: %s", block.camera, part, exc)
            with self._lock:
                block.result(job, "ERROR", "other", (), time.monotonic())

    def _answered(self, block: StationBlock, job: int, payload: bytes) -> None:
        """The core's answer to this door's trigger (station thread)."""
        doc = json.loads(payload)
        rois = self._roi_registers(block.camera, doc.get("rois") or [])
        with self._lock:
            shown = block.result(job, doc.get("verdict", "ERROR"), doc.get("reason"), rois, time.monotonic())
        if not shown:
            log.info("modbus station %s: verdict of part %s came after its handshake was closed; it is stored, "
                     "not shown", block.camera, doc.get("part_id"))

    def _roi_registers(self, camera: str, rois: list[dict]) -> list[tuple[int, int]]:
        """(class index, score x 1000) per ROI; the class index is NO_CLASS when the ROI's model is not the one
        serving now (a recipe switched between the verdict and this) or the ROI has no result."""
        serving = self._control.slot.active
        plans = {p.name: p for p in serving.plans(camera)}
        out = []
        for roi in rois[:MAX_ROIS]:
            plan = plans.get(roi.get("name"))
            index = NO_CLASS
            if plan is not None and serving.model_ref(plan.model).version == (roi.get("model") or {}).get("version"):
                classes = list(plan.decider.classes)
                if roi.get("label") in classes:
                    index = classes.index(roi["label"])
            score = roi.get("score")
            out.append((index, 0 if score is None else round(min(max(float(score), 0.0), 1.0) * 1000)))
        return out

    def _switch_recipe(self, name: str) -> None:
        """A recipe number written: load it now, so the next part does not wait for it (its trigger names it)."""
        def run():
            try:
                self._control.switch_recipe(name, 600.0)
                log.info("modbus: recipe %s serves (selected by the PLC)", name)
            except Exception as exc:
                log.error("modbus: recipe %s selected by the PLC does not serve: %s", name, exc)

        threading.Thread(target=run, name=f"modbus-recipe-{name}", daemon=True).start()

    def _state_changed(self, camera: str, state: str) -> None:
        block = self.blocks.get(camera)
        if block is not None:
            with self._lock:
                block.set_camera_ok(state != "error")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, port: int) -> str:
    """Why (host, port) cannot be bound, in the OS's words (pymodbus only says that it failed)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the address could not be bound"
