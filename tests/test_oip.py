"""The Open Inference Protocol v2 on the daemon's web front, through NVIDIA's own `tritonclient.http`: readiness,
model metadata with the classes, infer on encoded PNGs and on a UINT8 batch with the same labels as `visiond
predict`, binary outputs on and off; and the protocol errors a client gets for wrong tensors."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from test_http import AUTH, WebRig, png_bomb, sample_pngs
from visiond.train.predict import load_resized, predict_paths


@pytest.fixture(scope="module")
def rig(tmp_path_factory, line_model, synth_video):
    rig = WebRig(tmp_path_factory.mktemp("oip"), line_model, synth_video, max_body_mb=16)  # 16 PNGs: 3 MB
    yield rig
    rig.close()
    assert not rig.thread.is_alive(), "the daemon did not stop"


@pytest.fixture(scope="module")
def client(rig):
    c = triton.InferenceServerClient(f"127.0.0.1:{rig.port}", network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def files(synth_images, line_model):
    """16 labelled crops over every class and what `visiond predict` says of each, in order."""
    paths = sample_pngs(synth_images, 16)
    by_path = {r["path"]: r for r in predict_paths(line_model, [str(p) for p in paths], device="cpu")}
    return paths, [by_path[str(p)] for p in paths]


def tolerance(rig) -> float:
    """`visiond predict` runs fp32 on the CPU; a daemon on a GPU (autocast, TF32) differs in the 4th decimal."""
    return 1e-4 if rig.classifier.device == "cpu" else 5e-3


def auth() -> dict:
    """Fresh headers per call: tritonclient writes Inference-Header-Content-Length into the dict it is given."""
    return dict(AUTH)


def _labels(result) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in result.as_numpy("label").tolist()]


def _outputs(binary: bool) -> list:
    return [triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("label", binary_data=binary)]


def _status(call) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status()


def test_the_client_sees_a_ready_server_and_the_model_with_its_classes(rig, client):
    clf = rig.classifier
    # when tritonclient asks the usual questions
    assert client.is_server_live(headers=auth()) and client.is_server_ready(headers=auth())
    assert client.is_model_ready(clf.name, headers=auth())
    assert client.is_model_ready(clf.name, clf.version, headers=auth())
    meta = client.get_model_metadata(clf.name, headers=auth())
    server = client.get_server_metadata(headers=auth())
    # then the metadata names the model, its version, both inputs, both outputs and the classes in output order
    assert meta["name"] == clf.name and meta["versions"] == [clf.version]
    assert meta["parameters"]["classes"] == list(clf.classes) == ["empty", "ok", "scratch", "spot"]
    s = clf.spec
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("BYTES", [-1]), "pixels": ("UINT8", [-1, s.height, s.width, s.channels])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 4]), "label": ("BYTES", [-1])}
    assert "binary_tensor_data" in server["extensions"]
    # and a model or version not served is not ready; without the token nothing is
    assert not client.is_model_ready("resnet50", headers=auth())
    assert not client.is_model_ready(clf.name, "0" * 16, headers=auth())
    assert not client.is_server_live()
    assert _status(lambda: client.get_model_metadata("resnet50", headers=auth())) == "404"


def test_infer_on_16_pngs_gives_the_labels_of_visiond_predict_with_binary_outputs_on_and_off(rig, client, files):
    paths, expected = files
    images = triton.InferInput("images", [len(paths)], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
    for binary in (True, False):
        # when the encoded files are sent as a BYTES tensor, asking for binary outputs or JSON ones
        result = client.infer(rig.classifier.name, [images], outputs=_outputs(binary), headers=auth())
        # then the labels and top scores are those of `visiond predict`
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (16, 4)
        assert _labels(result) == [e["label"] for e in expected]
        assert np.allclose(probs.max(axis=1), [e["score"] for e in expected], atol=tolerance(rig))
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        sent_binary = ["parameters" in o for o in result.get_response()["outputs"]]
        assert sent_binary == [binary, binary]
    # and without `outputs` the client's default (binary outputs) gets both
    default = client.infer(rig.classifier.name, [images], headers=auth(), request_id="req-1")
    assert _labels(default) == [e["label"] for e in expected] and default.get_response()["id"] == "req-1"


def test_infer_on_a_uint8_batch_gives_the_same_labels_and_the_classification_extension(rig, client, files):
    paths, expected = files
    clf = rig.classifier
    pixels = np.stack([load_resized(p, clf.spec) for p in paths])  # RGB at the model's size, as predict feeds it
    for binary in (True, False):
        # when the model's own input is sent, as binary data or as a JSON list, on the versioned route
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(clf.name, [tensor], model_version=clf.version, outputs=_outputs(not binary),
                              headers=auth())
        # then the labels are the same
        assert _labels(result) == [e["label"] for e in expected]
        assert np.allclose(result.as_numpy("probabilities").max(axis=1), [e["score"] for e in expected],
                           atol=tolerance(rig))
    # and `classification: 2` answers "score:index:label" for the two best classes of each image
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    top2 = client.infer(clf.name, [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=2)],
                        headers=auth()).as_numpy("probabilities")
    assert top2.shape == (16, 2)
    for row, e in zip(top2, expected):
        score, index, label = row[0].decode().split(":")
        assert label == e["label"] == clf.classes[int(index)] and abs(float(score) - e["score"]) < tolerance(rig)


def test_wrong_tensors_are_400s_that_say_what_was_expected(rig, client, files):
    clf = rig.classifier
    s = clf.spec
    name = clf.name
    # tritonclient's own requests with a wrong shape, a wrong datatype, an unknown input, an unknown version
    wrong_shape = triton.InferInput("pixels", [2, s.height + 1, s.width, 3], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((2, s.height + 1, s.width, 3), np.uint8))
    as_float = triton.InferInput("pixels", [2, s.height, s.width, 3], "FP32")
    as_float.set_data_from_numpy(np.zeros((2, s.height, s.width, 3), np.float32))
    unknown = triton.InferInput("tensor", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    for tensor, words in ((wrong_shape, f"[N, {s.height}, {s.width}, 3]"), (as_float, "expected UINT8"),
                          (unknown, "`images` or `pixels`")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, [tensor], headers=auth())
        assert info.value.status() == "400" and words in info.value.message(), info.value.message()
    ok = triton.InferInput("pixels", [1, s.height, s.width, 3], "UINT8")
    ok.set_data_from_numpy(np.zeros((1, s.height, s.width, 3), np.uint8))
    assert _status(lambda: client.infer(name, [ok], model_version="7", headers=auth())) == "404"
    assert _status(lambda: client.infer("resnet50", [ok], headers=auth())) == "404"
    # and hand-made requests that break the protocol's rules
    png = files[0][0].read_bytes()
    one = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}
    header = json.dumps({"inputs": [{**one, "data": None, "parameters": {"binary_data_size": len(png) + 4}}]})
    cases = [
        ({"inputs": [one, one]}, {}, 400, "exactly one input"),
        ({"inputs": [{**one, "shape": [2]}]}, {}, 400, "expected 2 base64 strings"),
        ({"inputs": [{**one, "data": ["%%%"]}]}, {}, 400, "base64"),
        ({"inputs": [{**one, "shape": [0], "data": []}]}, {}, 400, "1..256"),
        ({"inputs": [{**one, "shape": [1, 1]}]}, {}, 400, "expected [N]"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, s.height, s.width, 3], "data": [300]}]}, {},
         400, "integers 0..255"),
        ({"inputs": [one], "outputs": [{"name": "logits"}]}, {}, 400, "`probabilities` or `label`"),
        (header.encode() + b"\x00\x00", {"Inference-Header-Content-Length": str(len(header))}, 400, "binary_data_size"),
        (b"{}", {"Inference-Header-Content-Length": "9999"}, 400, "Inference-Header-Content-Length"),
        (b"[1, 2]", {}, 400, "JSON object"),
        ({"inputs": [{**one, "data": [base64.b64encode(png_bomb()).decode()]}]}, {}, 413, "pixels"),
        ({"inputs": [one]}, {"Content-Encoding": "gzip"}, 415, "uncompressed"),
    ]
    with httpx.Client(base_url=rig.url, headers=auth(), timeout=30) as c:
        url = f"/v2/models/{name}/infer"
        for body, headers, code, words in cases:
            r = c.post(url, content=body if isinstance(body, bytes) else json.dumps(body).encode(), headers=headers)
            assert r.status_code == code and words in r.json()["error"], (body if isinstance(body, bytes) else
                                                                          str(body)[:200], r.status_code, r.text)
        # and the JSON form of BYTES (base64) works for clients without the binary extension
        good = c.post(url, json={"inputs": [one]})
        assert good.status_code == 200 and good.json()["outputs"][1]["data"] == [files[1][0]["label"]]
