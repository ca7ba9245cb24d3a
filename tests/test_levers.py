"""The levers that make freezing pay: block units, rank normalization, the freeze orders, merging."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import bert_batch, peft_bert
from torch import nn

from safefreeze import FreezePlan, PlanError, SAFEConfig, SAFEOptimizer
from safefreeze import merge as merge_module
from safefreeze.measure import measure_step
from safefreeze.plan import SCHEMA_VERSION, migrate
from safefreeze.selection import block_of, group_units, lower_prefix, normalize_scores, select_to_freeze

PLANS = Path(__file__).parent / "data" / "plans"
LAYER = "base_model.model.bert.encoder.layer"


def _batch(seed: int = 0, batch: int = 4, tokens: int = 10) -> dict[str, torch.Tensor]:
    return bert_batch(seed, batch, tokens)


def _optimizer(model: nn.Module, config: SAFEConfig | None = None, **kwargs: Any) -> SAFEOptimizer:
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return SAFEOptimizer(inner, model, config, **kwargs)


def _step(model: nn.Module, optimizer: SAFEOptimizer, seed: int) -> None:
    model(**_batch(seed)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ---- units from names -----------------------------------------------------------------------


def _lora_names(model: nn.Module) -> list[str]:
    from safefreeze import find_adapter_pairs

    return [p.name for p in find_adapter_pairs(model)]


def test_block_units_come_from_bert_gpt2_and_llama_names() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = get_peft_model(
        GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=16)),
        LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    llama = get_peft_model(
        LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=50,
            )
        ),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    bert = peft_bert(layers=3)
    for model, blocks in (
        (bert, [f"{LAYER}.{i}" for i in range(3)]),
        (gpt2, [f"base_model.model.transformer.h.{i}" for i in range(3)]),
        (llama, [f"base_model.model.model.layers.{i}" for i in range(3)]),
    ):
        names = _lora_names(model)
        units = group_units(names, "block")
        assert list(units) == blocks
        assert [a for members in units.values() for a in members] == names  # model order, all once
        assert all(len(members) >= 2 for members in units.values())
        assert group_units(names, "adapter") == {n: [n] for n in names}


def test_block_of_keeps_unindexed_names_and_group_by_overrides_units() -> None:
    assert block_of("classifier.lora") == "classifier.lora"
    assert block_of("encoder.block.2.layer.0.SelfAttention.q:extra") == "encoder.block.2"
    names = ["x.layer.0.q", "x.layer.0.v", "x.layer.1.q", "head"]
    assert group_units(names, "block", r".*\.(q|v)") == {
        "q": ["x.layer.0.q", "x.layer.1.q"],
        "v": ["x.layer.0.v"],
        "head": ["head"],
    }
    with pytest.raises(ValueError, match=r"units must be one of \('block', 'adapter'\), got 'layer'"):
        group_units(names, "layer")


def test_the_engine_freezes_blocks_by_default() -> None:
    model = peft_bert(layers=3)
    optimizer = _optimizer(model, SAFEConfig(warmup_steps=2, freeze_end_step=2))
    assert list(optimizer.controller.units) == [f"{LAYER}.{i}" for i in range(3)]
    assert optimizer.plan.units == optimizer.controller.units


# ---- rank normalization: tau_target is the share of units that may freeze -------------------


@pytest.mark.parametrize("tau", [0.0, 0.1, 0.25, 0.5, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("n", [1, 4, 6, 30])
def test_rank_normalization_freezes_tau_n_units_rounded_whatever_the_scale(tau: float, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for scale in (1e-6, 1.0, 1e3):
        raw = {f"u{i}": float(s) * scale for i, s in enumerate(torch.rand(n, generator=gen))}
        frozen = select_to_freeze(normalize_scores(raw, "rank"), tau)
        assert len(frozen) == math.ceil(tau * n - 0.5)  # tau * n to the nearest, half down
        lowest = sorted(raw, key=raw.__getitem__)[: len(frozen)]
        assert sorted(frozen) == sorted(lowest)


def test_max_normalization_does_not_control_the_count_as_rank_does() -> None:
    # One dominant score: under max nearly every unit is below any threshold.
    raw = {"a": 1.0, "b": 0.01, "c": 0.02, "d": 0.015}
    assert len(select_to_freeze(normalize_scores(raw, "max"), 0.3)) == 3
    assert len(select_to_freeze(normalize_scores(raw, "rank"), 0.3)) == 1  # 0.3 * 4 = 1.2


# ---- the prefix rule ------------------------------------------------------------------------


def test_lower_prefix_stops_at_the_first_unit_at_or_above_the_threshold() -> None:
    order = ["l0", "l1", "l2", "l3"]
    scores = {"l0": 0.25, "l1": 0.0, "l2": 0.75, "l3": 0.5}
    assert lower_prefix(order, scores, 0.2) == []
    assert lower_prefix(order, scores, 0.3) == ["l0", "l1"]
    assert lower_prefix(order, scores, 1.0) == order
    assert lower_prefix(order, scores, 1.0, frozen=["l0", "l1"]) == ["l2", "l3"]
    assert lower_prefix(order, {**scores, "l1": math.nan}, 1.0) == ["l0"]


def _record(
    config: SAFEConfig, raw: dict[str, float], steps: int, layers: int = 4, dropout: float = 0.0
) -> SAFEOptimizer:
    torch.manual_seed(0)
    model = peft_bert(layers=layers, lora_dropout=dropout)
    model.train()
    optimizer = _optimizer(model, config)
    for step in range(steps):
        if step == config.warmup_steps - 1:
            optimizer.controller.finalize_scores(raw)
        _step(model, optimizer, step)
    return optimizer


def test_the_prefix_rule_keeps_the_frozen_set_a_lower_prefix_and_stops_at_an_important_block() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=8, tau_target=0.7, order="prefix")
    # Block 2 scores highest (rank shares 0.375, 0.125, 0.875, 0.625): the prefix grows
    # through blocks 0 and 1 and stops there for good.
    raw = {f"{LAYER}.0": 0.2, f"{LAYER}.1": 0.1, f"{LAYER}.2": 0.9, f"{LAYER}.3": 0.3}
    optimizer = _record(config, raw, 12)
    units = list(optimizer.controller.units)
    history = []
    for event in optimizer.plan.events:
        history += event.units
        assert history == units[: len(history)]  # a lower prefix after every event
    assert optimizer.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1"]
    # The score rule (same scores) freezes block 3 too, above a trainable block.
    paper = _record(
        SAFEConfig(warmup_steps=2, freeze_end_step=8, tau_target=0.7, order="score", merge=False), raw, 12
    )
    assert paper.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1", f"{LAYER}.3"]
    # The default (order="depth") freezes as many blocks as the threshold allows, round(0.7 * 4)
    # = 3, from the bottom, block 2's high score notwithstanding.
    default = _record(dataclasses.replace(config, order=SAFEConfig().order), raw, 12)
    assert default.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1", f"{LAYER}.2"]
    # A block without a finite score never freezes, and nothing above it does either: the
    # threshold lets 2 of the 3 scored blocks freeze, but the walk stops at block 1.
    unscored = _record(dataclasses.replace(config, order="depth"), {**raw, f"{LAYER}.1": math.nan}, 12)
    assert unscored.controller.frozen_units == [f"{LAYER}.0"]


def test_a_frozen_prefix_saves_activations_and_backward_work() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.7)
    raw = {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}
    optimizer = _record(config, raw, 3)
    assert optimizer.controller.frozen_units == [f"{LAYER}.{i}" for i in range(3)]  # 0.7 * 4 = 2.8
    model = optimizer.controller.model
    _, frozen = measure_step(model, lambda: model(**_batch(9)).loss)
    lora = peft_bert(layers=4)
    lora.train()
    _, plain = measure_step(lora, lambda: lora(**_batch(9)).loss)
    assert frozen.backward_flops < 0.5 * plain.backward_flops
    assert frozen.saved_bytes < 0.5 * plain.saved_bytes


def test_the_paper_config_is_the_papers_rule() -> None:
    paper = SAFEConfig.paper(warmup_steps=3, freeze_end_step=9)
    assert (paper.order, paper.normalization, paper.units, paper.merge) == ("score", "max", "adapter", False)
    assert paper.tau_target == 0.6 and paper.warmup_steps == 3
    assert SAFEConfig.paper(tau_target=0.4).tau_target == 0.4
    default = SAFEConfig()
    assert (default.order, default.normalization, default.units, default.merge) == (
        "depth",
        "rank",
        "block",
        True,
    )


def test_for_run_scales_the_schedule_to_the_run() -> None:
    assert (SAFEConfig.for_run(337).warmup_steps, SAFEConfig.for_run(337).freeze_end_step) == (34, 202)
    # The rules the scores steer keep a quarter of the run to score and ramp to half.
    for order in ("prefix", "score"):
        config = SAFEConfig.for_run(337, order=order)
        assert (config.order, config.warmup_steps, config.freeze_end_step) == (order, 84, 168)
    assert SAFEConfig.for_run(337, order="depth", warmup_steps=5).warmup_steps == 5  # changes win
    assert (SAFEConfig.for_run(1).warmup_steps, SAFEConfig.for_run(1).freeze_end_step) == (1, 1)
    assert SAFEConfig.for_run(100, tau_target=0.5).tau_target == 0.5
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="for_run requires an integer total_steps >= 1"):
            SAFEConfig.for_run(bad)  # type: ignore[arg-type]


def test_new_fields_are_validated() -> None:
    with pytest.raises(ValueError, match=r"units must be one of \('block', 'adapter'\), got units='layer'"):
        SAFEConfig(units="layer")
    with pytest.raises(TypeError, match="merge must be a bool, got merge=1"):
        SAFEConfig(merge=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"order must be one of \('prefix', 'score', 'depth'\)"):
        SAFEConfig(order="top")


# ---- merging ---------------------------------------------------------------------------------


def _site(model: nn.Module, layer: int, proj: str = "query") -> nn.Module:
    return model.get_submodule(f"{LAYER}.{layer}.attention.self.{proj}")


def test_a_frozen_block_is_merged_and_the_model_computes_the_same_function() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5)
    raw = {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}
    optimizer = _record(config, raw, 2)  # warm-up only: nothing frozen yet
    model = optimizer.controller.model
    with torch.no_grad():  # LoRA B starts at zero; make every update non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    before = model(**_batch(5)).logits
    model.train()
    _step(model, optimizer, 2)  # step 3 >= warm-up: blocks 0 and 1 freeze and merge
    assert optimizer.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1"]
    merged = [f"{LAYER}.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert optimizer.controller.merged_sites == merged
    for layer in (0, 1):
        assert _site(model, layer).merged_adapters == ["default"]
    assert not _site(model, 2).merged
    # The merged model equals an unmerged copy in eval mode (the frozen updates are in W now).
    unmerged = copy.deepcopy(model)
    for layer in (0, 1):
        for proj in ("query", "value"):
            _site(unmerged, layer, proj).unmerge()
    model.eval()
    unmerged.eval()
    torch.testing.assert_close(model(**_batch(6)).logits, unmerged(**_batch(6)).logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(before, model(**_batch(5)).logits)  # trained one step


def test_merging_removes_the_frozen_branches_forward_cost_and_dropout_masks() -> None:
    costs = {}
    for merge in (True, False):
        # Blocks 3 and 2 score lowest and freeze by score, above trainable blocks: their
        # branches' dropout masks are saved for backward unless they are merged.
        # Their attention keeps its dropout too, so that only merging differs.
        config = SAFEConfig(
            warmup_steps=2, freeze_end_step=2, tau_target=0.5, order="score", merge=merge, eval_frozen=False
        )
        optimizer = _record(config, {f"{LAYER}.{i}": 0.4 - 0.1 * i for i in range(4)}, 3, dropout=0.1)
        assert optimizer.controller.frozen_units == [f"{LAYER}.2", f"{LAYER}.3"]
        model = optimizer.controller.model
        _, costs[merge] = measure_step(model, lambda m=model: m(**_batch(7)).loss)
    assert costs[True].forward_flops < costs[False].forward_flops
    assert costs[True].saved_bytes < costs[False].saved_bytes
    assert costs[True].backward_flops < costs[False].backward_flops


def test_save_pretrained_and_merge_and_unload_stay_correct_after_merging(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5)
    optimizer = _record(config, {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}, 5)
    model = optimizer.controller.model
    assert optimizer.controller.merged_sites
    model.eval()
    expected = model(**_batch(8)).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    from models import tiny_bert_config

    base = BertForSequenceClassification(tiny_bert_config(4))  # same seed: the same base weights
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(reloaded(**_batch(8)).logits, expected, atol=1e-5, rtol=1e-5)
    unloaded = copy.deepcopy(model).merge_and_unload().eval()
    torch.testing.assert_close(unloaded(**_batch(8)).logits, expected, atol=1e-5, rtol=1e-5)


def test_low_precision_and_quantized_bases_are_never_merged() -> None:
    model = peft_bert(layers=2)
    site = _site(model, 0)
    assert merge_module.mergeable(site)
    site.get_base_layer().to(torch.bfloat16)
    assert not merge_module.mergeable(site)


# ---- checkpoints with merged sites ------------------------------------------------------------


def _resume_pair(
    stop: int, total: int, eval_frozen: bool | str = "attention"
) -> tuple[dict[str, Any], SAFEOptimizer]:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5, eval_frozen=eval_frozen)
    raw = {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}
    optimizer = _record(config, raw, stop)
    model = optimizer.controller.model
    ckpt = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    ckpt["rng"] = torch.get_rng_state()
    for step in range(stop, total):
        _step(model, optimizer, step)
    return ckpt, optimizer


@pytest.mark.parametrize(
    ("model_first", "eval_frozen"),
    [(True, "attention"), (False, "attention"), (True, True), (True, False), (False, False)],
)
def test_resuming_after_a_merge_continues_bit_identically(model_first: bool, eval_frozen: bool | str) -> None:
    # With eval_frozen the resumed engine must hold the frozen blocks (or their attention) in
    # evaluation mode again: a module left training would draw dropout masks and move the
    # random stream.
    ckpt, full = _resume_pair(4, 7, eval_frozen)
    assert ckpt["optimizer"]["safe"]["merged"]
    torch.manual_seed(0)
    model = peft_bert(layers=4)
    model.train()
    optimizer = _optimizer(model, full.controller.config)
    if model_first:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    else:  # the optimizer's state first: the fresh weights are merged, then overwritten
        optimizer.load_state_dict(ckpt["optimizer"])
        model.load_state_dict(ckpt["model"])
    assert (
        optimizer.controller.merged_sites
        == full.controller.merged_sites[: len(optimizer.controller.merged_sites)]
    )
    torch.set_rng_state(ckpt["rng"])  # dropout continues where the interrupted run stopped
    for step in range(4, 7):
        _step(model, optimizer, step)
    expected = full.controller.model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert optimizer.controller.merged_sites == full.controller.merged_sites


def test_resuming_onto_weights_that_match_neither_digest_is_refused_and_changes_nothing() -> None:
    ckpt, full = _resume_pair(4, 4)
    torch.manual_seed(0)
    model = peft_bert(layers=4, seed=3)  # other base weights
    model.train()
    optimizer = _optimizer(model, full.controller.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        PlanError, match=r"cannot restore the merged adapter at '.*layer\.0\.attention\.self\.query'"
    ):
        optimizer.load_state_dict(ckpt["optimizer"])
    assert not optimizer.frozen_adapters and not optimizer.controller.merged_sites
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_damaged_merged_record_is_refused() -> None:
    ckpt, full = _resume_pair(4, 4)
    state = ckpt["optimizer"]
    for bad, words in (
        ([], "merged: expected an object of site -> digests, got list"),
        ({"nowhere": ["0" * 64, "1" * 64]}, "merged names 'nowhere', which is not an adapter site here"),
        ({f"{LAYER}.0.attention.self.query": ["x", "y"]}, "expected two SHA-256 hex digests"),
        ({f"{LAYER}.3.attention.self.query": ["0" * 64, "1" * 64]}, "whose adapters are not all frozen"),
    ):
        model = peft_bert(layers=4)
        optimizer = _optimizer(model, full.controller.config)
        damaged = copy.deepcopy(state)
        damaged["safe"]["merged"] = bad
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            optimizer.load_state_dict(damaged)
        assert not optimizer.frozen_adapters


# ---- schema version 3 ----------------------------------------------------------------------


def test_version_2_plans_migrate_to_per_adapter_units_without_merging() -> None:
    raw = json.loads((PLANS / "v2.json").read_text(encoding="utf-8"))
    new = migrate(raw, source="plan")
    assert new["version"] == SCHEMA_VERSION == 6
    assert new["config"]["units"] == "adapter" and new["config"]["merge"] is False
    assert "units" not in raw["config"]
    plan = FreezePlan.from_dict(raw)
    assert plan.config.order == "score" and plan.config.normalization == "max"
    assert plan.units == raw["units"]


def test_a_version_2_checkpoint_state_loads_with_nothing_merged() -> None:
    config = SAFEConfig.paper(warmup_steps=2, freeze_end_step=4, tau_target=0.5)
    torch.manual_seed(0)
    model = peft_bert(layers=2)
    model.train()
    optimizer = _optimizer(model, config)
    for step in range(5):
        _step(model, optimizer, step)
    state = optimizer.state_dict()
    safe = state["safe"]
    v2_plan = dict(safe["plan"], version=2)
    v2_plan["config"] = {k: v for k, v in v2_plan["config"].items() if k not in ("units", "merge")}
    old = {
        **state,
        "safe": {"version": 2, "step": safe["step"], "accumulator": safe["accumulator"], "plan": v2_plan},
    }
    fresh_model = peft_bert(layers=2)
    fresh = _optimizer(fresh_model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(old)
    assert fresh.frozen_adapters == optimizer.frozen_adapters and not fresh.controller.merged_sites


# ---- scoring only what the rule reads ------------------------------------------------------


def _scored_run(config: SAFEConfig, steps: int) -> tuple[SAFEOptimizer, dict[str, torch.Tensor], list[float]]:
    """A run of ``steps`` steps; its optimizer, final weights and scored minibatches per step."""
    from safefreeze.cka._torch import STAT_BATCHES

    torch.manual_seed(0)
    model = peft_bert(layers=4, lora_dropout=0.1)
    model.train()
    optimizer = _optimizer(model, config)
    accumulator = optimizer.controller._accumulator
    assert accumulator is not None
    batches = []
    for step in range(steps):
        before = float(accumulator.stats[0, STAT_BATCHES])
        _step(model, optimizer, step)
        batches.append(float(accumulator.stats[0, STAT_BATCHES]) - before)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return optimizer, weights, batches


def test_a_rule_the_scores_do_not_steer_scores_eight_warmup_steps_and_trains_bit_identically() -> None:
    steps = {"warmup_steps": 16, "freeze_end_step": 24, "max_tokens": 16}
    sparse, sparse_weights, sparse_batches = _scored_run(SAFEConfig(**steps), 26)
    dense, dense_weights, dense_batches = _scored_run(SAFEConfig(**steps, score_every=1), 26)
    # Steps 1, 3, ..., 15 scored (every ceil(16 / 8) = 2nd), then scoring ends at step 16.
    assert sparse_batches[:16] == [1.0, 0.0] * 8 and dense_batches[:16] == [1.0] * 16
    assert sparse.controller.scoring is dense.controller.scoring is False
    # The scores differ, but the rule freezes the same blocks at the same steps, and scoring
    # never touches the training: the weights end bit for bit the same.
    assert sparse.plan.raw_scores != dense.plan.raw_scores
    assert [(e.step, e.units) for e in sparse.plan.events] == [(e.step, e.units) for e in dense.plan.events]
    assert len(sparse.frozen_adapters) == 6 and sparse.plan.config.score_every is None
    for name, weight in dense_weights.items():
        assert torch.equal(sparse_weights[name], weight), name
    # A rule that reads the scores scores every warm-up step.
    prefix, _, prefix_batches = _scored_run(SAFEConfig(**steps, order="prefix"), 17)
    assert prefix_batches[:16] == [1.0] * 16 and prefix.plan.config.score_interval == 1


# ---- frozen units in evaluation mode ----------------------------------------------------------


def _dropout_modes(model: nn.Module) -> dict[str, bool]:
    """Each dropout module's training flag as its latest forward saw it, by module name."""
    seen: dict[str, bool] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, m.training))
    return seen


