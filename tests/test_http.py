"""The daemon's web front over real HTTP: /metrics and /healthz, /v1/classify and /v1/inspect, the checks every
request passes (token, Host, body size, paths) and 100 concurrent classifications while a camera streams, against
a daemon running in this process (uvicorn on its own thread) with a stream camera and a triggered station."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import threading
import time
import zlib
from pathlib import Path

import cv2
import httpx
import pytest

from conftest import Mosquitto, require_binary
from daemon_helpers import line_cfg, schema_validator
from loop_helpers import wait_until
from visiond.config import parse_config
from visiond.errors import UserError
from visiond.serve.daemon import Daemon
from visiond.serve.doors.http import HttpDoor
from visiond.train.predict import predict_paths

TOKEN = "web-front-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_MB = 2
MAX_WAITING = 32


class WebRig:
    """visiond in this process (Daemon.run on a thread): camera `line` streams (two ROIs), `station1` is triggered."""

    def __init__(self, tmp: Path, line_model: Path, synth_video, **http):
        self.broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp)
        self.broker.start()
        x, y, w, h = synth_video.roi
        line = {"name": "line", "source": str(synth_video.path), "loop": True, "fps": 30,
                "rois": [{"name": "centre", "rect": [x, y, w, h]},
                         {"name": "centre_strict", "rect": [x, y, w, h], "threshold": 0.3}]}
        station = {"name": "station1", "source": str(synth_video.path), "loop": True, "fps": 30, "mode": "triggered",
                   "rois": [{"name": "centre", "rect": [x, y, w, h]}],
                   "inspect": {"frames": 2, "interval_ms": 0, "deadline_ms": 3000, "queue": 8}}
        web = {"port": 0, "token": TOKEN, "max_body_mb": MAX_BODY_MB, "max_waiting": MAX_WAITING, **http}
        cfg = line_cfg(line_model, self.broker, [line, station], node="testbox", spool={"dir": str(tmp / "spool")},
                       http=web)
        self.daemon = Daemon(parse_config(cfg, env={}))
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while self.daemon.inspection.state("station1") != "ready" or not self.daemon.http.alive():
            assert time.monotonic() < end and self.thread.is_alive(), "the daemon never became ready"
            time.sleep(0.05)
        self.port = self.daemon.http.address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.classifier = self.daemon.slot.active.classifier

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30, **kw)

    def metric(self, name: str, **labels) -> float:
        return self.daemon.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.daemon.stop_event.set()
        self.thread.join(30)
        self.broker.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, line_model, synth_video):
    rig = WebRig(tmp_path_factory.mktemp("web"), line_model, synth_video)
    yield rig
    rig.close()
    assert not rig.thread.is_alive(), "the daemon did not stop"


def sample_pngs(images: Path, n: int) -> list[Path]:
    """`n` of the labelled crops, spread over every class."""
    files = sorted(images.rglob("*.png"))
    return files[:: max(1, len(files) // n)][:n]


def video_frame_png(synth_video, index: int = 5) -> bytes:
    cap = cv2.VideoCapture(str(synth_video.path))
    for _ in range(index + 1):
        ok, frame = cap.read()
        assert ok
    cap.release()
    return cv2.imencode(".png", frame)[1].tobytes()


def png_bomb(side: int = 20000) -> bytes:
    """A real grey PNG of side x side pixels (400 MB decoded) that compresses to a few hundred kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    z = zlib.compressobj(9)
    rows = bytes(side + 1) * 500  # filter byte + a row of zeros, 500 rows at a time
    idat = b"".join(z.compress(rows) for _ in range(side // 500)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def raw_get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A GET sent byte for byte as given (httpx and browsers would normalise `..` away)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        for key, value in {"Host": f"127.0.0.1:{port}", **AUTH, **(headers or {})}.items():
            conn.putheader(key, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_metrics_and_healthz_answer_without_the_token_and_every_request_is_counted(rig):
    # given the web front with a token set
    with httpx.Client(base_url=rig.url, timeout=10) as anonymous:
        # when a scraper and a load balancer ask without the token
        metrics = anonymous.get("/metrics")
        health = anonymous.get("/healthz")
        # and someone asks the protocol without it
        refused = anonymous.get("/v2")
    # then /metrics and /healthz answer, the rest asks for the token
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "visiond_frames_captured_total" in metrics.text
    assert health.status_code in (200, 503) and health.json()["ok"] is (health.status_code == 200)
    assert set(health.json()["cameras"]) == {"line", "station1"}
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    # and every answer carries the security headers
    for r in (metrics, health, refused):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer" and "default-src 'none'" in r.headers["content-security-policy"]
    # and the requests are counted by route template and status (each once its answer is sent: the last one
    # may not be counted yet when the client has it)
    wait_until(lambda: rig.metric("visiond_http_requests_total", route="/v2", code="401") >= 1, 10,
               "the refused /v2 request counted")
    assert rig.metric("visiond_http_requests_total", route="/v2", code="401") >= 1
    assert rig.metric("visiond_http_requests_total", route="/healthz", code=str(health.status_code)) >= 1


def test_classify_an_upload_gives_the_verdict_visiond_predict_gives(rig, line_model, synth_images):
    # given four labelled crops and what `visiond predict` says of them
    files = sample_pngs(synth_images, 4)
    expected = {str(r["path"]): r for r in predict_paths(line_model, [str(f) for f in files], device="cpu")}
    with rig.client() as c:
        for i, f in enumerate(files):
            # when each is sent as a multipart upload or as the raw body
            if i % 2:
                r = c.post("/v1/classify", files={"file": (f.name, f.read_bytes(), "image/png")})
            else:
                r = c.post("/v1/classify", content=f.read_bytes(), headers={"Content-Type": "image/png"})
            # then the answer is the prediction's verdict fields, with the same label and score
            assert r.status_code == 200, r.text
            got, want = r.json(), expected[str(f)]
            assert set(got) == {"label", "score", "top", "defect", "model", "roi"}
            assert got["label"] == want["label"]
            assert abs(got["score"] - want["score"]) < (1e-4 if rig.classifier.device == "cpu" else 5e-3)
            assert got["roi"] == "full" and got["model"] == {"name": rig.classifier.name,
                                                             "version": rig.classifier.version}
            assert isinstance(got["defect"], bool) and got["top"][0]["label"] == got["label"]


def test_classify_with_a_camera_answers_for_each_of_its_rois(rig, synth_video):
    # given a full frame of the line camera
    frame = video_frame_png(synth_video)
    with rig.client() as c:
        # when it is classified as that camera's frame
        r = c.post("/v1/classify", params={"camera": "line"}, content=frame)
        # then there is one verdict per ROI of the camera, in config order
        assert r.status_code == 200, r.text
        assert [p["roi"] for p in r.json()] == ["centre", "centre_strict"]
        assert r.json()[0]["label"] == r.json()[1]["label"]  # same crop, same model: only the threshold differs
        # and a camera that does not exist is a 404 naming the cameras
        missing = c.post("/v1/classify", params={"camera": "nope"}, content=frame)
        assert missing.status_code == 404 and "line" in missing.json()["error"]


def test_inspect_answers_with_the_stored_verdict_and_a_repeat_gets_the_same_one(rig):
    check = schema_validator("inspection.schema.json")
    with rig.client() as c:
        # when a part is inspected over HTTP
        r = c.post("/v1/inspect/station1", json={"part_id": "part-7", "trigger_id": "t-7"})
        assert r.status_code == 200, r.text
        verdict = r.json()
        # then the answer is the inspection payload of that part, from the http door
        check.validate(verdict)
        assert verdict["part_id"] == "part-7" and verdict["door"] == "http" and verdict["verdict"] in ("OK", "NG")
        assert [roi["name"] for roi in verdict["rois"]] == ["centre"]
        # and the same trigger again is answered from the store, not inspected twice
        again = c.post("/v1/inspect/station1", json={"part_id": "part-7", "trigger_id": "t-7"})
        assert again.status_code == 200 and again.json()["id"] == verdict["id"]
        # and bad requests are one-line 400s
        for camera, body, word in (("station1", {}, "part_id"), ("line", {"part_id": "x"}, "triggered"),
                                   ("station1", {"part_id": "x", "colour": 1}, "unknown"),
                                   ("station1", {"part_id": "x", "camera": "line"}, "path")):
            bad = c.post(f"/v1/inspect/{camera}", json=body)
            assert bad.status_code == 400 and word in bad.json()["error"] and "\n" not in bad.json()["error"]
        assert c.post("/v1/inspect/station1", content=b"{not json").status_code == 400
    assert rig.metric("visiond_triggers_total", camera="station1", door="http") >= 2


def test_hostile_requests_are_refused_and_the_daemon_keeps_serving(rig, synth_images):
    png = sample_pngs(synth_images, 1)[0].read_bytes()
    bomb = png_bomb()
    with rig.client() as c:
        # an oversized body: refused by its Content-Length, and when sent chunked without one
        big = bytes(MAX_BODY_MB * 1024 * 1024 + 1)
        assert c.post("/v1/classify", content=big).status_code == 413
        assert c.post("/v1/classify", content=iter([big[:1 << 20], big[1 << 20:]])).status_code == 413
        # a 20000 x 20000 PNG (400 MB decoded): refused by its header, at once
        t0 = time.monotonic()
        r = c.post("/v1/classify", content=bomb)
        assert r.status_code == 413 and "pixels" in r.json()["error"] and time.monotonic() - t0 < 2.0
        # bytes that are no image
        assert c.post("/v1/classify", content=b"GIF89a not really").status_code == 400
        assert c.post("/v1/classify", content=b"").status_code == 400
        # a wrong token, a missing one, another scheme
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": f"Basic {TOKEN}"}):
            assert c.post("/v1/classify", content=png, headers=headers).status_code == 401
        # a Host that is not this box (a DNS-rebinding page); a scraper's name for the box is fine on /metrics
        assert c.get("/v2", headers={"Host": "evil.example"}).status_code == 421
        assert c.post("/v1/classify", content=png, headers={"Host": "evil.example:80"}).status_code == 421
        assert c.get("/metrics", headers={"Host": "box7.plant.example:9108"}).status_code == 200
        # an unknown route and a wrong method
        assert c.get("/v1/nothing").status_code == 404 and c.get("/v1/classify").status_code == 405
    # paths that climb out, literally and percent-encoded
    for path in ("/static/../../../etc/passwd", "/api/evidence/..%2f..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd",
                 "/static/..\\..\\etc\\passwd"):
        status, headers, body = raw_get(rig.port, path)
        assert status == 404 and b"root:" not in body, (path, status)
        assert headers["x-frame-options"] == "DENY"
    # and the daemon still serves
    with rig.client() as c:
        assert c.post("/v1/classify", content=png).status_code == 200
    assert rig.thread.is_alive() and rig.daemon.http.alive()
    assert rig.metric("visiond_http_requests_total", route="/v1/classify", code="413") >= 3


def test_100_concurrent_classifications_while_a_camera_streams_get_200_or_503_and_none_hangs(rig, synth_video):
    frame = video_frame_png(synth_video)
    before = rig.metric("visiond_frames_captured_total", camera="line")

    async def load() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=rig.url, headers=AUTH, timeout=30, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/classify", content=frame,
                                                 params={"camera": "line"} if i % 2 else None) for i in range(100)))

    # when 100 requests come at once while the line camera streams at 30 fps
    t0 = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(load(), 60))
    took = time.monotonic() - t0
    # then each got 200 with a verdict or 503 with Retry-After, none waited for long
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= MAX_WAITING, codes
    assert all(r.headers.get("retry-after") == "1" for r in answers if r.status_code == 503)
    assert all("label" in (r.json() if i % 2 == 0 else r.json()[0]) for i, r in enumerate(answers)
               if r.status_code == 200)
    assert took < 30, took
    # and the camera kept streaming meanwhile (about 30 frames a second)
    assert rig.metric("visiond_frames_captured_total", camera="line") - before >= 15 * took


