"""ONNX reference scoring: real exports run by onnx's numpy reference evaluator, checked
against SAFEOptimizer's torch scores for the same batches and the same drawn rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import HandLoRANet, peft_bert
from torch import nn

from safefreeze import AdapterPattern, SAFEConfig, SAFEOptimizer
from safefreeze.cli import main
from safefreeze.integrations.onnx import (
    METADATA_KEY,
    UnsupportedOperatorError,
    export_scored_model,
    load_batches,
    reference_scores,
    save_batches,
)

onnx = pytest.importorskip("onnx")

HAND_LORA = AdapterPattern(base="base", params=r"lora_(?:down|up)\..+")
# Agreement reached on 1 - CKA between the torch path and the reference (float32 models).
TOLERANCE = 1e-6

pytestmark = pytest.mark.filterwarnings(
    # The TorchScript exporter reports shape-dependent Python branches in transformers' code.
    "ignore::torch.jit.TracerWarning",
    "ignore:Exporting aten:UserWarning",  # its advanced-indexing note
    "ignore:The feature will be removed:DeprecationWarning",
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
)


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _token_batches(count: int, batch: int, length: int, vocab: int, *, types: bool) -> list[dict[str, Any]]:
    """Batches with padding at the end of some rows, so the mask and the row draw both matter."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(batch):
            keep = int(torch.randint(4, length + 1, (1,), generator=g))
            mask[row, keep:] = 0
        item = {"input_ids": ids, "attention_mask": mask}
        if types:
            item["token_type_ids"] = torch.zeros_like(ids)
        out.append(item)
    return out


def _torch_scores(
    model: nn.Module, batches: list[dict[str, Any]], config: SAFEConfig, pattern: AdapterPattern | None = None
) -> tuple[SAFEOptimizer, dict[str, float], dict[str, int]]:
    """SAFE's per-adapter 1 - CKA from training steps (lr 0, so every batch sees the same weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SAFEOptimizer(torch.optim.SGD(params, lr=0.0), model, config, pattern=pattern)
    model.train()
    for batch in batches:
        out = model(**batch)
        (out if isinstance(out, torch.Tensor) else out.logits).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    acc = opt.controller._accumulator
    assert acc is not None
    cka = acc.values().tolist()
    rows = acc.stats[:, 4].tolist()
    opt.controller.finalize_scores()
    names = [p.name for p in opt.controller.pairs]
    return (
        opt,
        {n: 1.0 - min(max(c, 0.0), 1.0) for n, c in zip(names, cka, strict=True)},
        {n: int(r) for n, r in zip(names, rows, strict=True)},
    )


def _check_agreement(
    model: nn.Module, batches: list[dict[str, Any]], config: SAFEConfig, path: Path, **kw: Any
) -> None:
    pattern = kw.pop("pattern", None)
    opt, expected, rows = _torch_scores(model, batches, config, pattern)
    names = export_scored_model(model, path, batches[0], pattern=pattern, **kw)
    assert model.training  # modes restored
    ref = reference_scores(path, batches, max_rows=config.max_tokens, seed=config.seed)
    assert names == list(expected) == list(ref.scores)
    assert ref.rows == rows  # the same padding rule and the same number of rows drawn
    assert ref.batches == {n: len(batches) for n in names}
    for name in names:
        assert 0.0 < expected[name] < 1.0  # a real score, not the trivial 0 of zero-initialised B
        assert abs(ref.scores[name] - expected[name]) <= TOLERANCE, (name, ref.scores[name], expected[name])
    units = ref.unit_scores(opt.plan.units)
    for unit, value in opt.controller.raw_scores.items():
        assert abs(units[unit] - value) <= TOLERANCE


def test_peft_lora_bert_matches_torch_scores(tmp_path: Path) -> None:
    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0))
    batches = _token_batches(3, 4, 12, 100, types=True)
    # 16 of up to 48 real tokens per batch: the generator draws, so the same rows must be drawn.
    _check_agreement(
        model,
        batches,
        SAFEConfig(warmup_steps=10, freeze_end_step=20, max_tokens=16, seed=3, score_every=1),
        tmp_path / "bert.onnx",
    )


def test_draws_differ_with_seed(tmp_path: Path) -> None:
    """The seed reaches the draw: another seed reads other rows and gives another score."""
    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0)).eval()
    batches = _token_batches(2, 4, 12, 100, types=True)
    path = tmp_path / "bert.onnx"
    export_scored_model(model, path, batches[0])
    a = reference_scores(path, batches, max_rows=8, seed=0).scores
    b = reference_scores(path, batches, max_rows=8, seed=1).scores
    assert all(a[n] != b[n] for n in a)


def test_peft_lora_llama_matches_torch_scores(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    batches = _token_batches(3, 3, 10, 64, types=False)
    _check_agreement(
        model,
        batches,
        SAFEConfig(warmup_steps=10, freeze_end_step=20, max_tokens=12, seed=5, score_every=1),
        tmp_path / "llama.onnx",
    )


class _SeqHandLoRA(nn.Module):
    """HandLoRANet over (B, T, D) sequences with a padding mask the forward accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = HandLoRANet(d=8, depth=3)
        for layer in self.net.layers:
            nn.init.normal_(layer.lora_up.weight, std=0.5)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(x * attention_mask[..., None].to(x.dtype))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_hand_written_adapters_match_torch_scores(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    model = _SeqHandLoRA()
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[1, 2:] = 0
        batches.append({"x": torch.randn(4, 6, 8, generator=g), "attention_mask": mask})
    config = SAFEConfig(warmup_steps=10, freeze_end_step=20, max_tokens=8, seed=0, score_every=1)
    _check_agreement(model, batches, config, tmp_path / "hand.onnx", pattern=HAND_LORA, dynamo=dynamo)


def test_batches_round_trip(tmp_path: Path) -> None:
    batches = _token_batches(2, 2, 5, 10, types=True)
    assert save_batches(tmp_path / "b.npz", batches) == 2
    loaded = load_batches(tmp_path / "b.npz")
    assert [sorted(b) for b in loaded] == [["attention_mask", "input_ids", "token_type_ids"]] * 2
    for a, b in zip(batches, loaded, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key])
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros(3))
    with pytest.raises(ValueError, match=r"'input_ids'; expected '<batch number>.<input name>'"):
        load_batches(tmp_path / "bad.npz")


