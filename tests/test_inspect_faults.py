"""Part inspection under faults and bad input: a stalled RTSP camera, a recipe switch mid-stream, hostile
triggers and configs, and evidence images on disk, against the real daemon, Mosquitto and RTSP server.

A PLC (visiond.harness.requester) asks with MQTT 5 Response Topic + Correlation Data;
what it hears back is what a line would act on, so every check is made on those
answers, on the retained topics a plant dashboard reads, and on the files the
daemon wrote. The synthetic line video loops, so a station always has parts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from daemon_helpers import Daemon, line_cfg
from visiond.harness.requester import Requester
from visiond.models.checkpoint import read_header

NODE = "testbox"
SECRET = "hunter2-must-not-leak"
VERDICTS = ("OK", "NG")


# ---------------------------------------------------------------- helpers


@pytest.fixture
def daemons():
    """Start daemons with ``daemons(tmp, cfg)``; any still running is killed at teardown."""
    started: list[Daemon] = []

    def start(tmp: Path, cfg: dict) -> Daemon:
        started.append(Daemon(tmp, cfg))
        return started[-1]

    yield start
    for d in started:
        d.close()


@pytest.fixture(scope="session")
def second_line_model(tmp_path_factory, synth_images) -> Path:
    """Another smallcnn on the same crops (other seed, 2 epochs): same classes, a different version."""
    from visiond.train.loop import TrainOptions, train

    out = tmp_path_factory.getbasetemp() / "line_model_b" / "line_b.ckpt"
    if not out.exists():
        train(TrainOptions(data=synth_images, out=out, arch="smallcnn", epochs=2, image_size=64, seed=11,
                           augment="none", progress=False))
    return out


def station(name: str, source: str, rect, *, fps: float = 30, rois: list[dict] | None = None,
            cam: dict | None = None, **inspect) -> dict:
    """A triggered camera with 2 ROIs on the part (one with its own threshold) unless `rois` is given."""
    x, y, w, h = rect
    return {"name": name, "source": source, "fps": fps, "mode": "triggered",
            "rois": rois or [{"name": "centre", "rect": [x, y, w, h]},
                             {"name": "centre_strict", "rect": [x, y, w, h], "threshold": 0.3}],
            "inspect": {"frames": 3, "interval_ms": 0, "deadline_ms": 3000, "queue": 16, **inspect},
            **(cam or {})}


def file_station(synth_video, name: str = "station1", fps: float = 60, **kw) -> dict:
    """A station on the looping synthetic line video (60 fps: a 3-frame burst takes ~50 ms)."""
    return station(name, str(synth_video.path), synth_video.roi, fps=fps, cam={"loop": True}, **kw)


def retained(rec, topic: str) -> bytes | None:
    """The newest payload the recorder has seen on `visiond/<node>/<topic>`."""
    got = rec.messages(f"visiond/{NODE}/{topic}")
    return got[-1].payload if got else None


def wait_retained(rec, topic: str, check, timeout: float, what: str) -> None:
    rec.wait_for(lambda _ms: (p := retained(rec, topic)) is not None and check(p), timeout, what)


def wait_ready(rec, camera: str, state: str, timeout: float) -> float:
    start = time.monotonic()
    wait_retained(rec, f"{camera}/ready", lambda p: p == state.encode(), timeout, f"{camera}/ready {state}")
    return time.monotonic() - start


def recipe_now(rec) -> str | None:
    p = retained(rec, "recipe")
    return None if p is None else json.loads(p)["name"]


def wait_last_error(rec, text: str, what: str) -> None:
    """Until the retained `status/detail` carries a `last_error` containing `text`."""
    wait_retained(rec, "status/detail", lambda p: text in (json.loads(p).get("last_error") or ""), 10,
                  f"last_error for {what}")


def one_line(text: str) -> None:
    assert text and "\n" not in text.strip() and "Traceback" not in text and len(text) < 400, text


def verdict_ok(doc: dict) -> None:
    assert doc.get("verdict") in VERDICTS, (doc.get("verdict"), doc.get("reason"), doc.get("detail"))


# ---------------------------------------------------------------- 1. a stalled RTSP camera


def test_a_trigger_while_the_rtsp_camera_stalls_answers_error_within_its_deadline_and_recovers(
        tmp_path, mosquitto, mqtt_recorder, rtsp_server, line_model, synth_video, daemons):
    # given a triggered station on the RTSP stream with a 1.5 s deadline
    deadline_s = 1.5
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    cam = station("station1", rtsp_server.url, synth_video.roi, fps=0, deadline_ms=deadline_s * 1000,
                  cam={"read_timeout_s": 2.0, "open_timeout_s": 2})
    d = daemons(tmp_path, line_cfg(line_model, mosquitto, [cam]))
    wait_ready(rec, "station1", "ready", 60)
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        verdict_ok(plc.answer(plc.inspect("station1", "before-stall"), 10))
        # when the RTSP server freezes and a part is triggered
        rtsp_server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)  # frames already on the wire have arrived
            corr = plc.inspect("station1", "during-stall")
            doc = plc.answer(corr, deadline_s + 5)
            took = plc.latency_s(corr)
            # then it is answered ERROR with the reason, inside its deadline (+ 0.5 s for the broker round trip)
            print(f"\nstalled trigger answered {doc['verdict']} {doc['reason']} after {took:.2f} s: {doc['detail']}")
            assert doc["verdict"] == "ERROR" and doc["reason"] in ("camera_down", "deadline"), doc
            assert doc["part_id"] == "during-stall" and doc["rois"] == []
            one_line(doc["detail"])
            assert took <= deadline_s + 0.5
            # and the station says `error` once its source is reported offline
            noticed = wait_ready(rec, "station1", "error", 10)
            print(f"station1/ready error {noticed:.2f} s later")
            # and a trigger while it is offline is answered ERROR camera_down, also in time
            corr = plc.inspect("station1", "while-offline")
            doc = plc.answer(corr, deadline_s + 5)
            assert doc["verdict"] == "ERROR" and doc["reason"] == "camera_down", doc
            assert plc.latency_s(corr) <= deadline_s + 0.5
            assert "offline" in doc["detail"], doc["detail"]
        finally:
            rtsp_server.proc.send_signal(signal.SIGCONT)
        # when the stream comes back, then the station is ready again and the next trigger is inspected
        back = wait_ready(rec, "station1", "ready", 45)
        print(f"station1/ready again {back:.1f} s after SIGCONT")
        doc = plc.answer(plc.inspect("station1", "after-recovery"), 10)
        verdict_ok(doc)
        assert doc["part_id"] == "after-recovery" and len(doc["rois"]) == 2
        assert all(len(r["frames"]) == 3 for r in doc["rois"])
    assert d.metric("visiond_source_reconnects_total", camera="station1") >= 1
    assert d.metric("visiond_inspections_total", camera="station1", verdict="ERROR") == 2
    assert d.stop() == 0, d.stderr[-3000:]


# ---------------------------------------------------------------- 2. a recipe switch mid-stream


def test_recipe_switch_in_a_trigger_stream_loses_no_trigger_and_never_mixes_models(
        tmp_path, mosquitto, mqtt_recorder, line_model, second_line_model, synth_video, daemons):
    # given a station serving recipe a, with recipe b (another checkpoint) configured
    version = {"a": read_header(line_model)["version"], "b": read_header(second_line_model)["version"]}
    assert version["a"] != version["b"]
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    cfg = line_cfg(line_model, mosquitto, [file_station(synth_video)], recipe="a",
                   recipes={"a": {"model": str(line_model)}, "b": {"model": str(second_line_model)}})
    d = daemons(tmp_path, cfg)
    wait_ready(rec, "station1", "ready", 60)
    assert recipe_now(rec) == "a"
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        # when 60 parts are triggered at 10 a second, and after the 30th the operator switches to recipe b
        sent, corrs = [], []
        cmd_at = b_from = switch = None
        for i in range(60):
            if i == 30:
                cmd_at = time.monotonic()
                switch = plc.send_raw(json.dumps({"name": "b"}).encode(), verb="recipe")
            if cmd_at is not None and b_from is None and recipe_now(rec) == "b":
                b_from = i  # the retained recipe said b before this trigger was sent
            sent.append(time.monotonic())
            corrs.append(plc.inspect("station1", f"part-{i}"))
            time.sleep(0.1)
        missing = plc.wait_all([*corrs, switch], 30)
        assert not missing, f"{len(missing)} unanswered; stderr: {d.stderr[-2000:]}"
        time.sleep(0.5)  # a second answer to any trigger would have come by now
        answers = [plc.answers(c) for c in corrs]
        arrived = [sent[i] + plc.latency_s(c) for i, c in enumerate(corrs)]
        reply = plc.answers(switch)
        # and a trigger naming recipe a switches back
        back = plc.answer(plc.inspect("station1", "back-to-a", recipe="a"), 15)
    # then every trigger was answered exactly once, by its own part
    assert [len(a) for a in answers] == [1] * 60, [len(a) for a in answers]
    docs = [a[0] for a in answers]
    assert [doc["part_id"] for doc in docs] == [f"part-{i}" for i in range(60)]
    for doc in docs:
        verdict_ok(doc)
    # and each verdict names the recipe that made it and only that recipe's model versions
    for doc in docs + [back]:
        assert doc["recipe"] in version, doc["recipe"]
        want = version[doc["recipe"]]
        assert {m["version"] for m in doc["models"].values()} == {want}, (doc["part_id"], doc["recipe"], doc["models"])
        assert {r["model"]["version"] for r in doc["rois"]} == {want}, (doc["part_id"], doc["recipe"])
    # and the recipe changes once, from a to b, in trigger order
    recipes = [doc["recipe"] for doc in docs]
    flips = sum(x != y for x, y in zip(recipes, recipes[1:]))
    print(f"\nrecipes in trigger order: {''.join(recipes)}; retained b seen before trigger {b_from}")
    assert recipes[0] == "a" and recipes[-1] == "b" and flips == 1, recipes
    assert all(r == "a" for r, t in zip(recipes, arrived) if t < cmd_at), recipes
    assert b_from is not None and all(r == "b" for r in recipes[b_from:]), (b_from, recipes)
    # and the command was answered with the models now serving
    assert len(reply) == 1 and reply[0]["ok"] is True and reply[0]["recipe"] == "b", reply
    assert reply[0]["models"]["default"]["version"] == version["b"], reply
    # and the trigger naming recipe a was inspected by a, which is now the retained recipe
    verdict_ok(back)
    assert back["recipe"] == "a"
    wait_retained(rec, "recipe", lambda p: json.loads(p)["name"] == "a", 10, "retained recipe a")
    assert json.loads(retained(rec, "recipe"))["models"]["default"]["version"] == version["a"]
    assert d.stop() == 0, d.stderr[-3000:]
    assert "Traceback" not in d.stderr, d.stderr[-3000:]


# ---------------------------------------------------------------- 3. bad input


BAD_TRIGGERS = [
    # (what, cmd/inspect payload, text the refusal carries)
    ("unknown camera", {"camera": "ghost", "part_id": "p1"},
     "camera 'ghost' is not a triggered station (expected one of: station1, station2)"),
    ("malformed JSON", b'{"camera": "station1", "part_id": ', "payload is not JSON"),
    ("a JSON array", b'["station1", "p2"]', "payload is list; expected a JSON object"),
    ("a 500-character part_id", {"camera": "station1", "part_id": "x" * 500},
     "expected a string (or integer) of 1 to 128 characters"),
    ("frames 0", {"camera": "station1", "part_id": "p3", "frames": 0}, "frames: got 0, expected 1..100"),
]


def test_bad_triggers_get_a_one_line_reason_and_the_daemon_keeps_serving(tmp_path, mosquitto, mqtt_recorder,
                                                                          line_model, synth_video, daemons):
    # given two stations, the second with a ROI that lies outside its 640x480 frames
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    off = [{"name": "offframe", "rect": [5000, 5000, 10, 10]}]
    cfg = line_cfg(line_model, mosquitto, [file_station(synth_video), file_station(synth_video, "station2", fps=10,
                                                                                   rois=off)])
    d = daemons(tmp_path, cfg)
    wait_ready(rec, "station1", "ready", 60)
    wait_ready(rec, "station2", "ready", 10)
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        # when a PLC sends each bad trigger
        for what, body, expected in BAD_TRIGGERS:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            reply = plc.answer(plc.send_raw(payload), 10)
            # then it hears why on its response topic, in one line, and status/detail says the same
            assert reply["command"] == "inspect" and reply["ok"] is False, (what, reply)
            assert expected in reply["error"], (what, reply)
            one_line(reply["error"])
            wait_last_error(rec, expected, what)
            assert d.proc.poll() is None, what
        # when a trigger names a recipe that is not configured, then it is answered ERROR unknown_recipe
        doc = plc.answer(plc.inspect("station1", "p4", recipe="nope"), 10)
        assert doc["verdict"] == "ERROR" and doc["reason"] == "unknown_recipe", doc
        assert "'nope'" in doc["detail"]
        one_line(doc["detail"])
        # when a station's ROI lies outside the frame, then its trigger is answered ERROR roi naming the ROI
        doc = plc.answer(plc.inspect("station2", "p5"), 10)
        assert doc["verdict"] == "ERROR" and doc["reason"] == "roi", doc
        assert "offframe" in doc["detail"] and "[5000, 5000, 10, 10]" in doc["detail"], doc["detail"]
        one_line(doc["detail"])
        # when a well-formed trigger comes padded past 64 KiB, then it is refused before any handler sees it
        big = plc.send_raw(json.dumps({"camera": "station1", "part_id": "big"}).encode() + b" " * (65 * 1024))
        reply = plc.answer(big, 10)
        assert reply["ok"] is False and "payload of 66600 bytes exceeds 65536" in reply["error"], reply
        one_line(reply["error"])
        wait_last_error(rec, "exceeds 65536", "the oversized trigger")
        # then after all of it a normal trigger is inspected as usual
        doc = plc.answer(plc.inspect("station1", "good"), 10)
        verdict_ok(doc)
        assert len(plc.answers(big)) == 1  # the refusal only, no verdict
    # and the oversized trigger was never inspected (it came before "good", which has been answered; the
    # answer on the response topic can reach the PLC before the inspection topic's copy reaches the recorder)
    rec.wait_for(lambda _ms: any(p["part_id"] == "good" for p in rec.json_payloads("/station1/inspection")), 10,
                 "the inspection of part good on the inspection topic")
    assert [p["part_id"] for p in rec.json_payloads("/station1/inspection")] == ["p4", "good"]
    assert d.metric("visiond_mqtt_connected") == 1
    assert d.stop() == 0, d.stderr[-3000:]
    assert "Traceback" not in d.stderr, d.stderr[-3000:]


def _config_case(mutate):
    def write(tmp: Path) -> Path:
        ckpt = tmp / "model.ckpt"
        ckpt.write_bytes(b"x")  # `config check` only needs the checkpoints to exist
        cfg = {"mqtt": {"host": "mqtt", "username": "line7", "password": SECRET},  # first, as many files have it
               "cameras": [station("station1", "line.mp4", (100, 100, 64, 64))], "model": {"checkpoint": str(ckpt)},
               "models": {"label_check": {"checkpoint": str(ckpt)}}}
        mutate(cfg)
        path = tmp / "visiond.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path
    return write


def _rois(*rois):
    return lambda cfg: cfg["cameras"][0].update(rois=list(rois))


def _recipe(**recipe):
    return lambda cfg: cfg.update(recipes={"part-b": recipe})


RECT = [100, 100, 64, 64]
CONFIGS = [
    # (id, change to a valid config, key named in the one line; None: the valid config passes)
    ("valid", lambda cfg: None, None),
    ("repeated ROI names", _rois({"name": "screw", "rect": RECT}, {"name": "screw", "rect": [200, 100, 64, 64]}),
     "ROI names must be unique per camera, repeated: screw"),
    ("a ROI naming an unknown model", _rois({"name": "screw", "rect": RECT, "model": "nope"}),
     "cameras[station1].rois[screw].model: 'nope' is not a key of models"),
    ("a recipe naming an unknown camera", _recipe(cameras={"ghost": {"rois": [{"name": "screw", "rect": RECT}]}}),
     "recipes.part-b.cameras: 'ghost' is not a camera"),
    ("a recipe whose checkpoint is missing", _recipe(model="/nonexistent/part-b.ckpt"),
     "recipes.part-b.model: got '/nonexistent/part-b.ckpt', expected an existing checkpoint file"),
]


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_config_check_names_the_bad_key_in_one_line(tmp_path, mutate, expected):
    # given a station config with one thing wrong
    path = _config_case(mutate)(tmp_path)
    # when it is checked
    res = subprocess.run([sys.executable, "-m", "visiond", "config", "check", str(path)], capture_output=True,
                         text=True, timeout=60)
    # then a bad one exits non-zero with one line naming the key (and nothing else of the file), the valid one passes
    if expected is None:
        assert res.returncode == 0 and ": ok (" in res.stdout, res.stderr
        return
    print(res.stderr.strip())
    assert res.returncode != 0 and expected in res.stderr, res.stderr
    one_line(res.stderr)
    assert SECRET[:8] not in res.stderr, res.stderr  # not even the start of the broker password


# ---------------------------------------------------------------- 4. evidence


def test_ng_parts_leave_raw_and_annotated_images_and_ok_parts_none(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                                    synth_video, daemons):
    # given a station that keeps evidence of NG parts
    rec = mqtt_recorder(f"visiond/{NODE}/#")
    d = daemons(tmp_path, line_cfg(line_model, mosquitto, [file_station(synth_video)], evidence={"save": "ng"}))
    root = tmp_path / "spool" / "evidence"
    wait_ready(rec, "station1", "ready", 60)
    with Requester(mosquitto.host, mosquitto.port, NODE) as plc:
        # when 30 parts are triggered
        corrs = []
        for i in range(30):
            corrs.append(plc.inspect("station1", f"part-{i}"))
            time.sleep(0.1)
        assert not plc.wait_all(corrs, 30), d.stderr[-2000:]
        docs = [plc.answers(c)[0] for c in corrs]
    for doc in docs:
        verdict_ok(doc)
    ng = [doc for doc in docs if doc["verdict"] == "NG"]
    ok = [doc for doc in docs if doc["verdict"] == "OK"]
    print(f"\n{len(ng)} NG, {len(ok)} OK")
    assert ng and ok, "the line should show both good and bad parts in 30 triggers"
    # then every NG answer names a raw and an annotated JPEG per burst frame, written under evidence/
    expected: set[Path] = set()
    for doc in ng:
        paths = doc["evidence"]
        assert paths and all(not Path(p).is_absolute() and ".." not in Path(p).parts for p in paths), paths
        raw = sorted(p for p in paths if not p.endswith("_annotated.jpg"))
        annotated = sorted(p for p in paths if p.endswith("_annotated.jpg"))
        assert len(raw) == len(annotated) == len(doc["frames"]), paths
        assert all(doc["job_id"] in p for p in paths)
        expected |= {root / p for p in paths}
    d.until(lambda: all(p.is_file() for p in expected), 20, "evidence files written")
    # and they decode, the annotated copy drawn over the raw frame
    for doc in ng:
        for p in (p for p in doc["evidence"] if not p.endswith("_annotated.jpg")):
            img = cv2.imread(str(root / p))
            marked = cv2.imread(str(root / p.replace(".jpg", "_annotated.jpg")))
            assert img is not None and marked is not None, p
            assert img.shape == marked.shape == (480, 640, 3), (img.shape, marked.shape)
            assert np.mean(cv2.absdiff(img, marked)) > 1.0, f"{p}: the annotated copy shows nothing drawn"
    # and OK parts have no evidence and no files: everything on disk belongs to an NG part
    assert all(doc["evidence"] is None for doc in ok)
    files = {p for p in root.rglob("*") if p.is_file()}
    assert files == expected, sorted(str(p.relative_to(root)) for p in files ^ expected)
    assert d.stop() == 0, d.stderr[-3000:]