def test_a_port_already_taken_is_one_user_error_line(rig):
    # given the web front's port, taken by the running daemon
    cfg = rig.daemon.cfg
    taken = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": rig.port})})
    door = HttpDoor(dataclasses.replace(rig.daemon.http.ctx, cfg=taken))
    # when a second web front starts on it, then it says so in one line, and nothing keeps running
    with pytest.raises(UserError, match=f"^http: cannot listen on 127.0.0.1:{rig.port} \\(.+\\)$"):
        door.start()
    assert not door.alive()
    # and the daemon's own front still serves
    with rig.client() as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}


def test_200_concurrent_classifications_drop_no_more_camera_frames_than_the_same_minutes_without(
        tmp_path, line_model, synth_video):
    # given visiond with two cameras streaming the line at 30 fps (live-camera policy: the newest frames win)
    broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp_path)
    broker.start()
    cams = [{"name": n, "source": str(synth_video.path), "loop": True, "fps": 30, "policy": "latest",
             "roi": list(synth_video.roi)} for n in ("a", "b")]
    cfg = line_cfg(line_model, broker, cams, node="testbox", spool={"dir": str(tmp_path / "spool")},
                   http={"port": 0, "max_waiting": MAX_WAITING})
    daemon = Daemon(parse_config(cfg, env={}))
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    frame = video_frame_png(synth_video)

    def counts() -> tuple[float, float]:
        reg = daemon.metrics.registry
        got = sum(reg.get_sample_value("visiond_frames_captured_total", {"camera": c}) or 0.0 for c in "ab")
        lost = sum(reg.get_sample_value("visiond_frames_dropped_total", {"camera": c, "reason": r}) or 0.0
                   for c in "ab" for r in ("queue_full", "model_unavailable"))
        return got, lost

    def window(seconds: float, load: bool) -> tuple[float, float, list[int]]:
        got0, lost0 = counts()
        codes: list[int] = []
        end = time.monotonic() + seconds
        if load:
            async def wave(c: httpx.AsyncClient) -> None:
                rs = await asyncio.gather(*(c.post("/v1/classify", content=frame) for _ in range(200)))
                codes.extend(r.status_code for r in rs)

            async def run() -> None:
                limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http.address[1]}", timeout=30,
                                             limits=limits) as c:
                    while time.monotonic() < end:
                        await asyncio.wait_for(wave(c), 30)

            asyncio.run(run())
        time.sleep(max(0.0, end - time.monotonic()))
        got1, lost1 = counts()
        return got1 - got0, lost1 - lost0, codes

    try:
        end = time.monotonic() + 60
        while counts()[0] < 60:
            assert time.monotonic() < end and thread.is_alive(), "the cameras never streamed"
            time.sleep(0.1)
        # when the same few seconds are measured without and then with waves of 200 concurrent classifications
        quiet_got, quiet_lost, _ = window(8, load=False)
        busy_got, busy_lost, codes = window(8, load=True)
    finally:
        daemon.stop_event.set()
        thread.join(30)
        broker.stop()
    # then every request got 200 or 503 (none hung: each wave was bounded by 30 s)
    assert codes and set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(200) >= MAX_WAITING
    # and the cameras lost no more frames under the load than without it (2 % of the frames of slack)
    assert busy_lost <= quiet_lost + 0.02 * busy_got, (quiet_got, quiet_lost, busy_got, busy_lost)
    assert busy_got >= 0.5 * quiet_got, (quiet_got, busy_got)  # and they kept streaming
