"""What the frozen blocks' training before their freeze is worth to accuracy.

SAFE's default freezes the lower blocks while their learning rate is still high, and loses
about a point of accuracy against LoRA. This asks whether shaping those blocks' training
before their freeze changes that, at the same freezes (so at the same FLOPs and bytes saved
for backward). Per task and seed:

- ``lora``: plain LoRA.
- ``safe``: SAFE's default, ``SAFEConfig.for_run(total_steps)``; its plan fixes the freeze
  step of each block for the next two variants.
- ``anneal``: ``safe``'s plan replayed, and each block that freezes has its learning rate
  decay linearly to zero over the second half of its training, from half its freeze step to
  the freeze (as FreezeOut anneals each layer before it freezes it), so it freezes settled
  instead of mid-stride.
- ``boost``: ``safe``'s plan replayed, each block that freezes trained at twice the learning
  rate until its freeze, as if its fewer steps could be made up by larger ones.
- ``average``: ``safe``'s plan replayed, and each block that freezes is frozen (and merged)
  with the mean of its weights after each step of the second half of its training, from half
  its freeze step to it, as stochastic weight averaging takes the mean of late iterates; if
  the last iterate's noise is what the freeze costs, the mean removes it.
- ``no-warmup``: the default rule with a one-step warm-up and no ramp: the same number of
  lowest blocks freezes after the first step, so only the top blocks' LoRA trains (what
  training less of the model from the start gives).

A block's learning rate is changed by scaling its parameters' update after the wrapped
optimizer's step (for AdamW and SGD the update is proportional to the learning rate), so the
training loop, the optimizer and the scheduler stay as they are.

    python benchmarks/before_freeze.py --workers 2 --threads 1
    python benchmarks/before_freeze.py --from-json

writes ``benchmarks/results/before_freeze_cpu.json`` and ``docs/before-freeze.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# Variants that replay the default's plan with the frozen blocks' learning rate, or the weights
# they freeze with, reshaped.
SHAPED = ("anneal", "boost", "average")
VARIANTS = ("lora", "safe", "no-warmup", *SHAPED)
PAGE = ROOT / "docs" / "before-freeze.md"
RESULTS = ROOT / "benchmarks" / "results" / "before_freeze_cpu.json"


def _load(name: str) -> ModuleType:
    """A benchmark module beside this file, whether this runs as a script or is imported."""
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"safefreeze_benchmark_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tradeoff = _load("tradeoff.py")


def anneal(step: int, freeze_step: int) -> float:
    """The learning-rate factor of a block at optimizer step ``step`` (0-based) that freezes
    after ``freeze_step`` steps: 1 up to half its freeze step, then down linearly to 0."""
    return min(1.0, max(0.0, (freeze_step - step) / (freeze_step / 2)))


def boost(step: int, freeze_step: int) -> float:
    """Twice the learning rate until the freeze."""
    return 2.0 if step < freeze_step else 1.0


FACTORS: dict[str, Callable[[int, int], float]] = {"anneal": anneal, "boost": boost}


def _members(model: Any, freeze_steps: Mapping[str, int]) -> list[tuple[Any, int]]:
    """Each parameter under a unit of ``freeze_steps``, with its unit's freeze step."""
    return [
        (p, step)
        for name, p in model.named_parameters()
        for unit, step in freeze_steps.items()
        if name.startswith(unit + ".")
    ]


def shape_learning_rate(
    optimizer: Any, model: Any, freeze_steps: Mapping[str, int], factor: Callable[[int, int], float]
) -> None:
    """Scale the update of each unit in ``freeze_steps`` by ``factor(step, its freeze step)``.

    ``optimizer`` is the optimizer SAFE wraps: its step hooks run inside SAFE's step, before
    SAFE freezes (and merges) anything at that step. A unit is a module name; its parameters
    are the ones under it, scaled while they still train.
    """
    import torch

    members = _members(model, freeze_steps)
    done = [0]  # optimizer steps taken
    before: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def pre(*_: Any) -> None:
        before.clear()
        for p, freeze_step in members:
            scale = factor(done[0], freeze_step)
            if p.requires_grad and scale != 1.0:
                before.append((p, p.detach().clone(), scale))

    def post(*_: Any) -> None:
        with torch.no_grad():
            for p, old, scale in before:
                p.copy_(old + scale * (p - old))
        before.clear()
        done[0] += 1

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)


