"""``SAFEOptimizer`` against the bare optimizers it wraps, on a real PEFT LoRA BERT.

Differential tests in the style of torchao and timm: the same seed, data and dropout masks
through the bare optimizer and through the wrapper must give bit-identical weights while
nothing freezes; once adapters freeze, their parameters, gradients and optimizer state
leave training together, and checkpoints resume bit for bit.
"""

from __future__ import annotations

import copy
import io
import json
import re
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import peft_bert, tiny_bert_config
from torch import nn
from torch.optim import Optimizer

from safefreeze import (
    AdapterDiscoveryError,
    FreezeEvent,
    FreezePlan,
    PlanError,
    PlanMismatchError,
    SAFEConfig,
    SAFEOptimizer,
)
from safefreeze.cka._torch import STAT_BATCHES, STAT_NAMES
from safefreeze.plan import SCHEMA_VERSION

BATCH, SEQ, VOCAB, LABELS = 4, 8, 100, 3
STEPS = 12
PREFIX = "base_model.model.bert.encoder.layer"
ADAPTERS = [f"{PREFIX}.{i}.attention.self.{part}" for i in range(2) for part in ("query", "value")]
# The paper's rule throughout: one unit per adapter, scores over the top one, frozen by
# score, nothing merged (so the frozen weights stay the trained ones).
# Crosses the warm-up (step 4) and the end of the schedule (step 8) but freezes nothing.
NEVER = SAFEConfig.paper(warmup_steps=4, freeze_end_step=8, tau_target=0.0, max_tokens=8)
# tau_target=1.0: everything but the top adapter is frozen by step 6.
FREEZE = SAFEConfig.paper(warmup_steps=3, freeze_end_step=6, tau_target=1.0, max_tokens=8)

Groups = list[dict[str, Any]]
Batch = dict[str, torch.Tensor]

OPTIMIZERS: dict[str, Callable[[Groups], Optimizer]] = {
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw_foreach": lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=True),
    "adamw_fused": lambda groups: torch.optim.AdamW(groups, lr=1e-2, fused=True),
    "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=1e-2),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.5),
}


# ---- helpers ---------------------------------------------------------------------------


def make_model(target_modules: tuple[str, ...] = ("query", "value")) -> nn.Module:
    """Tiny 2-layer PEFT LoRA BERT in training mode, LoRA dropout on, same weights every call."""
    model = peft_bert(target_modules, layers=2, seed=0, lora_dropout=0.1)
    model.train()
    return model


def make_groups(model: nn.Module, head_lr: float | None = None) -> Groups:
    """Three groups: the task head, then the LoRA parameters of layer 0 and of layer 1.

    Freezing can empty a layer's group; it must stay (schedulers index groups).
    """
    head: list[nn.Parameter] = []
    layers: list[list[nn.Parameter]] = [[], []]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = re.search(r"layer\.(\d+)\.", name)
        (layers[int(match.group(1))] if match else head).append(param)
    first: dict[str, Any] = {"params": head} if head_lr is None else {"params": head, "lr": head_lr}
    return [first, {"params": layers[0]}, {"params": layers[1]}]


def make_batches(n: int, seed: int = 0) -> list[Batch]:
    """``n`` classification batches with right padding, drawn from their own generator."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)  # (B, T)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)  # (B,)
        mask = (torch.arange(SEQ) < lengths[:, None]).long()  # (B, T)
        labels = torch.randint(0, LABELS, (BATCH,), generator=g)  # (B,)
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return batches


def train(
    model: nn.Module,
    opt: Optimizer,
    batches: list[Batch],
    *,
    accumulate: int = 1,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int], None] | None = None,
    seed: int = 1,
) -> None:
    """Plain loop: forward, backward, (scaler) step, scheduler step, zero_grad.

    Seeds the global RNG once, so two calls see the same dropout masks.
    """
    torch.manual_seed(seed)
    for step, start in enumerate(range(0, len(batches), accumulate), start=1):
        for batch in batches[start : start + accumulate]:
            loss = model(**batch).loss / accumulate
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert differ == []


def adapter_params(opt: SAFEOptimizer) -> dict[str, list[str]]:
    """Adapter name -> its parameter names, as the plan records them."""
    return {a.name: [n for n, _ in a.params] for a in opt.plan.adapters}


def held(opt: Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def state_bytes(opt: Optimizer, names: dict[int, str]) -> dict[str, int]:
    """Optimizer-state bytes per parameter name."""
    return {
        names[id(p)]: sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
        for p, s in opt.state.items()
    }


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
        for name, m in model.named_modules()
    }


def all_keys_are_str(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and all_keys_are_str(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(all_keys_are_str(v) for v in obj)
    return True


def checkpoint_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """Save and load the way a user does: through bytes, with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def scored_at(opt: SAFEOptimizer) -> int | None:
    return opt.plan.scored_at


def scoring(opt: SAFEOptimizer) -> bool:
    return opt.controller.scoring


