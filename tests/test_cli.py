"""The ``safefreeze`` console script: ``plan show`` on files, runs:/ URIs and run ids; errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from safefreeze import AdapterRecord, FreezeEvent, FreezePlan, SAFEConfig
from safefreeze.cli import main
from safefreeze.integrations.mlflow import log_plan


def _plan() -> FreezePlan:
    """Four hand-made adapters; two freeze at step 3, one at step 4, one never."""
    adapters = [
        AdapterRecord(
            f"layers.{i}", ((f"layers.{i}.lora_down.weight", (2, 8)), (f"layers.{i}.lora_up.weight", (8, 2)))
        )
        for i in range(4)
    ]
    normalized = {"layers.0": 0.45, "layers.1": 0.08, "layers.2": 0.2, "layers.3": 1.0}
    raw = {k: v * 0.05 for k, v in normalized.items()}

    def event(step: int, threshold: float, units: tuple[str, ...]) -> FreezeEvent:
        return FreezeEvent(
            step=step,
            units=units,
            adapters=units,
            threshold=threshold,
            raw_scores={u: raw[u] for u in units},
            normalized_scores={u: normalized[u] for u in units},
            params_freed=32 * len(units),
            state_bytes_freed=0,
        )

    return FreezePlan(
        config=SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5),
        adapters=adapters,
        events=[event(3, 0.4375, ("layers.1", "layers.2")), event(4, 0.5, ("layers.0",))],
        units={a.name: [a.name] for a in adapters},
        raw_scores=raw,
        normalized_scores=normalized,
        scored_at=2,
    )


def _expected(plan: FreezePlan, source: str) -> str:
    return f"""\
plan: {source} (schema version 1, fingerprint {plan.fingerprint[:12]})
config: warmup_steps=2 freeze_end_step=4 tau_target=0.5 normalization=max score_every=1 max_tokens=64 \
group_by=None seed=0 order=score
adapters: 4 in 4 freeze units; 3 frozen in 2 events
scores: final at step 2 (normalization 'max')

step  threshold    score  frozen  unit
   3     0.4375   0.0800       1  layers.1
                  0.2000       2  layers.2
   4     0.5000   0.4500       3  layers.0

not frozen (1 unit):
   -          -   1.0000       -  layers.3
