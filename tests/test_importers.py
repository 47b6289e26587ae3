"""Each importer on small files written in the real format, and malformed ones that must leave nothing behind."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from shapes import draw_shape
from visiond.data.importers import FASHION_MNIST_CLASSES, import_dataset
from visiond.data.manifest import check_images, load_image, read_manifest
from visiond.errors import UserError

RNG = np.random.default_rng(7)


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".import-" in p.name]


def assert_nothing_written(dataset_dir: Path, before: dict | None = None):
    """The dataset is absent (or byte-for-byte as before) and no staging directory remains."""
    if before is None:
        assert not dataset_dir.exists()
    else:
        assert _snapshot(dataset_dir) == before
    assert not _leftovers(dataset_dir.parent)


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- writers for the real formats -------------------------------------------------------


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    img_bytes = struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes()
    lbl_bytes = struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()
    for kind, data in (("images-idx3", img_bytes), ("labels-idx1", lbl_bytes)):
        name = directory / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        name.write_bytes(gzip.compress(data) if gz else data)


def write_cifar(directory: Path, name: str, labels: list[int], names: list[str] | None = None) -> np.ndarray:
    directory.mkdir(parents=True, exist_ok=True)
    planes = RNG.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = b"".join(bytes([lbl]) + planes[i].tobytes() for i, lbl in enumerate(labels))
    (directory / name).write_bytes(records)
    if names:
        (directory / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return planes


VOC_XML = """<annotation>
  <folder>JPEGImages</folder><filename>{filename}</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>0</difficult>
  <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def write_voc(root: Path, filename: str, boxes: list[tuple], image: bool = True) -> None:
    if image:
        _png(root / "JPEGImages" / filename, RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    objects = "".join(VOC_OBJECT.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, a, b, c, d in boxes)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    xml = VOC_XML.format(filename=filename, objects=objects)
    (root / "Annotations" / (Path(filename).stem + ".xml")).write_text(xml)


def write_yolo(root: Path, rel_image: str, lines: list[str], classes=("ok", "scratch")) -> None:
    _png(root / rel_image, RNG.integers(0, 256, (50, 100, 3), dtype=np.uint8))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    txt = root / Path(rel_image.replace("images/", "labels/", 1)).with_suffix(".txt")
    txt.parent.mkdir(parents=True, exist_ok=True)
    txt.write_text("\n".join(lines) + "\n")


def write_folder(root: Path, per_class: int = 3) -> None:
    for kind in ("circle", "square"):
        for i in range(per_class):
            _png(root / kind / f"{i}.png", draw_shape(kind, 24, RNG))


# --- idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_imports_train_and_t10k_with_digit_names(tmp_path, gz):
    # given MNIST-style IDX files (gzipped or plain) with 5 train and 3 test images
    images = RNG.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9, 4, 5, 9])
    write_idx(tmp_path / "mnist", "train", images[:5], labels[:5], gz)
    write_idx(tmp_path / "mnist", "t10k", images[5:], labels[5:], gz)
    # when imported
    report = import_dataset("idx", tmp_path / "mnist", tmp_path / "ds", progress=False)
    # then every image is there with its digit name, split from its file, pixels exact
    samples = read_manifest(tmp_path / "ds")
    assert report.imported == 8 and report.per_split == {"test": 3, "train": 5}
    assert [s.label for s in samples] == ["0", "1", "2", "3", "9", "4", "5", "9"]
    assert [s.split for s in samples] == ["train"] * 5 + ["test"] * 3
    assert np.array_equal(load_image(tmp_path / "ds", samples[6]), images[6])
    assert samples[0].source.startswith("idx:train-images-idx3-ubyte")


def test_idx_in_a_fashion_directory_gets_the_fashion_names(tmp_path):
    write_idx(tmp_path / "fashion-mnist", "train", np.zeros((2, 28, 28), np.uint8) + [[[1]], [[2]]],
              np.array([0, 9]), gz=True)
    import_dataset("idx", tmp_path / "fashion-mnist", tmp_path / "ds", progress=False)
    assert [s.label for s in read_manifest(tmp_path / "ds")] == [FASHION_MNIST_CLASSES[0], FASHION_MNIST_CLASSES[9]]


