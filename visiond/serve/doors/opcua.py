"""The OPC UA door (DESIGN.md "Inspecting parts" -> OPC UA): the triggered stations as an asyncua server.

A PLC or SCADA client finds namespace `urn:visiond:<node>`, reads each station's state
and last result, subscribes to `LastVerdict` or `ResultSequence`, and calls
`Inspect(partId, recipe)`: the same InspectionService as every other door takes the
trigger, and the call answers with the verdict once it is stored. The server runs on its
own thread and asyncio loop; the station threads hand it verdicts and states through
`call_soon_threadsafe` and never wait on it.

Variables follow every stored verdict, whichever door asked; the counters and
`ResultSequence` count from the daemon's start (the results store keeps the history),
`RecipeName` is "" while the config's own models serve, and an ROI the last verdict has
no word on (an ERROR) shows Label "" and Score 0.

Who may do what (decided here, in `AccessPolicy` and `DoorUsers`):
- security sign / sign_encrypt: Basic256Sha256 endpoints only, and a session must come
  over a signed channel (asyncua would otherwise let a client open an unsecured channel
  beside the secured endpoints);
- a user name must match `users`; with `trusted_clients`, a client certificate not in
  that folder is refused, and with no `users` a trusted certificate is the credential;
- without credentials: refused, or read-only with `allow_anonymous` (no method calls);
- on loopback with neither `users` nor `trusted_clients` every local client may call
  (the local test rig, like an MQTT broker on localhost without a password).
Every refusal is one log line and counts in `visiond_door_refusals_total{door="opcua"}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from visiond.config import LOOPBACK, Config, OpcUaConfig
from visiond.errors import UserError
from visiond.fsutil import atomic_replace, atomic_write
from visiond.serve.inspect.service import Trigger
from visiond.serve.metrics import Metrics

log = logging.getLogger(__name__)

DOOR = "opcua"
REFUSALS = ("bad_credentials", "no_credentials", "untrusted_certificate", "expired_certificate", "insecure_channel",
            "read_only", "not_permitted")
RECIPE_WAIT_S = 30.0  # SelectRecipe waits this long for the recipe to serve; the switch goes on after that
_START_TIMEOUT_S = 60.0
_RECIPE_POLL_S = 0.5  # RecipeName follows switches made through other doors
_STATE = {"ready": "Ready", "busy": "Busy", "error": "Error"}
_S, _U32, _F64, _BOOL = ua.VariantType.String, ua.VariantType.UInt32, ua.VariantType.Double, ua.VariantType.Boolean
STATION_VARIABLES = {"State": _S, "RecipeName": _S, "LastPartId": _S, "LastJobId": _S, "LastVerdict": _S,
                     "LastResult": _S, "ResultSequence": _U32, "OkCount": _U32, "NgCount": _U32, "ErrorCount": _U32}
_COUNTER = {"OK": "OkCount", "NG": "NgCount", "ERROR": "ErrorCount"}
_CALL = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
_WRITE = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)


def namespace_uri(node: str) -> str:
    """The namespace, which is also the server's application URI (what `make_certificate` writes)."""
    return f"urn:visiond:{node}"


# ---- who may do what ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessPolicy:
    """The door's rules, from `opcua:` in the config (see the module docstring)."""

    secured: bool  # sign or sign_encrypt: sessions only over a signed channel
    users: dict[str, str]
    trusted: TrustList | None
    anonymous: str  # "off" | "read" | "full" (loopback without users or trusted_clients)

    @classmethod
    def from_config(cls, oc: OpcUaConfig) -> AccessPolicy:
        users = {name: secret.get_secret_value() for name, secret in oc.users.items()}
        open_rig = oc.host in LOOPBACK and not users and oc.trusted_clients is None
        anonymous = "full" if open_rig else "read" if oc.allow_anonymous else "off"
        trusted = TrustList(oc.trusted_clients) if oc.trusted_clients is not None else None
        return cls(oc.security != "none", users, trusted, anonymous)


