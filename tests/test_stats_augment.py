"""Dataset statistics, contact sheets and augmentation on a generated shapes dataset."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from shapes import draw_shape, make_shapes_dataset
from visiond.data.augment import PRESETS, AugmentConfig, augment_preview, build_augmentation
from visiond.data.manifest import Sample, add_image, read_manifest, write_manifest
from visiond.data.stats import contact_sheet, contact_sheet_images, dataset_stats
from visiond.errors import UserError
from visiond.preprocess import PreprocessSpec


@pytest.fixture
def shapes_dir(tmp_path):
    make_shapes_dataset(tmp_path / "ds", per_class=6, size=32, seed=1)
    return tmp_path / "ds"


def test_stats_count_classes_splits_sizes_and_problems(shapes_dir):
    # given a dataset with a split, one corrupt file, one duplicate and one larger image
    samples = read_manifest(shapes_dir)
    for i, s in enumerate(samples):
        s.split = ("train", "train", "train", "val", "test", "test")[i % 6]
    (shapes_dir / samples[0].path).write_bytes(b"GIF89a broken")
    dup = shapes_dir / "images/square/dup.png"
    dup.write_bytes((shapes_dir / samples[7].path).read_bytes())
    samples.append(Sample("images/square/dup.png", "square", "train"))
    samples.append(add_image(shapes_dir, np.zeros((40, 50, 3), np.uint8), "square", split="train"))
    write_manifest(shapes_dir, samples)
    # when the stats are computed
    stats = dataset_stats(shapes_dir, read_manifest(shapes_dir))
    # then the figures match what was made
    assert stats.total == 20 and stats.classes == ["circle", "square", "triangle"]
    assert stats.counts["square"] == {"train": 5, "val": 1, "test": 2}
    assert stats.counts["circle"] == {"train": 3, "val": 1, "test": 2}
    assert stats.sizes == {"min": [32, 32], "median": [32, 32], "max": [40, 50]}
    assert [c["path"] for c in stats.corrupt] == [samples[0].path]
    assert stats.corrupt[0]["reason"] == "sha256 differs from the manifest"
    assert sorted(stats.duplicates[0]) == sorted([samples[7].path, "images/square/dup.png"])
    assert any("corrupt" in w for w in stats.warnings) and any("duplicate" in w for w in stats.warnings)


def test_imbalance_and_missing_split_warnings(tmp_path):
    # given 30 circles and 5 squares, unsplit but for one test image
    samples = make_shapes_dataset(tmp_path, per_class=5, classes=("square",)) + \
        [add_image(tmp_path, draw_shape("circle", 32, np.random.default_rng(i)), "circle") for i in range(30)]
    samples[0].split = "test"
    stats = dataset_stats(tmp_path, samples)
    # then the imbalance and the empty splits are warned about
    assert any("imbalanced" in w and "'circle' has 30" in w and "'square' only 5" in w for w in stats.warnings)
    assert any(w.startswith("no images in split(s) train, val") for w in stats.warnings)


def _png_shape(path) -> tuple[int, int, int]:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable PNG"
    return img.shape


def test_contact_sheet_has_a_row_per_class(shapes_dir, tmp_path):
    out = contact_sheet(shapes_dir, read_manifest(shapes_dir), tmp_path / "sheet.png", per_class=4)
    h, w, _ = _png_shape(out)
    assert w == 4 * 96 and h == 3 * (96 + 16)


def test_contact_sheet_images_takes_any_image_kind(tmp_path):
    # given grey, BGR, BGRA and 16-bit images with captions (as evaluation passes misclassified ones)
    images = [(np.zeros((28, 28), np.uint8), "grey"), (np.zeros((10, 40, 3), np.uint8), "wide"),
              (np.zeros((50, 20, 4), np.uint8), "bgra"),
              (np.full((30, 30), 60000, np.uint16), "u16 with a long caption")]
    out = contact_sheet_images(images, tmp_path / "mis" / "sheet.png", columns=3, tile=64)
    assert _png_shape(out) == (2 * (64 + 16), 3 * 64, 3)
    with pytest.raises(UserError):
        contact_sheet_images([], tmp_path / "none.png")


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_augmentation_keeps_size_and_dtype_and_is_seeded(preset, color):
    # given a spec-sized uint8 image and a differently sized one
    spec = PreprocessSpec.for_color((40, 48), color)
    aug = build_augmentation(preset, spec)
    x = torch.randint(0, 256, (spec.channels, 40, 48), dtype=torch.uint8)
    # when augmented twice under the same seed
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    # then the output keeps the spec's size and uint8, and repeats exactly
    assert a.shape == (spec.channels, 40, 48) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert aug(torch.zeros((spec.channels, 64, 64), dtype=torch.uint8)).shape == (spec.channels, 40, 48)
    if preset == "none":
        assert torch.equal(a, x)


def test_augmentation_changes_the_image_and_bad_settings_are_user_errors():
    spec = PreprocessSpec.for_color(32)
    x = torch.from_numpy(draw_shape("triangle", 32, np.random.default_rng(0))).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    outs = [build_augmentation("heavy", spec)(x) for _ in range(4)]
    assert not all(torch.equal(o, x) for o in outs)
    with pytest.raises(UserError, match="expected one of none, safe, trivial, light, line, heavy"):
        build_augmentation("wild", spec)
    with pytest.raises(UserError, match="zoom"):
        AugmentConfig(zoom=(0.5, 1.5))
    assert AugmentConfig.from_dict(PRESETS["line"].to_dict()) == PRESETS["line"]


def test_augment_preview_grid(shapes_dir, tmp_path):
    # when a preview of 3 rows is drawn
    spec = PreprocessSpec.for_color(32, "gray")
    out = augment_preview(shapes_dir, tmp_path / "grid.png", "line", spec, n=3, seed=1)
    # then it is a PNG of 3 rows of original + 7 variants, and the same seed draws the same picture
    assert _png_shape(out) == (3 * (96 + 16), 8 * 96, 3)
    again = augment_preview(shapes_dir, tmp_path / "again.png", "line", spec, n=3, seed=1)
    assert out.read_bytes() == again.read_bytes()
