"""The engine: scoring from training forwards, warnings, units, and driving it by hand."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from models import BottleneckNet, HandLoRANet, peft_bert
from torch import nn

from safefreeze import AdapterPattern, FreezeController, SAFEConfig, SAFEOptimizer
from safefreeze.cka._torch import STAT_BATCHES, STAT_ROWS_NONFINITE, STAT_ROWS_USED
from safefreeze.hooks import MaskFn

HAND_LORA = AdapterPattern(base="base", params=r"lora_(?:down|up)\..+")
BOTTLENECK = AdapterPattern(site=r".*\.adapter", base=None, params=r"(?:down|up)\..+")


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, x: torch.Tensor | None = None) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        inp = torch.randn(16, 8, generator=g) if x is None else x
        model(inp).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _bert_batch(seed: int, pad_from: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[:, pad_from:] = 0
    return {
        "input_ids": torch.randint(0, 100, (4, 16), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (4,), generator=g),
    }


def _mask_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return kwargs["attention_mask"].bool()


# The padding mask found in the forward's arguments, or given by mask_fn.
@pytest.mark.parametrize("mask_fn", [None, _mask_argument])
def test_scores_padding_masked_tokens_subsampled_on_sampled_steps(mask_fn: MaskFn | None) -> None:
    model = peft_bert(("query", "value"))
    model.train()
    config = SAFEConfig.paper(warmup_steps=6, freeze_end_step=8, tau_target=0.0, score_every=2, max_tokens=32)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    without = hooks()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    opt = SAFEOptimizer(inner, model, config, mask_fn=mask_fn)
    stats = opt.controller._accumulator.stats  # type: ignore[union-attr]
    counts, now = [], []
    for step in range(5):
        counts.append(hooks())
        now.append(opt.controller.scoring_now)
        model(**_bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    # An unscored step runs with none of the scoring hooks on the model, so they cost nothing.
    assert counts[1] == counts[3] == without < counts[0] == counts[2] == counts[4]
    assert now == [True, False, True, False, True]
    # Steps 0, 2, 4 are scored; each sees 4 x 12 = 48 real tokens, subsampled to 32.
    assert stats[:, STAT_BATCHES].tolist() == [3.0] * 4
    assert stats[:, STAT_ROWS_USED].tolist() == [96.0] * 4
    assert stats[:, STAT_ROWS_NONFINITE].tolist() == [0.0] * 4
    assert opt.controller.scoring
    opt.step()  # step 6 = warmup_steps: scores are final, hooks gone
    assert not opt.controller.scoring and not opt.controller.scoring_now
    assert opt.plan.scored_at == 6
    assert max(opt.scores.values()) == 1.0
    assert all(0.0 < s <= 1.0 for s in opt.scores.values())


def test_eval_and_no_grad_forwards_are_not_scored() -> None:
    model = HandLoRANet()
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, pattern=HAND_LORA)
    stats = opt.controller._accumulator.stats  # type: ignore[union-attr]
    model.eval()
    model(torch.randn(16, 8))
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 8))
    assert stats.abs().sum().item() == 0.0
    model(torch.randn(16, 8))
    assert stats[:, STAT_BATCHES].tolist() == [1.0, 1.0, 1.0]


def test_bottleneck_adapters_are_scored_against_their_input() -> None:
    torch.manual_seed(0)
    model = BottleneckNet(depth=3)
    config = SAFEConfig.paper(warmup_steps=3, freeze_end_step=3, tau_target=1.0)
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, config, pattern=BOTTLENECK)
    _train(model, opt, 3)
    raw = opt.plan.raw_scores
    assert sorted(raw) == ["blocks.0.adapter", "blocks.1.adapter", "blocks.2.adapter"]
    assert all(0.0 < s < 1.0 for s in raw.values())
    assert len(opt.frozen_adapters) == 2  # tau_target=1.0 freezes all but the most important


def test_nan_activations_are_skipped_and_a_nan_score_never_freezes() -> None:
    torch.manual_seed(0)
    model = HandLoRANet(depth=2)
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=1.0)
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, config, pattern=HAND_LORA)
    stats = opt.controller._accumulator.stats  # type: ignore[union-attr]
    x = torch.randn(16, 8)
    x[:3] = math.nan  # 3 poisoned rows propagate through both layers
    model(x).sum()
    assert stats[:, STAT_ROWS_NONFINITE].tolist() == [3.0, 3.0]
    assert stats[:, STAT_ROWS_USED].tolist() == [13.0, 13.0]

    # Layer 1 sees only NaN during the whole warm-up: no score, a warning, never frozen.
    opt.controller._accumulator.reset()  # type: ignore[union-attr]
    poison = model.layers[0].register_forward_hook(lambda m, a, out: out * math.nan)
    with pytest.warns(
        UserWarning, match=r"1 adapter\(s\) got no usable score.*'layers\.1': 32 of its drawn rows held NaN"
    ):
        _train(model, opt, 2)
    poison.remove()
    assert math.isnan(opt.plan.raw_scores["layers.1"])
    assert not math.isnan(opt.plan.raw_scores["layers.0"])
    _train(model, opt, 3)
    assert "layers.1" not in opt.frozen_adapters


def test_group_by_freezes_a_block_as_one_unit() -> None:
    model = peft_bert(("query", "value"), layers=3)
    model.train()
    config = SAFEConfig.paper(
        warmup_steps=2, freeze_end_step=2, tau_target=1.0, group_by=r".*\.layer\.(\d+)\..*"
    )
    opt = SAFEOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, config)
    assert list(opt.controller.units) == ["0", "1", "2"]
    for step in range(3):
        model(**_bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    event = opt.plan.events[0]
    assert event.step == 2 and len(event.units) == 2
    # Each frozen unit took both of its block's adapters with it.
    assert len(event.adapters) == 4
    assert all(any(f"layer.{u}." in a for a in event.adapters) for u in event.units)
    assert len(opt.frozen_adapters) == 4


@pytest.mark.parametrize("eval_frozen", [False, True])
def test_frozen_prefix_with_grad_requiring_input_warns_once(eval_frozen: bool) -> None:
    # With eval_frozen the frozen site runs in evaluation mode: the check still reads the
    # model's mode and warns on its training forwards.
    model = peft_bert(("query", "value"), layers=2)
    model.enable_input_require_grads()
    model.train()
    config = SAFEConfig.paper(warmup_steps=1, freeze_end_step=1, tau_target=1.0, eval_frozen=eval_frozen)
    opt = SAFEOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, config)
    # Freeze the lowest adapter by setting the final scores through the engine's public step.
    opt.controller.finalize_scores(
        {u: (0.0 if "layer.0.attention.self.query" in u else 1.0) for u in opt.controller.units}
    )
    model(**_bert_batch(0)).loss.backward()
    opt.step()
    assert opt.frozen_adapters == ["base_model.model.bert.encoder.layer.0.attention.self.query"]
    with pytest.warns(UserWarning, match=r"enable_input_require_grads\(\)") as record:
        model(**_bert_batch(1)).loss.backward()
        model(**_bert_batch(2)).loss.backward()
    assert sum("requires grad" in str(w.message) for w in record) == 1


def test_frozen_prefix_without_grad_input_does_not_warn() -> None:
    model = HandLoRANet(depth=3)
    config = SAFEConfig.paper(warmup_steps=1, freeze_end_step=1, tau_target=1.0)
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, config, pattern=HAND_LORA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 4)
    assert len(opt.frozen_adapters) == 2


def test_a_framework_can_drive_the_engine_directly() -> None:
    torch.manual_seed(0)
    model = HandLoRANet(depth=3)
    config = SAFEConfig.paper(warmup_steps=2, freeze_end_step=4, tau_target=1.0)
    engine = FreezeController(model, config, pattern=HAND_LORA)
    events = []
    engine.add_callback(events.append)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(16, 8)).square().mean().backward()
        inner.step()
        inner.zero_grad()
        engine.on_step_end()  # e.g. from a trainer's on_optimizer_step callback
    assert engine.step == 5
    assert [e.step for e in events] == [e.step for e in engine.plan.events]
    assert len(engine.frozen_adapters) == 2
    for name in engine.frozen_adapters:
        layer = model.get_submodule(name)
        assert not layer.lora_down.weight.requires_grad and layer.lora_down.weight.grad is None
    assert sum(e.state_bytes_freed for e in events) == 0  # the bare engine owns no optimizer state


def test_resuming_under_another_config_is_refused() -> None:
    model = HandLoRANet()
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5)
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, config, pattern=HAND_LORA)
    _train(model, opt, 1)
    state = opt.state_dict()
    opt.close()
    other = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.9)
    opt2 = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, other, pattern=HAND_LORA)
    with pytest.raises(ValueError, match=r"another SAFEConfig.*'tau_target': \(0\.5, 0\.9\)"):
        opt2.load_state_dict(state)


def test_replay_uses_the_recorded_units_and_refuses_units_that_do_not_fit() -> None:
    from safefreeze import FreezePlan, PlanMismatchError

    model = HandLoRANet()
    config = SAFEConfig(warmup_steps=1, freeze_end_step=1, tau_target=1.0, group_by=r"layers\.(\d+)")
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, config, pattern=HAND_LORA)
    _train(model, opt, 2)
    data = opt.plan.to_dict()
    # A pattern that backtracks for minutes: replay must never evaluate it, only the units.
    data["config"]["group_by"] = r"(.|.)*Q(\d)"
    data["units"] = {f"unit {k}": v for k, v in data["units"].items()}
    for event in data["events"]:
        event["units"] = [f"unit {u}" for u in event["units"]]
        for key in ("raw_scores", "normalized_scores"):
            event[key] = {f"unit {k}": v for k, v in event[key].items()}
    for key in ("raw", "normalized"):
        data["scores"][key] = {f"unit {k}": v for k, v in data["scores"][key].items()}
    plan = FreezePlan.from_dict(data)
    fresh = HandLoRANet()
    replay = SAFEOptimizer(torch.optim.SGD(fresh.parameters(), lr=0.1), fresh, plan=plan, pattern=HAND_LORA)
    assert list(replay.controller.units) == ["unit 0", "unit 1", "unit 2"]
    _train(fresh, replay, 2)
    assert replay.frozen_adapters == opt.frozen_adapters
    replay.close()
    plan.units = {"unit 0": ["layers.0"], "unit 1": ["layers.1"]}  # layers.2 in no unit
    plan.events.clear()
    other = HandLoRANet()
    with pytest.raises(
        PlanMismatchError, match=r"do not cover this model's adapters.*\['layers\.2'\] are in no unit"
    ):
        SAFEOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, plan=plan, pattern=HAND_LORA)


def test_depth_order_freezes_as_many_units_lowest_first() -> None:
    def run(order: str) -> SAFEOptimizer:
        model = peft_bert(("query", "value"), layers=3, seed=0)
        model.train()
        config = SAFEConfig.paper(warmup_steps=2, freeze_end_step=5, tau_target=0.8, order=order)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = SAFEOptimizer(torch.optim.AdamW(trainable), model, config)
        for step in range(7):
            model(**_bert_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
            if step == 0:  # end scoring early with set scores: the lowest unit is the most important
                units = list(opt.controller.units)
                opt.controller.finalize_scores(dict(zip(units, [1.0, 0.1, 0.2, 0.3, 0.05, 0.9], strict=True)))
        return opt

    by_score, by_depth = run("score"), run("depth")
    units = list(by_depth.controller.units)
    counts = [(e.step, len(e.units)) for e in by_score.plan.events]
    assert counts == [(e.step, len(e.units)) for e in by_depth.plan.events]
    assert sorted(u for e in by_score.plan.events for u in e.units) == sorted(units[1:5])
    frozen = [u for e in by_depth.plan.events for u in e.units]
    assert frozen == units[:4]  # as many units, always a lower prefix, the top scorer included
    # The prefix rule stops at the first unit at or above the threshold: the lowest one here.
    assert run("prefix").plan.events == []


class _InPlaceLoRA(nn.Module):
    """LoRA that adds its delta into the base output in place."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.base, self.lora_down, self.lora_up = source.base, source.lora_down, source.lora_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        out += self.lora_up(self.lora_down(x))
        return out


def test_adapters_that_add_in_place_are_scored_like_out_of_place_ones() -> None:
    torch.manual_seed(0)
    reference = HandLoRANet(depth=2)
    for layer in reference.layers:
        nn.init.normal_(layer.lora_up.weight, std=0.5)  # a nonzero delta from the first step
    in_place = HandLoRANet(depth=2)
    in_place.load_state_dict(reference.state_dict())
    in_place.layers = nn.ModuleList(_InPlaceLoRA(layer) for layer in in_place.layers)
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.0)
    raw = []
    for model in (reference, in_place):
        with SAFEOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0), model, config, pattern=HAND_LORA
        ) as opt:
            _train(model, opt, 2)
            raw.append(opt.plan.raw_scores)
    assert all(s > 1e-3 for s in raw[0].values())
    assert raw[1] == pytest.approx(raw[0], rel=1e-6)
