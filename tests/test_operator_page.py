"""The live operator page: its state, its routes, and the page in headless Chromium over a running line.

The browser test runs a real daemon in this process (a stream camera and a triggered station on
the synthetic line video, evidence of NG parts kept), serves the page's routes with uvicorn,
triggers parts over MQTT as a PLC does and watches the page. Set VISIOND_DOCS_SCREENSHOT=1 to
also refresh docs/operator-page.png for the README.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import threading
import time
from types import SimpleNamespace

import anyio
import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from conftest import ROOT, free_port, require_binary
from test_inspect import station_cfg
from visiond.config import parse_config
from visiond.frames import Frame, ModelRef, Prediction, Timings
from visiond.harness.requester import Requester
from visiond.serve.daemon import Daemon
from visiond.serve.doors.context import WebContext
from visiond.serve.doors.live import FrameEncoder, LiveState, routes
from visiond.serve.inspect.store import ResultsStore

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000  # two shared cores: be patient, never sleep
DAY = 86400.0
T0 = 1_717_000_000.0  # 2024-05-29T16:26:40Z


def verdict_payload(job: str, verdict: str, rois=(("centre", "ok", 0.9, False),), *, reason=None, evidence=None,
                    recipe="part-a", part="p1") -> bytes:
    return json.dumps({
        "job_id": job, "camera": "station1", "part_id": part, "verdict": verdict, "reason": reason, "recipe": recipe,
        "decided_at": "2024-05-29T16:26:40.000000Z", "evidence": evidence,
        "rois": [{"name": n, "label": label, "score": s, "defect": d, "frames": [{"defect": False}, {"defect": d}]}
                 for n, label, s, d in rois],
        "models": {"centre": {"name": "smallcnn", "version": "3f2a9c1d"}}}).encode()


def prediction(camera: str, roi: str, label: str, defect: bool, at: float) -> Prediction:
    frame = Frame(camera, 1, at, 0.0, np.zeros((4, 4, 3), np.uint8))
    return Prediction(frame, label, 0.8, ((label, 0.8),), defect, ModelRef("m", "v"), Timings(0, 0, 0), roi=roi)


# ---- LiveState ---------------------------------------------------------------------------------------------

def test_station_counts_are_per_utc_day_and_yield_is_ok_over_all():
    # given a station that inspected an OK, an NG and an ERROR part today
    now = [T0]
    live = LiveState(clock=lambda: now[0])
    live.verdict("station1", verdict_payload("j1", "OK"))
    live.verdict("station1", verdict_payload("j2", "NG", (("centre", "scratch", 0.97, True),)))
    live.verdict("station1", verdict_payload("j3", "ERROR", (), reason="busy"))
    st = live.station("station1")
    assert (st["ok"], st["ng"], st["error"], st["total"]) == (1, 1, 1, 3)
    assert st["yield"] == pytest.approx(1 / 3)
    assert st["last"]["verdict"] == "ERROR" and st["last"]["reason"] == "busy" and st["recipe"] == "part-a"
    assert st["models"]["centre"] == {"name": "smallcnn", "version": "3f2a9c1d"}
    # when the UTC day turns: the page shows a fresh day before and after the next part
    now[0] = T0 + DAY
    assert live.station("station1")["total"] == 0 and live.station("station1")["yield"] is None
    live.verdict("station1", verdict_payload("j4", "OK"))
    assert (live.station("station1")["ok"], live.station("station1")["total"]) == (1, 1)


def test_roi_colours_follow_the_latest_verdict_and_an_error_greys_them():
    live = LiveState(clock=lambda: T0)
    # a stream camera's ROIs take each batch's predictions
    live.submit([prediction("line1", "full", "ok", False, T0 - 1), prediction("line1", "left", "spot", True, T0)])
    assert live.roi("line1", "full")[:3] == ("ok", 0.8, False)
    assert live.roi("line1", "left")[:3] == ("spot", 0.8, True)
    # a station's ROIs take its part's verdict; an ERROR judged none of them
    live.verdict("station1", verdict_payload("j1", "NG", (("a", "scratch", 0.9, True), ("b", "ok", 0.7, False))))
    assert live.roi("station1", "a")[2] is True and live.roi("station1", "b")[2] is False
    live.verdict("station1", verdict_payload("j2", "ERROR", (), reason="deadline"))
    assert live.roi("station1", "a") is None and live.roi("station1", "b") is None
    assert live.roi("line1", "left") is not None  # other cameras keep theirs


def test_the_strip_keeps_the_newest_ng_and_error_parts_with_their_best_evidence():
    live = LiveState(keep=3, clock=lambda: T0)
    ev = [f"2024-05-29/station1/j{{}}_f{k}{s}.jpg" for k in range(2) for s in ("", "_annotated")]
    for i in range(5):
        live.verdict("station1", verdict_payload(f"j{i}", "NG", (("centre", "scratch", 0.9, True),),
                                                 evidence=[p.format(i) for p in ev]))
    live.verdict("station1", verdict_payload("ok1", "OK"))
    strip = live.strip()
    assert [s["job_id"] for s in strip] == ["j4", "j3", "j2"]  # newest first, OK parts never, at most `keep`
    assert strip[0]["thumbnail"] == "2024-05-29/station1/j4_f1_annotated.jpg"  # the frame that showed the defect
    assert "payload" not in strip[0] and live.payload("j4")["job_id"] == "j4" and live.payload("j0") is None


def test_a_restart_keeps_todays_counts_and_strip_from_the_results_store(tmp_path):
    # given a store holding yesterday's and today's verdicts
    now = time.time()
    with ResultsStore(tmp_path / "results.db") as store:
        for i, (verdict, at) in enumerate([("OK", now - DAY), ("OK", now - 5), ("NG", now - 4), ("ERROR", now - 3)]):
            row = {"id": f"id{i}", "job_id": f"j{i}", "camera": "station1", "part_id": f"p{i}", "trigger_id": None,
                   "door": "mqtt", "recipe": None, "verdict": verdict, "reason": None, "detail": None,
                   "rois": [], "models": {}, "triggered_at": at, "decided_at": at, "latency_ms": {},
                   "evidence": [f"day/station1/j{i}_f0_annotated.jpg"], "correlation": None, "response_topic": None}
            store.record(row, lambda seq, row=row: json.dumps({**row, "seq": seq}).encode())
        # when the daemon starts again
        live = LiveState(store, clock=lambda: now)
    # then the page shows today's parts only, and the NG/ERROR parts (from any day) in the strip
    today = [v for v, at in [("OK", now - DAY), ("OK", now - 5), ("NG", now - 4), ("ERROR", now - 3)]
             if at >= now - (now % DAY)]
    st = live.station("station1")
    assert (st["ok"], st["ng"], st["error"]) == (today.count("OK"), today.count("NG"), today.count("ERROR"))
    assert [s["job_id"] for s in live.strip()] == ["j3", "j2"]
    assert live.strip()[0]["thumbnail"] == "day/station1/j3_f0_annotated.jpg"


def test_two_tiles_asking_for_the_same_frame_get_one_encoding():
    enc = FrameEncoder()
    calls = []
    encode = enc.encode
    enc.encode = lambda image, width: calls.append(width) or encode(image, width)
    image = np.random.default_rng(1).integers(0, 255, (480, 640, 3), np.uint8)
    frame = Frame("line1", 7, T0, 1.0, image)
    got = []

    async def two_tiles():
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: _append(got, enc.jpeg("line1", frame, 320)))

    async def _append(out, coro):
        out.append(await coro)

    anyio.run(two_tiles)
    assert calls == [320] and got[0] == got[1] and got[0][:2] == b"\xff\xd8"
    import cv2
    assert cv2.imdecode(np.frombuffer(got[0], np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
    # a newer frame is encoded again
    anyio.run(enc.jpeg, "line1", dataclasses.replace(frame, index=8, captured_mono=2.0), 320)
    assert calls == [320, 320]


# ---- the page over a running line ----------------------------------------------------------------------------

class Line:
    """visiond in this process: a stream camera and a triggered station, the page's routes on uvicorn."""

    def __init__(self, tmp, line_model, synth_video, mosquitto):
        x, y, w, h = synth_video.roi
        cfg = station_cfg(line_model, mosquitto, synth_video)
        cfg["cameras"].append({"name": "line1", "source": str(synth_video.path), "loop": True, "fps": 10,
                               "rois": [{"name": "centre", "rect": [x, y, w, h]}]})
        cfg.update(node="testbox", spool={"dir": str(tmp / "spool")}, http={"enabled": False},
                   evidence={"save": "ng"})
        self.daemon = Daemon(parse_config(cfg, env={}))
        self.live = LiveState(self.daemon.store)
        self.daemon.worker._sinks.append(self.live)  # what the daemon will do itself once it serves the page
        self.daemon.inspection.on_verdict(self.live.verdict)
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.thread.start()
        d = self.daemon
        self.ctx = WebContext(cfg=d.cfg, metrics=d.metrics, health=d.health, slot=d.slot, hub=d.hub,
                              control=d.control, inspection=d.inspection, store=d.store,
                              evidence_dir=d.cfg.evidence_dir, sources={s.camera: s for s in d.sources}, live=self.live)
        self.web = Web(Starlette(routes=routes(self.ctx)))
        end = time.monotonic() + 60
        while d.inspection.state("station1") != "ready":
            assert time.monotonic() < end and self.thread.is_alive(), "station1 never became ready"
            time.sleep(0.05)
        self.url = self.web.url

    def close(self) -> None:
        self.web.close()
        self.daemon.stop_event.set()
        self.thread.join(30)


