"""estimate_savings: a run's counted savings, predicted before it runs, against what the run counts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from models import bert_batch, peft_bert

from safefreeze import SAFEConfig, SAFEOptimizer, estimate_savings
from safefreeze.demo.task import ROTTEN_TOMATOES as task
from safefreeze.demo.task import build_model, encode
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


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"units": "adapter"},
        {"eval_frozen": True},
        {"score_every": 2},
        {"merge": False},
        # The last freeze lands on the last step: no step trains without that unit.
        {"warmup_steps": TOTAL, "freeze_end_step": TOTAL, "tau_target": 1.0},
        # The schedule outlasts the run.
        {"warmup_steps": 5, "freeze_end_step": 3 * TOTAL},
    ],
)
def test_the_estimate_is_what_the_run_counts(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {"warmup_steps": 3, "freeze_end_step": 7, "tau_target": 0.75, "max_tokens": 8}
    config = SAFEConfig(**{**fields, **changes})  # type: ignore[arg-type]
    estimate = estimate_savings(_model(), _loss, config, TOTAL)

    recorded, _, _ = _train(config)
    assert estimate.freeze_steps == recorded.plan.unit_freeze_steps
    assert estimate.freeze_steps
    # The recording scored warm-up steps; its replay trains the same freezes without scoring.
    replayed, flops, saved = _train(config, plan=recorded.plan)
    assert replayed.plan.unit_freeze_steps == recorded.plan.unit_freeze_steps
    lora = estimate.step_costs[0]
    _, plain = measure_step(m := _model(), lambda: _loss(m))
    assert lora == plain
    assert estimate.flops == sum(flops) / (TOTAL * plain.flops)
    assert estimate.saved_bytes == sum(saved) / (TOTAL * plain.saved_bytes)
    assert estimate.saved_bytes_last == saved[-1] / plain.saved_bytes
    # Something saves exactly when a unit freezes before the last step.
    saves = min(estimate.freeze_steps.values()) < TOTAL
    assert (estimate.flops < 1.0, estimate.saved_bytes < 1.0) == (saves, saves)


def test_the_model_and_the_random_state_are_left_as_they_were() -> None:
    model = _model()
    model.eval()  # measured in training mode all the same, as the run trains
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=1.0)
    rng = torch.get_rng_state()
    estimate = estimate_savings(model, _loss, config, 6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert len(estimate.step_costs) == len(estimate.units) + 1
    assert estimate.step_costs[0] == estimate_savings(_model(), _loss, config, 6).step_costs[0]
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


def test_bad_models_and_losses_are_refused_with_the_reason() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4)
    model = _model()
    with pytest.raises(TypeError, match="SAFEConfig, got NoneType"):
        estimate_savings(model, _loss, None, 6)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"scalar loss tensor .* got SequenceClassifierOutput.*\.loss"):
        estimate_savings(model, lambda m: m(**bert_batch(0)), config, 6)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"got a tensor of shape \(4, 3\)"):
        estimate_savings(model, lambda m: m(**bert_batch(0)).logits, config, 6)
    # A loss that runs only the lowest block leaves the adapters above it without a score.
    with pytest.raises(ValueError, match=r"does not run 6 adapter\(s\).*layer\.1"):
        estimate_savings(
            model,
            lambda m: m.base_model.model.bert.encoder.layer[0](
                m.base_model.model.bert.embeddings(bert_batch(0)["input_ids"])
            )[0].sum(),
            config,
            6,
        )
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with SAFEOptimizer(inner, model, config), pytest.raises(RuntimeError, match="before SAFE wraps it"):
        estimate_savings(model, _loss, config, 6)
    estimate_savings(model, _loss, config, 6)  # once the engine is closed


def test_on_the_benchmark_the_estimate_is_what_the_recorded_oracle_counted() -> None:
    recorded = json.loads((Path(__file__).parents[1] / "benchmarks/results/rotten_cpu.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in recorded["runs"]}
    lora, oracle = runs["lora", 0], runs["oracle", 0]
    train_split, _ = task.load()
    data = encode(train_split, task)
    batch = {k: v[: task.batch_size].clone() for k, v in data.items()}
    steps = task.steps(data["labels"].shape[0])
    assert steps == len(oracle["step_flops"])
    estimate = estimate_savings(
        build_model(task, 0), lambda m: m(**batch).loss, SAFEConfig.for_run(steps), steps
    )
    events = runs["safe", 0]["plan"]["events"]
    assert estimate.freeze_steps == {unit: e["step"] for e in events for unit in e["units"]}
    assert estimate.flops == pytest.approx(sum(oracle["step_flops"]) / sum(lora["step_flops"]), abs=1e-12)
    assert estimate.saved_bytes == pytest.approx(
        sum(oracle["step_saved_bytes"]) / sum(lora["step_saved_bytes"]), abs=1e-12
    )
