"""How ``tau_target`` and the warm-up trade savings for accuracy: SAFE's rule at several settings.

With rank normalization, ``tau_target`` is the share of freeze units (transformer blocks)
that may freeze. This runs the default config at several shares and warm-up schedules
(``--schedules``, warm-up end / ramp end as shares of the run) on Rotten Tomatoes and on the
drug reviews (3 seeds each), next to plain LoRA and LoRA stopped at fixed FLOPs budgets, and
writes ``benchmarks/results/tradeoff_<device>.json``; ``--docs`` renders the table into
``docs/tradeoff.md``. ``--workers 1`` runs the jobs one at a time in this process.

    python benchmarks/tradeoff.py --device cuda --workers 6
    python benchmarks/tradeoff.py --from-json benchmarks/results/tradeoff_*.json --docs docs/tradeoff.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAUS = (0.33, 0.5, 0.67, 0.8, 1.0)
# LoRA evaluated when its cumulative FLOPs reach these shares of a full LoRA run.
BUDGETS = (0.6, 0.7, 0.8, 0.9)
SEEDS = (0, 1, 2)
# The benchmark's bars for SAFE's default against plain LoRA, as report.py holds them (a test
# keeps them equal): the most accuracy may fall (points), the most bytes saved for backward
# and FLOPs may be as shares of LoRA's.
DROP_BAR, SAVED_BAR, FLOPS_BAR = 1.0, 0.50, 0.60


def tasks() -> dict[str, Any]:
    from safefreeze.demo.task import ROTTEN_TOMATOES, TaskConfig

    binary = ("negative", "positive")
    return {
        "rotten_tomatoes": ROTTEN_TOMATOES,
        "drugreview": TaskConfig(
            labels=binary, epochs=5, batch_size=16, max_length=128, lr=2e-3, schedule="linear"
        ),
    }


def one_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, seed, variant) in this process; return its figures."""
    import torch

    from safefreeze import SAFEConfig
    from safefreeze.demo.task import encode, train

    torch.set_num_threads(job["threads"])
    task = dataclasses.replace(tasks()[job["task"]], device=job["device"])
    if job.get("lr_schedule"):
        task = dataclasses.replace(task, schedule=job["lr_schedule"])
    if job.get("limit"):
        task = dataclasses.replace(task, limit=job["limit"], max_length=16)
    train_split, test_split = task.load()
    train_data, test_data = encode(train_split, task), encode(test_split, task)
    total = task.steps(train_data["labels"].shape[0])
    config = None
    if job["tau"] is not None:
        warmup, end = job["schedule"]
        config = SAFEConfig(
            warmup_steps=max(1, round(warmup * total)),
            freeze_end_step=max(1, round(warmup * total), round(end * total)),
            tau_target=job["tau"],
            **({"order": job["order"]} if job.get("order") else {}),
            eval_frozen="attention" if job.get("attention_dropout_off") else bool(job.get("eval_frozen")),
        )
    budget = None if job["budget"] is None else int(job["budget"] * job["lora_flops"])
    options: dict[str, Any] = {}
    started = time.perf_counter()
    result = train(
        job["variant"],
        task,
        train_data,
        test_data,
        seed=job["seed"],
        config=config,
        eval_at_flops=budget,
        **options,
    )
    plan = result.plan
    return {
        **{k: job[k] for k in ("task", "seed", "variant", "tau", "budget", "schedule")},
        "order": None if config is None else config.order,
        "eval_frozen": None if config is None else config.eval_frozen is True,
        "attention_dropout_off": None if config is None else config.eval_frozen == "attention",
        "steps": total,
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "flops": result.total_flops,
        "saved_bytes": result.mean_saved_bytes,
        "budget_step": result.budget_step,
        "budget_accuracy": result.budget_accuracy,
        "budget_macro_f1": result.budget_macro_f1,
        "units": None if plan is None else len(plan.units),
        "frozen": None if plan is None else [[e.step, len(e.units)] for e in plan.events],
        "seconds": time.perf_counter() - started,
    }


