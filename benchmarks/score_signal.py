"""Is SAFE's adapter score signal or noise? Rank stability of 1 - CKA on pretrained MiniLM-L6.

Fine-tunes MiniLM-L6 with LoRA (r=8, query and value: 12 adapters) on the Rotten Tomatoes
snippets, once per seed, under a ``SAFEOptimizer`` that never freezes (``tau_target=0``),
and asks whether the adapters' importance scores rank the adapters the same way

1. across seeds (a seed changes the LoRA init, the data order, dropout and the scoring
   generator), for each warm-up length W;
2. across warm-up lengths within a seed, and across ``max_tokens`` (rows sampled per
   adapter per step) within a seed;
3. and how the scores relate to depth, per adapter and per block (query + value of a layer);
4. and whether they relate to what an adapter is worth to the task: the test loss and
   accuracy lost when its LoRA delta is zeroed at the end of the longest warm-up.

One run per seed serves every W and every ``max_tokens``. Scores are sums of per-step HSIC
statistics, so the scores a warm-up of W steps would finalize are the ones computed from a
snapshot of the statistics after step W; and since nothing freezes and scoring never
touches the global RNG, the training trajectory does not depend on W. Extra
``ScoreRecorder``s, one per ``max_tokens`` value, each with its own
``CKAAccumulator`` and a generator seeded like ``SAFEConfig.seed``, read the same training
forwards as SAFE's own. The run checks that this reproduces SAFE: at the longest W the
snapshot equals ``optimizer.plan.raw_scores``, and (first seed) a separate run with
``SAFEOptimizer(warmup_steps=min W)`` gives the snapshot at min W.

Run ``python benchmarks/score_signal.py``; it writes ``benchmarks/results/score_signal.json``
and ``docs/score-signal.md``. ``--from-json`` re-renders the page from saved results.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safefreeze import SAFEConfig, SAFEOptimizer, find_adapter_pairs
from safefreeze.cka import CKAAccumulator
from safefreeze.demo.data import LABELS, load_drug_reviews, load_rotten_tomatoes
from safefreeze.demo.task import TaskConfig, batches, build_model, encode, machine
from safefreeze.hooks import ScoreRecorder

ROOT = Path(__file__).resolve().parents[1]
STABLE = 0.7  # mean cross-seed Spearman above which a ranking is called stable
TAU = 0.6  # SAFEConfig's default tau_target: which adapters would end up frozen
COMMAND = "python benchmarks/score_signal.py"
# The drug-review demo's task, as the warm-up lengths W on the page are named after it.
DEMO_TASK = TaskConfig(labels=("negative", "positive"))


def demo_config(steps_per_epoch: int) -> SAFEConfig:
    """The drug-review demo's SAFE schedule: a quarter-epoch warm-up, a one-epoch ramp."""
    warmup = max(1, round(0.25 * steps_per_epoch))
    return SAFEConfig(warmup_steps=warmup, freeze_end_step=max(warmup, steps_per_epoch))


# ---- statistics ------------------------------------------------------------------------


def ranks(values: list[float]) -> np.ndarray[Any, Any]:
    """Ranks 0..n-1, ties sharing their mean rank."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation over the positions where neither is NaN (NaN if < 3 remain)."""
    keep = [i for i in range(len(a)) if not (math.isnan(a[i]) or math.isnan(b[i]))]
    if len(keep) < 3:
        return math.nan
    ra, rb = ranks([a[i] for i in keep]), ranks([b[i] for i in keep])
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


# ---- one seed ----------------------------------------------------------------------------


