"""LoRA versus SAFE on pretrained MiniLM-L6 and the drug reviews: accuracy, FLOPs, memory, time.

Variants, each over the same seeds, data order and hyperparameters:

- ``lora``: plain LoRA, also evaluated at the first step whose cumulative FLOPs reach the
  SAFE run's total (LoRA stopped at SAFE's FLOPs budget).
- ``safe``: SAFE's defaults, ``SAFEConfig.for_run(total_steps)``: nothing here is tuned to
  this task, so it checks that the defaults chosen on Rotten Tomatoes hold elsewhere.
- ``oracle``: SAFE's final frozen set at SAFE's steps, replayed with no scoring.
- ``score-prefix``: SAFE with ``order="prefix"``: the scores pick the frozen lower prefix,
  which stops at the lowest block scoring at or above the threshold; shows whether letting
  the CKA scores choose helps against the default's lowest-first freezing.

SAFE first trains alone to record its plan and FLOPs; then the four variants of a seed train
step by step in turn (``train_together``), so their wall times meet the same machine load,
and SAFE's run among them must end as its run alone did.

Run ``python benchmarks/drugreview.py``; it writes ``benchmarks/results/drugreview.json`` and
re-renders ``docs/benchmarks.md`` (this benchmark is its last section) and its plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from safefreeze import SAFEConfig
from safefreeze.demo.data import load_drug_reviews
from safefreeze.demo.task import (
    RunResult,
    TaskConfig,
    Training,
    check_same_run,
    encode,
    machine,
    train,
    train_together,
    warmup_overhead,
)

ROOT = Path(__file__).resolve().parents[1]
# Positive versus negative drug reviews, five epochs of batch 16 at 128 tokens.
DRUG_TASK = TaskConfig(labels=("negative", "positive"))


def drug_config(total_steps: int) -> SAFEConfig:
    """SAFE's default config for a run of ``total_steps`` optimizer steps."""
    return SAFEConfig.for_run(total_steps)


def _load_report() -> ModuleType:
    """``report.py`` beside this file, whether this runs as a script or is imported."""
    spec = importlib.util.spec_from_file_location(
        "safefreeze_benchmark_report", Path(__file__).with_name("report.py")
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {Path(__file__).with_name('report.py')}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


def run(task: TaskConfig, seeds: list[int], overhead_pairs: int) -> dict[str, Any]:
    train_split, test_split = load_drug_reviews()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    steps_per_epoch = train_data["labels"].shape[0] // task.batch_size
    config = drug_config(task.epochs * steps_per_epoch)
    results: list[RunResult] = []
    for seed in seeds:

        def show(name: str, step: int, total: int, loss: float, s: int = seed) -> None:
            if step == total or step % max(1, total // 10) == 0:
                print(f"  seed {s} {name:12s} step {step:4d}/{total}  loss {loss:.3f}", flush=True)

        safe = train(
            "safe",
            task,
            train_data,
            test_data,
            seed=seed,
            config=config,
            progress=functools.partial(show, "safe (alone)"),
        )
        if safe.plan is None:
            raise RuntimeError("the SAFE run recorded no plan")
        options: dict[str, dict[str, Any]] = {
            "lora": {"eval_at_flops": safe.total_flops},  # where LoRA's FLOPs reach SAFE's total
            "safe": {"config": config},
            "oracle": {"plan": safe.plan},
            "score-prefix": {"config": SAFEConfig.for_run(task.epochs * steps_per_epoch, order="prefix")},
        }
        together = [
            Training(name, task, train_data, test_data, seed=seed, **options[name])
            for name in report.DRUG_VARIANTS
        ]
        runs = train_together(together, lambda r, loss: show(r.variant, r.step_index, r.total, loss))
        check_same_run(safe, runs[report.DRUG_VARIANTS.index("safe")])
        results += runs
        for r in runs:
            print(
                f"seed {seed} {r.variant:12s} acc {r.accuracy:.3f} f1 {r.macro_f1:.3f} "
                f"TFLOP {r.total_flops / 1e12:.2f} saved {r.mean_saved_bytes / 2**20:.0f} MiB "
                f"time {r.wall_time_s:.0f} s",
                flush=True,
            )
    overhead = warmup_overhead(task, train_data, config, overhead_pairs)
    return {
        "task": dataclasses.asdict(task),
        "config": config.to_dict(),
        "seeds": seeds,
        "steps_per_epoch": steps_per_epoch,
        "machine": machine(task.device),
        "together": True,
        "overhead": overhead,
        "runs": [r.to_dict() for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=DRUG_TASK.epochs)
    parser.add_argument("--max-length", type=int, default=DRUG_TASK.max_length, help="tokens per review")
    parser.add_argument("--limit", type=int, default=None, help="reviews per split (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--overhead-pairs", type=int, default=40, help="timed step pairs of the overhead")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "drugreview.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md and plots go")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    args = parser.parse_args(argv)
    task = dataclasses.replace(DRUG_TASK, epochs=args.epochs, max_length=args.max_length, limit=args.limit)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/drugreview.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = run(task, args.seeds, args.overhead_pairs)
    data["command"] = command.strip()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(data, indent=1))
    if not args.no_docs:
        report.write_report(data, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