def lora_flops(task_name: str, device: str, limit: int | None) -> int:
    """FLOPs of a full plain LoRA run (counted, so equal on every machine)."""
    from safefreeze.demo.task import build_model, encode
    from safefreeze.measure import measure_step

    task = dataclasses.replace(tasks()[task_name], device=device)
    if limit:
        task = dataclasses.replace(task, limit=limit, max_length=16)
    train_split, _ = task.load()
    data = encode(train_split, task)
    model = build_model(task, 0).to(device)
    model.train()
    batch = {k: v[: task.batch_size].to(device) for k, v in data.items()}
    _, costs = measure_step(model, lambda: model(**batch).loss)
    return costs.flops * task.steps(data["labels"].shape[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    jobs = []
    for name in args.tasks:
        full = lora_flops(name, args.device, args.limit)
        for seed in args.seeds:
            base = {
                "task": name,
                "seed": seed,
                "device": args.device,
                "threads": args.threads,
                "limit": args.limit,
                "order": args.order,
                "eval_frozen": args.eval_frozen,
                "attention_dropout_off": args.attention_dropout_off,
                "lr_schedule": args.lr_schedule,
            }
            base["lora_flops"] = full
            jobs += [
                {**base, "variant": "lora", "tau": None, "budget": b, "schedule": None} for b in args.budgets
            ]
            for warmup, end in args.schedules:
                jobs += [
                    {
                        **base,
                        "variant": f"safe_tau{t}_w{warmup}_f{end}",
                        "tau": t,
                        "budget": None,
                        "schedule": (warmup, end),
                    }
                    for t in args.taus
                ]
    results = []
    with contextlib.ExitStack() as stack:
        if args.workers > 1:
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context)
            finished: Iterable[dict[str, Any]] = stack.enter_context(pool).map(one_run, jobs)
        else:  # one at a time, in this process, which keeps its thread count afterwards
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            finished = map(one_run, jobs)
        for result in finished:
            results.append(result)
            print(
                f"{result['task']:16s} seed {result['seed']} {result['variant']:12s} {result['budget']} "
                f"acc {result['accuracy']:.3f} f1 {result['macro_f1']:.3f} "
                f"budget acc {result['budget_accuracy']} {result['seconds']:.0f} s",
                flush=True,
            )
    return {
        "command": "python benchmarks/tradeoff.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "lr_schedule": args.lr_schedule,
        "runs": results,
    }


def summarize(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, variant): means over seeds, and ratios to the full LoRA runs."""
    rows = []
    for name in _tasks(data):
        runs = [r for r in data["runs"] if r["task"] == name]
        lora = [r for r in runs if r["variant"] == "lora"]
        lora_acc = statistics.fmean(r["accuracy"] for r in lora)
        lora_f1 = statistics.fmean(r["macro_f1"] for r in lora)
        lora_flops = statistics.fmean(r["flops"] for r in lora)
        lora_saved = statistics.fmean(r["saved_bytes"] for r in lora)
        rows.append(
            {
                "task": name,
                "variant": "lora",
                "accuracy": lora_acc,
                "macro_f1": lora_f1,
                "flops": 1.0,
                "saved": 1.0,
            }
        )
        for budget in sorted({r["budget"] for r in lora}):
            at = [r for r in lora if r["budget"] == budget and r["budget_accuracy"] is not None]
            if at:
                rows.append(
                    {
                        "task": name,
                        "variant": f"lora stopped at {budget:.0%} FLOPs",
                        "accuracy": statistics.fmean(r["budget_accuracy"] for r in at),
                        "macro_f1": statistics.fmean(r["budget_macro_f1"] for r in at),
                        "flops": budget,
                        "saved": 1.0,
                    }
                )
        for variant in dict.fromkeys(r["variant"] for r in runs if r["variant"] != "lora"):
            vs = [r for r in runs if r["variant"] == variant]
            rows.append(
                {
                    "task": name,
                    "variant": variant,
                    "tau": vs[0]["tau"],
                    "accuracy": statistics.fmean(r["accuracy"] for r in vs),
                    "accuracy_sd": statistics.pstdev(r["accuracy"] for r in vs),
                    "macro_f1": statistics.fmean(r["macro_f1"] for r in vs),
                    "flops": statistics.fmean(r["flops"] for r in vs) / lora_flops,
                    "saved": statistics.fmean(r["saved_bytes"] for r in vs) / lora_saved,
                    "frozen": statistics.fmean(sum(n for _, n in r["frozen"]) for r in vs),
                    "units": vs[0]["units"],
                    "delta": 100
                    * statistics.fmean(r["accuracy"] - base["accuracy"] for r, base in _paired(vs, lora)),
                }
            )
    return rows


def _safe_runs(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["task"] == task and r["variant"] != "lora"]


def _orders(data: dict[str, Any], task: str) -> list[str]:
    """The orders of a task's SAFE runs; runs recorded before the field existed used "prefix"."""
    return list(dict.fromkeys(r.get("order") or "prefix" for r in _safe_runs(data, task)))


def _safe_flag(data: dict[str, Any], task: str, key: str) -> bool:
    """Whether a task's SAFE runs set ``key``: ``eval_frozen`` (frozen blocks in evaluation
    mode) or ``attention_dropout_off`` (their attention dropout off)."""
    return any(r.get(key) for r in _safe_runs(data, task))


def _tasks(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in data["runs"]))


