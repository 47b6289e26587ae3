"""The daemon's YAML config: pydantic models, env placeholders, one-line errors.

Every field has a default or is required and carries a description; unknown
keys are errors. `load_config` raises `ConfigError` whose lines each name the
key path, the value and what was expected.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from visiond.errors import UserError
from visiond.logs import redact_url

_PLACEHOLDER = re.compile(r"\$\{(VISIOND_[A-Z0-9_]+)(?::-([^}]*))?\}")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # cameras, nodes, models: safe in topics and labels
MAX_CONFIG_BYTES = 1024 * 1024  # a config is a page of YAML; more is a mistake or an attack
MAX_CONFIG_VALUES = 100_000  # after alias expansion: stops a "billion laughs" before it is walked
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
MODBUS_BLOCK = 150  # registers per station: 10 fixed + 2 per ROI (64 ROIs at most) + room
RESERVED_CAMERA_NAMES = frozenset({"status", "cmd"})  # node-level MQTT topics a camera name would collide with


class ConfigError(Exception):
    """A config that cannot be used; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaptureRules(_Model):
    """When a camera's frame goes to the labelling inbox (any rule that matches saves it)."""

    enabled: bool = Field(True, description="Capture from this camera at all (commands included).")
    low_score_below: float | None = Field(
        None, ge=0, le=1, description="Save frames whose top score is below this (the model is unsure); none = off.")
    near_threshold: float | None = Field(
        None, gt=0, le=0.5,
        description="Save frames where a defect class scores within this margin of its decision threshold; none = off.")
    sample_rate: float = Field(0.0, ge=0, le=1, description="Save this random fraction of all frames (0 = off).")
    max_per_minute: float = Field(30, ge=0, le=60000, description="Rate limit for rule captures (commands bypass it).")
    dedupe_bits: int = Field(
        6, ge=-1, le=64,
        description="Skip a frame whose perceptual hash is within this many bits of a recent capture; -1 = off.")


def _check_rect(v):
    if v is not None and (v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0):
        raise ValueError("expected x >= 0, y >= 0, w > 0, h > 0")
    return v


class RoiConfig(_Model):
    """One inspection point of a camera: a named crop, optionally with its own model and threshold."""

    name: str = Field(pattern=NAME_PATTERN, description="ROI name; used in payloads, topics of doors and evidence.")
    rect: tuple[int, int, int, int] = Field(description="x, y, w, h in pixels of the full frame.")
    model: str | None = Field(None, pattern=NAME_PATTERN,
                              description="A key of `models` (or of the recipe's models); default: `model`.")
    threshold: float | None = Field(None, ge=0, le=1,
                                    description="Defect threshold of this ROI (every defect class); default: decide.")

    @field_validator("rect")
    @classmethod
    def _rect_positive(cls, v):
        return _check_rect(v)


def _unique_rois(rois: list[RoiConfig] | None) -> list[RoiConfig] | None:
    if rois is not None:
        names = [r.name for r in rois]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ROI names must be unique per camera, repeated: {', '.join(dup)}")
    return rois


class InspectConfig(_Model):
    """How a triggered camera inspects one part."""

    frames: int = Field(3, ge=1, le=100, description="Frames per trigger (a burst), captured after the trigger.")
    interval_ms: float = Field(30, ge=0, le=10_000, description="Spacing of the burst's frames.")
    aggregate: Literal["worst", "majority", "mean"] = Field(
        "worst", description="Per ROI over the burst: worst (any defect frame makes it NG), majority, mean (of "
        "probabilities).")
    deadline_ms: float = Field(2000, gt=0, le=600_000,
                               description="Trigger to verdict; a part not decided by then is answered ERROR.")
    queue: int = Field(8, ge=1, le=10_000,
                       description="Triggers waiting behind the running one; beyond it a trigger is answered ERROR busy.")
    keep_frames: int = Field(8, ge=1, le=1000, description="Newest frames kept between triggers.")