def _custom_op_model(path: Path) -> None:
    """A real ONNX graph whose only operator is one the reference evaluator does not know."""
    from onnx import TensorProto, helper

    node = helper.make_node("FancyAttention", ["x"], ["pair0_adapted"], domain="com.example", name="fancy")
    ident = helper.make_node("Identity", ["x"], ["pair0_base"], name="keep")
    graph = helper.make_graph(
        [ident, node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 4])],
        [
            helper.make_tensor_value_info("pair0_base", TensorProto.FLOAT, ["B", "T", 4]),
            helper.make_tensor_value_info("pair0_adapted", TensorProto.FLOAT, ["B", "T", 4]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    meta = {
        "format": 1,
        "inputs": ["x"],
        "pairs": [{"name": "site", "base": "pair0_base", "adapted": "pair0_adapted"}],
        "draw_order": [0],
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    onnx.save(model, path)


def test_unsupported_operator_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _custom_op_model(tmp_path / "custom.onnx")
    batch = {"x": np.ones((2, 3, 4), dtype=np.float32)}
    with pytest.raises(UnsupportedOperatorError, match=r"com\.example::FancyAttention \(node 'fancy'\)"):
        reference_scores(tmp_path / "custom.onnx", [batch])
    np.savez(tmp_path / "b.npz", **{"0.x": batch["x"]})
    code = main(["score", str(tmp_path / "custom.onnx"), str(tmp_path / "b.npz")])
    assert code == 2
    assert "com.example::FancyAttention" in capsys.readouterr().err


def test_failing_kernel_is_named(tmp_path: Path) -> None:
    """BERT exported without token_type_ids gathers from its buffer with GatherElements, which
    onnx's reference kernel cannot broadcast: the error names that operator and its node."""
    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0)).eval()
    batches = _token_batches(1, 2, 6, 100, types=False)
    export_scored_model(model, tmp_path / "bert.onnx", batches[0])
    with pytest.raises(
        UnsupportedOperatorError, match=r"failed in operator ai\.onnx::GatherElements \(node '"
    ):
        reference_scores(tmp_path / "bert.onnx", batches)


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0)).eval()
    batches = _token_batches(1, 2, 6, 100, types=True)
    path = tmp_path / "bert.onnx"
    export_scored_model(model, path, batches[0])
    with pytest.raises(ValueError, match=r"batch 0 misses input\(s\) \['token_type_ids'\]"):
        reference_scores(path, [{k: v for k, v in batches[0].items() if k != "token_type_ids"}])
    with pytest.raises(ValueError, match="max_rows must be None or >= 4, got 2"):
        reference_scores(path, batches, max_rows=2)
    with pytest.raises(ValueError, match="runtime must be 'reference' or 'onnxruntime', got 'gpu'"):
        reference_scores(path, batches, runtime="gpu")
    plain = onnx.load(path)
    del plain.metadata_props[:]
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match=r"was not written by .*export_scored_model"):
        reference_scores(tmp_path / "plain.onnx", batches)
    with pytest.raises(ValueError, match="example_inputs must map input names to tensors"):
        export_scored_model(model, tmp_path / "x.onnx", {"input_ids": [1, 2]})  # type: ignore[dict-item]


