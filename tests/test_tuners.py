"""Every PEFT tuner found by default, AdaLoRA's rank allocation, unclaimed parameters, mixed layouts."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from models import Bottleneck, tiny_bert_config
from torch import nn

from safefreeze import (
    AdapterDiscoveryError,
    AdapterPattern,
    FreezeEvent,
    SAFEConfig,
    SAFEOptimizer,
    find_adapter_pairs,
)
from safefreeze.discovery import check_adalora_schedule

PREFIX = "base_model.model.bert.encoder.layer"
SITES = [f"{PREFIX}.{i}.attention.self.{part}" for i in range(2) for part in ("query", "value")]
# The default's params before AdaLoRA's lora_E was added: it left the singular values unclaimed.
LORA_ONLY = (
    r"(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)(?:\..+)?"
)
BOTTLENECK = AdapterPattern(site=r".*\.adapter", base=None, params=r"(?:down|up)\..+")
# Four adapters, the lowest two freeze at the end of the warm-up.
CONFIG = SAFEConfig(warmup_steps=3, freeze_end_step=3, tau_target=0.5, units="adapter", order="depth")
# Trainable parameters each tuner puts on an adapted Linear, relative to it.
PARAMS = {
    "lora": ("lora_A.default.weight", "lora_B.default.weight"),
    "adalora": ("lora_A.default", "lora_B.default", "lora_E.default"),
    "loha": ("hada_w1_a.default", "hada_w1_b.default", "hada_w2_a.default", "hada_w2_b.default"),
    "lokr": ("lokr_w1.default", "lokr_w2_a.default", "lokr_w2_b.default"),
    "ia3": ("ia3_l.default",),
}


def tuner_config(kind: str, **changes: Any) -> Any:
    import peft

    targets = ["query", "value"]
    if kind == "lora":
        return peft.LoraConfig(r=2, target_modules=targets, **changes)
    if kind == "adalora":
        schedule = {"init_r": 4, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 4, "deltaT": 1}
        return peft.AdaLoraConfig(target_modules=targets, **{**schedule, **changes})
    if kind == "loha":
        return peft.LoHaConfig(r=2, target_modules=targets, **changes)
    if kind == "lokr":
        return peft.LoKrConfig(r=2, target_modules=targets, **changes)
    if kind == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], **changes)
    raise ValueError(kind)


def tuned_bert(config: Any, seed: int = 0) -> nn.Module:
    from peft import get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return get_peft_model(BertForSequenceClassification(tiny_bert_config(2)), config)


def bert_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (4, 16), generator=g),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": torch.randint(0, 3, (4,), generator=g),
    }


class Frozen:
    """Snapshots each freeze event's parameters as they leave training."""

    def __init__(self, opt: SAFEOptimizer, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.values: dict[str, torch.Tensor] = {}
        self.pairs = {p.name: p for p in opt.controller.pairs}
        opt.add_freeze_callback(self)

    def __call__(self, event: FreezeEvent) -> None:
        for adapter in event.adapters:
            for name in self.pairs[adapter].param_names:
                self.values[name] = self.params[name].detach().clone()


def train(model: nn.Module, opt: SAFEOptimizer, steps: int) -> None:
    model.train()
    for step in range(steps):
        model(**bert_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()


def assert_frozen_for_real(opt: SAFEOptimizer, model: nn.Module, frozen: Frozen) -> None:
    """Frozen params unchanged since their freeze, out of training; the others trained on."""
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, value in frozen.values.items():
        param = frozen.params[name]
        assert torch.equal(param, value), name
        assert not param.requires_grad and param.grad is None
        assert id(param) not in held and param not in opt.state
    live = [n for p in opt.controller.pairs if p.name not in opt.frozen_adapters for n in p.param_names]
    assert live and all(frozen.params[n] in opt.state for n in live)


def assert_merge_is_exact(model: nn.Module, sites: list[str]) -> None:
    """A merged site computes what its unmerged adapter computes."""
    model.eval()
    batch = bert_batch(99)
    merged = model(input_ids=batch["input_ids"]).logits
    for site in sites:
        model.get_submodule(site).unmerge()
    unmerged = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


# ---- discovery of each tuner ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning")
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_default_pattern_finds_one_pair_per_adapted_module(kind: str) -> None:
    model = tuned_bert(tuner_config(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unclaimed, nothing idle
        pairs = find_adapter_pairs(model)
    assert [(p.name, p.site, p.base, p.adapter) for p in pairs] == [
        (site, site, f"{site}.base_layer", "default") for site in SITES
    ]
    assert pairs[0].param_names == tuple(f"{SITES[0]}.{rel}" for rel in PARAMS[kind])
    # Every trainable tuner parameter belongs to exactly one pair.
    owned = [n for p in pairs for n in p.param_names]
    tuner = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    assert sorted(owned) == sorted(tuner)


@pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate for \\(IA\\)\\^3:UserWarning")
@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3"])
def test_tuner_trains_freezes_and_merges(kind: str) -> None:
    model = tuned_bert(tuner_config(kind))
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = SAFEOptimizer(inner, model, CONFIG)
    frozen = Frozen(opt, model)
    train(model, opt, 3)
    assert opt.frozen_adapters == SITES[:2]  # layer 0's query and value
    assert opt.controller.merged_sites == SITES[:2]
    assert sorted(frozen.values) == sorted(f"{s}.{rel}" for s in SITES[:2] for rel in PARAMS[kind])
    live = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, opt, 3)
    assert_frozen_for_real(opt, model, frozen)
    assert all(not torch.equal(p, live[n]) for n, p in model.named_parameters() if n in live)
    assert_merge_is_exact(model, opt.controller.merged_sites)
    opt.close()


def test_ia3_scaling_the_base_input_is_refused_with_both_ways_out() -> None:
    from peft import IA3Config

    config = IA3Config(
        target_modules=["query", "value", "intermediate.dense"], feedforward_modules=["intermediate.dense"]
    )
    model = tuned_bert(config)
    with pytest.raises(AdapterDiscoveryError) as info:
        find_adapter_pairs(model)
    message = str(info.value)
    assert (
        "2 IA3 adapter(s) scale the input of their base layer (IA3Config feedforward_modules), "
        f"e.g. ['{PREFIX}.0.intermediate.dense'" in message
    )
    assert "every such adapter would score 0 and freeze first" in message
    assert "IA3Config(..., feedforward_modules=[])" in message
    # The line in the message leaves the feed-forward IA3 out and finds the others.
    line = re.search(r"pattern=(AdapterPattern\(.*\))$", message)
    assert line is not None
    pattern = eval(line.group(1))
    assert [p.name for p in find_adapter_pairs(model, pattern)] == SITES


# ---- AdaLoRA -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning")
def test_adalora_update_and_allocate_runs_past_the_first_freeze() -> None:
    model = tuned_bert(tuner_config("adalora"))  # ranks allocated until step 12 - 4 = 8
    config = SAFEConfig(warmup_steps=9, freeze_end_step=9, tau_target=0.5, units="adapter", order="depth")
    check_adalora_schedule(model, config.warmup_steps)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = SAFEOptimizer(inner, model, config)
    frozen = Frozen(opt, model)
    allocated: list[int] = []

    def allocate(*_: Any) -> None:
        # After the update, before SAFE freezes: a freeze takes the masked singular values.
        allocated.append(opt.controller.step)
        model.base_model.update_and_allocate(opt.controller.step)

    inner.register_step_post_hook(allocate)
    train(model, opt, 14)
    assert allocated == list(range(14))
    assert opt.plan.events[0].step == 9
    assert opt.frozen_adapters == SITES[:2]
    assert all(f"{s}.lora_E.default" in frozen.values for s in SITES[:2])
    assert_frozen_for_real(opt, model, frozen)
    # AdaLoRA's budget was applied: 2 of 4 singular values per adapter on average stay.
    kept = {n: int(p.count_nonzero()) for n, p in model.named_parameters() if "lora_E" in n}
    assert sum(kept.values()) == 8 and model.peft_config["default"].rank_pattern is not None
    assert_merge_is_exact(model, opt.controller.merged_sites)
    opt.close()


@pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning")
def test_adalora_warmup_ending_during_allocation_is_refused() -> None:
    model = tuned_bert(tuner_config("adalora"))
    with pytest.raises(ValueError) as info:
        check_adalora_schedule(model, 8)
    message = str(info.value)
    assert "allocates ranks until step 8 (total_step=12 - tfinal=4)" in message
    assert "SAFE may freeze from warmup_steps=8; set SAFEConfig(warmup_steps=9) or more" in message
    assert "step post-hook of the wrapped optimizer" in message
    check_adalora_schedule(model, 9)
    check_adalora_schedule(tuned_bert(tuner_config("lora")), 1)  # no AdaLoRA: nothing to check


# ---- trainable parameters no adapter claims ------------------------------------------------


@pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning")
def test_unclaimed_adalora_singular_values_are_reported_with_a_claiming_pattern() -> None:
    model = tuned_bert(tuner_config("adalora"))
    with pytest.warns(UserWarning) as record:
        pairs = find_adapter_pairs(model, AdapterPattern(params=LORA_ONLY))
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        "4 trainable parameter(s) below adapter sites belong to no adapter, so they keep training "
        "when their adapter freezes (and backward work still reaches their layer): "
        f"['{SITES[0]}.lora_E.default', '{SITES[1]}.lora_E.default'"
    )
    assert all(not n.endswith("lora_E.default") for p in pairs for n in p.param_names)
    # The pattern in the message claims them.
    line = re.search(r"pattern=(AdapterPattern\(.*\))$", message)
    assert line is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = find_adapter_pairs(model, eval(line.group(1)))
    assert pairs[0].param_names == tuple(
        f"{SITES[0]}.{stem}.default" for stem in ("lora_A", "lora_B", "lora_E")
    )


class NormedBottleneck(Bottleneck):
    """A bottleneck adapter with its own trainable LayerNorm."""

    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(self.norm(x))))