class CameraConfig(_Model):
    name: str = Field(pattern=NAME_PATTERN, description="Camera name; used in topics and metric labels.")
    source: str = Field(
        min_length=1,
        description="rtsp://..., http(s)://..., /dev/videoN, a V4L2 index (0), a video file or an image folder.",
    )
    fps: float = Field(0, ge=0, le=1000, description="Frame rate cap; 0 = as fast as the source gives.")
    policy: Literal["latest", "every"] | None = Field(
        None,
        description="latest: keep the newest frames, drop the oldest (live cameras); "
        "every: never drop, block the source (files, triggered frames). Default: every for files/folders, latest otherwise.",
    )
    queue_size: int = Field(4, ge=1, le=10000, description="Frames held per camera between capture and the model.")
    roi: tuple[int, int, int, int] | None = Field(None, description="Crop x, y, w, h in pixels, applied before the model.")
    loop: bool = Field(False, description="Files and folders: start again at the end instead of stopping.")
    decode: Literal["auto", "cpu", "nvdec"] = Field(
        "auto", description="Video files and RTSP streams: cpu (OpenCV/FFmpeg), nvdec (NVIDIA's hardware decoder "
        "via PyNvVideoCodec, frames stay on the GPU for the model) or auto (nvdec where a CUDA GPU, PyNvVideoCodec "
        "and the codec are there, else cpu). A failed nvdec falls back to cpu, logged once.")
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="Network streams: give up opening after this long. "
                                  "Any source: an open blocked 10 s past this is a hung driver (watchdog pings stop).")
    read_timeout_s: float = Field(5.0, gt=0, le=600, description="Network streams: a read that blocks longer is a stall. "
                                  "Any source: a read blocked 10 s past this is a hung driver (watchdog pings stop).")
    capture: CaptureRules | None = Field(
        None, description="This camera's capture rules; default: the top-level capture.rules.")
    mode: Literal["stream", "triggered"] = Field(
        "stream", description="stream: classify every frame; triggered: an inspection station, a burst per trigger.")
    rois: list[RoiConfig] | None = Field(
        None, min_length=1, max_length=64,
        description="Named inspection points; default: one ROI 'full' (the camera's roi, or the whole frame).")
    inspect: InspectConfig = Field(default_factory=InspectConfig, description="Triggered mode: the burst per trigger.")

    @field_validator("rois")
    @classmethod
    def _rois_unique(cls, v):
        return _unique_rois(v)

    @model_validator(mode="after")
    def _roi_or_rois(self):
        if self.roi is not None and self.rois is not None:
            raise ValueError("give either roi (one crop) or rois (named inspection points), not both")
        return self

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str):
        if v in RESERVED_CAMERA_NAMES:
            raise ValueError(f"a name other than {v!r}, which is a node-level MQTT topic")
        return v

    @field_validator("roi")
    @classmethod
    def _roi_positive(cls, v):
        return _check_rect(v)

    @field_validator("source")
    @classmethod
    def _source_shape(cls, v: str):
        if "://" in v:
            scheme = v.split("://", 1)[0].lower()
            if scheme not in ("rtsp", "rtsps", "http", "https", "file"):
                raise ValueError(f"expected rtsp://, http(s)://, a device, an index, a file or a folder, got scheme {scheme!r}")
            if scheme != "file" and not v.split("://", 1)[1].strip("/"):
                raise ValueError("expected a host after the scheme")
        return v


