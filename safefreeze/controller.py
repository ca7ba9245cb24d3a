"""``FreezeController``: the one stateful engine. record -> score -> threshold -> freeze -> plan.

It does not own the step counter: whoever owns the training loop (``SAFEOptimizer``, a
framework callback) calls :meth:`FreezeController.on_step_end` once per optimizer step.
The plan is the engine's record of the run; the engine decides from its own state.

Words, one per concept: an *adapter* is one adapted module (:class:`AdapterPair`); a
*unit* is the set of adapters frozen together (a transformer block by default); a unit
or adapter is *frozen* once a freeze event named it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safefreeze import merge as _merge
from safefreeze.cka._torch import NUM_STATS, STAT_NAMES, CKAAccumulator
from safefreeze.config import EVAL_ATTENTION, SAFEConfig
from safefreeze.discovery import (
    AdapterDiscoveryError,
    AdapterPair,
    AdapterPattern,
    attention_modules,
    check_adalora_schedule,
    find_adapter_pairs,
)
from safefreeze.hooks import MaskFn, ScoreRecorder, in_backward, run_eagerly
from safefreeze.plan import (
    SCHEMA_VERSION,
    AdapterRecord,
    FreezeEvent,
    FreezePlan,
    PlanError,
    PlanMismatchError,
    check_frozen_matches_events,
)
from safefreeze.schedule import cubic_threshold
from safefreeze.selection import group_units, lower_prefix, lowest_first, normalize_scores, select_to_freeze

# Called with the parameters to freeze; returns the optimizer-state bytes it freed.
Freezer = Callable[[list[nn.Parameter]], int]
# Called with every freeze event, after the parameters left training.
FreezeCallback = Callable[[FreezeEvent], None]

# Adapter site module -> the live engine that drives it. Two live engines on one model
# would each step parameters the other froze; weak on both sides, so a collected
# engine or model leaves nothing behind.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[FreezeController]] = weakref.WeakKeyDictionary()
# Keys of the engine's own checkpoint state by version: 1, 2, and 3 on (merged sites).
_STATE_KEYS_V1 = {"step", "frozen", "accumulator", "scoring", "plan"}
_STATE_KEYS_V2 = {"version", "step", "accumulator", "plan"}
_STATE_KEYS = {*_STATE_KEYS_V2, "merged"}


class FreezeController:
    """Scores adapters during the warm-up, then freezes them on the cubic threshold.

    Without a plan it registers forward hooks on the pairs, scores the training forwards
    of sampled warm-up steps, and at ``warmup_steps`` calls :meth:`finalize_scores`,
    which removes the hooks and fixes the scores. With a plan it registers nothing and
    freezes the plan's units at the plan's steps.

    One live engine per model: :meth:`close` (or collecting the engine) removes every hook
    it registered and lets another engine take the model.

    Args:
        model: The model holding the adapters.
        config: The method's settings; ignored when ``plan`` is given (the plan's is used).
        plan: A recorded plan to replay instead of scoring. Its units are used as recorded;
            nothing in it is evaluated.
        pattern: Adapter layout, or a list of layouts for a model that mixes them
            (default: the PEFT tuners LoRA, AdaLoRA, LoHa, LoKr and IA3).
        freezer: Drops parameters from training and returns optimizer-state bytes freed;
            by default only ``requires_grad_(False)`` and ``grad = None``. A bound method
            is held weakly, so the engine never keeps its optimizer alive.
        mask_fn: Called with ``model``'s forward ``(args, kwargs)`` on every scored forward;
            returns the padding mask (bool ``(B, T)``, True for real tokens) or None for a
            batch without padding. Default: the ``attention_mask`` argument of the model or
            of the outermost module inside it that takes one, by keyword or position.

    Raises:
        AdapterDiscoveryError: If no trainable adapter is found.
        PlanMismatchError: If ``plan`` was recorded on different adapters.
        RuntimeError: If another live engine already drives these adapters.
        TypeError: If ``mask_fn`` is not callable.
        ValueError: If PEFT AdaLoRA still allocates ranks at ``warmup_steps``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SAFEConfig | None = None,
        *,
        plan: FreezePlan | None = None,
        pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
        freezer: Freezer | None = None,
        mask_fn: MaskFn | None = None,
    ) -> None:
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(
                f"mask_fn must be a callable (args, kwargs) -> bool (B, T) mask or None, got "
                f"{type(mask_fn).__name__}"
            )
        pairs = [p for p in find_adapter_pairs(model, pattern) if p.trainable]
        if not pairs:
            raise AdapterDiscoveryError(
                f"adapter pattern {pattern or AdapterPattern()} found adapters but none has a "
                "trainable parameter; mark the adapters trainable before wrapping the optimizer"
            )
        sites = [model.get_submodule(p.site) for p in pairs]
        _check_unowned(sites)
        params = dict(model.named_parameters())
        self.model = model
        self.pairs: list[AdapterPair] = pairs
        self._params = {p.name: [params[n] for n in p.param_names] for p in pairs}
        records = [
            AdapterRecord(p.name, tuple((n, tuple(params[n].shape)) for n in p.param_names)) for p in pairs
        ]
        self._replay: dict[int, FreezeEvent] | None = None
        if plan is not None:
            plan.check_matches(records)
            config = plan.config
            self.units = _recorded_units(plan, pairs)
            self._replay = _events_by_step(plan, self.units)
        self.config = config or SAFEConfig()
        check_adalora_schedule(model, self.config.warmup_steps)
        if plan is None:
            self.units = group_units([p.name for p in pairs], self.config.units, self.config.group_by)
        # Site name -> its adapters; a site is merged once all of them are frozen.
        self._sites: dict[str, list[AdapterPair]] = {}
        for pair in pairs:
            self._sites.setdefault(pair.site, []).append(pair)
        # Merged site -> digests of its base weights (before, after the merge).
        self._merged: dict[str, tuple[str, str]] = {}
        self.plan = FreezePlan(config=self.config, adapters=records, units=self.units)
        # Final (raw, normalized) scores per unit: None until finalize_scores().
        self._final: tuple[dict[str, float], dict[str, float]] | None = None
        if plan is not None and plan.scored_at is not None:
            self._set_final(dict(plan.raw_scores), dict(plan.normalized_scores), plan.scored_at)
        self.step = 0
        self._callbacks: list[FreezeCallback] = []
        self._freezer = _hold(freezer)
        self._warned_prefix = False
        self._closed = False
        self._accumulator: CKAAccumulator | None = None
        self._hooks = _Hooks()
        if plan is None:
            device = next(iter(self._params.values()))[0].device
            generator = torch.Generator().manual_seed(self.config.seed)  # rows are drawn on the host
            self._accumulator = CKAAccumulator(
                len(pairs), max_rows=self.config.max_tokens, generator=generator, device=device
            )
            self._hooks.recorder = ScoreRecorder(model, pairs, self._accumulator, mask_fn=mask_fn)
        # Hooks go when the engine is closed or collected, whichever comes first.
        weakref.finalize(self, self._hooks.remove)
        ref = weakref.ref(self)
        for site in sites:
            _OWNERS[site] = ref

    # ---- reading -----------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """Whether freezes come from a recorded plan rather than from scoring."""
        return self._replay is not None

    @property
    def scoring(self) -> bool:
        """Whether the warm-up of a recording run goes on, its scores not yet final.

        Within it, the forwards of every :attr:`SAFEConfig.score_interval`-th step are scored
        (:attr:`scoring_now`).
        """
        return self._hooks.recorder is not None

    @property
    def scoring_now(self) -> bool:
        """Whether the training forwards of the current step are scored: the hooks are on the model."""
        recorder = self._hooks.recorder
        return recorder is not None and recorder.enabled

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def scores(self) -> dict[str, float]:
        """Normalized score per unit: final after the warm-up, running before it."""
        if self._final is not None:
            return dict(self._final[1])
        if self._accumulator is None or not bool(self._accumulator.defined().any()):
            return {}
        return normalize_scores(self._unit_scores(warn=False), self.config.normalization)

    @property
    def raw_scores(self) -> dict[str, float]:
        """Final raw score (``1 - CKA``) per unit; empty until :meth:`finalize_scores`."""
        return {} if self._final is None else dict(self._final[0])

    @property
    def frozen_units(self) -> list[str]:
        """Names of the frozen units, in model order."""
        done = self.plan.unit_freeze_steps
        return [u for u in self.units if u in done]

    @property
    def frozen_adapters(self) -> list[str]:
        """Names of the frozen adapters, in model order."""
        done = self.plan.adapter_freeze_steps
        return [p.name for p in self.pairs if p.name in done]

    @property
    def merged_sites(self) -> list[str]:
        """Sites whose frozen adapters were merged into their base weights, in merge order."""
        return list(self._merged)

    @property
    def callbacks(self) -> tuple[FreezeCallback, ...]:
        """The freeze callbacks, in call order (change them with add/remove_callback)."""
        return tuple(self._callbacks)

    def trainable_params(self) -> list[nn.Parameter]:
        """Adapter parameters not frozen yet."""
        done = self.plan.adapter_freeze_steps
        return [p for name, ps in self._params.items() if name not in done for p in ps]

    # ---- driving ----------------------------------------------------------------------

    def add_callback(self, callback: FreezeCallback) -> None:
        """Call ``callback(event)`` after every freeze event."""
        self._callbacks.append(callback)

    def remove_callback(self, callback: FreezeCallback) -> None:
        """Stop calling ``callback``; a callback that is not subscribed is ignored."""
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def on_step_end(self) -> FreezeEvent | None:
        """Advance one optimizer step; score, finalize or freeze as the schedule says.

        Returns:
            The freeze event of this step, or None when nothing froze.

        Raises:
            RuntimeError: If the engine was closed.
        """
        if self._closed:
            raise RuntimeError(
                "this SAFE engine was closed; build a new SAFEOptimizer (or FreezeController) to go on"
            )
        self.step += 1
        cfg = self.config
        if self._replay is not None:
            event = self._replay.get(self.step)
            return self._freeze(event.units, event.threshold) if event else None
        recorder = self._hooks.recorder
        if self._final is None and self.step >= cfg.warmup_steps:
            self.finalize_scores()
        elif recorder is not None:
            recorder.enabled = self.step % cfg.score_interval == 0
        if self.step < cfg.warmup_steps:
            return None
        threshold = cubic_threshold(
            self.step,
            warmup_steps=cfg.warmup_steps,
            freeze_end_step=cfg.freeze_end_step,
            tau_target=cfg.tau_target,
        )
        return self._freeze(self._select(threshold), threshold)

    def finalize_scores(self, raw_scores: Mapping[str, float] | None = None) -> dict[str, float]:
        """End scoring and fix the scores that every later freeze decision uses.

        Runs by itself at ``warmup_steps``. Call it yourself to end the warm-up's scoring
        early, or to set the raw scores (``1 - CKA`` per unit) from elsewhere. The scores are
        recorded in the plan.

        In a ``torch.distributed`` group of several processes this is a collective: every
        rank must call it at the same step (``on_step_end`` does). The CKA statistics are
        summed over the ranks first, and every rank checks that all ranks hold the same
        config, adapters, units, step and final scores; if any differs, or any rank fails
        here, every rank raises ``safefreeze.distributed.RankDisagreementError``.

        Args:
            raw_scores: Raw score per unit, every unit; default: from the CKA statistics
                gathered so far (units without a usable score get NaN and never freeze).

        Returns:
            The normalized scores per unit.

        Raises:
            RuntimeError: If the scores are already final, or the engine replays a plan.
            ValueError: If ``raw_scores`` misses a unit, names an unknown one, or holds a
                negative or infinite value.
            RankDisagreementError: Under several ranks, on every rank, if the ranks disagree
                or any rank failed (a bad ``raw_scores`` included).
        """
        if self._replay is not None:
            raise RuntimeError(
                "a replaying engine takes its scores from the plan; there is nothing to finalize"
            )
        if self._final is not None:
            raise RuntimeError(f"the scores are already final (since step {self.plan.scored_at})")
        from safefreeze import distributed as _distributed

        def decide() -> tuple[dict[str, float], dict[str, float]]:
            if raw_scores is None:
                raw = self._unit_scores(warn=True)
            else:
                raw = _checked_scores(raw_scores, self.units)
            return raw, normalize_scores(raw, self.config.normalization)

        if self._accumulator is not None and _distributed.world_size() > 1:
            # Every rank sums its statistics with the others', decides, and checks that all
            # decided alike; later freezes follow from (scores, config, step) alone.
            context = {
                "config": self.config.to_dict(),
                "adapters": self.plan.fingerprint,
                "units": self.units,
                "step": self.step,
            }
            raw, normalized = _distributed.finalize_across_ranks(self._accumulator, decide, context)
        else:
            raw, normalized = decide()
        self._hooks.remove_recorder()
        self._set_final(raw, normalized, self.step)
        return self.scores

    def close(self) -> None:
        """Remove every hook this engine registered and release the model; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._hooks.remove()
        for site, ref in list(_OWNERS.items()):
            if ref() is self:
                del _OWNERS[site]

    # ---- internals --------------------------------------------------------------------

    def _set_final(self, raw: dict[str, float], normalized: dict[str, float], step: int) -> None:
        self._final = (raw, normalized)
        self.plan.raw_scores = dict(raw)
        self.plan.normalized_scores = dict(normalized)
        self.plan.scored_at = step

    def _select(self, threshold: float) -> list[str]:
        if self._final is None:  # not reached: on_step_end finalizes before selecting
            return []
        scores = self._final[1]
        frozen = self.plan.unit_freeze_steps
        if self.config.order == "prefix":
            return lower_prefix(list(self.units), scores, threshold, frozen)
        if self.config.order == "depth":
            # As many units as score below the threshold, taken from the bottom of the model.
            below = len(select_to_freeze(scores, threshold))
            return lowest_first(list(self.units), scores, below - len(frozen), frozen)
        return select_to_freeze(scores, threshold, frozen)

    def _unit_scores(self, *, warn: bool) -> dict[str, float]:
        """Raw score per unit from the CKA statistics: ``1 - CKA``, NaN where undefined."""
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
            # The accumulator's reason names the adapter by index; name it here instead.
            reasons = [
                f"{p.name!r}: {str(acc.undefined_reason(i)).split(': ', 1)[-1]}"
                for i, (p, c) in enumerate(zip(self.pairs, cka, strict=True))
                if math.isnan(c)
            ]
            warnings.warn(
                f"{len(reasons)} adapter(s) got no usable score during the warm-up and will never be "
                f"frozen: {'; '.join(reasons[:5])}"
                + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""),
                stacklevel=3,
            )
        # A unit is as important as its most important member; NaN members keep it unfrozen.
        return {
            unit: max((per_adapter[a] for a in members), key=lambda s: math.inf if math.isnan(s) else s)
            for unit, members in self.units.items()
        }

    def _freeze(self, units: Sequence[str], threshold: float) -> FreezeEvent | None:
        done = self.plan.unit_freeze_steps
        units = [u for u in units if u not in done]
        if not units:
            return None
        adapters = [a for u in units for a in self.units[u]]
        params = [p for a in adapters for p in self._params[a]]
        state_bytes = self._freeze_params(params)
        raw, normalized = self._final or ({}, {})
        event = FreezeEvent(
            step=self.step,
            units=tuple(units),
            adapters=tuple(adapters),
            threshold=threshold,
            raw_scores={u: raw.get(u, math.nan) for u in units},
            normalized_scores={u: normalized.get(u, math.nan) for u in units},
            params_freed=sum(p.numel() for p in params),
            state_bytes_freed=state_bytes,
        )
        self.plan.events.append(event)
        self._merge_frozen_sites(adapters)
        self._hold_frozen_eval()
        self._watch_prefix()
        for callback in list(self._callbacks):
            callback(event)
        return event

    def _merge_frozen_sites(self, adapters: Sequence[str]) -> None:
        """Merge the sites of ``adapters`` whose adapters are now all frozen (``config.merge``)."""
        if not self.config.merge:
            return
        frozen, named = self.plan.adapter_freeze_steps, set(adapters)
        for site in dict.fromkeys(p.site for p in self.pairs if p.name in named):
            names = self._mergeable(site, frozen)
            if names is not None:
                self._merged[site] = _merge.merge(self.model.get_submodule(site), names)

    def _mergeable(self, site: str, frozen: Mapping[str, int]) -> list[str] | None:
        """The adapter names to merge at ``site``, or None if it cannot or must not be merged."""
        pairs = self._sites[site]
        names = [p.adapter for p in pairs]
        if site in self._merged or any(p.name not in frozen for p in pairs) or None in names:
            return None
        module = self.model.get_submodule(site)
        # PEFT runs only the base layer once anything is merged: every active adapter must be ours.
        active = getattr(module, "active_adapters", names)
        if not _merge.mergeable(module) or not set(active) <= set(names):
            return None
        return [n for n in names if n is not None]

    def _unit_modules(self, unit: str) -> list[str]:
        """Names of the modules that make up ``unit``: its block, or else its adapters' sites."""
        members = set(self.units[unit])
        sites = list(dict.fromkeys(p.site for p in self.pairs if p.name in members))
        block = unit.split(":", 1)[0]
        try:
            self.model.get_submodule(block)
        except AttributeError:
            return sites
        inside = all(site == block or site.startswith(block + ".") for site in sites)
        return [block] if inside else sites

    def _hold_frozen_eval(self) -> None:
        """Put the frozen units, or their attention modules, in evaluation mode, now and at each
        training forward (``eval_frozen``)."""
        if not self.config.eval_frozen:
            return
        frozen = self.plan.unit_freeze_steps
        names = tuple(dict.fromkeys(m for u in self.units if u in frozen for m in self._unit_modules(u)))
        if self.config.eval_frozen == EVAL_ATTENTION:
            names = tuple(a for m in names for a in attention_modules(self.model, m))
        if names:
            self._hooks.hold_eval(self.model, names)

    def _freeze_params(self, params: list[nn.Parameter]) -> int:
        freezer = self._freezer()
        return (freezer or _detach_only)(params)

    def _watch_prefix(self) -> None:
        """Warn once if the frozen lower prefix still gets a grad-requiring input.

        The check waits for a training forward that builds a graph: reentrant gradient
        checkpointing runs the forward under ``no_grad`` and recomputes it during backward,
        where the frozen layers are backpropagated through whenever their input requires grad.
        """
        first = self.pairs[0]
        if self._warned_prefix or self._hooks.prefix is not None or first.name not in self.frozen_adapters:
            return
        ref, hooks = weakref.ref(self), self._hooks  # the hook must not keep the engine alive

        @run_eagerly
        def check(module: nn.Module, args: tuple[Any, ...]) -> None:
            engine = ref()
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            recomputed = in_backward()
            # The model's mode, not the site's: eval_frozen holds a frozen site in evaluation mode.
            if engine is not None and not (engine.model.training and (torch.is_grad_enabled() or recomputed)):
                return  # an evaluation or no_grad forward says nothing about training
            hooks.remove_prefix()
            if engine is None or x is None or not x.requires_grad:
                return
            engine._warned_prefix = True
            cause = (
                "reentrant gradient checkpointing (use_reentrant=True) recomputes the frozen layers "
                "during backward and backpropagates through them; use non-reentrant checkpointing "
                "(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) and then model.disable_input_require_grads()"
                if recomputed
                else "usual causes: Hugging Face enable_input_require_grads() (used with gradient "
                "checkpointing; non-reentrant checkpointing does not need it: call "
                "model.disable_input_require_grads()) or a trainable embedding"
            )
            warnings.warn(
                f"the input of the lowest frozen adapter {first.name!r} requires grad, so "
                "autograd still stores activations and does backward work for the frozen "
                f"layers below the first trainable adapter; {cause}. Freezing still drops "
                "gradients and optimizer state.",
                stacklevel=2,
            )

        hooks.prefix = self.model.get_submodule(first.site).register_forward_pre_hook(check)

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: schema version, step, CKA statistics and the plan so far.

        What is frozen, and whether scoring goes on, follow from the plan.
        """
        return {
            "version": SCHEMA_VERSION,
            "step": self.step,
            "accumulator": None
            if self.plan.scored_at is not None or self._accumulator is None
            else self._accumulator.state_dict(),
            "plan": self.plan.to_dict(),
            "merged": {site: list(digests) for site, digests in self._merged.items()},
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict` output, re-applying every freeze it records.

        Everything is checked first; on any error nothing has changed.

        Raises:
            PlanError: If the state is malformed or of an unknown version.
            PlanMismatchError: If the state was saved on different adapters.
            ValueError: If it was saved under another config.
        """
        pending = self.prepare_load(state)
        self._freeze_params(pending.params)
        pending.commit()

    def prepare_load(self, state: Any, *, source: str = "checkpoint") -> PendingLoad:
        """Check ``state`` completely and return what loading it takes, changing nothing.

        ``SAFEOptimizer.load_state_dict`` uses this to validate SAFE's state before it
        touches the wrapped optimizer: the caller freezes :attr:`PendingLoad.params`, then
        calls :meth:`PendingLoad.commit`, which cannot fail.

        Raises:
            PlanError: If the state is malformed, of an unknown version, or inconsistent.
            PlanMismatchError: If it was saved on different adapters or units.
            ValueError: If it was saved under another config.
        """
        state = _migrate_state(state, source)
        saved = FreezePlan.from_dict(state["plan"], source=source)
        saved.check_matches(self.plan.adapters)
        if saved.config != self.config:
            changed = {
                k: (v, getattr(self.config, k))
                for k, v in saved.config.to_dict().items()
                if getattr(self.config, k) != v
            }
            raise ValueError(
                f"the {source} was written under another SAFEConfig; (checkpoint, this run) values "
                f"that differ: {changed}; resume with the checkpoint's config"
            )
        if saved.units != self.units:
            raise PlanMismatchError(f"the {source}'s freeze units differ from this engine's units")
        step = state["step"]
        # A replay carries the recorded scores from its first step; a recording fixes them at scored_at.
        scored = 0 if self._replay is not None else saved.scored_at or 0
        last = max([e.step for e in saved.events] + [scored])
        if not isinstance(step, int) or isinstance(step, bool) or not last <= step < 2**62:
            raise PlanError(f"{source}: step must be an integer >= {last} (its last event), got {step!r}")
        if self._replay is not None:
            for event in saved.events:
                recorded = self._replay.get(event.step)
                if recorded is None or recorded.units != event.units:
                    raise PlanMismatchError(
                        f"the {source} froze {list(event.units)} at step {event.step}, which the "
                        "replayed plan does not"
                    )
        apply_accumulator: Callable[[], None] = _nothing
        acc_state = state["accumulator"]
        if self._accumulator is not None and saved.scored_at is None:
            if acc_state is None:
                raise PlanError(f"{source}: the warm-up had not ended, but the CKA statistics are missing")
            try:
                apply_accumulator = self._accumulator.prepare_load(
                    acc_state, reseed=_reseed(self.config.seed, step)
                )
            except ValueError as err:
                raise PlanError(f"{source}: bad accumulator: {err}") from None
        elif self._accumulator is None and saved.scored_at is None:
            raise PlanError(
                f"{source} was written during a warm-up; this engine replays a plan and cannot score"
            )
        now, then = self.plan.unit_freeze_steps, saved.unit_freeze_steps
        unfrozen = [u for u in now if u not in then]
        if unfrozen:
            raise PlanError(
                f"this engine already froze {unfrozen[:3]}, which the {source} has not frozen; "
                "frozen parameters cannot train again: load checkpoints into a freshly built optimizer"
            )
        params = [p for u in then if u not in now for a in self.units[u] for p in self._params[a]]
        merges = self._prepare_merges(state["merged"], saved, source)

        def commit() -> None:
            self.step = step
            self.plan.events[:] = saved.events
            if saved.scored_at is not None:
                self._hooks.remove_recorder()
                self._set_final(dict(saved.raw_scores), dict(saved.normalized_scores), saved.scored_at)
            else:
                self._final = None
                self.plan.raw_scores, self.plan.normalized_scores, self.plan.scored_at = {}, {}, None
                if self._hooks.recorder is not None:
                    self._hooks.recorder.enabled = step % self.config.score_interval == 0
            apply_accumulator()
            for site, (names, digests, done) in merges.items():
                module = self.model.get_submodule(site)
                if done:
                    _merge.mark_merged(module, names)
                    self._merged[site] = digests
                else:
                    self._merged[site] = _merge.merge(module, names)
            if self.plan.events:
                self._hold_frozen_eval()
                self._watch_prefix()

        return PendingLoad(params, commit)

    def _prepare_merges(
        self, merged: Any, saved: FreezePlan, source: str
    ) -> dict[str, tuple[list[str], tuple[str, str], bool]]:
        """Check a checkpoint's merged sites: site -> (adapters, digests, weights already merged)."""
        if not isinstance(merged, dict):
            raise PlanError(
                f"{source}: merged: expected an object of site -> digests, got {type(merged).__name__}"
            )
        if merged and not self.config.merge:
            raise PlanError(f"{source}: merged: records merged sites, but its config has merge=False")
        frozen = saved.adapter_freeze_steps
        out = {}
        for site, digests in merged.items():
            if not (
                isinstance(digests, list)
                and len(digests) == 2
                and all(isinstance(d, str) and len(d) == 64 for d in digests)
            ):
                raise PlanError(
                    f"{source}: merged[{site!r}]: expected two SHA-256 hex digests, got {digests!r}"
                )
            if site not in self._sites:
                raise PlanMismatchError(f"{source}: merged names {site!r}, which is not an adapter site here")
            if site in self._merged:
                continue
            names = self._mergeable(site, frozen)
            if names is None:
                raise PlanMismatchError(
                    f"{source}: merged names site {site!r}, whose adapters are not all frozen in it or "
                    "which cannot be merged here (not a float32/float64 PEFT LoRA layer)"
                )
            try:
                done = _merge.check_merged(self.model.get_submodule(site), (digests[0], digests[1]))
            except ValueError as err:
                raise PlanError(f"{source}: cannot restore the merged adapter at {site!r}: {err}") from None
            out[site] = (names, (digests[0], digests[1]), done)
        return out


