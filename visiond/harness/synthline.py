"""Synthetic production line: a conveyor carrying parts under a camera, with ground truth.

Tests and demos need realistic-looking line footage whose labels are known exactly,
without downloading anything. The scene is a textured grey belt under a slight
lighting gradient; light metal discs and rounded rectangles ride it left to right
at constant speed. Each part is ``ok``, ``scratch`` (a thin dark line or arc) or
``spot`` (a dark round blotch).

Label rule (the ground truth of a frame): the camera's region of interest (ROI) is
``default_roi(width, height)``, a centred square (160, 80, 320, 320) at 640x480.
A frame is labelled with a part's class when that part lies *whole* inside the ROI
horizontally, i.e. ``roi_x <= cx - half_w`` and ``cx + half_w <= roi_x + roi_w``
(equivalently ``|cx - roi_cx| <= roi_w / 2 - half_w``); parts are always whole inside
it vertically. Otherwise the frame is ``empty``: bare belt, or parts cut by the ROI
border. Parts are spaced so that a whole part never shares the ROI with another,
and phased so that at every frame a part's edge is at least ``speed / 2`` pixels
(8 px at 640x480) from the ROI border: the rule is visible in the ROI crop alone.

Files: ``render_video`` writes an H.264 mp4 (yuv420p, GOP 30, no B-frames) and the
truth file beside it (the video's full name plus ``.truth.csv``) with columns
``frame,label``, one row per frame in decode order from 0. ``render_images`` writes
``OUT_DIR/<label>/<label>_<i>.png``: ROI crops of rendered frames whose truth is
``<label>``, exactly what the daemon sees after its ROI crop. ``tools/synthline.py``
is the command line for both; ``visiond bench`` renders its default video with it.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("empty", "ok", "scratch", "spot")
PART_KINDS = CLASSES[1:]
TRUTH_SUFFIX = ".truth.csv"
_NOISE_BANK = 8


def default_roi(width: int = 640, height: int = 480) -> tuple[int, int, int, int]:
    """The centred square the camera inspects, as (x, y, w, h): 2/3 of the short side."""
    side = min(width, height) * 2 // 3 // 16 * 16
    if side < 64:
        raise ValueError(f"frame {width}x{height} is too small for a synthetic line")
    return (width - side) // 2, (height - side) // 2, side, side


def truth_path(video_path: str | Path) -> Path:
    """Where the ground truth of a video lives: the video's name plus ``.truth.csv``."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name + TRUTH_SUFFIX)