def layer_of(name: str) -> int:
    match = re.search(r"layer\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"cannot read a layer index from adapter name {name!r}")
    return int(match.group(1))


def scores_from(stats: torch.Tensor, max_rows: int | None) -> list[float]:
    """1 - CKA per adapter from accumulated statistics, clipped as the controller does."""
    acc = CKAAccumulator(stats.shape[0], max_rows=max_rows)
    acc.stats.copy_(stats)
    return [
        math.nan if math.isnan(c) else 1.0 - min(max(c, 0.0), 1.0) for c in acc.values(strict=False).tolist()
    ]


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``data`` in eval mode.

    Snippets go in chunks of similar length, each cut to its longest real sequence: padding
    is masked, so this only saves time.
    """
    model.eval()
    lengths = data["attention_mask"].sum(1)  # (N,)
    order = torch.argsort(lengths)
    chunks = []
    for i in range(0, len(order), 64):
        index = order[i : i + 64]
        width = int(lengths[index].max())
        chunks.append(model(**{k: data[k][index, :width] for k in ("input_ids", "attention_mask")}).logits)
    model.train()
    logits = torch.empty_like(torch.cat(chunks))  # (N, C)
    logits[order] = torch.cat(chunks)
    loss = torch.nn.functional.cross_entropy(logits, data["labels"]).item()
    return loss, (logits.argmax(-1) == data["labels"]).double().mean().item()


def ablate(
    model: torch.nn.Module,
    b_params: dict[str, list[torch.nn.Parameter]],
    groups: dict[str, list[str]],
    probe: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """Loss and accuracy on ``probe`` with each group's LoRA-B zeroed (its delta removed)."""
    base_loss, base_acc = loss_and_accuracy(model, probe)
    out = {"none": {"loss": base_loss, "accuracy": base_acc}}
    for group, adapters in groups.items():
        params = [p for a in adapters for p in b_params[a]]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.zero_()
        loss, acc = loss_and_accuracy(model, probe)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        out[group] = {"loss": loss, "accuracy": acc}
    return out


def run_seed(
    seed: int,
    task: TaskConfig,
    data: dict[str, dict[str, torch.Tensor]],
    warmups: list[int],
    max_tokens: list[int | None],
    steps: int,
    check_min_warmup: bool,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train one seed; snapshot every recorder's statistics at each warm-up length."""
    w_max = max(warmups)
    model = build_model(task, seed)
    model.train()
    pairs = find_adapter_pairs(model)
    names = [p.name for p in pairs]
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    config = SAFEConfig(
        warmup_steps=w_max, freeze_end_step=w_max, tau_target=0.0, max_tokens=64, score_every=1, seed=seed
    )
    optimizer = SAFEOptimizer(inner, model, config)
    accumulators = [
        CKAAccumulator(len(pairs), max_rows=m, generator=torch.Generator().manual_seed(seed))
        for m in max_tokens
    ]
    recorders = [ScoreRecorder(model, pairs, acc) for acc in accumulators]
    snapshots: dict[int, list[torch.Tensor]] = {}
    step_times: list[float] = []
    out: dict[str, Any] = {"seed": seed, "adapters": names}
    for step, batch in enumerate(batches(data["train"], task, seed), start=1):
        if step > steps:
            break
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)
        if step in warmups:
            snapshots[step] = [acc.stats.clone() for acc in accumulators]
        if step == w_max:
            for recorder in recorders:
                recorder.remove()
            out["safe_raw_scores"] = [optimizer.plan.raw_scores[n] for n in names]
            out["safe_scored_at"] = optimizer.plan.scored_at
            b_params = {
                p.name: [dict(model.named_parameters())[n] for n in p.param_names if "lora_B" in n]
                for p in pairs
            }
            layers = sorted({layer_of(n) for n in names})
            groups = {n: [n] for n in names} | {
                f"layer {i}": [n for n in names if layer_of(n) == i] for i in layers
            }
            if evaluate:
                out["ablation"] = ablate(model, b_params, groups, data["probe"])
                test = loss_and_accuracy(model, data["test"])
                out["test_at_w_max"] = dict(zip(("loss", "accuracy"), test, strict=True))
        if step % 25 == 0:
            print(
                f"  seed {seed} step {step}/{steps} ({statistics.median(step_times[-25:]):.2f} s/step)",
                flush=True,
            )
    if optimizer.plan.events:
        raise RuntimeError(f"seed {seed}: tau_target=0 must freeze nothing, got {optimizer.plan.events}")
    out["steps"] = len(step_times)
    if evaluate:
        if len(step_times) > w_max:
            test = loss_and_accuracy(model, data["test"])
        out["test_at_end"] = dict(zip(("loss", "accuracy"), test, strict=True))
    out["step_time_s_scoring"] = statistics.median(step_times[:w_max])
    out["step_time_s_plain"] = statistics.median(step_times[w_max:]) if len(step_times) > w_max else None
    out["scores"] = {
        str(w): {_key(m): scores_from(snap[j], m) for j, m in enumerate(max_tokens)}
        for w, snap in sorted(snapshots.items())
    }
    checks: dict[str, float] = {}
    if 64 in max_tokens:
        mine = out["scores"][str(w_max)]["64"]
        checks[f"W={w_max}"] = max(abs(a - b) for a, b in zip(mine, out["safe_raw_scores"], strict=True))
        if check_min_warmup:
            w_min = min(warmups)
            safe_min = safe_scores(task, data["train"], seed, w_min, names)
            checks[f"W={w_min}"] = max(
                abs(a - b) for a, b in zip(out["scores"][str(w_min)]["64"], safe_min, strict=True)
            )
    out["max_abs_diff_vs_safe"] = checks
    return out


def safe_scores(
    task: TaskConfig, train_data: dict[str, torch.Tensor], seed: int, warmup: int, names: list[str]
) -> list[float]:
    """``plan.raw_scores`` of a separate SAFE run whose warm-up is ``warmup`` steps."""
    model = build_model(task, seed)
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    optimizer = SAFEOptimizer(
        inner,
        model,
        SAFEConfig(
            warmup_steps=warmup,
            freeze_end_step=warmup,
            tau_target=0.0,
            max_tokens=64,
            score_every=1,
            seed=seed,
        ),
    )
    for _, batch in zip(range(warmup), batches(train_data, task, seed), strict=False):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [optimizer.plan.raw_scores[n] for n in names]


def _key(m: int | None) -> str:
    return "all" if m is None else str(m)


# ---- analysis ----------------------------------------------------------------------------


def blocks(scores: list[float], names: list[str], how: str) -> list[float]:
    """Per-layer score: the max (SAFE's rule for a unit) or the sum of its adapters'."""
    layers = sorted({layer_of(n) for n in names})
    reduce = max if how == "max" else sum
    return [reduce(s for s, n in zip(scores, names, strict=True) if layer_of(n) == i) for i in layers]


def frozen_at(scores: list[float], tau: float) -> set[int]:
    top = max(scores)
    return {i for i, s in enumerate(scores) if s / top < tau}


def analyze(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = runs[0]["adapters"]
    depth = [layer_of(n) for n in names]
    warmups = [int(w) for w in runs[0]["scores"]]
    tokens = list(runs[0]["scores"][str(warmups[0])])
    w_max = max(warmups)

    def sc(run: dict[str, Any], w: int, m: str, level: str = "adapter") -> list[float]:
        s = run["scores"][str(w)][m]
        if level in ("query", "value"):  # one projection only: 6 adapters, one per layer
            return [v for v, n in zip(s, names, strict=True) if n.rsplit(".", 1)[-1] == level]
        return s if level == "adapter" else blocks(s, names, level)

    seed_pairs = list(itertools.combinations(range(len(runs)), 2))
    cross: dict[str, Any] = {}
    for level in ("adapter", "query", "value", "max", "sum"):
        for m in tokens:
            rows = {}
            for w in warmups:
                rho = [spearman(sc(runs[a], w, m, level), sc(runs[b], w, m, level)) for a, b in seed_pairs]
                rows[str(w)] = {"mean": mean(rho), "min": min(rho, default=math.nan), "pairs": rho}
            cross[f"{level}/{m}"] = rows
    within_w = {
        m: {str(w): mean([spearman(sc(r, w, m), sc(r, w_max, m)) for r in runs]) for w in warmups}
        for m in tokens
    }
    within_m = {
        str(w): {
            f"{a} vs {b}": mean([spearman(sc(r, w, a), sc(r, w, b)) for r in runs])
            for a, b in itertools.combinations(tokens, 2)
        }
        for w in warmups
    }
    m0 = "64" if "64" in tokens else tokens[0]
    depth_rho = {str(w): [spearman(sc(r, w, m0), [float(d) for d in depth]) for r in runs] for w in warmups}
    per_layer: dict[str, Any] = {}
    for w in warmups:
        normalized = [[s / max(sc(r, w, m0)) for s in sc(r, w, m0)] for r in runs]
        per_layer[str(w)] = {
            "raw": [mean([sc(r, w, m0)[i] for r in runs]) for i in range(len(names))],
            "normalized": [mean([n[i] for n in normalized]) for i in range(len(names))],
        }
    freeze = {}
    for w in warmups:
        sets = [frozen_at(sc(r, w, m0), TAU) for r in runs]
        jac = [len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b])) for a, b in seed_pairs]
        freeze[str(w)] = {"sets": [[names[i] for i in sorted(s)] for s in sets], "jaccard_mean": mean(jac)}
    importance: dict[str, Any] = {}
    if all("ablation" in r for r in runs):
        layers = sorted(set(depth))
        per_seed = []
        for r in runs:
            base = r["ablation"]["none"]
            d_loss = [r["ablation"][n]["loss"] - base["loss"] for n in names]
            d_layer_loss = [r["ablation"][f"layer {i}"]["loss"] - base["loss"] for i in layers]
            d_layer_acc = [base["accuracy"] - r["ablation"][f"layer {i}"]["accuracy"] for i in layers]
            d_acc = [base["accuracy"] - r["ablation"][n]["accuracy"] for n in names]
            s = sc(r, w_max, m0)
            per_seed.append(
                {
                    "rho_adapter_loss": spearman(s, d_loss),
                    "rho_block_max_loss": spearman(blocks(s, names, "max"), d_layer_loss),
                    "rho_block_sum_loss": spearman(blocks(s, names, "sum"), d_layer_loss),
                    "rho_depth_loss": spearman([float(d) for d in depth], d_loss),
                    "d_loss": d_loss,
                    "d_acc": d_acc,
                    "d_layer_loss": d_layer_loss,
                    "d_layer_acc": d_layer_acc,
                }
            )
        importance = {
            "per_seed": per_seed,
            "rho_adapter_loss": mean([p["rho_adapter_loss"] for p in per_seed]),
            "rho_block_max_loss": mean([p["rho_block_max_loss"] for p in per_seed]),
            "rho_block_sum_loss": mean([p["rho_block_sum_loss"] for p in per_seed]),
            "rho_depth_loss": mean([p["rho_depth_loss"] for p in per_seed]),
            "cross_seed_rho_adapter_loss": mean(
                [spearman(per_seed[a]["d_loss"], per_seed[b]["d_loss"]) for a, b in seed_pairs]
            ),
            "d_layer_loss": [mean([p["d_layer_loss"][i] for p in per_seed]) for i in range(len(layers))],
            "d_layer_acc": [mean([p["d_layer_acc"][i] for p in per_seed]) for i in range(len(layers))],
            "d_loss": [mean([p["d_loss"][i] for p in per_seed]) for i in range(len(names))],
            "d_acc": [mean([p["d_acc"][i] for p in per_seed]) for i in range(len(names))],
        }
    stable_from = {
        key: next((w for w in warmups if all(rows[str(v)]["mean"] > STABLE for v in warmups if v >= w)), None)
        for key, rows in cross.items()
    }
    return {
        "warmups": warmups,
        "max_tokens": tokens,
        "reference_tokens": m0,
        "cross_seed": cross,
        "stable_from": stable_from,
        "within_seed_vs_w_max": within_w,
        "within_seed_across_max_tokens": within_m,
        "depth_spearman": {w: {"mean": mean(v), "per_seed": v} for w, v in depth_rho.items()},
        "per_adapter": per_layer,
        "freeze_at_tau": freeze,
        "importance": importance,
    }