class Web:
    """An ASGI app on uvicorn, on its own thread and a free port of 127.0.0.1."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class BearerOnApi:
    """What the web front does beyond loopback, as the page expects it: the page loads, /api/* wants the token."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                await JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def line(tmp_path_factory, line_model, synth_video):
    from conftest import Mosquitto

    broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp_path_factory.mktemp("broker"))
    broker.start()
    line = Line(tmp_path_factory.mktemp("line"), line_model, synth_video, broker)
    yield line, broker
    line.close()
    broker.stop()
    assert not line.thread.is_alive(), "the daemon did not stop"


@pytest.fixture
def open_page(tmp_path):
    """open_page(url) -> a Chromium page on `url`; the test fails on any page error or console error."""
    from playwright import sync_api  # a test dependency (pyproject [test]); missing = a broken setup, not a skip

    chromium = require_binary("chromium", "chromium")
    sync_api.expect.set_options(timeout=WAIT_MS)
    errors: list[str] = []
    allowed: list[str] = []
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                    headless=True, args=CHROMIUM_FLAGS,
                                                    viewport={"width": 1280, "height": 900})
        try:
            def open_page(url: str, allow: str | None = None):
                """`allow`: a console error the test expects (a regex)."""
                if allow:
                    allowed.append(allow)
                pg = ctx.pages[0] if ctx.pages else ctx.new_page()
                pg.set_default_timeout(WAIT_MS)
                pg.on("pageerror", lambda exc: errors.append(str(exc)))
                pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                pg.goto(url)
                return pg

            yield open_page
        finally:
            ctx.close()
    errors = [e for e in errors if not any(re.search(a, e) for a in allowed)]
    assert not errors, errors  # a CSP violation shows up here as "Refused to ..."


@pytest.fixture
def page(line, open_page):
    return open_page(line[0].url)


def _count(page, kind: str) -> int:
    text = page.locator(f'.tile[data-camera="station1"] [data-count="{kind}"]').text_content()
    return int(text.split()[-1])


def test_the_page_shows_live_tiles_roi_verdicts_counts_and_the_last_ng_parts(line, page, tmp_path):
    from playwright.sync_api import expect

    rig, broker = line
    station, stream = page.locator('.tile[data-camera="station1"]'), page.locator('.tile[data-camera="line1"]')
    # given the page: one tile per camera, each showing frames that keep coming
    expect(page.locator(".tile")).to_have_count(2)
    for tile in (station, stream):
        img = tile.locator("img.frame")
        expect(img).to_have_attribute("data-index", re.compile(r"^\d+$"))
        first = img.get_attribute("data-index")
        expect(img).not_to_have_attribute("data-index", first)
        expect(img).to_have_js_property("complete", True)
        shown = img.evaluate("i => [i.naturalWidth, i.parentElement.clientWidth * devicePixelRatio]")
        assert shown[0] == min(640, -(-shown[1] // 16) * 16), shown  # never wider than the tile shows it
    # ROI boxes: the station's three (grey before any part), the stream camera's one coloured by its verdicts
    expect(station.locator("canvas")).to_have_attribute("data-boxes", "3")
    expect(station.locator("canvas")).to_have_attribute("data-states", "unknown,unknown,unknown")
    expect(stream.locator("canvas")).to_have_attribute("data-boxes", "1")
    expect(stream.locator("canvas")).to_have_attribute("data-states", re.compile(r"^(ok|defect)$"))
    expect(page.locator("#health")).to_contain_text("broker connected")
    clf = rig.daemon.slot.active.classifier
    expect(station.locator(".meta")).to_contain_text(f"model {clf.name} {clf.version}")
    assert (_count(page, "ok"), _count(page, "ng"), _count(page, "error")) == (0, 0, 0)
    expect(page.locator("#strip-empty")).to_be_visible()

    # when parts pass the station until one is bad
    answers = []
    with Requester(broker.host, broker.port, "testbox") as plc:
        for i in range(40):
            answers.append(plc.answer(plc.inspect("station1", f"part-{i}"), 10))
            if answers[-1]["verdict"] == "NG":
                break
    verdicts = [a["verdict"] for a in answers]
    assert verdicts[-1] == "NG", verdicts
    bad = answers[-1]

    # then the counts follow, the ROI boxes take the bad part's colours and the part leads the strip
    expect(station.locator('[data-count="ok"]')).to_have_text(f"OK {verdicts.count('OK')}")
    expect(station.locator('[data-count="ng"]')).to_have_text("NG 1")
    expect(station.locator('[data-count="error"]')).to_have_text(f"ERROR {verdicts.count('ERROR')}")
    expect(station.locator(".yield")).to_have_text(f"yield {100 * verdicts.count('OK') / len(verdicts):.1f} %")
    expect(station.locator("canvas")).to_have_attribute("data-states", re.compile("defect"))
    item = page.locator(f'#strip li[data-job="{bad["job_id"]}"]')
    expect(page.locator("#strip li").first).to_have_attribute("data-job", bad["job_id"])
    expect(item.locator("img")).to_have_attribute("data-loaded", "1")  # the annotated evidence, once written
    expect(item.locator("img")).to_have_js_property("naturalWidth", 640)
    page.screenshot(path=str(tmp_path / "operator-page.png"))
    if os.environ.get("VISIOND_DOCS_SCREENSHOT") == "1":
        page.screenshot(path=str(ROOT / "docs" / "operator-page.png"))

    # when the operator clicks it: the evidence full size and the stored verdict
    item.locator("button").click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-image")).to_be_visible()
    expect(page.locator("#detail-image")).to_have_js_property("naturalWidth", 640)
    expect(page.locator("#detail-json")).to_contain_text(f'"job_id": "{bad["job_id"]}"')
    shown = json.loads(page.locator("#detail-json").text_content())
    assert shown == bad  # exactly what the PLC was answered
    page.screenshot(path=str(tmp_path / "operator-detail.png"))
    page.locator("#detail-close").click()
    expect(page.locator("#detail")).to_be_hidden()


def test_frames_evidence_and_results_refuse_what_they_must_not_serve(line, tmp_path):
    rig, _ = line
    root = rig.ctx.evidence_dir
    root.mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret.jpg").write_bytes(b"\xff\xd8 not evidence")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "inside.jpg").write_bytes(b"\xff\xd8 evidence")
    with httpx.Client(base_url=rig.url, timeout=10) as http:
        frame = http.get("/api/frame/line1.jpg", params={"w": 200})
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        import cv2
        assert cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR).shape[1] == 208  # steps of 16
        same = http.get("/api/frame/line1.jpg", params={"w": 200, "since": frame.headers["x-frame-index"]})
        assert same.status_code in (200, 204)  # 204 unless a newer frame came meanwhile
        assert http.get("/api/frame/nope.jpg").status_code == 404
        assert http.get("/api/frame/line1.jpg", params={"w": "wide"}).status_code == 400
        assert http.get("/api/evidence/inside.jpg").content == b"\xff\xd8 evidence"
        for path in ("/api/evidence/escape.jpg", "/api/evidence/%2e%2e/%2e%2e/etc/passwd.jpg",
                     "/api/evidence/..%2f..%2fsecret.jpg", f"/api/evidence/{tmp_path}/secret.jpg",
                     "/api/evidence/%00.jpg", "/api/evidence/missing.jpg", "/static/..%2flive.py",
                     "/static/index.html.bak", "/api/result/no-such-job", "/api/result/..%2f..%2fx"):
            assert http.get(path).status_code == 404, path
        index = http.get("/")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        assert http.get("/static/live.js").headers["content-type"].startswith("text/javascript")


def test_a_camera_without_a_frame_yet_answers_503(line):
    rig, _ = line
    ctx = dataclasses.replace(rig.ctx, sources={"station1": SimpleNamespace(latest=None)})

    async def ask():
        transport = httpx.ASGITransport(app=Starlette(routes=routes(ctx)))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get("/api/frame/station1.jpg"), (await client.get("/api/live")).json()

    r, live = anyio.run(ask)
    assert r.status_code == 503 and "no frame yet" in r.json()["error"]
    assert [c["name"] for c in live["cameras"]] == ["station1", "line1"]
    assert live["cameras"][0]["frame"] is None and live["cameras"][1]["frame"] is None


def test_behind_a_token_the_page_asks_for_it_once_and_then_shows_the_line(line, open_page):
    rig, _ = line
    from playwright.sync_api import expect

    web = Web(BearerOnApi(Starlette(routes=routes(rig.ctx)), "s3cret-token"))
    try:
        # given the web front wants a bearer token for /api/*: the page loads and asks for it
        page = open_page(web.url, allow=r"status of 401 \(Unauthorized\)")
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator(".tile")).to_have_count(0)
        # when the operator types it: the tiles show frames (images fetched with the token too)
        page.locator("#token").fill("s3cret-token")
        page.locator("#token-form button").click()
        expect(page.locator("#token-form")).to_be_hidden()
        expect(page.locator(".tile")).to_have_count(2)
        expect(page.locator('.tile[data-camera="line1"] img.frame')).to_have_attribute("data-index", re.compile(r"^\d+$"))
        page.close()
    finally:
        web.close()
