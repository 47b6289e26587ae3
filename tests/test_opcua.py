"""The OPC UA door with a real asyncua Client, against the real inspection core.

The daemon runs in this process (its stages as `visiond run` starts them) with a
triggered station on the looping synthetic line, a private Mosquitto and the results
store; each test starts its own door on it, as a PLC would find it: node ids
`ns=<urn:visiond:testbox>;s=testbox.station1.<Name>`. Certificates come from
`visiond opcua make-cert`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from typer.testing import CliRunner

from daemon_helpers import metric_value, schema_validator
from mqtt_helpers import MqttRecorder
from test_inspect import station_cfg
from visiond.cli.app import app
from visiond.config import parse_config
from visiond.errors import UserError
from visiond.harness.broker import Broker
from visiond.harness.process import free_port
from visiond.serve.daemon import Daemon
from visiond.serve.doors.opcua import OpcUaDoor, make_certificate

NODE = "testbox"
NAMESPACE = f"urn:visiond:{NODE}"
PASSWORD = "plc-secret-1"
S = ua.VariantType.String


class InProcessDaemon(Daemon):
    """The daemon as `visiond run` builds it; signals stay with pytest's main thread (stopped by `stop_event`)."""

    def _install_signals(self) -> None:
        pass


@dataclass
class Line:
    tmp: Path
    raw: dict  # the daemon's config, which the doors' configs extend
    daemon: InProcessDaemon
    rec: MqttRecorder
    certs: Path

    def door(self, port: int, **opcua) -> OpcUaDoor:
        """A door on the running daemon's core, `opcua:` from the config keys given (secrets from the env)."""
        opcua = {"endpoint": f"opc.tcp://127.0.0.1:{port}", **opcua}
        cfg = parse_config({**self.raw, "opcua": {"enabled": True, **opcua}}, env={"VISIOND_OPCUA_PLC": PASSWORD})
        door = OpcUaDoor(cfg, self.daemon.inspection, self.daemon.control, self.daemon.metrics,
                         self.daemon.mqtt.set_detail)
        door.start()
        return door

    def refusals(self, reason: str) -> float:
        return metric_value(self.daemon.metrics.render().decode(), "visiond_door_refusals_total", door="opcua",
                            reason=reason)


@pytest.fixture(scope="module")
def line(tmp_path_factory, line_model, synth_video):
    tmp = tmp_path_factory.mktemp("opcua")
    (tmp / "broker").mkdir()
    broker = Broker(tmp / "broker").start()
    raw = station_cfg(line_model, broker, synth_video)
    x, y, w, h = synth_video.roi
    raw.update(node=NODE, spool={"dir": str(tmp / "spool")}, metrics={"enabled": False},
               recipes={"part-b": {"cameras": {"station1": {"rois": [
                   {"name": "centre", "rect": [x, y, w, h]},
                   {"name": "spot_check", "rect": [x, y, w, h], "threshold": 0.3}]}}}})
    rec = MqttRecorder(broker.host, broker.port, f"visiond/{NODE}/#").start()
    daemon = InProcessDaemon(parse_config(raw))
    runner = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    runner.start()
    try:
        rec.wait_for(lambda ms: any(m.topic.endswith("station1/ready") and m.payload == b"ready" for m in ms),
                     60, "station1 ready")
        yield Line(tmp, raw, daemon, rec, _certificates(tmp / "certs"))
    finally:
        daemon.stop_event.set()
        runner.join(30)
        rec.stop()
        broker.stop()


def _certificates(root: Path) -> Path:
    """The server's certificate by the CLI; two PLCs' by the library (only plc1 in the trusted folder)."""
    result = CliRunner().invoke(app, ["opcua", "make-cert", "--out", str(root / "server"), "--node", NODE,
                                      "--host", "10.1.2.3"])
    assert result.exit_code == 0, result.output
    for plc in ("plc1", "plc2"):
        make_certificate(root / plc, plc)
    (root / "trusted").mkdir()
    (root / "trusted" / "plc1.der").write_bytes((root / "plc1" / "cert.der").read_bytes())
    return root


def nid(ns: int, name: str) -> ua.NodeId:
    return ua.NodeId(f"{NODE}.{name}", ns)


async def call(client: Client, method: str, *args) -> list:
    """Call `<node>.<method>` (a station's method when it has a dot) with String arguments."""
    ns = await client.get_namespace_index(NAMESPACE)
    parent = method.rsplit(".", 1)[0] if "." in method else None
    obj = client.get_node(nid(ns, parent) if parent else ua.NodeId(NODE, ns))
    return await obj.call_method(nid(ns, method), *[a if isinstance(a, ua.Variant) else ua.Variant(a, S)
                                                    for a in args])