class ModelConfig(_Model):
    checkpoint: Path = Field(description="The model checkpoint (.ckpt) to serve.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$", description="auto | cpu | cuda | cuda:N")
    max_batch: int | Literal["auto"] = Field(
        "auto", description="Largest batch the model gets. auto = the batch size (a power of two up to 32 on a CPU, "
        "64 on CUDA) at which the model classifies the most images a second, timed at warm-up; a larger batch "
        "can be slower (mobilenet_v3_small 224 on 2 cores: 253 fps at 8, 185 at 16). remote: 16.")
    max_wait_ms: float = Field(
        0, ge=0, le=1000,
        description="Under saturation only (the previous batch was full): wait this long to fill the next one. "
        "At light load frames never wait.",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 on CUDA, fp32 on CPU (the model is cast once at load; bf16 is honoured "
        "on CPU too).")
    threads: int = Field(1, ge=0, le=256, description="Intra-op threads of the runtime on CPU; 0 = the runtime's default.")
    resize_on: Literal["cpu", "gpu", "auto"] = Field(
        "auto", description="Where frames are resized to the model's input (torch on CUDA): cpu (cv2, then one "
        "upload of the small inputs), gpu (one upload of the full frames, a batched resize on the GPU) or auto "
        "(the faster of the two, timed at warm-up on the cameras' frame sizes; cpu until measured). Frames "
        "decoded on the GPU (decode: nvdec) are always resized there.")
    runtime: Literal["torch", "onnxruntime", "openvino", "auto", "remote"] = Field(
        "torch", description="torch (CPU or CUDA) | onnxruntime (CPU only; faster on CPU) | openvino (CPU only; "
        "Intel's runtime) | auto (torch on CUDA; on a CPU the runtime `visiond bench --streams` measured fastest, "
        "onnxruntime today) "
        "| remote (a model server over the Open Inference Protocol at model.url: Triton, KServe or another "
        "visiond). For onnxruntime and openvino the checkpoint is exported to ONNX at load, checked against torch, "
        "and cached in <spool.dir>/models/; a network the exporter cannot take is served by torch, with a warning.")
    url: str | None = Field(None, pattern=r"^(https?|grpc)://[^\s/]+(:\d+)?(/\S*)?$",
                            description="runtime remote: the model server, http://host:port or grpc://host:port.")
    remote_model: str | None = Field(None, description="runtime remote: the model's name on the server; default: "
                                     "the checkpoint's model name.")
    remote_timeout_s: float = Field(2.0, gt=0, le=8, description="runtime remote: one request's timeout (at most "
                                    "8 s: the watchdog calls an inference stalled after 10 s).")
    remote_token: SecretStr | None = Field(None, description="runtime remote: bearer token sent with every request "
                                           "(the serving visiond's http.token); use ${VISIOND_REMOTE_TOKEN}.")
    shadow: Path | None = Field(
        None, description="A candidate checkpoint run beside the served one on the same frames; its labels are "
        "compared, never published as predictions. Also set/cleared by cmd/shadow.")
    shadow_interval_s: float = Field(60.0, gt=0, le=86400, description="How often the shadow comparison is published.")
    tta: Literal["none", "flip", "flip+crop"] = Field(
        "none", description="Test-time augmentation: average the scores of the frame and its flips (flip), plus four "
        "corner crops (flip+crop); only transforms the model's training augmentation used. Each view is one more "
        "image through the model: flip costs 2-3x, flip+crop 6-7x the inference time (README, TTA).")

    @field_validator("max_batch", mode="before")
    @classmethod
    def _batch(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024):
            return v
        raise ValueError("auto or a whole number of 1..1024")

    @field_validator("runtime")
    @classmethod
    def _runtime_on_its_device(cls, v, info):
        device = info.data.get("device", "auto")
        if v in ("onnxruntime", "openvino") and device.startswith("cuda"):
            raise ValueError(f"runtime {v} runs on the CPU, but model.device is {device!r}; "
                             "use device auto or cpu, or runtime torch (or auto) for CUDA")
        return v

    @model_validator(mode="after")
    def _remote_has_url(self):
        if self.runtime == "remote" and not self.url:
            raise ValueError("runtime remote needs model.url (http://host:port or grpc://host:port of the server)")
        return self


class DebounceConfig(_Model):
    n: int = Field(3, ge=1, le=10000, description="Defect frames among the last m that start an event.")
    m: int | None = Field(None, ge=1, le=10000, description="Window for the start; default n (n in a row).")
    end_n: int | None = Field(None, ge=1, le=10000, description="Clean frames among the last end_m that end it; default n.")
    end_m: int | None = Field(None, ge=1, le=10000, description="Window for the end; default m.")

    @model_validator(mode="after")
    def _n_within_m(self):
        m, end_n = self.m or self.n, self.end_n or self.n
        end_m = self.end_m or m
        if self.n > m or end_n > end_m:
            raise ValueError(f"expected n <= m and end_n <= end_m, got n={self.n} m={m} end_n={end_n} end_m={end_m}")
        return self

    def resolved(self) -> tuple[int, int, int, int]:
        m = self.m or self.n
        return self.n, m, self.end_n or self.n, self.end_m or m


class DecideConfig(_Model):
    defect_classes: list[str] = Field(default_factory=list, description="Labels that mean a defect.")
    threshold: float | dict[str, float] = Field(
        0.5, description="Score a defect class needs to count as a defect; one number or per class."
    )
    top_k: int = Field(3, ge=1, le=100, description="How many {label, score} pairs go into `top`.")
    debounce_frames: int = Field(3, ge=1, le=10000,
                                 description="Shorthand: this many frames in a row start or end a defect event.")
    debounce: DebounceConfig | None = Field(
        None, description="N of the last M frames (per camera and ROI) start an event, end_n of end_m clean ones "
        "end it; overrides debounce_frames.")

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, v):
        values = v.values() if isinstance(v, dict) else [v]
        for x in values:
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"expected a score between 0 and 1, got {x}")
        return v

    def check_classes(self, classes: tuple[str, ...] | list[str]) -> None:
        """The rules may name only classes the model has (the daemon at load, `promote` before install)."""
        unknown = [c for c in self.defect_classes if c not in classes]
        if unknown:
            raise UserError(f"decide.defect_classes: {unknown} not among the model's classes {list(classes)}")
        if isinstance(self.threshold, dict):
            bad = [c for c in self.threshold if c not in self.defect_classes]
            if bad:
                raise UserError(
                    f"decide.threshold: {bad} are not listed in decide.defect_classes {self.defect_classes}")


