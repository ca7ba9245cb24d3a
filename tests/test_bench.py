"""The Rotten Tomatoes benchmark and the trade-off study: statistics, pages from known numbers, smoke runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from safefreeze import SAFEConfig
from safefreeze.config import SCHEDULE_SHARES

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _load(REPO / "benchmarks" / "report.py")
rotten = _load(REPO / "benchmarks" / "rotten.py")
tradeoff = _load(REPO / "benchmarks" / "tradeoff.py")

UNITS = {
    f"encoder.layer.{i}": [f"encoder.layer.{i}.attention.self.{m}" for m in ("query", "value")]
    for i in (0, 1)
}


def _run(
    variant: str, seed: int, accuracy: float, flops: list[int], saved: list[int], **extra: Any
) -> dict[str, Any]:
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.1,
        "step_flops": flops,
        "step_forward_flops": [f // 2 for f in flops],
        "step_saved_bytes": saved,
        "step_state_bytes": [4096] * len(flops),
        "step_times_s": [f / 10 for f in flops],
        "wall_time_s": sum(f / 10 for f in flops),
        "plan": None,
        "budget_step": None,
        "budget_accuracy": None,
        "budget_macro_f1": None,
        "peak_memory_after_warmup": None,
        **extra,
    }


def _synthetic() -> dict[str, Any]:
    """Three seeds of 10 steps: LoRA costs 10 FLOPs and 100 bytes a step, SAFE 5 and 20 from step 2."""
    runs = []
    plan = {
        "units": UNITS,
        "events": [{"step": 2, "units": ["encoder.layer.0"], "adapters": UNITS["encoder.layer.0"]}],
    }
    for seed, (lora_acc, safe_acc, budget_acc) in enumerate(
        [(0.80, 0.79, 0.70), (0.82, 0.815, 0.72), (0.81, 0.80, 0.71)]
    ):
        runs.append(_run("safe", seed, safe_acc, [10, 10] + [5] * 8, [100, 100] + [20] * 8, plan=plan))
        runs.append(
            _run(
                "lora", seed, lora_acc, [10] * 10, [100] * 10,
                budget_step=6, budget_accuracy=budget_acc, budget_macro_f1=budget_acc - 0.1,
            )
        )  # fmt: skip
    return {
        "task": {"labels": ["negative", "positive"]},
        "config": {
            "warmup_steps": 2,
            "freeze_end_step": 4,
            "tau_target": 0.5,
            "normalization": "rank",
            "eval_frozen": "attention",
        },
        "sizes": {"total_steps": 10},
        "seeds": [0, 1, 2],
        "machine": {"device": "cpu", "processor": "x", "cpus": 2, "torch_threads": 2, "platform": "p",
                    "python": "3", "torch": "t"},
        "command": "python benchmarks/rotten.py --threads 2",
        "overhead": {"plain_step_s": 0.5, "scored_step_s": 0.51, "overhead": 0.04, "steps": 40,
                     "scored_steps": 1, "warmup_steps": 2, "warmup_overhead": 0.02},
        "prefix_costs": [
            {"frozen": 0, "flops": 10, "forward_flops": 5, "saved_bytes": 100, "step_s": 1.0},
            {"frozen": 1, "flops": 5, "forward_flops": 5, "saved_bytes": 20, "step_s": 0.5},
            {"frozen": 2, "flops": 5, "forward_flops": 5, "saved_bytes": 0, "step_s": 0.5},
        ],
        "runs": runs,
    }  # fmt: skip


def test_t_quantiles_and_the_paired_interval() -> None:
    assert report.t975(2) == 4.303
    assert report.t975(30) == 2.042
    assert report.t975(200) == pytest.approx(1.972, abs=1e-3)  # the table's tail, by expansion
    mean, half = report.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (mean, half) == (2.0, pytest.approx(4.303 / math.sqrt(3)))
    assert report.paired([0.5], [0.25]) == (0.25, None)  # one seed: no interval
    with pytest.raises(ValueError, match="one value per seed on both sides, got 2 and 1"):
        report.paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="df >= 1, got df=0"):
        report.t975(0)


def test_counted_steps_are_timed_as_the_next_plain_step() -> None:
    run = {
        "wall_time_s": 11.0,
        "step_times_s": [5.0, 1.0, 1.0, 3.0, 1.0],
        "step_counted": [True, False, False, True, False],
    }
    assert report.train_time(run) == 5.0
    run = {"wall_time_s": 5.0, "step_times_s": [1.0, 4.0], "step_counted": [False, True]}
    assert report.train_time(run) == 2.0  # the last step borrows the one before
    assert (
        report.train_time({"wall_time_s": 7.5, "step_times_s": [7.5]}) == 7.5
    )  # recorded before step_counted


def test_targets_from_known_numbers() -> None:
    data = _synthetic()
    s = report.per_seed(data)
    # LoRA stopped at step 6 of 10, where its FLOPs reach SAFE's 60, at its budget accuracy.
    assert s["lora_budget"]["flops"] == [60.0] * 3
    assert s["lora_budget"]["stopped_at"] == [6.0] * 3
    rows = {name: (bar, value, met) for name, bar, value, met in report.targets(data, s)}
    assert rows["total training FLOPs, SAFE / LoRA"] == ("<= 0.60", 0.6, True)
    assert rows["bytes saved for backward, time-averaged, SAFE / LoRA"] == (
        "<= 0.50",
        pytest.approx(0.36),
        True,
    )
    assert rows["wall time (CPU), SAFE / LoRA"] == ("<= 0.75", pytest.approx(0.6), True)
    assert rows["accuracy, SAFE - LoRA (points)"] == (">= -1.0", pytest.approx(-0.8333, abs=1e-4), True)
    assert rows["accuracy, SAFE - LoRA stopped at SAFE's FLOPs (points)"] == (
        "> 0",
        pytest.approx(9.1667, abs=1e-4),
        True,
    )
    assert rows["warm-up scoring overhead per scored step, share of a LoRA step"] == ("<= 0.03", 0.04, False)
    assert rows["warm-up scoring overhead spread over the warm-up"] == ("<= 0.03", 0.02, True)
    del data["overhead"]["warmup_overhead"]  # results recorded when every warm-up step was scored
    rows = {name: (bar, value, met) for name, bar, value, met in report.targets(data, s)}
    assert rows["warm-up scoring overhead spread over the warm-up"] == ("<= 0.03", 0.04, False)
    # A CUDA run has no wall-time target.
    data["machine"].update(device="cuda", cuda_device="GPU")
    assert "wall time (CPU), SAFE / LoRA" not in [r[0] for r in report.targets(data, s)]


def test_a_run_of_another_default_order_says_so() -> None:
    data = _synthetic()
    assert report._default_note(data) == ""  # recorded without an order: nothing to say
    data["config"]["order"] = SAFEConfig().order
    assert report._default_note(data) == ""
    data["config"]["order"] = "prefix"
    page = "\n".join(report.rotten_section(data, "Rotten Tomatoes on CUDA", main=False))
    assert (
        "This run predates the current default: its `safe` rows (and the oracle replaying them) used "
        "`order='prefix'`, and its `position` rows ran today's default rule (`order='depth'`)." in page
    )
    # A config recorded before eval_frozen existed kept every dropout, and says so.
    data["config"]["order"] = SAFEConfig().order
    del data["config"]["eval_frozen"]
    assert report._default_note(data) == (
        " Its SAFE rows ran with `eval_frozen=False` (the frozen blocks keep all their dropout), where "
        "today's default is `eval_frozen='attention'` (the frozen blocks' attention runs in evaluation "
        "mode, so no attention probabilities are dropped, while the dropout on their hidden states stays)."
    )


def test_section_prints_ratios_and_paired_intervals() -> None:
    page = "\n".join(report.rotten_section(_synthetic(), "Rotten Tomatoes on CPU", main=True))
    # Paired differences -1.0, -0.5, -1.0 points: mean -0.83, sd 0.289, t(0.975, 2) = 4.303.
    assert (
        "| safe | 0.802 ± 0.013 | 0.702 ± 0.013 | -0.8 [-1.6, -0.1] | -0.8 [-1.6, -0.1] | 1.0 of 2 |" in page
    )
    assert (
        "| lora_budget | 0.710 ± 0.010 | 0.610 ± 0.010 | -10.0 [-10.0, -10.0] | -10.0 [-10.0, -10.0] " in page
    )
    assert "stopped at step 6 ± 0 of 10 |" in page
    # FLOPs 60 of 100, saved bytes 36 of 100 on average and 20 of 100 at the end, steps of 0.5 s.
    assert "| safe | 0.00 | 0.600 | 0.0 | 0.360 | 0.0 | 0.200 | 4 | 4 | 6.0 ± 0.0 | 0.600 | 500.0 |" in page
    assert "| lora_budget | 0.00 | 0.600 |" in page
    assert "| total training FLOPs, SAFE / LoRA | <= 0.60 | 0.600 | yes |" in page
    assert "| accuracy, SAFE - LoRA (points) | >= -1.0 | -0.833 | yes |" in page
    assert "- Seed 0: SAFE froze 1 of 2 units (layer.0 at step 2); still training: layer.1." in page
    # The floor: 2 warm-up steps of 10 FLOPs, then 8 steps at the 1-frozen cost of 5: 60 / 100.
    assert "FLOPs 0.600x LoRA and time-averaged bytes saved for backward 0.360x LoRA" in page
    assert "lets at most round(0.5 x 2) = 1 of the 2 blocks freeze" in page
    # Time by phase: the warm-up costs as much as LoRA's, the 8 steps after the freeze half.
    assert "| warm-up | 0-1 | 2.0 | 2.0 | 1.000 |" in page
    assert "| after the last freeze | 2-9 | 4.0 | 8.0 | 0.500 |" in page
    assert "ramp, up to" not in page  # the last freeze ends the warm-up: no ramp phase
    assert "Accuracy, SAFE - LoRA per seed (points): -1.0, -0.5, -1.0." in page


def test_configs_switch_one_lever_each() -> None:
    cfgs = rotten.configs(337)
    safe = cfgs["safe"]
    assert safe == SAFEConfig.for_run(337)
    assert (safe.warmup_steps, safe.freeze_end_step) == (34, 202)
    # The rules the scores steer run over the schedule for_run gives them: a quarter, a half.
    assert cfgs["paper"] == SAFEConfig.paper(warmup_steps=84, freeze_end_step=168)
    assert safe.order == "depth" and SAFEConfig.for_run(337, order="prefix") == cfgs["score-prefix"]
    led = {"warmup_steps": 84, "freeze_end_step": 168}
    assert dataclasses.replace(safe, order="prefix", **led) == cfgs["score-prefix"]
    assert safe.eval_frozen == "attention"
    assert dataclasses.replace(safe, eval_frozen=True) == cfgs["eval-frozen"]
    assert dataclasses.replace(safe, eval_frozen=False) == cfgs["dropout-kept"]
    for name, lever in rotten.ABLATION.items():
        changed = {
            f.name
            for f in dataclasses.fields(SAFEConfig)
            if getattr(cfgs[name], f.name) != getattr(safe, f.name)
        }
        assert changed == set(lever), name
        assert all(getattr(cfgs["paper"], k) == v for k, v in lever.items())  # the paper's setting


def test_the_page_names_the_variants_that_run_over_another_schedule() -> None:
    cfgs = rotten.configs(337)
    data = {
        "config": cfgs["safe"].to_dict(),
        "configs": {name: cfg.to_dict() for name, cfg in cfgs.items()},
        "sizes": {"total_steps": 337},
    }
    assert report._schedules_text(data, ["safe", "eval-frozen", "score-prefix", "paper"]) == (
        "the other SAFE variants use these steps, except: paper and score-prefix warm up for 84 steps "
        "and ramp to step 168 (25% and 50%), the schedule `for_run` gives the rules the scores steer."
    )
    assert report._schedules_text(data, ["safe", "eval-frozen"]) == "every SAFE variant uses these steps."


def test_variants_are_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="add 'safe' to --variants"):
        rotten.run(rotten.TASK, [0], ["lora", "oracle"], overhead_pairs=1)
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['lora2'\]; expected names from \['safe', "):
        rotten.run(rotten.TASK, [0], ["lora2"], overhead_pairs=1)


@pytest.mark.slow
def test_smoke_run_and_its_page(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    task = dataclasses.replace(rotten.TASK, **rotten.SMOKE)
    saved: list[int] = []
    data = rotten.run(
        task,
        [0],
        list(rotten.VARIANTS),
        overhead_pairs=1,
        prefix_timed=1,
        save=lambda d: saved.append(len(d["runs"])),
    )
    assert saved == [*range(1, 12), 11]  # after every run, then once complete
    data = json.loads(json.dumps(data))  # what the JSON file holds
    runs = {r["variant"]: r for r in data["runs"]}
    assert list(runs) == list(rotten.VARIANTS)
    safe, lora, oracle = runs["safe"], runs["lora"], runs["oracle"]
    # The oracle replays SAFE's freezes, without scoring.
    assert [(e["step"], e["units"]) for e in oracle["plan"]["events"]] == [
        (e["step"], e["units"]) for e in safe["plan"]["events"]
    ]
    assert sum(oracle["step_flops"]) <= sum(safe["step_flops"])
    # Plain LoRA meets one situation (one batch shape): only its first step runs under the counters.
    assert lora["step_counted"] == [True, False, False, False]
    assert lora["step_peak_memory"] == [] and lora["peak_memory_after_warmup"] is None  # CPU
    # LoRA's budget is SAFE's FLOPs: the first step whose cumulative FLOPs reach them.
    budget = sum(safe["step_flops"])
    if lora["budget_step"] is not None:
        assert (
            sum(lora["step_flops"][: lora["budget_step"]])
            >= budget
            > sum(lora["step_flops"][: lora["budget_step"] - 1])
        )
    # The default freezes a lower prefix of blocks, as many as the threshold allows; the
    # scores' prefix is never longer.
    units = list(safe["plan"]["units"])
    frozen = [u for e in safe["plan"]["events"] for u in e["units"]]
    by_score = [u for e in runs["score-prefix"]["plan"]["events"] for u in e["units"]]
    assert frozen == units[: len(frozen)] and len(frozen) == round(0.67 * len(units))
    assert by_score == units[: len(by_score)] and len(by_score) <= len(frozen)
    assert [r["frozen"] for r in data["prefix_costs"]] == list(range(len(units) + 1))
    # The frozen blocks' dropout changes the freezes not at all, and the counted FLOPs only
    # once a block is frozen: an attention without dropout runs another kernel.
    first = safe["plan"]["events"][0]["step"]
    for variant, held in (("eval-frozen", True), ("dropout-kept", False)):
        run = runs[variant]
        assert [(e["step"], e["units"]) for e in run["plan"]["events"]] == [
            (e["step"], e["units"]) for e in safe["plan"]["events"]
        ]
        assert run["step_flops"][:first] == safe["step_flops"][:first]
        assert run["plan"]["config"]["eval_frozen"] is held
    assert safe["plan"]["config"]["eval_frozen"] == "attention"
    # Less dropout never costs more counted FLOPs: eval-frozen <= safe <= dropout-kept, step by step.
    for lower, upper in ((runs["eval-frozen"], safe), (safe, runs["dropout-kept"])):
        assert all(a <= b for a, b in zip(lower["step_flops"], upper["step_flops"], strict=True))
    assert data["complete"] and data["sizes"]["total_steps"] == 4
    assert data["together"] is True  # on CPU the variants take turns step by step
    page = report.render({"cpu": data}, tmp_path).read_text()
    assert "trained step by step in turn in one process" in page
    assert "Holding the whole frozen blocks in evaluation mode (`eval_frozen=True`) takes" in page
    assert "Keeping all the frozen blocks' dropout (`eval_frozen=False`, the paper's setting) takes" in page
    assert "no attention probabilities are dropped, while the dropout on their hidden states stays" in page
    for title in (
        "## Rotten Tomatoes on CPU",
        "### Targets (CPU)",
        "## Ablation: one lever at a time",
        "## Plots",
    ):
        assert title in page
    assert "```bash\npython3 -m nox -s bench\n```" in page
    for image in ("bench_saved_bytes.png", "bench_timeline.png"):
        assert (tmp_path / "images" / image).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_variants_trained_together_end_as_one_after_another() -> None:
    pytest.importorskip("peft")
    task = dataclasses.replace(rotten.TASK, **rotten.SMOKE)
    train_split, test_split = task.load()
    train_data, test_data = rotten.encode(train_split, task), rotten.encode(test_split, task)
    cfgs = rotten.configs(task.steps(train_data["labels"].shape[0]))
    variants = ["safe", "lora", "oracle"]
    apart, together = (
        {r.variant: r for r in rotten.run_seed(0, variants, task, train_data, test_data, cfgs, together=mode)}
        for mode in (False, True)
    )
    assert list(apart) == list(together) == variants
    for name in variants:
        a, b = apart[name], together[name]
        assert (a.accuracy, a.macro_f1, a.step_flops, a.step_saved_bytes, a.budget_step) == (
            b.accuracy,
            b.macro_f1,
            b.step_flops,
            b.step_saved_bytes,
            b.budget_step,
        )
        assert (a.plan is None) == (b.plan is None)
        if a.plan is not None and b.plan is not None:
            assert a.plan.to_dict() == b.plan.to_dict()
    assert apart["lora"].budget_step is not None  # LoRA's budget came from SAFE's run in both modes


def test_budget_run_cuts_lora_at_its_budget_or_keeps_it_whole() -> None:
    budget = {"budget_step": 6, "budget_accuracy": 0.7, "budget_macro_f1": 0.6}
    cut = report.budget_run(_run("lora", 0, 0.8, [10] * 10, [100] * 10, **budget))
    assert (cut["variant"], cut["stopped_at"], cut["accuracy"], cut["macro_f1"]) == (
        "lora_budget",
        6,
        0.7,
        0.6,
    )
    assert cut["step_flops"] == [10] * 6 and cut["wall_time_s"] == 6.0
    # Its FLOPs never reached SAFE's (SAFE froze nothing): the whole run fits in the budget.
    whole = report.budget_run(_run("lora", 0, 0.8, [10] * 10, [100] * 10))
    assert (whole["stopped_at"], whole["accuracy"], whole["macro_f1"]) == (10, 0.8, 0.8 - 0.1)
    assert whole["step_flops"] == [10] * 10 and whole["wall_time_s"] == 10.0


def _tradeoff_run(
    seed: int, variant: str, accuracy: float, flops: int, saved: float, **extra: Any
) -> dict[str, Any]:
    safe = variant != "lora"
    return {
        "task": "rotten_tomatoes",
        "seed": seed,
        "variant": variant,
        "tau": 0.67 if safe else None,
        "budget": None if safe else 0.75,
        "schedule": [0.1, 0.3] if safe else None,
        "order": "depth" if safe else None,
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.05,
        "flops": flops,
        "saved_bytes": saved,
        "budget_accuracy": None if safe else accuracy - 0.01,
        "budget_macro_f1": None if safe else accuracy - 0.06,
        "units": 6 if safe else None,
        "frozen": [[3, 1], [5, 3]] if safe else None,
        **extra,
    }


def _tradeoff_data(order: str | None, device: str = "cpu") -> dict[str, Any]:
    runs = [
        _tradeoff_run(0, "lora", 0.80, 100, 200),
        _tradeoff_run(1, "lora", 0.70, 100, 200),
        _tradeoff_run(0, "safe_tau0.67_w0.1_f0.3", 0.78, 70, 80, order=order),
        _tradeoff_run(1, "safe_tau0.67_w0.1_f0.3", 0.71, 80, 120, order=order),
    ]
    return {
        "command": f"python benchmarks/tradeoff.py --device {device}",
        "machine": {"platform": "Linux", "cpus": 2, "device": device, "device_name": None},
        "runs": runs,
    }


def test_frozen_dropout_smoke_run_times_every_setting(tmp_path: Path) -> None:
    frozen_dropout = _load(REPO / "benchmarks" / "frozen_dropout.py")
    results = tmp_path / "drop.json"
    argv = ["--tasks", "rotten_tomatoes", "--rounds", "2", "--limit", "32", "--threads", "1"]
    assert frozen_dropout.main([*argv, "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    (row,) = data["tasks"]
    assert row["frozen"] == 4  # the default's round(0.67 * 6) lowest blocks
    assert list(row["median_step_ms"]) == ["lora", "kept", "attention-off", "eval"]
    assert all(ms > 0 for ms in row["median_step_ms"].values())
    assert row["x_lora"]["lora"] == row["x_kept"]["kept"] == 1.0


def test_tradeoff_rows_pair_each_seed_with_its_lora_run() -> None:
    rows = {r["variant"]: r for r in tradeoff.summarize(_tradeoff_data("depth"))}
    assert rows["lora"]["accuracy"] == pytest.approx(0.75)
    assert rows["lora stopped at 75% FLOPs"]["accuracy"] == pytest.approx(0.74)
    safe = rows["safe_tau0.67_w0.1_f0.3"]
    assert safe["delta"] == pytest.approx(-0.5)  # (-2 + 1) / 2 points
    assert safe["flops"] == pytest.approx(0.75) and safe["saved"] == pytest.approx(0.5)
    assert safe["frozen"] == 4.0  # blocks frozen per seed, summed over its freeze events


def test_tradeoff_frontier_names_the_best_setting_on_each_side_of_the_bars() -> None:
    def row(variant: str, delta: float, saved: float, flops: float) -> dict[str, Any]:
        tau = float(variant.split("_w")[0].removeprefix("safe_tau"))
        return {"variant": variant, "tau": tau, "delta": delta, "saved": saved, "flops": flops}

    lora = {"variant": "lora", "accuracy": 0.8, "flops": 1.0, "saved": 1.0}
    close = row("safe_tau0.67_w0.25_f0.5", -0.5, 0.55, 0.75)
    cheap = row("safe_tau0.67_w0.1_f0.3", -1.5, 0.45, 0.65)
    bars = (
        "Against the benchmark's bars (accuracy at most 1 point below LoRA's, bytes saved for backward "
        "at most 0.50x, FLOPs at most 0.60x): "
    )
    assert tradeoff.frontier([lora, close, cheap]) == bars + (
        "within 1 point the least bytes are 0.550x (tau_target 0.67, schedule 0.25 / 0.5) and the fewest "
        "FLOPs 0.750x (tau_target 0.67, schedule 0.25 / 0.5); at or below 0.50x bytes the least accuracy "
        "lost is 1.50 points (tau_target 0.67, schedule 0.1 / 0.3); no setting meets all three."
    )
    assert tradeoff.frontier([lora, cheap]).startswith(bars + "no setting is within 1 point; at or below")
    assert "no setting reaches 0.50x bytes; no setting meets all three." in tradeoff.frontier([lora, close])
    good = row("safe_tau0.8_w0.25_f0.5", -0.2, 0.40, 0.58)
    assert tradeoff.frontier([lora, close, good]).endswith(
        "; tau_target 0.8, schedule 0.25 / 0.5 meets all three."
    )
    assert tradeoff.frontier([lora]) == ""
    gain = row("safe_tau0.5_w0.25_f0.5", +0.3, 0.48, 0.70)
    assert "at or below 0.50x bytes the best accuracy is +0.30 points against LoRA (tau_target 0.5," in (
        tradeoff.frontier([lora, gain])
    )
    # The page's bars are the benchmark's.
    assert (tradeoff.DROP_BAR, tradeoff.SAVED_BAR, tradeoff.FLOPS_BAR) == (
        report.DROP_BAR,
        report.SAVED_BAR,
        report.FLOPS_BAR,
    )


def test_tradeoff_page_puts_the_default_order_first_and_names_each_order() -> None:
    earlier = _tradeoff_data(None, device="cuda")  # recorded before runs carried their order
    page = tradeoff.render([earlier, _tradeoff_data("depth")])
    depth_at, prefix_at = (
        page.index("device cpu, `order='depth'`"),
        page.index("device cuda, `order='prefix'`"),
    )
    assert depth_at < prefix_at
    assert (
        "| SAFE tau_target 0.67, schedule 0.1 / 0.3 | 4.0 | 0.7450 | -0.50 | 0.6950 | 0.750 | 0.500 |" in page
    )
    # Runs with the frozen blocks in evaluation mode, at a constant learning rate, follow the
    # default of their order and say both in their heading.
    held = _tradeoff_data("depth")
    held["lr_schedule"] = "constant"
    for run in held["runs"]:
        run["eval_frozen"] = None if run["variant"] == "lora" else True
    page = tradeoff.render([held, earlier, _tradeoff_data("depth")])
    heading = "learning rate 1e-3 constant), device cpu, `order='depth'`, `eval_frozen=True`"
    assert page.index("decaying linearly), device cpu, `order='depth'`\n") < page.index(heading)
    assert page.index(heading) < page.index("device cuda, `order='prefix'`")
    assert "| LoRA stopped at 75% FLOPs |  | 0.7400 |  | 0.6900 | 0.750 | 1.000 |" in page


@pytest.mark.slow
def test_tradeoff_smoke_run_records_the_order_and_schedule(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    results, docs = tmp_path / "tradeoff.json", tmp_path / "tradeoff.md"
    args = ["--tasks", "rotten_tomatoes", "--taus", "0.67", "--schedules", "0.25/0.5", "--seeds", "0"]
    args += ["--budgets", "0.5", "--order", "depth", "--threads", "1", "--limit", "128", "--eval-frozen"]
    args += ["--lr-schedule", "constant"]
    assert tradeoff.main([*args, "--results", str(results), "--docs", str(docs)]) == 0
    data = json.loads(results.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    lora, safe = runs["lora"], runs["safe_tau0.67_w0.25_f0.5"]
    assert safe["order"] == "depth" and safe["schedule"] == [0.25, 0.5] and safe["steps"] == 4
    assert safe["eval_frozen"] is True and lora["eval_frozen"] is None and data["lr_schedule"] == "constant"
    # The default rule froze the lowest round(0.67 * 6) blocks, and freezing cost less than LoRA.
    assert sum(n for _, n in safe["frozen"]) == 4
    assert safe["flops"] < lora["flops"] and safe["saved_bytes"] < lora["saved_bytes"]
    assert lora["budget_step"] == 2  # the first step whose cumulative FLOPs reach half a run's
    assert "constant), device cpu, `order='depth'`, `eval_frozen=True`" in docs.read_text()


def test_scoring_cost_smoke_run_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cost = _load(REPO / "benchmarks" / "scoring_cost.py")
    monkeypatch.setattr(cost, "WARM", 1)
    monkeypatch.setattr(cost, "PROFILED", 1)
    monkeypatch.setattr(cost, "TIMED", 2)
    results = tmp_path / "cost.json"
    assert cost.main(["--device", "cpu", "--threads", "1", "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["command"].endswith(f"--device cpu --threads 1 --results {results}")
    assert data["machine"]["device"] == "cpu"
    for name in ("plain", "scored"):
        assert data[name]["median_step_ms"] > 0
        assert data[name]["kernels_per_step"] is None  # kernels are counted on CUDA only
        assert data[name]["gpu_busy_ms_per_step"] is None
    assert data["plain"]["scoring_host_ms_per_step"] is None
    scored = data["scored"]
    # The batched CKA runs inside the hooks; both take time, and less than the whole step.
    assert 0 < scored["batched_cka_host_ms_per_step"] < scored["scoring_host_ms_per_step"]
    assert scored["scoring_host_ms_per_step"] < scored["median_step_ms"]
    # The clock is taken off the recorder again.
    hooks = cost.ScoreRecorder.__dict__
    assert all(not hasattr(hooks[name], "__wrapped__") for name in cost.HOOKS)
    assert not hasattr(cost.CKAAccumulator.__dict__["flush"], "__wrapped__")


before_freeze = _load(REPO / "benchmarks" / "before_freeze.py")


def _two_layer_net() -> Any:
    """A small two-layer network, the same weights on every call: unit "0" is its first layer."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def _batch() -> Any:
    import torch

    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1))


