"""Score normalization and the choice of what to freeze: pure, deterministic functions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

NORMALIZATIONS = ("max", "sum", "none")
ORDERS = ("score", "depth")


def normalize_scores(scores: Mapping[str, float], method: str = "max") -> dict[str, float]:
    """Normalize raw importance scores so one threshold fits any model.

    ``max`` divides by the largest finite score (so ``tau_T`` reads "a share of the most
    important adapter"), ``sum`` by the sum of finite scores, ``none`` keeps raw values.
    Non-finite scores stay NaN and never count towards the divisor. When the divisor is
    zero (every finite score is 0) the scores are returned unchanged as 0.0.

    Args:
        scores: Raw importance per adapter name (``1 - CKA``, so >= 0 in practice).
        method: ``"max"``, ``"sum"`` or ``"none"``.

    Returns:
        Normalized scores, same keys, sorted by name.

    Raises:
        ValueError: If ``method`` is unknown or a finite score is negative.

    Example:
        >>> normalize_scores({"b": 0.2, "a": 0.4})
        {'a': 1.0, 'b': 0.5}
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    finite = {name: float(s) for name, s in scores.items() if math.isfinite(s)}
    negative = sorted(name for name, s in finite.items() if s < 0)
    if negative:
        raise ValueError(f"importance scores must be >= 0, got negative scores for {negative[:5]}")
    if method == "max":
        divisor = max(finite.values(), default=0.0)
    elif method == "sum":
        divisor = sum(finite.values())
    else:
        divisor = 1.0
    if divisor == 0.0:
        divisor = 1.0
    return {name: (finite[name] / divisor if name in finite else math.nan) for name in sorted(scores)}


def select_to_freeze(
    normalized: Mapping[str, float], threshold: float, frozen: Iterable[str] = ()
) -> list[str]:
    """Names of the unfrozen adapters whose normalized score is below ``threshold``.

    Freezing is monotone: names in ``frozen`` are never returned again, and nothing is
    ever unfrozen. A NaN score never freezes anything. The result is ordered by score,
    ties broken by name, so it is the same on every run and every rank.

    Args:
        normalized: Normalized score per adapter name.
        threshold: Current threshold ``tau(t)``.
        frozen: Names already frozen.

    Returns:
        Newly frozen names, lowest score first.

    Example:
        >>> select_to_freeze({"a": 0.1, "b": 0.1, "c": 0.9}, 0.5, frozen=["b"])
        ['a']
    """
    done = set(frozen)
    chosen = [
        (score, name)
        for name, score in normalized.items()
        if name not in done and math.isfinite(score) and score < threshold
    ]
    return [name for _, name in sorted(chosen)]


def lowest_first(
    order: Sequence[str], normalized: Mapping[str, float], count: int, frozen: Iterable[str] = ()
) -> list[str]:
    """The ``count`` lowest unfrozen units in model order (SAFEConfig ``order="depth"``).

    The threshold still decides *how many* units are frozen by a step (as many as score
    below it); this decides *which*: the lowest ones, so the frozen set stays a lower prefix
    of the model and backprop can stop above it. Units with a NaN score are never chosen.

    Args:
        order: Unit names in model order, lowest layer first.
        normalized: Normalized score per unit.
        count: How many to freeze.
        frozen: Units already frozen.

    Returns:
        Up to ``count`` names, lowest first.

    Example:
        >>> lowest_first(["l0", "l1", "l2", "l3"], {"l0": 0.9, "l1": 0.1, "l2": 0.2, "l3": 1.0}, 2)
        ['l0', 'l1']
    """
    done = set(frozen)
    free = [u for u in order if u not in done and math.isfinite(normalized.get(u, math.nan))]
    return free[: max(count, 0)]