class TlsConfig(_Model):
    ca: Path | None = Field(None, description="CA bundle that signed the broker's certificate.")
    cert: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key: Path | None = Field(None, description="Client key (mutual TLS).")
    insecure: bool = Field(False, description="Skip host name verification (test rigs only).")


class MqttConfig(_Model):
    host: str = Field("127.0.0.1", min_length=1, description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    topic_prefix: str = Field("visiond", pattern=r"^[^#+\s]+$", description="First topic level.")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of predictions and events.")
    client_id: str | None = Field(None, description="MQTT client id; default visiond-<node>.")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password; use ${VISIOND_MQTT_PASSWORD}.")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent = plain TCP.")
    keepalive_s: int = Field(15, ge=2, le=3600, description="MQTT keepalive; a silent broker is noticed within 1.5x this.")
    max_inflight: int = Field(64, ge=1, le=65535, description="Unacknowledged QoS>0 messages at once.")


class SpoolConfig(_Model):
    dir: Path = Field(Path("/var/lib/visiond/spool"), description="Where messages wait while the broker is away.")
    max_messages: int = Field(1_000_000, ge=10, le=100_000_000,
                              description="Bound; beyond it the oldest are dropped and counted.")


class MetricsConfig(_Model):
    bind: str = Field("127.0.0.1", description="Address for /metrics and /healthz.")
    port: int = Field(9108, ge=0, le=65535, description="Port; 0 = pick a free one (logged).")
    enabled: bool = Field(True, description="Serve /metrics and /healthz.")
    stale_after_s: float = Field(5.0, gt=0, le=3600, description="/healthz fails for a camera silent this long.")