class TrustList:
    """The client certificates in `trusted_clients` (DER or PEM, one a file), read again when the folder changes,
    so an operator trusts a new PLC by copying its certificate there."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._seen: tuple | None = None
        self._certs: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()

    def contains(self, der: bytes) -> bool:
        return _first_der(der) in self._load()

    def _load(self) -> frozenset[bytes]:
        try:
            files = sorted(p for p in self.folder.iterdir() if p.is_file())
            seen = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
        except OSError as exc:
            log.error("opcua: cannot read trusted_clients %s (%s); no client is trusted", self.folder, exc.strerror)
            return frozenset()
        with self._lock:
            if seen != self._seen:
                certs = set()
                for path in files:
                    try:
                        certs.add(_cert_der(path.read_bytes()))
                    except (OSError, ValueError):
                        log.warning("opcua: trusted_clients: %s is not a certificate (DER or PEM); ignored", path)
                self._seen, self._certs = seen, frozenset(certs)
            return self._certs


class DoorUsers(UserManager):
    """asyncua's user manager: who a session is, once it activates (None = refused, BadUserAccessDenied)."""

    def __init__(self, policy: AccessPolicy, refuse: Callable[[str, str], None]):
        self.policy = policy
        self._refuse = refuse

    def get_user(self, iserver, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        p = self.policy
        if p.secured and not certificate:
            return self._no("insecure_channel", "a session over an unsecured channel; expected Basic256Sha256")
        if p.trusted is not None and certificate and not p.trusted.contains(certificate):
            return self._no("untrusted_certificate", f"client certificate {_subject(certificate)} is not in "
                                                     f"{p.trusted.folder}")
        if username is not None:
            expected = p.users.get(username)
            if expected is None or not hmac.compare_digest((password or "").encode(), expected.encode()):
                return self._no("bad_credentials", f"user {username[:64]!r}: wrong user name or password")
            return User(role=UserRole.User, name=username)
        if p.trusted is not None and not p.users and certificate:
            return User(role=UserRole.User, name=_subject(certificate))
        if p.anonymous == "full":
            return User(role=UserRole.User, name="anonymous (loopback)")
        if p.anonymous == "read":
            return User(role=UserRole.Anonymous)
        return self._no("no_credentials", "a client without credentials")

    def _no(self, reason: str, why: str) -> None:
        self._refuse(reason, why)
        return None


class DoorPermissions(PermissionRuleset):
    """Users may read, subscribe and call; anonymous clients (allow_anonymous) may read and subscribe only."""

    def __init__(self, refuse: Callable[[str, str], None]):
        user = frozenset(ua.NodeId(t) for t in USER_TYPES)
        self._allowed = {UserRole.User: user, UserRole.Anonymous: user - {_CALL, _WRITE}}
        self._refuse = refuse

    def check_validity(self, user, action_type_id, body) -> bool:
        if action_type_id in self._allowed.get(user.role, ()):
            return True
        if user.role is UserRole.Anonymous:
            self._refuse("read_only", "an anonymous client tried to call a method or write; anonymous is read-only")
        else:
            self._refuse("not_permitted", f"{user.name or 'a client'} asked for a service this door does not offer")
        return False


# ---- the door ----------------------------------------------------------------------------------------
class OpcUaDoor:
    """The asyncua server on its own thread; `start()` returns once it listens, `stop()` takes it down."""

    def __init__(self, cfg: Config, service, control, metrics: Metrics,
                 set_detail: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.oc = cfg.opcua
        self.node = cfg.node
        self.namespace = namespace_uri(cfg.node)
        self._service = service
        self._control = control
        self._metrics = metrics
        self._set_detail = set_detail
        self.policy = AccessPolicy.from_config(self.oc)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._updates: asyncio.Queue | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="opcua-call")
        self._stations: dict[str, _StationNodes] = {}
        self._recipe: str | None = None
        self.ns: int | None = None

    # ---- lifecycle (the daemon's thread) ----------------------------------------------------------
    def start(self) -> None:
        """Listen on `opcua.endpoint`; UserError (one line) when the certificate or the port is not usable."""
        for reason in REFUSALS:
            self._metrics.door_refusals.labels(door=DOOR, reason=reason)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("asyncua").setLevel(logging.WARNING)  # a line per call and session otherwise
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.stop()
            raise UserError(f"opcua: the server did not start within {_START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            self._thread.join(5.0)
            self._pool.shutdown(wait=False)
            raise UserError(self._start_error)
        self._service.on_verdict(lambda camera, payload: self._post(("verdict", camera, payload)))
        self._service.on_ready(lambda camera, state: self._post(("state", camera, state)))
        for camera in self._stations:  # what changed while the server was being built
            self._post(("state", camera, self._service.state(camera)))
        access = {"full": "open to local clients", "read": "anonymous read-only", "off": "credentials required"}
        log.info("opcua: listening on %s (security %s, %s), namespace %s (ns=%d), %d station(s)", self.oc.endpoint,
                 self.oc.security, access[self.policy.anonymous], self.namespace, self.ns, len(self._stations))
        if self._set_detail is not None:
            self._set_detail({"opcua": {"endpoint": self.oc.endpoint, "security": self.oc.security,
                                        "namespace": self.namespace, "anonymous": self.policy.anonymous}})

    def alive(self) -> bool:
        """False once the server's thread has ended (after a start, only through `stop()` or a crash)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every session and the listening socket; calls still waiting for a verdict are dropped."""
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is not None and stopping is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop has just closed
                pass
            thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # never a traceback into the daemon's thread list; start() reports it
            log.exception("opcua: the server failed")
            self._start_error = self._start_error or f"opcua: the server failed ({exc.__class__.__name__}: {exc})"
        finally:
            self._ready.set()
            self._loop = None
            loop.close()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._updates = asyncio.Queue()
        quiet = logging.getLogger("asyncua.server.server")
        level = quiet.level
        try:
            server = await self._build_server()
            quiet.setLevel(logging.CRITICAL)  # a port in use is one line from start(), not asyncua's traceback
            await server.start()
        except UserError as exc:
            self._start_error = str(exc)
            return
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            self._start_error = (f"opcua: cannot listen on {self.oc.host}:{self.oc.port} ({why}); "
                                 "expected a free port (opcua.endpoint)")
            return
        finally:
            quiet.setLevel(level)
        # Advertised above are only the tokens this door accepts; from here on every token reaches DoorUsers, so a
        # client that tries without credentials (or with a user name where none are configured) is counted too.
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        tasks = [asyncio.create_task(self._apply_updates()), asyncio.create_task(self._follow_recipe())]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await server.stop()

    async def _build_server(self) -> Server:
        server = Server(user_manager=DoorUsers(self.policy, self._refuse))
        await server.init()
        server.set_endpoint(self.oc.endpoint)
        server.set_server_name(f"visiond {self.node}")
        server.product_uri = "urn:visiond"
        server.allow_remote_admin(False)
        await server.set_application_uri(self.namespace)
        if self.oc.cert is not None and self.oc.key is not None:
            cert, key = load_server_identity(self.oc.cert, self.oc.key)
            await server.load_certificate(cert)
            await server.load_private_key(key)
        elif self.policy.secured:
            raise UserError(f"opcua.security {self.oc.security}: expected cert and key (`visiond opcua make-cert` "
                            "writes them)")
        server.set_security_policy(_policies(self.oc.security), permission_ruleset=DoorPermissions(self._refuse))
        server.set_identity_tokens(self._advertised_tokens())
        server.set_certificate_validator(self._check_client_certificate)
        self.ns = await server.register_namespace(self.namespace)
        await self._build_address_space(server)
        return server

    def _advertised_tokens(self) -> list[type]:
        p = self.policy
        tokens = []
        if p.anonymous != "off" or (p.trusted is not None and not p.users):
            tokens.append(ua.AnonymousIdentityToken)  # with trusted_clients alone the certificate is the credential
        if p.users:
            tokens.append(ua.UserNameIdentityToken)
        return tokens

    # ---- the address space (the server's loop) ----------------------------------------------------
    async def _build_address_space(self, server: Server) -> None:
        ns, node = self.ns, self.node
        root = await server.nodes.objects.add_object(ua.NodeId(node, ns), ua.QualifiedName(node, ns))
        await root.add_method(ua.NodeId(f"{node}.SelectRecipe", ns), ua.QualifiedName("SelectRecipe", ns),
                              self._select_recipe, [_arg("name", _S, "A configured recipe.")],
                              [_arg("ok", _BOOL, "True once the recipe serves."),
                               _arg("message", _S, "What happened, in one line.")])
        self._recipe = self._control.slot.active.recipe
        for camera in self._service.stations:
            self._stations[camera] = await self._add_station(root, camera)

    async def _add_station(self, root, camera: str) -> _StationNodes:
        ns, base = self.ns, f"{self.node}.{camera}"
        obj = await root.add_object(ua.NodeId(base, ns), ua.QualifiedName(camera, ns))
        initial = {"State": _STATE.get(self._service.state(camera), "Error"), "RecipeName": self._recipe or ""}
        variables = {}
        for name, vtype in STATION_VARIABLES.items():
            value = initial.get(name, 0 if vtype == _U32 else "")
            variables[name] = await obj.add_variable(ua.NodeId(f"{base}.{name}", ns), ua.QualifiedName(name, ns),
                                                     ua.Variant(value, vtype))

        async def inspect(parent, *args):
            return await self._inspect(camera, args)

        await obj.add_method(ua.NodeId(f"{base}.Inspect", ns), ua.QualifiedName("Inspect", ns), inspect,
                             [_arg("partId", _S, "The part's id (1 to 128 characters)."),
                              _arg("recipe", _S, "A recipe to inspect it under; empty keeps the one serving.")],
                             [_arg("jobId", _S, "The inspection job (the results store's key)."),
                              _arg("verdict", _S, "OK, NG or ERROR."),
                              _arg("resultJson", _S, "The inspection payload (visiond.inspection/1).")])
        station = _StationNodes(obj, variables)
        for plan in self._control.slot.active.plans(camera):
            await self._roi(station, camera, plan.name)
        return station

    async def _roi(self, station: _StationNodes, camera: str, roi: str):
        """The ROI's (Label, Score) nodes, made on first sight (a recipe may bring new ROIs); None on a clash."""
        if roi in station.rois or roi in station.clashes:
            return station.rois.get(roi)
        if roi in STATION_VARIABLES or roi == "Inspect":
            station.clashes.add(roi)
            log.warning("opcua: camera %s: ROI %r has the name of a station variable; its Label and Score are not "
                        "served (rename the ROI)", camera, roi)
            return None
        ns, base = self.ns, f"{self.node}.{camera}.{roi}"
        obj = await station.obj.add_object(ua.NodeId(base, ns), ua.QualifiedName(roi, ns))
        label = await obj.add_variable(ua.NodeId(f"{base}.Label", ns), ua.QualifiedName("Label", ns),
                                       ua.Variant("", _S))
        score = await obj.add_variable(ua.NodeId(f"{base}.Score", ns), ua.QualifiedName("Score", ns),
                                       ua.Variant(0.0, _F64))
        station.rois[roi] = (label, score)
        return station.rois[roi]

    # ---- updates from the inspection core (any thread in, the server's loop out) -------------------
    def _post(self, item: tuple) -> None:
        """Station threads: hand a verdict, state or reply to the server's loop, in order; never blocks."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._updates.put_nowait, item)
        except RuntimeError:  # the loop closed meanwhile (stop)
            pass

    async def _apply_updates(self) -> None:
        """One consumer, so a station's variables change in the order its verdicts were decided, and an Inspect
        call answers only after the variables show its verdict."""
        while True:
            item = await self._updates.get()
            try:
                if item[0] == "verdict":
                    await self._apply_verdict(item[1], item[2])
                elif item[0] == "state":
                    station = self._stations.get(item[1])
                    if station is not None:
                        await station.write("State", _STATE.get(item[2], "Error"))
                elif not item[1].done():
                    item[1].set_result(item[2])
            except Exception:
                log.exception("opcua: could not show an update (%s)", item[0])

    async def _apply_verdict(self, camera: str, payload: bytes) -> None:
        station = self._stations.get(camera)
        if station is None:
            return
        doc = json.loads(payload)
        verdict = doc.get("verdict", "ERROR")
        counter = _COUNTER.get(verdict, "ErrorCount")
        station.counts[counter] = (station.counts[counter] + 1) % 2**32
        station.sequence = (station.sequence + 1) % 2**32
        await station.write("LastResult", payload.decode("utf-8", "replace"))
        await station.write("LastPartId", str(doc.get("part_id") or ""))
        await station.write("LastJobId", str(doc.get("job_id") or ""))
        shown = {}
        for roi in doc.get("rois") or []:
            shown[roi.get("name")] = (str(roi.get("label") or ""), float(roi.get("score") or 0.0))
        for name in shown:
            await self._roi(station, camera, name)
        for name, (label, score) in station.rois.items():  # ROIs the verdict has no word on (ERROR) are cleared
            value = shown.get(name, ("", 0.0))
            await label.write_value(ua.Variant(value[0], _S))
            await score.write_value(ua.Variant(value[1], _F64))
        await station.write(counter, station.counts[counter])
        await self._show_recipe()
        await station.write("LastVerdict", verdict)
        await station.write("ResultSequence", station.sequence)  # last: a client woken by it reads the rest

    async def _follow_recipe(self) -> None:
        while True:
            await asyncio.sleep(_RECIPE_POLL_S)
            try:
                await self._show_recipe()
            except Exception:
                log.exception("opcua: could not show the recipe")

    async def _show_recipe(self) -> None:
        recipe = self._control.slot.active.recipe
        if recipe != self._recipe:
            self._recipe = recipe
            for station in self._stations.values():
                await station.write("RecipeName", recipe or "")

    # ---- methods (the server's loop) ------------------------------------------------------------------
    async def _inspect(self, camera: str, args: tuple):
        """Inspect(partId, recipe) -> (jobId, verdict, resultJson): the stored verdict, or ERROR deadline when
        none came within the station's deadline + 1 s."""
        try:
            part_id, recipe = _strings(args, ("partId", "recipe"))
            if not part_id or len(part_id) > 128:
                raise _BadCall(ua.StatusCodes.BadInvalidArgument, 0, 2,
                               "partId: expected a non-empty string of at most 128 characters")
        except _BadCall as bad:
            return bad.answer(f"{self.node}.{camera}.Inspect")
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        trigger = Trigger(camera=camera, part_id=part_id, door=DOOR, recipe=recipe or None,
                          reply=lambda payload: self._post(("reply", answered, payload)))
        try:
            await loop.run_in_executor(self._pool, self._service.trigger, trigger)
        except ValueError as exc:
            return _BadCall(ua.StatusCodes.BadInvalidArgument, 0, 2, str(exc)).answer(f"{self.node}.{camera}.Inspect")
        deadline_ms = self._service.stations[camera].cam.inspect.deadline_ms
        left = trigger.received_mono + deadline_ms / 1000.0 + 1.0 - time.monotonic()
        try:
            payload = await asyncio.wait_for(answered, max(0.0, left))
        except asyncio.TimeoutError:
            log.warning("opcua: station %s: no verdict for part %s within %.0f ms + 1 s; answered ERROR deadline",
                        camera, part_id, deadline_ms)
            doc = {"job_id": trigger.job_id, "camera": camera, "part_id": part_id, "door": DOOR, "verdict": "ERROR",
                   "reason": "deadline", "detail": f"no verdict within the deadline ({deadline_ms:.0f} ms) + 1 s"}
            return _outputs(trigger.job_id, "ERROR", json.dumps(doc, separators=(",", ":")))
        doc = json.loads(payload)
        return _outputs(doc["job_id"], doc["verdict"], payload.decode("utf-8", "replace"))

    async def _select_recipe(self, parent, *args):
        """SelectRecipe(name) -> (ok, message): the recipe in service, for every station."""
        try:
            (name,) = _strings(args, ("name",))
        except _BadCall as bad:
            return bad.answer(f"{self.node}.SelectRecipe")
        if name not in self.cfg.recipes:
            return [ua.Variant(False, _BOOL),
                    ua.Variant(f"recipe {name[:64]!r} is not configured (expected one of: "
                               f"{', '.join(sorted(self.cfg.recipes)) or 'none'})", _S)]
        loop = asyncio.get_running_loop()
        try:
            serving = await loop.run_in_executor(self._pool, self._control.switch_recipe, name, RECIPE_WAIT_S)
        except (UserError, TimeoutError) as exc:
            return [ua.Variant(False, _BOOL), ua.Variant(_first_line(exc), _S)]
        except Exception as exc:  # the old recipe keeps serving; the client hears why
            log.exception("opcua: SelectRecipe %s failed", name)
            return [ua.Variant(False, _BOOL), ua.Variant(f"recipe {name!r} failed: {_first_line(exc)}", _S)]
        await self._show_recipe()
        return [ua.Variant(True, _BOOL), ua.Variant(f"recipe {serving.recipe} serves", _S)]

    # ---- refusals ----------------------------------------------------------------------------------
    async def _check_client_certificate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """CreateSession: the client's certificate must be current and, with trusted_clients, in that folder."""
        now = dt.datetime.now(dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            self._refuse("expired_certificate", f"client certificate {_subject(cert)} is not valid now "
                                                f"({cert.not_valid_before_utc:%Y-%m-%d} to "
                                                f"{cert.not_valid_after_utc:%Y-%m-%d})")
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        trusted = self.policy.trusted
        if trusted is not None and not trusted.contains(cert.public_bytes(serialization.Encoding.DER)):
            self._refuse("untrusted_certificate", f"client certificate {_subject(cert)} is not in {trusted.folder}")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    def _refuse(self, reason: str, why: str) -> None:
        self._metrics.door_refusals.labels(door=DOOR, reason=reason).inc()
        log.warning("opcua: refused (%s): %s", reason, why)


class _StationNodes:
    """One station's nodes and the counters behind them."""

    def __init__(self, obj, variables: dict):
        self.obj = obj
        self.variables = variables
        self.rois: dict[str, tuple] = {}
        self.clashes: set[str] = set()
        self.counts = {"OkCount": 0, "NgCount": 0, "ErrorCount": 0}
        self.sequence = 0

    async def write(self, name: str, value) -> None:
        await self.variables[name].write_value(ua.Variant(value, STATION_VARIABLES[name]))


class _BadCall(Exception):
    """A method call refused before it reached the core: a Bad status, with the reason as diagnostic text."""

    def __init__(self, code: int, index: int, count: int, message: str):
        super().__init__(message)
        self.code, self.index, self.count = code, index, count

    def answer(self, method: str) -> ua.CallMethodResult:
        log.warning("opcua: %s refused: %s", method, self)
        result = ua.CallMethodResult()
        result.StatusCode = ua.StatusCode(self.code)
        result.InputArgumentResults = [ua.StatusCode(self.code if i == self.index else ua.StatusCodes.Good)
                                       for i in range(self.count)]
        result.InputArgumentDiagnosticInfos = [ua.DiagnosticInfo(AdditionalInfo=str(self) if i == self.index else None)
                                               for i in range(self.count)]
        return result


def _strings(args: tuple, names: tuple[str, ...]) -> list[str]:
    """The call's String arguments (a null String is ""); _BadCall for a wrong count or type."""
    if len(args) < len(names):
        raise _BadCall(ua.StatusCodes.BadArgumentsMissing, len(args), len(names),
                       f"expected {len(names)} argument(s): {', '.join(names)}")
    if len(args) > len(names):
        raise _BadCall(ua.StatusCodes.BadTooManyArguments, len(names), len(args),
                       f"expected {len(names)} argument(s): {', '.join(names)}")
    out = []
    for i, (arg, name) in enumerate(zip(args, names)):
        value = arg.Value if isinstance(arg, ua.Variant) else arg
        if value is not None and not isinstance(value, str):
            raise _BadCall(ua.StatusCodes.BadTypeMismatch, i, len(names),
                           f"{name}: got {type(value).__name__}, expected a String")
        out.append(value or "")
    return out


def _outputs(job_id: str, verdict: str, result: str) -> list[ua.Variant]:
    return [ua.Variant(job_id, _S), ua.Variant(verdict, _S), ua.Variant(result, _S)]


def _arg(name: str, vtype: ua.VariantType, description: str) -> ua.Argument:
    return ua.Argument(Name=name, DataType=ua.NodeId(vtype.value), ValueRank=-1,
                       Description=ua.LocalizedText(description))


def _policies(security: str) -> list:
    """`sign` offers Sign and SignAndEncrypt (a client may always choose more); `none` is for loopback only."""
    if security == "sign_encrypt":
        return [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
    if security == "sign":
        return [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
    return [ua.SecurityPolicyType.NoSecurity]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__


# ---- certificates ---------------------------------------------------------------------------------
def _cert_der(data: bytes) -> bytes:
    """A certificate file's first certificate as DER (PEM or DER in); ValueError when it is neither."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def _first_der(der: bytes) -> bytes:
    """The first certificate of a DER chain (what a client sends may be its whole chain)."""
    return uacrypto.der_from_x509(uacrypto.x509_from_der(der))


def _subject(cert) -> str:
    try:
        if isinstance(cert, (bytes, bytearray)):
            cert = uacrypto.x509_from_der(bytes(cert))
        return repr(cert.subject.rfc4514_string()[:120])
    except ValueError:
        return "(unreadable)"


def load_server_identity(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """The server's certificate and private key as DER, from PEM or DER files; UserError (one line) otherwise."""
    try:
        cert_data, key_data = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    except OSError as exc:
        raise UserError(f"opcua: cannot read {exc.filename} ({exc.strerror})") from None
    try:
        cert = x509.load_der_x509_certificate(_cert_der(cert_data))
    except ValueError:
        raise UserError(f"opcua.cert: '{cert_path}' is not an X.509 certificate (DER or PEM)") from None
    try:
        if b"-----BEGIN" in key_data:
            key = serialization.load_pem_private_key(key_data, password=None)
        else:
            key = serialization.load_der_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"opcua.key: '{key_path}' is not an unencrypted private key (PEM or DER): "
                        f"{_first_line(exc)}") from None
    if not isinstance(key, rsa.RSAPrivateKey) or not 2048 <= key.key_size <= 4096:
        raise UserError(f"opcua.key: '{key_path}' is not an RSA key of 2048 to 4096 bits (Basic256Sha256 needs one)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise UserError(f"opcua.key: '{key_path}' does not belong to the certificate '{cert_path}'")
    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), der_key


def make_certificate(out: Path, node: str, hosts: list[str] = (), days: int = 3650,
                     overwrite: bool = False) -> tuple[Path, Path, Path]:
    """A self-signed application certificate for `urn:visiond:<node>` (RSA 2048, SHA-256) in `out`:
    cert.pem, cert.der (for a client's trust list) and key.pem (mode 0600). Returns their paths."""
    out = Path(out)
    paths = (out / "cert.pem", out / "cert.der", out / "key.pem")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; expected an empty folder (or --force to replace it)")
    if days < 1:
        raise UserError(f"--days: got {days}, expected at least 1")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(namespace_uri(node))]
    for host in dict.fromkeys([*hosts, socket.gethostname(), "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"visiond {node}"[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "visiond")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=False)  # self-signed, as UA wants
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(paths[0], cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(paths[1], cert.public_bytes(serialization.Encoding.DER))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with atomic_replace(paths[2]) as tmp:
        tmp.chmod(0o600)  # before the key is in it
        tmp.write_bytes(key_pem)
    return paths