def _block_modes(seen: dict[str, bool], layer: int) -> set[bool]:
    return {mode for name, mode in seen.items() if name.startswith(f"{LAYER}.{layer}.")}


def test_frozen_blocks_run_in_evaluation_mode_whatever_model_train_says() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5, eval_frozen=True)
    optimizer = _record(config, {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}, 3)
    assert optimizer.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1"]
    model = optimizer.controller.model
    seen = _dropout_modes(model)
    # The blocks see the same input under any seed (the embeddings' dropout is below them).
    model.get_submodule("base_model.model.bert.embeddings.dropout").p = 0.0
    outputs: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for layer, kept in outputs.items():
        model.get_submodule(f"{LAYER}.{layer}").register_forward_hook(
            lambda m, args, out, kept=kept: kept.append(out[0].detach().clone())
        )
    for seed in (1, 2):
        model.train()  # as training loops do every epoch or step
        torch.manual_seed(seed)
        model(**_batch(4))
        assert [_block_modes(seen, i) for i in range(4)] == [{False}, {False}, {True}, {True}]
        assert seen["base_model.model.bert.embeddings.dropout"] is True
        assert not model.get_submodule(f"{LAYER}.1").training and model.training
        assert optimizer.controller._hooks.prefix is None  # the prefix check ran on a training forward
    # The frozen blocks compute a fixed function: two dropout seeds, the same output; the
    # trainable block above them draws new dropout masks.
    assert torch.equal(outputs[1][0], outputs[1][1])
    assert not torch.equal(outputs[2][0], outputs[2][1])
    model.eval()
    model(**_batch(4))
    assert set(seen.values()) == {False}
    # Closed, the engine lets go: model.train() trains every block again.
    optimizer.close()
    model.train()
    model(**_batch(4))
    assert set(seen.values()) == {True}