class HttpConfig(_Model):
    """The daemon's one web front (ASGI): /metrics, /healthz, the Open Inference Protocol, /v1, the operator page."""

    enabled: bool = Field(True, description="Serve HTTP.")
    bind: str = Field("127.0.0.1", description="Address; beyond loopback a bearer token is required.")
    port: int = Field(9108, ge=0, le=65535, description="Port; 0 = pick a free one (logged).")
    stale_after_s: float = Field(5.0, gt=0, le=3600, description="/healthz fails for a camera silent this long.")
    token: SecretStr | None = Field(None, description="Bearer token for every route but /healthz and /metrics "
                                    "(required beyond loopback); use ${VISIOND_HTTP_TOKEN}.")
    max_waiting: int = Field(32, ge=1, le=10_000, description="Model requests waiting at once; beyond it 503 with "
                             "Retry-After (live frames always come first).")
    max_body_mb: float = Field(16, gt=0, le=1024, description="Largest request body.")

    @model_validator(mode="after")
    def _token_beyond_loopback(self):
        if self.enabled and self.bind not in LOOPBACK and self.token is None:
            raise ValueError(f"bind {self.bind} is reachable beyond this box; expected a token "
                             "(${VISIOND_HTTP_TOKEN}) or bind 127.0.0.1")
        return self


class JsonlConfig(_Model):
    path: Path | None = Field(None, description="Append every verdict as one JSON line here (audit trail); none = off.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate the file beyond this size.")
    keep: int = Field(3, ge=1, le=100, description="Rotated files kept.")


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    json_: bool = Field(False, alias="json", description="One JSON object per line (for journald/Loki).")


class CaptureConfig(_Model):
    """Frames the daemon saves into a dataset's inbox for labelling (off unless `dataset` is set)."""

    dataset: Path | None = Field(None, description="Dataset directory; frames go to <dataset>/inbox/. none = off.")
    quota_mb: float = Field(1024, gt=0, description="Inbox size bound; beyond it the oldest items are evicted.")
    queue_size: int = Field(64, ge=1, le=10000,
                            description="Frames waiting for the writer; beyond it they are dropped and counted.")
    rules: CaptureRules = Field(default_factory=CaptureRules, description="Rules of cameras without their own capture section.")


class NamedModelConfig(_Model):
    """An extra checkpoint ROIs may name (`cameras[].rois[].model`)."""

    checkpoint: Path = Field(description="The checkpoint of this model.")
    defect_classes: list[str] | None = Field(
        None, description="Its defect labels; default: decide.defect_classes that this model has.")
    threshold: float | dict[str, float] | None = Field(None, description="Its threshold(s); default: decide.threshold.")


class RecipeCameraConfig(_Model):
    rois: list[RoiConfig] = Field(min_length=1, max_length=64, description="This camera's ROIs under the recipe.")

    @field_validator("rois")
    @classmethod
    def _rois_unique(cls, v):
        return _unique_rois(v)


class RecipeConfig(_Model):
    """A product: its checkpoints, ROIs and decision rules, switched in as one set (product changeover)."""

    model: Path | None = Field(None, description="The default checkpoint under this recipe; default: model.checkpoint.")
    models: dict[str, NamedModelConfig] = Field(default_factory=dict, description="Named models, added to `models`.")
    cameras: dict[str, RecipeCameraConfig] = Field(default_factory=dict, description="ROIs per camera.")
    decide: DecideConfig | None = Field(None, description="Decision rules; default: the top-level decide.")


class ResultsConfig(_Model):
    db: Path | None = Field(None, description="The verdict store (SQLite); default <spool.dir>/results.db.")
    keep_days: float = Field(90, ge=0, le=36500, description="Rows older than this are deleted (0 = keep all).")


class EvidenceConfig(_Model):
    dir: Path | None = Field(None, description="Where evidence images go; default <spool.dir>/evidence.")
    save: Literal["ng", "all", "none"] = Field("ng", description="ng: NG and ERROR parts; all; none.")
    sample_ok: float = Field(0.0, ge=0, le=1, description="Also keep this fraction of OK parts.")
    annotated: bool = Field(True, description="Also write a copy with ROI boxes, labels, scores and the verdict.")
    keep_days: float = Field(30, ge=0, le=36500, description="Older evidence is deleted (0 = keep all).")
    quota_mb: float = Field(2000, ge=0, description="Size bound; the oldest go first (0 = no bound).")
    stream_events: bool = Field(False, description="Stream cameras: keep the frame that started a defect event.")