def accumulator_stats(opt: SAFEOptimizer) -> torch.Tensor:
    """(num_adapters, NUM_STATS) running CKA sums, live (not a copy)."""
    acc = opt.controller._accumulator
    assert acc is not None
    return acc.stats


# ---- 1. compat matrix ------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_never_freezing_is_bit_identical_to_the_bare_optimizer(kind: str) -> None:
    batches = make_batches(STEPS)
    bare_model = make_model()
    train(bare_model, OPTIMIZERS[kind](make_groups(bare_model)), batches)

    model = make_model()
    opt = SAFEOptimizer(OPTIMIZERS[kind](make_groups(model)), model, NEVER)
    train(model, opt, batches)

    assert opt.controller.step == STEPS
    assert scored_at(opt) == NEVER.warmup_steps
    assert sorted(opt.scores) == ADAPTERS  # the hooks did score ...
    assert opt.frozen_adapters == [] and opt.plan.events == []  # ... and nothing froze
    assert_bit_identical(bare_model, model)
    # Not vacuous: training moved the zero-initialised LoRA B matrices.
    b = model.get_parameter(f"{ADAPTERS[0]}.lora_B.default.weight")
    assert b.abs().sum() > 0


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_freezing_drops_params_grads_and_state_together(kind: str) -> None:
    model = make_model()
    opt = SAFEOptimizer(OPTIMIZERS[kind](make_groups(model)), model, FREEZE)
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    snapshots = [weights(model)]
    bytes_per_step = [state_bytes(opt, names)]
    group_counts = [len(opt.param_groups)]

    def record(step: int) -> None:
        snapshots.append(weights(model))
        bytes_per_step.append(state_bytes(opt, names))
        group_counts.append(len(opt.param_groups))

    train(model, opt, make_batches(10), on_step=record)

    assert group_counts == [3] * 11
    events = opt.plan.events
    assert events, "tau_target=1.0 must freeze something"
    assert [e.step for e in events] == sorted({e.step for e in events})
    assert all(FREEZE.warmup_steps < e.step <= FREEZE.freeze_end_step for e in events)
    # At freeze_end_step tau = 1.0: every adapter but the top-scoring one is frozen.
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    assert sorted(a for e in events for a in e.adapters) == sorted(opt.frozen_adapters)
    owned = adapter_params(opt)
    frozen_names = {n for a in opt.frozen_adapters for n in owned[a]}

    for event in events:
        names_here = [n for a in event.adapters for n in owned[a]]
        before, after = bytes_per_step[event.step - 1], bytes_per_step[event.step]
        expected = sum(before[n] for n in names_here)
        assert expected > 0
        assert event.state_bytes_freed == expected
        assert sum(after.values()) == sum(before.values()) - expected
        assert not set(names_here) & set(after)
        assert event.params_freed == sum(params[n].numel() for n in names_here)
        # Values never change after the step that froze them.
        for snap in snapshots[event.step :]:
            assert all(torch.equal(snap[n], snapshots[event.step][n]) for n in names_here)

    for n in frozen_names:
        p = params[n]
        assert not p.requires_grad and p.grad is None
        assert id(p) not in held(opt)
        assert p not in opt.state
    # Everything still trainable is in a group, has state, and kept moving after the last freeze.
    alive = [n for n in trainable if n not in frozen_names]
    assert {names[i] for i in held(opt)} == set(alive)
    assert set(state_bytes(opt, names)) == set(alive)
    last = events[-1].step
    assert all(not torch.equal(snapshots[last][n], snapshots[-1][n]) for n in alive)
    # A gradient never reaches a frozen parameter again.
    model(**make_batches(1, seed=5)[0]).loss.backward()
    assert all(params[n].grad is None for n in frozen_names)
    assert all(params[n].grad is not None for n in alive)


# ---- 2. LR schedulers --------------------------------------------------------------------


SCHEDULERS: dict[str, Callable[[Optimizer], Any]] = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[1e-2, 2e-2, 3e-2], total_steps=STEPS
    ),
}


def _run_with_scheduler(sched: str, config: SAFEConfig | None) -> tuple[nn.Module, Any, list[list[float]]]:
    model = make_model()
    inner = torch.optim.AdamW(make_groups(model, head_lr=2e-3), lr=1e-2)
    opt: Optimizer = inner if config is None else SAFEOptimizer(inner, model, config)
    scheduler = SCHEDULERS[sched](opt)
    lrs: list[list[float]] = []

    def record(step: int) -> None:
        lrs.append([g["lr"] for g in opt.param_groups])
        assert len(opt.param_groups) == 3

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, make_batches(STEPS), scheduler=scheduler, on_step=record)
    assert [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)] == []
    return model, opt, lrs


