"""Scoring that stays right: padding masks found wherever they are, ``torch.compile``,
gradient checkpointing, and several adapters active at one site."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from models import peft_bert, tiny_bert_config
from torch import nn

from safefreeze import SAFEConfig, SAFEOptimizer
from safefreeze.cka._torch import STAT_BATCHES, STAT_ROWS_PADDING, STAT_ROWS_USED

# Scores every token of a batch (no subsampling) and never freezes during these runs.
SCORE_ONLY = SAFEConfig(warmup_steps=50, freeze_end_step=60, tau_target=0.0, max_tokens=256, score_every=1)


def _padded_batch(seed: int, batch: int = 4, tokens: int = 16) -> dict[str, torch.Tensor]:
    """Token ids with right padding of different lengths per row, and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([tokens, tokens - 3, tokens // 2, 5][:batch])
    mask = (torch.arange(tokens) < lengths[:, None]).long()  # (B, T)
    ids = torch.randint(1, 100, (batch, tokens), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}


def _stats(opt: SAFEOptimizer) -> torch.Tensor:
    acc = opt.controller._accumulator
    assert acc is not None
    return acc.stats


def _raw(opt: SAFEOptimizer) -> list[float]:
    """Running raw scores (1 - CKA) per adapter, in model order."""
    acc = opt.controller._accumulator
    assert acc is not None
    return [1.0 - c for c in acc.values().tolist()]


def _train(model: nn.Module, opt: SAFEOptimizer, loss_of: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    for step in range(3):
        loss_of(_padded_batch(step)).backward()
        opt.step()
        opt.zero_grad()


class _Classifier(nn.Module):
    """Lightning's pattern: the optimizer gets the outer module, which calls the HF model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---- padding -------------------------------------------------------------------------------


def test_positional_and_nested_masks_score_like_the_keyword_mask() -> None:
    def run(how: str) -> tuple[list[float], torch.Tensor]:
        model = peft_bert(layers=2, seed=0, init_lora_weights=False)  # nonzero adapters from the start
        model.train()
        outer: nn.Module = _Classifier(model) if how == "wrapper" else model
        inner = torch.optim.SGD([p for p in outer.parameters() if p.requires_grad], lr=0.1)
        opt = SAFEOptimizer(inner, outer, SCORE_ONLY)

        def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
            if how == "keyword":
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            elif how == "positional":
                logits = model(b["input_ids"], b["attention_mask"]).logits
            elif how == "wrapper":
                logits = outer(b)
            else:  # padding left unmasked, as the model's forward allows
                logits = model(input_ids=b["input_ids"]).logits
            return F.cross_entropy(logits, b["labels"])

        _train(model, opt, loss_of)  # no padding warning: the model itself reads no mask either
        stats = _stats(opt).clone()
        opt.close()
        return _raw(opt), stats

    keyword, stats = run("keyword")
    # 3 batches of 64 tokens, 22 of them padding; every adapter saw all real ones.
    assert stats[:, STAT_ROWS_PADDING].tolist() == [66.0] * 4
    assert stats[:, STAT_ROWS_USED].tolist() == [126.0] * 4
    for how in ("positional", "wrapper"):
        raw, other = run(how)
        assert raw == keyword, how
        assert torch.equal(other, stats), how
    # The comparison means something: scoring the padding moves every score.
    unmasked, _ = run("unmasked")
    shifts = [abs(a - b) for a, b in zip(unmasked, keyword, strict=True)]
    assert min(shifts) > 1e-3 and max(shifts) > 0.01


class _SeqLoRA(nn.Module):
    """A hand-written sequence model whose forward takes its mask under another name."""

    def __init__(self) -> None:
        super().__init__()
        from models import HandLoRALinear

        self.layers = nn.ModuleList(HandLoRALinear(8, 8) for _ in range(2))
        for layer in self.layers:
            nn.init.normal_(layer.lora_up.weight, std=0.5)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))  # (B, T, D)
        return (x * valid[..., None]).sum()


def _seq_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1:, 4:] = False  # 6 padding tokens
    return torch.randn(4, 6, 8, generator=g), valid


def test_mask_fn_reads_a_custom_layout_and_its_none_means_no_padding() -> None:
    from test_controller import HAND_LORA

    def run(mask_fn: Any) -> torch.Tensor:
        torch.manual_seed(0)
        model = _SeqLoRA()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = SAFEOptimizer(inner, model, SCORE_ONLY, pattern=HAND_LORA, mask_fn=mask_fn)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither run may warn about padding
            for step in range(2):
                model(*_seq_batch(step)).backward()
                opt.step()
                opt.zero_grad()
        opt.close()
        return _stats(opt)

    masked = run(lambda args, kwargs: args[1])
    assert masked[:, STAT_ROWS_PADDING].tolist() == [12.0, 12.0]
    assert masked[:, STAT_ROWS_USED].tolist() == [36.0, 36.0]
    unmasked = run(lambda args, kwargs: None)
    assert unmasked[:, STAT_ROWS_PADDING].tolist() == [0.0, 0.0]
    assert unmasked[:, STAT_ROWS_USED].tolist() == [48.0, 48.0]


class _PlainSeq(_SeqLoRA):
    """The same layers with nothing in the forward that could be a padding mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self.layers:
            x = torch.tanh(layer(x))  # (B, T, D)
        return x.sum()


def test_a_sequence_model_with_no_mask_anywhere_scores_without_a_padding_warning() -> None:
    from test_controller import HAND_LORA

    torch.manual_seed(0)
    model = _PlainSeq()
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, SCORE_ONLY, pattern=HAND_LORA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            model(_seq_batch(step)[0]).backward()
            opt.step()
            opt.zero_grad()
    assert _stats(opt)[:, STAT_ROWS_USED].tolist() == [48.0, 48.0]  # every token, as given
    opt.close()


def test_a_sequence_batch_without_a_mask_warns_once_and_bad_mask_fns_raise() -> None:
    from test_controller import HAND_LORA

    torch.manual_seed(0)
    model = _SeqLoRA()
    opt = SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, SCORE_ONLY, pattern=HAND_LORA)
    with pytest.warns(UserWarning) as record:
        for step in range(3):
            model(*_seq_batch(step)).backward()
            opt.step()
    padding = [str(w.message) for w in record if "padding may count as real tokens" in str(w.message)]
    assert len(padding) == 1
    assert "output shape (4, 6, 8)" in padding[0] and "mask_fn=lambda args, kwargs: None" in padding[0]
    assert "the model got a torch.bool argument 'valid' of shape (4, 6)" in padding[0]
    opt.close()

    sgd = torch.optim.SGD(model.parameters())
    with pytest.raises(TypeError, match=r"mask_fn must be a callable .* got str"):
        SAFEOptimizer(sgd, model, SCORE_ONLY, pattern=HAND_LORA, mask_fn="x")  # type: ignore[arg-type]
    total = SAFEOptimizer(
        sgd, model, SCORE_ONLY, pattern=HAND_LORA, mask_fn=lambda args, kwargs: args[1].sum()
    )
    with total, pytest.raises(ValueError, match=r"mask_fn must return a \(B, T\) mask .* or None, got \(\)"):
        model(*_seq_batch(0))


# ---- torch.compile ---------------------------------------------------------------------------


class _CountingBackend:
    """A Dynamo backend that runs each captured graph as is and counts the ops it runs.

    Dynamo's capture, guards and recompiles are what scoring hooks can break, and they do
    not depend on the backend; running the FX graph keeps the test free of inductor's
    minutes-long C++ compilation on a CPU.
    """

    def __init__(self) -> None:
        self.ops_run = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        ops = sum(node.op in ("call_function", "call_method", "call_module") for node in gm.graph.nodes)

        def run(*args: Any) -> Any:
            self.ops_run += ops
            return gm.forward(*args)

        return run


def _compiled_run(config: SAFEConfig | None, steps: int = 6) -> tuple[list[int], torch.optim.Optimizer]:
    """Ops run inside compiled graphs per step, and the optimizer (None: plain LoRA)."""
    torch._dynamo.reset()
    model = peft_bert(layers=8, seed=0)  # 16 LoRA adapters on query and value
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt: torch.optim.Optimizer = inner if config is None else SAFEOptimizer(inner, model, config)
    backend = _CountingBackend()
    compiled = torch.compile(model, backend=backend)
    ops = []
    for step in range(steps):
        backend.ops_run = 0
        compiled(**_padded_batch(step, batch=4, tokens=16)).loss.backward()
        opt.step()
        opt.zero_grad()
        ops.append(backend.ops_run)
    return ops, opt


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_scoring_a_compiled_model_hits_no_recompile_limit_and_leaves_it_compiled() -> None:
    config = SAFEConfig(warmup_steps=3, freeze_end_step=50, tau_target=0.5, merge=False, max_tokens=32)
    # A longer warm-up scores every other step: the hooks come off and back on five times.
    sparse = dataclasses.replace(config, warmup_steps=16)
    assert sparse.score_interval == 2
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        plain, _ = _compiled_run(None, steps=12)
        ops, opt = _compiled_run(config)
        sparse_ops, sparse_opt = _compiled_run(sparse, steps=12)
    assert isinstance(opt, SAFEOptimizer) and isinstance(sparse_opt, SAFEOptimizer)
    scores = opt.plan.raw_scores
    # Every op of the forward runs in a compiled graph, during the warm-up and after it,
    # whether the step is scored or not.
    assert plain[-1] > 300
    assert ops == plain[:6]
    assert sparse_ops == plain
    # The hooks put back on the compiled model score again: steps 0, 2, ..., 10 for every adapter.
    stats = sparse_opt.controller._accumulator.stats  # type: ignore[union-attr]
    assert stats[:, STAT_BATCHES].tolist() == [6.0] * 16
    torch._dynamo.reset()
    # The hooks run eagerly on the tensors the graphs produce: the scores are the eager ones.
    model = peft_bert(layers=8, seed=0)
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with SAFEOptimizer(inner, model, config) as opt:
        for step in range(3):
            model(**_padded_batch(step, batch=4, tokens=16)).loss.backward()
            opt.step()
            opt.zero_grad()
        assert len(scores) == 8
        assert scores == pytest.approx(opt.plan.raw_scores, rel=1e-6)


# ---- gradient checkpointing ------------------------------------------------------------------


def _bert_without_dropout(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_bert_config(2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    base = BertForSequenceClassification(config)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_forwards_are_scored_once(reentrant: bool) -> None:
    def run(checkpointing: bool) -> tuple[list[float], torch.Tensor]:
        model = _bert_without_dropout()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with SAFEOptimizer(inner, model, SCORE_ONLY) as opt:
            _train(model, opt, lambda b: model(**b).loss)
            return _raw(opt), _stats(opt).clone()

    plain, plain_stats = run(checkpointing=False)
    raw, stats = run(checkpointing=True)
    assert stats[:, STAT_BATCHES].tolist() == [3.0] * 4  # 3 forwards, not 6
    assert torch.equal(stats[:, STAT_ROWS_USED:], plain_stats[:, STAT_ROWS_USED:])
    assert raw == pytest.approx(plain, rel=1e-6)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_that_backpropagates_through_the_frozen_prefix_warns_once(reentrant: bool) -> None:
    model = peft_bert(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    config = SAFEConfig.paper(warmup_steps=1, freeze_end_step=1, tau_target=1.0)
    opt = SAFEOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, config)
    opt.controller.finalize_scores(
        {u: (0.0 if "layer.0.attention.self.query" in u else 1.0) for u in opt.controller.units}
    )
    model(**_padded_batch(0)).loss.backward()
    opt.step()
    assert opt.frozen_adapters == ["base_model.model.bert.encoder.layer.0.attention.self.query"]
    with pytest.warns(UserWarning, match="the input of the lowest frozen adapter") as record:
        for step in (1, 2):
            model(**_padded_batch(step)).loss.backward()
    messages = [str(w.message) for w in record if "lowest frozen adapter" in str(w.message)]
    assert len(messages) == 1
    if reentrant:
        assert "reentrant gradient checkpointing (use_reentrant=True)" in messages[0]
    else:
        assert "enable_input_require_grads()" in messages[0]
    opt.close()


# ---- several adapters at one site ------------------------------------------------------------


class _Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _two_adapter_model(active: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Proj(), LoraConfig(r=4, target_modules=["proj"]))
    model.add_adapter("big", LoraConfig(r=4, target_modules=["proj"]))
    g = torch.Generator().manual_seed(1)
    for name, std in (("default", 0.05), ("big", 1.0)):
        model.base_model.model.proj.lora_B[name].weight.data = std * torch.randn(16, 4, generator=g)
    model.base_model.set_adapter(active)
    return model


def test_adapters_sharing_a_site_are_scored_on_their_own_contribution() -> None:
    def scores(active: list[str]) -> list[float]:
        model = _two_adapter_model(active)
        config = SAFEConfig(warmup_steps=50, freeze_end_step=60, tau_target=0.0, max_tokens=64, score_every=1)
        with SAFEOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, config) as opt:
            assert len(opt.controller.pairs) == len(active)
            g = torch.Generator().manual_seed(2)
            for _ in range(2):
                model(torch.randn(64, 16, generator=g)).square().mean().backward()
                opt.step()
                opt.zero_grad()
            return _raw(opt)

    both = scores(["default", "big"])
    alone = scores(["default"]) + scores(["big"])
    assert both[1] > 10 * both[0]  # the larger adapter changes its output more
    assert both == pytest.approx(alone, rel=1e-6)


# ---- devices -------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scoring_on_cuda_draws_the_rows_a_cpu_run_draws() -> None:
    """Rows are drawn on the host from the config's seed, so a CUDA run subsamples the same
    tokens as a CPU run and its scores differ only by the devices' rounding."""
    subsampled = dataclasses.replace(SCORE_ONLY, max_tokens=8)  # fewer than the 42 real tokens

    def run(device: str, seed: int = 0) -> tuple[list[float], torch.Tensor]:
        model = peft_bert(layers=2, seed=0, init_lora_weights=False).to(device).train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # dropout masks differ between devices; the drawn rows must not
        inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        opt = SAFEOptimizer(inner, model, dataclasses.replace(subsampled, seed=seed))

        def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return F.cross_entropy(logits, b["labels"])

        _train(model, opt, loss_of)
        stats = _stats(opt).cpu()
        opt.close()
        return _raw(opt), stats

    cpu_raw, cpu_stats = run("cpu")
    cuda_raw, cuda_stats = run("cuda")
    assert cuda_stats[:, STAT_ROWS_USED].tolist() == [24.0] * 4  # 8 rows of each of 3 batches
    assert torch.equal(cuda_stats[:, STAT_ROWS_PADDING], cpu_stats[:, STAT_ROWS_PADDING])
    assert cuda_raw == pytest.approx(cpu_raw, rel=1e-3, abs=1e-6)
    # Other rows move the scores by far more than rounding: another seed draws other rows.
    reseeded, _ = run("cuda", seed=1)
    assert max(abs(a - b) / b for a, b in zip(reseeded, cpu_raw, strict=True)) > 1e-2
