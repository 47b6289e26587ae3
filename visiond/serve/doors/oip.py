"""The Open Inference Protocol v2 over HTTP (KServe v2, Triton's REST API) on the model in service.

MLOps tools and NVIDIA's `tritonclient` speak this protocol, so visiond answers it for its
default model (`{name}` is the checkpoint's name, the version its content hash). A request
carries one input: `images`, BYTES [N] of encoded PNG/JPEG files of any size (preprocessed
like `visiond predict` does), or `pixels`, UINT8 [N, H, W, C] in RGB already at the model's
size. The outputs are `probabilities` FP32 [N, classes] and `label` BYTES [N] (the top class);
the class names are in the model metadata (`parameters.classes`). The binary-data extension
(`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`/`binary_data_output`)
and the classification extension (`classification: k` on `probabilities`) are supported.

Every route that classifies goes through `ModelGate`: a bound on the web front's model
requests (503 with Retry-After beyond it), parsing and image decoding in a small thread pool,
and an `InferenceRequest` for the one inference thread that is awaited without blocking the
event loop, so nothing HTTP does can stall capture or inference. Images are checked by their
header before decoding: a decompression bomb is refused unread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import re
import time
import warnings
from typing import Any

import anyio
import cv2
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from visiond import __version__
from visiond.frames import Frame
from visiond.preprocess import PreprocessSpec, resize_uint8
from visiond.serve.serving import FULL
from visiond.serve.worker import InferenceRequest, RequestResult
from visiond.video import MAX_IMAGE_PIXELS

MAX_REQUEST_IMAGES = 256  # one request is one crop group in one model call: bounded like a batch
INFER_TIMEOUT_S = 30.0  # a model that does not answer in this time is stuck or gone (shutdown)
DECODE_THREADS = 2  # parsing and decoding for the web front; the cameras' decoders keep the other cores
INPUTS = ("images", "pixels")
OUTPUTS = ("probabilities", "label")
EXTENSIONS = ["binary_tensor_data", "classification"]


class HttpError(Exception):
    """A request refused with `status` and one line (`{"error": message}`, as the protocol's clients read it)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": str(self)}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- images


def image_bytes_problem(data: bytes) -> tuple[int, str] | None:
    """(HTTP status, why) for encoded image bytes that must not be decoded, else None; reads the header only."""
    from PIL import Image

    if not data:
        return 400, "empty image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # PIL's own limit is above ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "too many"
        return 413, f"image of {pixels} pixels is over the limit of {MAX_IMAGE_PIXELS}"
    except Exception:
        return 400, "not an image this daemon reads (expected PNG, JPEG, BMP, TIFF or WebP)"
    if width * height > MAX_IMAGE_PIXELS:
        return 413, f"{width}x{height} image ({width * height} pixels) is over the limit of {MAX_IMAGE_PIXELS}"
    if data[:2] == b"\xff\xd8" and not data[-1024:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return 400, "truncated JPEG (no end-of-image marker)"  # libjpeg would fill the rest with grey
    return None


def decode_image(data: bytes, flags: int = cv2.IMREAD_UNCHANGED, what: str = "image") -> np.ndarray:
    """Encoded bytes -> the decoded image (BGR, BGRA or grey, as OpenCV reads files); HttpError when refused."""
    problem = image_bytes_problem(data)
    if problem is not None:
        raise HttpError(problem[0], f"{what}: {problem[1]}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise HttpError(400, f"{what}: not a decodable image")
    return image


def model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image at the model's size, in the channel order of a camera frame (BGR or grey).

    Resized here, on the web front's threads, by the same `resize_uint8` as `visiond predict`: a
    large upload costs the inference thread nothing, and holds the memory of one decoded image only.
    The worker's own resize is then a no-op, and its BGR->RGB turns this back into the model's input.
    """
    try:
        rgb = resize_uint8(image, spec)
    except (ValueError, cv2.error) as exc:
        raise HttpError(400, f"unusable image ({str(exc).splitlines()[0][:120]})") from None
    return rgb if rgb.shape[2] == 1 else np.ascontiguousarray(rgb[:, :, ::-1])


# ---------------------------------------------------------------- the gate to the inference thread


def _settle(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)


class _LoopRequest(InferenceRequest):
    """An InferenceRequest that also wakes an awaiting coroutine on its event loop."""

    def __init__(self, camera: str | None, frames: list[Frame], loop: asyncio.AbstractEventLoop,
                 done: asyncio.Future):
        super().__init__(camera, frames)
        self._loop, self._future = loop, done

    def finish(self, result: RequestResult | None = None, error: str | None = None) -> None:
        super().finish(result, error)
        with contextlib.suppress(RuntimeError):  # the loop has closed: the web front stopped meanwhile
            self._loop.call_soon_threadsafe(_settle, self._future)


class ModelGate:
    """The web front's way to the one inference thread: bounded, and never blocking the event loop."""

    def __init__(self, hub, max_waiting: int, timeout_s: float = INFER_TIMEOUT_S):
        self._hub, self._max, self._timeout = hub, max_waiting, timeout_s
        self._in_flight = 0  # web requests between admission and answer; touched on the event loop only
        self._threads = anyio.CapacityLimiter(DECODE_THREADS)

    @contextlib.asynccontextmanager
    async def admit(self):
        """One model request in flight; 503 with Retry-After while `max_waiting` are (or the hub holds as many)."""
        if self._in_flight >= self._max or self._hub.pending_requests() >= self._max:
            raise HttpError(503, f"{max(self._in_flight, self._hub.pending_requests())} model requests wait "
                                 f"already (http.max_waiting {self._max}); retry shortly", {"Retry-After": "1"})
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def run(self, fn, *args):
        """CPU work of a request (parsing, decoding, resizing) on the web front's few threads."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)

    async def classify(self, camera: str | None, images: list[np.ndarray]) -> RequestResult:
        """Images through the inference thread, batched with live frames: `camera` None classifies each whole
        with the default model, a camera name classifies the camera's ROIs of each."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        now, mono = time.time(), time.monotonic()
        request = _LoopRequest(camera, [Frame("http", i, now, mono, img) for i, img in enumerate(images)], loop, done)
        self._hub.submit(request)
        try:
            await asyncio.wait_for(done, self._timeout)
        except TimeoutError:
            raise HttpError(504, f"the model did not answer within {self._timeout:g} s") from None
        if request.error is not None:
            raise HttpError(500, request.error)
        return request.result


# ---------------------------------------------------------------- the protocol's tensors


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail of a request (the binary-data extension)."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise HttpError(400, f"Inference-Header-Content-Length {header_length[:32]!r}: expected an integer") \
                from None
        if not 0 < n <= len(body):
            raise HttpError(400, f"Inference-Header-Content-Length {n}: expected 1..{len(body)} (the body's size)")
        head, tail = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"request header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "request header: expected a JSON object with `inputs`")
    return doc, tail


def _shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise HttpError(400, f"{name}: shape {str(shape)[:64]}: expected a list of integers")
    return shape


def _binary_part(tensor: dict, name: str, tail: memoryview, offset: int) -> tuple[bytes | None, int]:
    """This input's bytes from the tail (or None when its data is in the JSON) and the next offset."""
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpError(400, f"{name}: parameters: expected an object")
    size = params.get("binary_data_size")
    if size is None:
        return None, offset
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(tail):
        raise HttpError(400, f"{name}: binary_data_size {str(size)[:32]}: expected 0..{len(tail) - offset} "
                             "(the bytes after the JSON header)")
    return bytes(tail[offset:offset + size]), offset + size


def _bytes_elements(raw: bytes, n: int, name: str) -> list[bytes]:
    """A serialized BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise HttpError(400, f"{name}: binary data ends inside element {len(out)}'s 4-byte length")
        size = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if pos + size > len(raw):
            raise HttpError(400, f"{name}: element {len(out)} says {size} bytes, {len(raw) - pos} follow")
        out.append(raw[pos:pos + size])
        pos += size
    if len(out) != n:
        raise HttpError(400, f"{name}: shape [{n}] but the data holds {len(out)} elements")
    return out


def _count(n: int, name: str) -> None:
    if not 1 <= n <= MAX_REQUEST_IMAGES:
        raise HttpError(400, f"{name}: {n} images; expected 1..{MAX_REQUEST_IMAGES} per request")


def _images(tensor: dict, raw: bytes | None) -> list[bytes]:
    if tensor.get("datatype") != "BYTES":
        raise HttpError(400, f"images: datatype {str(tensor.get('datatype'))[:16]}: expected BYTES (encoded images)")
    shape = _shape(tensor, "images")
    if len(shape) != 1:
        raise HttpError(400, f"images: shape {shape}: expected [N]")
    _count(shape[0], "images")
    if raw is not None:
        return _bytes_elements(raw, shape[0], "images")
    data = tensor.get("data")
    if not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(d, str) for d in data):
        raise HttpError(400, f"images: data: expected {shape[0]} base64 strings (or the binary-data extension)")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, ValueError):
        raise HttpError(400, "images: data: an element is not base64") from None


def _pixels(tensor: dict, raw: bytes | None, spec: PreprocessSpec) -> np.ndarray:
    want = [spec.height, spec.width, spec.channels]
    if tensor.get("datatype") != "UINT8":
        raise HttpError(400, f"pixels: datatype {str(tensor.get('datatype'))[:16]}: expected UINT8")
    shape = _shape(tensor, "pixels")
    if len(shape) != 4 or shape[1:] != want:
        raise HttpError(400, f"pixels: shape {shape[:8]}: expected [N, {', '.join(map(str, want))}] "
                             "(the model's height, width and channels)")
    _count(shape[0], "pixels")
    size = int(np.prod(shape))
    if raw is not None:
        if len(raw) != size:
            raise HttpError(400, f"pixels: {len(raw)} bytes of binary data for shape {shape} ({size} bytes)")
        return np.frombuffer(raw, np.uint8).reshape(shape)
    try:
        arr = np.asarray(tensor.get("data"))
    except (ValueError, TypeError):
        raise HttpError(400, "pixels: data: expected a flat or nested list of integers 0..255") from None
    if arr.size != size or arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise HttpError(400, f"pixels: data: expected {size} integers 0..255 for shape {shape}")
    return arr.astype(np.uint8).reshape(shape)


def parse_infer(doc: dict, tail: bytes, spec: PreprocessSpec) -> list[np.ndarray]:
    """An infer request's one input as the frames the worker classifies (BGR or grey, at the model's size)."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HttpError(400, "inputs: expected exactly one input, `images` (BYTES [N]) or `pixels` (UINT8 "
                             "[N, H, W, C])")
    tensor = inputs[0]
    name = tensor.get("name")
    if name not in INPUTS:
        raise HttpError(400, f"input {str(name)[:64]!r}: expected `images` or `pixels`")
    raw, used = _binary_part(tensor, name, memoryview(tail), 0)
    if used != len(tail):
        raise HttpError(400, f"{len(tail) - used} bytes after the JSON header belong to no input")
    if name == "images":
        frames = []
        for i, data in enumerate(_images(tensor, raw)):
            frames.append(model_input(decode_image(data, what=f"images[{i}]"), spec))
        return frames
    pixels = _pixels(tensor, raw, spec)
    if pixels.shape[3] == 1:
        return list(pixels)
    return [np.ascontiguousarray(p[:, :, ::-1]) for p in pixels]  # RGB in, camera frames are BGR


def requested_outputs(doc: dict) -> list[tuple[str, bool, int]]:
    """(name, binary, classification count) per output to return, in the request's order."""
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpError(400, "parameters: expected an object")
    binary_default = params.get("binary_data_output", False) is True
    wanted = doc.get("outputs")
    if wanted is None:
        return [(name, binary_default, 0) for name in OUTPUTS]
    if not isinstance(wanted, list) or not wanted or not all(isinstance(o, dict) for o in wanted):
        raise HttpError(400, "outputs: expected a list of {name, parameters}")
    out = []
    for o in wanted:
        name, p = o.get("name"), o.get("parameters") or {}
        if name not in OUTPUTS:
            raise HttpError(400, f"output {str(name)[:64]!r}: expected `probabilities` or `label`")
        if not isinstance(p, dict):
            raise HttpError(400, f"output {name}: parameters: expected an object")
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise HttpError(400, f"output {name}: classification {str(k)[:16]}: expected a class count")
        if k and name != "probabilities":
            raise HttpError(400, "classification applies to `probabilities` only")
        out.append((name, p.get("binary_data", binary_default) is True, k))
    return out


def _serialize_bytes(items: list[str]) -> bytes:
    parts = []
    for s in items:
        b = s.encode()
        parts.append(len(b).to_bytes(4, "little") + b)
    return b"".join(parts)


def infer_response(doc: dict, model: tuple[str, str], probs: np.ndarray, classes: tuple[str, ...],
                   outputs: list[tuple[str, bool, int]]) -> Response:
    """The protocol's infer response: JSON, or JSON + binary outputs with Inference-Header-Content-Length."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    n = probs.shape[0]
    tensors, chunks = [], []
    for name, binary, k in outputs:
        if k:
            k = min(k, len(classes))
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            values = [f"{probs[i, j]:f}:{j}:{classes[j]}" for i in range(n) for j in order[i]]
            datatype, shape, data = "BYTES", [n, k], values
        elif name == "probabilities":
            datatype, shape, data = "FP32", [n, len(classes)], probs
        else:
            datatype, shape, data = "BYTES", [n], [classes[i] for i in probs.argmax(axis=1)]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            chunk = data.tobytes() if datatype == "FP32" else _serialize_bytes(data)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = data.ravel().tolist() if datatype == "FP32" else data
        tensors.append(tensor)
    head = {"model_name": model[0], "model_version": model[1], "outputs": tensors}
    if isinstance(doc.get("id"), str):
        head["id"] = doc["id"]
    if not chunks:
        return JSONResponse(head)
    header = json.dumps(head, separators=(",", ":")).encode()
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# ---------------------------------------------------------------- routes


class OipRoutes:
    """The protocol's handlers over one `WebContext` and the web front's `ModelGate`."""

    def __init__(self, ctx, gate: ModelGate):
        self.ctx, self.gate = ctx, gate

    def _served(self, request: Request):
        clf = self.ctx.slot.active.classifier
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != clf.name:
            raise HttpError(404, f"model {name[:64]!r} is not served here (serving {clf.name!r})")
        if version not in (None, "", clf.version):
            raise HttpError(404, f"model {name} version {version[:64]!r} is not served (serving {clf.version})")
        return clf

    def _ready(self) -> bool:
        return bool(self.ctx.health()[1].get("inference_alive"))

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "visiond", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ok = self._ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_metadata(self, request: Request) -> Response:
        clf = self._served(request)
        s = clf.spec
        return JSONResponse({
            "name": clf.name, "versions": [clf.version], "platform": f"visiond_{clf.runtime}",
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, s.height, s.width, s.channels]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(clf.classes)]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"classes": list(clf.classes), "arch": clf.arch, "color": s.color,
                           "max_batch_size": MAX_REQUEST_IMAGES},
        })

    async def model_ready(self, request: Request) -> Response:
        clf = self._served(request)
        ok = self._ready()
        return JSONResponse({"name": clf.name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(self, request: Request) -> Response:
        clf = self._served(request)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise HttpError(415, "compressed requests are not accepted; send the body uncompressed")
        async with self.gate.admit():
            body = await request.body()
            doc, frames, outputs = await self.gate.run(self._parse, body,
                                                       request.headers.get("inference-header-content-length"),
                                                       clf.spec)
            result = await self.gate.classify(None, frames)
        served = result.serving.classifier  # a hot swap between check and batch answers with the new model
        return infer_response(doc, (served.name, served.version), result.probs[FULL], served.classes, outputs)

    @staticmethod
    def _parse(body: bytes, header_length: str | None, spec: PreprocessSpec):
        doc, tail = split_body(body, header_length)
        outputs = requested_outputs(doc)  # refused before any image is decoded
        return doc, parse_infer(doc, tail, spec), outputs


def routes(ctx, gate: ModelGate) -> list[Route]:
    """The protocol's routes (KServe v2 / Triton HTTP) over `ctx` (a `WebContext`)."""
    h = OipRoutes(ctx, gate)
    out = [Route("/v2", h.server_metadata, methods=["GET"]),
           Route("/v2/health/live", h.live, methods=["GET"]),
           Route("/v2/health/ready", h.ready, methods=["GET"])]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [Route(base, h.model_metadata, methods=["GET"]),
                Route(base + "/ready", h.model_ready, methods=["GET"]),
                Route(base + "/infer", h.infer, methods=["POST"])]
    return out
