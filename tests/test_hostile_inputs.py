"""Bad input never crashes visiond: every hostile input gets one clear line, and a running daemon keeps running.

Tables, by where the input enters:
- configs, through `load_config` in this process (and a few through the real CLI, for the exit code);
- checkpoints, through the path the daemon serves them by (load, check, build);
- frames and images, through one daemon's image-folder camera (and `visiond predict` on the same files);
- MQTT commands, sent by a plant system to that same daemon's `cmd/<verb>` topics; their error
  comes back in the retained `status/detail` as `last_error`.
One daemon serves all the frame and command cases, so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
import torch
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.torch import load_file, save_file

from conftest import Mosquitto, free_port, require_binary
from daemon_helpers import Daemon, metric_value
from mqtt_helpers import MqttRecorder
from visiond.config import ConfigError, check_files, load_config
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint, read_header, save_checkpoint
from visiond.models.runtime import TorchClassifier

SECRET = "hunter2-must-not-leak"


def _one_clear_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text and len(text) < 400, text


# =========================================================================== configs


def _base(tmp: Path) -> dict:
    ckpt = tmp / "model.ckpt"
    ckpt.write_bytes(b"x")  # check_files only needs it to exist
    return {"cameras": [{"name": "line1", "source": "line.mp4"}], "model": {"checkpoint": str(ckpt)}}


def _yaml(mutate):
    def write(tmp: Path) -> Path:
        cfg = _base(tmp)
        mutate(cfg)
        path = tmp / "visiond.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


def _text(text: str | bytes):
    """A config file from a template: {base} is a valid config, {ckpt} its checkpoint."""
    def write(tmp: Path) -> Path:
        path = tmp / "visiond.yaml"
        base = yaml.safe_dump(_base(tmp))
        if isinstance(text, str):
            data = text.replace("{base}", base).replace("{ckpt}", str(tmp / "model.ckpt")).encode()
        else:
            data = text
        path.write_bytes(data)
        return path
    return write


_ONE_CAMERA = "model: {checkpoint: {ckpt}}\ncameras:\n- name: line1\n  source: line.mp4\n"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "visiond.yaml")
    return tmp / "visiond.yaml"


def _directory(tmp: Path) -> Path:
    (tmp / "visiond.yaml").mkdir()
    return tmp / "visiond.yaml"


_BOMB = "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + _BOMB + "{base}extra: *i\n"

CONFIGS = [
    # (id, writer, expected text in the error, text that must not appear)
    ("alias bomb (billion laughs)", _text(_BOMB), "an alias bomb", None),
    ("self-referencing alias", _text("{base}loop: &l [*l]\n"), "an alias bomb", None),
    ("nested 20000 deep", _text("{base}deep: " + "[" * 20000 + "]" * 20000 + "\n"), "nested too deeply", None),
    ("python object tag", _text("{base}x: !!python/object/apply:os.system ['touch {marker}']\n"), "invalid YAML",
     None),
    ("not UTF-8", _text(b"\xff\xfe\x00n\x00o\x00d\x00e"), "cannot read config (UnicodeDecodeError", None),
    ("NUL byte", _text("{base}node: a\x00b\n"), "invalid YAML", None),
    ("a directory", _directory, "Is a directory", None),
    ("a FIFO (would block forever)", _fifo, "not a regular file", None),
    ("a 2 MB file", _text("{base}# " + "x" * 2_000_000 + "\n"), "expected a config file of at most", None),
    ("empty file", _text(""), "expected a YAML mapping at the top level", None),
    ("top level is a list", _text("- node: a\n"), "expected a YAML mapping at the top level, got list", None),
    ("cameras is a mapping", _yaml(lambda c: c.update(cameras={"name": "line1"})), "cameras: got", None),
    ("mqtt is a number", _yaml(lambda c: c.update(mqtt=5)), "mqtt: got 5", None),
    ("fps is infinite", _text(_ONE_CAMERA + "  fps: .inf\n"), "cameras[0].fps: got inf", None),
    ("threshold is NaN", _text("{base}decide: {threshold: .nan}\n"), "decide.threshold: got nan", None),
    ("read timeout is NaN", _text(_ONE_CAMERA + "  read_timeout_s: .nan\n"), "cameras[0].read_timeout_s: got nan",
     None),
    ("spool bound 10**30", _yaml(lambda c: c.update(spool={"max_messages": 10 ** 30})), "spool.max_messages: got 1000",
     None),
    ("500 kB node name", _yaml(lambda c: c.update(node="n" * 500_000)), "node: got 'nnnn", None),
    ("misspelt password key", _yaml(lambda c: c.update(mqtt={"pasword": SECRET})), "mqtt.pasword: unknown key",
     SECRET),
    ("password in a bad camera URL", _yaml(lambda c: c["cameras"][0].update(source=f"ftp://op:{SECRET}@cam/x")),
     "cameras[0].source: got ftp://op:***@cam/x", SECRET),
    ("camera name with a slash", _yaml(lambda c: c["cameras"][0].update(name="line/1")), "cameras[0].name", None),
    ("camera name with a wildcard", _yaml(lambda c: c["cameras"][0].update(name="line#")), "cameras[0].name", None),
    ("topic prefix with a wildcard", _yaml(lambda c: c.update(mqtt={"topic_prefix": "plant/#"})),
     "mqtt.topic_prefix", None),
    ("TLS CA file missing", _yaml(lambda c: c.update(mqtt={"tls": {"ca": "/nonexistent/ca.pem"}})),
     "mqtt.tls.ca: got '/nonexistent/ca.pem', expected a readable file", None),
]


@pytest.mark.parametrize("writer, expected, forbidden", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_hostile_config_gets_one_clear_line(tmp_path, writer, expected, forbidden):
    # given a hostile config file
    marker = tmp_path / "pwned"
    path = writer(tmp_path)
    if path.is_file() and b"{marker}" in path.read_bytes():
        path.write_bytes(path.read_bytes().replace(b"{marker}", str(marker).encode()))
    # when it is loaded and checked (what `visiond run` and `visiond config check` do first)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        cfg = load_config(path, env={})
        problems = check_files(cfg)
        if problems:
            raise ConfigError(problems)
    # then it is refused quickly, with one line per problem naming what is wrong, and nothing ran
    assert time.monotonic() - t0 < 10
    lines = err.value.lines
    assert any(expected in line for line in lines), lines
    for line in lines:
        _one_clear_line(line)
        assert forbidden is None or forbidden not in line
    assert not marker.exists()


def _visiond(*args, env=None, timeout=120, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "visiond", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout, cwd="/")


def test_the_cli_turns_a_bomb_a_fifo_and_an_unreadable_file_into_exit_2(tmp_path):
    # given an alias bomb, a FIFO and a file its reader may not read (tests run as root: drop the
    # capabilities that let root read anything, as the service's own user would be)
    bomb = _text(_BOMB)(tmp_path)
    (tmp_path / "fifo").mkdir()
    fifo = _fifo(tmp_path / "fifo")
    (tmp_path / "locked").mkdir()
    locked = _yaml(lambda c: None)(tmp_path / "locked")
    locked.chmod(0)
    setpriv = require_binary("setpriv", "util-linux")
    no_dac = (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all")
    for args, prefix, expected in [(("config", "check", str(bomb)), (), "an alias bomb"),
                                   (("config", "check", str(fifo)), (), "not a regular file"),
                                   (("config", "check", str(locked)), no_dac, "cannot read config (PermissionError"),
                                   (("run", "--config", str(locked)), no_dac, "cannot read config (PermissionError")]:
        # when visiond is pointed at it
        res = _visiond(*args, prefix=prefix, timeout=60)
        # then it exits 2 within seconds, saying why in one line, without a traceback
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert res.stderr.startswith("visiond: error: ") and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert expected in res.stderr, res.stderr[-2000:]


# =========================================================================== checkpoints


def _from(line_model: Path, tmp: Path, name: str = "hostile.ckpt", *, fields=None, tensors=None, raw: bytes = None,
          **save) -> Path:
    """A variant of the trained checkpoint: raw bytes, edited metadata (no re-hash), or re-saved (valid hash)."""
    path = tmp / name
    if raw is not None:
        path.write_bytes(raw)
        return path
    good = load_checkpoint(line_model)
    if save:
        kw = dict(arch=good.arch, classes=list(good.classes), spec=good.spec, state_dict=good.state_dict,
                  arch_args=good.arch_args)
        kw.update(save)
        save_checkpoint(path, **kw)
        return path
    meta = read_header(line_model)
    if fields:
        fields(meta)
    save_file(tensors if tensors is not None else load_file(str(line_model)), str(path),
              metadata={"visiond": json.dumps(meta)})
    return path


def _pickle(tmp: Path, marker: Path, zip_format: bool) -> bytes:
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp / "pickle.bin"
    if zip_format:
        torch.save({"state_dict": Boom()}, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps({"weights": Boom()}, protocol=2))
    return path.read_bytes()


def _nan_weights(good):
    sd = {k: v.clone() for k, v in good.state_dict.items()}
    head_bias = [k for k in sd if k.startswith("classifier.") and k.endswith(".bias")][-1]  # smallcnn v1 or v2
    sd[head_bias][0] = float("nan")
    return sd


CHECKPOINTS = [
    # (id, builder(line_model, tmp, marker) -> path, expected text)
    ("empty file", lambda m, t, x: _from(m, t, raw=b""), "file is empty"),
    ("truncated to half", lambda m, t, x: _from(m, t, raw=m.read_bytes()[: m.stat().st_size // 2]), "truncated"),
    ("random bytes", lambda m, t, x: _from(m, t, raw=random.Random(7).randbytes(4096)), "not a safetensors file"),
    ("header length of 1 TB", lambda m, t, x: _from(m, t, raw=struct.pack("<Q", 1 << 40) + b"{}" + bytes(64)),
     "not a safetensors file"),
    ("a directory", lambda m, t, x: (t / "dir.ckpt").mkdir() or t / "dir.ckpt", "is a directory"),
    ("torch.save pickle that runs code", lambda m, t, x: _from(m, t, raw=_pickle(t, x, True)),
     "pickles are never loaded"),
    ("raw pickle that runs code", lambda m, t, x: _from(m, t, raw=_pickle(t, x, False)), "pickles are never loaded"),
    ("safetensors without visiond metadata", lambda m, t, x: save_file({"w": torch.zeros(2)}, str(t / "p.ckpt"))
     or t / "p.ckpt", "without visiond metadata"),
    ("metadata is a JSON list", lambda m, t, x: save_file({"w": torch.zeros(2)}, str(t / "l.ckpt"),
                                                           metadata={"visiond": "[1, 2]"}) or t / "l.ckpt",
     "without visiond metadata"),
    ("unknown architecture", lambda m, t, x: _from(m, t, fields=lambda f: f.update(arch="resnet999")),
     "unknown architecture 'resnet999'"),
    ("class list longer than the weights", lambda m, t, x: _from(
        m, t, classes=list(load_checkpoint(m).classes) + ["extra"]), "weights do not fit architecture 'smallcnn' with 5"),
    ("a million classes", lambda m, t, x: _from(m, t, fields=lambda f: f.update(classes=[f"c{i}" for i in range(10 ** 6)])),
     "expected at most 10000"),
    ("class name with a newline", lambda m, t, x: _from(m, t, fields=lambda f: f["classes"].__setitem__(0, "ok\nFAKE")),
     "printable names"),
    ("arguments that would allocate 16 TB", lambda m, t, x: _from(m, t, arch_args={"image_size": 10 ** 6}),
     "weights do not fit"),
    ("unknown architecture argument", lambda m, t, x: _from(m, t, arch_args={"depth": 1000}), "refuses arguments"),
    ("preprocess size 10**9", lambda m, t, x: _from(
        m, t, fields=lambda f: f["preprocess"].update(height=10 ** 9)), "preprocess size"),
    ("NaN weights", lambda m, t, x: _from(m, t, state_dict=_nan_weights(load_checkpoint(m))), "NaN or infinite"),
    ("one weight byte altered", lambda m, t, x: _from(m, t, raw=m.read_bytes()[:-1] + bytes([m.read_bytes()[-1] ^ 1])),
     "content hash mismatch"),
]


_CHECKPOINT_PARAMS = [pytest.param(build, expected, False, id=name) for name, build, expected in CHECKPOINTS] + [
    pytest.param(build, expected, True, id=f"{name} with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1")
    for name, build, expected in CHECKPOINTS if "pickle" in name]


@pytest.mark.parametrize("build, expected, force_unsafe", _CHECKPOINT_PARAMS)
def test_hostile_checkpoint_is_refused_in_one_line(tmp_path, line_model, monkeypatch, build, expected, force_unsafe):
    # given a hostile checkpoint (and, the second time, an environment that asks torch to unpickle anything)
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = build(line_model, tmp_path, marker)
    # when it is loaded the way the daemon serves a model
    with pytest.raises(UserError) as err:
        TorchClassifier(load_checkpoint(path), device="cpu", precision="fp32", threads=1)
    # then one clear line says what is wrong, and no code from the file ran
    assert expected in str(err.value), str(err.value)
    _one_clear_line(str(err.value))
    assert not marker.exists()


def test_transfer_weights_refuse_a_pickle_even_when_the_environment_allows_it(tmp_path, monkeypatch):
    from visiond.train.transfer import read_state_dict

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    (tmp_path / "w.pth").write_bytes(_pickle(tmp_path, marker, True))
    with pytest.raises(UserError, match="refused"):
        read_state_dict(tmp_path / "w.pth")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["pickle", "class count"])
def test_the_daemon_refuses_a_hostile_checkpoint_with_exit_2(tmp_path, line_model, case):
    # given a config serving a hostile checkpoint, and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment
    marker = tmp_path / "pwned"
    if case == "pickle":
        ckpt, expected = _from(line_model, tmp_path, raw=_pickle(tmp_path, marker, True)), "pickles are never loaded"
    else:
        ckpt = _from(line_model, tmp_path, classes=list(load_checkpoint(line_model).classes) + ["extra"])
        expected = "weights do not fit"
    cfg = {"cameras": [{"name": "a", "source": str(tmp_path)}], "model": {"checkpoint": str(ckpt)},
           "spool": {"dir": str(tmp_path / "spool")}, "metrics": {"enabled": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    # when visiond run starts on it
    res = _visiond("run", "--config", str(tmp_path / "c.yaml"), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    # then it exits 2 with one line and no traceback, and the pickle never ran
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("visiond: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not marker.exists()


# =========================================================================== frames and images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A real 20000x20000 grey PNG (400 MB of pixels, ~400 kB of file), compressed in slices."""
    comp = zlib.compressobj(9)
    rows = (b"\0" * (side + 1)) * 500
    body = b"".join(comp.compress(rows) for _ in range(side // 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) +
                     _png_chunk(b"IEND", b""))


def _header_only_png(path: Path) -> None:
    """A PNG header claiming 100000x100000 pixels and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def _cmyk_jpeg(path: Path) -> None:
    from PIL import Image

    Image.new("CMYK", (96, 64), (10, 120, 30, 40)).save(path)


_RNG = np.random.default_rng(5)
_PICTURE = (_RNG.random((120, 160, 3)) * 255).astype(np.uint8)

FRAMES = [
    # (file name, writer(path), None = classified, or (drop reason, why in the log line))
    ("a01_ordinary.png", lambda p: cv2.imwrite(str(p), _PICTURE), None),
    ("a02_zero_bytes.jpg", lambda p: p.write_bytes(b""), ("decode_error", "empty file")),
    ("a03_truncated.jpg", lambda p: p.write_bytes(_jpeg(_PICTURE)[:2000]),
     ("decode_error", "truncated JPEG (no end-of-image marker)")),
    ("a04_one_pixel.png", lambda p: cv2.imwrite(str(p), _PICTURE[:1, :1]), None),
    ("a05_sixteen_bit.png", lambda p: cv2.imwrite(str(p), _PICTURE.astype(np.uint16) * 257), None),
    ("a06_sixteen_bit_grey.tiff", lambda p: cv2.imwrite(str(p), _PICTURE[:, :, 0].astype(np.uint16) * 257), None),
    ("a07_cmyk.jpg", _cmyk_jpeg, None),
    ("a08_rgba.png", lambda p: cv2.imwrite(str(p), np.dstack([_PICTURE, _PICTURE[:, :, :1]])), None),
    ("a09_strip_1x20000.png", lambda p: cv2.imwrite(str(p), np.zeros((1, 20000, 3), np.uint8)), None),
    ("a10_20000x20000.png", _bomb_png, ("too_large", "400000000 pixels, over the limit of 50000000")),
    ("a11_header_claims_10G_pixels.png", _header_only_png,
     ("too_large", "10000000000 pixels, over the limit of 50000000")),
    ("a12_random_bytes.png", lambda p: p.write_bytes(_RNG.bytes(5000)), ("decode_error", "not a decodable image")),
    ("a13_text_named_jpg.jpg", lambda p: p.write_text("definitely a picture"),
     ("decode_error", "not a decodable image")),
]

VIDEOS = [  # (camera, file bytes, the reason its status gives)
    ("zerovideo", b"", "cannot open"),
    ("junkvideo", _RNG.bytes(20000), "cannot open"),
]


class HostileRig:
    """One daemon with the hostile image folder, hostile video files, a dead camera (it keeps the daemon
    running after the files end) and a recorder on everything it publishes."""

    def __init__(self, tmp: Path, line_model: Path):
        self.tmp = tmp
        self.folder = tmp / "images"
        self.folder.mkdir()
        for name, write, _ in FRAMES:
            write(self.folder / name)
        cams = [{"name": "images", "source": str(self.folder)},
                {"name": "dead", "source": f"rtsp://127.0.0.1:{free_port()}/none", "open_timeout_s": 1,
                 "read_timeout_s": 1}]
        for cam, data, _ in VIDEOS:
            (tmp / f"{cam}.mp4").write_bytes(data)
            cams.append({"name": cam, "source": str(tmp / f"{cam}.mp4")})
        self.model = tmp / "serving" / "model.ckpt"
        self.model.parent.mkdir()
        shutil.copy(line_model, self.model)
        self.broker = Mosquitto(require_binary("mosquitto", "mosquitto"), tmp)
        self.broker.start()
        self.recorder = self.daemon = None
        try:
            self.recorder = MqttRecorder(self.broker.host, self.broker.port, "visiond/#").start()
            cfg = {"cameras": cams, "model": {"checkpoint": str(self.model), "max_batch": 4},
                   "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive_s": 5}}
            self.daemon = Daemon(tmp, cfg)
            self.daemon.wait_http()
            self.recorder.wait_for(lambda ms: any(m.topic == "visiond/testbox/images/status"
                                                  and json.loads(m.payload)["reason"] == "end of input" for m in ms), 90)
        except BaseException:
            self.close()
            raise

    def metrics(self) -> str:
        return self.daemon.http("/metrics")[1].decode()

    def command(self, verb: str, payload: bytes) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        try:
            client.publish(f"visiond/testbox/cmd/{verb}", payload, qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
        if self.recorder is not None:
            self.recorder.stop()
        self.broker.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory, line_model):
    rig = HostileRig(tmp_path_factory.mktemp("hostile"), line_model)
    yield rig
    rig.close()


@pytest.mark.parametrize("name, outcome", [(f[0], f[2]) for f in FRAMES], ids=[f[0] for f in FRAMES])
def test_hostile_image_in_a_folder_camera(rig, name, outcome):
    # given the folder camera has played every file, then: a readable image was classified without a word,
    # and an unusable one was skipped with one line naming the file and why (never decoded if too large)
    lines = [ln for ln in rig.daemon.stderr.splitlines() if f"skipping image {rig.folder / name}" in ln]
    if outcome is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].endswith(f": {outcome[1]}"), lines
    assert rig.daemon.proc.poll() is None


def test_skipped_images_are_counted_by_reason_and_the_rest_classified(rig):
    expected = {"decode_error": 0, "too_large": 0}
    for _, _, outcome in FRAMES:
        if outcome:
            expected[outcome[0]] += 1
    classified = sum(1 for f in FRAMES if f[2] is None)
    # (the folder's `end of input` comes from the capture thread: the last frames may still be in inference;
    # a published prediction has been counted)
    rig.recorder.wait_for(lambda ms: sum(m.topic.endswith("/images/prediction") for m in ms) == classified, 30)
    text = rig.metrics()
    for reason, n in expected.items():
        assert metric_value(text, "visiond_frames_dropped_total", camera="images", reason=reason) == n
    assert metric_value(text, "visiond_predictions_total", camera="images") == classified


@pytest.mark.parametrize("camera, data, reason", VIDEOS, ids=[v[0] for v in VIDEOS])
def test_hostile_video_file_camera_goes_offline_with_a_reason(rig, camera, data, reason):
    # (the rig waited for the folder camera's end of input, which says nothing of this camera's status)
    topic = f"visiond/testbox/{camera}/status"
    rig.recorder.wait_for(lambda _ms: any(reason in json.loads(m.payload)["reason"]
                                          for m in rig.recorder.messages(topic)), 10, f"{camera}/status {reason!r}")
    statuses = [json.loads(m.payload) for m in rig.recorder.messages(topic)]
    assert statuses and statuses[-1]["state"] == "offline" and reason in statuses[-1]["reason"], statuses
    assert f"camera {camera} offline: {reason}" in rig.daemon.stderr
    assert rig.daemon.proc.poll() is None


def test_predict_on_the_same_hostile_files(rig, line_model):
    # when `visiond predict` is run on the folder
    res = _visiond("predict", str(line_model), str(rig.folder), "--json", "--device", "cpu", timeout=180)
    # then every file gets a row: a label, or an error saying why; nothing crashes or decodes the bomb
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    rows = {Path(r["path"]).name: r for r in map(json.loads, res.stdout.splitlines())}
    for name, _, outcome in FRAMES:
        if outcome is None:
            assert rows[name].get("label"), rows[name]
        else:  # the same reasons as the camera's, except that OpenCV's silent refusal reads "unreadable image"
            expected = {"not a decodable image": "unreadable image"}.get(outcome[1], outcome[1])
            assert rows[name].get("error") == expected, rows[name]


# =========================================================================== MQTT commands


COMMANDS = [
    # (id, verb, payload, expected text in last_error and in the log)
    ("garbage JSON", "reload", b"{reload: now", "cmd/reload: payload is not JSON (JSONDecodeError)"),
    ("binary junk", "reload", bytes(range(256)) * 4, "cmd/reload: payload is not JSON"),
    ("a JSON list", "reload", b"[1, 2, 3]", "cmd/reload: payload is list; expected a JSON object"),
    ("a JSON string", "reload", b'"please"', "cmd/reload: payload is str; expected a JSON object"),
    ("a JSON number", "reload", b"1e999", "cmd/reload: payload is float; expected a JSON object"),
    ("JSON null", "reload", b"null", "cmd/reload: payload is NoneType; expected a JSON object"),
    ("nested 50000 deep", "reload", b"[" * 50000, "cmd/reload: payload is JSON nested too deeply"),
    ("oversized payload", "reload", b" " * 100_000, "payload of 100000 bytes exceeds 65536"),
    ("unknown verb", "format-disk", b"{}", "cmd/format-disk: unknown command; expected one of"),
    ("200-character verb", "v" * 200, b"{}", "cmd/" + "v" * 64 + ": unknown command"),
    ("wrong type for a path", "shadow", b'{"checkpoint": 123}', "123"),
    ("a path outside the model directory", "shadow", b'{"checkpoint": "/etc/passwd"}', "cmd/shadow: checkpoint must be in"),
    ("path traversal", "shadow", b'{"checkpoint": "../../../etc/shadow"}', "cmd/shadow: checkpoint must be in"),
    ("wrong types for capture", "capture", b'{"camera": 5, "count": "many"}', "cmd/capture:"),
]


@pytest.mark.parametrize("verb, payload, expected", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_hostile_command_gets_a_last_error_and_the_daemon_carries_on(rig, verb, payload, expected):
    # when a plant system sends the hostile command
    seen = len(rig.recorder.messages())
    rig.command(verb, payload)
    # then the retained status detail carries one clear last_error naming it
    def answered(ms):
        for m in ms[seen:]:
            if m.topic == "visiond/testbox/status/detail" and expected in (json.loads(m.payload).get("last_error") or ""):
                return True
        return False

    rig.recorder.wait_for(answered, 20)
    errors = [json.loads(m.payload)["last_error"] for m in rig.recorder.messages("visiond/testbox/status/detail")
              if expected in (json.loads(m.payload).get("last_error") or "")]
    _one_clear_line(errors[-1])
    # and the log says the same in one line, and the daemon is still connected and running
    assert any(expected in ln for ln in rig.daemon.stderr.splitlines())
    assert rig.daemon.proc.poll() is None
    assert metric_value(rig.metrics(), "visiond_mqtt_connected") == 1


def test_a_truncated_checkpoint_dropped_in_place_is_refused_and_the_old_model_serves_on(rig):
    # when the served checkpoint file is replaced by half of itself (a copy that was cut short)
    good = rig.model.read_bytes()
    seen = len(rig.recorder.messages())
    rig.model.write_bytes(good[: len(good) // 2])
    try:
        # then the reload it triggers is refused with one line, over MQTT and in the log
        rig.recorder.wait_for(lambda ms: any(m.topic == "visiond/testbox/status/detail" and "reload refused" in
                                             (json.loads(m.payload).get("last_error") or "") for m in ms[seen:]), 30)
        assert "reload refused, old model keeps serving" in rig.daemon.stderr
        assert metric_value(rig.metrics(), "visiond_model_reload_failures_total") >= 1
    finally:
        rig.model.write_bytes(good)
    assert rig.daemon.proc.poll() is None


def test_after_all_hostile_input_the_daemon_still_runs_and_stops_cleanly(rig):
    # then (after every case above) the daemon never logged a traceback, is still up, and stops with 0
    assert rig.daemon.proc.poll() is None
    assert "Traceback" not in rig.daemon.stderr, rig.daemon.stderr[-3000:]
    assert rig.daemon.stop() == 0, rig.daemon.stderr[-3000:]
