"""FFmpeg's and OpenCV's own stderr lines go through logging: JSON stays JSON, floods are coalesced."""

from __future__ import annotations

import json
import logging
import random
import time

from daemon_helpers import Daemon, line_cfg
from visiond.logs import parse_line


def test_native_lines_are_parsed_into_a_level_and_a_message_without_the_pointer():
    assert parse_line("[h264 @ 0x7f80f81b14c0] Invalid NAL unit size (-13 > 1475).") == (
        logging.WARNING, "ffmpeg h264: Invalid NAL unit size (-13 > 1475).")
    assert parse_line("[ WARN:0@1.234] global cap_ffmpeg_impl.hpp (1234) open timeout") == (
        logging.WARNING, "opencv: cap_ffmpeg_impl.hpp (1234) open timeout")
    assert parse_line("[ERROR:0@2.5] global foo.cpp boom")[0] == logging.ERROR
    assert parse_line("something else") == (logging.WARNING, "something else")


def test_a_corrupt_stream_in_json_mode_logs_json_only_and_its_flood_is_coalesced(tmp_path, mosquitto, mqtt_recorder,
                                                                                 line_model, synth_video):
    # given JSON logs, a looping video whose tail is garbage (FFmpeg complains on every pass),
    # and a camera whose RTSP server refuses connections
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(synth_video.path.read_bytes()[:30_000] + random.Random(5).randbytes(20_000))
    cams = [{"name": "glitchy", "source": str(corrupt), "loop": True, "fps": 0, "roi": list(synth_video.roi)},
            {"name": "gone", "source": "rtsp://127.0.0.1:9/line"}]
    rec = mqtt_recorder("visiond/+/glitchy/prediction")
    d = Daemon(tmp_path, line_cfg(line_model, mosquitto, cams, logging={"level": "info", "json": True}))
    try:
        # when it runs past one coalescing window (10 s)
        rec.wait_for(lambda ms: len(ms) >= 1, 60)
        time.sleep(12)
        assert d.stop() == 0, d.stderr[-2000:]
    finally:
        d.close()
    # then every line on stderr is one JSON object: no raw FFmpeg line broke the stream
    records = [json.loads(line) for line in d.stderr.splitlines() if line.strip()]
    native = [r for r in records if r["logger"] == "visiond.native"]
    # and FFmpeg's complaints are there, without the context pointer, as warnings
    assert any(r["msg"].startswith("ffmpeg h264: ") and r["level"] == "warning" for r in native), native[:5]
    assert any(r["msg"].startswith("ffmpeg tcp: Connection to tcp://127.0.0.1:9") for r in native), native[:5]
    assert not any(" @ 0x" in r["msg"] for r in native)
    # and the flood is a handful of records, with the repeats counted instead of printed
    repeated = [r for r in native if "more times in" in r["msg"]]
    counts = [int(r["msg"].rsplit("(repeated ", 1)[1].split()[0]) for r in repeated]
    assert counts and max(counts) >= 20, native
    assert len(native) < 40 < sum(counts), (len(native), counts)
    # and the glitchy camera's good frames were classified all along
    assert len(rec.messages()) > 10