def average_before_freeze(optimizer: Any, model: Any, freeze_steps: Mapping[str, int]) -> None:
    """Set each unit in ``freeze_steps`` to the mean of its late weights just before its freeze.

    A unit freezing after step ``f`` takes the mean of its weights after steps ``f // 2 + 1``
    to ``f``, written by a step hook of ``optimizer`` (the optimizer SAFE wraps) at step ``f``,
    so SAFE freezes and merges the mean. Parameters that do not train are left alone.
    """
    import torch

    members = [(p, f) for p, f in _members(model, freeze_steps) if p.requires_grad]
    sums: dict[int, torch.Tensor] = {}
    done = [0]  # optimizer steps taken

    def post(*_: Any) -> None:
        done[0] += 1
        with torch.no_grad():
            for i, (p, freeze_step) in enumerate(members):
                if freeze_step // 2 < done[0] <= freeze_step:
                    sums.setdefault(i, torch.zeros_like(p)).add_(p)
                if done[0] == freeze_step:
                    p.copy_(sums.pop(i) / (freeze_step - freeze_step // 2))

    optimizer.register_step_post_hook(post)


def shaper(variant: str) -> Callable[[Any, Any, Mapping[str, int]], None]:
    """What ``variant`` does to the blocks that freeze: ``(optimizer, model, freeze_steps) -> None``."""
    if variant == "average":
        return average_before_freeze
    return functools.partial(shape_learning_rate, factor=FACTORS[variant])


def one_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, seed, variant) in this process; return its figures (and plan)."""
    import torch

    from safefreeze import FreezePlan, SAFEConfig
    from safefreeze.demo.task import encode, train

    torch.set_num_threads(job["threads"])
    task = tradeoff.tasks()[job["task"]]
    if job.get("limit"):
        task = dataclasses.replace(task, limit=job["limit"], max_length=16)
    train_split, test_split = task.load()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    total = task.steps(train_data["labels"].shape[0])
    variant, options = job["variant"], {}
    if variant == "safe":
        options["config"] = SAFEConfig.for_run(total)
    elif variant == "no-warmup":
        options["config"] = dataclasses.replace(SAFEConfig.for_run(total), warmup_steps=1, freeze_end_step=1)
    elif variant in SHAPED:
        plan = FreezePlan.from_dict(job["plan"], source="the default's plan")
        freeze_steps, shape = plan.unit_freeze_steps, shaper(variant)
        options["plan"] = plan
        options["setup"] = lambda safe: shape(safe.optimizer, safe.controller.model, freeze_steps)
    started = time.perf_counter()
    result = train(variant, task, train_data, test_data, seed=job["seed"], **options)
    plan = result.plan
    return {
        **{k: job[k] for k in ("task", "seed", "variant")},
        "steps": total,
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "flops": result.total_flops,
        "saved_bytes": result.mean_saved_bytes,
        "frozen": None if plan is None else [[e.step, list(e.units)] for e in plan.events],
        "plan": None if plan is None else plan.to_dict(),
        "seconds": time.perf_counter() - started,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of every task and seed: the unshaped variants first, then the two replays of
    each seed's default plan."""
    import torch

    from safefreeze.config import SCHEDULE_SHARES

    base = [
        {"task": t, "seed": s, "threads": args.threads, "limit": args.limit}
        for t in args.tasks
        for s in args.seeds
    ]
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        pool = None
        if args.workers > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            executor = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context)
            pool = stack.enter_context(executor)
        else:  # one at a time, in this process, which keeps its thread count afterwards
            stack.callback(torch.set_num_threads, torch.get_num_threads())

        def run_all(jobs: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
            return map(one_run, jobs) if pool is None else pool.map(one_run, jobs)

        first = [{**b, "variant": v} for b in base for v in ("safe", "lora", "no-warmup")]
        results += _report(run_all(first))
        plans = {(r["task"], r["seed"]): r["plan"] for r in results if r["variant"] == "safe"}
        second = [{**b, "variant": v, "plan": plans[b["task"], b["seed"]]} for b in base for v in SHAPED]
        results += _report(run_all(second))
    for r in results:
        r.pop("plan")
    return {
        "command": "python benchmarks/before_freeze.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "schedule_shares": list(SCHEDULE_SHARES["depth"]),
        "runs": results,
    }


def _report(finished: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in finished:
        print(
            f"{r['task']:16s} seed {r['seed']} {r['variant']:10s} acc {r['accuracy']:.4f} "
            f"f1 {r['macro_f1']:.4f} {r['seconds']:.0f} s",
            flush=True,
        )
        out.append(r)
    return out


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, variant): means over seeds, paired differences to LoRA and to SAFE's
    default on the same seed (points), and counted costs as shares of LoRA's."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in data["runs"]):
        runs = [r for r in data["runs"] if r["task"] == task]
        by = {(r["variant"], r["seed"]): r for r in runs}
        lora = [r for r in runs if r["variant"] == "lora"]
        for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
            vs = [r for r in runs if r["variant"] == variant]
            rows.append(
                {
                    "task": task,
                    "variant": variant,
                    "seeds": [r["seed"] for r in vs],
                    "accuracy": statistics.fmean(r["accuracy"] for r in vs),
                    "macro_f1": statistics.fmean(r["macro_f1"] for r in vs),
                    "per_seed": [r["accuracy"] for r in vs],
                    "vs_lora": _paired_delta(vs, by, "lora", "accuracy"),
                    "f1_vs_lora": _paired_delta(vs, by, "lora", "macro_f1"),
                    "vs_safe": _paired_delta(vs, by, "safe", "accuracy"),
                    "f1_vs_safe": _paired_delta(vs, by, "safe", "macro_f1"),
                    "flops": statistics.fmean(r["flops"] for r in vs)
                    / statistics.fmean(r["flops"] for r in lora),
                    "saved": statistics.fmean(r["saved_bytes"] for r in vs)
                    / statistics.fmean(r["saved_bytes"] for r in lora),
                }
            )
    return rows


def _paired_delta(
    runs: list[dict[str, Any]], by: Mapping[tuple[str, int], dict[str, Any]], other: str, key: str
) -> float | None:
    """Mean over seeds of ``key`` in ``runs`` less ``other``'s on the same seed, in points."""
    pairs = [(r, by[other, r["seed"]]) for r in runs if (other, r["seed"]) in by]
    return 100 * statistics.fmean(a[key] - b[key] for a, b in pairs) if pairs else None


def _points(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _schedule_text(shares: list[float]) -> str:
    warmup, end = shares
    return f"a warm-up of the first {warmup:.0%} of the run and a ramp to {end:.0%} of it in these runs"


def render(data: dict[str, Any]) -> str:
    """The Markdown page for one results file."""
    rows = summarize(data)
    lines = [
        "# Before the freeze: what the frozen blocks' training is worth",
        "",
        "<!-- Generated by benchmarks/before_freeze.py from benchmarks/results/before_freeze_cpu.json;"
        " do not edit by hand. -->",
        "",
        "SAFE's default freezes the lower blocks during the ramp, while their learning rate is "
        "still high, and ends about a point of accuracy below LoRA on Rotten Tomatoes "
        "([benchmarks](benchmarks.md)). Would the frozen blocks do better if their training "
        "before the freeze were shaped? `anneal`, `boost` and `average` freeze the same blocks at "
        "the same steps as the default on the same seed (they replay the default's plan), so they "
        "cost the same FLOPs and store the same activations; only the learning rate of the blocks "
        "that freeze changes before their freeze, or, for `average`, the weights they freeze with. "
        "`no-warmup` gives those blocks no training at all:",
        "",
        "| variant | the blocks that freeze |",
        "| --- | --- |",
        "| safe | SAFE's default, `SAFEConfig.for_run(total_steps)`: "
        f"{_schedule_text(data['schedule_shares'])} |",
        "| anneal | learning rate decaying linearly to zero over the second half of their training "
        "(from half their freeze step to it), as FreezeOut anneals a layer before freezing it |",
        "| boost | twice the learning rate until their freeze |",
        "| average | frozen and merged with the mean of their weights after each step of the second "
        "half of their training (from half their freeze step to it), as stochastic weight averaging "
        "averages late iterates, instead of the last step's |",
        "| no-warmup | the default rule with a one-step warm-up and no ramp: as many of the lowest "
        "blocks freeze after the first step, so only the top blocks' LoRA trains |",
        "",
        "The learning rate of a block is scaled through its parameters' update after each step "
        "of the wrapped AdamW (whose update is proportional to it); the global schedule stays as "
        "the task sets it. Differences are paired on the seed and in points; FLOPs and bytes "
        "saved for backward are counted, as shares of LoRA's. The runs went in parallel "
        "processes, so no times are reported.",
        "",
        "Reproduce with:",
        "",
        "```bash",
        data["command"],
        "```",
        "",
        f"Machine: {data['machine']['platform']}, {data['machine']['cpus']} CPUs, torch "
        f"{data['machine']['torch']}.",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [
            "",
            f"## {tradeoff.TASK_NAMES.get(task, task)}",
            "",
            "| variant | accuracy | macro-F1 | accuracy - LoRA | macro-F1 - LoRA | accuracy - safe "
            "| macro-F1 - safe | accuracy per seed | FLOPs x LoRA | saved for backward x LoRA |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in (r for r in rows if r["task"] == task):
            own = r["variant"] in ("lora", "safe")
            lines.append(
                f"| {r['variant']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} "
                f"| {'—' if r['variant'] == 'lora' else _points(r['vs_lora'])} "
                f"| {'—' if r['variant'] == 'lora' else _points(r['f1_vs_lora'])} "
                f"| {'—' if own else _points(r['vs_safe'])} | {'—' if own else _points(r['f1_vs_safe'])} "
                f"| {', '.join(f'{a:.4f}' for a in r['per_seed'])} | {r['flops']:.3f} | {r['saved']:.3f} |"
            )
        for finding in findings([r for r in rows if r["task"] == task]):
            lines += ["", finding]
    return "\n".join(lines) + "\n"


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """What a task's table says, in words, from its numbers."""
    by = {r["variant"]: r for r in rows}
    out = []
    shaped = [by[v] for v in SHAPED if v in by and by[v]["vs_safe"] is not None]
    if shaped:
        moved = ", ".join(f"{r['variant']} {r['vs_safe']:+.2f}" for r in shaped)
        best = max(shaped, key=lambda r: r["vs_safe"])
        gap = -by["safe"]["vs_lora"] if "safe" in by and by["safe"]["vs_lora"] is not None else None
        verdict = (
            f"; the default's gap to LoRA is {gap:.2f} points, and the best shaping closes "
            f"{max(best['vs_safe'], 0.0) / gap:.0%} of it"
            if gap and gap > 0
            else ""
        )
        out.append(f"Against the default at the same freezes, accuracy moved by (points): {moved}{verdict}.")
    if "no-warmup" in by and "safe" in by:
        nw, safe = by["no-warmup"], by["safe"]
        out.append(
            f"Training only the top blocks from the first step (no-warmup) scores {nw['vs_lora']:+.2f} "
            f"points against LoRA at {nw['flops']:.3f}x its FLOPs; the default, whose lower blocks "
            f"train until they freeze, scores {safe['vs_lora']:+.2f} at {safe['flops']:.3f}x."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(tradeoff.tasks()))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="examples per split (smoke runs)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=PAGE)
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    parser.add_argument("--from-json", action="store_true", help="re-render the page from --results")
    args = parser.parse_args(argv)
    if args.from_json:
        data = json.loads(args.results.read_text())
    else:
        data = run(args)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(data, indent=1))
    for row in summarize(data):
        print(json.dumps(row))
    if not args.no_docs:
        args.docs.write_text(render(data), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