@pytest.mark.parametrize("sched", SCHEDULERS)
def test_lr_scheduler_drives_the_wrapper_like_the_bare_optimizer(sched: str) -> None:
    bare_model, _, bare_lrs = _run_with_scheduler(sched, None)
    model, _, lrs = _run_with_scheduler(sched, NEVER)
    assert lrs == bare_lrs
    assert len({tuple(x) for x in lrs}) > 1  # the schedule did move the LRs
    assert_bit_identical(bare_model, model)

    _, frozen_opt, frozen_lrs = _run_with_scheduler(sched, FREEZE)
    assert len(frozen_opt.frozen_adapters) == len(ADAPTERS) - 1
    assert frozen_lrs == bare_lrs  # groups intact: every group keeps its schedule


# ---- 3. GradScaler -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd_momentum", "adam"])
def test_grad_scaler_is_bit_identical_and_freezes(kind: str) -> None:
    batches = make_batches(STEPS)
    bare_model = make_model()
    bare_scaler = torch.amp.GradScaler("cpu")
    train(bare_model, OPTIMIZERS[kind](make_groups(bare_model)), batches, scaler=bare_scaler)

    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    opt = SAFEOptimizer(OPTIMIZERS[kind](make_groups(model)), model, NEVER)
    train(model, opt, batches, scaler=scaler)
    assert opt.controller.step == STEPS
    assert scaler.get_scale() == bare_scaler.get_scale()
    assert_bit_identical(bare_model, model)

    model = make_model()
    opt = SAFEOptimizer(OPTIMIZERS[kind](make_groups(model)), model, FREEZE)
    train(model, opt, batches, scaler=torch.amp.GradScaler("cpu"))
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    assert len(opt.param_groups) == 3
    frozen = {n for a in opt.frozen_adapters for n in adapter_params(opt)[a]}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_grad_scaler_skipped_step_does_not_advance_safe() -> None:
    model = make_model()
    opt = SAFEOptimizer(torch.optim.Adam(make_groups(model), lr=1e-2), model, FREEZE)
    scaler = torch.amp.GradScaler("cpu")
    train(model, opt, make_batches(2), scaler=scaler)
    assert opt.controller.step == 2
    scale = scaler.get_scale()
    before = weights(model)

    model(**make_batches(1, seed=3)[0]).loss.backward()
    lora_a = model.get_parameter(f"{ADAPTERS[0]}.lora_A.default.weight")
    assert lora_a.grad is not None
    lora_a.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()

    assert opt.controller.step == 2
    assert scaler.get_scale() == scale * 0.5
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The next finite step counts again.
    train(model, opt, make_batches(1, seed=4), scaler=scaler)
    assert opt.controller.step == 3


# ---- 4. zero_grad ------------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_keeps_frozen_grads_none(set_to_none: bool) -> None:
    model = make_model()
    opt = SAFEOptimizer(torch.optim.SGD(make_groups(model), lr=0.05, momentum=0.9), model, FREEZE)
    train(model, opt, make_batches(FREEZE.freeze_end_step))
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    frozen = {n for a in opt.frozen_adapters for n in adapter_params(opt)[a]}
    params = dict(model.named_parameters())
    for batch in make_batches(2, seed=7):
        model(**batch).loss.backward()
        opt.zero_grad(set_to_none=set_to_none)
        assert all(params[n].grad is None for n in frozen)
        alive = [p for n, p in params.items() if p.requires_grad]
        if set_to_none:
            assert all(p.grad is None for p in alive)
        else:
            assert all(p.grad is not None and not p.grad.any() for p in alive)


# ---- 5. identity, never value ----------------------------------------------------------


def _plan_freezing(model: nn.Module, adapter: str, step: int) -> FreezePlan:
    """A plan that freezes exactly ``adapter`` at ``step``, through its JSON form."""
    probe = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, FREEZE)
    probe.controller.close()
    event = FreezeEvent(
        step=step,
        units=(adapter,),
        adapters=(adapter,),
        threshold=0.5,
        raw_scores={adapter: 0.0},
        normalized_scores={adapter: 0.0},
        params_freed=0,
        state_bytes_freed=0,
    )
    plan = copy.deepcopy(probe.plan)
    plan.events.append(event)
    return FreezePlan.from_json(plan.to_json())


def test_equal_valued_params_are_told_apart_by_identity() -> None:
    model = make_model()
    # lr=0 keeps every LoRA B exactly zero, so all B matrices (and all A momentum
    # buffers, whose gradients are zero) are equal in value when the freeze happens.
    inner = torch.optim.SGD(make_groups(model), lr=0.0, momentum=0.9)
    opt = SAFEOptimizer(inner, model, plan=_plan_freezing(model, ADAPTERS[0], step=1))
    params = dict(model.named_parameters())
    bs = [params[f"{a}.lora_B.default.weight"] for a in ADAPTERS]
    assert all(torch.equal(b, bs[0]) and not b.any() for b in bs)
    held_before = len(held(opt))

    train(model, opt, make_batches(1))

    assert opt.frozen_adapters == [ADAPTERS[0]]
    assert all(torch.equal(b, bs[0]) and not b.any() for b in bs)  # still all equal
    gone = {f"{ADAPTERS[0]}.lora_{x}.default.weight" for x in "AB"}
    assert len(held(opt)) == held_before - 2
    for name in (f"{a}.lora_{x}.default.weight" for a in ADAPTERS for x in "AB"):
        p = params[name]
        assert (id(p) in held(opt)) == (name not in gone)
        assert (p in opt.state) == (name not in gone)
        assert p.requires_grad == (name not in gone)
    zero_buffers = [opt.state[params[f"{a}.lora_A.default.weight"]]["momentum_buffer"] for a in ADAPTERS[1:]]
    assert all(not buf.any() for buf in zero_buffers)


