"""`model.runtime: remote`: batches classified by a model server over the Open Inference Protocol v2 give the
probabilities the local runtime gives (visiond's `pixels`, a `visiond export --format triton` model, an FP32 NCHW
model); a server that is killed, hangs or is busy costs a batch at most the timeout and a clear ModelUnavailable,
and one that comes back serves again.

The servers here are a small OIP v2 server on the standard library (the protocol's JSON and binary-data
extension), running a real TorchClassifier or the exported ONNX model, as visiond or Triton would."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import json_format, text_format

from conftest import free_port
from daemon_helpers import Daemon, line_cfg, wait_offline
from shapes import draw_shape
from test_export_triton import triton_model_config
from visiond.errors import UserError
from visiond.models.arch import build_model
from visiond.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visiond.models.export import export_triton
from visiond.models.remote import ModelUnavailable, RemoteClassifier
from visiond.models.runtime import TorchClassifier, make_classifier
from visiond.preprocess import PreprocessSpec

CLASSES = ["good", "scratch", "spot"]
SIZE = 48
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "line.ckpt"
    torch.manual_seed(0)
    spec = PreprocessSpec.for_color(SIZE, "rgb", imagenet=True)
    net = build_model("smallcnn", len(CLASSES), 3, SIZE)
    save_checkpoint(path, arch="smallcnn", classes=CLASSES, spec=spec, state_dict=net.state_dict(),
                    arch_args={"in_channels": 3, "image_size": SIZE})
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def local(ckpt):
    return TorchClassifier(ckpt, device="cpu", precision="fp32", threads=1)


def line_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [draw_shape(("circle", "square", "triangle")[i % 3], int(rng.integers(24, 160)), rng) for i in range(n)]


# ---------------------------------------------------------------- a small Open Inference Protocol v2 server


class OipServer:
    """One model over OIP v2 HTTP: metadata, Triton's config endpoint (if given), infer with binary data.

    `kill()` drops the listener and every open connection, as a crashed server does; `start()` comes back
    on the same port. `busy` answers that many infer requests 503 first; `delay_s` makes infer hang.
    """

    def __init__(self, name: str, metadata: dict, predict: Callable[[np.ndarray], np.ndarray],
                 config: dict | None = None):
        self.name, self.metadata, self.predict, self.config = name, metadata, predict, config
        self.port = 0
        self.batches: list[int] = []
        self.authorization: set[str | None] = set()
        self.busy, self.delay_s = 0, 0.0
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OipServer":
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def kill(self) -> None:
        self._server.kill()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, oip: OipServer):
        self.oip, self.connections, self.lock = oip, set(), threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def kill(self) -> None:
        self.shutdown()
        self.server_close()
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Triton: a kill must break a connection the client holds

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def do_GET(self) -> None:
        oip: OipServer = self.server.oip
        parts = self.path.strip("/").split("/")
        if parts[:2] == ["v2", "models"] and len(parts) in (3, 4) and parts[2] != oip.name:
            return self._json(400, {"error": f"Request for unknown model: '{parts[2]}' is not found"})
        if parts[:2] == ["v2", "models"] and len(parts) == 3:
            return self._json(200, oip.metadata)
        if parts[:2] == ["v2", "models"] and parts[3:] == ["config"] and oip.config is not None:
            return self._json(200, oip.config)
        return self._json(404, {"error": "Not Found"})

    def do_POST(self) -> None:
        oip: OipServer = self.server.oip
        body = self.rfile.read(int(self.headers["Content-Length"]))
        oip.authorization.add(self.headers.get("Authorization"))
        if oip.delay_s:
            time.sleep(oip.delay_s)
        if oip.busy:
            oip.busy -= 1
            return self._json(503, {"error": "busy"})
        head_len = int(self.headers.get("Inference-Header-Content-Length") or len(body))
        doc, tail = json.loads(body[:head_len]), body[head_len:]
        [tensor] = doc["inputs"]
        if tensor["name"] != oip.metadata["inputs"][-1]["name"]:
            return self._json(400, {"error": f"unexpected inference input '{tensor['name']}'"})
        dtype = {"UINT8": np.uint8, "FP32": np.float32}[tensor["datatype"]]
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        data = np.frombuffer(tail[:size], dtype) if size is not None else np.asarray(tensor["data"], dtype)
        x = data.reshape(tensor["shape"]).copy()
        oip.batches.append(len(x))
        probs = np.ascontiguousarray(oip.predict(x), dtype=np.float32)
        raw = probs.tobytes()
        head = json.dumps({"model_name": oip.name, "outputs": [
            {"name": doc["outputs"][0]["name"], "datatype": "FP32", "shape": list(probs.shape),
             "parameters": {"binary_data_size": len(raw)}}]}).encode()
        self._send(200, head + raw, {"Content-Type": "application/octet-stream",
                                     "Inference-Header-Content-Length": str(len(head))})


def visiond_server(ckpt, local: TorchClassifier, max_batch: int = 256) -> OipServer:
    """What visiond's own front says and does for its model (`pixels` in, `probabilities` out)."""
    s = ckpt.spec
    meta = {"name": ckpt.name, "versions": [ckpt.version], "platform": "visiond_torch",
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, s.height, s.width, s.channels]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(ckpt.classes)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"classes": list(ckpt.classes), "max_batch_size": max_batch}}
    return OipServer(ckpt.name, meta, local.predict).start()


