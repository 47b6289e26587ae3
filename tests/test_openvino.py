"""`model.runtime: openvino` (and `auto`): torch's verdicts from Intel's runtime, exported once per model version,
a broken cache said in one line and replaced, and a real daemon publishing its predictions."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import onnx
import pytest

from daemon_helpers import line_cfg, run_to_end, wait_offline
from test_export import make_checkpoint
from test_onnx_runtime import assert_same_verdicts, first_export, random_frames
from visiond.config import ConfigError, parse_config
from visiond.models.checkpoint import load_checkpoint
from visiond.models.openvino_runtime import CPU_AUTO_RUNTIME, auto_runtime
from visiond.models.runtime import TorchClassifier, make_classifier


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("openvino") / "m.ckpt", "smallcnn", 48)


@pytest.mark.parametrize("arch,size,color", [("smallcnn", 48, "rgb"), ("smallcnn", 32, "gray"),
                                             pytest.param("mobilenet_v3_small", 64, "rgb", marks=pytest.mark.slow)])
def test_openvino_serves_the_same_probabilities_as_torch(arch, size, color, tmp_path):
    # given a checkpoint served by openvino and by torch
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "m.ckpt", arch, size, color))
    ov_clf = make_classifier(ckpt, runtime="openvino", cache_dir=tmp_path / "models")
    torch_clf = TorchClassifier(ckpt, device="cpu", precision="fp32")
    assert (ov_clf.runtime, ov_clf.version, ov_clf.device, ov_clf.classes) == ("openvino", ckpt.version, "cpu",
                                                                                ckpt.classes)
    ov_clf.warmup(8)
    # when both classify the same decoded frames (any size: each resizes by the checkpoint's spec),
    # in batches of sizes the export never saw
    frames = random_frames(7)
    for batch in (frames, frames[:2], frames[:5]):
        got, want = ov_clf.predict_images(batch), torch_clf.predict_images(batch)
        # then the probabilities agree (the export's own tolerance), so every verdict is the same
        assert want.shape == (len(batch), 3)
        assert_same_verdicts(got, want, len(batch))


@pytest.mark.slow  # two exports
def test_the_export_is_cached_by_model_version_and_shared_with_onnxruntime(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path)
    cache = tmp_path / "models"
    # given a first load, which exports
    exported, stamp = first_export(ckpt, "openvino", cache)
    # when the same version loads again (a restart), or onnxruntime loads it, then the file is used as is, at once
    for runtime in ("openvino", "onnxruntime"):
        t0 = time.monotonic()
        assert make_classifier(ckpt, runtime=runtime, cache_dir=cache).runtime == runtime
        assert time.monotonic() - t0 < 3.0 and exported.stat().st_mtime_ns == stamp
    # when another version of the model loads into the same cache, then it gets its own file beside the first
    other = load_checkpoint(make_checkpoint(tmp_path / "other.ckpt", "smallcnn", 32))
    make_classifier(other, runtime="openvino", cache_dir=cache)
    assert sorted(p.name for p in cache.glob("*.onnx")) == sorted([f"{ckpt.version}.onnx", f"{other.version}.onnx"])
    assert exported.stat().st_mtime_ns == stamp


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow  # re-exports
def test_a_broken_cache_file_is_said_in_one_line_and_exported_again(ckpt_path, tmp_path, caplog):
    ckpt = load_checkpoint(ckpt_path)
    exported, _ = first_export(ckpt, "openvino", tmp_path / "models")
    cache = exported.parent
    x = np.random.default_rng(5).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    want = TorchClassifier(ckpt, device="cpu", precision="fp32").predict(x)
    # given a cache file that still names this version but whose weights were damaged (bit rot, a bad copy)
    model = onnx.load(str(exported))
    weights = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weights.raw_data = bytes(len(weights.raw_data))
    onnx.save(model, str(exported))
    # when the model loads, then one warning line names the file and the disagreement, and the export is redone
    with caplog.at_level(logging.WARNING):
        clf = make_classifier(ckpt, runtime="openvino", cache_dir=cache)
    said = _warnings(caplog)
    assert len(said) == 1 and str(exported) in said[0] and "differ from torch" in said[0], said
    assert "\n" not in said[0] and "exporting it again" in said[0]
    assert clf.runtime == "openvino" and np.abs(clf.predict(x) - want).max() < 1e-4
    # given a cache file that is not a model at all (a power cut mid-copy)
    caplog.clear()
    exported.write_bytes(b"\x08\x07garbage")
    with caplog.at_level(logging.WARNING):
        clf = make_classifier(ckpt, runtime="openvino", cache_dir=cache)
    said = _warnings(caplog)
    assert len(said) == 1 and str(exported) in said[0] and "not an export of" in said[0], said
    assert clf.runtime == "openvino" and np.abs(clf.predict(x) - want).max() < 1e-4


def test_auto_is_torch_on_cuda_and_the_measured_runtime_on_a_cpu(ckpt_path, tmp_path):
    # the choice itself: CUDA named or found -> torch; a CPU -> the runtime the streams benchmark picked
    assert auto_runtime("cuda") == auto_runtime("cuda:1") == "torch"
    assert auto_runtime("cpu") == CPU_AUTO_RUNTIME in ("openvino", "onnxruntime")
    # on this CPU-only box, a daemon's `auto` model runs on that runtime
    clf = make_classifier(load_checkpoint(ckpt_path), runtime="auto", device="cpu", cache_dir=tmp_path / "models")
    assert clf.runtime == CPU_AUTO_RUNTIME


def test_the_config_takes_openvino_and_auto_and_refuses_openvino_on_cuda(ckpt_path):
    raw = {"cameras": [{"name": "c", "source": "/dev/video0"}], "model": {"checkpoint": str(ckpt_path)}}
    # an existing config without model.runtime keeps torch
    assert parse_config(raw, env={}).model.runtime == "torch"
    for runtime in ("openvino", "auto"):
        raw["model"]["runtime"] = runtime
        assert parse_config(raw, env={}).model.runtime == runtime
    raw["model"]["device"] = "cuda"
    assert parse_config(raw, env={}).model.runtime == "auto"  # auto on CUDA is torch
    raw["model"]["runtime"] = "openvino"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, env={})
    assert "runtime openvino runs on the CPU, but model.device is 'cuda'" in str(err.value)


def test_a_daemon_with_runtime_openvino_publishes_the_line_as_torch_classifies_it(tmp_path, mosquitto, mqtt_recorder,
                                                                                   line_model, synth_video):
    # given a subscriber and the daemon on the 300-frame line video, its model on openvino
    rec = mqtt_recorder("visiond/#")
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi)}
    # when the file has been read, the daemon ends on its own
    d = run_to_end(tmp_path, line_cfg(line_model, mosquitto, [cam], model={"runtime": "openvino"}), 180)
    wait_offline(rec, 10)
    preds = rec.json_payloads("/prediction")
    # then one message per frame, in order, and the labels match the line's ground truth
    assert [p["seq"] for p in preds] == list(range(1, len(synth_video.truth) + 1))
    right = sum(p["label"] == t for p, t in zip(preds, synth_video.truth))
    assert right / len(preds) >= 0.85
    # and the runtime that served is openvino, and says so; the export is cached for the next start
    detail = json.loads(rec.messages("visiond/testbox/status/detail")[-1].payload)
    assert detail["model"]["runtime"] == "openvino" and detail["model"]["device"] == "cpu"
    assert list((tmp_path / "spool" / "models").glob("*.onnx"))
    assert "serving it with torch" not in d.stderr
