"""Freeze units, score normalization and the choice of what to freeze: pure, deterministic functions."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

NORMALIZATIONS = ("rank", "max", "sum", "none")
ORDERS = ("prefix", "score", "depth")
UNITS = ("block", "adapter")
# A dotted name component that is an index: `layer.3`, `h.3`, `layers.3`, `block.3`.
_INDEX = re.compile(r"\d+")


def normalize_scores(scores: Mapping[str, float], method: str = "max") -> dict[str, float]:
    """Normalize raw importance scores so one threshold fits any model.

    ``rank`` replaces each finite score by its rank's midpoint share, ``(i + 1/2) / n`` for
    the ``i``-th lowest of ``n`` finite scores (ties broken by name), so a threshold ``tau``
    passes ``tau * n`` units rounded to the nearest (half down), whatever the scores' scale.
    ``max`` divides by
    the largest finite score (so ``tau_T`` reads "a share of the most
    important adapter"), ``sum`` by the sum of finite scores, ``none`` keeps raw values.
    Non-finite scores stay NaN and never count towards the divisor. When the divisor is
    zero (every finite score is 0) the scores are returned unchanged as 0.0.

    Args:
        scores: Raw importance per adapter name (``1 - CKA``, so >= 0 in practice).
        method: ``"rank"``, ``"max"``, ``"sum"`` or ``"none"``.

    Returns:
        Normalized scores, same keys, sorted by name.

    Raises:
        ValueError: If ``method`` is unknown or a finite score is negative.

    Example:
        >>> normalize_scores({"b": 0.2, "a": 0.4})
        {'a': 1.0, 'b': 0.5}
        >>> normalize_scores({"a": 3e-5, "b": 1e-6, "c": 2e-5, "d": float("nan")}, "rank")
        {'a': 0.8333333333333334, 'b': 0.16666666666666666, 'c': 0.5, 'd': nan}
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    finite = {name: float(s) for name, s in scores.items() if math.isfinite(s)}
    negative = sorted(name for name, s in finite.items() if s < 0)
    if negative:
        raise ValueError(f"importance scores must be >= 0, got negative scores for {negative[:5]}")
    if method == "rank":
        ranked = sorted(finite, key=lambda name: (finite[name], name))
        share = {name: (i + 0.5) / len(ranked) for i, name in enumerate(ranked)}
        return {name: share.get(name, math.nan) for name in sorted(scores)}
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
    """The ``count`` lowest unfrozen units in model order (SAFEConfig ``order="depth"``, the default).

    The threshold still decides *how many* units are frozen by a step (as many as score
    below it); this decides *which*: the lowest ones, so the frozen set stays a lower prefix
    of the model and backprop can stop above it. A unit with a NaN score is never chosen,
    and the walk stops there: nothing above a trainable unit freezes.

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
        >>> lowest_first(["l0", "l1", "l2"], {"l0": 0.9, "l1": float("nan"), "l2": 0.2}, 2)
        ['l0']
    """
    return list(itertools.islice(_walk_up(order, normalized, frozen), max(count, 0)))


def lower_prefix(
    order: Sequence[str], normalized: Mapping[str, float], threshold: float, frozen: Iterable[str] = ()
) -> list[str]:
    """The unfrozen units that extend the frozen lower prefix, all scoring below ``threshold``.

    SAFEConfig ``order="prefix"``, where the scores pick the prefix: walking up from the
    lowest unit, each unit below the threshold joins the prefix, and the first unit at or
    above it (or with a NaN score) ends it. Units above a trainable one never freeze:
    backprop reaches the trainable unit anyway, so freezing them would save only their
    gradients and optimizer state, and risk their accuracy.

    Args:
        order: Unit names in model order, lowest first.
        normalized: Normalized score per unit.
        threshold: Current threshold ``tau(t)``.
        frozen: Units already frozen (a lower prefix under this rule).

    Returns:
        Newly frozen names, lowest first.

    Example:
        >>> lower_prefix(["l0", "l1", "l2", "l3"], {"l0": 0.2, "l1": 0.0, "l2": 0.8, "l3": 0.4}, 0.5)
        ['l0', 'l1']
    """
    return list(itertools.takewhile(lambda u: normalized[u] < threshold, _walk_up(order, normalized, frozen)))


def _walk_up(order: Sequence[str], normalized: Mapping[str, float], frozen: Iterable[str]) -> Iterator[str]:
    """Unfrozen units from the lowest up, ending before the first one without a finite score."""
    done = set(frozen)
    for unit in order:
        if unit in done:
            continue
        if not math.isfinite(normalized.get(unit, math.nan)):
            return
        yield unit


def block_of(name: str) -> str:
    """The transformer block an adapter belongs to: its name up to the first index component.

    Works from names alone for BERT (``encoder.layer.3``), GPT-2 (``transformer.h.3``),
    Llama (``model.layers.3``) and T5 (``encoder.block.3``) naming; an adapter whose name has
    no index component is its own block.

    Example:
        >>> block_of("base_model.model.encoder.layer.3.attention.self.query")
        'base_model.model.encoder.layer.3'
        >>> block_of("model.layers.12.mlp.experts.0.up_proj:default")
        'model.layers.12'
        >>> block_of("classifier")
        'classifier'
    """
    site = name.split(":", 1)[0]
    parts = site.split(".")
    for i, part in enumerate(parts):
        if _INDEX.fullmatch(part):
            return ".".join(parts[: i + 1])
    return name


def group_units(names: Sequence[str], units: str, group_by: str | None = None) -> dict[str, list[str]]:
    """Freeze units of adapters, in model order: by ``group_by`` if given, else by ``units``.

    Args:
        names: Adapter names in model order.
        units: ``"block"`` (one unit per transformer block, :func:`block_of`) or
            ``"adapter"`` (one unit per adapter).
        group_by: A regex whose capture groups name the unit; overrides ``units``.
            Adapters it does not match are their own unit.

    Returns:
        Unit name -> adapter names, both in model order.

    Example:
        >>> group_units(["h.0.attn", "h.0.mlp", "h.1.attn"], "block")
        {'h.0': ['h.0.attn', 'h.0.mlp'], 'h.1': ['h.1.attn']}
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    grouped: dict[str, list[str]] = {}
    for name in names:
        match = re.fullmatch(group_by, name) if group_by else None
        if match:
            key = ".".join(g or "" for g in match.groups())
        elif group_by is None and units == "block":
            key = block_of(name)
        else:
            key = name
        grouped.setdefault(key, []).append(name)
    return grouped