# ---- 6. checkpoints ----------------------------------------------------------------------


def _adamw(model: nn.Module) -> Optimizer:
    return torch.optim.AdamW(make_groups(model), lr=1e-2)


def test_state_dict_is_keyed_by_names_and_json_friendly() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    train(model, opt, make_batches(FREEZE.freeze_end_step + 1))
    sd = opt.state_dict()

    assert all_keys_are_str(sd)
    assert set(sd) == {"inner", "safe"}
    assert set(sd["inner"]) == {"state", "param_groups"}
    assert set(sd["safe"]) == {"version", "step", "accumulator", "plan", "merged"}
    assert sd["safe"]["version"] == SCHEMA_VERSION == 6
    assert sd["safe"]["merged"] == {}  # merge=False
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert [g["params"] for g in sd["inner"]["param_groups"]] == groups
    assert list(sd["inner"]["state"]) == [n for g in groups for n in g]
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sd["inner"]["state"].values())
    frozen = {n for a in opt.frozen_adapters for n in adapter_params(opt)[a]}
    assert len(frozen) == 2 * (len(ADAPTERS) - 1)
    assert not frozen & set(sd["inner"]["state"])
    assert sd["safe"]["step"] == FREEZE.freeze_end_step + 1
    assert sd["safe"]["accumulator"] is None  # the scores are final: the plan holds them
    assert sorted(a for e in sd["safe"]["plan"]["events"] for a in e["adapters"]) == sorted(
        opt.frozen_adapters
    )

    text = json.dumps(sd, default=lambda t: t.tolist())
    assert json.loads(text)["safe"] == json.loads(json.dumps(sd["safe"]))
    assert set(json.loads(text)["inner"]["state"]) == set(sd["inner"]["state"])


@pytest.mark.parametrize("save_at", [2, FREEZE.freeze_end_step + 1], ids=["warmup", "frozen"])
def test_resume_steps_in_lockstep_bit_for_bit(save_at: int) -> None:
    batches = make_batches(STEPS)
    model_a = make_model()
    opt_a = SAFEOptimizer(_adamw(model_a), model_a, FREEZE)
    train(model_a, opt_a, batches[:save_at])
    checkpoint = checkpoint_round_trip({"model": model_a.state_dict(), "optim": opt_a.state_dict()})

    model_b = peft_bert(("query", "value"), layers=2, seed=123, lora_dropout=0.1)  # other weights
    model_b.load_state_dict(checkpoint["model"])
    model_b.train()
    opt_b = SAFEOptimizer(_adamw(model_b), model_b, FREEZE)
    opt_b.load_state_dict(checkpoint["optim"])

    assert opt_b.controller.step == save_at
    assert opt_b.frozen_adapters == opt_a.frozen_adapters
    assert scoring(opt_b) == scoring(opt_a)
    flags = {n: p.requires_grad for n, p in model_a.named_parameters()}
    assert {n: p.requires_grad for n, p in model_b.named_parameters()} == flags
    for i, batch in enumerate(batches[save_at:]):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            torch.manual_seed(1000 + i)  # the same dropout masks for both
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        assert_bit_identical(model_a, model_b)
    assert opt_a.plan.to_dict() == opt_b.plan.to_dict()
    assert len(opt_b.frozen_adapters) == len(ADAPTERS) - 1
    assert hook_counts(model_b) == hook_counts(model_a)


def _assert_untouched(opt: SAFEOptimizer, model: nn.Module, groups: list[list[int]]) -> None:
    """A failed load changed nothing: step, freezes, groups, flags, hooks."""
    assert opt.controller.step == 0 and opt.frozen_adapters == [] and opt.plan.events == []
    assert scoring(opt)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_loading_a_checkpoint_of_other_params_is_a_clear_error() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    train(model, opt, make_batches(FREEZE.freeze_end_step + 1))
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    checkpoint = opt.state_dict()

    # Other adapters: the SAFE part says which.
    query_only = make_model(("query",))
    other = SAFEOptimizer(_adamw(query_only), query_only, FREEZE)
    with pytest.raises(PlanMismatchError, match=r"not in the model.*value"):
        other.load_state_dict(checkpoint)

    # Same adapters, but this optimizer does not hold the task head.
    model = make_model()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = SAFEOptimizer(torch.optim.AdamW(lora, lr=1e-2), model, FREEZE)
    with pytest.raises(ValueError, match=r"does not match this optimizer's parameters.*classifier"):
        other.load_state_dict(checkpoint)
    _assert_untouched(other, model, [[id(p) for p in lora]])

    # Same parameters, grouped differently: one group here, three in the checkpoint.
    model = make_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    other = SAFEOptimizer(torch.optim.AdamW(trainable, lr=1e-2), model, FREEZE)
    with pytest.raises(
        ValueError, match=r"grouped or ordered differently \(3 group\(s\) in the checkpoint, 1 here"
    ):
        other.load_state_dict(checkpoint)
    _assert_untouched(other, model, [[id(p) for p in trainable]])