def test_by_default_only_the_frozen_blocks_attention_runs_in_evaluation_mode() -> None:
    assert SAFEConfig().eval_frozen == "attention" and SAFEConfig.paper().eval_frozen is False
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5)
    optimizer = _record(config, {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}, 3)
    assert optimizer.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1"]
    model = optimizer.controller.model
    seen = _dropout_modes(model)  # the dropout modules called (the attention reads only its p)
    model.train()
    model(**_batch(4))
    held = [f"{LAYER}.{i}.attention.self" for i in range(4)]
    assert [model.get_submodule(n).training for n in held] == [False, False, True, True]
    # The hidden-state dropout of the frozen blocks and every dropout of the others still draw.
    assert len(seen) == 10 and set(seen.values()) == {True}
    assert model.get_submodule(f"{LAYER}.0.attention").training
    assert model.get_submodule(f"{LAYER}.0.attention.self.dropout").training is False
    optimizer.close()
    model.train()
    assert all(model.get_submodule(n).training for n in held)


def test_frozen_units_keep_all_their_dropout_without_eval_frozen_and_under_the_papers_rule() -> None:
    blocks = [f"{LAYER}.{i}" for i in range(4)]
    adapters = [f"{b}.attention.self.{p}" for b in blocks for p in ("query", "value")]
    for config, units in (
        (SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5, eval_frozen=False), blocks),
        (SAFEConfig.paper(warmup_steps=2, freeze_end_step=2, tau_target=0.5), adapters),
    ):
        optimizer = _record(config, {u: 0.1 * (i + 1) for i, u in enumerate(units)}, 3)
        model = optimizer.controller.model
        model(**_batch(4))
        assert optimizer.controller.frozen_units
        assert all(m.training for m in model.modules())


