"""Which images a model was trained on, carried in its checkpoint by content.

`compare` refuses a test split holding some of them: after a reshuffle, or with a dataset
that shares files with the training one, the figures would measure memory. Each image is
the first 8 bytes of its sha256 (the manifest's, else the file's), sorted and base64'd into
the JSON metadata: 60,000 images cost 640 kB of header, and two different images match
by chance once in 2^64 pairs.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from visiond.data.manifest import Sample, sha256_file

DIGEST = "sha256[:8]"
DIGEST_BYTES = 8
META_KEY = "membership"


def sample_digest(root: Path, sample: Sample) -> bytes | None:
    """The image's digest: from the manifest's sha256, else from the file; None when it cannot be read."""
    if sample.sha256:
        return bytes.fromhex(sample.sha256[:2 * DIGEST_BYTES])
    try:
        return bytes.fromhex(sha256_file(Path(root) / sample.path)[:2 * DIGEST_BYTES])
    except OSError:
        return None


def _pack(digests) -> str:
    return base64.b64encode(b"".join(sorted({d for d in digests if d is not None}))).decode("ascii")


def membership_meta(root: Path, train: list[Sample], val: list[Sample]) -> dict:
    """The checkpoint's `membership` entry: the train and val images by digest (once per run: `DataSplits.membership`)."""
    return {"digest": DIGEST, "train": _pack(sample_digest(root, s) for s in train),
            "val": _pack(sample_digest(root, s) for s in val)}


def members(meta: dict, split: str = "train") -> set[bytes] | None:
    """The digests of a checkpoint's `split` images, or None when it does not say (older or altered file)."""
    entry = meta.get(META_KEY)
    if not isinstance(entry, dict) or entry.get("digest") != DIGEST or not isinstance(entry.get(split), str):
        return None
    try:
        raw = base64.b64decode(entry[split], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % DIGEST_BYTES:
        return None
    return {raw[i:i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)}
