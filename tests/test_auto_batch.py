"""`model.max_batch: auto`: the batch size timed at warm-up, and the daemon's batches kept within it."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np

from daemon_helpers import line_cfg, run_to_end, wait_offline
from visiond.models.runtime import measure_best_batch, warm_up
from visiond.preprocess import PreprocessSpec


class TimedModel:
    """A classifier whose call costs `cost(n)` seconds for a batch of n (slept, so the timing is the model's)."""

    runtime, name, version, arch, device = "torch", "timed", "v1", "smallcnn", "cpu"
    classes = ("good", "bad")
    spec = PreprocessSpec.for_color(8)

    def __init__(self, cost):
        self.cost, self.calls = cost, Counter()
        self.warmed: list[tuple[int, tuple]] = []

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.calls[len(pixels)] += 1
        time.sleep(self.cost(len(pixels)))
        return np.full((len(pixels), 2), 0.5, np.float32)

    def predict_images(self, images):
        return self.predict(np.zeros((len(images), 8, 8, 3), np.uint8))

    def warmup(self, max_batch: int = 1, frame_shapes=()) -> None:
        self.warmed.append((max_batch, tuple(frame_shapes)))


def test_the_fastest_batch_is_chosen_and_larger_ones_past_the_peak_are_not_tried():
    # given a model that gains from batching up to 8 images, then falls out of cache (3x the cost an image)
    model = TimedModel(lambda n: 0.004 + 0.001 * n if n <= 8 else 0.003 * n)
    # when the batch is timed up to 32
    batch, fps = measure_best_batch(model, 32, time_each_s=0.05)
    # then 8 is chosen: 1000 images/s against 667 at 16
    assert batch == 8, fps
    assert fps[8] > fps[4] > fps[1] and fps[16] < 0.8 * fps[8]
    # and 32 was never run: past the peak, larger batches only get slower
    assert 32 not in fps and model.calls[32] == 0


def test_a_smaller_batch_as_fast_as_the_fastest_is_kept_for_its_latency():
    # given a model whose throughput stops rising at 4 (4 and 8 images a call are equally fast an image)
    model = TimedModel(lambda n: 0.010 if n <= 4 else 0.0025 * n)
    # when warmed with max_batch auto
    batch = warm_up(model, "auto", [(480, 640, 3)])
    # then 4 is kept (the same throughput as 8, half the wait), and the model is warmed for it and the frames
    assert batch == 4
    assert model.warmed == [(4, ((480, 640, 3),))]
    # and a number in the config is used as it is, untimed
    fixed = TimedModel(lambda n: 0.0)
    assert warm_up(fixed, 12) == 12 and fixed.warmed == [(12, ())] and set(fixed.calls) == set()


def test_a_remote_model_server_is_not_timed_from_here():
    model = TimedModel(lambda n: 0.0)
    model.runtime = "remote"
    assert warm_up(model, "auto") == 16 and not model.calls


def test_the_daemon_serves_at_the_timed_batch_and_says_which(tmp_path, mosquitto, mqtt_recorder, line_model,
                                                             synth_video):
    # given the daemon on a 300-frame video read as fast as it decodes, with model.max_batch auto
    rec = mqtt_recorder("visiond/#")
    jsonl = tmp_path / "verdicts.jsonl"
    cam = {"name": "line1", "source": str(synth_video.path), "roi": list(synth_video.roi)}
    d = run_to_end(tmp_path, line_cfg(line_model, mosquitto, [cam], model={"max_batch": "auto"},
                                      jsonl={"path": str(jsonl)}))
    wait_offline(rec, 10)
    # then status/detail shows the batch it chose, a power of two up to 32 on this CPU, and the log says why
    detail = json.loads(rec.messages("visiond/testbox/status/detail")[-1].payload)
    chosen = detail["max_batch"]
    assert chosen in (1, 2, 4, 8, 16, 32), detail
    assert f"max_batch auto -> {chosen} (" in d.stderr and "images/s by batch size" in d.stderr
    # and every frame got its verdict, in batches of at most that many frames
    rows = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    assert len(rows) == 300
    sizes = Counter(r["batch"] for r in rows)
    assert max(sizes.values()) <= chosen, sizes.most_common(3)
