"""``FreezeController``: the one stateful engine. record -> score -> threshold -> freeze -> plan.

It does not own the step counter: whoever owns the training loop (``SAFEOptimizer``, a
framework callback) calls :meth:`FreezeController.on_step_end` once per optimizer step.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from safefreeze.cka._torch import CKAAccumulator
from safefreeze.config import SAFEConfig
from safefreeze.discovery import AdapterDiscoveryError, AdapterPair, AdapterPattern, find_adapter_pairs
from safefreeze.hooks import ScoreRecorder
from safefreeze.plan import AdapterRecord, FreezeEvent, FreezePlan, PlanError, PlanMismatchError
from safefreeze.schedule import cubic_threshold
from safefreeze.selection import lowest_first, normalize_scores, select_to_freeze

# Called with the parameters to freeze; returns the optimizer-state bytes it freed.
Freezer = Callable[[list[nn.Parameter]], int]
FreezeCallback = Callable[[FreezeEvent], None]


class FreezeController:
    """Scores adapters during the warm-up, then freezes them on the cubic threshold.

    Without a plan it registers forward hooks on the pairs, scores the training forwards
    of sampled warm-up steps, removes the hooks at ``warmup_steps`` and finalizes the
    scores. With a plan it registers nothing and freezes what the plan says, when it says.

    Args:
        model: The model holding the adapters.
        config: The method's settings; ignored when ``plan`` is given (the plan's is used).
        plan: A recorded plan to replay instead of scoring.
        pattern: Adapter layout (default: PEFT LoRA).
        freezer: Drops parameters from training and returns optimizer-state bytes freed;
            by default only ``requires_grad_(False)`` and ``grad = None``.

    Raises:
        AdapterDiscoveryError: If no trainable adapter is found.
        PlanMismatchError: If ``plan`` was recorded on different adapters.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SAFEConfig | None = None,
        *,
        plan: FreezePlan | None = None,
        pattern: AdapterPattern | None = None,
        freezer: Freezer | None = None,
    ) -> None:
        pairs = [p for p in find_adapter_pairs(model, pattern) if p.trainable]
        if not pairs:
            raise AdapterDiscoveryError(
                f"adapter pattern {pattern or AdapterPattern()} found adapters but none has a "
                "trainable parameter; mark the adapters trainable before wrapping the optimizer"
            )
        params = dict(model.named_parameters())
        self.model = model
        self.pairs: list[AdapterPair] = pairs
        self._params = {p.name: [params[n] for n in p.param_names] for p in pairs}
        records = [
            AdapterRecord(p.name, tuple((n, tuple(params[n].shape)) for n in p.param_names)) for p in pairs
        ]
        self._replay: dict[int, FreezeEvent] = {}
        if plan is not None:
            plan.check_matches(records)
            config = plan.config
            self._replay = _events_by_step(plan)
        self.config = config or SAFEConfig()
        self.units = _units(pairs, self.config.group_by)
        if plan is not None and plan.units and plan.units != self.units:
            raise PlanMismatchError(
                "the freeze plan's units do not match this model's: the plan has "
                f"{sorted(set(plan.units) - set(self.units))[:3]} that the model lacks and the model "
                f"{sorted(set(self.units) - set(plan.units))[:3]} that the plan lacks"
            )
        self.plan = FreezePlan(config=self.config, adapters=records, units=self.units)
        if plan is not None:
            self.plan.raw_scores = dict(plan.raw_scores)
            self.plan.normalized_scores = dict(plan.normalized_scores)
            self.plan.scored_at = plan.scored_at
        self.step = 0
        self.frozen: dict[str, int] = {}  # unit -> step it froze at
        self.callbacks: list[FreezeCallback] = []
        self._freezer = freezer or _detach_only
        self._warned_prefix = False
        self._accumulator: CKAAccumulator | None = None
        self._recorder: ScoreRecorder | None = None
        if plan is None:
            device = next(iter(self._params.values()))[0].device
            generator = torch.Generator(device=device).manual_seed(self.config.seed)
            self._accumulator = CKAAccumulator(
                len(pairs), max_rows=self.config.max_tokens, generator=generator, device=device
            )
            self._recorder = ScoreRecorder(model, pairs, self._accumulator)

    # ---- reading -----------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """Whether freezes come from a recorded plan rather than from scoring."""
        return self._accumulator is None

    @property
    def scoring(self) -> bool:
        """Whether scoring hooks are attached (only during the warm-up of a recording run)."""
        return self._recorder is not None and self._recorder.attached

    @property
    def scores(self) -> dict[str, float]:
        """Normalized score per freeze unit: final after the warm-up, running before it."""
        if self.plan.scored_at is not None:
            return dict(self.plan.normalized_scores)
        if self._accumulator is None or not bool(self._accumulator.defined().any()):
            return {}
        return normalize_scores(self._raw_scores(warn=False), self.config.normalization)

    @property
    def frozen_adapters(self) -> list[str]:
        """Names of the frozen adapters, in model order."""
        done = {a for unit in self.frozen for a in self.units[unit]}
        return [p.name for p in self.pairs if p.name in done]

    def trainable_params(self) -> list[nn.Parameter]:
        """Adapter parameters not frozen yet."""
        done = set(self.frozen_adapters)
        return [p for name, ps in self._params.items() if name not in done for p in ps]

    # ---- driving ----------------------------------------------------------------------

    def on_step_end(self) -> FreezeEvent | None:
        """Advance one optimizer step; score, finalize or freeze as the schedule says.

        Returns:
            The freeze event of this step, or None when nothing froze.
        """
        self.step += 1
        cfg = self.config
        if self._recorder is not None:
            if self.step >= cfg.warmup_steps:
                self._finalize()
            else:
                self._recorder.enabled = self.step % cfg.score_every == 0
        if self.replaying:
            event = self._replay.get(self.step)
            return self._freeze(event.units, event.threshold) if event else None
        if self.step < cfg.warmup_steps:
            return None
        threshold = cubic_threshold(
            self.step,
            warmup_steps=cfg.warmup_steps,
            freeze_end_step=cfg.freeze_end_step,
            tau_target=cfg.tau_target,
        )
        scores = self.plan.normalized_scores
        if cfg.order == "depth":
            # As many units as score below the threshold, taken from the bottom of the model.
            below = len(select_to_freeze(scores, threshold))
            chosen = lowest_first(list(self.units), scores, below - len(self.frozen), self.frozen)
        else:
            chosen = select_to_freeze(scores, threshold, self.frozen)
        return self._freeze(chosen, threshold) if chosen else None

    def close(self) -> None:
        """Remove any hook still attached."""
        if self._recorder is not None:
            self._recorder.remove()

    # ---- internals --------------------------------------------------------------------

    def _raw_scores(self, *, warn: bool) -> dict[str, float]:
        acc = self._accumulator
        if acc is None:
            return dict(self.plan.raw_scores)
        cka = acc.values(strict=False).tolist()
        # 1 - CKA, with CKA clipped to [0, 1]; NaN (no usable score) stays NaN.
        per_adapter = {
            pair.name: math.nan if math.isnan(c) else 1.0 - min(max(c, 0.0), 1.0)
            for pair, c in zip(self.pairs, cka, strict=True)
        }
        if warn and any(math.isnan(c) for c in cka):
            bad = [p.name for p, c in zip(self.pairs, cka, strict=True) if math.isnan(c)]
            warnings.warn(
                f"{len(bad)} adapter(s) got no usable score during the warm-up (all rows NaN/Inf, "
                f"constant outputs or no training forward); they will never be frozen: {bad[:5]}",
                stacklevel=3,
            )
        # A unit is as important as its most important member; NaN members keep it unfrozen.
        return {
            unit: max((per_adapter[a] for a in members), key=lambda s: math.inf if math.isnan(s) else s)
            for unit, members in self.units.items()
        }

    def _finalize(self) -> None:
        if self._recorder is None:
            return
        self._recorder.remove()
        self._recorder = None
        raw = self._raw_scores(warn=True)
        self.plan.raw_scores = raw
        self.plan.normalized_scores = normalize_scores(raw, self.config.normalization)
        self.plan.scored_at = self.step

    def _freeze(self, units: Sequence[str], threshold: float) -> FreezeEvent | None:
        units = [u for u in units if u not in self.frozen]
        if not units:
            return None
        unknown = [u for u in units if u not in self.units]
        if unknown:
            raise PlanError(f"freeze unit(s) {unknown} are not units of this model")
        adapters = [a for u in units for a in self.units[u]]
        params = [p for a in adapters for p in self._params[a]]
        state_bytes = self._freezer(params)
        for unit in units:
            self.frozen[unit] = self.step
        event = FreezeEvent(
            step=self.step,
            units=tuple(units),
            adapters=tuple(adapters),
            threshold=threshold,
            raw_scores={u: self.plan.raw_scores.get(u, math.nan) for u in units},
            normalized_scores={u: self.plan.normalized_scores.get(u, math.nan) for u in units},
            params_freed=sum(p.numel() for p in params),
            state_bytes_freed=state_bytes,
        )
        self.plan.events.append(event)
        self._watch_prefix()
        for callback in self.callbacks:
            callback(event)
        return event

    def _watch_prefix(self) -> None:
        """Warn once if the frozen lower prefix still gets a grad-requiring input."""
        if self._warned_prefix or self.pairs[0].name not in set(self.frozen_adapters):
            return
        first = self.pairs[0]
        site = self.model.get_submodule(first.site)

        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            handle.remove()
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and x.requires_grad and module.training and torch.is_grad_enabled():
                self._warned_prefix = True
                warnings.warn(
                    f"the input of the lowest frozen adapter {first.name!r} requires grad, so "
                    "autograd still stores activations and does backward work for the frozen "
                    "layers below the first trainable adapter; usual causes: Hugging Face "
                    "enable_input_require_grads() (used with gradient checkpointing) or a "
                    "trainable embedding. Freezing still drops gradients and optimizer state.",
                    stacklevel=2,
                )

        handle = site.register_forward_pre_hook(check)

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: step, frozen units, accumulator and the plan so far."""
        return {
            "step": self.step,
            "frozen": dict(self.frozen),
            "accumulator": None if self._accumulator is None else self._accumulator.state_dict(),
            "scoring": self.scoring,
            "plan": self.plan.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, re-applying every freeze it records.

        Raises:
            PlanMismatchError: If the state was saved on different adapters.
        """
        saved = FreezePlan.from_dict(state["plan"], source="checkpoint")
        saved.check_matches(self.plan.adapters)
        if saved.config != self.config:
            changed = {
                k: (v, getattr(self.config, k))
                for k, v in saved.config.to_dict().items()
                if getattr(self.config, k) != v
            }
            raise ValueError(
                "the checkpoint was written under another SAFEConfig; (checkpoint, this run) values "
                f"that differ: {changed}; resume with the checkpoint's config"
            )
        self.step = int(state["step"])
        for event in saved.events:
            if not all(u in self.frozen for u in event.units):
                params = [p for a in event.adapters for p in self._params[a]]
                self._freezer(params)
        self.frozen = {str(k): int(v) for k, v in state["frozen"].items()}
        self.plan = saved
        if self._accumulator is not None and state["accumulator"] is not None:
            self._accumulator.load_state_dict(state["accumulator"])
        if self._recorder is not None:
            if state["scoring"]:
                self._recorder.enabled = self.step % self.config.score_every == 0
            else:
                self._recorder.remove()
                self._recorder = None
        if self.frozen:
            self._watch_prefix()


def _detach_only(params: list[nn.Parameter]) -> int:
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return 0


def _units(pairs: Sequence[AdapterPair], group_by: str | None) -> dict[str, list[str]]:
    units: dict[str, list[str]] = {}
    for pair in pairs:
        match = re.fullmatch(group_by, pair.name) if group_by else None
        key = ".".join(g or "" for g in match.groups()) if match else pair.name
        units.setdefault(key, []).append(pair.name)
    return units


def _events_by_step(plan: FreezePlan) -> dict[int, FreezeEvent]:
    events: dict[int, FreezeEvent] = {}
    for event in plan.events:
        if event.step in events:
            raise PlanError(f"the plan has two events at step {event.step}")
        events[event.step] = event
    return events
