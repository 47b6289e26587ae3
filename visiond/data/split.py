"""Train/val/test assignment: stratified per class, group-aware when frames are related, and stable.

Frames of one capture session (or one part, one time window) look almost the same; if
they straddle train and test, the test accuracy measures memory, not generalisation.
`group_by` keeps every group inside one split while still balancing each class.

A split, once made, stays: a row that has a split keeps it, and only rows without one
(newly labelled frames) are assigned, in the requested ratio among themselves. Moving
an old row could put a model's training image into the test split and make an old
model look better than it is; that needs `reshuffle=True`, on purpose.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

from visiond.data.manifest import SPLITS, Sample, classes_of
from visiond.errors import UserError


def _check_ratios(ratios: tuple[float, float, float]) -> None:
    if any(r < 0 or r > 1 for r in ratios):
        raise UserError(f"split ratios {ratios}: each must be between 0 and 1")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(f"split ratios train+val+test = {sum(ratios):.6g}: expected them to sum to 1")


def _allocate(n: int, ratios: tuple[float, float, float]) -> list[int]:
    """n items into splits by largest remainder; every split with a ratio > 0 gets one if n allows."""
    exact = [n * r for r in ratios]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if ratios[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _stratified(samples: list[Sample], ratios, rng: random.Random) -> dict[int, str]:
    """Index -> split, allocating each class exactly by its own counts."""
    assign: dict[int, str] = {}
    for label in classes_of(samples):
        idx = [i for i, s in enumerate(samples) if s.label == label]
        rng.shuffle(idx)
        start = 0
        for split, k in zip(SPLITS, _allocate(len(idx), ratios)):
            assign.update((i, split) for i in idx[start:start + k])
            start += k
    return assign


def _groups(samples: list[Sample], field: str) -> dict[str, list[int]]:
    """Group key -> indices; a sample without a value stands alone (it leaks nothing)."""
    if not any(s.field_value(field) for s in samples):
        raise UserError(f"--group-by {field!r}: no sample has a value for it; expected a manifest column "
                        f"or metadata field such as 'session'")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        key = s.field_value(field)
        groups[f"={key}" if key else f"#{i}"].append(i)
    return groups


def _grouped(samples: list[Sample], ratios, rng: random.Random, field: str) -> dict[int, str]:
    """Whole groups, largest first, each to the split where it best closes the per-class gap.

    The cost is the squared distance of every (split, class) count from its target,
    scaled by the class size so rare classes are balanced as carefully as common ones.
    """
    classes = classes_of(samples)
    totals = {c: sum(1 for s in samples if s.label == c) for c in classes}
    target = {sp: {c: r * totals[c] for c in classes} for sp, r in zip(SPLITS, ratios)}
    current = {sp: dict.fromkeys(classes, 0) for sp in SPLITS}
    open_splits = [sp for sp, r in zip(SPLITS, ratios) if r > 0]
    keys = sorted(_groups(samples, field).items())
    rng.shuffle(keys)
    keys.sort(key=lambda kv: -len(kv[1]))
    assign: dict[int, str] = {}
    for _, idx in keys:
        g: dict[str, int] = defaultdict(int)
        for i in idx:
            g[samples[i].label] += 1

        def cost(sp: str) -> float:
            return sum(n * (2 * (current[sp][c] - target[sp][c]) + n) / totals[c] for c, n in g.items())

        best = min(open_splits, key=lambda sp: (cost(sp), -sum(target[sp][c] - current[sp][c] for c in g)))
        for c, n in g.items():
            current[best][c] += n
        assign.update((i, best) for i in idx)
    return assign


def split_dataset(samples: list[Sample], train: float = 0.7, val: float = 0.15, test: float = 0.15,
                  seed: int = 0, group_by: str | None = None, keep_test: bool = False,
                  reshuffle: bool = False) -> list[Sample]:
    """The same samples, in the same order, with `split` set; the seed makes it repeatable.

    Rows that already have a split keep it; rows without one are assigned (stratified,
    and with `group_by` a new row whose group already sits in a split joins it).
    `reshuffle` reassigns every row instead. `keep_test` sends no row into 'test' and
    leaves rows already there alone (an official test set such as Fashion-MNIST's
    t10k), dividing the rest into train and val in the train:val ratio.
    """
    ratios = (train, val, test)
    _check_ratios(ratios)
    if not samples:
        raise UserError("the dataset has no samples to split")
    rng = random.Random(seed)
    if reshuffle:
        fixed = {i for i, s in enumerate(samples) if keep_test and s.split == "test"}
    else:
        fixed = {i for i, s in enumerate(samples) if s.split}
    if keep_test:
        if train + val <= 0:
            raise UserError("--keep-test: nothing left to divide into train and val")
        ratios = (train / (train + val), val / (train + val), 0.0)
    rest_idx = [i for i in range(len(samples)) if i not in fixed]
    if keep_test and reshuffle and not rest_idx:
        raise UserError("--keep-test: nothing left to divide into train and val")
    out = [replace(s, extra=dict(s.extra)) for s in samples]
    joined = _join_existing_groups(samples, fixed, rest_idx, group_by) if group_by and fixed else {}
    for i, split in joined.items():
        out[i].split = split
    rest_idx = [i for i in rest_idx if i not in joined]
    if not rest_idx:
        return out
    rest = [samples[i] for i in rest_idx]
    assign = _grouped(rest, ratios, rng, group_by) if group_by else _stratified(rest, ratios, rng)
    for k, i in enumerate(rest_idx):
        out[i].split = assign[k]
    return out


def _join_existing_groups(samples: list[Sample], fixed: set[int], new: list[int], field: str) -> dict[int, str]:
    """New rows whose group already has rows in a split go where that group is (its most common split)."""
    placed: dict[str, Counter] = defaultdict(Counter)
    for i in fixed:
        key = samples[i].field_value(field)
        if key:
            placed[key][samples[i].split] += 1
    return {i: placed[key].most_common(1)[0][0] for i in new
            if (key := samples[i].field_value(field)) and key in placed}


def split_changes(before: list[Sample], after: list[Sample]) -> tuple[int, int, int]:
    """(kept, assigned, moved): rows that kept their split, rows newly given one, rows moved to another."""
    kept = assigned = moved = 0
    for b, a in zip(before, after):
        if not b.split:
            assigned += 1
        elif b.split == a.split:
            kept += 1
        else:
            moved += 1
    return kept, assigned, moved
