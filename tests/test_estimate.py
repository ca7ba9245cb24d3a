"""estimate_savings: a run's counted savings, predicted before it runs, against what the run counts."""

from __future__ import annotations

import functools

import pytest
import torch
from models import bert_batch, peft_bert

from safefreeze import SAFEConfig, SAFEOptimizer, estimate_savings
from safefreeze.measure import measure_step

TOTAL = 10


def _loss(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return model(**bert_batch(seed)).loss


def _model() -> torch.nn.Module:
    model = peft_bert(layers=4)
    model.train()
    return model


def _train(config: SAFEConfig, **kwargs: object) -> tuple[SAFEOptimizer, list[int], list[int]]:
    """A run of TOTAL steps; the FLOPs and saved bytes each step counted."""
    torch.manual_seed(1)
    model = _model()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer = SAFEOptimizer(inner, model, config, **kwargs)  # type: ignore[arg-type]
    flops, saved = [], []
    for step in range(TOTAL):
        _, costs = measure_step(model, functools.partial(_loss, model, step))
        flops.append(costs.flops)
        saved.append(costs.saved_bytes)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, flops, saved


@pytest.mark.parametrize(("units", "eval_frozen"), [("block", False), ("adapter", False), ("block", True)])
def test_the_estimate_is_what_the_run_counts(units: str, eval_frozen: bool) -> None:
    config = SAFEConfig(
        warmup_steps=3, freeze_end_step=7, tau_target=0.75, units=units, max_tokens=8, eval_frozen=eval_frozen
    )
    estimate = estimate_savings(_model(), _loss, config, TOTAL)

    recorded, _, _ = _train(config)
    assert estimate.freeze_steps == recorded.plan.unit_freeze_steps
    assert len(estimate.freeze_steps) == round(0.75 * len(estimate.units))
    # The recording scored warm-up steps; its replay trains the same freezes without scoring.
    replayed, flops, saved = _train(config, plan=recorded.plan)
    assert replayed.plan.unit_freeze_steps == recorded.plan.unit_freeze_steps
    lora = estimate.step_costs[0]
    _, plain = measure_step(m := _model(), lambda: _loss(m))
    assert lora == plain
    assert estimate.flops == sum(flops) / (TOTAL * plain.flops)
    assert estimate.saved_bytes == sum(saved) / (TOTAL * plain.saved_bytes)
    assert estimate.saved_bytes_after == saved[-1] / plain.saved_bytes
    assert estimate.flops < 0.95 and estimate.saved_bytes < 0.8


def test_the_model_is_left_as_it_was() -> None:
    model = _model()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=1.0)
    estimate = estimate_savings(model, _loss, config, 6)
    assert len(estimate.step_costs) == len(estimate.units) + 1
    for name, param in model.named_parameters():
        value, requires_grad = before[name]
        assert torch.equal(param, value) and param.requires_grad == requires_grad and param.grad is None, name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # No engine holds the model: SAFE can drive it next.
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    SAFEOptimizer(inner, model, config).close()


def test_rules_the_scores_steer_and_bad_lengths_are_refused() -> None:
    model = _model()
    for config in (SAFEConfig(order="prefix"), SAFEConfig(normalization="max"), SAFEConfig.paper()):
        with pytest.raises(ValueError, match=r"scores do not steer.*got order="):
            estimate_savings(model, _loss, config, 300)
    for total in (0, 2.5, True):
        with pytest.raises(ValueError, match="total_steps >= 1"):
            estimate_savings(model, _loss, SAFEConfig(), total)  # type: ignore[arg-type]
