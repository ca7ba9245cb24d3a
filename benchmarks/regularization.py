"""Does SAFE regularize? Sharpness, landscapes, adapter norms and the generalization gap.

The paper (arXiv 2412.03587) claims that freezing adapters early regularizes: smaller adapter
weight norms, a flatter loss landscape and better generalization. This compares, on the
savings benchmark's task (pretrained MiniLM-L6, Rotten Tomatoes, the same seeds, data order,
dropout and hyperparameters as ``rotten.py``):

- ``lora``: plain LoRA;
- ``safe``: SAFE's default, ``SAFEConfig.for_run(total_steps)``;
- ``paper``: ``SAFEConfig.paper`` with the same warm-up and ramp steps.

After training, on a fixed set of training batches (the same for every run, dropout off, every
adapter unmerged and differentiable so all runs measure the same function of the same
parameters): the top Hessian eigenvalue and a Hutchinson trace with respect to the LoRA
parameters, a 1-D and a 2-D loss landscape along filter-normalized directions; over training,
``||B A||_F`` per adapter and block; at the end, train and test accuracy. Differences from
``lora`` are tested across seeds with a paired t-test (``scipy.stats.ttest_rel``).

``python benchmarks/regularization.py`` runs the full setting (3 seeds, 337 steps each) and
writes ``benchmarks/results/regularization.json`` and ``docs/regularization.md`` (with plots
when matplotlib is installed); ``--limit``/``--eval-limit`` shrink it, ``--smoke`` runs a few
snippets for CI into a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from safefreeze import SAFEConfig, SAFEOptimizer
from safefreeze.analysis import (
    NormRecorder,
    adapter_norms,
    block_norms,
    hutchinson_trace,
    lora_parameters,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscapes,
    top_hessian_eigenvalues,
)
from safefreeze.demo.task import ROTTEN_TOMATOES, TaskConfig, batches, build_model, encode, evaluate, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("lora", "safe", "paper")
# Comparisons against plain LoRA, and the direction the paper's claim predicts for each metric.
METRICS = {
    "total_norm": ("final ‖B A‖_F over all adapters", "lower"),
    "top_eigenvalue": ("top Hessian eigenvalue", "lower"),
    "trace": ("Hessian trace (Hutchinson)", "lower"),
    "sharpness_1d": ("1-D landscape rise within alpha ±0.5", "lower"),
    "gap": ("train - test accuracy", "lower"),
    "test_accuracy": ("test accuracy", "higher"),
}
ALPHAS = tuple(round(-1.0 + 0.2 * i, 1) for i in range(11))
GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
# The page's usage example (run by the docs tests): a tiny BERT with LoRA, no download.
EXAMPLE = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from safefreeze.analysis import (
    NormRecorder,
    adapter_norms,
    block_norms,
    hutchinson_trace,
    lora_parameters,
    loss_landscape_1d,
    top_hessian_eigenvalues,
)

torch.manual_seed(0)
config = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, attn_implementation="eager",
)
lora = LoraConfig(r=4, target_modules=["query", "value"])
model = get_peft_model(BertForSequenceClassification(config), lora)
batches = [
    {"input_ids": torch.randint(0, 100, (8, 12)), "labels": torch.randint(0, 2, (8,))}
    for _ in range(2)
]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
recorder = NormRecorder()  # ||B A||_F per adapter, per block and in total, at each step
for step in range(1, 6):
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    recorder.record(model, step)

model.eval()  # no dropout: the loss is a function of the weights alone
params = list(lora_parameters(model).values())

def loss(batch):
    return model(**batch).loss

top = top_hessian_eigenvalues(loss, batches, params, k=2, tol=1e-4)
trace = hutchinson_trace(loss, batches, params, probes=8, seed=0)
curve = loss_landscape_1d(loss, batches, params, [-0.5, 0.0, 0.5], seed=0)
print("top eigenvalues", top, f"trace {trace.trace:.4f} +- {trace.stderr:.4f}")
print("loss along a direction", curve.losses)
print("per block", block_norms(adapter_norms(model)))
assert recorder.steps == [1, 2, 3, 4, 5] and recorder.total[-1] > recorder.total[0]
"""
# The full setting: 3 seeds, every training snippet, the whole test split.
FULL_COMMAND = "python benchmarks/regularization.py --threads 2"
SMOKE_GRID = (-0.5, 0.0, 0.5)
SMOKE = {"limit": 24, "batch_size": 8, "max_length": 16}


