"""`compare` refuses a split holding images a model trained on: the checkpoints list theirs by content."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from loop_helpers import visiond
from shapes import make_shapes_dataset
from visiond.data.manifest import Sample, read_manifest, sha256_file, write_manifest
from visiond.data.split import split_dataset
from visiond.errors import UserError
from visiond.models.checkpoint import load_checkpoint, save_checkpoint
from visiond.train.compare import compare_checkpoints
from visiond.train.loop import TrainOptions, train
from visiond.train.membership import META_KEY, members, membership_meta


def digest(path: Path) -> bytes:
    return bytes.fromhex(sha256_file(path)[:16])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Shapes split once 70/15/15, as `visiond dataset split` leaves them."""
    root = tmp_path_factory.mktemp("overlap") / "shapes"
    make_shapes_dataset(root, per_class=20, size=32, seed=5)
    write_manifest(root, split_dataset(read_manifest(root), seed=0))
    return root


@pytest.fixture(scope="module")
def models(dataset) -> tuple[Path, Path]:
    """(one-epoch smallcnn, knn baseline), both trained on the dataset's stable split."""
    cnn, knn = dataset.parent / "cnn.ckpt", dataset.parent / "knn.ckpt"
    base = dict(data=dataset, image_size=32, augment="none", progress=False)
    train(TrainOptions(out=cnn, arch="smallcnn", epochs=1, batch_size=16, **base))
    train(TrainOptions(out=knn, arch="knn", **base))
    return cnn, knn


@pytest.fixture
def reshuffled(dataset, tmp_path) -> Path:
    """The same images after `visiond dataset split --reshuffle`."""
    root = tmp_path / "reshuffled"
    shutil.copytree(dataset, root)
    write_manifest(root, split_dataset(read_manifest(root), seed=2, reshuffle=True))
    return root


def trained_on(original: Path, dataset: Path, split: str = "test") -> int:
    """How many of the dataset's `split` rows were in the original's train split."""
    train_paths = {s.path for s in read_manifest(original) if s.split == "train"}
    return sum(s.path in train_paths for s in read_manifest(dataset) if s.split == split)


def test_training_lists_its_train_and_val_images_by_content(dataset, models):
    rows = read_manifest(dataset)
    for path in models:
        meta = load_checkpoint(path).meta
        assert members(meta, "train") == {digest(dataset / s.path) for s in rows if s.split == "train"}
        assert members(meta, "val") == {digest(dataset / s.path) for s in rows if s.split == "val"}


def test_a_class_folder_tree_is_hashed_from_its_files(tmp_path):
    # given images without a sha256 in any manifest
    root = tmp_path / "folders"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"not really a png")
    meta = membership_meta(root, [Sample("a/x.png", "a", "train"), Sample("a/gone.png", "a", "train")], [])
    # then the file's content is listed, and a missing file is left out
    assert members({META_KEY: meta}) == {hashlib.sha256(b"not really a png").digest()[:8]}
    assert members({META_KEY: meta}, "val") == set()


def test_sixty_thousand_images_cost_under_a_megabyte_of_header():
    rows = [Sample(f"i/{i}.png", "a", "train", sha256=hashlib.sha256(str(i).encode()).hexdigest())
            for i in range(60_000)]
    meta = membership_meta(Path("."), rows[:54_000], rows[54_000:])
    assert len(json.dumps(meta)) < 700_000
    assert len(members({META_KEY: meta})) == 54_000


def test_a_stable_split_compares_cleanly(dataset, models, tmp_path):
    report = compare_checkpoints(*models, dataset, split="test", out=tmp_path / "cmp")
    assert report.overlap == {"old": 0, "new": 0} and report.warnings == []
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["overlap"] == {"old": 0, "new": 0}


def test_a_reshuffled_split_is_refused_with_the_overlap_count(dataset, models, reshuffled):
    # given a test split that now holds images both models trained on
    n = trained_on(dataset, reshuffled)
    total = sum(s.split == "test" for s in read_manifest(reshuffled))
    assert 0 < n < total
    # when they are compared on it from the command line, then it refuses, in one line, saying how to go on
    r = visiond("compare", str(models[0]), str(models[1]), str(reshuffled), "--split", "test")
    assert r.returncode == 2, r.stdout[-2000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"visiond: error: compare: {n} of {total} test images were in a model's training set")
    assert f"OLD {models[0]}: {n}, NEW {models[1]}: {n}" in error
    assert "--reshuffle" in error and "--allow-overlap" in error
    # and an evaluation on the train split itself is no surprise: reported, not refused
    report = compare_checkpoints(*models, reshuffled, split="train")
    assert report.overlap["old"] == trained_on(dataset, reshuffled, "train") > 0


def test_allow_overlap_compares_and_reports_it_loudly(dataset, models, reshuffled, tmp_path):
    n = trained_on(dataset, reshuffled)
    r = visiond("compare", str(models[0]), str(models[1]), str(reshuffled), "--split", "test", "--allow-overlap",
                "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["overlap"] == {"old": n, "new": n}
    assert any(w.startswith(f"{n} of ") and "training set of OLD" in w for w in report["warnings"])
    assert f"WARNING: {n} of " in r.stdout and "its figures are flattered" in r.stdout
    assert "precision old → new" in r.stdout


def test_a_copy_of_training_images_elsewhere_is_found_by_content(dataset, models, tmp_path):
    # given a class-folder tree (no manifest, no sha256) holding one training image among new ones
    held_out = tmp_path / "held_out"
    make_shapes_dataset(held_out, per_class=3, size=32, seed=99)
    (held_out / "manifest.csv").unlink()
    seen = next(s for s in read_manifest(dataset) if s.split == "train")
    shutil.copy(dataset / seen.path, held_out / "images" / seen.label / "copied.png")
    # then comparing on all of it is refused for that one image
    with pytest.raises(UserError, match=r"compare: 1 of \d+ images were in a model's training set"):
        compare_checkpoints(*models, held_out / "images", split="all")


def test_a_checkpoint_without_its_training_images_warns_instead(dataset, models, reshuffled, tmp_path):
    # given the old model as written before training images were recorded
    ckpt = load_checkpoint(models[0])
    old = save_checkpoint(tmp_path / "old.ckpt", arch=ckpt.arch, classes=ckpt.classes, spec=ckpt.spec,
                          state_dict=ckpt.state_dict, arch_args=ckpt.arch_args, name=ckpt.name,
                          meta={k: v for k, v in ckpt.meta.items() if k != META_KEY})
    assert members(old.meta) is None
    # then on a stable split the comparison runs and says the check could not be made for it
    report = compare_checkpoints(tmp_path / "old.ckpt", models[1], dataset, split="test")
    assert report.overlap == {"old": None, "new": 0}
    assert len(report.warnings) == 1 and "does not list its training images" in report.warnings[0]
    assert str(tmp_path / "old.ckpt") in report.warnings[0]
    # and a model that does list them is still checked
    with pytest.raises(UserError, match=rf"\(NEW {re.escape(str(models[1]))}: \d+\)"):
        compare_checkpoints(tmp_path / "old.ckpt", models[1], reshuffled, split="test")


@pytest.mark.parametrize("entry", ["nope", {"digest": "md5", "train": ""}, {"digest": "sha256[:8]", "train": "!!"},
                                   {"digest": "sha256[:8]", "train": "AAAA"}])
def test_an_unreadable_list_counts_as_none(entry):
    assert members({META_KEY: entry}) is None
