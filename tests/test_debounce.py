"""Stream-mode defect events: n of the last m frames start one, end_n clean of end_m end it."""

from __future__ import annotations

import random

import pytest

from visiond.serve.decide import DefectDebouncer

T, F = True, False


def feed(deb: DefectDebouncer, seq: list[bool], key="cam1") -> list[str | None]:
    return [deb.update(key, x) for x in seq]


class InARow:
    """The earlier rule, kept as the reference: `frames` in a row start an event, as many clean ones end it."""

    def __init__(self, frames: int):
        self.frames, self.state, self.run = frames, False, 0

    def update(self, defect: bool) -> str | None:
        if defect == self.state:
            self.run = 0
            return None
        self.run += 1
        if self.run < self.frames:
            return None
        self.state, self.run = defect, 0
        return "defect_started" if defect else "defect_ended"


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_n_of_n_is_the_same_as_n_in_a_row(n):
    # given a long noisy stream with runs of every length
    rng = random.Random(n)
    seq = [rng.random() < 0.45 for _ in range(3000)]
    # when the N-of-M debouncer (m defaults to n) and the in-a-row rule see it
    ref = InARow(n)
    expected = [ref.update(x) for x in seq]
    # then they raise the very same events on the very same frames
    assert feed(DefectDebouncer(n), seq) == expected
    assert feed(DefectDebouncer(n, n, n, n), seq) == expected
    assert expected.count("defect_started") > 5


def test_three_in_a_row_by_default():
    deb = DefectDebouncer()
    assert feed(deb, [T, T, F, T, T, T, T, F, F, T, F, F, F]) == [
        None, None, None, None, None, "defect_started", None, None, None, None, None, None, "defect_ended"]


def test_two_of_three_starts_across_a_clean_frame():
    assert feed(DefectDebouncer(2, 3), [T, F, T]) == [None, None, "defect_started"]
    # the in-a-row rule would not have started on the same frames
    assert feed(DefectDebouncer(2), [T, F, T]) == [None, None, None]


def test_a_single_flicker_does_not_start():
    deb = DefectDebouncer(2, 3)
    assert feed(deb, [F, T, F, F, T, F, F, F, T, F]) == [None] * 10
    # one more defect inside the window does
    assert feed(deb, [T]) == ["defect_started"]


def test_the_end_needs_end_n_clean_of_the_last_end_m():
    deb = DefectDebouncer(2, 3, end_n=3, end_m=4)
    assert feed(deb, [T, T]) == [None, "defect_started"]
    # in a defect, more defect frames raise nothing; two clean of four is not enough
    assert feed(deb, [T, F, T, F]) == [None, None, None, None]
    # a third clean frame among the last four ends it, despite the defect frame between
    assert feed(deb, [F]) == ["defect_ended"]


def test_a_transition_needs_fresh_evidence():
    deb = DefectDebouncer(2, 3)
    assert feed(deb, [T, F, T]) == [None, None, "defect_started"]
    # the clean frame before the start no longer counts toward the end
    assert feed(deb, [F]) == [None]
    assert feed(deb, [F]) == ["defect_ended"]
    # nor do the defect frames before the end count toward the next start
    assert feed(deb, [T]) == [None]
    assert feed(deb, [T]) == ["defect_started"]


def test_keys_are_independent():
    deb = DefectDebouncer(2, 3)
    a, b = ("station1", "screw_left"), ("station1", "label")
    assert deb.update(a, T) is None
    assert deb.update(b, T) is None
    assert deb.update(b, F) is None
    assert deb.update(a, T) == "defect_started"
    assert deb.update(b, F) is None  # b saw 1 of its last 3: no event
    assert deb.update(b, T) is None
    assert deb.update(a, F) is None
    assert deb.update(a, F) == "defect_ended"


@pytest.mark.parametrize("args, message", [
    ((0,), r"1 <= n <= m, got n=0, m=0"),
    ((3, 2), r"1 <= n <= m, got n=3, m=2"),
    ((2, 3, 4), r"1 <= end_n <= end_m, got end_n=4, end_m=3"),
    ((2, 3, 2, 1), r"1 <= end_n <= end_m, got end_n=2, end_m=1"),
    ((2, 3, 0, 3), r"1 <= end_n <= end_m, got end_n=0, end_m=3"),
])
def test_bad_windows_are_refused_naming_the_values(args, message):
    with pytest.raises(ValueError, match=message):
        DefectDebouncer(*args)