def remote(server: OipServer, ckpt, timeout_s: float = 2.0, **kw) -> RemoteClassifier:
    clf = make_classifier(ckpt, runtime="remote", url=server.url, remote_timeout_s=timeout_s, **kw)
    assert isinstance(clf, RemoteClassifier)
    return clf


def until_served(clf: RemoteClassifier, images: list[np.ndarray], within_s: float) -> tuple[np.ndarray, int]:
    """Probabilities once the server answers again, and how many calls were refused before that."""
    deadline, refused = time.monotonic() + within_s, 0
    while True:
        try:
            return clf.predict_images(images), refused
        except ModelUnavailable as exc:
            refused += 1
            assert time.monotonic() < deadline, f"still unavailable after {within_s} s: {exc}"
            time.sleep(min(exc.retry_after_s, 0.5) + 0.01)


# ---------------------------------------------------------------- tests


def test_a_visiond_server_gives_the_local_probabilities_in_batches_it_accepts(ckpt, local):
    # given a server speaking for the model as visiond's front does, taking at most 4 images a request
    server = visiond_server(ckpt, local, max_batch=4)
    try:
        # when a box with runtime remote (and the server's token) warms up and classifies line crops
        clf = remote(server, ckpt, remote_token=TOKEN)
        clf.warmup(8)
        images = line_images(10)
        got = clf.predict_images(images)
        # then the probabilities are the local runtime's, over requests of at most 4 images
        assert np.abs(got - local.predict_images(images)).max() < 1e-4
        assert server.batches[-3:] == [4, 4, 2] and max(server.batches) <= 4
        assert server.authorization == {f"Bearer {TOKEN}"}
        # and the daemon sees the checkpoint's identity, with the server as the device
        assert (clf.runtime, clf.device, clf.classes, clf.version) == ("remote", server.url, ckpt.classes, ckpt.version)
    finally:
        server.kill()