def test_learning_rate_factors_before_a_freeze() -> None:
    anneal, boost = before_freeze.anneal, before_freeze.boost
    # Annealing: full rate up to half the freeze step, then linearly down to the freeze.
    assert [anneal(t, 88) for t in (0, 44, 66, 87)] == [1.0, 1.0, 0.5, 1 / 44]
    assert anneal(88, 88) == anneal(100, 88) == 0.0
    assert [boost(t, 10) for t in (0, 9, 10, 20)] == [2.0, 2.0, 1.0, 1.0]


def test_shaped_learning_rate_matches_a_param_group_at_that_rate() -> None:
    """Scaling a unit's update after an AdamW step trains it as AdamW at the scaled rate would."""
    import torch

    model, x = _two_layer_net, _batch()
    shaped, grouped = model(), model()
    opt = torch.optim.AdamW(shaped.parameters(), lr=0.1, weight_decay=0.1)
    # Unit "0" (the first linear layer) at half the rate until its freeze after 2 steps.
    before_freeze.shape_learning_rate(opt, shaped, {"0": 2}, lambda t, f: 0.5 if t < f else 1.0)
    half = [{"params": grouped[0].parameters(), "lr": 0.05}, {"params": grouped[2].parameters()}]
    ref = torch.optim.AdamW(half, lr=0.1, weight_decay=0.1)
    for step in range(3):
        for net, optimizer in ((shaped, opt), (grouped, ref)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        if step == 1:
            ref.param_groups[0]["lr"] = 0.1  # the freeze step: the factor is 1 from here on
        for a, b in zip(shaped.parameters(), grouped.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model()[0].weight, shaped[0].weight)


def test_average_freezes_a_unit_with_the_mean_of_its_late_weights() -> None:
    """A unit freezing after step 4 holds, after that step, the mean of its weights after steps 3 and 4."""
    import torch

    model, x = _two_layer_net, _batch()
    averaged, plain = model(), model()
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (averaged, plain)]
    before_freeze.average_before_freeze(opts[0], averaged, {"0": 4})
    late = []
    for step in range(1, 5):
        for net, optimizer in zip((averaged, plain), opts, strict=True):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
        if step < 4:  # the unit's weights follow plain SGD until its freeze step
            torch.testing.assert_close(averaged[0].weight, plain[0].weight)
        if step >= 3:
            late.append(plain[0].weight.detach().clone())
    torch.testing.assert_close(averaged[0].weight, (late[0] + late[1]) / 2)
    assert not torch.allclose(averaged[0].weight, plain[0].weight)
    torch.testing.assert_close(averaged[2].weight, plain[2].weight)  # not a freezing unit