class OpcUaConfig(_Model):
    """The OPC UA server (asyncua) for triggered stations; off by default."""

    enabled: bool = Field(False, description="Serve OPC UA.")
    endpoint: str = Field("opc.tcp://127.0.0.1:4840", pattern=r"^opc\.tcp://[^/\s]+:\d{1,5}(/\S*)?$",
                          description="opc.tcp://host:port[/path]; beyond loopback it needs security, cert, key and "
                          "users or trusted_clients.")
    security: Literal["none", "sign", "sign_encrypt"] = Field(
        "none", description="none (loopback only) | sign | sign_encrypt (Basic256Sha256).")
    cert: Path | None = Field(None, description="Server certificate (DER or PEM); `visiond opcua make-cert` writes one.")
    key: Path | None = Field(None, description="Server private key (PEM).")
    users: dict[str, SecretStr] = Field(default_factory=dict,
                                        description="user name -> password (use ${VISIOND_...} placeholders).")
    trusted_clients: Path | None = Field(None, description="A folder of trusted client certificates; none = any "
                                         "certificate with valid user credentials.")
    allow_anonymous: bool = Field(False, description="Let clients without credentials read (never call methods).")

    @property
    def host(self) -> str:
        return self.endpoint.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.endpoint.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    @model_validator(mode="after")
    def _secure_beyond_loopback(self):
        if not self.enabled or self.host in LOOPBACK:
            return self
        missing = []
        if self.security == "none":
            missing.append("security sign or sign_encrypt")
        if self.cert is None or self.key is None:
            missing.append("cert and key")
        if not self.users and self.trusted_clients is None:
            missing.append("users or trusted_clients")
        if missing:
            raise ValueError(f"endpoint {self.endpoint} is reachable beyond this box; expected {', '.join(missing)}")
        return self


class ModbusStationConfig(_Model):
    base: int = Field(0, ge=0, le=65000, description="First coil and first holding register of this station.")
    unit: int = Field(1, ge=0, le=247, description="Modbus unit (slave) id.")


class ModbusConfig(_Model):
    """The Modbus TCP server (pymodbus) for triggered stations; off by default. Modbus has no authentication."""

    enabled: bool = Field(False, description="Serve Modbus TCP.")
    bind: str = Field("127.0.0.1", description="Address; anything but loopback is logged loudly (no authentication).")
    port: int = Field(5020, ge=0, le=65535, description="Port; 0 = pick a free one (logged). 502 needs root.")
    stations: dict[str, ModbusStationConfig] = Field(default_factory=dict,
                                                     description="Triggered camera -> its block of registers.")
    ack_timeout_s: float = Field(10.0, ge=0, le=3600, description="Result bits are cleared when the PLC has not "
                                 "acknowledged them within this long (0 = wait for Ack forever).")


