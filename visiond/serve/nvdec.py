"""GPU video decoding (NVDEC through NVIDIA's PyNvVideoCodec) behind the source interface, OpenCV as the fall-back.

`cameras[].decode` picks the decoder of a video file or RTSP stream: `cpu` (OpenCV,
as always), `nvdec`, or `auto` (NVDEC where it can run, else OpenCV). A `NvdecCapture`
reads like a `cv2.VideoCapture` (isOpened / grab / retrieve / release), so `FrameSource`
drives it unchanged. Files are demuxed by PyNvVideoCodec itself, RTSP streams by PyAV
(over TCP, with the camera's timeouts; H.264/HEVC turned into Annex-B, which NVDEC reads).

Each decoded NV12 surface is converted to BGR on the GPU (BT.601 limited range, as
OpenCV's FFmpeg backend does, so a model sees the same pixels either way) and handed on
as a `DeviceFrame`: the model reads the GPU copy with no upload and resizes it there;
evidence crops, captures and the live page read the host copy (one download per frame,
a few hundred microseconds for 1080p, far less than decoding it on the CPU).

Where NVDEC cannot run (no CUDA GPU, PyNvVideoCodec or PyAV missing, a codec it does
not take, an open that fails) the camera is decoded by OpenCV instead: logged once, one
line, and the camera keeps that decoder until the daemon restarts.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from visiond.config import CameraConfig
from visiond.preprocess import DeviceFrame
from visiond.video import open_capture, source_kind

log = logging.getLogger(__name__)

# codec names as FFmpeg/PyAV spell them -> PyNvVideoCodec's cudaVideoCodec members
NVDEC_CODECS = {"h264": "H264", "hevc": "HEVC", "av1": "AV1", "vp9": "VP9"}
_ANNEXB_BSF = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}


class NvdecUnavailable(RuntimeError):
    """NVDEC cannot decode this source here; the message says why, in a few words."""


# --------------------------------------------------------------------------- deciding


def nvdec_unavailable(kind: str) -> str | None:
    """Why NVDEC cannot decode a source of this kind on this machine; None when it can try."""
    if kind not in ("file", "stream"):
        return f"NVDEC decodes video files and RTSP streams, this source is a {kind}"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return "PyNvVideoCodec is not installed (pip install 'visiond[gpu]')"
    if kind == "stream" and importlib.util.find_spec("av") is None:
        return "PyAV, which demuxes RTSP for NVDEC, is not installed (pip install 'visiond[gpu]')"
    return None


def make_opener(cfg: CameraConfig, cpu_opener: Callable[..., Any] = open_capture) -> Callable[..., Any]:
    """The camera's opener for `decode` auto/nvdec: NVDEC while it works, else `cpu_opener` from then on."""
    state = {"fallback": cfg.decode == "cpu"}
    lock = threading.Lock()

    def fall_back(why: str, expected: bool) -> None:
        with lock:
            if state["fallback"]:
                return
            state["fallback"] = True
        # asked for nvdec: a warning; auto: one info line (a folder or a V4L2 device: debug)
        level = logging.WARNING if cfg.decode == "nvdec" else logging.DEBUG if expected else logging.INFO
        log.log(level, "camera %s: decode %s: %s; decoding with OpenCV on the CPU", cfg.name, cfg.decode, why)

    def opener(source, camera: CameraConfig, on_decode_error=None):
        if not state["fallback"]:
            why = nvdec_unavailable(source_kind(source))
            expected = why is not None and why.startswith("NVDEC decodes")  # a folder or device: nothing to say
            if why is None:
                try:
                    return NvdecCapture(source, camera)
                except NvdecUnavailable as exc:
                    why = str(exc)
                except Exception as exc:  # noqa: BLE001 - a driver or library error: OpenCV still decodes it
                    why = f"NVDEC failed to open it ({exc.__class__.__name__}: {_first_line(exc)})"
            fall_back(why, expected)
        return cpu_opener(source, camera, on_decode_error)

    return opener


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