def configs(total_steps: int) -> dict[str, SAFEConfig | None]:
    """The SAFE config of each variant (None: plain LoRA), scaled like ``rotten.py``."""
    safe = SAFEConfig.for_run(total_steps)
    steps = {"warmup_steps": safe.warmup_steps, "freeze_end_step": safe.freeze_end_step}
    return {"lora": None, "safe": safe, "paper": SAFEConfig.paper(**steps)}


def train_run(
    task: TaskConfig,
    train_data: dict[str, torch.Tensor],
    config: SAFEConfig | None,
    seed: int,
    norm_every: int,
) -> tuple[nn.Module, NormRecorder, list[str]]:
    """Train as ``safefreeze.demo.task.train`` does (AdamW, linear decay); record norms."""
    model = build_model(task, seed).to(torch.device(task.device))
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    total = task.steps(train_data["labels"].shape[0])
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1.0 - step / total)
    optimizer: torch.optim.Optimizer = inner
    safe = None
    if config is not None:
        safe = SAFEOptimizer(inner, model, config)
        optimizer = safe
    recorder = NormRecorder()
    recorder.record(model, 0)
    for step, batch in enumerate(batches(train_data, task, seed), start=1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % norm_every == 0 or step == total:
            recorder.record(model, step)
    frozen = [] if safe is None else list(safe.frozen_units)
    if safe is not None:
        safe.close()
    return model, recorder, frozen


def analyse(
    model: nn.Module,
    fixed: list[dict[str, torch.Tensor]],
    probes: int,
    seed: int,
    alphas: tuple[float, ...] = ALPHAS,
    grid: tuple[float, ...] = GRID,
) -> dict[str, Any]:
    """Sharpness and landscapes of the mean loss over ``fixed`` w.r.t. every LoRA factor."""
    model.eval()  # no dropout: the loss is a function of the weights alone
    for module in model.modules():  # merged adapters back into their branch: the same function
        if getattr(module, "merged_adapters", None):
            module.unmerge()  # type: ignore[operator]
    params = list(lora_parameters(model).values())
    for p in params:
        p.requires_grad_(True)

    def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = model(**batch).loss
        return out

    started = time.perf_counter()
    # The fused CPU attention kernels have no double backward; the math kernel is plain ops.
    with sdpa_kernel(SDPBackend.MATH):
        top = top_hessian_eigenvalues(loss, fixed, params, k=1, tol=1e-3, maxiter=200, seed=seed)
        trace = hutchinson_trace(loss, fixed, params, probes=probes, seed=seed)
        curve = loss_landscape_1d(loss, fixed, params, alphas, seed=seed)
        surface = loss_landscape_2d(loss, fixed, params, grid, grid, seed=seed)
    return {
        "top_eigenvalue": float(top[0]),
        "trace": trace.trace,
        "trace_stderr": trace.stderr,
        "landscape_1d": {"alphas": list(curve.alphas), "losses": list(curve.losses)},
        "landscape_2d": {
            "alphas": list(surface.alphas),
            "betas": list(surface.betas),
            "losses": [list(r) for r in surface.losses],
        },
        "sharpness_1d": curve.sharpness(0.5),
        "analysis_s": time.perf_counter() - started,
    }


def run(
    task: TaskConfig,
    seeds: list[int],
    eval_limit: int | None,
    hessian_batches: int,
    probes: int,
    norm_every: int,
    save: Any = lambda data: None,
    command: str = "python benchmarks/regularization.py",
    alphas: tuple[float, ...] = ALPHAS,
    grid: tuple[float, ...] = GRID,
    hessian_size: int | None = None,
) -> dict[str, Any]:
    """Train and analyse every variant for every seed; ``save`` gets the results after each run."""
    train_split, test_split = task.load()
    device = torch.device(task.device)
    train_data = {k: v.to(device) for k, v in encode(train_split, task).items()}
    test_data = {k: v.to(device) for k, v in encode(test_split, task).items()}
    if eval_limit is not None:
        test_data = {k: v[:eval_limit] for k, v in test_data.items()}
    train_eval = {k: v[: test_data["labels"].shape[0]] for k, v in train_data.items()}
    bs = task.batch_size
    bs = hessian_size or bs
    fixed = [{k: v[i * bs : (i + 1) * bs] for k, v in train_data.items()} for i in range(hessian_batches)]
    total = task.steps(train_data["labels"].shape[0])
    cfgs = configs(total)
    data: dict[str, Any] = {
        "benchmark": "regularization",
        "command": command,
        "task": dataclasses.asdict(task),
        "configs": {n: None if c is None else c.to_dict() for n, c in cfgs.items()},
        "seeds": seeds,
        "sizes": {
            "train_encoded": int(train_data["labels"].shape[0]),
            "test_eval": int(test_data["labels"].shape[0]),
            "train_eval": int(train_eval["labels"].shape[0]),
            "hessian_snippets": hessian_batches * bs,
            "total_steps": total,
        },
        "analysis": {"probes": probes, "alphas": list(alphas), "grid": list(grid), "eig_tol": 1e-3},
        "machine": machine(task.device),
        "runs": [],
        "complete": False,
    }
    started = time.perf_counter()
    for seed in seeds:
        for name in VARIANTS:
            t0 = time.perf_counter()
            model, recorder, frozen = train_run(task, train_data, cfgs[name], seed, norm_every)
            print(f"seed {seed} {name:6s} trained ({time.perf_counter() - t0:.0f} s)", flush=True)
            test_acc, _ = evaluate(model, test_data)
            train_acc, _ = evaluate(model, train_eval)
            norms = adapter_norms(model)
            row = {
                "variant": name,
                "seed": seed,
                "test_accuracy": test_acc,
                "train_accuracy": train_acc,
                "gap": train_acc - test_acc,
                "frozen_units": frozen,
                "total_norm": math.sqrt(sum(v * v for v in norms.values())),
                "block_norms": block_norms(norms),
                "norm_history": recorder.to_dict(),
                "train_s": time.perf_counter() - t0,
                **analyse(model, fixed, probes, seed, alphas, grid),
            }
            data["runs"].append(row)
            print(
                f"seed {seed} {name:6s} test {test_acc:.3f} train {train_acc:.3f} "
                f"norm {row['total_norm']:.3f} eig {row['top_eigenvalue']:.4g} trace {row['trace']:.4g} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            save(data)
    data["tests"] = paired_tests(data["runs"], seeds)
    data["elapsed_s"] = time.perf_counter() - started
    data["complete"] = True
    save(data)
    return data


def paired_tests(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per variant and metric: mean of ``variant - lora`` over seeds and a paired t-test's p."""
    from scipy import stats

    by = {(r["variant"], r["seed"]): r for r in runs}
    out: dict[str, dict[str, Any]] = {}
    for name in ("safe", "paper"):
        out[name] = {}
        for metric in METRICS:
            a = [by[(name, s)][metric] for s in seeds]
            b = [by[("lora", s)][metric] for s in seeds]
            diffs = [x - y for x, y in zip(a, b, strict=True)]
            p = float("nan")
            if len(seeds) >= 2 and any(d != diffs[0] for d in diffs):
                p = float(stats.ttest_rel(a, b).pvalue)
            out[name][metric] = {
                "mean": statistics.fmean(a),
                "lora_mean": statistics.fmean(b),
                "mean_diff": statistics.fmean(diffs),
                "diffs": diffs,
                "p": p,
            }
    return out


def verdict(test: dict[str, Any], direction: str, alpha: float = 0.05) -> str:
    """Whether one metric moves the way the paper predicts, significantly, in every seed."""
    diff, p = test["mean_diff"], test["p"]
    right = diff < 0 if direction == "lower" else diff > 0
    if all(d == 0 for d in test["diffs"]):
        return "no difference"
    every = all((d < 0) if direction == "lower" else (d > 0) for d in test["diffs"])
    if right and every and p == p and p < alpha:
        return "reproduces"
    if right:
        return "same direction, not significant"
    return "does not reproduce"


def plots(data: dict[str, Any], docs: Path) -> list[str]:
    """Landscape and norm plots under ``docs/images``; [] when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from safefreeze.analysis import Landscape1D, Landscape2D
    except ImportError:
        return []
    seed = data["seeds"][0]
    runs = {r["variant"]: r for r in data["runs"] if r["seed"] == seed}
    curves = {
        n: Landscape1D(tuple(r["landscape_1d"]["alphas"]), tuple(r["landscape_1d"]["losses"]))
        for n, r in runs.items()
    }
    s = runs["lora"]["landscape_2d"]
    surface = Landscape2D(tuple(s["alphas"]), tuple(s["betas"]), tuple(tuple(x) for x in s["losses"]))
    images = docs / "images"
    plot_landscapes(
        curves,
        images / "regularization_landscape.png",
        surface=surface,
        title=f"Loss along one direction (seed {seed}; right: plain LoRA)",
    )
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for r in data["runs"]:
        history = r["norm_history"]
        axes.plot(
            history["steps"],
            history["total"],
            color={"lora": "#4C72B0", "safe": "#55A868", "paper": "#C44E52"}[r["variant"]],
            label=r["variant"] if r["seed"] == seed else None,
            alpha=0.8,
        )
    axes.set_xlabel("step")
    axes.set_ylabel("||B A||_F over all adapters")
    axes.legend()
    figure.tight_layout()
    figure.savefig(images / "regularization_norms.png", dpi=110)
    return ["regularization_landscape.png", "regularization_norms.png"]


def render(data: dict[str, Any], docs: Path, command: str, full_command: str) -> Path:
    """Write ``docs/regularization.md`` from the results."""
    images = plots(data, docs)
    seeds = data["seeds"]
    sizes = data["sizes"]
    m = data["machine"]
    minutes = statistics.fmean(r["train_s"] + r["analysis_s"] for r in data["runs"]) / 60
    lines = [
        "# Does SAFE regularize?",
        "",
        "The SAFE paper (arXiv 2412.03587) claims that freezing adapters early regularizes the",
        "model: smaller adapter weight norms, a flatter loss landscape and better generalization.",
        "This page measures the claim with `safefreeze.analysis` on the savings benchmark's task",
        "(pretrained MiniLM-L6 with LoRA on query and value, Rotten Tomatoes), comparing plain LoRA,",
        "SAFE's default rule and the paper's rule over the same seeds, data order and dropout.",
        "",
        "## Measuring a model",
        "",
        "Every measurement takes a loss over a fixed set of batches and the parameters to measure; "
        "the Hessian is only ever applied to vectors (two backward passes per batch), never formed.",
        "",
        "```python",
        EXAMPLE.strip(),
        "```",
        "",
        "A merged adapter keeps its factors, so its norm is still the update it holds; to measure "
        "sharpness with respect to it, unmerge it first (PEFT's `unmerge()`) and let its factors "
        "require grad. CPU attention kernels have no double backward: use an eager attention "
        "implementation or `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`.",
        "",
        "## Setting",
        "",
        f"- Seeds {seeds}; {sizes['total_steps']} training steps of {data['task']['batch_size']} snippets "
        f"of {data['task']['max_length']} tokens over {sizes['train_encoded']} training snippets "
        f"(the full benchmark trains 337 steps over 10,808).",
        f"- Test accuracy on {sizes['test_eval']} test snippets; train accuracy on the first "
        f"{sizes['train_eval']} training snippets; the gap is train minus test.",
        f"- Sharpness over a fixed set of {sizes['hessian_snippets']} training snippets (the same for every "
        "run), dropout off, every adapter unmerged, with respect to all LoRA factors: the top Hessian "
        f"eigenvalue (Lanczos, `eigsh`, tol {data['analysis']['eig_tol']}) and a Hutchinson trace "
        f"({data['analysis']['probes']} Rademacher probes).",
        "- Landscapes along filter-normalized random directions (Li et al., 2018) over the LoRA factors; "
        "the 1-D sharpness is the highest loss within alpha in [-0.5, 0.5] minus the loss at 0.",
        f"- Machine: {m.get('cpus')} CPUs ({m.get('processor')}), torch {m.get('torch')} on "
        f"{m.get('torch_threads')} threads"
        + (f", {m['cuda_device']}" if m.get("cuda_device") else "")
        + f"; {minutes:.1f} minutes per run on average (training and analysis)."
        + (f" {data['note']}" if data.get("note") else ""),
        "",
        *(
            [
                f"- This is a reduced setting ({sizes['total_steps']} steps instead of 337) that fits a "
                "shared two-core machine; its numbers describe short fine-tuning runs, not the full "
                "benchmark.",
            ]
            if sizes["total_steps"] < 337
            else []
        ),
        *(
            []
            if data.get("complete")
            else [f"- Reported: the seeds whose three runs finished, {seeds}, from the commands below."]
        ),
        "",
        "Reproduce this page:",
        "",
        "```bash",
        command,
        "```",
        "",
        (
            "The full setting (3 seeds, 337 steps each, the whole test split, 4 Hessian batches of 32 "
            f"snippets, 16 probes) was not run for this page; each run above took {minutes:.0f} minutes "
            "on average (training and analysis) on the shared machine:"
            if sizes["total_steps"] < 337
            else "This page comes from the full setting; on a CPU it runs with:"
        ),
        "",
        "```bash",
        full_command,
        "```",
        "",
        "## Per run",
        "",
        "| variant | seed | frozen units | test acc | train acc | gap | ‖BA‖_F | top eigenvalue "
        "| trace (± s.e.) | 1-D sharpness |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {len(r['frozen_units'])} | {r['test_accuracy']:.3f} "
            f"| {r['train_accuracy']:.3f} | {r['gap']:+.3f} | {r['total_norm']:.3f} "
            f"| {r['top_eigenvalue']:.4g} | {r['trace']:.4g} ± {r['trace_stderr']:.2g} "
            f"| {r['sharpness_1d']:.4g} |"
        )
    lines += [
        "",
        f"## Paired tests against plain LoRA ({len(seeds)} seed{'s' * (len(seeds) != 1)}, "
        "`scipy.stats.ttest_rel`)",
        "",
        "The paper predicts the direction in the second column; *reproduces* needs the difference "
        "in that direction in every seed and p < 0.05.",
        "",
        "| metric | paper predicts | variant | mean | LoRA mean | mean difference | p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tests = data["tests"]
    verdicts: dict[str, list[str]] = {"safe": [], "paper": []}
    for metric, (label, direction) in METRICS.items():
        for name in ("safe", "paper"):
            t = tests[name][metric]
            v = verdict(t, direction)
            verdicts[name].append(v)
            p = "n/a" if t["p"] != t["p"] else f"{t['p']:.3g}"
            lines.append(
                f"| {label} | {direction} | {name} | {t['mean']:.4g} | {t['lora_mean']:.4g} "
                f"| {t['mean_diff']:+.4g} | {p} | {v} |"
            )
    lines += ["", "## Verdict", ""]
    for name, title in (("safe", "SAFE's default"), ("paper", "The paper's rule")):
        held = [METRICS[m][0] for m, v in zip(METRICS, verdicts[name], strict=True) if v == "reproduces"]
        lines.append(
            f"- {title}: the predicted effect holds significantly for "
            f"{', '.join(held) if held else 'none of the metrics'} "
            f"({len(held)} of {len(METRICS)})."
        )
    for name, title in (("safe", "SAFE's default"), ("paper", "The paper's rule")):
        froze = [r for r in data["runs"] if r["variant"] == name and r["frozen_units"]]
        runs = [r for r in data["runs"] if r["variant"] == name]
        if len(froze) < len(runs):
            lines.append(
                f"- {title} froze no unit in {len(runs) - len(froze)} of {len(runs)} runs; such a run "
                "trains exactly as plain LoRA does (same seed, data order and dropout), so its "
                "differences are zero by construction."
            )
    noise = max(r["trace_stderr"] for r in data["runs"])
    if any(abs(tests[n]["trace"]["mean_diff"]) < noise for n in tests):
        lines.append(
            f"- The Hutchinson trace estimates have standard errors up to {noise:.3g} "
            f"({data['analysis']['probes']} probes), larger than the differences between variants; "
            "the variants of a seed share their probes, so the paired differences are less noisy than "
            "that, but the trace comparison is weak evidence either way."
        )
    all_held = all(v == "reproduces" for vs in verdicts.values() for v in vs)
    lines += [
        "",
        "In this setting the paper's regularization claim "
        + ("**reproduces**." if all_held else "**does not reproduce** as a whole.")
        + f" With {len(seeds)} seed{'s' * (len(seeds) != 1)} a paired t-test has little power, so an "
        "effect in the predicted direction that misses p < 0.05 is reported as not significant rather "
        "than absent.",
        "",
    ]
    if images:
        lines += ["## Plots", ""]
        lines += [
            f"The loss of seed {seeds[0]} along one filter-normalized direction for each variant (drawn "
            "from the same seed for all, scaled to each model), and plain LoRA's loss over a plane of two "
            "directions:",
            "",
            f"![Loss landscapes](images/{images[0]})",
            "",
            "The norm of all adapter updates over training, every run (a variant that froze nothing "
            "draws over plain LoRA's line):",
            "",
            f"![Adapter norms](images/{images[1]})",
            "",
        ]
    else:
        lines += [
            "Plots (`docs/images/regularization_*.png`) are drawn when matplotlib is installed "
            "(`pip install 'safefreeze[analysis]'`); the run that wrote this page had none.",
            "",
        ]
    page = docs / "regularization.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=None, help="training snippets (default: all)")
    parser.add_argument("--eval-limit", type=int, default=None, help="test snippets evaluated (default: all)")
    parser.add_argument(
        "--hessian-batches", type=int, default=4, help="fixed training batches of the Hessian"
    )
    parser.add_argument(
        "--hessian-size", type=int, default=None, help="snippets per Hessian batch (default: the batch size)"
    )
    parser.add_argument("--probes", type=int, default=16, help="Hutchinson probes")
    parser.add_argument("--norm-every", type=int, default=10, help="record adapter norms every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=None, help="default: results/regularization.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where regularization.md goes")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the page (and plots) from the saved results"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="with --render: results of further seeds to add"
    )
    parser.add_argument("--smoke", action="store_true", help="CI: 2 seeds, a few snippets, temp results")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    task = dataclasses.replace(ROTTEN_TOMATOES, train_size=args.limit, device=args.device)
    seeds, results = args.seeds, args.results
    hessian, probes, eval_limit = args.hessian_batches, args.probes, args.eval_limit
    if args.smoke:
        task = dataclasses.replace(task, **SMOKE, train_size=None)
        seeds, hessian, probes, eval_limit, args.no_docs = seeds[:2], 1, 2, 32, True
        if results is None:
            results = Path(tempfile.mkdtemp(prefix="regularization-smoke-")) / "regularization.json"
        torch.set_num_threads(args.threads or 1)
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    if results is None:
        results = RESULTS / "regularization.json"
    argv_list = list(argv if argv is not None else sys.argv[1:])
    command = "python benchmarks/regularization.py " + " ".join(argv_list)
    if args.render:
        data = json.loads(results.read_text())
        commands = [data["command"]]
        for path in args.merge:  # runs of other seeds, e.g. from a process run beside this one
            other = json.loads(path.read_text())
            if other["task"] != data["task"] or other["analysis"] != data["analysis"]:
                parser.error(f"--merge {path}: its task or analysis settings differ from {results}'s")
            seen = {(r["variant"], r["seed"]) for r in data["runs"]}
            data["runs"] += [r for r in other["runs"] if (r["variant"], r["seed"]) not in seen]
            data["complete"] = False
            commands.append(other["command"])
        seeds = sorted({r["seed"] for r in data["runs"]})
        done = [s for s in seeds if sum(r["seed"] == s for r in data["runs"]) == len(VARIANTS)]
        if not data["complete"]:  # interrupted or merged runs: the seeds with every variant
            data["seeds"], data["runs"] = done, [r for r in data["runs"] if r["seed"] in done]
            data["runs"].sort(key=lambda r: (r["seed"], VARIANTS.index(r["variant"])))
            data["tests"] = paired_tests(data["runs"], done)
        data["command"] = "\n".join(
            [*commands, " ".join(["python benchmarks/regularization.py", *argv_list])]
        )
        print(f"page: {render(data, args.docs, data['command'], FULL_COMMAND)}")
        return 0

    def save(data: dict[str, Any]) -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=1))

    grid = SMOKE_GRID if args.smoke else GRID
    data = run(
        task,
        seeds,
        eval_limit,
        hessian,
        probes,
        args.norm_every,
        save,
        command.strip(),
        SMOKE_GRID if args.smoke else ALPHAS,
        grid,
        args.hessian_size,
    )
    print(f"results: {results} ({data['elapsed_s']:.0f} s)")
    if not args.no_docs:
        page = render(data, args.docs, command.strip(), FULL_COMMAND)
        print(f"page: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