class Config(_Model):
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "visiond", pattern=NAME_PATTERN,
                      description="This box's name in topics; default: host name.")
    cameras: Annotated[list[CameraConfig], Field(min_length=1, description="The cameras this box watches.")]
    model: ModelConfig
    decide: DecideConfig = Field(default_factory=DecideConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig,
                                   description="Deprecated: the same keys now live under `http`.")
    http: HttpConfig = Field(default_factory=HttpConfig)
    jsonl: JsonlConfig = Field(default_factory=JsonlConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    models: dict[str, NamedModelConfig] = Field(default_factory=dict,
                                                description="Extra named checkpoints ROIs may use; `model` stays the default.")
    recipes: dict[str, RecipeConfig] = Field(default_factory=dict, description="Products, switched by cmd/recipe.")
    recipe: str | None = Field(None, description="The recipe served at start; default: none (the config as it is).")
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig)
    modbus: ModbusConfig = Field(default_factory=ModbusConfig)

    @property
    def web(self) -> HttpConfig:
        """The web front's settings: `http`, or a config's old `metrics` section (see `deprecations`)."""
        if "metrics" in self.model_fields_set and "http" not in self.model_fields_set:
            m = self.metrics
            return HttpConfig(enabled=m.enabled, bind=m.bind, port=m.port, stale_after_s=m.stale_after_s)
        return self.http

    @property
    def deprecations(self) -> list[str]:
        out = []
        if "metrics" in self.model_fields_set:
            out.append("metrics: is deprecated, rename the section to http (same keys: enabled, bind, port, "
                       "stale_after_s)" + (" (ignored: http is set)" if "http" in self.model_fields_set else ""))
        return out

    @property
    def results_db(self) -> Path:
        return self.results.db or Path(self.spool.dir) / "results.db"

    @property
    def evidence_dir(self) -> Path:
        return self.evidence.dir or Path(self.spool.dir) / "evidence"

    @model_validator(mode="after")
    def _names_resolve(self):
        cams = {c.name: c for c in self.cameras}
        for key in list(self.models) + [k for r in self.recipes.values() for k in r.models]:
            if not re.match(NAME_PATTERN, key):
                raise ValueError(f"model name {key!r}: expected letters, digits, _ . - (at most 64)")
        for name in self.recipes:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"recipe name {name!r}: expected letters, digits, _ . - (at most 64)")
        for cam in self.cameras:
            for roi in cam.rois or []:
                if roi.model is not None and roi.model not in self.models:
                    raise ValueError(f"cameras[{cam.name}].rois[{roi.name}].model: {roi.model!r} is not a key of "
                                     f"models ({', '.join(sorted(self.models)) or 'none defined'})")
        for rname, recipe in self.recipes.items():
            known = {**self.models, **recipe.models}
            for cname, rc in recipe.cameras.items():
                if cname not in cams:
                    raise ValueError(f"recipes.{rname}.cameras: {cname!r} is not a camera "
                                     f"(expected one of {', '.join(cams)})")
                for roi in rc.rois:
                    if roi.model is not None and roi.model not in known:
                        raise ValueError(f"recipes.{rname}.cameras.{cname}.rois[{roi.name}].model: {roi.model!r} "
                                         f"is not a model of the recipe or of models")
        stations = [c.name for c in self.cameras if c.mode == "triggered"]
        for door in ("opcua", "modbus"):
            if getattr(self, door).enabled and not stations:
                raise ValueError(f"{door} is enabled but no camera has mode: triggered; expected a station for it")
        for name in self.modbus.stations:
            if name not in stations:
                raise ValueError(f"modbus.stations: {name!r} is not a triggered camera "
                                 f"(expected one of: {', '.join(stations) or 'none'})")
        bases = sorted((st.base, st.unit, name) for name, st in self.modbus.stations.items())
        for (b1, u1, n1), (b2, u2, n2) in zip(bases, bases[1:]):
            if u1 == u2 and b2 < b1 + MODBUS_BLOCK:
                raise ValueError(f"modbus.stations: {n1} (base {b1}) and {n2} (base {b2}) overlap on unit {u1}; "
                                 f"expected bases at least {MODBUS_BLOCK} apart")
        if self.recipe is not None and self.recipe not in self.recipes:
            raise ValueError(f"recipe: {self.recipe!r} is not a key of recipes "
                             f"({', '.join(sorted(self.recipes)) or 'none defined'})")
        return self

    @model_validator(mode="after")
    def _unique_cameras(self):
        names = [c.name for c in self.cameras]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"camera names must be unique, repeated: {', '.join(dup)}")
        return self