def _paired(
    runs: list[dict[str, Any]], lora: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    first = {}
    for r in lora:
        first.setdefault(r["seed"], r)
    return [(r, first[r["seed"]]) for r in runs if r["seed"] in first]


TASK_NAMES = {
    "rotten_tomatoes": "Rotten Tomatoes (10,808 train / 2,000 test snippets, 1 epoch, batch 32, 48 tokens, "
    "learning rate 1e-3 decaying linearly)",
    "drugreview": "drug reviews (546 train / 343 test, 5 epochs, batch 16, 128 tokens, learning rate 2e-3 "
    "decaying linearly)",
}


def _task_name(task: str, lr_schedule: str | None) -> str:
    """The task's heading; a run with ``--lr-schedule constant`` kept its learning rate."""
    name = TASK_NAMES.get(task, task)
    return name.replace("decaying linearly", "constant") if lr_schedule == "constant" else name


INTRO = """# Trading savings for accuracy: `tau_target` and the warm-up

With rank normalization (the default), `tau_target` is the share of freeze units (transformer
blocks) that may freeze: `tau_target * blocks`, rounded. The default `order="depth"` freezes
that many from the bottom up whatever they score; `order="prefix"` freezes them from the
bottom up and stops at the first block that scores at or above the threshold, so fewer may
freeze when the scores say a low block matters. Each SAFE row is the default config with
the order its section names and the `tau_target` and schedule shown (warm-up end / ramp end
as shares of the run), 3 seeds, next to plain LoRA and to the same LoRA runs evaluated when
their FLOPs reached a share of a full run's (training less). The sections whose SAFE rows
ran the default order come first. The SAFE rows keep all the frozen blocks' dropout
(`SAFEConfig.eval_frozen=False`) unless their section says otherwise: sections marked
`eval_frozen=True` held the frozen blocks in evaluation mode (their dropout off), and those
marked "frozen blocks' attention dropout off" (`--attention-dropout-off`) turned off only the
dropout of the frozen blocks' attention probabilities, keeping the dropout on their hidden
states: what the library's default, `eval_frozen="attention"`, does. Step times with the
frozen blocks' dropout kept, attention dropout off and in evaluation mode are in
`benchmarks/results/frozen_dropout_cpu.json` (`python benchmarks/frozen_dropout.py --threads 2`).
The recorded runs went in parallel processes (`--workers`), so no times are reported; FLOPs and bytes saved
for backward are counted, so they do not depend on the machine.

Rebuild this page from the saved results with
`python benchmarks/tradeoff.py --from-json benchmarks/results/tradeoff_*.json --docs docs/tradeoff.md`.
"""


def render(datasets: list[dict[str, Any]]) -> str:
    """The Markdown page: per results file its command and machine, then a table per task.

    Results files whose SAFE runs all used the library's default order come first, those
    with ``eval_frozen`` after the others of their order.
    """
    from safefreeze import SAFEConfig

    default = SAFEConfig().order
    lines = [INTRO]

    def rank(data: dict[str, Any]) -> tuple[bool, bool, bool]:
        tasks = _tasks(data)
        return (
            any(o != default for t in tasks for o in _orders(data, t)),
            any(_safe_flag(data, t, "eval_frozen") for t in tasks),
            any(_safe_flag(data, t, "attention_dropout_off") for t in tasks),
        )

    for data in sorted(datasets, key=rank):
        machine = data["machine"]
        name = machine.get("device_name")
        rows = summarize(data)
        for task in _tasks(data):
            lines += [
                f"## {_task_name(task, data.get('lr_schedule'))}, device {machine['device']}, "
                + ", ".join(f"`order={o!r}`" for o in _orders(data, task))
                + (", `eval_frozen=True`" if _safe_flag(data, task, "eval_frozen") else "")
                + (
                    ", frozen blocks' attention dropout off"
                    if _safe_flag(data, task, "attention_dropout_off")
                    else ""
                ),
                "",
                "```bash",
                data["command"],
                "```",
                "",
                f"Machine: {machine['platform']}, {machine['cpus']} CPUs" + (f", {name}." if name else "."),
                "",
                "| run | blocks frozen (of 6) | accuracy | paired Δ accuracy vs LoRA (points) | macro-F1 "
                "| FLOPs x LoRA | saved for backward x LoRA |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in (r for r in rows if r["task"] == task):
                if r["variant"].startswith("safe_"):
                    label = f"SAFE {_setting(r)}"
                    frozen, delta = f"{r['frozen']:.1f}", f"{r['delta']:+.2f}"
                else:
                    label, frozen, delta = r["variant"].replace("lora", "LoRA"), "", ""
                lines.append(
                    f"| {label} | {frozen} | {r['accuracy']:.4f} | {delta} | {r['macro_f1']:.4f} | "
                    f"{r['flops']:.3f} | {r['saved']:.3f} |"
                )
            lines += ["", frontier([r for r in rows if r["task"] == task]), ""]
    return "\n".join(lines)


def _setting(row: dict[str, Any]) -> str:
    schedule = row["variant"].split("_w", 1)[1].replace("_f", " / ")
    return f"tau_target {row['tau']}, schedule {schedule}"


def frontier(rows: list[dict[str, Any]]) -> str:
    """Where a task's SAFE settings stand against the benchmark's bars, in one paragraph."""
    safe = [r for r in rows if r["variant"].startswith("safe_")]
    if not safe:
        return ""
    bars = (
        f"Against the benchmark's bars (accuracy at most {DROP_BAR:g} point below LoRA's, "
        f"bytes saved for backward at most {SAVED_BAR:.2f}x, FLOPs at most {FLOPS_BAR:.2f}x): "
    )
    close = [r for r in safe if r["delta"] >= -DROP_BAR]
    if close:
        least_saved = min(close, key=lambda r: r["saved"])
        least_flops = min(close, key=lambda r: r["flops"])
        text = (
            f"within {DROP_BAR:g} point the least bytes are {least_saved['saved']:.3f}x "
            f"({_setting(least_saved)}) and the fewest FLOPs {least_flops['flops']:.3f}x "
            f"({_setting(least_flops)})"
        )
    else:
        text = f"no setting is within {DROP_BAR:g} point"
    small = [r for r in safe if r["saved"] <= SAVED_BAR]
    if small:
        best = max(small, key=lambda r: r["delta"])
        change = (
            f"the least accuracy lost is {-best['delta']:.2f} points"
            if best["delta"] < 0
            else f"the best accuracy is {best['delta']:+.2f} points against LoRA"
        )
        text += f"; at or below {SAVED_BAR:.2f}x bytes {change} ({_setting(best)})"
    else:
        text += f"; no setting reaches {SAVED_BAR:.2f}x bytes"
    both = [r for r in close if r["saved"] <= SAVED_BAR and r["flops"] <= FLOPS_BAR]
    met = ", ".join(_setting(r) for r in both)
    return bars + text + (f"; {met} meets all three." if both else "; no setting meets all three.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=list(tasks()))
    parser.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--schedules",
        type=lambda s: tuple(float(x) for x in s.split("/")),
        nargs="+",
        default=[(0.1, 0.3)],
        help="warm-up end / ramp end as shares of the run, e.g. 0.1/0.3",
    )
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(BUDGETS), help="LoRA FLOPs shares to evaluate at"
    )
    parser.add_argument(
        "--order",
        choices=("depth", "prefix", "score"),
        default=None,
        help="SAFEConfig.order of the SAFE runs (default: the library's)",
    )
    parser.add_argument(
        "--eval-frozen",
        action="store_true",
        help="SAFEConfig.eval_frozen=True in the SAFE runs (without it or --attention-dropout-off, "
        "eval_frozen=False: the frozen blocks keep all their dropout)",
    )
    parser.add_argument(
        "--attention-dropout-off",
        action="store_true",
        help='SAFEConfig.eval_frozen="attention" (the library\'s default) in the SAFE runs: a frozen '
        "block drops no attention probabilities",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "linear"),
        default=None,
        help="the learning rate over each run (default: each task's, linear decay)",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="examples per split (smoke runs)")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, help="render saved results")
    parser.add_argument("--docs", type=Path, default=None, help="write the Markdown page here")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        datasets = [json.loads(path.read_text()) for path in args.from_json]
    else:
        datasets = [run(args)]
        out = args.results or ROOT / "benchmarks" / "results" / f"tradeoff_{args.device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(datasets[0], indent=1))
    for data in datasets:
        for row in summarize(data):
            print(json.dumps(row))
    if args.docs is not None:
        args.docs.write_text(render(datasets), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