def test_a_triton_repository_model_served_over_the_protocol_gives_the_local_probabilities(ckpt, local, tmp_path):
    # given the checkpoint exported as a Triton repository, served as Triton serves it: the ONNX model run by
    # onnxruntime, Triton's metadata, and its config endpoint answering config.pbtxt as JSON
    folder = export_triton(ckpt, tmp_path / "repo", max_batch=5).path
    config = text_format.Parse((folder / "config.pbtxt").read_text(), triton_model_config().ModelConfig())
    sess = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = {"name": ckpt.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}],
            "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]}
    server = OipServer(ckpt.name, meta, lambda x: sess.run(["probs"], {"pixels": x})[0],
                       json_format.MessageToDict(config, preserving_proto_field_name=True)).start()
    try:
        # when a box classifies through it
        clf = remote(server, ckpt)
        clf.warmup(8)
        images = line_images(12, seed=1)
        got = clf.predict_images(images)
        # then it agrees with the local runtime, in requests within the config's max_batch_size
        assert np.abs(got - local.predict_images(images)).max() < 1e-4
        assert max(server.batches) == 5
    finally:
        server.kill()


def test_a_model_taking_normalised_fp32_nchw_gets_the_checkpoints_normalisation(ckpt, local):
    # given a server whose model is the bare network (FP32 NCHW in, as most ONNX exports take it)
    net = ckpt.build().eval()

    def bare(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()

    meta = {"name": "bare", "versions": ["3"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
            "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]}
    server = OipServer("bare", meta, bare).start()
    try:
        # when a box points model.remote_model at it
        clf = remote(server, ckpt, remote_model="bare")
        clf.warmup(4)
        images = line_images(6, seed=2)
        # then the box normalised with the checkpoint's (ImageNet) statistics: the answer is the local runtime's
        assert np.abs(clf.predict_images(images) - local.predict_images(images)).max() < 1e-4
    finally:
        server.kill()


def test_a_server_whose_model_does_not_fit_the_checkpoint_is_refused_at_warmup(ckpt, local):
    # given a server for a model with the classes in another order
    server = visiond_server(ckpt, local)
    server.metadata["parameters"]["classes"] = ["scratch", "good", "spot"]
    try:
        # when a box warms up against it, then it is refused naming both class lists
        with pytest.raises(CheckpointError, match=r"has classes \['scratch', 'good', 'spot'\], the checkpoint "
                                                  r"\['good', 'scratch', 'spot'\]"):
            remote(server, ckpt).warmup(1)
        # and a model at another input size is refused naming what it takes
        server.metadata["parameters"]["classes"] = CLASSES
        server.metadata["inputs"][1]["shape"] = [-1, 64, 64, 3]
        with pytest.raises(CheckpointError, match=r"expected pixels UINT8 \[-1, 48, 48, 3\].*pixels UINT8 "
                                                  r"\[-1, 64, 64, 3\]"):
            remote(server, ckpt).warmup(1)
    finally:
        server.kill()


def test_a_killed_server_fails_each_call_within_the_timeout_and_a_restarted_one_serves_again(ckpt, local):
    # given a box classifying through a server
    server = visiond_server(ckpt, local)
    clf = remote(server, ckpt, timeout_s=1.0)
    clf.warmup(4)
    images = line_images(4, seed=3)
    want = local.predict_images(images)
    assert np.abs(clf.predict_images(images) - want).max() < 1e-4
    # when the server is killed under it
    server.kill()
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match=f"model server {server.url}") as first:
        clf.predict_images(images)
    # then the call fails within the timeout, saying when to ask again
    assert time.monotonic() - started < 1.0 and first.value.retry_after_s > 0
    # and until then calls fail at once, without waiting on the network
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="next try in"):
        clf.predict_images(images)
    assert time.monotonic() - started < 0.05
    # when the server comes back on its port
    served_before = len(server.batches)
    server.start()
    got, _ = until_served(clf, images, within_s=15)
    # then the box is served again, with the same answers
    assert np.abs(got - want).max() < 1e-4 and len(server.batches) > served_before
    server.kill()


def test_a_server_that_hangs_costs_a_batch_the_timeout_and_no_more(ckpt, local):
    server = visiond_server(ckpt, local)
    try:
        clf = remote(server, ckpt, timeout_s=0.5)
        clf.warmup(1)
        # given a server that stops answering infer
        server.delay_s = 3.0
        started = time.monotonic()
        # then a call gives up after the timeout, not after the server's delay
        with pytest.raises(ModelUnavailable, match="TimeoutError"):
            clf.predict_images(line_images(2))
        assert 0.45 < time.monotonic() - started < 1.2
    finally:
        server.kill()


def test_a_busy_server_is_asked_again_after_a_short_backoff(ckpt, local):
    server = visiond_server(ckpt, local)
    try:
        clf = remote(server, ckpt)
        clf.warmup(1)
        # given a server that answers the next two infer requests 503 (overloaded)
        server.busy, before = 2, len(server.batches)
        # when a box classifies, then the third try gets through within the one call
        images = line_images(3, seed=4)
        assert np.abs(clf.predict_images(images) - local.predict_images(images)).max() < 1e-4
        assert server.busy == 0 and len(server.batches) == before + 1
    finally:
        server.kill()


def test_a_box_that_starts_before_its_server_warms_up_and_is_served_once_the_server_is_up(ckpt, local):
    # given a server that is not up yet
    server = visiond_server(ckpt, local)
    server.kill()
    clf = remote(server, ckpt, timeout_s=0.5)
    # when the box warms up, then it does not fail (the daemon starts and drops frames meanwhile)
    clf.warmup(4)
    with pytest.raises(ModelUnavailable):
        clf.predict_images(line_images(1))
    # and once the server is up, the box reads its metadata and is served
    server.start()
    images = line_images(5, seed=5)
    got, _ = until_served(clf, images, within_s=15)
    assert np.abs(got - local.predict_images(images)).max() < 1e-4
    server.kill()


def test_a_grpc_url_without_the_grpc_client_or_a_url_it_cannot_use_is_a_one_line_error(ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as on an install without tritonclient[grpc]
    with pytest.raises(UserError, match=r"pip install 'tritonclient\[grpc\]'"):
        make_classifier(ckpt, runtime="remote", url="grpc://127.0.0.1:8001")
    with pytest.raises(UserError, match="model.url 'ftp://x': expected http://host:port"):
        RemoteClassifier(ckpt, "ftp://x")
    with pytest.raises(UserError, match="credentials cannot go in the URL"):
        RemoteClassifier(ckpt, "http://user:secret@10.0.0.9:8000")


def test_the_remote_runtime_needs_a_url(ckpt):
    with pytest.raises(ValueError, match="needs model.url"):
        make_classifier(ckpt, runtime="remote")


# ---------------------------------------------------------------- two daemons: a box served by another visiond


def serving_cfg(line_model, mosquitto, synth_video, node: str, port: int, stream: bool) -> dict:
    """A daemon that serves its model over HTTP; its triggered station keeps it running, `stream` adds line1."""
    x, y, w, h = synth_video.roi
    station = {"name": "station1", "source": str(synth_video.path), "loop": True, "fps": 10, "mode": "triggered",
               "rois": [{"name": "centre", "rect": [x, y, w, h]}]}
    cams = [station] + ([{"name": "line1", "source": str(synth_video.path), "roi": [x, y, w, h]}] if stream else [])
    return line_cfg(line_model, mosquitto, cams, node=node, http={"port": port})


def box_cfg(line_model, mosquitto, synth_video, server_port: int, **camera) -> dict:
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi), **camera}
    cfg = line_cfg(line_model, mosquitto, [cam], node="box")
    cfg["model"].update(runtime="remote", url=f"http://127.0.0.1:{server_port}", remote_timeout_s=1.0)
    return cfg


