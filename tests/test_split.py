"""Split ratios, stratification per class and group-awareness, on generated datasets."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from visiond.data.manifest import Sample
from visiond.data.split import split_dataset
from visiond.errors import UserError


def generated(per_class: dict[str, int], group_size: int = 0, seed: int = 0) -> list[Sample]:
    """Samples of several classes; with group_size, consecutive frames share a session (mixed classes too)."""
    rng = random.Random(seed)
    out = []
    for label, n in per_class.items():
        for i in range(n):
            extra = {"session": f"{label}-{i // group_size}"} if group_size else {}
            out.append(Sample(f"images/{label}/{i}.png", label, source="gen", extra=extra))
    rng.shuffle(out)
    return out


def test_ratios_are_met_within_one_sample_per_class():
    # given an imbalanced dataset
    samples = generated({"ok": 400, "scratch": 60, "spot": 21})
    # when split 70/15/15
    out = split_dataset(samples, 0.7, 0.15, 0.15, seed=1)
    # then every class is split in the ratio, within rounding
    counts = Counter((s.label, s.split) for s in out)
    for label, n in {"ok": 400, "scratch": 60, "spot": 21}.items():
        for split, r in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(counts[label, split] - r * n) <= 1, (label, split, counts)
    # and the order and identity of samples is unchanged
    assert [s.path for s in out] == [s.path for s in samples]


def test_rare_class_gets_a_sample_in_every_split():
    out = split_dataset(generated({"ok": 50, "rare": 3}), seed=0)
    assert sorted(s.split for s in out if s.label == "rare") == ["test", "train", "val"]


def test_same_seed_same_split_other_seed_differs():
    samples = generated({"a": 30, "b": 30})
    a, b, c = (split_dataset(samples, seed=s) for s in (5, 5, 6))
    assert [s.split for s in a] == [s.split for s in b] != [s.split for s in c]


@pytest.mark.parametrize("ratios", [(0.7, 0.2, 0.2), (0.5, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_ratios_must_sum_to_one(ratios):
    with pytest.raises(UserError, match="ratios"):
        split_dataset(generated({"a": 5}), *ratios)


def test_ratios_within_tolerance_are_accepted():
    out = split_dataset(generated({"a": 10}), 0.7, 0.15, 0.15 + 5e-7)
    assert len(out) == 10


def test_groups_never_straddle_splits_and_classes_stay_balanced():
    # given sessions of 6 consecutive frames per class
    samples = generated({"ok": 300, "scratch": 120, "spot": 60}, group_size=6, seed=3)
    # when split by session
    out = split_dataset(samples, 0.7, 0.15, 0.15, seed=2, group_by="session")
    # then every session lies in one split
    where = defaultdict(set)
    for s in out:
        where[s.extra["session"]].add(s.split)
    assert all(len(v) == 1 for v in where.values())
    # and each class is still near its ratio (within one group)
    counts = Counter((s.label, s.split) for s in out)
    for label, n in {"ok": 300, "scratch": 120, "spot": 60}.items():
        for split, r in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(counts[label, split] - r * n) <= 6, (label, split, counts)


def test_groups_holding_several_classes_stay_whole():
    # given sessions that each hold frames of two classes
    samples = [Sample(f"images/{c}/{g}-{i}.png", c, extra={"session": f"g{g}"})
               for g in range(40) for c in ("ok", "defect") for i in range(3 if c == "ok" else 1)]
    out = split_dataset(samples, seed=0, group_by="session")
    where = defaultdict(set)
    for s in out:
        where[s.extra["session"]].add(s.split)
    assert all(len(v) == 1 for v in where.values())
    assert Counter(s.split for s in out if s.label == "defect") == {"train": 28, "val": 6, "test": 6}


def test_group_by_a_manifest_column_and_samples_without_a_value():
    # given captures grouped by source camera, plus loose samples with no source
    samples = [Sample(f"images/a/{i}.png", "a", source=f"cam{i % 5}" if i < 50 else "") for i in range(60)]
    out = split_dataset(samples, seed=0, group_by="source")
    where = defaultdict(set)
    for s in out:
        if s.source:
            where[s.source].add(s.split)
    assert all(len(v) == 1 for v in where.values())


def test_group_by_an_unknown_field_is_a_user_error():
    with pytest.raises(UserError, match="--group-by 'session'"):
        split_dataset(generated({"a": 5}), group_by="session")


def test_keep_test_leaves_an_official_test_set_alone():
    samples = generated({"a": 40, "b": 40})
    for s in samples[:20]:
        s.split = "test"
    out = split_dataset(samples, 0.8, 0.2, 0.0, seed=0, keep_test=True)
    assert [s.split for s in out[:20]] == ["test"] * 20
    assert Counter(s.split for s in out[20:]) == {"train": 48, "val": 12}


def test_a_second_split_keeps_every_existing_row_and_assigns_only_new_ones():
    # given a dataset split once, on which a model was trained and tested
    first = split_dataset(generated({"ok": 120, "scratch": 60}), seed=0)
    # when newly labelled frames arrive without a split and the split is run again
    new = generated({"ok": 30, "scratch": 20, "dent": 9}, seed=7)
    for s in new:
        s.path = s.path.replace("images/", "images/new-")
    again = split_dataset(first + new, seed=0)
    # then no old row moved (the old test set stays the old test set)
    assert [s.split for s in again[:len(first)]] == [s.split for s in first]
    # and the new rows are split in the ratio among themselves, every class in every split
    counts = Counter((s.label, s.split) for s in again[len(first):])
    for label, n in {"ok": 30, "scratch": 20, "dent": 9}.items():
        for split, r in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(counts[label, split] - r * n) <= 1, (label, split, counts)


def test_reshuffle_moves_old_rows_and_the_changes_are_counted():
    from visiond.data.split import split_changes

    first = split_dataset(generated({"a": 60, "b": 60}), seed=0)
    kept_only = split_dataset(first, seed=3)
    assert split_changes(first, kept_only) == (120, 0, 0)
    shuffled = split_dataset(first, seed=3, reshuffle=True)
    kept, assigned, moved = split_changes(first, shuffled)
    assert assigned == 0 and moved > 0 and kept + moved == 120


def test_a_new_row_joins_the_split_its_group_already_sits_in():
    samples = generated({"a": 40, "b": 40}, group_size=5)
    first = split_dataset(samples, seed=0, group_by="session")
    where = {s.extra["session"]: s.split for s in first}
    late = [Sample(f"images/a/late{i}.png", "a", source="gen", extra={"session": "a-3"}) for i in range(4)]
    again = split_dataset(first + late, seed=0, group_by="session")
    assert {s.split for s in again[-4:]} == {where["a-3"]}
    assert [s.split for s in again[:80]] == [s.split for s in first]


def test_keep_test_never_sends_new_rows_to_test():
    samples = generated({"a": 40, "b": 40})
    for s in samples[:20]:
        s.split = "test"
    first = split_dataset(samples, 0.8, 0.2, 0.0, keep_test=True)
    late = generated({"a": 10, "b": 10}, seed=3)
    for s in late:
        s.path = s.path.replace("images/", "images/late-")
    again = split_dataset(first + late, 0.8, 0.2, 0.0, keep_test=True)
    assert [s.split for s in again[:80]] == [s.split for s in first]
    assert Counter(s.split for s in again[80:]) == {"train": 16, "val": 4}