def test_cli_score_prints_both_and_flags_rank_disagreement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0))
    batches = _token_batches(2, 4, 12, 100, types=True)
    config = SAFEConfig(
        warmup_steps=10, freeze_end_step=20, max_tokens=16, seed=3, units="adapter", score_every=1
    )
    opt, expected, _ = _torch_scores(model, batches, config)
    opt.plan.save(tmp_path / "plan.json")
    export_scored_model(model, tmp_path / "m.onnx", batches[0])
    save_batches(tmp_path / "b.npz", batches)
    args = ["score", str(tmp_path / "m.onnx"), str(tmp_path / "b.npz"), "--plan", str(tmp_path / "plan.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name, value in expected.items():
        line = next(row for row in out.splitlines() if row.startswith(name))
        reference, recorded = (float(v) for v in line.split()[1:3])
        assert abs(reference - value) <= TOLERANCE and abs(recorded - value) <= 1e-9
    assert "max_rows=16 seed=3 (from the plan)" in out
    assert "ranking agrees" in out

    # A plan whose two lowest scores are swapped: both adapters are flagged, exit code 1.
    data = json.loads((tmp_path / "plan.json").read_text())
    raw = data["scores"]["raw"]
    order = sorted(raw, key=lambda k: raw[k])
    raw[order[0]], raw[order[1]] = raw[order[1]], raw[order[0]]
    (tmp_path / "swapped.json").write_text(json.dumps(data))
    args[-1] = str(tmp_path / "swapped.json")
    assert main(args) == 1
    out = capsys.readouterr().out
    flagged = [row.split()[0] for row in out.splitlines() if row.rstrip().endswith("*")]
    assert sorted(flagged) == sorted(order[:2])
    assert "2 of 4 adapters rank differently" in out

    # Without a plan: the reference scores alone, every row drawn.
    assert main(["score", str(tmp_path / "m.onnx"), str(tmp_path / "b.npz"), "--max-rows", "all"]) == 0
    out = capsys.readouterr().out
    full = reference_scores(tmp_path / "m.onnx", batches, max_rows=None)
    for name, value in full.scores.items():
        line = next(row for row in out.splitlines() if row.startswith(name))
        assert math.isclose(float(line.split()[1]), value, abs_tol=5e-7)


def test_onnxruntime_runtime_agrees_or_is_named(tmp_path: Path) -> None:
    """onnxruntime, when installed, gives the reference's scores; when not, the error says so."""
    import importlib.util

    model = _no_dropout(peft_bert(init_lora_weights=False, lora_dropout=0.0)).eval()
    batches = _token_batches(2, 4, 12, 100, types=True)
    path = tmp_path / "bert.onnx"
    export_scored_model(model, path, batches[0])
    if importlib.util.find_spec("onnxruntime") is None:
        with pytest.raises(ModuleNotFoundError, match="needs onnxruntime, which is not installed"):
            reference_scores(path, batches, runtime="onnxruntime")
        return
    fast = reference_scores(path, batches, runtime="onnxruntime").scores
    slow = reference_scores(path, batches).scores
    assert all(abs(fast[n] - slow[n]) <= TOLERANCE for n in slow)
