"""The demo and the benchmark on the real model and data, shortened for CI."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safefreeze.demo import DEMO_TASK, demo_config, run_demo
from safefreeze.demo.data import LABELS, load_drug_reviews
from safefreeze.demo.task import build_model, encode

REPO = Path(__file__).resolve().parents[1]
SMOKE = dataclasses.replace(DEMO_TASK, epochs=1, limit=48, max_length=32, batch_size=8)


def test_drug_reviews_load_from_the_installed_package() -> None:
    train, test = load_drug_reviews()
    assert (len(train.texts), len(test.texts)) == (600, 379)
    counts = [train.labels.count(i) for i in range(3)], [test.labels.count(i) for i in range(3)]
    assert LABELS == ("negative", "neutral", "positive")
    assert counts == ([161, 54, 385], [95, 36, 248])
    assert not any("&#039;" in t or t.startswith('"') for t in train.texts)


def test_encode_keeps_only_the_task_labels() -> None:
    train, _ = load_drug_reviews()
    task = dataclasses.replace(DEMO_TASK, labels=("negative", "positive"), max_length=16)
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


def test_demo_trains_tracks_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    from safefreeze.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = io.StringIO()
    result = run_demo(SMOKE, out=out)
    text = out.getvalue()
    steps = 48 // 8
    config = demo_config(steps)
    assert (config.warmup_steps, config.freeze_end_step) == (2, 6)
    assert len(result.step_flops) == steps
    assert result.plan is not None and result.plan.scored_at == 2
    for words in ("test accuracy", "adapters frozen", "training FLOPs (SAFE / LoRA)", "saved for backward"):
        assert words in text
    # The embedded MLflow store in the working directory holds the run, its plan and scores.
    assert (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient("sqlite:///mlflow.db")
    experiment = client.get_experiment_by_name("safefreeze-demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.accuracy)
    assert run.data.tags["safefreeze.plan"] == "true"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "safefreeze")}
    assert artifacts == {"safefreeze/plan.json", "safefreeze/freeze_timeline.png"}
    # It prints working commands for the run, with the tools of the environment it runs in.
    ui = re.search(r"(\S*mlflow) ui --backend-store-uri sqlite:///(\S+)", text)
    assert ui is not None and shutil.which(ui[1]) is not None
    assert Path(ui[2]).samefile(tmp_path / "mlflow.db")
    show = re.search(r"(\S*safefreeze) plan show (runs:/\S+ .*)", text)
    assert show is not None and shutil.which(show[1]) is not None
    assert show[2].startswith(f"runs:/{run.info.run_id} ")
    capsys.readouterr()
    assert main(["plan", "show", *show[2].split()]) == 0
    assert run.info.run_id in capsys.readouterr().out


def test_demo_command_without_mlflow(capsys: pytest.CaptureFixture[str]) -> None:
    from safefreeze.cli import main

    assert main(["demo", "--epochs", "1", "--limit", "32", "--order", "depth", "--no-mlflow"]) == 0
    captured = capsys.readouterr().out
    assert "SAFE on MiniLM-L6 / drug reviews" in captured
    assert "MLflow run" not in captured


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
    assert sorted(runs) == ["lora", "oracle", "position", "safe"]
    safe, oracle, position = runs["safe"]["plan"], runs["oracle"]["plan"], runs["position"]["plan"]
    # The oracle replays SAFE's freezes; the position baseline freezes as many, lowest first.
    assert [(e["step"], e["adapters"]) for e in oracle["events"]] == [
        (e["step"], e["adapters"]) for e in safe["events"]
    ]
    assert [(e["step"], len(e["adapters"])) for e in position["events"]] == [
        (e["step"], len(e["adapters"])) for e in safe["events"]
    ]
    order = [a["name"] for a in safe["model"]["adapters"]]
    frozen_low = [a for e in position["events"] for a in e["adapters"]]
    assert frozen_low == order[: len(frozen_low)]
    # Freezing never costs more than LoRA; the oracle differs from SAFE only by scoring.
    assert sum(runs["safe"]["step_flops"]) <= sum(runs["lora"]["step_flops"])
    assert sum(runs["oracle"]["step_flops"]) <= sum(runs["safe"]["step_flops"])
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "| target | bar | measured | met |" in page
    assert (tmp_path / "docs" / "images" / "bench_saved_bytes.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "docs" / "images" / "bench_timeline.png").read_bytes()[:4] == b"\x89PNG"
