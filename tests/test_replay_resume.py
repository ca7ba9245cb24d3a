"""Replaying a plan and resuming from a checkpoint, each in a fresh process, end bit for bit
where the uninterrupted recording run ends.

The runs are ``train_script.py`` (16 steps of ``peft_bert`` with dropout on, batches a pure
function of the step). They start in two waves of three processes, once per module: first
the uninterrupted recording and two interrupted runs, then the replay and two resumes. The
same run is also restarted from a checkpoint after every step in this process, on one
thread like the script, and must match the subprocesses bit for bit too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import train_script

from safefreeze import FreezePlan
from safefreeze.cka._torch import STAT_BATCHES, STAT_ROWS_USED, CKAAccumulator
from safefreeze.plan import SCHEMA_VERSION

SCRIPT = Path(train_script.__file__)
# Checkpoints: inside the warm-up (steps 0..3), and between the first and the last freeze.
WARMUP_STOP, FREEZING_STOP = 2, 6


@dataclasses.dataclass
class Runs:
    dir: Path
    plan: FreezePlan  # the uninterrupted recording
    weights: dict[str, Any]


def _start(tmp: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-W", "ignore", str(SCRIPT), *args]
    return subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*procs: subprocess.Popen[str]) -> None:
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{proc.args!r} failed:\n{out}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("runs")
    _wait(
        _start(tmp, "--record", "plan.json", "--out", "full.pt"),
        _start(tmp, "--save-ckpt", "warmup.pt", "--stop-at", str(WARMUP_STOP)),
        _start(tmp, "--save-ckpt", "freezing.pt", "--stop-at", str(FREEZING_STOP)),
    )
    _wait(
        _start(tmp, "--replay", "plan.json", "--plan-out", "replay_plan.json", "--out", "replay.pt"),
        _start(tmp, "--resume", "warmup.pt", "--record", "warmup_plan.json", "--out", "warmup_out.pt"),
        _start(tmp, "--resume", "freezing.pt", "--record", "freezing_plan.json", "--out", "freezing_out.pt"),
    )
    return Runs(tmp, FreezePlan.load(tmp / "plan.json"), torch.load(tmp / "full.pt", weights_only=True))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run in-process steps on one thread, as the script does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_weights(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert got["frozen"] == expected["frozen"]
    assert got["merged"] == expected["merged"]  # the same frozen adapters merged into their bases
    assert list(got["params"]) == list(expected["params"])
    differ = [n for n, p in expected["params"].items() if not torch.equal(p, got["params"][n])]
    assert differ == [], f"{len(differ)} parameter(s) differ, e.g. {differ[:3]}"


def test_recorded_run_froze_at_several_steps(runs: Runs) -> None:
    steps = [e.step for e in runs.plan.events]
    assert steps == sorted(set(steps)) and len(steps) >= 3, steps
    assert runs.plan.config.warmup_steps > WARMUP_STOP
    # The freezing-stage checkpoint falls after the first freeze and before the last.
    assert steps[0] <= FREEZING_STOP < steps[-1], steps
    names = [a.name for a in runs.plan.adapters]
    assert runs.weights["frozen"] == [a for a in names if a in runs.plan.adapter_freeze_steps]
    assert 0 < len(runs.weights["frozen"]) < len(names)
    # Every frozen adapter was merged into its base weight (PEFT LoRA, float32).
    assert runs.weights["merged"] == [n.partition(":")[0] for n in runs.weights["frozen"]]


# ---- replay -----------------------------------------------------------------------------------


def test_replay_in_fresh_process_is_bit_identical(runs: Runs) -> None:
    _assert_same_weights(runs.weights, torch.load(runs.dir / "replay.pt", weights_only=True))


def test_replay_plan_has_the_recorded_events(runs: Runs) -> None:
    replay = FreezePlan.load(runs.dir / "replay_plan.json")
    assert [(e.step, e.adapters) for e in replay.events] == [(e.step, e.adapters) for e in runs.plan.events]
    assert replay == runs.plan  # thresholds, scores and bytes freed too


@pytest.mark.usefixtures("one_thread")
def test_replay_registers_no_hook_and_does_no_scoring(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scoring(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a replay scored a minibatch")

    monkeypatch.setattr(CKAAccumulator, "update", no_scoring)
    model, optimizer = train_script.build(runs.plan)
    controller = optimizer.controller
    assert controller.replaying and not controller.scoring
    assert controller.replaying and not controller.scoring
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    # The first steps of the replay freeze what the recording froze, when it did.
    stop = runs.plan.events[1].step
    train_script.train(model, optimizer, 0, stop)
    assert optimizer.plan.events == runs.plan.events[:2]
    assert [n for n, m in model.named_modules() if m._forward_hooks] == []
    # A recording run on the same model does hook every site (so the check above can fail).
    monkeypatch.undo()
    model, optimizer = train_script.build(None)
    pairs = optimizer.controller.pairs
    carriers = {"", "base_model.model"}  # where the padding mask's hooks sit
    assert {n for n, m in model.named_modules() if m._forward_hooks} == {
        *carriers,
        *(p.site for p in pairs),
        *(p.base for p in pairs),
    }
    optimizer.controller.close()


# ---- resume -----------------------------------------------------------------------------------


def _checkpoint(runs: Runs, name: str) -> dict[str, Any]:
    return torch.load(runs.dir / name, weights_only=True)  # type: ignore[no-any-return]


def test_warmup_checkpoint_holds_scoring_state(runs: Runs) -> None:
    ckpt = _checkpoint(runs, "warmup.pt")
    assert set(ckpt) == {"model", "optimizer", "rng", "step"}
    assert ckpt["step"] == WARMUP_STOP
    safe = ckpt["optimizer"]["safe"]
    json.dumps(safe, allow_nan=False)  # SAFE's own state is plain JSON
    assert safe["version"] == SCHEMA_VERSION and safe["step"] == WARMUP_STOP
    stats = torch.tensor(safe["accumulator"]["stats"])  # (adapters, columns)
    # Every adapter scored on step 1 of the two (score_every=2), 16 tokens (max_tokens) drawn.
    assert stats[:, STAT_BATCHES].tolist() == [1.0] * 8
    assert stats[:, STAT_ROWS_USED].tolist() == [16.0] * 8
    assert safe["plan"]["events"] == [] and safe["plan"]["scores"]["scored_at"] is None


def test_freezing_checkpoint_holds_no_state_for_frozen_adapters(runs: Runs) -> None:
    ckpt = _checkpoint(runs, "freezing.pt")
    safe = ckpt["optimizer"]["safe"]
    json.dumps(safe, allow_nan=False)
    done = [e for e in runs.plan.events if e.step <= FREEZING_STOP]
    assert safe["step"] == FREEZING_STOP and safe["accumulator"] is None  # scores final
    assert FreezePlan.from_dict(safe["plan"]).unit_freeze_steps == {u: e.step for e in done for u in e.units}
    frozen = {a for e in done for a in e.adapters}
    trainable = [n for n in runs.weights["params"] if ".lora_" in n or "modules_to_save" in n]
    kept = [n for n in trainable if n.rsplit(".lora_", 1)[0] not in frozen]
    inner = ckpt["optimizer"]["inner"]
    assert list(inner["state"]) == kept
    assert [n for g in inner["param_groups"] for n in g["params"]] == kept


@pytest.mark.parametrize("stage", ["warmup", "freezing"])
def test_resume_in_fresh_process_is_bit_identical(runs: Runs, stage: str) -> None:
    _assert_same_weights(runs.weights, torch.load(runs.dir / f"{stage}_out.pt", weights_only=True))


@pytest.mark.parametrize("stage", ["warmup", "freezing"])
def test_resumed_plan_equals_uninterrupted_plan(runs: Runs, stage: str) -> None:
    resumed = FreezePlan.load(runs.dir / f"{stage}_plan.json")
    assert [(e.step, e.adapters) for e in resumed.events] == [(e.step, e.adapters) for e in runs.plan.events]
    # Equal scores too: a warm-up resume must continue the scoring generator where it stopped.
    assert resumed.raw_scores == runs.plan.raw_scores
    assert resumed == runs.plan


def _run_with_restarts(plan: FreezePlan | None, stops: list[int]) -> tuple[dict[str, Any], FreezePlan]:
    """Train in this process, rebuilding everything from a checkpoint after each of ``stops``."""
    model, optimizer = train_script.build(plan)
    torch.manual_seed(1)
    start = 0
    for stop in stops:
        train_script.train(model, optimizer, start, stop)
        buffer = io.BytesIO()
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
            buffer,
        )
        optimizer.controller.close()
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        model, optimizer = train_script.build(plan)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        # Resumed onto an unscored warm-up step, the scoring hooks are off the model.
        controller = optimizer.controller
        assert controller.scoring_now == (controller.scoring and stop % controller.config.score_interval == 0)
        start = stop
    train_script.train(model, optimizer, start, train_script.STEPS)
    params = {name: p.detach() for name, p in model.named_parameters()}
    return {
        "params": params,
        "frozen": optimizer.frozen_adapters,
        "merged": optimizer.controller.merged_sites,
    }, optimizer.plan


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("replay", [False, True], ids=["record", "replay"])
def test_restart_after_every_step_is_bit_identical(runs: Runs, replay: bool) -> None:
    """Rebuilt from a checkpoint after each of the 15 steps, in this process, on one thread."""
    weights, plan = _run_with_restarts(runs.plan if replay else None, list(range(1, train_script.STEPS)))
    _assert_same_weights(runs.weights, weights)
    assert plan == runs.plan
