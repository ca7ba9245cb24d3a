"""What a run will save, before it runs: whole-run FLOPs and stored activations against LoRA.

Under the rules the scores do not steer (the default, ``order="depth"`` with rank
normalization), which units freeze and when follows from the config alone, so a run's
counted savings can be computed from one measured step per frozen prefix.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from safefreeze.config import SAFEConfig
from safefreeze.controller import FreezeController
from safefreeze.discovery import AdapterDiscoveryError, AdapterPattern, find_adapter_pairs
from safefreeze.measure import StepCosts, measure_step
from safefreeze.schedule import cubic_threshold
from safefreeze.selection import group_units, normalize_scores, select_to_freeze


@dataclasses.dataclass(frozen=True)
class SavingsEstimate:
    """A run's counted costs under SAFE against the same run of plain LoRA."""

    # Optimizer steps of the run.
    total_steps: int
    # Freeze units in model order, lowest first.
    units: tuple[str, ...]
    # Unit -> the optimizer step at which it freezes (the steps after it run without it).
    freeze_steps: dict[str, int]
    # Costs of one step with the lowest k units frozen, for k = 0 (plain LoRA) up to the last count.
    step_costs: tuple[StepCosts, ...]
    # Whole-run training FLOPs, SAFE / LoRA.
    flops: float
    # Bytes saved for backward averaged over the steps, SAFE / LoRA.
    saved_bytes: float
    # Bytes saved for backward once the last unit froze, SAFE / LoRA.
    saved_bytes_after: float


def estimate_savings(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    config: SAFEConfig,
    total_steps: int,
    *,
    pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
) -> SavingsEstimate:
    """Predict a run's FLOPs and stored activations under ``config`` against plain LoRA.

    Each frozen prefix the schedule reaches is measured once, on a copy of ``model`` whose
    lowest ``k`` units are frozen (and merged, as the run would merge them) with
    :func:`~safefreeze.measure.measure_step`; the schedule says how many steps run with each.
    ``model`` itself is not changed; one copy of it lives at a time. Both figures are counts,
    so they are what the run will count on any machine with the same batch shapes. Left out:
    the warm-up's scoring (a few small matrix products per adapter on at most eight steps
    under these rules) and the optimizer's own work.

    Args:
        model: The model with its trainable adapters, as it will be trained.
        loss_fn: Computes the loss of one training batch on the model it is given.
        config: The run's config; its scores must not steer the freezing
            (:attr:`SAFEConfig.scores_steer` False).
        total_steps: Optimizer steps of the run.
        pattern: Adapter layout, as for :class:`~safefreeze.SAFEOptimizer`.

    Returns:
        The estimate, with the per-prefix step costs it was built from.

    Raises:
        ValueError: If the scores steer ``config``'s freezing (which units freeze is then
            known only after the warm-up), or ``total_steps`` is not a positive integer.
        AdapterDiscoveryError: If ``model`` has no trainable adapter.

    Example:
        >>> import torch.nn as nn
        >>> from safefreeze import AdapterPattern
        >>> class LoRA(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base = nn.Linear(8, 8).requires_grad_(False)
        ...         self.lora_down, self.lora_up = nn.Linear(8, 2), nn.Linear(2, 8)
        ...     def forward(self, x):
        ...         return self.base(x) + self.lora_up(self.lora_down(x))
        >>> model = nn.Sequential(*(LoRA() for _ in range(4)))  # four blocks of one adapter
        >>> pattern = AdapterPattern(base="base", params=r"lora_(?:down|up)\\..+")
        >>> config = SAFEConfig(warmup_steps=25, freeze_end_step=50, tau_target=0.5)
        >>> estimate = estimate_savings(
        ...     model, lambda m: m(torch.ones(16, 8)).square().mean(), config, 100, pattern=pattern
        ... )
        >>> estimate.freeze_steps  # the lowest half freezes, lowest first
        {'0': 28, '1': 35}
        >>> round(estimate.flops, 3), round(estimate.saved_bytes, 3), round(estimate.saved_bytes_after, 3)
        (0.785, 0.715, 0.583)
    """
    if config.scores_steer:
        raise ValueError(
            "estimate_savings predicts the rules the scores do not steer (order='depth' with "
            f"normalization='rank'); got order={config.order!r}, normalization={config.normalization!r}, "
            "under which the units that freeze are known only once the warm-up is scored"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"estimate_savings requires an integer total_steps >= 1, got {total_steps!r}")
    names = [p.name for p in find_adapter_pairs(model, pattern) if p.trainable]
    if not names:
        raise AdapterDiscoveryError("estimate_savings found no adapter with a trainable parameter")
    units = tuple(group_units(names, config.units, config.group_by))
    # Every unit gets a finite score: the rule then freezes tau(t) * units of them, lowest first.
    ranks = normalize_scores(dict.fromkeys(units, 0.0), "rank")
    counts = [0] * (total_steps + 1)  # counts[t]: units frozen once step t ended
    for step in range(config.warmup_steps, total_steps + 1):
        threshold = cubic_threshold(
            step,
            warmup_steps=config.warmup_steps,
            freeze_end_step=config.freeze_end_step,
            tau_target=config.tau_target,
        )
        counts[step] = len(select_to_freeze(ranks, threshold))
    last = counts[total_steps]
    costs = tuple(_prefix_costs(model, loss_fn, config, pattern, k, len(units)) for k in range(last + 1))
    # Step t (1-based) runs with the units frozen when step t - 1 ended.
    per_step = [costs[counts[t - 1]] for t in range(1, total_steps + 1)]
    lora = costs[0]
    freeze_steps = {
        unit: next(t for t in range(total_steps + 1) if counts[t] > i) for i, unit in enumerate(units[:last])
    }
    return SavingsEstimate(
        total_steps=total_steps,
        units=units,
        freeze_steps=freeze_steps,
        step_costs=costs,
        flops=sum(c.flops for c in per_step) / (total_steps * lora.flops),
        saved_bytes=sum(c.saved_bytes for c in per_step) / (total_steps * lora.saved_bytes),
        saved_bytes_after=costs[last].saved_bytes / lora.saved_bytes,
    )


def _prefix_costs(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    config: SAFEConfig,
    pattern: AdapterPattern | Sequence[AdapterPattern] | None,
    k: int,
    units: int,
) -> StepCosts:
    """One step's costs on a copy of ``model`` with its lowest ``k`` units frozen as ``config`` freezes."""
    trial = copy.deepcopy(model)
    engine = None
    if k:
        # A one-step schedule whose rank threshold lets exactly the lowest k units freeze.
        engine = FreezeController(
            trial,
            dataclasses.replace(config, warmup_steps=1, freeze_end_step=1, tau_target=k / units),
            pattern=pattern,
        )
        engine.finalize_scores(dict.fromkeys(engine.units, 0.0))
        engine.on_step_end()
    try:  # with the engine live, as in the run: eval_frozen holds its frozen blocks in evaluation mode
        _, costs = measure_step(trial, lambda: loss_fn(trial))
    finally:
        if engine is not None:
            engine.close()
    return costs