async def read(client: Client, name: str):
    ns = await client.get_namespace_index(NAMESPACE)
    return await client.get_node(nid(ns, name)).read_value()


class Changes:
    """A subscription handler: every value each monitored node reported, in order."""

    def __init__(self):
        self.values: dict[str, list] = {}

    def datachange_notification(self, node, val, data) -> None:
        self.values.setdefault(node.nodeid.Identifier.rsplit(".", 1)[1], []).append(val)


async def wait_until(check, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


def collapse(values: list) -> list:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


# ---------------------------------------------------------------- Inspect and the station's variables


def test_inspect_50_times_answers_what_the_store_and_mqtt_hold_and_subscribers_see_every_verdict(line):
    # given a door on loopback (the local rig: no users, security none) and a client subscribed to LastVerdict
    # and ResultSequence
    port = free_port()
    door = line.door(port)

    async def plc():
        async with Client(f"opc.tcp://127.0.0.1:{port}", timeout=15) as client:
            changes = Changes()
            ns = await client.get_namespace_index(NAMESPACE)
            sub = await client.create_subscription(20, changes)
            await sub.subscribe_data_change([client.get_node(nid(ns, "station1.LastVerdict")),
                                             client.get_node(nid(ns, "station1.ResultSequence"))], queuesize=1000)
            await wait_until(lambda: len(changes.values) == 2, 10, "the subscription's first values")
            before = {n: await read(client, f"station1.{n}") for n in ("OkCount", "NgCount", "ErrorCount")}
            # when Inspect is called 50 times, one part each
            answers = [await call(client, "station1.Inspect", f"opcua-{i}", "") for i in range(50)]
            seq0 = changes.values["ResultSequence"][0]
            await wait_until(lambda: changes.values["ResultSequence"][-1] == seq0 + 50, 10, "50 sequence steps")
            after = {n: await read(client, f"station1.{n}") for n in ("OkCount", "NgCount", "ErrorCount",
                                                                        "LastJobId", "LastPartId", "LastResult",
                                                                        "LastVerdict", "State")}
            rois = {r["name"]: (await read(client, f"station1.{r['name']}.Label"),
                                await read(client, f"station1.{r['name']}.Score"))
                    for r in json.loads(answers[-1][2])["rois"]}
            await sub.delete()
            return answers, changes.values, before, after, rois

    try:
        answers, seen, before, after, rois = asyncio.run(plc())
    finally:
        door.stop()
    # then each call answered its own part with a verdict and the inspection payload that says the same
    docs = [json.loads(result) for _, _, result in answers]
    check = schema_validator("inspection.schema.json")
    for i, ((job, verdict, _), doc) in enumerate(zip(answers, docs)):
        check.validate(doc)
        assert (doc["job_id"], doc["verdict"], doc["part_id"], doc["door"]) == (job, verdict, f"opcua-{i}", "opcua")
        assert verdict in ("OK", "NG"), (doc["reason"], doc["detail"])
    # and the results store holds exactly those payloads
    db = sqlite3.connect(line.tmp / "spool" / "results.db")
    try:
        rows = dict(db.execute(f"SELECT job_id, payload FROM results WHERE job_id IN ({','.join('?' * 50)})",
                               [job for job, _, _ in answers]).fetchall())
    finally:
        db.close()
    assert {job: bytes(p).decode() for job, p in rows.items()} == {job: result for job, _, result in answers}
    # and the inspection topic carried the same verdicts
    jobs = {job for job, _, _ in answers}
    line.rec.wait_for(lambda ms: len([d for d in line.rec.json_payloads("/station1/inspection")
                                      if d["job_id"] in jobs]) == 50, 10, "50 inspection messages")
    published = {d["job_id"]: d for d in line.rec.json_payloads("/station1/inspection") if d["job_id"] in jobs}
    assert published == {d["job_id"]: d for d in docs}
    # and the subscriber saw every change of LastVerdict, and ResultSequence step once per verdict
    verdicts = [verdict for _, verdict, _ in answers]
    assert seen["LastVerdict"] == collapse([seen["LastVerdict"][0], *verdicts])
    assert seen["ResultSequence"] == list(range(seen["ResultSequence"][0], seen["ResultSequence"][0] + 51))
    # and the station's variables show the last part, its ROIs and the counts
    last = docs[-1]
    assert (after["LastJobId"], after["LastPartId"], after["LastVerdict"]) == (last["job_id"], "opcua-49",
                                                                                 last["verdict"])
    assert after["LastResult"] == answers[-1][2] and after["State"] in ("Ready", "Busy")
    assert rois == {r["name"]: (r["label"], pytest.approx(r["score"])) for r in last["rois"]}
    counts = Counter(verdicts)
    assert [after[n] - before[n] for n in ("OkCount", "NgCount", "ErrorCount")] == [counts["OK"], counts["NG"], 0]


def test_bad_calls_get_a_bad_status_with_the_reason_and_recipes_switch_for_every_station(line):
    # given a door on loopback
    port = free_port()
    door = line.door(port)

    async def plc():
        async with Client(f"opc.tcp://127.0.0.1:{port}", timeout=15) as client:
            ns = await client.get_namespace_index(NAMESPACE)
            out = {}
            # when a part without an id, and a part id that is not a String, are sent to Inspect
            with pytest.raises(ua.uaerrors.BadInvalidArgument):
                await call(client, "station1.Inspect", "", "")
            raw = await client.uaclient.call([ua.CallMethodRequest(
                ObjectId=nid(ns, "station1"), MethodId=nid(ns, "station1.Inspect"),
                InputArguments=[ua.Variant("", S), ua.Variant("", S)])])
            out["empty"] = (raw[0].StatusCode.name, raw[0].InputArgumentDiagnosticInfos[0].AdditionalInfo)
            with pytest.raises(ua.uaerrors.BadTypeMismatch):
                await call(client, "station1.Inspect", ua.Variant(7, ua.VariantType.Int32), "")
            # and a recipe that does not exist is selected, then one that does
            out["nope"] = await call(client, "SelectRecipe", "nope")
            out["part-b"] = await call(client, "SelectRecipe", "part-b")
            out["recipe"] = await read(client, "station1.RecipeName")
            out["after"] = await call(client, "station1.Inspect", "after-switch", "")
            out["spot"] = await read(client, "station1.spot_check.Label")
            out["unknown"] = await call(client, "station1.Inspect", "unknown-recipe", "nope")
            return out

    try:
        out = asyncio.run(plc())
    finally:
        door.stop()
    # then the bad calls were refused with a status and a one-line reason, and the server kept serving
    assert out["empty"] == ("BadInvalidArgument", "partId: expected a non-empty string of at most 128 characters")
    # and the unknown recipe was refused naming the configured ones, the known one serves every station
    assert out["nope"][0] is False and "part-b" in out["nope"][1]
    assert out["part-b"] == [True, "recipe part-b serves"] and out["recipe"] == "part-b"
    doc = json.loads(out["after"][2])
    assert doc["recipe"] == "part-b" and [r["name"] for r in doc["rois"]] == ["centre", "spot_check"]
    # and the recipe's new ROI appeared as nodes of its own
    assert out["spot"] == doc["rois"][1]["label"]
    # and a trigger naming an unknown recipe is the core's stored ERROR verdict, as on every door
    unknown = json.loads(out["unknown"][2])
    assert out["unknown"][1] == "ERROR" and unknown["reason"] == "unknown_recipe"


# ---------------------------------------------------------------- security beyond loopback


async def attempt(port: int, certs: Path, *, plc: str | None = None, user: str | None = None,
                  password: str | None = None, read_only: bool = False) -> str:
    """Connect (Basic256Sha256 SignAndEncrypt with `plc`'s certificate, when given), read State, call Inspect;
    what happened, in a word or two."""
    client = Client(f"opc.tcp://127.0.0.1:{port}", timeout=15)
    if plc is not None:
        client.application_uri = f"urn:visiond:{plc}"
        await client.set_security(SecurityPolicyBasic256Sha256, str(certs / plc / "cert.pem"),
                                  str(certs / plc / "key.pem"), server_certificate=str(certs / "server" / "cert.der"),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    try:
        await client.connect()
    except ua.UaStatusCodeError as exc:
        return f"refused {type(exc).__name__}"
    try:
        state = await read(client, "station1.State")
        try:
            _, verdict, _ = await call(client, "station1.Inspect", f"secure-{time.monotonic_ns()}", "")
        except ua.UaStatusCodeError as exc:
            return f"read {state}, call refused {type(exc).__name__}"
        return f"read {state}, verdict {verdict}"
    finally:
        await client.disconnect()


def test_beyond_loopback_a_client_needs_a_secure_channel_and_the_right_password(line, monkeypatch):
    # given a door on every interface with SignAndEncrypt, the make-cert certificate and a user whose password
    # comes from the environment
    port = free_port()
    certs = line.certs
    door = line.door(port, endpoint=f"opc.tcp://0.0.0.0:{port}", security="sign_encrypt",
                     cert=str(certs / "server" / "cert.pem"), key=str(certs / "server" / "key.pem"),
                     users={"plc": "${VISIOND_OPCUA_PLC}"})
    counted = {r: line.refusals(r) for r in ("no_credentials", "bad_credentials", "insecure_channel")}
    try:
        # when a PLC connects without credentials, with a wrong password, then with the right one
        anonymous = asyncio.run(attempt(port, certs, plc="plc1"))
        wrong = asyncio.run(attempt(port, certs, plc="plc1", user="plc", password="guess"))
        right = asyncio.run(attempt(port, certs, plc="plc1", user="plc", password=PASSWORD))
        # and a client that ignores the endpoints and sends the right password over an unsecured channel
        monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
        unsecured = asyncio.run(attempt(port, certs, user="plc", password=PASSWORD))
    finally:
        door.stop()
    # then only the right password over the secure channel got in, and could inspect
    assert anonymous == "refused BadUserAccessDenied"
    assert wrong == "refused BadUserAccessDenied"
    assert right in ("read Ready, verdict OK", "read Ready, verdict NG"), right
    assert unsecured == "refused BadUserAccessDenied"
    # and every refusal was counted under its reason
    assert {r: line.refusals(r) - n for r, n in counted.items()} == {"no_credentials": 1, "bad_credentials": 1,
                                                                   "insecure_channel": 1}
    # and the server's certificate names the node's application URI and the host given to make-cert
    cert = x509.load_pem_x509_certificate((certs / "server" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [NAMESPACE]
    assert "10.1.2.3" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def test_with_trusted_clients_only_a_listed_certificate_gets_in(line):
    # given a door beyond loopback that trusts the certificates in a folder (plc1's) and has no users
    port = free_port()
    certs = line.certs
    door = line.door(port, endpoint=f"opc.tcp://0.0.0.0:{port}", security="sign_encrypt",
                     cert=str(certs / "server" / "cert.pem"), key=str(certs / "server" / "key.pem"),
                     trusted_clients=str(certs / "trusted"))
    before = line.refusals("untrusted_certificate")
    try:
        # when plc1 and then plc2 (not in the folder) connect
        trusted = asyncio.run(attempt(port, certs, plc="plc1"))
        untrusted = asyncio.run(attempt(port, certs, plc="plc2"))
    finally:
        door.stop()
    # then the trusted certificate is the credential; the other is refused and counted
    assert trusted in ("read Ready, verdict OK", "read Ready, verdict NG"), trusted
    assert untrusted == "refused BadCertificateUntrusted"
    assert line.refusals("untrusted_certificate") - before == 1


def test_anonymous_clients_if_allowed_only_read(line):
    # given a door beyond loopback with a user and allow_anonymous
    port = free_port()
    certs = line.certs
    door = line.door(port, endpoint=f"opc.tcp://0.0.0.0:{port}", security="sign", allow_anonymous=True,
                     cert=str(certs / "server" / "cert.pem"), key=str(certs / "server" / "key.pem"),
                     users={"plc": "${VISIOND_OPCUA_PLC}"})
    before = line.refusals("read_only")
    try:
        # when a client without credentials reads the station's state and calls Inspect, then the user does
        anonymous = asyncio.run(attempt(port, certs, plc="plc2"))
        user = asyncio.run(attempt(port, certs, plc="plc2", user="plc", password=PASSWORD))
    finally:
        door.stop()
    # then the anonymous client read but could not call (counted); the user could
    assert anonymous == "read Ready, call refused BadUserAccessDenied"
    assert line.refusals("read_only") - before == 1
    assert user in ("read Ready, verdict OK", "read Ready, verdict NG"), user


# ---------------------------------------------------------------- start-up problems are one line


def test_a_port_in_use_or_a_key_that_does_not_fit_is_one_line(line, tmp_path):
    # given a port another program listens on, and a key that is not the certificate's
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    certs = line.certs
    try:
        # when doors are started on them
        with pytest.raises(UserError) as in_use:
            line.door(port)
        with pytest.raises(UserError) as mismatch:
            line.door(free_port(), security="sign", cert=str(certs / "server" / "cert.pem"),
                      key=str(certs / "plc1" / "key.pem"))
    finally:
        taken.close()
    # then each start fails with one line naming the problem
    assert str(in_use.value) == (f"opcua: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                 "expected a free port (opcua.endpoint)")
    assert "does not belong to the certificate" in str(mismatch.value) and "\n" not in str(mismatch.value)
    # and make-cert will not overwrite a certificate without --force
    again = CliRunner().invoke(app, ["opcua", "make-cert", "--out", str(certs / "server"), "--node", NODE])
    assert again.exit_code != 0 and "exists" in str(again.exception)
