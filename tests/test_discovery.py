from __future__ import annotations

import re
import warnings

import pytest
import torch
from models import BottleneckNet, HandLoRANet, peft_bert
from torch import nn

from safefreeze import AdapterDiscoveryError, AdapterPattern, find_adapter_pairs

HAND_LORA = AdapterPattern(base="base", params=r"lora_(?:down|up)\..+")
BOTTLENECK = AdapterPattern(site=r".*\.adapter", base=None, params=r"(?:down|up)\..+")
PREFIX = "base_model.model.bert.encoder.layer"


def test_peft_lora_several_targets_per_block() -> None:
    model = peft_bert(("query", "key", "value", "attention.output.dense"))
    pairs = find_adapter_pairs(model)
    expected = [
        f"{PREFIX}.{i}.attention.{part}"
        for i in range(2)
        for part in ("self.query", "self.key", "self.value", "output.dense")
    ]
    assert [p.name for p in pairs] == expected
    query = pairs[0]
    assert query.site == query.name
    assert query.base == f"{query.name}.base_layer"
    assert query.adapter == "default"
    assert query.param_names == (
        f"{query.name}.lora_A.default.weight",
        f"{query.name}.lora_B.default.weight",
    )
    assert all(p.trainable for p in pairs)
    # Every trainable LoRA parameter belongs to exactly one pair; the head to none.
    owned = [n for p in pairs for n in p.param_names]
    assert len(owned) == len(set(owned))
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert set(owned) == lora


def test_peft_head_copies_are_never_pairs() -> None:
    model = peft_bert(("query", "value"))
    names = [n for n, _ in model.named_parameters()]
    assert any("modules_to_save" in n for n in names)  # the task head is a trainable copy
    pairs = find_adapter_pairs(model)
    assert not any("classifier" in p.name for p in pairs)
    assert not any("classifier" in n for p in pairs for n in p.param_names)


def test_lora_inside_a_head_copy_is_excluded() -> None:
    from peft import LoraConfig, get_peft_model

    # A head whose inner Linear is LoRA-wrapped *and* kept as a modules_to_save copy.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["body", "head.0"]))
    model.base_model.model.head = _wrap_as_head_copy(model.base_model.model.head)
    pairs = find_adapter_pairs(model)
    assert [p.name for p in pairs] == ["base_model.model.body"]


def _wrap_as_head_copy(head: nn.Module) -> nn.Module:
    wrapper = nn.Module()
    wrapper.original_module = head
    wrapper.modules_to_save = nn.ModuleDict({"default": head})
    return wrapper