def test_attention_in_evaluation_mode_trains_as_its_dropout_set_to_zero() -> None:
    # The default holds the frozen blocks' attention in evaluation mode; the same run with
    # their attention dropout probability set to 0 at each freeze (and nothing held) ends
    # bit for bit the same: the same masks elsewhere, the same weights.
    weights = []
    for eval_frozen in ("attention", False):
        config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5, eval_frozen=eval_frozen)
        torch.manual_seed(0)
        model = peft_bert(layers=4, lora_dropout=0.1)
        model.train()
        optimizer = _optimizer(model, config)
        if not eval_frozen:

            def zero(event: Any, model: nn.Module = model) -> None:
                for unit in event.units:
                    model.get_submodule(f"{unit}.attention.self.dropout").p = 0.0

            optimizer.add_freeze_callback(zero)
        for step in range(8):
            _step(model, optimizer, step)
        assert len(optimizer.controller.frozen_units) == 2
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name


def test_adapter_units_hold_no_attention_module_in_evaluation_mode() -> None:
    # One adapter per unit: a frozen query adapter shares its attention module with a value
    # adapter that may still train, so nothing in it stops dropping.
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.25, units="adapter", merge=False)
    names = [f"{LAYER}.{i}.attention.self.{p}" for i in range(4) for p in ("query", "value")]
    optimizer = _record(config, {n: 0.1 * (i + 1) for i, n in enumerate(names)}, 3, dropout=0.1)
    assert optimizer.controller.frozen_units == names[:2]
    seen = _dropout_modes(optimizer.controller.model)
    optimizer.controller.model(**_batch(4))
    assert set(seen.values()) == {True}


