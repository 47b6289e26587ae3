"""The RTSP test server (and the broker fixture the daemon's tests rely on)."""

from __future__ import annotations

import signal
import subprocess
import time

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import RTSP_SERVER, SYSTEM_PYTHON, make_synth_video
from mqtt_helpers import MqttRecorder


@pytest.fixture
def tcp_transport(monkeypatch):
    """OpenCV's FFmpeg backend reads this when a capture opens."""
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")


def thumbnails(frames) -> np.ndarray:
    """Small float copies, to match received frames to file frames quickly."""
    return np.stack([cv2.resize(f, (80, 60), interpolation=cv2.INTER_AREA).astype(np.float32) for f in frames])


def read_frames(url: str, count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    assert capture.isOpened(), f"OpenCV could not open {url}"
    frames = []
    for _ in range(count):
        ok, frame = capture.read()
        assert ok, f"stream stopped after {len(frames)} frames"
        frames.append(frame)
    capture.release()
    return frames


def file_frames(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (result := capture.read())[0]:
        frames.append(result[1])
    return frames


def test_opencv_reads_the_stream_over_tcp(rtsp_server, synth_video, tcp_transport):
    # given the synthetic video served over RTSP
    # when OpenCV reads the stream over TCP
    frames = read_frames(rtsp_server.url, 15)
    # then it gets the file's frames, from the first one
    reference = file_frames(synth_video.path)[:15]
    assert frames[0].shape == (480, 640, 3)
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() < 2 for a, b in zip(frames, reference))


def test_the_stream_loops_past_the_end_of_the_file(rtsp_server_factory, tmp_path, tcp_transport):
    # given a one-second video served over RTSP
    clip = make_synth_video(tmp_path, frames=30, seed=11)
    server = rtsp_server_factory(clip.path)
    reference = thumbnails(file_frames(clip.path))
    # when a client reads more than three loops' worth of frames
    received = thumbnails(read_frames(server.url, 100))
    # then every frame is a file frame, in order, wrapping from the last to the first
    distances = np.abs(received[:, None] - reference[None]).mean(axis=(2, 3, 4))
    indices = distances.argmin(axis=1)
    assert distances.min(axis=1).max() < 2
    assert all(b == (a + 1) % 30 for a, b in zip(indices, indices[1:])), indices.tolist()
    assert int(np.sum(np.diff(indices) < 0)) >= 3


def test_the_server_exits_cleanly_on_sigterm(rtsp_server):
    rtsp_server.proc.send_signal(signal.SIGTERM)
    assert rtsp_server.proc.wait(timeout=10) == 0


def test_the_server_refuses_a_file_without_h264(tmp_path):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video" * 100)
    result = subprocess.run([SYSTEM_PYTHON, str(RTSP_SERVER), "--port", "0", "--video", str(bogus)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "cannot read H.264" in result.stderr


def publish(host: str, port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_the_private_broker_carries_a_round_trip(mosquitto):
    # given a private broker and a recorder subscribed to everything under visiond/
    assert mosquitto.port != 1883
    with MqttRecorder(mosquitto.host, mosquitto.port, "visiond/#") as recorder:
        # when a retained status and a JSON prediction are published
        publish(mosquitto.host, mosquitto.port, "visiond/n1/status", b"online", retain=True)
        publish(mosquitto.host, mosquitto.port, "visiond/n1/cam/prediction", b'{"label": "ok"}')
        publish(mosquitto.host, mosquitto.port, "other/topic", b"ignored")
        # then the recorder has both, with payloads, flags and JSON decoded
        recorder.wait_for(lambda messages: len(messages) >= 2, timeout=5)
        assert recorder.json_payloads("/prediction") == [{"label": "ok"}]
        assert [m.topic for m in recorder.messages("visiond/+/+/prediction")] == ["visiond/n1/cam/prediction"]
    with MqttRecorder(mosquitto.host, mosquitto.port, "visiond/+/status") as late:
        late.wait_for(lambda messages: messages, timeout=5)
        assert late.messages()[0] == ("visiond/n1/status", b"online", True)


def test_the_broker_restarts_on_the_same_port_and_the_recorder_follows(mosquitto, mqtt_recorder):
    # given a recorder on a running broker
    recorder = mqtt_recorder("t/#")
    port = mosquitto.port
    # when the broker goes away and comes back
    mosquitto.stop()
    time.sleep(0.5)
    mosquitto.start()
    # then it listens on the same port and the recorder receives again after resubscribing
    assert mosquitto.port == port and mosquitto.proc.poll() is None
    deadline = time.monotonic() + 15
    while not recorder.messages("t/after") and time.monotonic() < deadline:
        publish(mosquitto.host, mosquitto.port, "t/after", b"1")
        time.sleep(0.3)
    assert recorder.messages("t/after")
