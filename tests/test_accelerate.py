"""SAFE through Hugging Face Accelerate: one process, and 2 CPU processes with gloo.

``SAFEOptimizer`` goes through ``accelerator.prepare`` like any optimizer. Each run is a
fresh Python process (``python test_accelerate.py MODE OUT``); the 2-process run starts its
ranks with ``accelerate.notebook_launcher``. Each process trains without interruption, saving
``accelerator.save_state`` at ``CKPT_STEP``, then builds everything afresh and resumes from
that folder with ``load_state``; the tests compare the files they wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ddp import assert_identical, info, params  # the same result files

HERE = Path(__file__).resolve().parent
STEPS = 10
CKPT_STEP = 6  # after the warm-up and the first freeze
BATCH, TOKENS, VOCAB, LABELS = 4, 12, 100, 3  # per process
LAUNCH_TIMEOUT = 150.0  # seconds, for all the runs together


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """The batch of optimizer step ``step`` on process ``rank``: a pure function of both."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    input_ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)  # (B, T)
    lengths = torch.randint(TOKENS // 2, TOKENS + 1, (BATCH,), generator=gen)  # (B,)
    attention_mask = (torch.arange(TOKENS) < lengths[:, None]).long()  # (B, T)
    labels = torch.randint(0, LABELS, (BATCH,), generator=gen)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run(root: str) -> None:
    """Train to STEPS into ``root/run``, saving state at CKPT_STEP; resume that into ``root/resumed``."""
    torch.set_num_threads(1)
    train(f"{root}/run", "")
    train(f"{root}/resumed", f"{root}/run/state")


def train(out: str, resume: str) -> None:
    """One process's run: train to STEPS, saving state at CKPT_STEP, or resume from ``resume``."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from models import peft_bert

    from safefreeze import SAFEConfig, SAFEOptimizer

    Path(out).mkdir(parents=True, exist_ok=True)
    # DDP must be told that frozen adapters stop producing gradients (see docs/distributed.md).
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    rank = accelerator.process_index
    model = peft_bert(layers=4, seed=0, lora_dropout=0.1)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    config = SAFEConfig(warmup_steps=3, freeze_end_step=6, tau_target=0.6, units="adapter", order="depth")
    optimizer = SAFEOptimizer(inner, model, config)
    ddp, prepared = accelerator.prepare(model, optimizer)
    model.train()
    start = 0
    if resume:
        accelerator.load_state(resume)
        start = optimizer.controller.step  # and the RNG of the dropout masks, as saved
    for step in range(start + 1, STEPS + 1):
        loss = ddp(**batch(step, rank)).loss
        accelerator.backward(loss)
        prepared.step()
        prepared.zero_grad()
        if step == CKPT_STEP and not resume:
            accelerator.save_state(f"{out}/state")
    weights = {n: p.detach().clone() for n, p in accelerator.unwrap_model(ddp).named_parameters()}
    torch.save(weights, f"{out}/params{rank}.pt")
    optimizer.plan.save(f"{out}/plan{rank}.json")
    info = {
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "start": start,
        "merged": optimizer.controller.merged_sites,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }
    Path(f"{out}/info{rank}.json").write_text(json.dumps(info))
    optimizer.close()
    accelerator.wait_for_everyone()


def main(mode: str, root: str) -> None:
    sys.path.insert(0, str(HERE))
    if mode == "single":
        run(root)
        return
    from accelerate import notebook_launcher

    with socket.socket() as s:  # a free port, so concurrent test runs never collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["ACCELERATE_USE_CPU"] = "true"
    notebook_launcher(run, args=(root,), num_processes=2, use_port=str(port))


# ---- the tests ----------------------------------------------------------------------------


def launch(*runs: tuple[str, Path]) -> None:
    """Start each (mode, root) run as a fresh process; wait for all, or kill all at the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs, logs = [], []
    for mode, root in runs:
        root.mkdir(parents=True, exist_ok=True)
        logs.append(root / "run.log")  # a file, never a pipe that could fill and block the run
        with logs[-1].open("w") as sink:
            cmd = [sys.executable, __file__, mode, str(root)]
            # A session of its own, so a timeout kills the launcher's ranks with it.
            procs.append(
                subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(f"accelerate runs {[r[0] for r in runs]} did not finish within {LAUNCH_TIMEOUT} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for (mode, _), proc, log in zip(runs, procs, logs, strict=True):
        assert proc.returncode == 0, f"the {mode} accelerate run failed:\n{log.read_text()[-4000:]}"


def plan_doc(out: Path, rank: int = 0) -> Any:
    return json.loads((out / f"plan{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted runs (1 and 2 processes), then the runs resumed from their saved states."""
    root = tmp_path_factory.mktemp("accelerate")
    launch(("single", root / "single"), ("multi", root / "multi"))
    return root


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_training_freezes_and_merges_adapters(runs: Path, mode: str) -> None:
    out = runs / mode / "run"
    world = 1 if mode == "single" else 2
    plan = plan_doc(out)
    frozen = {a for e in plan["events"] for a in e["adapters"]}
    assert 0 < len(frozen) < 8  # 4 layers x (query, value)
    for rank in range(world):
        seen = info(out, rank)
        assert seen["world"] == world
        assert seen["distributed_type"] == (
            "DistributedType.NO" if world == 1 else "DistributedType.MULTI_CPU"
        )
        assert sorted(seen["merged"]) == sorted(frozen)  # merged by PEFT, identically on every rank
        assert not [n for n in seen["trainable"] if any(n.startswith(f"{a}.") for a in frozen)]
        assert plan_doc(out, rank) == plan


def test_two_processes_end_bit_identical(runs: Path) -> None:
    assert_identical(params(runs / "multi" / "run", 0), params(runs / "multi" / "run", 1))


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_save_state_and_load_state_resume_bit_identically(runs: Path, mode: str) -> None:
    world = 1 if mode == "single" else 2
    resumed = runs / mode / "resumed"
    for rank in range(world):
        assert info(resumed, rank)["start"] == CKPT_STEP
        assert_identical(params(resumed, rank), params(runs / mode / "run", 0))
        assert plan_doc(resumed, rank) == plan_doc(runs / mode / "run")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