def ready(daemon: Daemon) -> bool:
    try:
        return daemon.http("/v2/health/ready")[0] == 200
    except OSError:
        return False


def model_status(rec) -> str | None:
    details = rec.messages("visiond/box/status/detail")
    return json.loads(details[-1].payload).get("model_status", {}).get("state") if details else None


def test_a_daemon_with_runtime_remote_classifies_the_line_as_the_serving_daemon_does(tmp_path, mosquitto,
                                                                                    mqtt_recorder, line_model,
                                                                                    synth_video):
    # given a daemon classifying the line video itself, and serving its model over HTTP
    rec = mqtt_recorder("visiond/#")
    port = free_port()
    server = Daemon(tmp_path / "server", serving_cfg(line_model, mosquitto, synth_video, "server", port, True))
    try:
        server.until(lambda: ready(server), 90, "the serving daemon to be ready")
        # when a second daemon, with runtime remote pointed at the first, classifies the same video to its end
        box = Daemon(tmp_path / "box", box_cfg(line_model, mosquitto, synth_video, port))
        try:
            assert box.wait(180) == 0, box.stderr[-3000:]
        finally:
            box.close()
        rec.wait_for(lambda ms: len(rec.json_payloads("/server/line1/prediction")) >= 300, 60, "the server's own")
        wait_offline(rec, 10, node="box")  # the box's own messages: the server's say nothing of them
    finally:
        server.close()
    local = {p["seq"]: p for p in rec.json_payloads("/server/line1/prediction")}
    remote_preds = rec.json_payloads("/box/line1/prediction")
    # then the box classified every frame, each with the label and score the local runtime gave
    assert [p["seq"] for p in remote_preds] == list(range(1, 301)) and len(local) == 300
    assert [p["label"] for p in remote_preds] == [local[p["seq"]]["label"] for p in remote_preds]
    assert max(abs(p["score"] - local[p["seq"]]["score"]) for p in remote_preds) < 1e-4
    # and says it was served remotely, by that server
    detail = json.loads(rec.messages("visiond/box/status/detail")[-1].payload)
    assert detail["model"]["runtime"] == "remote" and detail["model"]["device"] == f"http://127.0.0.1:{port}"


