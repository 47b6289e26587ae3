"""Inference on a shared model server over the Open Inference Protocol v2 (`model.runtime: remote`).

Why: when a plant outgrows a GPU per box, the boxes send their batches to one server (NVIDIA
Triton or KServe with a GPU farm behind it, or another visiond) and keep capture, decisions and
delivery on the box. The checkpoint still loads here: its classes, spec and version are what the
daemon decides and publishes with, and preprocessing stays local (the torch runtime's own
`stack_uint8`), so only the model's input crosses the network (12 KB a 64x64 RGB crop).

What to send is read from the server's model metadata: `pixels` UINT8 [N, H, W, C] (visiond's
own front, and a `visiond export --format triton` repository), or one FP32 [N, C, H, W] input (a
network exported without visiond's normaliser: normalised here with the checkpoint's mean/std).
The answer is `probabilities` (visiond), `probs` (visiond's ONNX export) or the one FP32
[N, classes] output. A server whose model has other classes than the checkpoint is refused.

A server that is away costs a batch at most `timeout_s`: connection failures are retried a few
times with capped, jittered backoff inside that time, then `ModelUnavailable` says so and when to
ask again; until then calls fail at once, so a dead server never holds the inference thread.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from visiond.errors import UserError
from visiond.models.checkpoint import Checkpoint, CheckpointError
from visiond.preprocess import stack_uint8

log = logging.getLogger(__name__)

ATTEMPTS = 3  # tries of one call while the server was answering
RETRY_BASE_S, RETRY_CAP_S = 0.05, 0.5  # backoff between those tries (doubling, jittered, capped)
DOWN_BASE_S, DOWN_CAP_S = 0.5, 5.0  # between single probes once the server is away
OUTPUTS = ("probabilities", "probs")  # visiond's front, visiond's ONNX export
# Answers worth another try: overloaded or restarting (HTTP), and gRPC's equivalents.
_TRANSIENT = {"429", "502", "503", "504", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
              "StatusCode.RESOURCE_EXHAUSTED"}


class ModelUnavailable(RuntimeError):
    """A batch the model server did not classify (away, too slow, overloaded or refusing): its frames are lost.

    `retry_after_s` is when asking again is worth it; calls before then fail at once with this error.
    """

    def __init__(self, message: str, retry_after_s: float = 0.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _Transient(Exception):
    """One attempt failed in a way the next one may not (refused, reset, timed out, 503)."""


class _Refused(Exception):
    """The server answered with an error another attempt would repeat (unknown model, bad request)."""


@dataclass(frozen=True)
class ServerAddress:
    url: str  # as configured, for messages and status
    protocol: str  # "http" | "grpc"
    address: str  # host:port[/base-path], as tritonclient takes it
    ssl: bool

    @classmethod
    def parse(cls, url: str) -> "ServerAddress":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "grpc") or not parts.netloc:
            raise UserError(f"model.url {url!r}: expected http://host:port, https://host:port or grpc://host:port")
        if "@" in parts.netloc:  # it would show in status/detail and the logs; tritonclient would not send it
            raise UserError("model.url: credentials cannot go in the URL; the server's token goes in its own setting")
        if parts.scheme == "grpc":
            if parts.path.strip("/"):
                raise UserError(f"model.url {url!r}: a gRPC address has no path; use grpc://host:port")
            return cls(url, "grpc", parts.netloc, False)
        return cls(url, "http", parts.netloc + parts.path.rstrip("/"), parts.scheme == "https")


class _Transport(ABC):
    """One tritonclient client per thread (the HTTP client's gevent sockets belong to the thread that made them).

    Every call gets its own copy of the headers: tritonclient writes into the dict it is given.
    """

    def __init__(self, server: ServerAddress, headers: dict[str, str]):
        from tritonclient.utils import InferenceServerException

        self._server, self._headers = server, headers
        self._server_error = InferenceServerException
        self._local = threading.local()

    def _client(self, timeout: float):
        """This thread's client; a new one when the call's time differs (a retry's remainder, not the usual)."""
        held = getattr(self._local, "held", None)
        if held is None or abs(held[0] - timeout) > 0.05 * max(held[0], timeout):
            self.reset()
            held = self._local.held = (timeout, self._new_client(timeout))
        return held[1]

    def _fresh_headers(self) -> dict[str, str]:
        return dict(self._headers)

    def reset(self) -> None:
        """Forget this thread's client (after a transport failure its connection is suspect)."""
        held = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None:
            try:
                held[1].close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is dropped anyway
                pass

    def call(self, what: str, fn):
        try:
            return fn()
        except self._server_error as exc:
            status = str(exc.status() or "")
            why = f"{what}: {status + ' ' if status else ''}{str(exc.message()).splitlines()[0][:200]}"
            if status in _TRANSIENT or not status:
                raise _Transient(why) from None
            raise _Refused(why) from None
        except (OSError, http.client.HTTPException) as exc:
            self.reset()
            raise _Transient(f"{what}: {exc.__class__.__name__}: {exc}".rstrip(": ")) from None

    @abstractmethod
    def _new_client(self, timeout: float): ...

    @abstractmethod
    def metadata(self, model: str, timeout: float) -> dict:
        """The protocol's model metadata (name, versions, platform, inputs, outputs)."""

    @abstractmethod
    def config(self, model: str, timeout: float) -> dict:
        """Triton's model configuration (not part of the protocol: servers without it refuse)."""

    @abstractmethod
    def infer(self, model: str, name: str, datatype: str, array: np.ndarray, output: str,
              timeout: float) -> np.ndarray:
        """One input tensor in, one output tensor back."""


class _HttpTransport(_Transport):
    def __init__(self, server: ServerAddress, headers: dict[str, str]):
        try:
            import tritonclient.http as api
        except ImportError:
            raise UserError("model.runtime remote needs NVIDIA's client: pip install 'tritonclient[http]'") from None
        super().__init__(server, headers)
        self._api = api

    def _new_client(self, timeout: float):
        return self._api.InferenceServerClient(self._server.address, connection_timeout=timeout,
                                               network_timeout=timeout, ssl=self._server.ssl)

    def metadata(self, model: str, timeout: float) -> dict:
        return self.call("model metadata",
                         lambda: self._client(timeout).get_model_metadata(model, headers=self._fresh_headers()))

    def config(self, model: str, timeout: float) -> dict:
        return self.call("model config",
                         lambda: self._client(timeout).get_model_config(model, headers=self._fresh_headers()))

    def infer(self, model, name, datatype, array, output, timeout):
        tensor = self._api.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        want = [self._api.InferRequestedOutput(output, binary_data=True)]
        result = self.call("infer", lambda: self._client(timeout).infer(model, [tensor], outputs=want,
                                                                        headers=self._fresh_headers()))
        return result.as_numpy(output)


class _GrpcTransport(_Transport):
    def __init__(self, server: ServerAddress, headers: dict[str, str]):
        try:
            import tritonclient.grpc as api
        except (ImportError, RuntimeError):  # tritonclient raises RuntimeError when grpcio is missing
            raise UserError(f"model.url {server.url}: the gRPC client is not installed; "
                            "pip install 'tritonclient[grpc]', or use the server's HTTP port (http://)") from None
        super().__init__(server, headers)
        self._api = api

    def _client(self, timeout: float):
        return super()._client(0.0)  # gRPC takes its timeout per call: one client per thread

    def _new_client(self, timeout: float):
        return self._api.InferenceServerClient(self._server.address)

    def metadata(self, model: str, timeout: float) -> dict:
        return self.call("model metadata", lambda: self._client(timeout).get_model_metadata(
            model, headers=self._fresh_headers(), as_json=True, client_timeout=timeout))

    def config(self, model: str, timeout: float) -> dict:
        doc = self.call("model config", lambda: self._client(timeout).get_model_config(
            model, headers=self._fresh_headers(), as_json=True, client_timeout=timeout))
        return doc.get("config", doc)

    def infer(self, model, name, datatype, array, output, timeout):
        tensor = self._api.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        want = [self._api.InferRequestedOutput(output)]
        result = self.call("infer", lambda: self._client(timeout).infer(model, [tensor], outputs=want,
                                                                        headers=self._fresh_headers(),
                                                                        client_timeout=timeout))
        return result.as_numpy(output)


@dataclass(frozen=True)
class ServedModel:
    """What the server's model takes and gives, as chosen from its metadata."""

    input: str
    layout: str  # "nhwc_uint8" (sent as is) | "nchw_fp32" (normalised here)
    output: str
    max_batch: int | None  # the server's limit per request, where it says one


def _shape(tensor: dict) -> list[int]:
    return [int(d) for d in tensor.get("shape") or []]  # gRPC's JSON spells int64 as strings


def _fits(shape: list[int], dims: list[int]) -> bool:
    return len(shape) == 4 and shape[0] in (-1, 1) and all(s in (-1, d) for s, d in zip(shape[1:], dims))


def choose_io(meta: dict, ckpt: Checkpoint, max_batch: int | None = None) -> ServedModel:
    """The input and output to use, or a CheckpointError saying why this server's model does not fit."""
    s, n = ckpt.spec, len(ckpt.classes)
    nhwc, nchw = [s.height, s.width, s.channels], [s.channels, s.height, s.width]
    inputs = [t for t in meta.get("inputs") or [] if isinstance(t, dict)]
    chosen = None
    for t in sorted(inputs, key=lambda t: t.get("name") != "pixels"):
        shape = _shape(t)
        if t.get("datatype") == "UINT8" and _fits(shape, nhwc):
            chosen = (t["name"], "nhwc_uint8", shape[0])
        elif t.get("datatype") == "FP32" and _fits(shape, nchw):
            chosen = (t["name"], "nchw_fp32", shape[0])
        if chosen:
            break
    have = ", ".join(f"{t.get('name')} {t.get('datatype')} {_shape(t)}" for t in inputs) or "none"
    if chosen is None:
        want = f"pixels UINT8 {[-1, *nhwc]} or FP32 {[-1, *nchw]}"
        raise CheckpointError(f"model {meta.get('name')!r} takes no input this box can send for a {s.height}x"
                              f"{s.width}x{s.channels} checkpoint (expected {want}); it takes: {have}")
    outputs = [t for t in meta.get("outputs") or [] if isinstance(t, dict) and t.get("datatype") == "FP32"]
    named = {t.get("name"): t for t in outputs}
    out = next((named[o] for o in OUTPUTS if o in named), outputs[0] if len(outputs) == 1 else None)
    if out is None:
        raise CheckpointError(f"model {meta.get('name')!r} has no FP32 output named {' or '.join(OUTPUTS)}")
    shape = _shape(out)
    if len(shape) != 2 or shape[1] not in (-1, n):
        raise CheckpointError(f"model {meta.get('name')!r} output {out.get('name')} has shape {shape}; the "
                              f"checkpoint has {n} classes, so [-1, {n}] was expected")
    limit = 1 if chosen[2] == 1 else max_batch
    return ServedModel(chosen[0], chosen[1], out["name"], limit)


def served_identity(meta: dict, config: dict | None) -> tuple[list[str] | None, str | None, int | None]:
    """(classes, visiond version, max batch) the server states: visiond's metadata, or a Triton config we wrote."""
    params = meta.get("parameters") or {}
    if str(meta.get("platform", "")).startswith("visiond"):
        versions = meta.get("versions") or [None]
        return params.get("classes"), versions[0], params.get("max_batch_size")
    if not config:
        return None, None, None
    cp = {k: (v or {}).get("string_value") for k, v in (config.get("parameters") or {}).items()}
    classes = json.loads(cp["visiond_classes"]) if cp.get("visiond_classes") else None
    return classes, cp.get("visiond_version"), int(config.get("max_batch_size") or 0) or None


class RemoteClassifier:
    """The Classifier interface over a model server; preprocessing local, the forward pass remote."""

    runtime = "remote"

    def __init__(self, ckpt: Checkpoint, url: str, *, model: str | None = None, timeout_s: float = 2.0,
                 token: str | None = None):
        self.name, self.version, self.arch = ckpt.name, ckpt.version, ckpt.arch
        self.classes, self.spec = ckpt.classes, ckpt.spec
        self._ckpt = ckpt
        self.server = ServerAddress.parse(url)
        self.device = self.server.url
        self.model = model or ckpt.name
        self._timeout = float(timeout_s)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        kind = _GrpcTransport if self.server.protocol == "grpc" else _HttpTransport
        self._transport = kind(self.server, headers)
        self._mean = np.asarray(ckpt.spec.mean, np.float32).reshape(1, -1, 1, 1) * 255.0
        self._inv_std = 1.0 / (np.asarray(ckpt.spec.std, np.float32).reshape(1, -1, 1, 1) * 255.0)
        self._served: ServedModel | None = None
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failed calls; 0 = the server is answering
        self._retry_at = 0.0
        self._why = ""

    def __repr__(self) -> str:
        return f"RemoteClassifier({self.model!r} at {self.server.url})"

    def warmup(self, max_batch: int = 1, frame_shapes: Sequence[tuple[int, ...]] = ()) -> None:
        """Check the server's model against the checkpoint and run each batch size once (`frame_shapes`: unused,
        the frames are resized here on the CPU and only spec-sized batches travel).

        A server that is away is not an error here (the box starts and drops frames until it
        answers); a server whose model does not fit, or answers with non-probabilities, is.
        """
        s = self.spec
        try:
            self._served = self._discover(time.monotonic() + self._timeout)
            for n in sorted({1, max_batch}):
                sums = self.predict(np.zeros((n, s.height, s.width, s.channels), np.uint8)).sum(axis=1)
                if not np.allclose(sums, 1.0, atol=1e-3):
                    raise CheckpointError(f"model {self.model!r} at {self.server.url} answers values that are not "
                                          f"probabilities (a row sums to {sums[0]:.3g}); serve it with its softmax, "
                                          "as `visiond export` writes it")
        except (_Transient, _Refused) as exc:
            self._down(str(exc))
            log.warning("model server %s does not answer for %r yet (%s): frames are dropped until it does",
                        self.server.url, self.model, exc)
        except ModelUnavailable as exc:
            log.warning("model server %s: %s: frames are dropped until it answers", self.server.url, exc)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C (resized by the spec) -> float32 N x classes probabilities, or ModelUnavailable."""
        if not len(pixels):
            return np.zeros((0, len(self.classes)), np.float32)
        now = time.monotonic()
        with self._lock:
            failures, retry_at, why = self._failures, self._retry_at, self._why
        if failures and now < retry_at:
            raise ModelUnavailable(f"model server {self.server.url} unavailable ({why}); next try in "
                                   f"{retry_at - now:.1f} s", retry_at - now)
        deadline = now + self._timeout
        try:
            served = self._served or self._discover(deadline, retries=not failures)
            self._served = served
            step = served.max_batch or len(pixels) or 1
            parts = [self._infer(served, pixels[i:i + step], deadline, retries=not failures)
                     for i in range(0, len(pixels), step)]
        except (_Transient, _Refused, CheckpointError) as exc:
            raise ModelUnavailable(f"model server {self.server.url}: {exc}", self._down(str(exc))) from None
        if failures:
            with self._lock:
                self._failures = 0
            log.info("model server %s answers again for %r", self.server.url, self.model)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def predict_images(self, images: list[np.ndarray]) -> np.ndarray:
        """Frames as decoded (ROI-cropped views, any size) -> probabilities; resized here, as the torch runtime does."""
        return self.predict(stack_uint8(images, self.spec))

    def _down(self, why: str) -> float:
        """Record a failed call; the seconds until the next try (doubling per failure, capped, jittered)."""
        with self._lock:
            self._failures += 1
            if self._failures == 1:
                log.warning("model server %s unavailable for %r: %s", self.server.url, self.model, why)
            wait = min(DOWN_CAP_S, DOWN_BASE_S * 2 ** (self._failures - 1)) * random.uniform(0.5, 1.0)
            self._retry_at, self._why = time.monotonic() + wait, why
            self._served = None  # a server that comes back may serve another model: read its metadata again
            return wait

    def _attempts(self, fn, deadline: float, retries: bool):
        """fn(timeout) until it answers; transient failures retried with backoff while the call's time lasts.

        Every attempt gets only what is left of the call's time, so a call never outlasts `timeout_s`.
        """
        tries = 0
        while True:
            left = deadline - time.monotonic()
            if left < 0.01:
                raise _Transient(f"no answer within {self._timeout:g} s")
            try:
                return fn(left)
            except _Transient:
                tries += 1
                delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** tries) * random.uniform(0.5, 1.0)
                if not retries or tries >= ATTEMPTS or deadline - time.monotonic() - delay < 0.01:
                    raise
                time.sleep(delay)

    def _discover(self, deadline: float, retries: bool = True) -> ServedModel:
        meta = self._attempts(lambda t: self._transport.metadata(self.model, t), deadline, retries)
        config = None
        if not str(meta.get("platform", "")).startswith("visiond"):
            try:  # Triton's own endpoint; a server without it just has nothing more to say
                config = self._attempts(lambda t: self._transport.config(self.model, t), deadline, False)
            except (_Transient, _Refused):
                config = None
        classes, version, max_batch = served_identity(meta, config)
        if classes is not None and list(classes) != list(self.classes):
            raise CheckpointError(f"model {self.model!r} at {self.server.url} has classes {list(classes)}, the "
                                  f"checkpoint {list(self.classes)}; point model.remote_model at this checkpoint's "
                                  "model or load the checkpoint the server serves")
        if version is not None and version != self.version:
            log.warning("model server %s serves %r version %s, the local checkpoint is %s: predictions are "
                        "published as %s", self.server.url, self.model, version, self.version, self.version)
        served = choose_io(meta, self._ckpt, max_batch)
        log.info("model server %s: %r takes %s (%s), answers %s", self.server.url, self.model, served.input,
                 served.layout, served.output)
        return served

    def _infer(self, served: ServedModel, pixels: np.ndarray, deadline: float, retries: bool) -> np.ndarray:
        if served.layout == "nhwc_uint8":
            array, datatype = np.ascontiguousarray(pixels, dtype=np.uint8), "UINT8"
        else:
            x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
            array, datatype = np.ascontiguousarray((x - self._mean) * self._inv_std), "FP32"
        out = self._attempts(lambda t: self._transport.infer(self.model, served.input, datatype, array,
                                                             served.output, t), deadline, retries)
        if out is None or out.shape != (len(pixels), len(self.classes)):
            got = None if out is None else list(out.shape)
            raise _Refused(f"infer: output {served.output} of shape {got}, expected "
                           f"[{len(pixels)}, {len(self.classes)}]")
        return out.astype(np.float32, copy=False)