# --------------------------------------------------------------------------- pixels


def nv12_to_bgr(nv12: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """NV12 (Y rows, then interleaved UV rows at half resolution; uint8, any device) -> uint8 H x W x 3 BGR.

    BT.601 limited range with nearest chroma, the conversion OpenCV's own
    COLOR_YUV2BGR_NV12 and its FFmpeg backend use, so GPU- and CPU-decoded frames agree.
    """
    if nv12.dim() == 3:
        nv12 = nv12.squeeze(-1)
    ch, cw = (height + 1) // 2, (width + 1) // 2
    if nv12.shape[0] < height + ch or nv12.shape[1] < 2 * cw:
        raise ValueError(f"NV12 surface of shape {tuple(nv12.shape)} is too small for {width}x{height}")
    y = nv12[:height, :width].float() - 16.0
    uv = nv12[height:height + ch, :2 * cw].reshape(ch, cw, 2).float() - 128.0
    uv = uv.repeat_interleave(2, 0).repeat_interleave(2, 1)[:height, :width]
    u, v = uv[..., 0], uv[..., 1]
    y = y * 1.164
    bgr = torch.stack((y + 2.018 * u, y - 0.391 * u - 0.813 * v, y + 1.596 * v), dim=-1)
    return bgr.round_().clamp_(0, 255).to(torch.uint8)


def annexb_payloads(container, stream) -> Iterator[bytes]:
    """A PyAV stream's packets as NVDEC reads them: H.264/HEVC in Annex-B (start codes), others as they are."""
    name = stream.codec_context.name
    extradata = bytes(stream.codec_context.extradata or b"")
    annexb = extradata[:4] == b"\x00\x00\x00\x01" or extradata[:3] == b"\x00\x00\x01"
    bsf = None
    if name in _ANNEXB_BSF and extradata and not annexb:  # avcC/hvcC (MP4, some RTSP SDPs): convert
        from av.bitstream import BitStreamFilterContext

        bsf = BitStreamFilterContext(_ANNEXB_BSF[name], stream)
    prefix = extradata if annexb else b""  # parameter sets from the SDP go in front of each keyframe
    for packet in container.demux(stream):
        out = bsf.filter(packet if packet.size else None) if bsf is not None else [packet]
        for p in out:
            if not p.size:
                continue
            data = bytes(p)
            yield prefix + data if prefix and p.is_keyframe and not data.startswith(prefix) else data


# --------------------------------------------------------------------------- the capture


class NvdecCapture:
    """A video file or RTSP stream decoded by NVDEC, read like a cv2.VideoCapture; frames are `DeviceFrame`s."""

    def __init__(self, source, cfg: CameraConfig, device_index: int | None = None):
        import PyNvVideoCodec as nvc

        self._nvc = nvc
        idx = torch.cuda.current_device() if device_index is None else device_index
        self.device = torch.device("cuda", idx)
        self._container = None
        self._ready: deque[torch.Tensor] = deque()
        self._frame: torch.Tensor | None = None
        self._ended = False
        self._size: tuple[int, int] | None = None  # (height, width) when the demuxer tells
        kind = source_kind(source)
        if kind == "stream":
            import av

            options = {"rtsp_transport": "tcp"} if str(source).lower().startswith(("rtsp://", "rtsps://")) else {}
            self._container = av.open(str(source), options=options, timeout=(cfg.open_timeout_s, cfg.read_timeout_s))
            stream = self._container.streams.video[0]
            name = stream.codec_context.name
            if name not in NVDEC_CODECS:
                self.release()
                raise NvdecUnavailable(f"codec {name} is not decoded by NVDEC here (it takes {', '.join(NVDEC_CODECS)})")
            codec = getattr(nvc.cudaVideoCodec, NVDEC_CODECS[name])
            if stream.codec_context.height:
                self._size = (stream.codec_context.height, stream.codec_context.width)
            self._packets: Iterator = (self._packet_data(b) for b in annexb_payloads(self._container, stream))
        else:
            path = str(source)[len("file://"):] if str(source).startswith("file://") else str(source)
            if not Path(path).is_file():
                raise NvdecUnavailable(f"{path} is not a file")
            demuxer = nvc.CreateDemuxer(filename=path)
            codec = demuxer.GetNvCodecId()
            supported = {getattr(nvc.cudaVideoCodec, c) for c in NVDEC_CODECS.values()
                         if hasattr(nvc.cudaVideoCodec, c)}
            if codec not in supported:
                raise NvdecUnavailable(f"codec {codec} is not decoded by NVDEC here (it takes "
                                       f"{', '.join(NVDEC_CODECS)})")
            self._size = (int(demuxer.Height()), int(demuxer.Width()))
            self._demuxer = demuxer  # its packets point into it: keep it alive
            self._packets = iter(demuxer)
        with torch.cuda.device(self.device):
            self._decoder = nvc.CreateDecoder(gpuid=idx, codec=codec, cudacontext=0, cudastream=0,
                                              usedevicememory=True)
        if not self._fill():  # decode the first frame now: a stream NVDEC refuses falls back at open
            self.release()
            raise NvdecUnavailable("NVDEC decoded no frame from it")

    def _packet_data(self, payload: bytes):
        buf = np.frombuffer(payload, dtype=np.uint8)
        pd = self._nvc.PacketData()
        for ptr, size in (("bsl_data", "bsl"), ("data", "size")):  # the field names of PyNvVideoCodec releases
            if hasattr(pd, ptr):
                setattr(pd, ptr, int(buf.ctypes.data))
                setattr(pd, size, int(buf.size))
                return pd, buf  # buf keeps the bytes alive until Decode has read them
        raise NvdecUnavailable("this PyNvVideoCodec release takes packets in a form visiond does not know")

    def _decode(self, packet) -> None:
        keep = None
        if isinstance(packet, tuple):
            packet, keep = packet
        with torch.cuda.device(self.device):
            for surface in self._decoder.Decode(packet):
                nv12 = torch.from_dlpack(surface)
                if nv12.dtype != torch.uint8:
                    raise NvdecUnavailable(f"{str(nv12.dtype).removeprefix('torch.')} surfaces (10-bit video) are "
                                           "not converted here")
                h, w = self._size or (nv12.shape[0] * 2 // 3, nv12.shape[1])
                self._ready.append(nv12_to_bgr(nv12, h, w))  # a new tensor: NVDEC reuses its surfaces
        del keep

    def _fill(self) -> bool:
        while not self._ready:
            if self._ended:
                return False
            packet = next(self._packets, None)
            if packet is None:
                self._ended = True
                if self._container is not None:  # PyAV's packets: an empty one flushes the frames NVDEC holds
                    try:                          # (PyNvVideoCodec's own demuxer ends with one)
                        self._decode(self._packet_data(b""))
                    except NvdecUnavailable:
                        raise
                    except Exception:  # noqa: BLE001 - a release that flushes on its own
                        pass
                continue
            self._decode(packet)
        return True

    # --- the cv2.VideoCapture surface FrameSource reads ---

    def isOpened(self) -> bool:  # noqa: N802 - cv2's name
        return self._decoder is not None

    def grab(self) -> bool:
        try:
            if not self._fill():
                return False
        except Exception as exc:  # noqa: BLE001 - a broken stream ends like a failed read: reconnect or EOF
            log.warning("NVDEC decode failed: %s", _first_line(exc) or exc.__class__.__name__)
            return False
        self._frame = self._ready.popleft()
        return True

    def retrieve(self):
        t = self._frame
        if t is None:
            return False, None
        return True, DeviceFrame(t.cpu().numpy(), t)  # .cpu() waits for the conversion: the frame is complete

    def read(self):
        return self.retrieve() if self.grab() else (False, None)

    def release(self) -> None:
        self._decoder = None
        self._ready.clear()
        self._frame = None
        if self._container is not None:
            self._container.close()
            self._container = None
