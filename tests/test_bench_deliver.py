"""`visiond bench`'s deliver-only stage and the limit it feeds (issue 13): delivery is a stage with its own cost."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from visiond.serve.bench import BenchOptions, bench_deliver, limit_of


def _stage(fps: float, cpu_ms: float) -> dict:
    return {"fps": fps, "cpu_s_per_frame": cpu_ms / 1e3}


def test_the_limit_is_the_slowest_stage_or_the_cores_over_the_cpu_of_all_four_and_says_which_binds():
    decode, prep = _stage(900, 1.0), _stage(15000, 0.05)
    model = {1: _stage(300, 3.0), 8: _stage(1000, 1.2)}
    # given a delivery slower than every other stage
    limit = limit_of(decode, prep, model, _stage(500, 0.4), cores=8)
    # then delivery binds, and the model counts at its best batch
    assert limit["binds"] == "deliver" and limit["fps"] == 500
    assert limit["terms"]["model@8"] == 1000 and "deliver" in limit["formula"]
    # given two cores, the CPU the four stages need per frame binds: 2 / (1.0 + 0.05 + 1.2 + 0.4) ms
    limit = limit_of(decode, prep, model, _stage(5000, 0.4), cores=2)
    assert limit["binds"] == "cpu"
    assert limit["fps"] == pytest.approx(2 / 2.65e-3)
    assert limit["cpu_s_per_frame"]["deliver"] == pytest.approx(0.4e-3)


def test_deliver_only_publishes_every_verdict_once_in_seq_order_and_counts_the_cpu_of_all_three(mosquitto):
    # when the stage runs on the private broker
    frames = 400
    r = bench_deliver(BenchOptions(max_batch=16), ["ok", "scratch", "spot"], mosquitto.host, mosquitto.port,
                      mosquitto.proc.pid, frames)
    # then every verdict arrived, and its rate and CPU were measured where each is spent
    assert r["messages"] == frames and r["fps"] > 0 and r["batch"] == 16
    parts = r["cpu_s_per_frame_parts"]
    assert parts["visiond"] > 0 and parts["subscriber"] > 0 and parts["broker"] is not None
    assert r["cpu_s_per_frame"] == pytest.approx(sum(parts.values()))


def test_deliver_only_messages_are_the_daemons_own_predictions(mosquitto, mqtt_recorder):
    # given a plant subscriber beside the bench's
    recorder = mqtt_recorder("visiond/bench/+/prediction")
    # when the stage runs
    # (400 messages: with fewer, the subscriber can take them all between two polls, leaving no window to measure)
    r = bench_deliver(BenchOptions(max_batch=8), ["ok", "scratch"], mosquitto.host, mosquitto.port, None, 400)
    # then what it published is what the daemon publishes: valid predictions, gapless seq
    recorder.wait_for(lambda ms: len(ms) == 400)
    docs = recorder.json_payloads("/prediction")
    schema = json.loads(resources.files("visiond").joinpath("schemas", "prediction.schema.json").read_text())
    check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for doc in docs:
        check.validate(doc)
    assert [d["seq"] for d in docs] == list(range(1, 401))
    # and with a broker of its own (--broker) the bench cannot see its CPU: said, not guessed
    assert r["cpu_s_per_frame_parts"]["broker"] is None and r["cpu_s_per_frame_parts"]["subscriber"] > 0