# ---- 7. bad input ------------------------------------------------------------------------


def test_inner_optimizer_without_the_adapters_is_rejected() -> None:
    model = make_model()
    clean = hook_counts(make_model())
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    with pytest.raises(ValueError, match=re.escape(f"{ADAPTERS[0]}.lora_A.default.weight")) as info:
        SAFEOptimizer(torch.optim.AdamW(head, lr=1e-2), model, FREEZE)
    assert "does not hold 8 trainable adapter parameter(s)" in str(info.value)
    assert hook_counts(model) == clean  # nothing left attached


def test_tensors_outside_the_model_are_rejected() -> None:
    model = make_model()
    clean = hook_counts(make_model())
    temperature = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"holds 1 tensor\(s\) that are not parameters of the model"):
        SAFEOptimizer(torch.optim.AdamW([*model.parameters(), temperature], lr=1e-2), model, FREEZE)
    assert hook_counts(model) == clean

    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = SAFEOptimizer(torch.optim.AdamW(lora, lr=1e-2), model, FREEZE)
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [temperature]})
    assert len(opt.param_groups) == 1
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    opt.add_param_group({"params": [model.get_parameter(n) for n in head], "lr": 1e-3})
    train(model, opt, make_batches(1))
    assert opt.state_dict()["inner"]["param_groups"][1]["params"] == head


def test_step_passes_the_closure_and_its_loss() -> None:
    model = make_model()
    opt = SAFEOptimizer(torch.optim.SGD(make_groups(model), lr=0.05), model, NEVER)
    batch = make_batches(1)[0]
    losses: list[float] = []

    def closure() -> float:
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
        return losses[-1]

    before = weights(model)
    assert opt.step(closure) == losses[0]
    assert len(losses) == 1 and opt.controller.step == 1
    b = f"{ADAPTERS[0]}.lora_B.default.weight"
    assert not torch.equal(before[b], model.get_parameter(b))


def test_hooks_registered_on_the_wrapper_run() -> None:
    model = make_model()
    opt = SAFEOptimizer(torch.optim.SGD(make_groups(model), lr=0.05), model, NEVER)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    train(model, opt, make_batches(1))
    assert calls == ["pre", "post"]
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    state = opt.state_dict()
    assert state["extra"] == 1
    opt.load_state_dict(state)
    assert calls == ["pre", "post", "sd-pre", "load-post"]


def test_non_optimizer_is_a_type_error() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="got list"):
        SAFEOptimizer(list(model.parameters()), model, FREEZE)  # type: ignore[arg-type]


def test_model_without_adapters_is_a_discovery_error() -> None:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_bert_config(2))
    with pytest.raises(AdapterDiscoveryError, match="matched 0 of"):
        SAFEOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, FREEZE)


def test_freeze_end_before_warmup_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="freeze_end_step=5, warmup_steps=10"):
        SAFEConfig(warmup_steps=10, freeze_end_step=5)


# ---- 8. observability --------------------------------------------------------------------


def test_plan_scores_and_frozen_are_readable_at_any_time() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    events: list[FreezeEvent] = []
    opt.add_freeze_callback(events.append)
    assert opt.plan.events == [] and scored_at(opt) is None
    assert [a.name for a in opt.plan.adapters] == ADAPTERS
    assert opt.scores == {}
    assert opt.frozen_adapters == []
    assert "frozen_adapters=0/4" in repr(opt)

    batches = make_batches(10)
    # Two steps: LoRA's B starts at zero, so the first step's adapted outputs equal the base
    # outputs and its 1 - CKA is rounding noise around 0; the second step's are real.
    train(model, opt, batches[:2])
    running = opt.scores
    assert sorted(running) == ADAPTERS
    assert max(running.values()) == 1.0 and all(0.0 <= s <= 1.0 for s in running.values())
    assert scored_at(opt) is None and opt.frozen_adapters == []

    train(model, opt, batches[2:])
    assert scored_at(opt) == FREEZE.warmup_steps
    assert opt.scores == opt.plan.normalized_scores
    assert sorted(opt.scores) == ADAPTERS
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    assert opt.frozen_adapters == [a for a in ADAPTERS if a in opt.frozen_adapters]  # model order
    assert events == opt.plan.events and all(isinstance(e, FreezeEvent) for e in events)
    assert [(e.step, e.adapters) for e in events] == [(e.step, e.adapters) for e in opt.plan.events]
    for event in events:
        assert all(opt.scores[a] < event.threshold for a in event.adapters)
    assert "frozen_adapters=3/4" in repr(opt)