@pytest.mark.parametrize("corrupt, expected", [
    (lambda d: (d / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0801, 2, 28, 28) + bytes(1568)),
     "magic 0x00000801; expected 0x00000803"),
    (lambda d: (d / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, 3, 28, 28) + bytes(1568)),
     "header says 3 images of 28x28"),
    (lambda d: (d / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 3) + bytes(3)),
     "3 labels for 2 images"),
    (lambda d: (d / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 2) + bytes([1, 12])),
     "label 12 but only 10 class names"),
    (lambda d: (d / "train-labels-idx1-ubyte").unlink(), "images and labels must come together"),
])
def test_malformed_idx_is_a_clear_error_and_writes_nothing(tmp_path, corrupt, expected):
    # given valid plain IDX files, then one thing broken
    src = tmp_path / "mnist"
    write_idx(src, "train", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]), gz=False)
    corrupt(src)
    # when imported, then a one-line error says what was expected and no dataset appears
    with pytest.raises(UserError, match=expected) as info:
        import_dataset("idx", src, tmp_path / "ds", progress=False)
    assert "\n" not in str(info.value)
    assert_nothing_written(tmp_path / "ds")


def test_truncated_gzip_is_a_clear_error(tmp_path):
    src = tmp_path / "mnist"
    write_idx(src, "train", np.zeros((2, 28, 28), np.uint8), np.array([1, 2]), gz=True)
    gz = src / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read"):
        import_dataset("idx", src, tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds")


# --- cifar10 ----------------------------------------------------------------------------


def test_cifar10_binary_records_become_bgr_images(tmp_path):
    # given two binary batches with class names from batches.meta.txt
    src = tmp_path / "cifar-10-batches-bin"
    names = ["airplane", "automobile", "bird"]
    planes = write_cifar(src, "data_batch_1.bin", [0, 2, 1], names)
    write_cifar(src, "test_batch.bin", [1])
    # when imported
    import_dataset("cifar10", tmp_path, tmp_path / "ds", progress=False)
    samples = read_manifest(tmp_path / "ds")
    # then labels, splits and pixels (RGB planes -> BGR file) are right
    assert [(s.label, s.split) for s in samples] == [("airplane", "train"), ("bird", "train"),
                                                     ("automobile", "train"), ("automobile", "test")]
    img = load_image(tmp_path / "ds", samples[1])
    assert img.shape == (32, 32, 3)
    assert np.array_equal(img[:, :, 2], planes[1][0]) and np.array_equal(img[:, :, 0], planes[1][2])


def test_cifar10_with_a_partial_record_writes_nothing(tmp_path):
    src = tmp_path / "cifar"
    write_cifar(src, "data_batch_1.bin", [0, 1])
    with open(src / "data_batch_1.bin", "ab") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(UserError, match=r"data_batch_1\.bin: 6246 bytes; expected a multiple of 3073"):
        import_dataset("cifar10", src, tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds")


def test_cifar10_pickles_are_not_accepted(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="binary version"):
        import_dataset("cifar10", tmp_path / "cifar-10-batches-py", tmp_path / "ds", progress=False)


# --- voc and yolo: each box becomes a crop ------------------------------------------------


def test_voc_boxes_become_crops_and_a_missing_image_is_skipped(tmp_path):
    # given two annotated images (one with two boxes) and an annotation whose image is missing
    src = tmp_path / "voc"
    write_voc(src, "a.png", [("scratch", 11, 11, 30, 20), ("ok", 1, 1, 64, 48)])
    write_voc(src, "b.png", [("ok", 5.5, 6.5, 20.2, 40.9)])  # CVAT writes floats
    write_voc(src, "gone.png", [("ok", 1, 1, 10, 10)], image=False)
    # when imported
    report = import_dataset("voc", src, tmp_path / "ds", progress=False)
    samples = read_manifest(tmp_path / "ds")
    # then each box is a sample of its class with the crop's size, and the missing image is reported
    assert report.per_class == {"ok": 2, "scratch": 1}
    assert [r for r, _ in report.skipped] == ["voc:Annotations/gone.xml"]
    scratch = next(s for s in samples if s.label == "scratch")
    assert load_image(tmp_path / "ds", scratch).shape[:2] == (10, 20)
    assert scratch.extra["image"] == "Annotations/a.xml" and scratch.extra["box"] == "10,10,30,20"


@pytest.mark.parametrize("xml, expected", [
    ("<annotation><filename>a.png</filename><object><name>ok</name></object></annotation>",
     "object 0: expected <name> and <bndbox>"),
    ("<annotation><filename>a.png</filename><object><name>ok</name><bndbox><xmin>x</xmin><ymin>1</ymin>"
     "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>", "numeric xmin"),
    ("<annotation><filename>a.png", "not valid XML"),
    ("<labels/>", "expected a Pascal VOC <annotation>"),
])
def test_malformed_voc_leaves_an_existing_dataset_unchanged(tmp_path, xml, expected):
    # given an existing dataset and a VOC folder with one good and one broken annotation
    write_folder(tmp_path / "folder")
    import_dataset("folder", tmp_path / "folder", tmp_path / "ds", progress=False)
    before = _snapshot(tmp_path / "ds")
    src = tmp_path / "voc"
    write_voc(src, "a.png", [("ok", 1, 1, 10, 10)])
    (src / "Annotations" / "z.xml").write_text(xml)
    # when imported into it, then the error names the file and the dataset is as before
    with pytest.raises(UserError, match=r"z\.xml: .*" + re.escape(expected)):
        import_dataset("voc", src, tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds", before)


def test_yolo_boxes_become_crops_with_split_from_the_folder(tmp_path):
    # given an ultralytics layout: images/train, labels/train, classes.txt
    src = tmp_path / "yolo"
    write_yolo(src, "images/train/p1.png", ["1 0.5 0.5 0.2 0.4", "0 0.25 0.5 0.5 1.0"])
    write_yolo(src, "images/val/p2.png", ["0 0.5 0.5 1 1", ""])
    # when imported
    report = import_dataset("yolo", src, tmp_path / "ds", progress=False)
    samples = read_manifest(tmp_path / "ds")
    # then normalised boxes became pixel crops of the 100x50 images, split from the folder
    assert report.per_class == {"ok": 2, "scratch": 1}
    scratch = next(s for s in samples if s.label == "scratch")
    assert load_image(tmp_path / "ds", scratch).shape[:2] == (20, 20) and scratch.split == "train"
    assert {s.split for s in samples if s.label == "ok"} == {"train", "val"}


@pytest.mark.parametrize("line, expected", [
    ("2 0.5 0.5 0.1 0.1", "class 0..1"), ("0 0.5 0.5 0.1", "class cx cy w h"), ("0 50 50 10 10", "normalised"),
])
def test_malformed_yolo_line_names_file_and_line(tmp_path, line, expected):
    src = tmp_path / "yolo"
    write_yolo(src, "images/a.png", ["0 0.5 0.5 0.1 0.1"])
    write_yolo(src, "images/b.png", ["0 0.5 0.5 0.1 0.1", line])
    with pytest.raises(UserError, match=rf"labels/b\.txt:2: .*{expected}"):
        import_dataset("yolo", src, tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds")


def test_yolo_without_class_names_is_a_clear_error(tmp_path):
    src = tmp_path / "yolo"
    write_yolo(src, "images/a.png", ["0 0.5 0.5 0.1 0.1"])
    (src / "classes.txt").unlink()
    with pytest.raises(UserError, match="classes.txt, obj.names"):
        import_dataset("yolo", src, tmp_path / "ds", progress=False)


# --- folder, csv, json ------------------------------------------------------------------


def test_folder_import_skips_a_corrupt_file_and_keeps_the_rest(tmp_path):
    # given class folders with one truncated PNG and a stray text file
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "circle" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (tmp_path / "src" / "circle" / "notes.txt").write_text("not an image")
    # when imported
    report = import_dataset("folder", tmp_path / "src", tmp_path / "ds", progress=False)
    # then the corrupt one is reported, the others are stored unchanged and check out
    assert report.per_class == {"circle": 3, "square": 3}
    assert report.skipped == [("folder:circle/bad.png", "not a decodable image")]
    samples = read_manifest(tmp_path / "ds")
    ok, corrupt, dups = check_images(tmp_path / "ds", samples)
    assert len(ok) == 6 and not corrupt and not dups


def test_second_import_adds_to_the_dataset_without_duplicating(tmp_path):
    write_folder(tmp_path / "src")
    import_dataset("folder", tmp_path / "src", tmp_path / "ds", progress=False)
    _png(tmp_path / "src" / "triangle" / "0.png", draw_shape("triangle", 24, RNG))
    report = import_dataset("folder", tmp_path / "src", tmp_path / "ds", progress=False)
    assert report.imported == 1 and report.duplicates == 6
    assert len(read_manifest(tmp_path / "ds")) == 7


def test_csv_paths_are_relative_to_the_file_and_extra_columns_are_kept(tmp_path):
    # given a CSV with path, label, split and a session column, one row pointing at a missing file
    write_folder(tmp_path / "pics", per_class=2)
    (tmp_path / "pics" / "list.csv").write_text(
        "path,label,split,session\ncircle/0.png,round,train,s1\nsquare/1.png,box,,s2\nsquare/9.png,box,,s2\n")
    # when imported
    report = import_dataset("csv", tmp_path / "pics" / "list.csv", tmp_path / "ds", progress=False)
    samples = read_manifest(tmp_path / "ds")
    # then labels come from the CSV, metadata is kept, the missing file is skipped
    assert [(s.label, s.split, s.extra["session"]) for s in samples] == [("round", "train", "s1"), ("box", "", "s2")]
    assert len(report.skipped) == 1 and "unreadable" in report.skipped[0][1]


@pytest.mark.parametrize("text, expected", [
    ("file_name,kind\na.png,x\n", "expected fields path and label"),
    ("path,label\ncircle/0.png,round\ncircle/1.png\n", r"list\.csv:3: field count"),
    ("path,label\ncircle/0.png,round\n,round\n", r"list\.csv:3: expected a non-empty path and label"),
    ("path,label,split\ncircle/0.png,round,training\n", "split 'training'"),
])
def test_malformed_csv_names_the_line(tmp_path, text, expected):
    write_folder(tmp_path / "pics", per_class=2)
    (tmp_path / "pics" / "list.csv").write_text(text)
    with pytest.raises(UserError, match=expected):
        import_dataset("csv", tmp_path / "pics" / "list.csv", tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds")


def test_json_list_and_mapping_forms(tmp_path):
    write_folder(tmp_path / "pics", per_class=1)
    (tmp_path / "pics" / "a.json").write_text(json.dumps([{"path": "circle/0.png", "label": "round", "line": 3}]))
    (tmp_path / "pics" / "b.json").write_text(json.dumps({"square/0.png": "box"}))
    import_dataset("json", tmp_path / "pics" / "a.json", tmp_path / "ds", progress=False)
    import_dataset("json", tmp_path / "pics" / "b.json", tmp_path / "ds", progress=False)
    samples = read_manifest(tmp_path / "ds")
    assert [(s.label, s.extra.get("line")) for s in samples] == [("round", "3"), ("box", "")]


@pytest.mark.parametrize("text, expected", [
    ('[{"path": "circle/0.png", "label": "round"},', r"b\.json:1: invalid JSON"),
    ('[{"path": "circle/0.png"}]', r"entry 0: expected fields path and label"),
    ('"just a string"', "expected a list"),
])
def test_malformed_json_is_a_clear_error(tmp_path, text, expected):
    write_folder(tmp_path / "pics", per_class=1)
    (tmp_path / "pics" / "b.json").write_text(text)
    with pytest.raises(UserError, match=expected):
        import_dataset("json", tmp_path / "pics" / "b.json", tmp_path / "ds", progress=False)
    assert_nothing_written(tmp_path / "ds")


def test_unknown_format_and_non_dataset_target(tmp_path):
    with pytest.raises(UserError, match="expected one of folder, csv, json, idx, cifar10, voc, yolo"):
        import_dataset("coco", tmp_path, tmp_path / "ds", progress=False)
    write_folder(tmp_path / "src")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and has no manifest.csv"):
        import_dataset("folder", tmp_path / "src", tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
