"""The synthetic production line: video, truth, labelled crops, determinism."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools import synthline
from tools.synthline import CLASSES, SyntheticLine

ROOT = Path(__file__).resolve().parents[1]


def decoded_frames(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_video_has_exactly_one_truth_row_per_decoded_frame(synth_video):
    # given the session's 300-frame synthetic video
    # when OpenCV decodes it
    frames = decoded_frames(synth_video.path)
    # then it reads exactly 300 full-size frames, and the truth has one label for each
    assert len(frames) == 300
    assert {f.shape for f in frames} == {(480, 640, 3)}
    assert len(synth_video.truth) == 300
    assert synth_video.truth_path == synth_video.path.with_name(synth_video.path.name + ".truth.csv")


def test_video_shows_every_class_in_useful_amounts(synth_video):
    # given the truth of a 10-second video
    counts = Counter(synth_video.truth)
    # then every class is present, and each part class covers a good share of the frames
    assert set(counts) == set(CLASSES)
    for label in ("ok", "scratch", "spot"):
        assert counts[label] >= 0.08 * len(synth_video.truth), counts
    assert counts["empty"] <= 0.6 * len(synth_video.truth), counts


def test_the_default_roi_is_a_centred_square():
    assert synthline.default_roi(640, 480) == (160, 80, 320, 320)
    x, y, w, h = synthline.default_roi(1280, 720)
    assert w == h and x + w / 2 == 640 and y + h / 2 == 360


def test_a_labelled_frame_has_one_whole_part_in_the_roi_and_no_part_near_its_border():
    # given a line and its ROI
    line = SyntheticLine(seed=3, frames=600)
    roi_x, _, side, _ = line.roi
    for t in range(line.frames):
        # when we measure every part's clearance to the ROI's left and right borders
        clearances = []
        for part in line.parts:
            cx = part.x0 + line.speed * t
            clearances.append(min(cx - part.half_w - roi_x, roi_x + side - cx - part.half_w))
        whole = [i for i, c in enumerate(clearances) if c >= 0]
        # then at most one part is whole inside, the label is its kind, and no edge sits near the border
        assert len(whole) <= 1
        assert line.label(t) == (line.parts[whole[0]].kind if whole else "empty")
        assert all(abs(c) >= line.speed // 2 for c in clearances)


def test_same_seed_same_footage_and_other_seed_other_footage():
    a, b, c = SyntheticLine(seed=5), SyntheticLine(seed=5), SyntheticLine(seed=6)
    for t in (0, 17, 301):
        assert np.array_equal(a.frame(t), b.frame(t))
        assert not np.array_equal(a.frame(t), c.frame(t))
    assert a.labels() == b.labels() != c.labels()


def test_same_seed_same_video(tmp_path):
    # given two renders of the same seed
    truth_a = synthline.render_video(tmp_path / "a.mp4", 20, seed=9)
    truth_b = synthline.render_video(tmp_path / "b.mp4", 20, seed=9)
    # then truth and decoded frames are identical
    assert synthline.read_truth(truth_a) == synthline.read_truth(truth_b)
    frames_a, frames_b = decoded_frames(tmp_path / "a.mp4"), decoded_frames(tmp_path / "b.mp4")
    assert len(frames_a) == 20 and all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))


def test_images_hold_roi_crops_of_every_class(synth_images):
    for label in CLASSES:
        files = sorted((synth_images / label).glob(f"{label}_*.png"))
        assert len(files) == 80
        image = cv2.imread(str(files[0]))
        assert image.shape == (320, 320, 3)


def test_images_are_deterministic_by_seed_and_resizable(tmp_path):
    # given two image sets from the same seed and one resized
    counts = synthline.render_images(tmp_path / "a", 3, seed=4)
    synthline.render_images(tmp_path / "b", 3, seed=4)
    synthline.render_images(tmp_path / "small", 3, seed=4, size=64)
    # then they hold the same pictures, and size=64 resizes them
    assert counts == {label: 3 for label in CLASSES}
    for label in CLASSES:
        for i in range(3):
            name = f"{label}/{label}_{i}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
            assert cv2.imread(str(tmp_path / "small" / name)).shape == (64, 64, 3)


def test_image_crops_match_the_frames_they_were_cut_from():
    # given the frames the image generator picked for each class
    line, picks = synthline._pick_frames(5, seed=2)
    for label, frames in picks.items():
        # then every picked frame's ground truth is that class
        assert len(frames) == 5
        assert all(line.label(t) == label for t in frames)


def test_cli_writes_video_truth_and_images(tmp_path):
    # when the CLI renders a small non-default video and an image set
    script = str(ROOT / "tools" / "synthline.py")
    video = tmp_path / "cli.mp4"
    subprocess.run([sys.executable, script, "video", str(video), "--frames", "12", "--seed", "1",
                    "--width", "320", "--height", "240", "--fps", "15"], check=True, capture_output=True)
    subprocess.run([sys.executable, script, "images", str(tmp_path / "img"), "--per-class", "2", "--seed", "1"],
                   check=True, capture_output=True)
    # then the video has 12 frames of 320x240, a 12-row truth beside it, and 2 crops per class
    frames = decoded_frames(video)
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    assert len(synthline.read_truth(tmp_path / "cli.mp4.truth.csv")) == 12
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == sorted(CLASSES)
    assert len(list((tmp_path / "img").glob("*/*.png"))) == 8


def test_an_ffmpeg_failure_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg failed with exit code"):
        synthline.render_video(tmp_path / "missing_dir" / "x.mp4", 3, seed=1)


def test_read_truth_refuses_a_gap(tmp_path):
    csv_path = tmp_path / "gap.truth.csv"
    csv_path.write_text("frame,label\n0,ok\n2,ok\n")
    with pytest.raises(ValueError, match="bad row 1"):
        synthline.read_truth(csv_path)
