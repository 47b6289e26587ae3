"""The manifest: round trip, clear errors for malformed files, atomic writes, image checks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from shapes import draw_shape, make_shapes_dataset
from visiond.data.manifest import (
    COLUMNS,
    Sample,
    add_image,
    check_images,
    classes_of,
    dataset_hash,
    load_image,
    read_manifest,
    write_manifest,
)
from visiond.errors import UserError

HEADER = ",".join(COLUMNS)


def test_round_trip_keeps_columns_and_metadata(tmp_path):
    # given samples with free metadata fields, some only on some rows
    samples = [Sample("images/a/1.png", "a", "train", "cam1", "2024-05-01T10:00:00Z", "0" * 64, {"session": "s1"}),
               Sample("images/b/2.png", "b", extra={"operator": "ann, \"quoted\""})]
    # when written and read back
    write_manifest(tmp_path, samples)
    back = read_manifest(tmp_path)
    # then every field survives, missing metadata reads as empty, and the core columns come first
    assert back[0] == Sample("images/a/1.png", "a", "train", "cam1", "2024-05-01T10:00:00Z", "0" * 64,
                             {"session": "s1", "operator": ""})
    assert back[1].extra == {"session": "", "operator": "ann, \"quoted\""}
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0] == HEADER + ",session,operator"
    assert not list(tmp_path.glob(".manifest.csv.*"))  # no temp file left behind


@pytest.mark.parametrize("body, expected", [
    ("path,label\nx.png,a\n", "manifest.csv:1: header"),
    (f"{HEADER}\nimages/a/1.png,a,train,,,\nimages/a/2.png,a,bogus,,,\n", "manifest.csv:3: split 'bogus'"),
    (f"{HEADER}\nimages/a/1.png,a,,,,\nimages/a/2.png,a,,\n", "manifest.csv:3: 4 fields, expected 6"),
    (f"{HEADER}\n../escape.png,a,,,,\n", "manifest.csv:2: path '../escape.png'"),
    (f"{HEADER}\nimages/a/1.png,,,,,\n", "manifest.csv:2: label ''"),
    (f"{HEADER}\nimages/a/1.png,a,,,yesterday,\n", "manifest.csv:2: captured_at 'yesterday'"),
    (f"{HEADER}\nimages/a/1.png,a,,,,abc\n", "manifest.csv:2: sha256 'abc'"),
])
def test_malformed_manifest_names_file_and_line(tmp_path, body, expected):
    # given a manifest with one thing wrong
    (tmp_path / "manifest.csv").write_text(body)
    # when read, then the error names the file, the line and what was expected
    with pytest.raises(UserError, match=re.escape(expected)) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        read_manifest(tmp_path)


def test_add_image_is_content_addressed(tmp_path):
    # given one image added twice and encoded bytes added once
    img = draw_shape("circle", 32, np.random.default_rng(0))
    a = add_image(tmp_path, img, "circle", "test")
    b = add_image(tmp_path, img, "circle", "test")
    c = add_image(tmp_path, (tmp_path / a.path).read_bytes(), "circle")
    # then one file holds it, named by its sha256, and it decodes to the same pixels
    assert a.path == b.path == c.path and a.path.startswith("images/circle/") and a.path.endswith(".png")
    assert len(list((tmp_path / "images/circle").iterdir())) == 1
    assert np.array_equal(load_image(tmp_path, a), img)


def test_add_image_rejects_a_label_that_is_not_a_name(tmp_path):
    with pytest.raises(UserError, match="label"):
        add_image(tmp_path, np.zeros((8, 8), np.uint8), "../up", "test")


def test_classes_and_hash_are_stable(tmp_path):
    # given a shapes dataset
    samples = make_shapes_dataset(tmp_path, per_class=4)
    # then classes are sorted, the hash ignores row order and changes with a label
    assert classes_of(samples) == ["circle", "square", "triangle"]
    assert dataset_hash(samples) == dataset_hash(list(reversed(samples)))
    changed = [Sample(s.path, "square" if i == 0 else s.label, s.split, s.source, s.captured_at, s.sha256)
               for i, s in enumerate(samples)]
    assert dataset_hash(changed) != dataset_hash(samples)


def test_check_images_finds_corrupt_missing_and_duplicates(tmp_path):
    # given a dataset, one file truncated, one deleted, one copied under a second name
    samples = make_shapes_dataset(tmp_path, per_class=3)
    (tmp_path / samples[0].path).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / samples[1].path).unlink()
    copy = tmp_path / "images/square/copy.png"
    copy.write_bytes((tmp_path / samples[3].path).read_bytes())
    samples.append(Sample("images/square/copy.png", "square"))
    # when checked
    ok, corrupt, duplicates = check_images(tmp_path, samples)
    # then each problem is found and the rest is fine
    assert {s.path for s, _ in corrupt} == {samples[0].path, samples[1].path}
    assert [sorted(s.path for s in g) for g in duplicates] == [sorted([samples[3].path, "images/square/copy.png"])]
    assert len(ok) == len(samples) - 2