@pytest.mark.slow
def test_before_freeze_smoke_run_replays_the_default_freezes(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    results, docs = tmp_path / "before.json", tmp_path / "before.md"
    args = ["--tasks", "rotten_tomatoes", "--seeds", "0", "--threads", "1", "--limit", "128"]
    assert before_freeze.main([*args, "--results", str(results), "--docs", str(docs)]) == 0
    data = json.loads(results.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == set(before_freeze.VARIANTS) and all("plan" not in r for r in runs.values())
    safe = runs["safe"]
    assert sum(len(units) for _, units in safe["frozen"]) == 4  # round(0.67 * 6) lowest blocks
    for variant in before_freeze.SHAPED:  # the replays froze the same blocks at the same steps
        assert runs[variant]["frozen"] == safe["frozen"]
        assert runs[variant]["saved_bytes"] == safe["saved_bytes"]
    # No warm-up: the same four blocks froze after the first step.
    (step, units), *rest = runs["no-warmup"]["frozen"]
    assert step == 1 and not rest and units == [u for _, us in safe["frozen"] for u in us]
    assert runs["no-warmup"]["flops"] < safe["flops"] < runs["lora"]["flops"]
    assert data["schedule_shares"] == list(SCHEDULE_SHARES["depth"])  # the page says what the default was
    text = docs.read_text()
    assert data["command"] in text and all(f"| {v} | " in text for v in ("anneal", "average", "no-warmup"))
    assert "a warm-up of the first 10% of the run and a ramp to 60% of it in these runs" in text
