"""The ``safefreeze`` console script: ``plan show`` on files, runs:/ URIs and run ids; errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest

from safefreeze import AdapterRecord, FreezeEvent, FreezePlan, SAFEConfig
from safefreeze.cli import _escape, main
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
        # The paper's rule: one unit per adapter, scores over the top one, frozen by score.
        config=SAFEConfig.paper(warmup_steps=2, freeze_end_step=4, tau_target=0.5),
        adapters=adapters,
        events=[event(3, 0.4375, ("layers.1", "layers.2")), event(4, 0.5, ("layers.0",))],
        units={a.name: [a.name] for a in adapters},
        raw_scores=raw,
        normalized_scores=normalized,
        scored_at=2,
    )


def _expected(plan: FreezePlan, source: str) -> str:
    return f"""\
plan: {source} (schema version 6, fingerprint {plan.fingerprint[:12]})
config: warmup_steps=2 freeze_end_step=4 tau_target=0.5 normalization=max score_every=None max_tokens=64 \
group_by=None seed=0 order=score units=adapter merge=False eval_frozen=False
adapters: 4 in 4 freeze units; 3 frozen in 2 events
scores: final at step 2 (normalization 'max', scored every warm-up step)

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


def _doc() -> dict[str, Any]:
    return _plan().to_dict()


def _text(damage: Callable[[dict[str, Any]], object], *, marker: str | None = None) -> str:
    """``_plan()``'s JSON after ``damage``; a ``"@"`` value is then spelled ``marker``."""
    doc = _doc()
    damage(doc)
    text = json.dumps(doc)
    return text if marker is None else text.replace('"@"', marker)


def _event(i: int, **fields: object) -> Callable[[dict[str, Any]], object]:
    return lambda d: d["events"][i].update(fields)


# Plans that must each give exit code 2 and one line on stderr: nothing may crash or hang.
HOSTILE: dict[str, str | bytes] = {
    "empty": "",
    "nan": _text(_event(0, threshold="@"), marker="NaN"),
    "infinity": _text(lambda d: d["scores"]["raw"].update({"layers.0": "@"}), marker="Infinity"),
    "minus-infinity": _text(_event(1, params_freed="@"), marker="-Infinity"),
    "float-overflow": _text(_event(1, threshold="@"), marker="1e999"),
    "int-5000-digits": _text(_event(0, step="@"), marker="9" * 5000),
    "int-above-int64": _text(_event(0, step=2**63)),
    "deep-list": "[" * 100_000 + "]" * 100_000,
    "deep-in-config": _text(lambda d: d.update(config="@"), marker="[" * 100_000 + "]" * 100_000),
    "duplicate-key": '{"schema": "safefreeze.plan", "schema": "safefreeze.plan"}',
    "step-fraction": _text(_event(0, step=1.5)),
    "step-bool": _text(_event(0, step=True)),
    "step-string": _text(_event(0, step="3")),
    "step-zero": _text(_event(0, step=0)),
    "two-events-one-step": _text(_event(1, step=3)),
    "out-of-order": _text(lambda d: d["events"].reverse()),
    "frozen-twice": _text(
        _event(1, units=["layers.1"], adapters=["layers.1"], raw_scores={}, normalized_scores={})
    ),
    "no-units": _text(_event(0, units=[], adapters=[], raw_scores={}, normalized_scores={})),
    "negative-score": _text(lambda d: d["scores"]["normalized"].update({"layers.3": -1.0})),
    "string-threshold": _text(_event(0, threshold="0.4")),
    "score-of-unknown-unit": _text(lambda d: d["scores"]["raw"].update(ghost=0.5)),
    "events-object": _text(lambda d: d.update(events={"0": 1})),
    "units-string": _text(_event(0, units="layers.1")),
    "unit-empty": _text(lambda d: d["units"].update({"layers.3": []})),
    "adapter-in-no-unit": _text(lambda d: d["units"].pop("layers.3")),
    "shape-negative": _text(lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, [-2, 8])),
    "name-int": _text(lambda d: d["model"]["adapters"][0].update(name=7)),
    "config-string": _text(lambda d: d.update(config="tau=0.5")),
    "config-value": _text(lambda d: d["config"].update(tau_target=2.0)),
    "version-new": _text(lambda d: d.update(version=7)),
    "version-bool": _text(lambda d: d.update(version=True)),
    "not-utf8": b"\xff\xfe{}",
    "surrogate-in-name": _text(lambda d: d["units"].update({"\ud800": ["ghost"]})),
    "escape-in-name": _text(lambda d: d["units"].update({"\x1b[2J\nlayers.9": ["ghost"]})),
}