def test_frozen_adapter_units_turn_off_their_own_dropout_only() -> None:
    config = SAFEConfig(
        warmup_steps=2,
        freeze_end_step=2,
        tau_target=0.25,
        units="adapter",
        merge=False,
        order="depth",
        eval_frozen=True,
    )
    names = [f"{LAYER}.{i}.attention.self.{p}" for i in range(4) for p in ("query", "value")]
    optimizer = _record(config, {n: 0.1 * (i + 1) for i, n in enumerate(names)}, 3, dropout=0.1)
    assert optimizer.controller.frozen_units == names[:2]
    model = optimizer.controller.model
    seen = _dropout_modes(model)
    model(**_batch(4))
    lora = {n: mode for n, mode in seen.items() if ".lora_dropout." in n}
    assert lora == {f"{n}.lora_dropout.default": n not in names[:2] for n in names}
    assert _block_modes({n: m for n, m in seen.items() if n not in lora}, 0) == {True}


def test_a_deep_copy_holds_its_own_frozen_blocks_in_evaluation_mode() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5, eval_frozen=True)
    optimizer = _record(config, {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}, 3)
    model = optimizer.controller.model  # the engine holds the hook while it lives
    twin = copy.deepcopy(model)
    model.train()
    twin.train()
    seen, twin_seen = _dropout_modes(model), _dropout_modes(twin)
    twin(**_batch(4))
    assert _block_modes(twin_seen, 0) == {False} and _block_modes(twin_seen, 2) == {True}
    assert model.get_submodule(f"{LAYER}.0").training and not seen  # the original is untouched
    model(**_batch(4))
    assert _block_modes(seen, 0) == {False}
    optimizer.close()