def read_truth(csv_path: str | Path) -> list[str]:
    """Labels by frame index from a truth CSV; refuses gaps so frames and labels stay aligned."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for index, row in enumerate(rows):
        if int(row["frame"]) != index or row["label"] not in CLASSES:
            raise ValueError(f"{csv_path}: bad row {index}: {row}")
    return [row["label"] for row in rows]


def crop(frame: np.ndarray, roi: tuple[int, int, int, int]) -> np.ndarray:
    """The ROI of a frame, as the daemon cuts it."""
    x, y, w, h = roi
    return frame[y : y + h, x : x + w]


@dataclass(frozen=True)
class Part:
    """One part on the belt; its centre is at ``x0 + speed * t`` in frame t."""

    kind: str
    x0: int
    cy: int
    half_w: int
    half_h: int
    disc: bool
    seed: int


class SyntheticLine:
    """A deterministic conveyor scene: ``frame(t)`` and ``label(t)`` for any frame index."""

    def __init__(self, seed: int, width: int = 640, height: int = 480, frames: int = 600):
        if width % 2 or height % 2:
            raise ValueError("width and height must be even (H.264 yuv420p)")
        self.seed, self.width, self.height, self.frames = seed, width, height, frames
        self.roi = default_roi(width, height)
        side = self.roi[2]
        self.speed = 2 * max(1, round(side / 40))  # even, 16 px/frame at 640x480
        self.scale = side / 320
        self._sprites: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        rng = np.random.default_rng([seed, 1])
        self._belt = _render_belt(rng, width, height, self.roi, self.scale)
        self._gain = _render_gain(rng, width, height)
        self._noise = [rng.normal(0, 2.5, (height, width, 3)).astype(np.int16) for _ in range(_NOISE_BANK)]
        self.parts = self._place_parts(np.random.default_rng([seed, 2]))

    def _half_widths(self) -> list[int]:
        """Part sizes whose edges stay speed/2 away from the ROI border at every frame."""
        side, v = self.roi[2], self.speed
        return [hw for hw in range(int(0.17 * side), int(0.25 * side) + 1) if (side - 2 * hw) % v == 0]

    def _place_parts(self, rng: np.random.Generator) -> list[Part]:
        """Parts from right to left, spaced so that a whole part is alone in the ROI."""
        roi_x, roi_y, side, _ = self.roi
        sizes, v = self._half_widths(), self.speed
        parts: list[Part] = []
        x0, prev_hw = roi_x, None  # the first part is entering the ROI at frame 0
        while not parts or parts[-1].x0 + v * (self.frames - 1) > -side:
            kinds = rng.permutation(PART_KINDS)  # shuffled blocks keep the classes balanced
            for kind in kinds:
                hw = int(rng.choice(sizes))
                if prev_hw is not None:
                    x0 -= side + abs(hw - prev_hw) + int(rng.integers(0, side // 8 + 1))
                x0 -= (x0 - hw - roi_x - v // 2) % v  # phase: edges never near the ROI border
                jitter = int(round(10 * self.scale))
                cy = roi_y + side // 2 + int(rng.integers(-jitter, jitter + 1))
                disc = bool(rng.random() < 0.5)
                hh = hw if disc else int(hw * rng.uniform(0.65, 1.0))
                parts.append(Part(str(kind), x0, cy, hw, hh, disc, int(rng.integers(2**31))))
                prev_hw = hw
        return parts

    def part_at(self, t: int) -> int | None:
        """Index of the part lying whole inside the ROI in frame t, if any (at most one can)."""
        roi_x, _, side, _ = self.roi
        for index, part in enumerate(self.parts):
            cx = part.x0 + self.speed * t
            if roi_x <= cx - part.half_w and cx + part.half_w <= roi_x + side:
                return index
        return None

    def label(self, t: int) -> str:
        """The ground truth of frame t (see the module docstring for the rule)."""
        index = self.part_at(t)
        return "empty" if index is None else self.parts[index].kind

    def labels(self, n: int | None = None) -> list[str]:
        return [self.label(t) for t in range(self.frames if n is None else n)]

    def frame(self, t: int) -> np.ndarray:
        """Frame t as a BGR uint8 image: belt, parts, lighting, sensor noise."""
        period = self._belt.shape[1] - self.width
        start = period - (self.speed * t) % period  # the belt moves right with the parts
        frame = self._belt[:, start : start + self.width].copy()
        for index, part in enumerate(self.parts):
            cx = part.x0 + self.speed * t
            if -2 * part.half_w < cx < self.width + 2 * part.half_w:
                self._paste(frame, index, part, cx)
        frame = cv2.multiply(frame, self._gain, dtype=cv2.CV_8U)
        noise = self._noise[int(np.random.default_rng([self.seed, 3, t]).integers(_NOISE_BANK))]
        return cv2.add(frame, noise, dtype=cv2.CV_8U)

    def _paste(self, frame: np.ndarray, index: int, part: Part, cx: int) -> None:
        """Alpha-blend a part's cached sprite (premultiplied colour, alpha) into the frame."""
        if index not in self._sprites:
            self._sprites[index] = _render_sprite(part, self.scale)
        colour, alpha = self._sprites[index]
        h, w = alpha.shape
        x, y = cx - w // 2, part.cy - h // 2
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return
        region = frame[y0:y1, x0:x1].astype(np.float32)
        a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
        blended = region * (1 - a) + colour[y0 - y : y1 - y, x0 - x : x1 - x]
        frame[y0:y1, x0:x1] = np.clip(blended, 0, 255).astype(np.uint8)


def _render_belt(rng: np.random.Generator, width: int, height: int, roi, scale: float) -> np.ndarray:
    """A horizontally periodic belt strip (plus one frame width of wrap) with rails and seams."""
    period = 2 * width
    grey = rng.uniform(85, 110)
    coarse = np.pad(rng.normal(0, 1, (height, period)).astype(np.float32), ((0, 0), (64, 64)), mode="wrap")
    coarse = cv2.GaussianBlur(coarse, (0, 0), 12)[:, 64 : period + 64]  # wrapped: no seam
    coarse *= 6 / max(float(coarse.std()), 1e-6)
    belt = grey + coarse + rng.normal(0, 4, (height, period)).astype(np.float32)
    for x in rng.integers(0, period, 3):  # transverse seams show the belt moving
        belt[:, x : x + max(2, int(2 * scale))] -= 14
    for y in rng.integers(0, height, 6):  # longitudinal wear streaks
        belt[y, :] += rng.uniform(-8, 8)
    margin = int(24 * scale)
    top, bottom = max(roi[1] - margin, 0), min(roi[1] + roi[3] + margin, height)
    belt[:top], belt[bottom:] = 55, 55
    belt[max(top - 3, 0) : top], belt[bottom : bottom + 3] = 150, 150
    tint = np.array([1.03, 1.0, 0.97], np.float32)  # a slightly cool grey
    strip = np.clip(belt[:, :, None] * tint, 0, 255).astype(np.uint8)
    return np.concatenate([strip, strip[:, :width]], axis=1)