# ---- 9. gradient accumulation ------------------------------------------------------------


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    config = SAFEConfig.paper(warmup_steps=3, freeze_end_step=3, tau_target=1.0, max_tokens=8)
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, config)
    frozen_per_step: list[int] = []
    train(
        model,
        opt,
        make_batches(8),
        accumulate=2,
        on_step=lambda _: frozen_per_step.append(len(opt.frozen_adapters)),
    )

    assert opt.controller.step == 4
    assert frozen_per_step == [0, 0, 3, 3]
    assert [e.step for e in opt.plan.events] == [3]
    # Both micro-batches of each of the 3 warm-up steps were scored.
    batches_seen = accumulator_stats(opt)[:, STAT_BATCHES]
    assert batches_seen.tolist() == [6.0] * len(ADAPTERS)


# ---- 10. hooks ---------------------------------------------------------------------------


def test_hooks_live_only_during_the_warmup() -> None:
    clean = hook_counts(make_model())
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, NEVER)
    counts = hook_counts(model)
    site = model.get_submodule(ADAPTERS[0])
    assert len(site._forward_hooks) == clean[ADAPTERS[0]][0] + 1
    assert counts[f"{ADAPTERS[0]}.base_layer"][0] == clean[f"{ADAPTERS[0]}.base_layer"][0] + 1
    added = sum(sum(c) for c in counts.values()) - sum(sum(c) for c in clean.values())
    # The padding mask's hooks (a pre- and a post-hook on the model and on the outermost module
    # inside it that takes an attention_mask), then one hook per site and per base.
    assert added == 4 + 2 * len(ADAPTERS)

    batches = make_batches(NEVER.warmup_steps + 1)
    train(model, opt, batches[: NEVER.warmup_steps - 1])
    assert scoring(opt)
    train(model, opt, batches[NEVER.warmup_steps - 1 :])
    assert not scoring(opt)
    assert hook_counts(model) == clean


def test_hooks_are_gone_after_freezing_and_one_forward() -> None:
    clean = hook_counts(make_model())
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    train(model, opt, make_batches(FREEZE.freeze_end_step))
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    # A frozen lowest adapter may leave its one-shot prefix check until the next forward.
    model(**make_batches(1, seed=9)[0])
    assert hook_counts(model) == clean


def test_eval_and_no_grad_forwards_are_not_scored() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, SAFEConfig(warmup_steps=50, freeze_end_step=60))
    stats = accumulator_stats(opt)
    batch = make_batches(1)[0]

    model.eval()
    model(**batch)
    assert not stats.any()
    model.train()
    with torch.no_grad():
        model(**batch)
    assert not stats.any()
    model(**batch)  # a training forward is scored
    assert stats[:, STAT_BATCHES].tolist() == [1.0] * len(ADAPTERS)
    seen = stats.clone()
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert torch.equal(stats, seen)


# ---- 8. loads that change nothing on failure ---------------------------------------------


def _frozen_checkpoint() -> dict[str, Any]:
    """A checkpoint written after every adapter but the top one froze."""
    model = make_model()
    with SAFEOptimizer(_adamw(model), model, FREEZE) as opt:
        train(model, opt, make_batches(FREEZE.freeze_end_step + 1))
        assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
        return checkpoint_round_trip(opt.state_dict())


def _stepped_target() -> tuple[nn.Module, SAFEOptimizer, dict[str, Any]]:
    """A fresh optimizer one step in (so its AdamW state exists), and a copy of that state."""
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    train(model, opt, make_batches(1, seed=5))
    before = copy.deepcopy(
        {
            "state": {id(p): dict(s) for p, s in opt.state.items()},
            "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "plan": opt.plan.to_dict(),
            "stats": accumulator_stats(opt).clone(),
        }
    )
    return model, opt, before


