"""The tests' MQTT subscriber: the harness's recorder, under the name the tests use."""

from __future__ import annotations

from visiond.harness.recorder import Recorder as MqttRecorder

__all__ = ["MqttRecorder"]
