"""Synthetic production line on the command line: an H.264 video with its truth, or labelled crops.

The renderer lives in `visiond.harness.synthline` (its docstring has the label rule
and the file formats); this module re-exports what tests and tools use from it.

CLI::

    python tools/synthline.py video OUT.mp4 --frames N --seed S [--width 640 --height 480 --fps 30]
    python tools/synthline.py images OUT_DIR --per-class N --seed S [--size 64]

``video`` writes ``OUT.mp4`` and ``OUT.mp4.truth.csv``; ``images`` writes
``OUT_DIR/<label>/<label>_<i>.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visiond.harness.synthline import (  # noqa: F401 (re-exported for tests and tools)
    CLASSES,
    PART_KINDS,
    TRUTH_SUFFIX,
    Part,
    SyntheticLine,
    _pick_frames,
    crop,
    default_roi,
    read_truth,
    render_images,
    render_video,
    truth_path,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Synthetic production line footage with ground truth.")
    commands = parser.add_subparsers(dest="command", required=True)
    video = commands.add_parser("video", help="an H.264 mp4 and OUT.mp4.truth.csv")
    video.add_argument("out", type=Path)
    video.add_argument("--frames", type=int, required=True)
    video.add_argument("--seed", type=int, required=True)
    video.add_argument("--width", type=int, default=640)
    video.add_argument("--height", type=int, default=480)
    video.add_argument("--fps", type=int, default=30)
    images = commands.add_parser("images", help="labelled ROI crops in OUT_DIR/<label>/")
    images.add_argument("out_dir", type=Path)
    images.add_argument("--per-class", type=int, required=True)
    images.add_argument("--seed", type=int, required=True)
    images.add_argument("--size", type=int, default=None, help="resize crops to SIZE x SIZE")
    args = parser.parse_args(argv)
    try:
        if args.command == "video":
            csv_path = render_video(args.out, args.frames, args.seed, args.width, args.height, args.fps)
            sys.stdout.write(f"{args.out}\n{csv_path}\n")
        else:
            counts = render_images(args.out_dir, args.per_class, args.seed, args.size)
            sys.stdout.write(" ".join(f"{k}={v}" for k, v in counts.items()) + "\n")
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"synthline: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