"""


@pytest.fixture
def plan_file(tmp_path: Path) -> Path:
    return _plan().save(tmp_path / "plan.json")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_show_prints_the_timeline_table(plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "plan", "show", str(plan_file)) == (0, _expected(_plan(), str(plan_file)), "")


def test_plan_show_groups_missing_scores_and_unfinished_warmups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = [
        AdapterRecord(f"blocks.{b}.{s}", ((f"blocks.{b}.{s}.w", (2, 2)),)) for b in (0, 1) for s in "qv"
    ]
    units = {"0": ["blocks.0.q", "blocks.0.v"], "1": ["blocks.1.q", "blocks.1.v"]}
    config = SAFEConfig(warmup_steps=10, freeze_end_step=20, group_by=r"blocks\.(\d+)\..*")
    event = FreezeEvent(12, ("0",), ("blocks.0.q", "blocks.0.v"), 0.1, {"0": 3e-9}, {"0": 3e-7}, 8, 64)
    grouped = FreezePlan(
        config, adapters, [event], units, {"0": 3e-9, "1": math.nan}, {"0": 3e-7, "1": math.nan}, 10
    )
    path = grouped.save(tmp_path / "grouped.json")
    code, out, _ = _run(capsys, "plan", "show", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[2] == "adapters: 4 in 2 freeze units; 2 frozen in 1 event"
    assert lines[6] == "  12     0.1000  3.0e-07       2  0 (2 adapters)"  # tiny, not 0.0000
    assert lines[-1] == "   -          -      n/a       -  1 (2 adapters)"  # NaN: never frozen

    early = FreezePlan(config, adapters, units=units)  # saved during the warm-up
    path = early.save(tmp_path / "early.json")
    code, out, _ = _run(capsys, "plan", "show", str(path))
    assert code == 0
    assert "scores: not final yet (the warm-up has not ended)" in out
    assert "(no adapter frozen)" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            None,
            "no plan file '{path}'; give a plan JSON file, a runs:/<run_id>[/<path>] URI or an MLflow run id",
        ),
        (
            '{"schema": "safefreeze.plan", "ver',
            "plan file '{path}' is not valid JSON (truncated or corrupt?)",
        ),
        ('{"schema": "safefreeze.plan", "version": 99}', "plan file '{path}' has plan schema version 99"),
        (b"\x80\x04\x95pickle", "plan file '{path}' is not a JSON text (byte 0 is not UTF-8"),
    ],
    ids=["missing", "truncated", "other-version", "binary"],
)
def test_plan_show_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "plan.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    code, out, err = _run(capsys, "plan", "show", str(path))
    assert (code, out) == (2, "")
    assert err.startswith("safefreeze: error: " + message.format(path=path))
    assert err.count("\n") == 1 and "Traceback" not in err


def test_plan_show_on_a_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "plan", "show", str(tmp_path))
    assert code == 2 and err.startswith("safefreeze: error: [Errno 21] Is a directory")
    assert err.count("\n") == 1


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys)
    assert code == 2 and err.startswith("usage: safefreeze [-h] COMMAND ...")
    code, _, err = _run(capsys, "plan")
    assert code == 2 and err.startswith("usage: safefreeze plan [-h] COMMAND ...")
    code, _, err = _run(capsys, "plan", "show")
    assert code == 2 and "the following arguments are required: PLAN" in err
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "plan" in out


def test_plan_show_reads_mlflow_runs(
    plan_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    plan = _plan()
    run_id = mlflow.MlflowClient(uri).create_run("0").info.run_id
    log_plan(plan, run_id=run_id, tracking_uri=uri)
    capsys.readouterr()  # MLflow's own log lines from creating the store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for ref in (run_id, f"runs:/{run_id}", f"runs:/{run_id}/safefreeze/plan.json"):
        assert _run(capsys, "plan", "show", ref) == (0, _expected(plan, ref), "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert _run(capsys, "plan", "show", run_id, "--tracking-uri", uri) == (0, _expected(plan, run_id), "")

    code, out, err = _run(capsys, "plan", "show", "0" * 32, "--tracking-uri", uri)
    assert (code, out) == (2, "")
    assert err == f"safefreeze: error: MLflow at {uri} failed while reading run {'0' * 32}: " + (
        f"MlflowException: Run with id={'0' * 32} not found\n"
    )
    bare = mlflow.MlflowClient(uri).create_run("0").info.run_id
    capsys.readouterr()
    code, _, err = _run(capsys, "plan", "show", bare, "--tracking-uri", uri)
    assert code == 2 and f"run {bare} at {uri} carries no safefreeze plan" in err
    code, _, err = _run(capsys, "plan", "show", run_id)  # the environment's store does not exist
    assert code == 2 and "no MLflow store at sqlite:///elsewhere.db" in err
    assert not (tmp_path / "elsewhere.db").exists()


def _script() -> str:
    found = shutil.which("safefreeze", path=str(Path(sys.executable).parent))
    assert found is not None, "the safefreeze console script is not installed next to this Python"
    return found


def test_console_script(plan_file: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [_script(), "plan", "show", str(plan_file)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, _expected(_plan(), str(plan_file)), "")
    missing = tmp_path / "missing.json"
    done = subprocess.run(
        [_script(), "plan", "show", str(missing)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"safefreeze: error: no plan file '{missing}'; give a plan JSON file, " + (
        "a runs:/<run_id>[/<path>] URI or an MLflow run id\n"
    )


def test_showing_a_plan_file_loads_no_mlflow(plan_file: Path) -> None:
    code = (
        "import json, sys\n"
        "from safefreeze.cli import main\n"
        f"code = main(['plan', 'show', {str(plan_file)!r}])\n"
        "print(json.dumps([code, [m for m in ('mlflow', 'matplotlib') if m in sys.modules]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, []]