def test_plans_before_version_5_replay_with_the_frozen_blocks_dropout_on() -> None:
    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5, eval_frozen=True)
    recording = _record(config, {f"{LAYER}.{i}": 0.1 * (i + 1) for i in range(4)}, 3)
    expected = {n: p.detach().clone() for n, p in recording.controller.model.named_parameters()}
    recorded = recording.plan.to_dict()
    old = dict(
        recorded, version=4, config={k: v for k, v in recorded["config"].items() if k != "eval_frozen"}
    )
    for document, dropout_on in ((recorded, False), (old, True)):
        plan = FreezePlan.from_dict(document)
        assert plan.config.eval_frozen is not dropout_on
        torch.manual_seed(0)
        model = peft_bert(layers=4)
        model.train()
        optimizer = _optimizer(model, plan=plan)
        for step in range(3):
            _step(model, optimizer, step)
        if not dropout_on:  # the replay of the recorded plan ends bit for bit as the recording
            for name, param in model.named_parameters():
                assert torch.equal(param, expected[name]), name
        seen = _dropout_modes(model)
        model(**_batch(4))
        assert optimizer.controller.frozen_units == [f"{LAYER}.0", f"{LAYER}.1"]
        assert _block_modes(seen, 0) == {dropout_on} and _block_modes(seen, 2) == {True}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("eval_frozen", [True, "attention"])
def test_a_compiled_model_runs_its_frozen_blocks_in_evaluation_mode_without_recompiling(
    eval_frozen: bool | str,
) -> None:
    from torch._dynamo.utils import counters

    config = SAFEConfig(
        warmup_steps=2, freeze_end_step=4, tau_target=0.5, max_tokens=16, eval_frozen=eval_frozen
    )
    weights = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = peft_bert(layers=4)
        run = torch.compile(model, backend="eager") if compiled else model
        optimizer = _optimizer(model, config)
        graphs = []
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for step in range(12):
                model.train()  # Hugging Face's Trainer calls it every step
                run(**_batch(step)).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                graphs.append(counters["stats"]["unique_graphs"])
        assert len(optimizer.controller.frozen_units) == 2
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # Blocks 0 and 1 freeze by step 4; from the next step on, no new graph is ever compiled.
    assert graphs[4] > 0 and graphs[5:] == [graphs[5]] * 7
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
