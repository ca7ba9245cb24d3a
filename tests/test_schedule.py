from __future__ import annotations

import math

import pytest

from safefreeze import cubic_threshold
from safefreeze.selection import lowest_first, normalize_scores, select_to_freeze


@pytest.mark.parametrize(
    ("step", "t_w", "t_f", "expected"),
    [
        (0, 10, 20, 0.0),  # before t_w
        (9, 10, 20, 0.0),
        (10, 10, 20, 0.0),  # at t_w the cubic starts at zero
        (11, 10, 20, 0.8 * (1 - 0.9**3)),
        (15, 10, 20, 0.8 * (1 - 0.5**3)),  # mid-way: 0.7
        (19, 10, 20, 0.8 * (1 - 0.1**3)),
        (20, 10, 20, 0.8),  # at t_f
        (1000, 10, 20, 0.8),  # after t_f
        (4, 5, 5, 0.0),  # t_w == t_f: a step function
        (5, 5, 5, 0.8),
        (6, 5, 5, 0.8),
    ],
)
def test_cubic_threshold_table(step: int, t_w: int, t_f: int, expected: float) -> None:
    got = cubic_threshold(step, warmup_steps=t_w, freeze_end_step=t_f, tau_target=0.8)
    assert got == pytest.approx(expected, abs=1e-12)


def test_cubic_threshold_midway_is_seven_eighths() -> None:
    assert cubic_threshold(15, warmup_steps=10, freeze_end_step=20, tau_target=1.0) == 0.875


def test_cubic_threshold_is_monotone() -> None:
    values = [cubic_threshold(t, warmup_steps=3, freeze_end_step=50, tau_target=0.6) for t in range(80)]
    assert values == sorted(values)
    assert values[0] == 0.0 and values[-1] == 0.6


def test_cubic_threshold_rejects_inverted_stages() -> None:
    with pytest.raises(ValueError, match="freeze_end_step=5, warmup_steps=10"):
        cubic_threshold(0, warmup_steps=10, freeze_end_step=5, tau_target=0.5)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("rank", {"a": 1 / 6, "b": 5 / 6, "c": 0.5}),
        ("max", {"a": 0.25, "b": 1.0, "c": 0.5}),
        ("sum", {"a": 1 / 7, "b": 4 / 7, "c": 2 / 7}),
        ("none", {"a": 0.1, "b": 0.4, "c": 0.2}),
    ],
)
def test_normalize_scores(method: str, expected: dict[str, float]) -> None:
    got = normalize_scores({"c": 0.2, "a": 0.1, "b": 0.4}, method)
    assert list(got) == ["a", "b", "c"]
    assert got == pytest.approx(expected)


def test_normalize_keeps_nan_out_of_the_divisor() -> None:
    got = normalize_scores({"a": 0.2, "b": math.nan, "c": 0.4}, "max")
    assert got["a"] == 0.5 and got["c"] == 1.0 and math.isnan(got["b"])


def test_normalize_all_zero_scores_stay_zero() -> None:
    assert normalize_scores({"a": 0.0, "b": 0.0}, "sum") == {"a": 0.0, "b": 0.0}


def test_normalize_rejects_unknown_method_and_negative_scores() -> None:
    with pytest.raises(ValueError, match=r"one of \('rank', 'max', 'sum', 'none'\), got 'mean'"):
        normalize_scores({"a": 1.0}, "mean")
    with pytest.raises(ValueError, match=r"negative scores for \['b'\]"):
        normalize_scores({"a": 1.0, "b": -0.5})


def test_selection_is_deterministic_with_ties_broken_by_name() -> None:
    scores = {"z": 0.1, "m": 0.1, "a": 0.3, "top": 1.0}
    assert select_to_freeze(scores, 0.5) == ["m", "z", "a"]
    assert select_to_freeze(dict(reversed(scores.items())), 0.5) == ["m", "z", "a"]


def test_selection_only_grows_and_nan_never_freezes() -> None:
    scores = {"a": 0.1, "b": 0.3, "c": math.nan, "d": 0.9}
    frozen: list[str] = []
    for threshold in (0.0, 0.2, 0.2, 0.5, 1.0, 0.0):
        frozen += select_to_freeze(scores, threshold, frozen)
    assert frozen == ["a", "b", "d"]
    assert select_to_freeze(scores, 0.05) == []  # strictly below the threshold


def test_lowest_first_takes_the_lowest_unfrozen_units_up_to_one_without_a_score() -> None:
    order = ["l0", "l1", "l2", "l3", "l4"]
    scores = {"l0": 1.0, "l1": 0.7, "l2": 0.3, "l3": 0.0, "l4": 0.1}
    assert lowest_first(order, scores, 2) == ["l0", "l1"]  # the lowest, whatever they score
    assert lowest_first(order, scores, 2, frozen=["l0"]) == ["l1", "l2"]
    assert lowest_first(order, scores, 9, frozen=["l0"]) == ["l1", "l2", "l3", "l4"]
    assert lowest_first(order, scores, 0) == []
    # l2 has no score: it never freezes, and neither does anything above it.
    scores["l2"] = math.nan
    assert lowest_first(order, scores, 4) == ["l0", "l1"]
    assert lowest_first(order, scores, 4, frozen=["l0", "l1"]) == []