def _assert_unchanged(model: nn.Module, opt: SAFEOptimizer, before: dict[str, Any], plan: FreezePlan) -> None:
    assert opt.plan is plan and opt.plan.to_dict() == before["plan"]
    assert opt.controller.step == 1 and scoring(opt)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == before["groups"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["flags"]
    assert {n: p.grad for n, p in model.named_parameters()} == before["grads"]
    assert set(before["state"]) == {id(p) for p in opt.state}
    for p, s in opt.state.items():
        assert all(torch.equal(v, before["state"][id(p)][k]) for k, v in s.items())
    assert torch.equal(accumulator_stats(opt), before["stats"])


def _sgd_state(checkpoint: dict[str, Any]) -> None:
    checkpoint["inner"]["state"] = {
        n: {"momentum_buffer": s["exp_avg"]} for n, s in checkpoint["inner"]["state"].items()
    }


def _v1_without_frozen(checkpoint: dict[str, Any]) -> None:
    checkpoint["safe"].pop("version")
    checkpoint["safe"]["scoring"] = False


def _bad_accumulator(checkpoint: dict[str, Any]) -> None:
    # A warm-up state whose statistics have the wrong shape.
    checkpoint["safe"]["plan"]["events"] = []
    checkpoint["safe"]["plan"]["scores"] = {"scored_at": None, "raw": {}, "normalized": {}}
    checkpoint["safe"]["step"] = 1
    checkpoint["safe"]["accumulator"] = {
        "columns": list(STAT_NAMES),
        "stats": [[0.0] * 8] * 3,
        "generator_device": "cpu",
        "generator_state": torch.Generator().get_state().tolist(),
    }


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            _sgd_state,
            ValueError,
            r"refused the checkpoint's optimizer state \(KeyError: 'step'\).*"
            r"\['momentum_buffer'\].*another optimizer class\? Nothing was changed",
        ),
        (_v1_without_frozen, PlanError, r"not a SAFE state of version 1: missing keys \['frozen'\]"),
        (lambda c: c["safe"].update(extra=1), PlanError, r"unexpected keys \['extra'\]"),
        (
            lambda c: c.update(extra=1),
            ValueError,
            r"exactly the keys \['inner', 'safe'\], got \['extra', 'inner'",
        ),
        (
            _bad_accumulator,
            PlanError,
            r"bad accumulator: state holds stats of shape \(3, 8\), this accumulator \(4, 8\)",
        ),
        (lambda c: c["safe"].update(step=-1), PlanError, r"step must be an integer >= 4 .*got -1"),
        (lambda c: c["safe"].update(version=99), PlanError, r"SAFE state version 99.*upgrade safefreeze"),
        (
            lambda c: c["inner"]["state"].update(ghost={}),
            ValueError,
            r"state for parameters it does not list: \['ghost'\]",
        ),
    ],
    ids=[
        "sgd_into_adamw",
        "v1_missing_frozen",
        "stray_safe_key",
        "stray_key",
        "accumulator_shape",
        "negative_step",
        "newer_version",
        "unknown_param",
    ],
)
def test_a_failed_load_changes_nothing(
    damage: Callable[[dict[str, Any]], None], error: type, match: str
) -> None:
    checkpoint = _frozen_checkpoint()
    damage(checkpoint)
    model, opt, before = _stepped_target()
    plan = opt.plan
    with pytest.raises(error, match=match):
        opt.load_state_dict(checkpoint)
    _assert_unchanged(model, opt, before, plan)
    train(model, opt, make_batches(1, seed=6))  # and it still trains
    assert opt.controller.step == 2


def test_a_plain_torch_state_dict_gets_an_error_saying_what_it_is() -> None:
    model, opt, before = _stepped_target()
    plain = torch.optim.AdamW(make_groups(make_model()), lr=1e-2).state_dict()
    with pytest.raises(
        ValueError, match=r"plain torch optimizer state dict .* load it into the inner optimizer"
    ):
        opt.load_state_dict(plain)
    _assert_unchanged(model, opt, before, opt.plan)


def test_a_generator_state_from_another_device_reseeds_with_a_warning() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    train(model, opt, make_batches(1))
    checkpoint = checkpoint_round_trip(opt.state_dict())
    opt.close()
    # What a CUDA generator's state looks like: 16 bytes (seed and offset), not mt19937's 5056.
    checkpoint["safe"]["accumulator"]["generator_device"] = "cuda"
    checkpoint["safe"]["accumulator"]["generator_state"] = [7] * 16
    target = make_model()
    resumed = SAFEOptimizer(_adamw(target), target, FREEZE)
    with pytest.warns(
        RuntimeWarning, match=r"state is for a cuda generator and cannot be restored on cpu.*reseeded"
    ):
        resumed.load_state_dict(checkpoint)
    assert resumed.controller.step == 1 and scoring(resumed)
    train(target, resumed, make_batches(FREEZE.freeze_end_step, seed=3))
    assert resumed.plan.scored_at == FREEZE.warmup_steps


def test_a_version_1_checkpoint_loads_and_a_wrong_frozen_map_is_refused() -> None:
    checkpoint = _frozen_checkpoint()
    safe = checkpoint["safe"]
    plan = FreezePlan.from_dict(safe["plan"])
    # The layout version 1 wrote: no version, a frozen map and a scoring flag beside the plan.
    old = {
        "step": safe["step"],
        "frozen": plan.unit_freeze_steps,
        "accumulator": None,
        "scoring": False,
        "plan": {**safe["plan"], "version": 1},
    }
    # Version 1 knew none of order, units and merge.
    old["plan"]["config"] = {
        k: v for k, v in old["plan"]["config"].items() if k not in ("order", "units", "merge")
    }
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    opt.load_state_dict({"inner": checkpoint["inner"], "safe": old})
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    assert set(opt.frozen_units) == set(plan.unit_freeze_steps)
    assert opt.state_dict()["safe"]["version"] == SCHEMA_VERSION

    wrong = {**old, "frozen": {**old["frozen"], next(iter(old["frozen"])): 999}}
    model2 = make_model()
    opt2 = SAFEOptimizer(_adamw(model2), model2, FREEZE)
    with pytest.raises(PlanError, match=r"frozen"):
        opt2.load_state_dict({"inner": checkpoint["inner"], "safe": wrong})
    assert opt2.frozen_adapters == []