def _expand(value: Any, path: str, env: dict[str, str], errors: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", env, errors) for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set (expected it to hold this value)")
            return ""
        return _PLACEHOLDER.sub(sub, value)
    return value


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("literal[", "function-")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _shown(value: Any, loc: tuple) -> str:
    if any(str(p) in ("password", "source", "users") for p in loc):
        return "<redacted>" if any(str(p) in ("password", "users") for p in loc) else redact_url(str(value))
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _values_exceed(raw: Any, limit: int) -> bool:
    """Count values the way `_expand` visits them (aliases count each time), stopping at the limit."""
    stack, seen = [raw], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def parse_config(raw: Any, env: dict[str, str] | None = None, source: str = "config") -> Config:
    env = dict(os.environ) if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}"])
    if _values_exceed(raw, MAX_CONFIG_VALUES):
        raise ConfigError([f"{source}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded "
                           "(an alias bomb?); expected a config of ordinary size"])
    errors: list[str] = []
    expanded = _expand(raw, "", env, errors)
    try:
        cfg = Config.model_validate(expanded)
    except ValidationError as exc:
        for e in exc.errors():
            loc = _loc(e["loc"])
            if e["type"] == "missing":
                errors.append(f"{loc}: required key is missing")
            elif e["type"] == "extra_forbidden":
                # no value shown: a misspelt `pasword:` must not print the password
                errors.append(f"{loc}: unknown key; check the spelling")
            elif isinstance(e.get("input"), dict):
                # a section is never shown (it may hold a password or a camera URL with one); a rule across it
                # (or the whole config) names its keys in its message
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] != "value_error":
                    errors.append(f"{loc}: got a mapping, expected: {msg}")
                else:
                    errors.append(msg if not e["loc"] else f"{loc}: {msg}")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                errors.append(f"{loc}: got {_shown(e.get('input'), e['loc'])}, expected: {msg}")
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise ConfigError([f"{p}: not a regular file; expected a YAML config file"])
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{p}: {st.st_size} bytes; expected a config file of at most {MAX_CONFIG_BYTES} bytes"])
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found"]) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise ConfigError([f"{p}: cannot read config ({exc.__class__.__name__}: {why})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{p}:{where}: invalid YAML ({problem})"]) from None
    except RecursionError:
        raise ConfigError([f"{p}: invalid YAML (nested too deeply); expected a config of ordinary shape"]) from None
    return parse_config(raw, env=env, source=str(p))


def check_files(cfg: Config) -> list[str]:
    """Problems only visible on disk (missing checkpoint, TLS files)."""
    problems = []
    if not cfg.model.checkpoint.exists():
        problems.append(f"model.checkpoint: got '{cfg.model.checkpoint}', expected an existing checkpoint file")
    for key, named in cfg.models.items():
        if not named.checkpoint.exists():
            problems.append(f"models.{key}.checkpoint: got '{named.checkpoint}', expected an existing checkpoint file")
    for rname, recipe in cfg.recipes.items():
        paths = [("model", recipe.model)] + [(f"models.{k}.checkpoint", m.checkpoint) for k, m in recipe.models.items()]
        for key, path in paths:
            if path is not None and not path.exists():
                problems.append(f"recipes.{rname}.{key}: got '{path}', expected an existing checkpoint file")
    if cfg.opcua.enabled:
        for key in ("cert", "key", "trusted_clients"):
            f = getattr(cfg.opcua, key)
            if f is not None and not f.exists():
                problems.append(f"opcua.{key}: got '{f}', expected an existing "
                                f"{'folder' if key == 'trusted_clients' else 'file'}")
    if cfg.model.shadow is not None and not cfg.model.shadow.exists():
        problems.append(f"model.shadow: got '{cfg.model.shadow}', expected an existing checkpoint file")
    if cfg.mqtt.tls:
        for key in ("ca", "cert", "key"):
            f = getattr(cfg.mqtt.tls, key)
            if f is not None and not f.is_file():
                problems.append(f"mqtt.tls.{key}: got '{f}', expected a readable file")
    return problems
