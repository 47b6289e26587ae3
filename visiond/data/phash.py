"""Perceptual hashes (64-bit) and their Hamming distance, for near-duplicate suppression.

A line camera sees almost the same picture many times a second; storing each one
wastes labelling time. Two frames whose hashes differ in only a few bits look alike
to a person. `phash` (DCT of a 32x32 grey thumbnail) survives noise and small
brightness changes; `dhash` (gradient signs of a 9x8 thumbnail) is cheaper.
"""

from __future__ import annotations

import cv2
import numpy as np

_BITS = 64


def _grey(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        from visiond.preprocess import to_uint8

        image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image of shape {image.shape}: expected H x W (x 1|3|4) pixels")
    return image


def _pack(bits: np.ndarray) -> int:
    value = 0
    for b in bits.reshape(-1)[:_BITS]:
        value = (value << 1) | int(bool(b))
    return value


def phash(image: np.ndarray) -> int:
    """DCT hash: the 8x8 lowest frequencies of a 32x32 thumbnail against their median."""
    small = cv2.resize(_grey(image), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].reshape(-1)
    median = float(np.median(low[1:]))  # the DC term only says how bright the picture is
    return _pack(low > median)


def dhash(image: np.ndarray) -> int:
    """Difference hash: is each pixel of a 9x8 thumbnail brighter than its right neighbour."""
    small = cv2.resize(_grey(image), (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    return _pack(small[:, 1:] > small[:, :-1])


def to_hex(value: int) -> str:
    return f"{value & ((1 << _BITS) - 1):016x}"


def from_hex(text: str) -> int:
    text = text.strip().lower()
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"perceptual hash {text!r}: expected 16 hex digits")
    return int(text, 16)


def hamming(a: int | str, b: int | str) -> int:
    """Bits in which two hashes (ints or hex strings) differ: 0 = same look, 32 = unrelated."""
    a = from_hex(a) if isinstance(a, str) else a
    b = from_hex(b) if isinstance(b, str) else b
    return int(a ^ b).bit_count()


class NearDuplicateFilter:
    """Remembers the last `window` hashes; `seen` says whether a new one is within `max_bits` of any.

    `max_bits` < 0 turns the filter off. Not thread-safe: one owner (the capture loop or writer thread).
    """

    def __init__(self, max_bits: int, window: int = 64):
        self.max_bits, self.window = max_bits, max(1, window)
        self._recent: list[int] = []

    def seen(self, value: int) -> bool:
        if self.max_bits < 0:
            return False
        return any((value ^ h).bit_count() <= self.max_bits for h in self._recent)

    def add(self, value: int) -> None:
        self._recent.append(value)
        if len(self._recent) > self.window:
            del self._recent[0]