def test_a_remote_daemon_survives_its_server_being_killed_and_restarted(tmp_path, mosquitto, mqtt_recorder,
                                                                         line_model, synth_video):
    # given a box streaming a looping camera through a serving daemon
    rec = mqtt_recorder("visiond/#")
    port = free_port()
    server = Daemon(tmp_path / "server", serving_cfg(line_model, mosquitto, synth_video, "server", port, False))
    box = None
    try:
        server.until(lambda: ready(server), 90, "the serving daemon to be ready")
        box = Daemon(tmp_path / "box", box_cfg(line_model, mosquitto, synth_video, port, loop=True, fps=15))
        box.until(lambda: len(rec.json_payloads("/box/line1/prediction")) >= 20, 90, "the box's first predictions")
        # when the server is killed
        server.send(signal.SIGKILL)
        server.wait(10)
        # then the box keeps running, counts the frames it cannot classify and says the model is unavailable
        box.until(lambda: (box.metric("visiond_frames_dropped_total", camera="line1", reason="model_unavailable")
                           or 0) > 0, 30, "drops counted as model_unavailable")
        box.until(lambda: model_status(rec) == "unavailable", 10, "status/detail model_status unavailable")
        during = len(rec.json_payloads("/box/line1/prediction"))
        time.sleep(2.0)
        assert box.proc.poll() is None, box.stderr[-3000:]
        assert len(rec.json_payloads("/box/line1/prediction")) <= during + 1  # nothing piled up to publish later
        # when the server comes back on its port
        server.close()
        server = Daemon(tmp_path / "server2", serving_cfg(line_model, mosquitto, synth_video, "server", port, False))
        # then the box is served again and says so
        box.until(lambda: len(rec.json_payloads("/box/line1/prediction")) >= during + 20, 120, "predictions again")
        box.until(lambda: model_status(rec) == "ok", 10, "status/detail model_status ok")
        assert box.stop() == 0, box.stderr[-3000:]
    finally:
        if box is not None:
            box.close()
        server.close()