def test_unclaimed_parameter_of_a_hand_written_adapter_gets_a_claiming_pattern() -> None:
    model = nn.Sequential()
    model.block = nn.Sequential()
    model.block.adapter = NormedBottleneck(8)
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) below adapter sites") as record:
        find_adapter_pairs(model, BOTTLENECK)
    message = str(record[0].message)
    assert "['block.adapter.norm.weight', 'block.adapter.norm.bias']" in message
    assert message.endswith(
        r'pattern=AdapterPattern(site=r".*\.adapter", base=None, '
        r'params=r"(?:(?:down|up)\..+)|norm\.weight|norm\.bias")'
    )
    line = re.search(r"pattern=(AdapterPattern\(.*\))$", message)
    assert line is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (pair,) = find_adapter_pairs(model, eval(line.group(1)))
    assert pair.param_names[-2:] == ("block.adapter.norm.weight", "block.adapter.norm.bias")


def test_trainable_base_layer_parameters_are_the_models_not_reported() -> None:
    # bias="lora_only" trains the adapted layers' biases: part of the model SAFE never freezes.
    model = tuned_bert(tuner_config("lora", bias="lora_only"))
    assert model.get_submodule(SITES[0]).base_layer.bias.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = find_adapter_pairs(model)
    assert all("base_layer" not in n for p in pairs for n in p.param_names)


