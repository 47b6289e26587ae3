"""A tiny RTSP server that plays one H.264 mp4 in a loop, for tests and demos.

Runs with the system python, which has GStreamer's RTSP server through python3-gi
(ffmpeg's ``-rtsp_flags listen`` does not serve clients here)::

    /usr/bin/python3 tools/rtsp_server.py --port 8554 --path /line --video line.mp4 [--bind 127.0.0.1]

``--port 0`` picks a free port. Once it serves, it prints ``READY rtsp://HOST:PORT/PATH``
on stdout; SIGTERM or SIGINT stop it. The file's H.264 access units are read once
(``filesrc ! qtdemux ! h264parse``) and replayed from memory through
``appsrc ! h264parse ! rtph264pay name=pay0 pt=96`` with timestamps that keep
increasing, so a client sees one endless stream instead of an EOS or a time jump
at the end of the file. Every client gets its own stream, starting at frame 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as exc:  # ValueError: the typelib is missing
    sys.stderr.write(
        f"rtsp_server: {exc}; run it with /usr/bin/python3 and install the Debian packages "
        "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad\n"
    )
    sys.exit(2)

_PARSE = (
    "filesrc name=src ! qtdemux ! h264parse config-interval=-1"
    " ! video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=sink sync=false"
)
_SERVE = "( appsrc name=src format=time ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )"


@dataclass(frozen=True)
class Clip:
    """The video's H.264 access units (Annex B, SPS/PPS before each IDR) and frame timing."""

    units: list[bytes]
    frame_ns: int
    caps: str


def load_clip(video: Path) -> Clip:
    """Demux the whole file into memory; the test clips are a few megabytes at most."""
    pipeline = Gst.parse_launch(_PARSE)
    pipeline.get_by_name("src").set_property("location", str(video))
    pipeline.set_state(Gst.State.PLAYING)
    try:
        units, caps = _pull_units(pipeline, video)
    finally:
        pipeline.set_state(Gst.State.NULL)
    found, num, den = caps.get_structure(0).get_fraction("framerate")
    num, den = (num, den) if found and num > 0 else (30, 1)
    caps_text = f"video/x-h264,stream-format=byte-stream,alignment=au,framerate={num}/{den}"
    return Clip(units, Gst.SECOND * den // num, caps_text)


def _pull_units(pipeline, video: Path, timeout_s: float = 60.0) -> tuple[list[bytes], Gst.Caps]:
    """Access units until EOS; a demux error (not H.264, not mp4) raises instead of hanging."""
    sink, bus = pipeline.get_by_name("sink"), pipeline.get_bus()
    units, caps = [], None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sample = sink.emit("try-pull-sample", Gst.SECOND // 10)
        if sample is not None:
            buffer = sample.get_buffer()
            units.append(buffer.extract_dup(0, buffer.get_size()))
            caps = caps or sample.get_caps()
        elif sink.get_property("eos"):
            if not units:
                raise RuntimeError(f"cannot read H.264 from {video}: no frames")
            return units, caps
        elif (error := bus.pop_filtered(Gst.MessageType.ERROR)) is not None:
            raise RuntimeError(f"cannot read H.264 from {video}: {error.parse_error()[0].message}")
    raise RuntimeError(f"cannot read H.264 from {video}: no end of stream after {timeout_s:.0f} s")


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    """Builds one appsrc pipeline per client and feeds it the clip over and over."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.set_launch(_SERVE)
        self.set_shared(False)
        self.connect("media-configure", self._on_media_configure)

    def _on_media_configure(self, _factory, media) -> None:
        appsrc = media.get_element().get_by_name_recurse_up("src")
        appsrc.set_property("caps", Gst.Caps.from_string(self.clip.caps))
        appsrc.connect("need-data", self._on_need_data, [0])

    def _on_need_data(self, appsrc, _length, counter: list[int]) -> None:
        """Push the next access unit; timestamps run on across loops so the stream never rewinds."""
        index = counter[0]
        counter[0] += 1
        buffer = Gst.Buffer.new_wrapped(self.clip.units[index % len(self.clip.units)])
        buffer.pts = buffer.dts = index * self.clip.frame_ns
        buffer.duration = self.clip.frame_ns
        appsrc.emit("push-buffer", buffer)


def _drop_dead_sessions(server) -> bool:
    """Reap sessions of clients that vanished without a TEARDOWN; True keeps the timer."""
    server.get_session_pool().cleanup()
    return True


def serve(video: Path, bind: str, port: int, path: str) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    clip = load_clip(video)
    server = GstRtspServer.RTSPServer()
    server.set_address(bind)
    server.set_service(str(port))
    server.get_mount_points().add_factory(path, LoopingFactory(clip))
    if server.attach(None) == 0:
        sys.stderr.write(f"rtsp_server: cannot listen on {bind}:{port}\n")
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # one shutdown path for both
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    GLib.timeout_add_seconds(2, _drop_dead_sessions, server)
    sys.stdout.write(f"READY rtsp://{bind}:{server.get_bound_port()}{path}\n")
    sys.stdout.flush()
    loop.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an H.264 mp4 over RTSP, looped forever.")
    parser.add_argument("--video", type=Path, required=True, help="H.264 mp4 to serve")
    parser.add_argument("--port", type=int, default=8554, help="TCP port; 0 picks a free one")
    parser.add_argument("--path", default="/line", help="mount path, e.g. /line")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    if not args.path.startswith("/"):
        parser.error("--path must start with '/'")
    if not args.video.is_file():
        parser.error(f"--video {args.video}: no such file")
    Gst.init(None)
    try:
        return serve(args.video, args.bind, args.port, args.path)
    except RuntimeError as exc:
        sys.stderr.write(f"rtsp_server: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
