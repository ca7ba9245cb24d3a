"""LoRA versus SAFE on pretrained MiniLM-L6 and Rotten Tomatoes: accuracy, FLOPs, memory, time.

Variants, each over the same seeds, data order, dropout and hyperparameters:

- ``safe``: SAFE with ``SAFEConfig.for_run(total_steps)`` (the library's default rule).
- ``lora``: plain LoRA; also evaluated at the first step whose FLOPs reach the SAFE run's
  total of the same seed (``lora_budget``: LoRA stopped at SAFE's FLOPs budget).
- ``paper``: ``SAFEConfig.paper`` with the warm-up and ramp ``for_run`` gives the rules that
  read the scores (``order="score"``).
- ``score-prefix``: ``SAFEConfig.for_run(total_steps, order="prefix")``: the scores pick the
  frozen lower prefix, which stops at the lowest block scoring at or above the threshold.
- ``oracle``: SAFE's recorded plan replayed: its final set at its steps, with no scoring.
- ``eval-frozen``: the default with ``eval_frozen=True``: the frozen blocks run in evaluation
  mode (dropout off).
- ``dropout-kept``: the default with ``eval_frozen=False``: the frozen blocks keep all their
  dropout, their attention's included (the default holds their attention in evaluation mode).
- Ablation (``--ablation``): the default with one lever switched to the paper's setting.

Run ``python benchmarks/rotten.py`` (or ``nox -s bench``); ``--device cpu`` writes
``benchmarks/results/rotten_cpu.json``, ``--device cuda`` ``rotten_cuda.json``, and both
re-render ``docs/benchmarks.md`` and its plots through ``report.py``. ``--smoke`` runs every
variant on a few snippets for CI and writes to a temporary file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from safefreeze import SAFEConfig, SAFEOptimizer
from safefreeze.demo.task import (
    ROTTEN_TOMATOES,
    RunResult,
    TaskConfig,
    Training,
    build_model,
    check_same_run,
    encode,
    machine,
    timed_step,
    train,
    train_together,
    warmup_overhead,
)
from safefreeze.measure import measure_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The benchmark's task: one epoch of 337 steps over the 10,808 training snippets.
TASK = ROTTEN_TOMATOES
# --smoke: 4 steps of 8 snippets of 16 tokens, 32 test snippets.
SMOKE = {"limit": 32, "batch_size": 8, "max_length": 16}
# The main variants, in the order a seed runs them (SAFE first: LoRA's budget is its FLOPs).
MAIN = ("safe", "lora", "paper", "score-prefix", "oracle", "eval-frozen", "dropout-kept")
# Ablation: name -> the one field of the default switched to the paper's setting.
ABLATION: dict[str, dict[str, Any]] = {
    "adapter-units": {"units": "adapter"},
    "score-order": {"order": "score"},
    "max-norm": {"normalization": "max"},
    "no-merge": {"merge": False},
}
VARIANTS = (*MAIN, *ABLATION)


def _load_report() -> ModuleType:
    """``report.py`` beside this file, whether this runs as a script or is imported."""
    path = Path(__file__).with_name("report.py")
    spec = importlib.util.spec_from_file_location("safefreeze_benchmark_report", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


def configs(total_steps: int) -> dict[str, SAFEConfig]:
    """The SAFE config of every variant that records one, for a run of ``total_steps``."""
    safe = SAFEConfig.for_run(total_steps)
    led = SAFEConfig.for_run(total_steps, order="score")
    out = {
        "safe": safe,
        "paper": SAFEConfig.paper(warmup_steps=led.warmup_steps, freeze_end_step=led.freeze_end_step),
        "score-prefix": SAFEConfig.for_run(total_steps, order="prefix"),
        "eval-frozen": dataclasses.replace(safe, eval_frozen=True),
        "dropout-kept": dataclasses.replace(safe, eval_frozen=False),
    }
    out.update({name: dataclasses.replace(safe, **lever) for name, lever in ABLATION.items()})
    return out


def prefix_costs(
    task: TaskConfig, data: dict[str, torch.Tensor], units: int, timed: int = 10
) -> list[dict[str, Any]]:
    """Costs of one step with the lowest ``k`` units frozen (merged), for k = 0..units.

    Each row comes from a SAFE run of the lowest-first rule (``order="depth"``), a one-step
    warm-up and ``tau_target = k / units`` (rank normalization: exactly k units freeze, the
    lowest): FLOPs and saved bytes counted on the first step after the freeze, then the
    median time of ``timed`` more steps. Row 0 is a plain LoRA step. The timed steps of the
    rows take turns, one step of each row per round, so the machine's slower and faster
    spells fall on every row alike.
    """
    device = torch.device(task.device)
    batch = {k: v[: task.batch_size].to(device) for k, v in data.items()}
    base = build_model(task, 0).to(device)
    rows, trained = [], []
    for k in range(units + 1):
        model = copy.deepcopy(base)
        model.train()
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
        config = SAFEConfig(warmup_steps=1, freeze_end_step=1, tau_target=k / units, order="depth")
        optimizer: torch.optim.Optimizer = inner
        if k:
            safe = SAFEOptimizer(inner, model, config)
            optimizer = safe
            for _ in range(3):  # the warm-up step, then the step at which the freeze lands
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if len(safe.frozen_units) != k:
                raise RuntimeError(f"expected {k} frozen units, got {safe.frozen_units}")
        _, costs = measure_step(model, lambda m=model: m(**batch).loss)  # type: ignore[misc]
        optimizer.step()
        optimizer.zero_grad()
        trained.append((model, optimizer))
        rows.append(
            {
                "frozen": k,
                "flops": costs.flops,
                "forward_flops": costs.forward_flops,
                "saved_bytes": costs.saved_bytes,
            }
        )
    times: list[list[float]] = [[] for _ in trained]
    for _ in range(timed):
        for (model, optimizer), row_times in zip(trained, times, strict=True):
            row_times.append(timed_step(model, batch, optimizer))
    for row, row_times in zip(rows, times, strict=True):
        row["step_s"] = statistics.median(row_times) if row_times else None
    for _, optimizer in trained:
        if isinstance(optimizer, SAFEOptimizer):
            optimizer.close()
    return rows


def _options(name: str, cfgs: dict[str, SAFEConfig], safe: RunResult | None) -> dict[str, Any]:
    """The :class:`Training` arguments of variant ``name``; ``safe`` is SAFE's run of the seed."""
    options: dict[str, Any] = {"peak_from_step": cfgs["safe"].warmup_steps}
    if name == "lora":
        if safe is not None:
            options["eval_at_flops"] = safe.total_flops
    elif name == "oracle":
        options["plan"] = None if safe is None else safe.plan
    else:
        options["config"] = cfgs[name]
    return options