def test_unknown_peft_tuner_error_gives_the_pattern_line() -> None:
    from peft import VeraConfig

    model = tuned_bert(VeraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(AdapterDiscoveryError) as info:
        find_adapter_pairs(model)
    message = str(info.value)
    assert "found 4 base layer(s)" in message
    assert message.endswith(
        "if these adapters add to or scale the base layer's output, pass "
        r'pattern=AdapterPattern(params=r"(?:vera_lambda_b|vera_lambda_d)\.(?P<adapter>[^.]+)(?:\..+)?")'
    )
    line = re.search(r"pattern=(AdapterPattern\(.*\))$", message)
    assert line is not None
    pairs = find_adapter_pairs(model, eval(line.group(1)))
    assert [p.name for p in pairs] == SITES


# ---- several patterns ----------------------------------------------------------------------


class MixedBlock(nn.Module):
    """A projection (LoRA-wrapped by PEFT) followed by a hand-written bottleneck adapter."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.adapter = Bottleneck(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.tanh(self.proj(x)))


class MixedNet(nn.Module):
    def __init__(self, d: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MixedBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mixed_net() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(MixedNet(), LoraConfig(r=2, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if ".adapter." in name:  # PEFT froze everything but LoRA
            param.requires_grad_(True)
    return model


MIXED = [AdapterPattern(), BOTTLENECK]
NET = "base_model.model.blocks"


def test_a_list_of_patterns_combines_pairs_in_model_order() -> None:
    model = mixed_net()
    pairs = find_adapter_pairs(model, MIXED)
    assert [(p.name, p.base) for p in pairs] == [
        (f"{NET}.0.proj", f"{NET}.0.proj.base_layer"),
        (f"{NET}.0.adapter", None),
        (f"{NET}.1.proj", f"{NET}.1.proj.base_layer"),
        (f"{NET}.1.adapter", None),
    ]
    assert pairs[1].param_names == tuple(
        f"{NET}.0.adapter.{m}.{k}" for m in ("down", "up") for k in ("weight", "bias")
    )
    assert find_adapter_pairs(model, [BOTTLENECK]) == find_adapter_pairs(model, BOTTLENECK)


def test_one_optimizer_trains_and_freezes_a_mixed_model() -> None:
    model = mixed_net()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = SAFEOptimizer(inner, model, CONFIG, pattern=MIXED)
    frozen = Frozen(opt, model)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        model(torch.randn(16, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(6):
        step()
    assert opt.frozen_adapters == [f"{NET}.0.proj", f"{NET}.0.adapter"]
    assert set(opt.scores) == {p.name for p in opt.controller.pairs}
    assert_frozen_for_real(opt, model, frozen)
    opt.close()


def test_a_parameter_claimed_by_two_patterns_is_an_error_naming_both() -> None:
    model = mixed_net()
    # The whole block as a site, scored against its input, also claims the adapter's parameters.
    block = AdapterPattern(site=r".*\.blocks\.\d+", base=None, params=r"adapter\.(?:down|up)\..+")
    with pytest.raises(AdapterDiscoveryError) as info:
        find_adapter_pairs(model, [*MIXED, block])
    message = str(info.value)
    assert f"parameter '{NET}.0.adapter.down.weight' is claimed by two adapter patterns: " in message
    assert f"{BOTTLENECK} (adapter '{NET}.0.adapter') and {block} (adapter '{NET}.0')" in message
    # Two patterns on one site.
    lora_a = AdapterPattern(site=r".*\.proj", params=r"lora_A\..+")
    with pytest.raises(
        AdapterDiscoveryError, match=re.escape(f"adapter '{NET}.0.proj' is found by two adapter patterns")
    ):
        find_adapter_pairs(model, [AdapterPattern(params=r"lora_B\..+"), lora_a])


@pytest.mark.parametrize(
    ("pattern", "error", "words"),
    [
        ([], ValueError, "pattern is an empty list"),
        ([BOTTLENECK, "lora"], TypeError, "the list holds ['str']"),
        ({"site": ".*"}, TypeError, "got dict"),
    ],
)
def test_bad_pattern_arguments(pattern: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        find_adapter_pairs(mixed_net(), pattern)


def test_a_pattern_of_a_list_that_finds_nothing_is_named() -> None:
    nothing = AdapterPattern(site=r".*\.missing", base=None, params=r"x\..+")
    with pytest.raises(AdapterDiscoveryError, match=re.escape(f"adapter pattern {nothing} matched 0 of")):
        find_adapter_pairs(mixed_net(), [AdapterPattern(), nothing])
