"""The demo and the benchmark on the real model and data, shortened for CI."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from safefreeze import SAFEConfig
from safefreeze.demo import DEMO_TASK, DemoResult, majority_baseline, summary
from safefreeze.demo.data import LABELS, load_drug_reviews
from safefreeze.demo.task import (
    Output,
    RunResult,
    TaskConfig,
    build_model,
    check_same_run,
    encode,
    evaluate,
)

REPO = Path(__file__).resolve().parents[1]
# The demo's task cut to 8 steps of 8 snippets of 16 tokens, tested on 64 snippets.
SMOKE = dataclasses.replace(DEMO_TASK, train_size=None, limit=64, max_length=16, batch_size=8)
# A seed whose two-step warm-up lets the lowest blocks freeze in SMOKE (most seeds freeze none).
SMOKE_SEED = 1


def test_drug_reviews_load_from_the_installed_package() -> None:
    train, test = load_drug_reviews()
    assert (len(train.texts), len(test.texts)) == (600, 379)
    counts = [train.labels.count(i) for i in range(3)], [test.labels.count(i) for i in range(3)]
    assert LABELS == ("negative", "neutral", "positive")
    assert counts == ([161, 54, 385], [95, 36, 248])
    assert not any("&#039;" in t or t.startswith('"') for t in train.texts)


def test_encode_keeps_only_the_task_labels() -> None:
    train, _ = load_drug_reviews()
    task = TaskConfig(labels=("negative", "positive"), max_length=16)
    data = encode(train, task)
    assert data["input_ids"].shape == (546, 16)
    assert data["labels"].bincount().tolist() == [161, 385]


def test_the_model_is_pretrained_minilm_with_lora_on_query_and_value() -> None:
    from safefreeze import find_adapter_pairs

    model = build_model(SMOKE, seed=0)
    pairs = find_adapter_pairs(model)
    assert len(pairs) == 12  # 6 layers x (query, value)
    encoder = model.encoder.get_base_model()
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384
    # Pretrained, not random: the word embeddings of the checkpoint are loaded.
    from safetensors.torch import load_file

    from safefreeze.demo.task import model_path

    weights = load_file(f"{model_path()}/model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    assert torch.equal(encoder.embeddings.word_embeddings.weight, weights[key])


def test_the_overhead_measurement_scores_every_step_whatever_the_rule_scores() -> None:
    from safefreeze.cka._torch import STAT_BATCHES
    from safefreeze.demo.task import always_scoring

    # The default rule scores every 5th of 34 warm-up steps; the measurement must not.
    config = SAFEConfig.for_run(337)
    assert (config.warmup_steps, config.score_interval) == (34, 5)
    train, _ = load_drug_reviews()
    data = encode(train, SMOKE)
    batch = {k: v[: SMOKE.batch_size] for k, v in data.items()}
    model = build_model(SMOKE, seed=0)
    model.train()
    optimizer = always_scoring(model, config, lr=1e-3)
    accumulator = optimizer.controller._accumulator
    assert accumulator is not None and optimizer.controller.config.score_interval == 1
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert accumulator.stats[:, STAT_BATCHES].tolist() == [3.0] * 12
    assert optimizer.controller.scoring
    optimizer.close()


def test_runs_trained_together_end_bit_identical_to_runs_trained_alone() -> None:
    from safefreeze.demo.task import Training, train_together

    train_split, test_split = SMOKE.load()
    train_data, test_data = encode(train_split, SMOKE), encode(test_split, SMOKE)
    # Dropout draws on every step of every run: without each run's own random state, taking
    # turns would change what each one draws.
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5, order="depth")

    def runs() -> list[Training]:
        return [
            Training("lora", SMOKE, train_data, test_data, seed=SMOKE_SEED),
            Training("safe", SMOKE, train_data, test_data, seed=SMOKE_SEED, config=config),
        ]

    alone = runs()
    for run in alone:
        while not run.done:
            run.step()
    alone_results = [run.result() for run in alone]
    together = runs()
    order: list[str] = []
    together_results = train_together(together, lambda run, loss: order.append(run.variant))
    # Step i of both before step i + 1 of either, the first one alternating.
    assert order == ["lora", "safe", "safe", "lora"] * 4
    for a, b, ra, rb in zip(alone, together, alone_results, together_results, strict=True):
        first, second = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert (ra.accuracy, ra.step_flops, ra.step_saved_bytes) == (
            rb.accuracy,
            rb.step_flops,
            rb.step_saved_bytes,
        )
        assert len(rb.step_times_s) == 8
    assert alone_results[1].plan is not None and together_results[1].plan is not None
    assert alone_results[1].plan.to_dict() == together_results[1].plan.to_dict()
    assert alone_results[1].plan.events, "the safe run should freeze something"
    # The lora run still trains: its weights moved from the fresh model's.
    fresh = build_model(SMOKE, SMOKE_SEED).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in alone[0].model.state_dict().items())
    short = Training("short", dataclasses.replace(SMOKE, batch_size=16), train_data, test_data, seed=0)
    with pytest.raises(ValueError, match="the same number of steps"):
        train_together([together[0], short])


def test_a_run_that_differs_among_others_is_named_with_what_differs() -> None:
    from safefreeze.demo.task import RunResult, check_same_run

    alone = RunResult("safe", 3, 0.8, 0.7, [10, 5], [100, 20], [8, 8], 1.0)
    check_same_run(alone, dataclasses.replace(alone, wall_time_s=2.0))  # time may differ
    with pytest.raises(
        RuntimeError, match=r"seed 3: safe trained among other runs .* in \['accuracy', 'step_flops'\]"
    ):
        check_same_run(alone, dataclasses.replace(alone, accuracy=0.79, step_flops=[10, 10]))


def test_the_demo_task_is_rotten_tomatoes_sized_for_minutes() -> None:
    assert (DEMO_TASK.dataset, DEMO_TASK.labels) == ("rotten_tomatoes", ("negative", "positive"))
    assert (DEMO_TASK.epochs, DEMO_TASK.batch_size, DEMO_TASK.max_length) == (1, 32, 48)
    assert (DEMO_TASK.lr, DEMO_TASK.schedule, DEMO_TASK.train_size) == (1e-3, "linear", 4800)
    assert DEMO_TASK.steps(4800) == 150


def test_majority_baseline_scores_as_a_constant_model_does() -> None:
    train, test = DEMO_TASK.load()
    task = dataclasses.replace(DEMO_TASK, max_length=4)
    train_labels, test_data = encode(train, task)["labels"], encode(test, task)
    assert train_labels.bincount().argmax() == 1  # fresh snippets are the majority

    class Constant(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
            return Output(logits=torch.tensor([0.0, 1.0]).expand(input_ids.shape[0], 2), loss=None)

    assert majority_baseline(train_labels, test_data["labels"], 2) == evaluate(Constant(), test_data)
    assert majority_baseline(train_labels, test_data["labels"], 2)[0] == 1137 / 2000
    with pytest.raises(ValueError, match="needs labels on both sides, got 0 training and 3 test labels"):
        majority_baseline(torch.tensor([], dtype=torch.long), torch.tensor([0, 1, 1]), 2)


@dataclasses.dataclass
class Smoke:
    """A tiny demo run in a fresh process, as a user's shell would see it."""

    result: DemoResult
    out: str
    err: str
    cwd: Path
    # Each variant trained on its own after the demo, in the demo's process.
    alone: dict[str, RunResult]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    cwd = tmp_path_factory.mktemp("demo")
    code = (
        "import pickle\n"
        "from safefreeze.demo import run_demo\n"
        "from safefreeze.demo.task import TaskConfig, encode, train\n"
        f"task = {SMOKE!r}\n"
        f"result = run_demo(task, seed={SMOKE_SEED})\n"
        # Each run again on its own, in the same process (same threads, so the same floats),
        # without the weight-loading bars that would land in the demo's stderr.
        "from transformers.utils import logging\n"
        "logging.disable_progress_bar()\n"
        "data = [encode(split, task) for split in task.load()]\n"
        "alone = {\n"
        f"    variant: train(variant, task, *data, seed={SMOKE_SEED}, config=config)\n"
        "    for variant, config in (('lora', None), ('safe', result.config))\n"
        "}\n"
        "with open('result.pkl', 'wb') as f:\n"
        "    pickle.dump((result, alone), f)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Bytes, not text: text mode would turn the bars' carriage returns into newlines.
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, timeout=600, check=False
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    result, alone = pickle.loads((cwd / "result.pkl").read_bytes())
    return Smoke(result, out, err, cwd, alone)


def _table(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Was it worth it?"))
    assert re.split(r"\s{2,}", lines[start + 1].strip()) == ["majority", "LoRA", "SAFE", "SAFE/LoRA"]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = cells
    return rows


# Printed units -> their scale.
UNITS = {"": 1, "s": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
UNITS |= {f"{p}FLOP": 10**e for p, e in (("", 0), ("M", 6), ("G", 9), ("T", 12), ("P", 15))}


def _matches(cell: str, value: float) -> bool:
    """Whether ``cell`` is ``value`` as printed: right to the last digit shown."""
    number, _, unit = cell.partition(" ")
    decimals = len(number.partition(".")[2])
    scale = float(UNITS[unit])
    return abs(float(number) * scale - value) <= 0.5 * 10.0**-decimals * scale * 1.0001


def test_the_table_shows_both_runs_and_their_ratios(smoke: Smoke) -> None:
    result = smoke.result
    lora, safe = result.lora, result.safe
    steps = SMOKE.steps(64)
    assert len(lora.step_flops) == len(safe.step_flops) == steps == 8
    assert result.config == SAFEConfig.for_run(8)
    assert (result.train_snippets, result.train_split, result.test_snippets) == (64, 10808, 64)
    rows = _table(smoke.out)
    figures = {
        "test accuracy": (lora.accuracy, safe.accuracy, result.majority[0]),
        "test macro-F1": (lora.macro_f1, safe.macro_f1, result.majority[1]),
        "training FLOPs": (sum(lora.step_flops), sum(safe.step_flops), None),
        "saved for backward, mean per step": (
            sum(lora.step_saved_bytes) / steps,
            sum(safe.step_saved_bytes) / steps,
            None,
        ),
        "optimizer state, final": (lora.step_state_bytes[-1], safe.step_state_bytes[-1], None),
        "training wall time": (sum(lora.step_times_s), sum(safe.step_times_s), None),
    }
    assert list(rows) == list(figures)
    for name, (a, b, base) in figures.items():
        majority, cell_a, cell_b, ratio = rows[name]
        assert _matches(cell_a, a) and _matches(cell_b, b), (name, rows[name])
        assert _matches(ratio, b / a), (name, ratio)
        assert majority == "-" if base is None else _matches(majority, base)
    # SAFE saved something real: smaller optimizer state, fewer FLOPs and saved bytes.
    assert safe.step_state_bytes[-1] < lora.step_state_bytes[-1]
    assert sum(safe.step_flops) < sum(lora.step_flops)
    assert sum(safe.step_saved_bytes) < sum(lora.step_saved_bytes)


def test_it_lists_what_froze_when_what_still_trains_and_the_merge(smoke: Smoke) -> None:
    result, out = smoke.result, smoke.out
    plan = result.safe.plan
    assert plan is not None and plan.events, "SMOKE_SEED no longer freezes a block: pick one that does"
    blocks = [f"layer.{i}" for i in range(6)]
    assert list(plan.units) == [f"encoder.base_model.model.encoder.{b}" for b in blocks]
    frozen = plan.unit_freeze_steps
    frozen_adapters = sorted(a for u in frozen for a in plan.units[u])
    assert sorted(result.merged) == frozen_adapters  # every frozen adapter was merged
    assert (
        f"SAFE froze {len(frozen)} of 6 blocks and merged their {len(frozen_adapters)} LoRA adapters" in out
    )
    for event in plan.events:
        names = ", ".join(
            f"layer.{u.rsplit('.', 1)[1]} ({event.normalized_scores[u]:.2f})" for u in event.units
        )
        assert f"  step {event.step}  {names}\n" in out
    training = [b for u, b in zip(plan.units, blocks, strict=True) if u not in frozen]
    assert f"  still training: {', '.join(training)} and the classifier head\n" in out
    # The default: the frozen blocks are the lowest ones.
    assert [b for u, b in zip(plan.units, blocks, strict=True) if u in frozen] == blocks[: len(frozen)]


def test_it_says_why_a_saving_is_small(smoke: Smoke) -> None:
    result = smoke.result
    plan = result.safe.plan
    assert plan is not None
    lowest = next(u for u in plan.units if u not in plan.unit_freeze_steps)
    block = f"layer.{lowest.rsplit('.', 1)[1]}"
    why = [line for line in smoke.out.splitlines() if line.startswith("why: ")]
    small = max(
        sum(result.safe.step_flops) / sum(result.lora.step_flops),
        sum(result.safe.step_saved_bytes) / sum(result.lora.step_saved_bytes),
    )
    assert len(why) == (small > 0.5)
    text = summary(result)
    assert text in smoke.out
    first = min(plan.unit_freeze_steps.values())
    line = (
        f"why: backprop still reaches {block}, the lowest trainable block: activations and backward "
        f"work are saved only below it, and only from step {first} of 8 on"
    )
    score, threshold = plan.normalized_scores[lowest], plan.threshold_at(8)
    if result.config.order == "prefix" and score >= threshold:  # the prefix stopped below a high scorer
        line += f"; {block} scored {score:.2f}, not below the threshold {threshold:.2f}, "
        line += "so the prefix stopped there"
    # Large savings need no explanation; a run where nothing froze says so.
    cheap = dataclasses.replace(
        result.safe,
        step_flops=[f // 4 for f in result.lora.step_flops],
        step_saved_bytes=[b // 4 for b in result.lora.step_saved_bytes],
    )
    assert "why:" not in summary(dataclasses.replace(result, safe=cheap))
    idle = dataclasses.replace(result.safe, plan=dataclasses.replace(plan, events=[]))
    text = summary(
        dataclasses.replace(result, safe=dataclasses.replace(idle, step_flops=result.lora.step_flops))
    )
    assert "SAFE froze none of the 6 blocks.\n" in text
    assert (
        "still training: layer.0, layer.1, layer.2, layer.3, layer.4, layer.5 and the classifier head" in text
    )
    assert "why: nothing froze, so SAFE cost what LoRA costs, plus scoring in the warm-up" in text
    if small > 0.5:
        assert why == [line]
        # Under the prefix rule the line says whether the lowest trainable block's score stopped
        # the prefix; under the default rule, which freezes whatever the blocks score, never.
        prefix = dataclasses.replace(result.config, order="prefix")
        for lowest_score, stopped in ((0.99, True), (0.01, False)):
            scores = {**plan.normalized_scores, lowest: lowest_score}
            high = dataclasses.replace(plan, normalized_scores=scores)
            said = summary(
                dataclasses.replace(result, config=prefix, safe=dataclasses.replace(result.safe, plan=high))
            )
            clause = (
                f"; {block} scored {lowest_score:.2f}, not below the threshold {threshold:.2f}, so the prefix"
            )
            assert (clause in said) == stopped
            default = summary(dataclasses.replace(result, safe=dataclasses.replace(result.safe, plan=high)))
            assert "so the prefix stopped there" not in default


def test_both_runs_are_in_one_mlflow_experiment_with_their_metrics(smoke: Smoke) -> None:
    import mlflow

    result = smoke.result
    client = mlflow.MlflowClient(f"sqlite:///{smoke.cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("safefreeze-demo")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["minilm-rotten_tomatoes-lora", "minilm-rotten_tomatoes-safe"]
    losses = {}
    for variant, run in (("lora", result.lora), ("safe", result.safe)):
        logged = runs[f"minilm-rotten_tomatoes-{variant}"]
        assert logged.info.run_id == result.run_ids[variant]
        assert logged.info.status == "FINISHED"
        history = client.get_metric_history(logged.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, 9))
        losses[variant] = [m.value for m in history]
        metrics = {k: v for k, v in logged.data.metrics.items() if not k.startswith("safefreeze/")}
        assert metrics == {
            "loss": losses[variant][-1],
            "test_accuracy": run.accuracy,
            "test_macro_f1": run.macro_f1,
            "training_flops": float(run.total_flops),
            "saved_bytes_mean": run.mean_saved_bytes,
            "optimizer_state_bytes": float(run.step_state_bytes[-1]),
            "wall_time_s": run.wall_time_s,
        }
        assert logged.data.params["task.dataset"] == "rotten_tomatoes"
        assert logged.data.params["variant"] == variant
    # Same seed, weights and first batch: the runs part only once SAFE freezes.
    assert losses["lora"][0] == losses["safe"][0]
    safe = runs["minilm-rotten_tomatoes-safe"]
    assert safe.data.tags["safefreeze.plan"] == "true"
    assert safe.data.params["safefreeze.order"] == "depth"
    assert safe.data.metrics["safefreeze/frozen_adapters"] == len(result.merged)
    artifacts = {a.path for a in client.list_artifacts(safe.info.run_id, "safefreeze")}
    assert artifacts == {"safefreeze/plan.json", "safefreeze/freeze_timeline.png"}
    assert "safefreeze.plan" not in runs["minilm-rotten_tomatoes-lora"].data.tags


def test_the_printed_commands_open_the_runs(smoke: Smoke) -> None:
    ui = re.search(r"browse both runs: +(\S*mlflow) ui --backend-store-uri sqlite:///(\S+)\n", smoke.out)
    assert ui is not None and shutil.which(ui[1]) is not None
    assert Path(ui[2]).samefile(smoke.cwd / "mlflow.db")
    show = re.search(
        r"SAFE's freeze plan: +(\S*safefreeze plan show runs:/(\w+) --tracking-uri \S+)\n", smoke.out
    )
    assert show is not None and show[2] == smoke.result.run_ids["safe"]
    done = subprocess.run(
        shlex.split(show[1]), cwd=smoke.cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"plan: runs:/{show[2]} ")
    assert "encoder.base_model.model.encoder.layer.0" in done.stdout


def test_the_output_is_one_bar_for_both_runs_and_no_library_noise(smoke: Smoke) -> None:
    import mlflow

    # The bar redraws itself with \r and ends with one \n; nested bars would move the cursor.
    assert "\x1b[" not in smoke.err
    assert smoke.err.count("\n") == 1
    bar = smoke.err.split("\n")[0]
    assert all(p.startswith("LoRA and SAFE: ") for p in bar.split("\r") if p)
    frozen = len(smoke.result.safe.plan.unit_freeze_steps)  # type: ignore[union-attr]
    shown = re.search(
        rf"\| 8/8 \[[^]]*, LoRA loss (\d\.\d{{3}}), SAFE loss (\d\.\d{{3}}), frozen {frozen}/6 blocks\]$", bar
    )
    assert shown is not None, bar
    # Each loss is its own run's last one, as logged.
    client = mlflow.MlflowClient(f"sqlite:///{smoke.cwd / 'mlflow.db'}")
    for variant, cell in (("lora", shown[1]), ("safe", shown[2])):
        last = client.get_metric_history(smoke.result.run_ids[variant], "loss")[-1]
        assert (last.step, f"{last.value:.3f}") == (8, cell)
    assert "INFO" not in smoke.out and "Loading weights" not in smoke.out


def test_the_demo_runs_end_as_they_would_alone(smoke: Smoke) -> None:
    # The demo trains LoRA and SAFE step by step in turn; each ends as a run of its own.
    assert sorted(smoke.alone) == ["lora", "safe"]
    for variant, alone in smoke.alone.items():
        check_same_run(alone, getattr(smoke.result, variant))
    header = "  test: 64 snippets; both runs alike in seed, data order and settings, trained in turn"
    assert f"{header} (a step each)\n" in smoke.out


def test_demo_command_without_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import safefreeze.demo
    from safefreeze.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(safefreeze.demo, "DEMO_TASK", SMOKE)  # what the command starts from
    assert main(["demo", "--limit", "16", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "  training: the first 16 of 10,808 snippets, 1 epoch = 2 steps of 8, 16 tokens" in out
    assert "Was it worth it? Rotten Tomatoes, 16 test snippets" in out
    assert "MLflow" not in out and not (tmp_path / "mlflow.db").exists()
    # Too few snippets for one batch, and a bad count, are one-line errors.
    assert main(["demo", "--limit", "4", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "safefreeze: error: the demo needs at least one batch: 4 training snippets, batch_size=8; "
        "raise train_size or limit\n"
    )
    assert main(["demo", "--train-size", "0"]) == 2
    assert "argument --train-size: expected a positive integer, got 0" in capsys.readouterr().err


def test_demo_without_the_hf_extra_names_it(tmp_path: Path) -> None:
    # PEFT made unimportable, as on a machine without the extra.
    code = (
        "import sys\n"
        "sys.modules['peft'] = None\n"
        "from safefreeze.cli import main\n"
        "sys.exit(main(['demo', '--epochs', '1', '--limit', '16', '--no-mlflow']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("safefreeze: error: 'peft' is required")
    assert "pip install 'safefreeze[hf]'" in done.stderr
    assert done.stdout == ""  # it stops before any work


def test_benchmark_smoke(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    args = [
        "--seeds", "0", "--epochs", "2", "--limit", "64", "--max-length", "32",
        "--overhead-pairs", "2", "--results", str(results), "--docs", str(tmp_path / "docs"),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "drugreview.py"), *args],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(results.read_text())
    runs = {r["variant"]: r for r in data["runs"]}
    assert sorted(runs) == ["lora", "oracle", "safe", "score-prefix"]
    safe, oracle, by_score = runs["safe"]["plan"], runs["oracle"]["plan"], runs["score-prefix"]["plan"]
    # The oracle replays SAFE's freezes.
    assert [(e["step"], e["adapters"]) for e in oracle["events"]] == [
        (e["step"], e["adapters"]) for e in safe["events"]
    ]
    # SAFE freezes as many blocks as the threshold allows, lowest first (4 of 6); the prefix
    # the scores pick stops earlier where a block scores high.
    order = [a["name"] for a in safe["model"]["adapters"]]
    frozen_low = [a for e in safe["events"] for a in e["adapters"]]
    frozen_by_score = [a for e in by_score["events"] for a in e["adapters"]]
    assert frozen_low == order[:8]
    assert frozen_by_score == order[: len(frozen_by_score)] and len(frozen_by_score) <= len(frozen_low)
    assert data["config"] == SAFEConfig.for_run(2 * data["steps_per_epoch"]).to_dict()
    # LoRA is also evaluated where its FLOPs reach SAFE's total, if they do before its end.
    lora_flops = runs["lora"]["step_flops"]
    budget = sum(runs["safe"]["step_flops"])
    reached = [i + 1 for i in range(len(lora_flops)) if sum(lora_flops[: i + 1]) >= budget]
    assert runs["lora"]["budget_step"] == (reached[0] if reached else None)
    # After the warm-up no step costs more than LoRA's; the oracle differs from SAFE only by
    # the warm-up's scoring.
    warmup = data["config"]["warmup_steps"]
    steps = zip(runs["safe"]["step_flops"][warmup:], runs["lora"]["step_flops"][warmup:], strict=True)
    assert all(s <= lora for s, lora in steps)
    assert sum(runs["oracle"]["step_flops"]) < sum(runs["safe"]["step_flops"])
    assert runs["oracle"]["step_flops"][warmup:] == runs["safe"]["step_flops"][warmup:]
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| target | bar | measured | met |" in page
    assert "| lora_budget | " in page and "lora_budget is LoRA stopped at SAFE's FLOPs: step " in page
    # The variants took turns step by step; SAFE's run among them matched its run alone.
    assert data["together"] is True and "trained step by step in turn in one process" in page
    assert (tmp_path / "docs" / "images" / "bench_saved_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "docs" / "images" / "bench_timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_that_fail_are_ended_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    import safefreeze.demo

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory, say")

    # An absolute store: MLflow caches stores by URI, so a relative one may be another test's.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(safefreeze.demo, "train_together", broken)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        safefreeze.demo.run_demo(dataclasses.replace(SMOKE, limit=16), out=io.StringIO())
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("safefreeze-demo")
    assert experiment is not None
    runs = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert runs == {"minilm-rotten_tomatoes-lora": "FAILED", "minilm-rotten_tomatoes-safe": "FAILED"}


def test_every_run_created_is_ended_when_mlflow_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    import safefreeze.demo

    created = mlflow.MlflowClient.create_run

    def create_run(self: mlflow.MlflowClient, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("run_name", "").endswith("-safe"):  # the store gives out after the first run
            raise RuntimeError("database is locked, say")
        return created(self, *args, **kwargs)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run)
    out = io.StringIO()
    with pytest.warns(RuntimeWarning, match=r"while starting the safe run \(RuntimeError: database is"):
        result = safefreeze.demo.run_demo(dataclasses.replace(SMOKE, limit=16), out=out)
    # The demo went on untracked, and the LoRA run it had created is not left RUNNING.
    assert result.run_ids == {"lora": result.run_ids["lora"]}
    assert "Was it worth it?" in out.getvalue() and "MLflow experiment" not in out.getvalue()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("safefreeze-demo")
    assert experiment is not None
    runs = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert runs == {"minilm-rotten_tomatoes-lora": "FAILED"}