# ---- report ------------------------------------------------------------------------------


def f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def render(results: dict[str, Any]) -> str:
    s, meta, runs = results["summary"], results["meta"], results["runs"]
    names = runs[0]["adapters"]
    warmups, tokens, m0 = s["warmups"], s["max_tokens"], s["reference_tokens"]
    w_max, w_demo, w_task = max(warmups), meta["demo_warmup"], meta["task_warmup"]
    n_seeds = len(runs)
    cross = s["cross_seed"]
    lines = [
        "# Is the adapter score signal? Rank stability of 1 - CKA",
        "",
        f"Generated by `{meta['command']}` ({meta['date']}); numbers in "
        "`benchmarks/results/score_signal.json`. Do not edit by hand: change the script and rerun it.",
        "",
        "## Setup",
        "",
        f"- Pretrained MiniLM-L6 + LoRA r={meta['task']['rank']} on query and value (12 adapters: "
        f"6 layers x 2), mean-pooled linear head, AdamW lr {meta['task']['lr']}, batch "
        f"{meta['task']['batch_size']} x {meta['task']['max_length']} tokens, dropout on.",
        f"- Data: Rotten Tomatoes snippets (`load_rotten_tomatoes()`: {meta['train_size']} train, "
        f"{meta['test_size']} test, fresh vs rotten; majority class {meta['majority']:.1%} of test).",
        f"- Seeds {[r['seed'] for r in runs]}: each changes the LoRA init, head init, dropout, data "
        "order and the scoring generator. One run of "
        f"{runs[0]['steps']} steps per seed under `SAFEOptimizer(SAFEConfig(warmup_steps={w_max}, "
        "tau_target=0.0, score_every=1, ...))`, so nothing freezes and every step is scored.",
        f"- Scores at warm-up W in {warmups} are the scores SAFE would finalize with "
        "`warmup_steps=W` when it scores every warm-up step (the rules that read the scores do): the "
        "statistics are sums, so a snapshot after step W gives them, and the "
        "trajectory does not depend on W. Checked: largest difference to `plan.raw_scores` "
        + ", ".join(f"{k}: {v:.1e}" for k, v in runs[0]["max_abs_diff_vs_safe"].items())
        + " (seed 0).",
        f"- `max_tokens` in {tokens} (rows sampled per adapter per step; `all` keeps every real "
        f"token, about {meta['mean_real_tokens'] * meta['task']['batch_size']:.0f} per batch): one "
        "recorder per value reads the same forwards, so differences between them are sampling "
        f"noise only. SAFE's default is {m0}; it is used where one value is shown.",
        f"- W={w_demo} is the demo's default warm-up (`demo_config` on the drug reviews: a quarter "
        f"epoch of {meta['demo_steps_per_epoch']} steps); W={w_task} is what `demo_config` gives on "
        f"this task (a quarter of {meta['steps_per_epoch']} steps).",
        "- Spearman over 12 adapters has a null spread of about 1/sqrt(11) = 0.30 (over 6 blocks, "
        "0.45): a mean below ~0.3 is indistinguishable from noise.",
        "",
        "## Findings",
        "",
    ]
    lines += findings(results)
    lines += [
        "",
        f"## 1. Agreement across seeds (Spearman, mean over "
        f"{len(cross['adapter/' + m0][str(w_max)]['pairs'])} seed pairs; min in brackets)",
        "",
        "| W | " + " | ".join(f"adapters, {m} tok" for m in tokens) + f" | query only, {m0} tok "
        f"| value only, {m0} tok | blocks (max), {m0} tok | blocks (sum), {m0} tok |",
        "|---:|" + "---:|" * (len(tokens) + 4),
    ]
    for w in warmups:
        cells = [cross[f"adapter/{m}"][str(w)] for m in tokens] + [
            cross[f"{level}/{m0}"][str(w)] for level in ("query", "value", "max", "sum")
        ]
        tag = " (demo)" if w == w_demo else " (demo_config here)" if w == w_task else ""
        lines.append(f"| {w}{tag} | " + " | ".join(f"{f(c['mean'])} [{f(c['min'])}]" for c in cells) + " |")
    lines += [
        "",
        f"Stable from (mean > {STABLE} at this W and every longer one): "
        + ", ".join(f"{k}: {v if v is not None else 'never'}" for k, v in s["stable_from"].items()),
        "",
        f"## 2. Agreement within a seed (mean over {n_seeds} seeds)",
        "",
        f"Spearman of the scores at W with those at W={w_max}:",
        "",
        "| W | " + " | ".join(f"{m} tok" for m in tokens) + " |",
        "|---:|" + "---:|" * len(tokens),
    ]
    for w in warmups:
        lines.append(f"| {w} | " + " | ".join(f(s["within_seed_vs_w_max"][m][str(w)]) for m in tokens) + " |")
    combos = list(s["within_seed_across_max_tokens"][str(warmups[0])])
    lines += [
        "",
        "Spearman between `max_tokens` values, same run, same W (sampling noise only):",
        "",
        "| W | " + " | ".join(combos) + " |",
        "|---:|" + "---:|" * len(combos),
    ]
    for w in warmups:
        row = s["within_seed_across_max_tokens"][str(w)]
        lines.append(f"| {w} | " + " | ".join(f(row[c]) for c in combos) + " |")
    lines += [
        "",
        f"## 3. Scores and depth ({m0} tokens)",
        "",
        "Spearman of score with layer index (12 adapters; + means deeper adapters score higher):",
        "",
        "| W | mean | per seed |",
        "|---:|---:|---|",
    ]
    for w in warmups:
        d = s["depth_spearman"][str(w)]
        lines.append(f"| {w} | {f(d['mean'])} | {', '.join(f(v) for v in d['per_seed'])} |")
    show = sorted({w_demo, w_task, w_max} & set(warmups))
    lines += [
        "",
        "Mean score per adapter (normalized by the seed's top score, as SAFE thresholds it; raw "
        "1 - CKA in brackets):",
        "",
        "| adapter | " + " | ".join(f"W={w}" for w in show) + " |",
        "|---|" + "---:|" * len(show),
    ]
    for i, name in enumerate(names):
        cells = [
            f"{s['per_adapter'][str(w)]['normalized'][i]:.2f} ({s['per_adapter'][str(w)]['raw'][i]:.1e})"
            for w in show
        ]
        lines.append(f"| {_short(name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Adapters below tau = {TAU} of the top score (what the default `tau_target` would "
        "freeze), per seed:",
        "",
        "| W | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean Jaccard |",
        "|---:|" + "---|" * n_seeds + "---:|",
    ]
    for w in warmups:
        z = s["freeze_at_tau"][str(w)]
        sets = [", ".join(_short(a) for a in fs) or "-" for fs in z["sets"]]
        lines.append(f"| {w} | " + " | ".join(sets) + f" | {z['jaccard_mean']:.2f} |")
    imp = s["importance"]
    if imp:
        lines += [
            "",
            f"## 4. Does the score say what an adapter is worth? (ablation at step {w_max})",
            "",
            f"At step {w_max} each adapter's (and each layer's) LoRA-B is zeroed in turn and the model "
            f"evaluated on {meta['probe_size']} fixed test snippets. Spearman of the W={w_max} score with "
            "the loss increase (mean over seeds):",
            "",
            f"- per adapter: {f(imp['rho_adapter_loss'])}; per block: {f(imp['rho_block_max_loss'])} (max), "
            f"{f(imp['rho_block_sum_loss'])} (sum)",
            f"- loss increase against depth, per adapter: {f(imp['rho_depth_loss'])}",
            f"- the ablation ranking itself across seeds: {f(imp['cross_seed_rho_adapter_loss'])}",
            "",
            "| zeroed | loss increase | accuracy drop (points) |",
            "|---|---:|---:|",
        ]
        for i, name in enumerate(names):
            lines.append(f"| {_short(name)} | {imp['d_loss'][i]:+.4f} | {100 * imp['d_acc'][i]:+.2f} |")
        for i, (dl, da) in enumerate(zip(imp["d_layer_loss"], imp["d_layer_acc"], strict=True)):
            lines.append(f"| layer {i} (query + value) | {dl:+.4f} | {100 * da:+.2f} |")
    lines += [
        "",
        "## Training",
        "",
        "| seed | test accuracy at step " + str(w_max) + " | test accuracy at the end (step) |"
        " step s, scoring on | step s, plain LoRA |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        plain = r["step_time_s_plain"]
        if "test_at_end" not in r:  # run with --no-eval
            r = {**r, "test_at_w_max": {"accuracy": math.nan}, "test_at_end": {"accuracy": math.nan}}
        # NaN renders as "nan": the runs were not evaluated
        lines.append(
            f"| {r['seed']} | {r['test_at_w_max']['accuracy']:.3f} | {r['test_at_end']['accuracy']:.3f} "
            f"({r['steps']}) | {r['step_time_s_scoring']:.2f} | "
            f"{'n/a' if plain is None else f'{plain:.2f}'} |"
        )
    lines += [
        "",
        f"Step times are medians on {meta['machine']['processor']} with {meta['machine']['torch_threads']} "
        f"torch thread(s); while scoring, {1 + len(tokens)} recorders run (SAFE's and one per "
        "`max_tokens`), more than SAFE alone would. Nothing freezes, so every run is plain LoRA in "
        "what it computes.",
        "",
        "## Reproduce",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"About {meta['wall_time_s'] / 60:.0f} minutes here. `--from-json` re-renders this page from the "
        "saved results without training.",
        "",
    ]
    return "\n".join(lines)


def findings(results: dict[str, Any]) -> list[str]:
    s, meta, runs = results["summary"], results["meta"], results["runs"]
    warmups, m0 = s["warmups"], s["reference_tokens"]
    w_max, w_demo, w_task = max(warmups), meta["demo_warmup"], meta["task_warmup"]
    cross = s["cross_seed"]

    def c(level: str, w: int) -> float:
        return float(cross[f"{level}/{m0}"][str(w)]["mean"]) if str(w) in cross[f"{level}/{m0}"] else math.nan

    def verdict(rho: float) -> str:
        return "noise" if rho < 0.3 else "weak signal" if rho < STABLE else "a stable signal"

    out = []
    if w_demo in warmups:
        out.append(
            f"- At the demo's warm-up (W={w_demo}) the 12-adapter ranking agrees across seeds with mean "
            f"Spearman {f(c('adapter', w_demo))}, but the order of layers is "
            f"{verdict(max(c('max', w_demo), c('sum', w_demo)))}. Per block: "
            f"{f(c('max', w_demo))} (max), {f(c('sum', w_demo))} (sum); within query adapters "
            f"{f(c('query', w_demo))}, within value adapters {f(c('value', w_demo))}"
            + (
                ". So the agreement is the split of value adapters above query adapters (the tau=0.6 "
                "sets below are mostly the query adapters whatever the seed), not an order among "
                "layers: as a layer or block ranking it is noise."
                if c("adapter", w_demo) > max(c("query", w_demo), c("value", w_demo)) + 0.2
                else "."
            )
        )
    if w_task in warmups:
        out.append(
            f"- At W={w_task} (`demo_config` on this task): adapters {f(c('adapter', w_task))}, blocks "
            f"{f(c('max', w_task))} (max), {f(c('sum', w_task))} (sum); at W={w_max}: adapters "
            f"{f(c('adapter', w_max))}, blocks {f(c('max', w_max))} (max)."
        )
    out.append(
        f"- Within one projection (6 adapters, one per layer) the cross-seed agreement is "
        f"{f(c('query', warmups[0]))} (query) and {f(c('value', warmups[0]))} (value) at W={warmups[0]}, "
        f"{f(c('query', w_max))} and {f(c('value', w_max))} at W={w_max}"
        + (
            ": the 12-adapter agreement comes mostly from value adapters scoring above query "
            "adapters, not from an order among layers."
            if c("adapter", w_max) > max(c("query", w_max), c("value", w_max)) + 0.2
            else "."
        )
    )
    st = s["stable_from"]
    out.append(
        f"- Stable (mean cross-seed Spearman > {STABLE} from that W on, {m0} tokens): adapters from "
        f"W={st[f'adapter/{m0}'] or f'not within {w_max}'}, blocks (max) from "
        f"W={st[f'max/{m0}'] or f'not within {w_max}'}, blocks (sum) from "
        f"W={st[f'sum/{m0}'] or f'not within {w_max}'}."
    )
    wv = s["within_seed_vs_w_max"][m0]
    out.append(
        f"- Within one seed the ranking drifts as training goes on: W={warmups[0]} vs W={w_max} "
        f"{f(wv[str(warmups[0])])}"
        + (f", W={w_demo} vs W={w_max} {f(wv[str(w_demo)])}" if w_demo in warmups else "")
        + "."
    )
    tok = s["within_seed_across_max_tokens"]
    key = next(iter(tok[str(w_max)]))
    out.append(
        f"- Token sampling is not the noise source: on the same forwards, `max_tokens` {key} agree "
        f"with Spearman {f(tok[str(warmups[0])][key])} at W={warmups[0]} and "
        f"{f(tok[str(w_max)][key])} at W={w_max}."
        if tok[str(warmups[0])][key] > STABLE
        else f"- Token sampling matters: on the same forwards, `max_tokens` {key} agree only with Spearman "
        f"{f(tok[str(warmups[0])][key])} at W={warmups[0]} ({f(tok[str(w_max)][key])} at W={w_max})."
    )
    d = s["depth_spearman"]
    out.append(
        f"- Depth: Spearman of score with layer index {f(d[str(warmups[0])]['mean'])} at W={warmups[0]}, "
        + (f"{f(d[str(w_demo)]['mean'])} at W={w_demo}, " if w_demo in warmups else "")
        + f"{f(d[str(w_max)]['mean'])} at W={w_max} (per-adapter table in section 3)."
    )
    imp = s["importance"]
    if imp:
        out.append(
            f"- Worth: the W={w_max} score ranks adapters against the loss lost by zeroing them with "
            f"Spearman {f(imp['rho_adapter_loss'])} (blocks: {f(imp['rho_block_max_loss'])} max, "
            f"{f(imp['rho_block_sum_loss'])} sum); the ablation's own ranking agrees across seeds at "
            f"{f(imp['cross_seed_rho_adapter_loss'])}."
        )
    acc = [r["test_at_end"]["accuracy"] for r in runs if "test_at_end" in r]
    if acc:
        out.append(
            f"- Plain LoRA (nothing froze) reaches test accuracy {mean(acc):.3f} "
            f"(seeds {', '.join(f'{a:.3f}' for a in acc)}) after {runs[0]['steps']} steps; "
            f"the majority class is {meta['majority']:.3f}."
        )
    return out


def _short(name: str) -> str:
    m = re.search(r"layer\.(\d+)\..*?(query|value)", name)
    return f"layer {m.group(1)} {m.group(2)}" if m else name


# ---- main --------------------------------------------------------------------------------


def default_warmups(steps_per_epoch: int) -> tuple[int, int, int, list[int]]:
    """The demo's steps per epoch and warm-up, ``demo_config``'s warm-up here, the default W list."""
    drug_train, _ = load_drug_reviews()
    kept = sum(LABELS[label] in DEMO_TASK.labels for label in drug_train.labels)
    demo_epoch = kept // DEMO_TASK.batch_size
    w_demo = demo_config(demo_epoch).warmup_steps
    w_task = demo_config(steps_per_epoch).warmup_steps
    return demo_epoch, w_demo, w_task, sorted({4, w_demo, 16, 25, 50, w_task, 100, 200})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--warmups",
        type=int,
        nargs="+",
        default=None,
        help="warm-up lengths W to score at (default: the demo's, demo_config's on this task, "
        "and 4 16 25 50 100 200)",
    )
    parser.add_argument(
        "--max-tokens",
        nargs="+",
        default=["16", "64", "256", "all"],
        help="rows sampled per adapter per step; 'all' keeps every real token",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per seed (default: the longest warm-up)"
    )
    parser.add_argument("--max-length", type=int, default=48, help="tokens per snippet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=DEMO_TASK.lr)
    parser.add_argument("--probe-size", type=int, default=500, help="test snippets for the ablation")
    parser.add_argument("--limit", type=int, default=None, help="snippets per split (smoke tests)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "score_signal.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "score-signal.md")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    parser.add_argument("--no-eval", action="store_true", help="skip the ablation and test accuracy")
    parser.add_argument("--from-json", action="store_true", help="re-render the page from --results")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="combine the runs of several result files (seeds run in parallel) into --results; "
        "the first file with metadata provides it",
    )
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        meta = next(r["meta"] for r in loaded if "meta" in r)
        runs = sorted((run for r in loaded for run in r["runs"]), key=lambda run: run["seed"])
        meta["command"] = COMMAND + (
            f" --seeds {' '.join(str(r['seed']) for r in runs)}"
            if [r["seed"] for r in runs] != [0, 1, 2]
            else ""
        )
        meta["wall_time_s"] = sum(r.get("meta", {}).get("wall_time_s", 0.0) for r in loaded)
        args.from_json = True
        args.results.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    if args.from_json:
        results = json.loads(args.results.read_text())
        results["summary"] = analyze(results["runs"])
        args.docs.write_text(render(results))
        print(f"wrote {args.docs}")
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = dataclasses.replace(
        DEMO_TASK,
        epochs=1,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        limit=args.limit,
    )
    train_split, test_split = load_rotten_tomatoes()
    data = {"train": encode(train_split, task), "test": encode(test_split, task)}
    n_test = data["test"]["labels"].shape[0]
    every = max(1, n_test // args.probe_size)
    data["probe"] = {k: v[::every][: args.probe_size] for k, v in data["test"].items()}
    steps_per_epoch = data["train"]["labels"].shape[0] // task.batch_size
    demo_epoch, w_demo, w_task, warmups = default_warmups(steps_per_epoch)
    warmups = sorted(set(args.warmups or warmups))
    steps = args.steps or max(warmups)
    task = dataclasses.replace(task, epochs=math.ceil(steps / steps_per_epoch))
    if max(warmups) > steps:
        parser.error(f"the longest warm-up ({max(warmups)}) exceeds --steps ({steps})")
    max_tokens = [None if m == "all" else int(m) for m in args.max_tokens]
    runs = []
    for i, seed in enumerate(args.seeds):
        print(f"seed {seed}: {steps} steps, warm-ups {warmups}, max_tokens {args.max_tokens}", flush=True)
        runs.append(run_seed(seed, task, data, warmups, max_tokens, steps, i == 0, evaluate=not args.no_eval))
        partial = args.results.with_suffix(".partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"runs": runs}) + "\n")
    mask = data["train"]["attention_mask"]
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"),
            "task": dataclasses.asdict(task),
            "train_size": data["train"]["labels"].shape[0],
            "test_size": n_test,
            "probe_size": data["probe"]["labels"].shape[0],
            "majority": max(data["test"]["labels"].bincount().tolist()) / n_test,
            "mean_real_tokens": mask.sum().item() / mask.shape[0],
            "steps_per_epoch": steps_per_epoch,
            "demo_steps_per_epoch": demo_epoch,
            "demo_warmup": w_demo,
            "task_warmup": w_task,
            "machine": machine(),
            "wall_time_s": time.perf_counter() - started,
        },
        "runs": runs,
    }
    results["summary"] = analyze(runs)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.results}")
    args.results.with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.no_docs:
        args.docs.write_text(render(results))
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