def _show(seed: int, name: str, step: int, total: int, loss: float) -> None:
    if step == total or step % max(1, total // 10) == 0:
        print(f"  seed {seed} {name:13s} step {step:4d}/{total}  loss {loss:.3f}", flush=True)


def _report(run: RunResult) -> None:
    budget = ""
    if run.budget_step:
        budget = f" (at SAFE's FLOPs, step {run.budget_step}: acc {run.budget_accuracy:.3f})"
    print(
        f"seed {run.seed} {run.variant:13s} acc {run.accuracy:.3f} f1 {run.macro_f1:.3f} "
        f"TFLOP {run.total_flops / 1e12:.2f} saved {run.mean_saved_bytes / 2**20:.0f} MiB "
        f"time {run.wall_time_s:.0f} s{budget}",
        flush=True,
    )


def run_seed(
    seed: int,
    variants: list[str],
    task: TaskConfig,
    train_data: dict[str, torch.Tensor],
    test_data: dict[str, torch.Tensor],
    cfgs: dict[str, SAFEConfig],
    done: Callable[[RunResult], None] = lambda r: None,
    *,
    together: bool = False,
) -> list[RunResult]:
    """Run the chosen variants of one seed; ``done`` is called with each result.

    One after another (SAFE first: LoRA's budget is its FLOPs, the oracle replays its plan),
    or, with ``together``, step by step in turn (:func:`train_together`) so that their wall
    times meet the same machine load: SAFE then runs once alone first to record the plan and
    the FLOPs the others need, and its run among the others must end identically.
    """
    names = [v for v in VARIANTS if v in variants]
    results: dict[str, RunResult] = {}
    if not together:
        for name in names:
            run = train(
                name,
                task,
                train_data,
                test_data,
                seed=seed,
                progress=lambda step, total, loss, n=name: _show(seed, n, step, total, loss),
                **_options(name, cfgs, results.get("safe")),
            )
            results[name] = run
            _report(run)
            done(run)
        return list(results.values())
    recorded = None
    if "safe" in names:
        recorded = train(
            "safe",
            task,
            train_data,
            test_data,
            seed=seed,
            progress=lambda step, total, loss: _show(seed, "safe (alone)", step, total, loss),
            **_options("safe", cfgs, None),
        )
    runs = [
        Training(name, task, train_data, test_data, seed=seed, **_options(name, cfgs, recorded))
        for name in names
    ]
    for run in train_together(runs, lambda r, loss: _show(seed, r.variant, r.step_index, r.total, loss)):
        if recorded is not None and run.variant == "safe":
            check_same_run(recorded, run)
        _report(run)
        done(run)
        results[run.variant] = run
    return list(results.values())


def run(
    task: TaskConfig,
    seeds: list[int],
    variants: list[str],
    overhead_pairs: int,
    prefix_timed: int = 10,
    save: Callable[[dict[str, Any]], None] = lambda data: None,
    command: str = "python benchmarks/rotten.py",
    together: bool | None = None,
) -> dict[str, Any]:
    """Train every variant for every seed; ``save`` gets the results so far after each run.

    Args:
        task: Fine-tuning settings, identical for every variant.
        seeds: One run of each variant per seed.
        variants: Names from :data:`VARIANTS`; ``oracle`` needs ``safe``.
        overhead_pairs: Timed step pairs of the warm-up overhead measurement.
        prefix_timed: Timed steps per row of :func:`prefix_costs`.
        save: Called with the results after every run and once at the end.
        command: The command line recorded with the results.
        together: Train a seed's variants step by step in turn (:func:`run_seed`); default
            on for CPU, off for CUDA, where each run's peak memory needs its model alone on
            the device.

    Returns:
        The JSON-friendly results that ``report.py`` renders.

    Raises:
        ValueError: If ``oracle`` is asked for without ``safe``.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected names from {list(VARIANTS)}")
    if "oracle" in variants and "safe" not in variants:
        raise ValueError("the oracle replays SAFE's plan: add 'safe' to --variants")
    train_split, test_split = task.load()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    total = task.steps(train_data["labels"].shape[0])
    cfgs = configs(total)
    if together is None:
        together = torch.device(task.device).type == "cpu"
    data: dict[str, Any] = {
        "benchmark": "rotten_tomatoes",
        "command": command,
        "task": dataclasses.asdict(task),
        "configs": {name: cfg.to_dict() for name, cfg in cfgs.items() if name in variants},
        "config": cfgs["safe"].to_dict(),
        "ablation": {name: lever for name, lever in ABLATION.items() if name in variants},
        "variants": [v for v in VARIANTS if v in variants],
        "seeds": seeds,
        "sizes": {
            "train": len(train_split.texts),
            "test": len(test_split.texts),
            "train_encoded": int(train_data["labels"].shape[0]),
            "test_encoded": int(test_data["labels"].shape[0]),
            "test_majority": majority(test_data["labels"]),
            "total_steps": total,
        },
        "machine": machine(task.device),
        "together": together,
        "runs": [],
        "complete": False,
    }
    started = time.perf_counter()

    def done(result: RunResult) -> None:
        data["runs"].append(result.to_dict())
        save(data)

    for seed in seeds:
        run_seed(seed, variants, task, train_data, test_data, cfgs, done, together=together)
    plans = [r["plan"] for r in data["runs"] if r["variant"] == "safe"]
    if plans:  # the step cost of each frozen prefix of SAFE's units
        data["prefix_costs"] = prefix_costs(task, train_data, len(plans[0]["units"]), timed=prefix_timed)
    data["overhead"] = warmup_overhead(task, train_data, cfgs["safe"], overhead_pairs)
    data["elapsed_s"] = time.perf_counter() - started
    data["complete"] = True
    save(data)
    return data


def majority(labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent label."""
    return float(torch.bincount(labels).max()) / labels.shape[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(MAIN),
        help="variants to run (default: the main variants; --ablation adds the ablation runs)",
    )
    parser.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the one-lever ablation (default: on for CUDA, off for CPU)",
    )
    parser.add_argument(
        "--together",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train a seed's variants step by step in turn (default: on for CPU, off for CUDA)",
    )
    parser.add_argument("--limit", type=int, default=None, help="snippets per split (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--overhead-pairs", type=int, default=40, help="timed step pairs of the overhead")
    parser.add_argument("--results", type=Path, default=None, help="default: results/rotten_<device>.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md and plots go")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 1 seed, a few snippets, every variant, no docs, temp results",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    task = dataclasses.replace(TASK, device=args.device, limit=args.limit)
    ablation = device.type == "cuda" if args.ablation is None else args.ablation
    seeds, pairs, results = args.seeds, args.overhead_pairs, args.results
    if args.smoke:
        task = dataclasses.replace(task, **SMOKE)
        ablation, seeds, pairs, args.no_docs = args.ablation is not False, seeds[:1], 2, True
        if results is None:
            results = Path(tempfile.mkdtemp(prefix="rotten-smoke-")) / "rotten.json"
        torch.set_num_threads(args.threads or 1)
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    if results is None:
        results = RESULTS / f"rotten_{device.type}.json"
    variants = list(dict.fromkeys([*args.variants, *(ABLATION if ablation else ())]))
    command = "python benchmarks/rotten.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(data: dict[str, Any]) -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=1))

    data = run(task, seeds, variants, pairs, 1 if args.smoke else 10, save, command.strip(), args.together)
    print(f"results: {results} ({data['elapsed_s']:.0f} s)")
    if not args.no_docs:  # this run's section, the others from the committed results
        print(report.render({**report.load_results(RESULTS), device.type: data}, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
