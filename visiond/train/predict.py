"""`visiond predict`: classify image files with the daemon's runtime, so prediction == serving.

Each image is decoded like a dataset image (OpenCV, IMREAD_UNCHANGED), resized by the
checkpoint's spec with the daemon's `resize_uint8`, and classified by `TorchClassifier`
(with the checkpoint's temperature, and `tta` as the daemon's `model.tta` does it).
An unreadable file becomes a row with an error, never a crash.
"""

from __future__ import annotations

import glob
from pathlib import Path

import cv2
import numpy as np

from visiond.data.augment import PRESETS
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint
from visiond.models.runtime import TorchClassifier
from visiond.models.tta import TTA_MODES, with_tta
from visiond.preprocess import resize_uint8
from visiond.video import image_file_problem, is_image_path


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, glob patterns expanded; in order, no repeats."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found.update((f, None) for f in sorted(p.rglob("*")) if f.is_file() and is_image_path(f))
        elif p.exists():
            found[p] = None
        elif glob.has_magic(pattern):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
            found.update((m, None) for m in matches if m.is_file())
        else:
            raise UserError(f"{pattern}: no such file, folder or matching glob")
    if not found:
        raise UserError(f"no image files in {' '.join(patterns)}")
    return list(found)


def load_resized(path: Path, spec) -> np.ndarray | str:
    """The model input for one file, or why it is not a readable image (one line)."""
    problem = image_file_problem(path)  # empty, truncated, or a decompression bomb: never decoded
    if problem is not None:
        return problem[1]
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return "unreadable image"
    try:
        return resize_uint8(img, spec)
    except (ValueError, cv2.error) as exc:
        return f"unusable image ({str(exc).splitlines()[0][:120]})"


def predict_paths(checkpoint: str | Path, patterns: list[str], *, top_k: int = 3, device: str = "cpu",
                  batch_size: int = 32, tta: str = "none") -> list[dict]:
    """One dict per file: path, label, score, top [{label, score}] — or path and error."""
    if tta not in TTA_MODES:
        raise UserError(f"--tta {tta!r}: expected one of {', '.join(TTA_MODES)}")
    ckpt = load_checkpoint(checkpoint)
    clf = with_tta(TorchClassifier(ckpt, device=device, precision="fp32", threads=0), tta, ckpt, PRESETS)
    k = max(1, min(top_k, len(clf.classes)))
    results: list[dict] = []
    paths = expand_paths(patterns)
    for start in range(0, len(paths), batch_size):
        chunk, pixels, rows = paths[start:start + batch_size], [], []
        for p in chunk:
            img = load_resized(p, clf.spec)
            if isinstance(img, str):
                rows.append({"path": str(p), "error": img})
            else:
                pixels.append(img)
                rows.append({"path": str(p)})
        probs = iter(clf.predict(np.stack(pixels)) if pixels else [])
        for row in rows:
            if "error" not in row:
                row.update(_top(next(probs), clf.classes, k))
            results.append(row)
    return results


def _top(p: np.ndarray, classes: tuple[str, ...], k: int) -> dict:
    order = np.argsort(-p, kind="stable")[:k]
    top = [{"label": classes[i], "score": round(float(p[i]), 6)} for i in order]
    return {"label": top[0]["label"], "score": top[0]["score"], "top": top}


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("path", "label", "score", "top-k")
    for r in results:
        if "error" in r:
            table.add_row(r["path"], "[red]error[/red]", "", r["error"])
        else:
            table.add_row(r["path"], r["label"], f"{r['score']:.4f}",
                          ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top"]))
    Console().print(table)