def test_a_version_2_checkpoint_loads_with_nothing_merged() -> None:
    checkpoint = _frozen_checkpoint()
    safe = checkpoint["safe"]
    # The layout version 2 wrote: no merged sites, a plan whose config has no units or merge.
    config = {k: v for k, v in safe["plan"]["config"].items() if k not in ("units", "merge")}
    old = {k: v for k, v in safe.items() if k != "merged"}
    old = {**old, "version": 2, "plan": {**safe["plan"], "version": 2, "config": config}}
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    opt.load_state_dict({"inner": checkpoint["inner"], "safe": old})
    assert len(opt.frozen_adapters) == len(ADAPTERS) - 1
    assert opt.controller.merged_sites == []
    state = opt.state_dict()["safe"]
    assert (state["version"], state["merged"]) == (SCHEMA_VERSION, {})
    assert (state["plan"]["config"]["units"], state["plan"]["config"]["merge"]) == ("adapter", False)


# ---- 9. hooks never outlive their optimizer ----------------------------------------------


def _hooked(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_an_optimizer_dropped_during_warmup_leaves_no_hook() -> None:
    model = make_model()
    opt = SAFEOptimizer(_adamw(model), model, FREEZE)
    assert _hooked(model) > 0
    train(model, opt, make_batches(1))
    ref = weakref.ref(opt)
    del opt
    assert ref() is None  # no cycle keeps it: refcounting frees it at once
    assert _hooked(model) == 0
    again = SAFEOptimizer(_adamw(model), model, FREEZE)  # the model is free again
    again.close()


def test_the_prefix_check_does_not_keep_a_deleted_optimizer_alive() -> None:
    model = make_model()
    model.enable_input_require_grads()
    opt = SAFEOptimizer(
        _adamw(model), model, SAFEConfig.paper(warmup_steps=1, freeze_end_step=1, tau_target=1.0)
    )
    opt.controller.finalize_scores({u: (0.0 if u == ADAPTERS[0] else 1.0) for u in opt.controller.units})
    train(model, opt, make_batches(1))
    assert opt.frozen_adapters == [ADAPTERS[0]] and _hooked(model) > 0  # the one-shot check waits
    ref = weakref.ref(opt)
    del opt
    assert ref() is None
    assert _hooked(model) - sum(len(m._forward_hooks) for m in model.modules()) <= 1


def test_a_second_live_optimizer_on_the_model_is_an_error_and_close_frees_it() -> None:
    model = make_model()
    first = SAFEOptimizer(_adamw(model), model, FREEZE)
    with pytest.raises(
        RuntimeError, match=r"already driven by a live SAFE engine.*close\(\).*with SAFEOptimizer"
    ):
        SAFEOptimizer(_adamw(model), model, FREEZE)
    plan = _plan_freezing(make_model(), ADAPTERS[0], 2)
    with pytest.raises(RuntimeError, match=r"already driven"):  # a replay would step them too
        SAFEOptimizer(_adamw(model), model, plan=plan)
    first.close()
    assert _hooked(model) == 0
    with pytest.raises(RuntimeError, match=r"closed"):
        first.step()
    with SAFEOptimizer(_adamw(model), model, FREEZE) as second:
        train(model, second, make_batches(2))
        assert _hooked(model) > 0
    assert second.controller.closed and _hooked(model) == 0


def test_wrapping_a_safe_optimizer_is_a_type_error() -> None:
    model = make_model()
    with SAFEOptimizer(_adamw(model), model, FREEZE) as opt:
        with pytest.raises(TypeError, match=r"got a SAFEOptimizer to wrap; wrap the inner optimizer once"):
            SAFEOptimizer(opt, model, FREEZE)
        assert len(opt.controller.pairs) == len(ADAPTERS)  # the refused wrap added no hook


def test_freeze_callbacks_can_unsubscribe() -> None:
    model = make_model()
    seen: list[int] = []
    with SAFEOptimizer(_adamw(model), model, FREEZE) as opt:
        opt.add_freeze_callback(lambda e: seen.append(e.step))
        opt.add_freeze_callback(callback := lambda e: seen.append(-e.step))
        opt.remove_freeze_callback(callback)
        train(model, opt, make_batches(FREEZE.freeze_end_step + 1))
    assert seen == [e.step for e in opt.plan.events] and seen