@pytest.mark.parametrize("content", list(HOSTILE.values()), ids=list(HOSTILE))
def test_plan_show_refuses_every_hostile_plan_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes
) -> None:
    path = tmp_path / "plan.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    code, out, err = _run(capsys, "plan", "show", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"safefreeze: error: plan file '{path}' ")
    assert err.endswith("\n") and err.count("\n") == 1
    assert err.isascii() and err[:-1].isprintable()  # no escape sequence, no forged line


def test_plan_show_on_hostile_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "plan", "show", str(tmp_path))  # a directory
    assert code == 2 and err == f"safefreeze: error: [Errno 21] Is a directory: '{tmp_path}'\n"
    evil = tmp_path / "\x1b[2J\nplan.json"
    evil.write_text("{", encoding="utf-8")
    code, out, err = _run(capsys, "plan", "show", str(evil))
    assert (code, out) == (2, "")
    assert err.startswith(f"safefreeze: error: plan file '{tmp_path}/\\x1b[2J\\nplan.json' is not valid JSON")
    assert err.count("\n") == 1 and "\x1b" not in err


def test_plan_show_escapes_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["clear\x1b[2J", "row\n   9     0.9000   0.0100       1  forged", "bidi\u202eevil", "lone\ud800"]
    adapters = [AdapterRecord(n, ((f"{n}.w", (2, 2)),)) for n in names]
    event = FreezeEvent(3, (names[1],), (names[1],), 0.4375, {names[1]: 0.01}, {names[1]: 0.1}, 4, 0)
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5)
    plan = FreezePlan(config, adapters, [event], scored_at=2, normalized_scores={n: 0.5 for n in names})
    path = plan.save(tmp_path / "evil\tplan.json")
    code, out, err = _run(capsys, "plan", "show", str(path))
    assert (code, err) == (0, "")
    assert out.isascii() and all(line.isprintable() for line in out.splitlines())
    lines = out.splitlines()
    assert lines[0].startswith(f"plan: {tmp_path}/evil\\tplan.json (schema version 6, fingerprint")
    assert lines[6] == "   3     0.4375   0.1000       1  row\\n   9     0.9000   0.0100       1  forged"
    assert lines[-3:] == [  # the file's units are in key order
        "   -          -   0.5000       -  bidi\\u202eevil",
        "   -          -   0.5000       -  clear\\x1b[2J",
        "   -          -   0.5000       -  lone\\ud800",
    ]
    assert len(lines) == 12


def test_plan_show_names_the_version_a_plan_was_migrated_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc()
    doc["version"] = 1
    for field in ("order", "units", "merge"):  # version 1 plans were written before these fields
        del doc["config"][field]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = _run(capsys, "plan", "show", str(path))
    assert (code, err) == (0, "")
    first, *rest = _expected(_plan(), str(path)).splitlines()
    assert out.splitlines() == [
        first.replace("(schema version 6,", "(schema version 6, migrated from version 1,"),
        *rest,
    ]


def test_escape() -> None:
    assert _escape("layers.0") == "layers.0"
    assert _escape("a\nb\rc\td\x00e\x7f\x1b[2J") == "a\\nb\\rc\\td\\x00e\\x7f\\x1b[2J"
    assert _escape("\u202e\ud800\U000e0001é") == "\\u202e\\ud800\\U000e0001é"


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
