"""What a run will save, before it runs: whole-run FLOPs and stored activations against LoRA.

Under the rules the scores do not steer (the default, ``order="depth"`` with rank
normalization), which units freeze and when follows from the config alone, so a run's
counted savings can be computed from one measured step per frozen prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
from collections.abc import Callable, Sequence

import torch
from torch import nn

from safefreeze.config import SAFEConfig
from safefreeze.controller import FreezeController, live_owner
from safefreeze.discovery import (
    AdapterDiscoveryError,
    AdapterPair,
    AdapterPattern,
    check_adalora_schedule,
    find_adapter_pairs,
)
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
    # Costs of one step with the lowest k units frozen, for k = 0 (plain LoRA) up to the count the
    # last step runs with.
    step_costs: tuple[StepCosts, ...]
    # Whole-run training FLOPs, SAFE / LoRA.
    flops: float
    # Bytes saved for backward averaged over the steps, SAFE / LoRA.
    saved_bytes: float
    # Bytes saved for backward on the run's last step, SAFE / LoRA.
    saved_bytes_last: float


def estimate_savings(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    config: SAFEConfig,
    total_steps: int,
    *,
    pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
) -> SavingsEstimate:
    """Predict a run's FLOPs and stored activations under ``config`` against plain LoRA.

    Each frozen prefix the run's steps train with is measured once, on a copy of ``model`` in
    training mode whose lowest ``k`` units are frozen (and merged, as the run would merge them)
    with :func:`~safefreeze.measure.measure_step`; the schedule says how many steps run with
    each. ``model`` itself, and the global random state, are left as they were; one copy of the
    model lives at a time. Both figures are counts, so they are what the run will count on any
    machine for batches of the shape ``loss_fn`` uses (pad the run's batches to one length).
    Left out: the warm-up's scoring (a few small matrix products per adapter on each scored
    step) and the optimizer's own work. The prediction takes every unit to get a finite score
    in the warm-up, as a unit whose adapters run does; a unit without one never freezes in the
    run, so an adapter that ``loss_fn``'s forward does not run is refused here.

    Args:
        model: The model with its trainable adapters, before SAFE wraps its optimizer.
        loss_fn: Computes the scalar loss of one training batch on the model it is given.
        config: The run's config; its scores must not steer the freezing
            (:attr:`SAFEConfig.scores_steer` False).
        total_steps: Optimizer steps of the run.
        pattern: Adapter layout, as for :class:`~safefreeze.SAFEOptimizer`.

    Returns:
        The estimate, with the per-prefix step costs it was built from.

    Raises:
        TypeError: If ``config`` is not a :class:`SAFEConfig` or ``loss_fn`` does not return a
            scalar tensor.
        ValueError: If the scores steer ``config``'s freezing (which units freeze is then
            known only after the warm-up), ``total_steps`` is not a positive integer,
            ``loss_fn`` does not run every adapter, or PEFT AdaLoRA still allocates ranks at
            ``warmup_steps``.
        RuntimeError: If a live SAFE engine already drives ``model``'s adapters.
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
        >>> round(estimate.flops, 3), round(estimate.saved_bytes, 3), round(estimate.saved_bytes_last, 3)
        (0.785, 0.715, 0.583)
    """
    if not isinstance(config, SAFEConfig):
        raise TypeError(f"estimate_savings takes the run's SAFEConfig, got {type(config).__name__}")
    if config.scores_steer:
        raise ValueError(
            "estimate_savings predicts the rules the scores do not steer (order='depth' with "
            f"normalization='rank'); got order={config.order!r}, normalization={config.normalization!r}, "
            "under which the units that freeze are known only once the warm-up is scored"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"estimate_savings requires an integer total_steps >= 1, got {total_steps!r}")
    pairs = [p for p in find_adapter_pairs(model, pattern) if p.trainable]
    if not pairs:
        raise AdapterDiscoveryError(
            f"adapter pattern {pattern or AdapterPattern()} found adapters but none has a trainable "
            "parameter; estimate_savings takes the model as it will be trained"
        )
    _check_not_driven(model, pairs)
    check_adalora_schedule(model, config.warmup_steps)
    units = tuple(group_units([p.name for p in pairs], config.units, config.group_by))
    # Every unit is taken to get a finite score: the rule then freezes tau(t) * units of them,
    # lowest first. _prefix_costs refuses a model with an adapter that loss_fn does not run.
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
    # Step t (1-based) runs with the units frozen when step t - 1 ended; a freeze at the last
    # step saves nothing within the run, so its prefix is not measured.
    used = counts[total_steps - 1]
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):  # dropout draws here
        costs = tuple(_prefix_costs(model, loss_fn, config, pattern, k, len(units)) for k in range(used + 1))
    per_step = [costs[counts[t - 1]] for t in range(1, total_steps + 1)]
    lora = costs[0]
    last = counts[total_steps]
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
        saved_bytes_last=per_step[-1].saved_bytes / lora.saved_bytes,
    )


def _check_not_driven(model: nn.Module, pairs: Sequence[AdapterPair]) -> None:
    """Refuse a model whose adapters a live SAFE engine drives: its freezes and hooks would be copied."""
    engine = live_owner([model.get_submodule(pair.site) for pair in pairs])
    if engine is not None:
        raise RuntimeError(
            "estimate_savings takes the model before SAFE wraps it, but a live SAFE engine already "
            f"drives its adapters (step {engine.step}, {len(engine.frozen_units)} unit(s) frozen); "
            "estimate before building the SAFEOptimizer, or on a model no engine drives"
        )


def _prefix_costs(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    config: SAFEConfig,
    pattern: AdapterPattern | Sequence[AdapterPattern] | None,
    k: int,
    units: int,
) -> StepCosts:
    """One training step's costs on a copy of ``model`` whose lowest ``k`` units ``config`` froze."""
    trial = copy.deepcopy(model)
    trial.train()  # the run trains, whatever mode the model was handed in
    engine = None
    ran: set[str] = set()
    handles = []
    if k:
        # The run's config with a threshold that lets exactly the lowest k units freeze at the
        # end of the warm-up; the steps before it do nothing once the scores are final.
        engine = FreezeController(
            trial,
            dataclasses.replace(config, freeze_end_step=config.warmup_steps, tau_target=k / units),
            pattern=pattern,
        )
        engine.finalize_scores(dict.fromkeys(engine.units, 0.0))
        for _ in range(config.warmup_steps):
            engine.on_step_end()
    else:  # which adapters the loss runs: one that never runs gets no score and never freezes
        trainable = [p for p in find_adapter_pairs(trial, pattern) if p.trainable]
        for pair in trainable:
            site = trial.get_submodule(pair.site)
            handles.append(site.register_forward_hook(lambda *_, name=pair.name: ran.add(name)))
    # With the engine live, as in the run: eval_frozen holds its frozen blocks, or their
    # attention, in evaluation mode.
    try:
        _, costs = measure_step(trial, functools.partial(_checked_loss, loss_fn, trial))
    finally:
        for handle in handles:
            handle.remove()
        if engine is not None:
            engine.close()
    if not k:
        idle = [p.name for p in trainable if p.name not in ran]
        if idle:
            raise ValueError(
                f"loss_fn's forward does not run {len(idle)} adapter(s), e.g. {idle[:3]}: the warm-up "
                "could not score them and the run would never freeze them, so its freezes cannot be "
                "predicted; pass a loss_fn that runs the model as training does"
            )
    del trial, engine
    gc.collect()  # the engine and the copy hold each other: free this copy before the next
    return costs


def _checked_loss(loss_fn: Callable[[nn.Module], torch.Tensor], model: nn.Module) -> torch.Tensor:
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        kind = type(loss).__name__
        described = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else kind
        raise TypeError(
            f"loss_fn must return the scalar loss tensor of one training batch, got {described} "
            "(for a Hugging Face model return model(**batch).loss)"
        )
    return loss