def test_only_the_active_peft_adapter_is_a_pair() -> None:
    from peft import LoraConfig

    model = peft_bert(("query", "value"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"], use_dora=True))
    pairs = find_adapter_pairs(model)
    assert {p.adapter for p in pairs} == {"default"}
    assert len(pairs) == 4

    model.set_adapter("other")
    pairs = find_adapter_pairs(model)
    assert [p.name for p in pairs] == [f"{PREFIX}.{i}.attention.self.query" for i in range(2)]
    # DoRA's magnitude vector counts as an adapter parameter.
    assert pairs[0].param_names == tuple(
        f"{pairs[0].name}.{part}.other.weight" for part in ("lora_A", "lora_B", "lora_magnitude_vector")
    )
    assert all(p.trainable for p in pairs)


def test_embedding_lora_parameters_count() -> None:
    model = peft_bert(("word_embeddings", "query"))
    pairs = find_adapter_pairs(model)
    emb = pairs[0]
    assert emb.name == "base_model.model.bert.embeddings.word_embeddings"
    assert emb.param_names == (
        f"{emb.name}.lora_embedding_A.default",
        f"{emb.name}.lora_embedding_B.default",
    )
    assert len(pairs) == 3


def test_hand_written_lora_by_pattern_alone() -> None:
    pairs = find_adapter_pairs(HandLoRANet(depth=3), HAND_LORA)
    assert [(p.name, p.base, p.adapter) for p in pairs] == [
        (f"layers.{i}", f"layers.{i}.base", None) for i in range(3)
    ]
    assert pairs[1].param_names == ("layers.1.lora_down.weight", "layers.1.lora_up.weight")


def test_bottleneck_adapter_scored_against_its_input() -> None:
    pairs = find_adapter_pairs(BottleneckNet(depth=2), BOTTLENECK)
    assert [(p.name, p.base) for p in pairs] == [("blocks.0.adapter", None), ("blocks.1.adapter", None)]
    assert pairs[0].param_names == tuple(
        f"blocks.0.adapter.{part}.{kind}" for part in ("down", "up") for kind in ("weight", "bias")
    )


def test_bottleneck_with_open_site_pattern_claims_each_param_once() -> None:
    # site=".*" lets every ancestor match too; parameters go to the innermost site.
    pattern = AdapterPattern(base=None, params=r"(?:down|up)\..+")
    pairs = find_adapter_pairs(BottleneckNet(depth=2), pattern)
    assert [p.name for p in pairs] == ["blocks.0.adapter", "blocks.1.adapter"]


def test_adapter_without_trainable_parameter_is_reported() -> None:
    model = HandLoRANet(depth=3)
    model.layers[1].lora_down.requires_grad_(False)
    model.layers[1].lora_up.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"1 of 3 adapter\(s\) have no trainable parameter.*'layers\.1'"):
        pairs = find_adapter_pairs(model, HAND_LORA)
    assert [p.trainable for p in pairs] == [True, False, True]


def test_no_warning_when_all_trainable() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_adapter_pairs(HandLoRANet(), HAND_LORA)


def test_zero_matches_names_pattern_counts_and_samples() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(AdapterDiscoveryError) as info:
        find_adapter_pairs(model)
    message = str(info.value)
    assert "AdapterPattern(site='.*', base='base_layer'" in message
    assert "matched 0 of 4 modules" in message
    assert "['0', '2']" in message


def test_base_layers_without_adapters_is_explained() -> None:
    with pytest.raises(AdapterDiscoveryError) as info:
        find_adapter_pairs(HandLoRANet(depth=3), AdapterPattern(base="base", params=r"adapter_.*"))
    message = str(info.value)
    assert "found 3 base layer(s) (e.g. 'layers.0.base')" in message
    assert "no adapter parameters matching params='adapter_.*'" in message
    assert "'lora_down.weight'" in message


def test_two_base_children_is_ambiguous() -> None:
    model = HandLoRANet(depth=1)
    model.layers[0].base2 = nn.Linear(8, 8)
    with pytest.raises(AdapterDiscoveryError, match=r"matched 2 children of 'layers\.0'"):
        find_adapter_pairs(model, AdapterPattern(base=r"base2?", params=r"lora_.*"))


def test_invalid_regex_is_rejected_on_construction() -> None:
    with pytest.raises(ValueError, match=re.escape("AdapterPattern.params is not a valid regex: '(['")):
        AdapterPattern(params="([")


def test_pairs_follow_a_ddp_style_prefix() -> None:
    wrapper = nn.Module()
    wrapper.module = HandLoRANet(depth=2)
    pairs = find_adapter_pairs(wrapper, HAND_LORA)
    assert [p.name for p in pairs] == ["module.layers.0", "module.layers.1"]
    params = dict(wrapper.named_parameters())
    assert all(name in params for p in pairs for name in p.param_names)
    assert isinstance(params[pairs[0].param_names[0]], torch.nn.Parameter)


def test_attention_modules_are_the_innermost_attention_of_bert_gpt2_and_llama_blocks() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from safefreeze.discovery import attention_modules

    small = {"vocab_size": 64}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, **small))
    llama = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, **small)
    )
    bert = peft_bert(layers=2)
    assert attention_modules(gpt2, "transformer.h.1") == ["transformer.h.1.attn"]
    assert attention_modules(llama, "model.layers.0") == ["model.layers.0.self_attn"]
    # BertAttention holds BertSelfAttention and the output projection with its dropout.
    block = "base_model.model.bert.encoder.layer.1"
    assert attention_modules(bert, block) == [f"{block}.attention.self"]
    assert attention_modules(bert, f"{block}.attention.self.query") == []
    assert attention_modules(bert, f"{block}.attention.self") == [f"{block}.attention.self"]