@dataclasses.dataclass(frozen=True)
class PendingLoad:
    """A checked checkpoint state: the parameters to freeze, then the commit that applies it."""

    # Parameters the checkpoint has frozen that this engine has not.
    params: list[nn.Parameter]
    # Applies the state to the engine; cannot fail.
    commit: Callable[[], None]


class _Hooks:
    """The hooks an engine put on the model; removing them never needs the engine."""

    def __init__(self) -> None:
        self.recorder: ScoreRecorder | None = None
        self.prefix: RemovableHandle | None = None
        self.eval: RemovableHandle | None = None

    def hold_eval(self, model: nn.Module, names: tuple[str, ...]) -> None:
        """Keep ``model``'s submodules ``names`` in evaluation mode whenever ``model`` trains.

        ``model.train()`` (which training loops call every epoch or step) puts them back in
        training mode; a pre-hook on ``model`` undoes that before each forward. The hook looks
        the modules up by name, so a deep copy of the model holds its own modules.
        """
        self.remove_eval()

        @run_eagerly
        def hold(module: nn.Module, args: tuple[Any, ...]) -> None:
            if module.training:
                for name in names:
                    held = module.get_submodule(name)
                    if held.training:
                        held.train(False)

        for name in names:
            model.get_submodule(name).train(False)
        self.eval = model.register_forward_pre_hook(hold)

    def remove_eval(self) -> None:
        if self.eval is not None:
            self.eval.remove()
            self.eval = None

    def remove_recorder(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def remove_prefix(self) -> None:
        if self.prefix is not None:
            self.prefix.remove()
            self.prefix = None

    def remove(self) -> None:
        self.remove_recorder()
        self.remove_prefix()
        self.remove_eval()


def live_owner(sites: Sequence[nn.Module]) -> FreezeController | None:
    """The live engine that drives any of ``sites``, or None."""
    for site in sites:
        ref = _OWNERS.get(site)
        owner = None if ref is None else ref()
        if owner is not None and not owner.closed:
            return owner
    return None


def _check_unowned(sites: Sequence[nn.Module]) -> None:
    owner = live_owner(sites)
    if owner is not None:
        raise RuntimeError(
            f"the adapters of this model are already driven by a live SAFE engine ({len(owner.pairs)} "
            "adapters); two would each step parameters the other froze. Call close() on the "
            "first SAFEOptimizer (or use `with SAFEOptimizer(...) as optimizer:`) before wrapping "
            "another optimizer around the same model"
        )


def _hold(freezer: Freezer | None) -> Callable[[], Freezer | None]:
    """A getter for ``freezer``: weak for a bound method (its object owns the engine)."""
    if freezer is None:
        return lambda: None
    if inspect.ismethod(freezer):
        return weakref.WeakMethod(freezer)
    return lambda: freezer


def _detach_only(params: list[nn.Parameter]) -> int:
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return 0


def _nothing() -> None:
    pass


def _reseed(seed: int, step: int) -> int:
    """A scoring seed derived from the config's seed and the step, for a generator reset."""
    return (seed * 0x9E3779B97F4A7C15 + step + 1) % 2**63


def _recorded_units(plan: FreezePlan, pairs: Sequence[AdapterPair]) -> dict[str, list[str]]:
    """The plan's units, checked against the model's adapters; no pattern is evaluated."""
    names = [p.name for p in pairs]
    if not plan.units:
        if plan.config.group_by is not None:
            raise PlanMismatchError("the plan groups adapters (group_by) but records no units; re-record it")
        return {name: [name] for name in names}
    members = [a for m in plan.units.values() for a in m]
    if sorted(members) != sorted(names) or len(set(members)) != len(members):
        raise PlanMismatchError(
            "the plan's units do not cover this model's adapters exactly once: "
            f"{sorted(set(members) - set(names))[:3]} are not adapters here, "
            f"{sorted(set(names) - set(members))[:3]} are in no unit"
        )
    # JSON sorts a plan's keys; the engine lists units in model order, by their first adapter.
    position = {name: i for i, name in enumerate(names)}
    ordered = sorted(plan.units.items(), key=lambda item: min(position[a] for a in item[1]))
    return {unit: list(m) for unit, m in ordered}


def _events_by_step(plan: FreezePlan, units: Mapping[str, list[str]]) -> dict[int, FreezeEvent]:
    events: dict[int, FreezeEvent] = {}
    for event in plan.events:
        if event.step in events:
            raise PlanError(f"the plan has two events at step {event.step}")
        unknown = [u for u in event.units if u not in units]
        if unknown:
            raise PlanMismatchError(
                f"the plan's event at step {event.step} freezes unknown units {unknown[:3]}"
            )
        events[event.step] = event
    return events


def _checked_scores(scores: Mapping[str, float], units: Mapping[str, list[str]]) -> dict[str, float]:
    missing = [u for u in units if u not in scores]
    unknown = [u for u in scores if u not in units]
    if missing or unknown:
        raise ValueError(
            f"finalize_scores needs a raw score for every unit: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    checked = {}
    for unit in units:
        value = scores[unit]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isinf(value):
            raise ValueError(f"raw score of unit {unit!r} must be a number >= 0 (or NaN), got {value!r}")
        checked[unit] = float(value)
    return checked


def _migrate_state(state: Any, source: str) -> dict[str, Any]:
    """The engine's checkpoint state in the current layout, checked for stray or missing keys."""
    if not isinstance(state, dict):
        raise PlanError(f"{source}: SAFE's state must be a dict, got {type(state).__name__}")
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise PlanError(
            f"{source} has SAFE state version {version!r}; this safefreeze reads versions 1 to "
            f"{SCHEMA_VERSION}: upgrade safefreeze to load it"
        )
    expected = {1: _STATE_KEYS_V1, 2: _STATE_KEYS_V2}.get(version, _STATE_KEYS)
    missing, stray = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or stray:
        raise PlanError(
            f"{source} is not a SAFE state of version {version}: missing keys {missing}, "
            f"unexpected keys {stray}"
        )
    if version == 1:
        # Version 1 also saved the frozen units and the scoring flag; both follow from the plan.
        plan = FreezePlan.from_dict(state["plan"], source=source)
        check_frozen_matches_events(state["frozen"], plan, source=source)
        accumulator = state["accumulator"]
        if (
            plan.scored_at is None
            and isinstance(accumulator, dict)
            and isinstance(accumulator.get("stats"), list)
        ):
            # Version 1 summed unscaled minibatches; the sums cannot be continued, so scoring
            # restarts at the resumed step with the same generator.
            warnings.warn(
                f"{source} is a version-1 checkpoint written during the warm-up; its CKA statistics "
                "were summed differently and are dropped, so scoring restarts from the resumed step",
                RuntimeWarning,
                stacklevel=4,
            )
            accumulator = {
                **accumulator,
                "columns": list(STAT_NAMES),
                "stats": [[0.0] * NUM_STATS for _ in accumulator["stats"]],
            }
        state = {"version": 2, "step": state["step"], "accumulator": accumulator, "plan": state["plan"]}
    if state["version"] == 2:
        # Version 2 never merged an adapter.
        state = {**state, "version": SCHEMA_VERSION, "merged": {}}
    return dict(state)