def _render_gain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Camera-fixed illumination: a linear gradient and a mild vignette."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xn, yn = xx / width - 0.5, yy / height - 0.5
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    gain = 1.02 + gx * xn + gy * yn - 0.25 * (xn**2 + yn**2)
    return np.repeat(gain[:, :, None], 3, axis=2).astype(np.float32)


def _render_sprite(part: Part, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A part's look, drawn once: metal body, bevel, optional engraving, defect, shadow."""
    rng = np.random.default_rng(part.seed)
    pad = int(16 * scale)
    h, w = 2 * (part.half_h + pad), 2 * (part.half_w + pad)
    centre = (w // 2, h // 2)
    mask = _shape_mask(part, (h, w), centre, (0, 0))
    body = _metal(rng, part, mask, (h, w))
    if rng.random() < 0.5:  # a light engraving: ok parts are not simply "uniform"
        ring = np.zeros((h, w), np.uint8)
        cv2.circle(ring, centre, int(part.half_w * rng.uniform(0.3, 0.6)), 255, 2, cv2.LINE_AA)
        body += (ring[:, :, None] / 255.0) * 25
    inner = cv2.erode(mask, np.ones((9, 9), np.uint8))
    if part.kind == "scratch":
        _draw_scratch(rng, body, inner, part, centre, scale)
    elif part.kind == "spot":
        _draw_spot(rng, body, inner, part, centre, scale)
    a_part = mask.astype(np.float32) / 255
    shadow = _shape_mask(part, (h, w), centre, (int(5 * scale), int(7 * scale)))
    a_shadow = cv2.GaussianBlur(shadow, (0, 0), 4).astype(np.float32) / 255 * 0.45
    alpha = a_part + a_shadow * (1 - a_part)
    colour = np.clip(body, 0, 255) * a_part[:, :, None]
    return colour.astype(np.float32), alpha.astype(np.float32)


def _shape_mask(part: Part, shape, centre, shift) -> np.ndarray:
    """An anti-aliased uint8 mask of the part's outline (disc or rounded rectangle)."""
    mask = np.zeros(shape, np.uint8)
    cx, cy = centre[0] + shift[0], centre[1] + shift[1]
    hw, hh = part.half_w, part.half_h
    if part.disc:
        cv2.circle(mask, (cx, cy), hw, 255, -1, cv2.LINE_AA)
        return mask
    r = max(4, int(min(hw, hh) * 0.35))
    cv2.rectangle(mask, (cx - hw + r, cy - hh), (cx + hw - r, cy + hh), 255, -1)
    cv2.rectangle(mask, (cx - hw, cy - hh + r), (cx + hw, cy + hh - r), 255, -1)
    for dx in (-hw + r, hw - r):
        for dy in (-hh + r, hh - r):
            cv2.circle(mask, (cx + dx, cy + dy), r, 255, -1, cv2.LINE_AA)
    return mask


def _metal(rng: np.random.Generator, part: Part, mask: np.ndarray, shape) -> np.ndarray:
    """Light brushed metal with a diagonal sheen and a darker bevel at the rim."""
    h, w = shape
    base = rng.uniform(170, 212)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sheen = 14 * ((w - xx) / w + (h - yy) / h - 1)
    brushed = cv2.GaussianBlur(rng.normal(0, 6, (h, w)).astype(np.float32), (15, 1), 0)
    body = base + sheen + brushed
    rim = cv2.subtract(mask, cv2.erode(mask, np.ones((5, 5), np.uint8)))
    body -= rim.astype(np.float32) / 255 * 40
    tint = np.array([1.0, 1.0, 1.01], np.float32)
    return body[:, :, None] * tint


def _darken(body: np.ndarray, defect: np.ndarray, inner: np.ndarray, value: float) -> None:
    """Paint a dark defect, kept inside the part's body."""
    a = (defect.astype(np.float32) / 255) * (inner.astype(np.float32) / 255)
    body *= 1 - a[:, :, None]
    body += a[:, :, None] * value


def _draw_scratch(rng, body, inner, part: Part, centre, scale: float) -> None:
    """A thin dark line or arc across the part, thick enough to survive a 5x downscale."""
    layer = np.zeros(inner.shape, np.uint8)
    thickness = int(round(rng.uniform(6, 9) * scale))
    hw = min(part.half_w, part.half_h)
    if rng.random() < 0.6:
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(1.1, 1.7) * hw
        off = rng.uniform(-0.25, 0.25, 2) * hw
        d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
        p0, p1 = np.array(centre) + off - d, np.array(centre) + off + d
        cv2.line(layer, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 255, thickness, cv2.LINE_AA)
    else:
        radius = rng.uniform(0.8, 1.6) * hw
        angle = rng.uniform(0, 2 * np.pi)
        u = np.array([np.cos(angle), np.sin(angle)])
        c = np.array(centre) + (radius - rng.uniform(0.1, 0.4) * hw) * u
        cv2.circle(layer, (int(c[0]), int(c[1])), int(radius), 255, thickness, cv2.LINE_AA)
    _darken(body, layer, inner, rng.uniform(35, 75))


def _draw_spot(rng, body, inner, part: Part, centre, scale: float) -> None:
    """A dark, soft-edged round blotch somewhere on the part."""
    layer = np.zeros(inner.shape, np.uint8)
    hw = min(part.half_w, part.half_h)
    axis = rng.uniform(10, 15) * scale
    axes = (int(axis), int(axis * rng.uniform(0.7, 1.0)))
    r, angle = rng.uniform(0, 0.5) * (hw - axis), rng.uniform(0, 2 * np.pi)
    c = (int(centre[0] + r * np.cos(angle)), int(centre[1] + r * np.sin(angle)))
    cv2.ellipse(layer, c, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    layer = cv2.GaussianBlur(layer, (5, 5), 0)
    _darken(body, layer, inner, rng.uniform(30, 70))


def render_video(path: str | Path, frames: int, seed: int, width: int = 640, height: int = 480, fps: int = 30,
                 on_frame: Callable[[], None] | None = None) -> Path:
    """Encode ``frames`` frames of the line to H.264 mp4 with ffmpeg; return the truth CSV path.

    ``on_frame`` is called after each frame is handed to ffmpeg, for a progress bar."""
    path = Path(path)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg not found on PATH: install the Debian package 'ffmpeg'")
    line = SyntheticLine(seed, width, height, frames)
    command = [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "-",
        "-an", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-bf", "0",
        "-movflags", "+faststart", str(path),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=errors)
        try:
            for t in range(frames):
                proc.stdin.write(memoryview(line.frame(t)))
                if on_frame is not None:
                    on_frame()
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg died; its exit code and message say why
        code = proc.wait()
        if code != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()
            raise RuntimeError(f"ffmpeg failed with exit code {code} writing {path}: {message}")
    return _write_truth(truth_path(path), line.labels())


def _write_truth(csv_path: Path, labels: list[str]) -> Path:
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "label"])
        writer.writerows(enumerate(labels))
    return csv_path


def render_images(
    out_dir: str | Path, per_class: int, seed: int, size: int | tuple[int, int] | None = None,
    on_image: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Write ``per_class`` ROI crops per class; ``size`` (int or (w, h)) resizes them (INTER_LINEAR).

    ``on_image`` is called after each crop is written, for a progress bar."""
    out_dir = Path(out_dir)
    line, picks = _pick_frames(per_class, seed)
    for label, frame_indices in picks.items():
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(frame_indices):
            image = crop(line.frame(t), line.roi)
            if size is not None:
                dsize = (size, size) if isinstance(size, int) else tuple(size)
                image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(str(out_dir / label / f"{label}_{i}.png"), image)
            if on_image is not None:
                on_image()
    return {label: len(frame_indices) for label, frame_indices in picks.items()}


def _pick_frames(per_class: int, seed: int) -> tuple[SyntheticLine, dict[str, list[int]]]:
    """Frame indices per class, at most 3 frames of any one part so the crops vary."""
    rng = np.random.default_rng([seed, 4])
    frames = max(600, per_class * 30)
    while True:
        line = SyntheticLine(seed, frames=frames)
        by_class: dict[str, list[int]] = {label: [] for label in CLASSES}
        by_part: dict[int, list[int]] = {}
        for t in range(frames):
            index = line.part_at(t)
            if index is None:
                by_class["empty"].append(t)
            else:
                by_part.setdefault(index, []).append(t)
        for index, indices in by_part.items():
            chosen = rng.choice(indices, min(3, len(indices)), replace=False)
            by_class[line.parts[index].kind].extend(chosen.tolist())
        if all(len(v) >= per_class for v in by_class.values()):
            return line, {k: sorted(rng.choice(v, per_class, replace=False).tolist()) for k, v in by_class.items()}
        frames *= 2
