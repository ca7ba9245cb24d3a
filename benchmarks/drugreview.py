"""LoRA versus SAFE on pretrained MiniLM-L6 and the drug reviews: accuracy, FLOPs, memory, time.

Variants, each over the same seeds, data order and hyperparameters:

- ``lora``: plain LoRA.
- ``safe``: SAFE with the default :class:`~safefreeze.SAFEConfig` of this task.
- ``oracle``: SAFE's final frozen set at SAFE's steps, replayed with no scoring.
- ``position``: SAFE with ``order="depth"``: as many adapters as SAFE froze by each step,
  taken from the lowest layer up (AdapterDrop-like): shows whether CKA selection matters.

Run ``python benchmarks/drugreview.py`` (or ``nox -s bench``); it writes
``docs/benchmarks.md``, its plots and ``benchmarks/results/drugreview.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from safefreeze import SAFEConfig, SAFEOptimizer
from safefreeze.demo import DEMO_TASK, demo_config
from safefreeze.demo.data import load_drug_reviews
from safefreeze.demo.task import RunResult, TaskConfig, build_model, encode, train

ROOT = Path(__file__).resolve().parents[1]


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


def warmup_overhead(
    task: TaskConfig, data: dict[str, torch.Tensor], config: SAFEConfig, pairs: int
) -> dict[str, float]:
    """Step time of a scoring warm-up versus plain LoRA, interleaved in one process."""
    batch = {k: v[: task.batch_size] for k, v in data.items()}
    plain, scored = build_model(task, 0), build_model(task, 0)
    plain.train()
    scored.train()
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=task.lr)
    long_warmup = dataclasses.replace(config, warmup_steps=10**6, freeze_end_step=10**6)
    opt_scored = SAFEOptimizer(
        torch.optim.AdamW([p for p in scored.parameters() if p.requires_grad], lr=task.lr),
        scored,
        long_warmup,
    )
    times: dict[str, list[float]] = {"plain": [], "scored": []}
    for i in range(2 + pairs * 2):
        for name, model, opt in (("plain", plain, opt_plain), ("scored", scored, opt_scored))[
            :: 1 if i % 2 else -1
        ]:
            start = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:  # the first steps warm caches up
                times[name].append(time.perf_counter() - start)
    # Pair k compares the same step index of both models; the median ratio resists noise.
    ratios = [s / p for s, p in zip(times["scored"], times["plain"], strict=True)]
    return {
        "plain_step_s": statistics.median(times["plain"]),
        "scored_step_s": statistics.median(times["scored"]),
        "overhead": statistics.median(ratios) - 1.0,
        "steps": len(ratios),
    }


def run(task: TaskConfig, seeds: list[int], overhead_pairs: int) -> dict[str, Any]:
    train_split, test_split = load_drug_reviews()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    steps_per_epoch = train_data["labels"].shape[0] // task.batch_size
    config = demo_config(steps_per_epoch)
    results: list[RunResult] = []
    for seed in seeds:

        def show(name: str, step: int, total: int, loss: float, s: int = seed) -> None:
            if step == total or step % max(1, total // 10) == 0:
                print(f"  seed {s} {name:8s} step {step:4d}/{total}  loss {loss:.3f}", flush=True)

        lora = train("lora", task, train_data, test_data, seed=seed, progress=functools.partial(show, "lora"))
        safe = train(
            "safe",
            task,
            train_data,
            test_data,
            seed=seed,
            config=config,
            progress=functools.partial(show, "safe"),
        )
        if safe.plan is None:
            raise RuntimeError("the SAFE run recorded no plan")
        oracle = train(
            "oracle",
            task,
            train_data,
            test_data,
            seed=seed,
            plan=safe.plan,
            progress=functools.partial(show, "oracle"),
        )
        position = train(
            "position",
            task,
            train_data,
            test_data,
            seed=seed,
            config=dataclasses.replace(config, order="depth"),
            progress=functools.partial(show, "position"),
        )
        runs = {r.variant: r for r in (lora, safe, oracle, position)}
        results += [runs[v] for v in report.VARIANTS]
        for r in (lora, safe, oracle, position):
            print(
                f"seed {seed} {r.variant:8s} acc {r.accuracy:.3f} f1 {r.macro_f1:.3f} "
                f"TFLOP {r.total_flops / 1e12:.2f} saved {r.mean_saved_bytes / 2**20:.0f} MiB "
                f"time {r.wall_time_s:.0f} s",
                flush=True,
            )
    overhead = warmup_overhead(task, train_data, config, overhead_pairs)
    return {
        "task": dataclasses.asdict(task),
        "config": config.to_dict(),
        "seeds": seeds,
        "machine": machine(),
        "overhead": overhead,
        "runs": [r.to_dict() for r in results],
    }


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=DEMO_TASK.epochs)
    parser.add_argument("--max-length", type=int, default=DEMO_TASK.max_length, help="tokens per review")
    parser.add_argument("--limit", type=int, default=None, help="reviews per split (smoke tests)")
    parser.add_argument("--overhead-pairs", type=int, default=20)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "drugreview.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md and plots go")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    args = parser.parse_args(argv)
    task = dataclasses.replace(DEMO_TASK, epochs=args.epochs, max_length=args.max_length, limit=args.limit)
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
