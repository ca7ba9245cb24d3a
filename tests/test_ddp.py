"""SAFE under real ``torch.distributed``: 2 gloo ranks on CPU, each a fresh process.

Every rank runs this file as a script (``python test_ddp.py RANK WORLD OUT JOB...``), runs
its jobs in order and writes what each ended with into ``OUT/<job>``; the tests compare
those files. One-process runs are jobs run inside pytest. The batch of optimizer step ``i``
is a pure function of ``i``, cut in two halves: 2 ranks take one each, one process takes
both in turn, so a run's data does not depend on where it starts or on how many ranks it
has. Every launch has a hard timeout (and the process group a short one), so a hang fails
the test instead of stalling the suite.

``python test_ddp.py bench OUT`` times FreezeAwareDDP against DDP's find_unused_parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from models import HandLoRANet  # noqa: E402

from safefreeze import AdapterPattern, FreezePlan, SAFEConfig, SAFEOptimizer  # noqa: E402
from safefreeze.cka._torch import STAT_BATCHES, STAT_KK, STAT_KL, STAT_LL, STAT_ROWS_USED  # noqa: E402
from safefreeze.distributed import FreezeAwareDDP, RankDisagreementError  # noqa: E402

STEPS = 14
CKPT_STEP = 6  # after the warm-up and the first freezes, before the last
ROWS, DIM, DEPTH = 48, 8, 4
PATTERN = AdapterPattern(base="base", params=r"lora_(?:down|up)\..+")
# Depth order over single adapters freezes a lower prefix at several steps, so re-wraps and
# the checkpoint fall between freezes; max_tokens below a rank's 24 rows draws subsamples.
CONFIG = SAFEConfig(
    warmup_steps=4, freeze_end_step=10, tau_target=0.8, max_tokens=16, order="depth", units="adapter"
)
LAUNCH_TIMEOUT = 90.0  # seconds, per launch of all ranks and all their jobs


# ---- what every rank runs -----------------------------------------------------------------


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step ``step`` (1-based): inputs (N, D), targets (N,)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(ROWS, DIM, generator=gen)
    y = torch.randint(0, 2, (ROWS,), generator=gen)
    return x, y


def build(
    config: SAFEConfig | None = CONFIG, plan: FreezePlan | None = None, shard: Any = None
) -> tuple[Any, SAFEOptimizer]:
    torch.manual_seed(0)  # the same weights on every rank and in every run
    model = HandLoRANet(d=DIM, depth=DEPTH)
    for layer in model.layers:  # LoRA-B starts at zero; make every adapter matter from step 1
        torch.nn.init.normal_(layer.lora_up.weight, std=0.3)
    if shard is not None:
        shard(model)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, SAFEOptimizer(inner, model, config, plan=plan, pattern=PATTERN)


def train(forward: Any, optimizer: SAFEOptimizer, start: int, stop: int, rank: int, world: int) -> None:
    """Optimizer steps ``start + 1 .. stop`` over the global batch, cut in 2 halves.

    With 2 ranks each takes its half and DDP averages the two gradients; one process takes
    both halves in turn and accumulates half of each gradient. Halving is exact in floating
    point and both sum the same two terms, so the two give bit-identical gradients.
    """
    halves = range(rank, rank + 1) if world == 2 else range(2)
    share = ROWS // 2
    for step in range(start + 1, stop + 1):
        x, y = batch(step)
        for half in halves:
            rows = slice(half * share, (half + 1) * share)
            loss = F.cross_entropy(forward(x[rows]), y[rows])  # logits (n, 2)
            (loss if world == 2 else loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()


def save_params(path: Path, model: Any) -> None:
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, path)


def save_end(out: Path, rank: int, model: Any, optimizer: SAFEOptimizer, **info: Any) -> None:
    save_params(out / f"params{rank}.pt", model)
    optimizer.plan.save(out / f"plan{rank}.json")
    names = {id(p): n for n, p in model.named_parameters()}
    held = sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    (out / f"info{rank}.json").write_text(json.dumps({"held": held, "trainable": trainable, **info}))


def job(mode: str, rank: int, world: int, out: Path, arg: str) -> None:
    """One run of ``mode``; what it ends with goes into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if mode == "record":
        model, optimizer = build()
        forward = FreezeAwareDDP(model) if world > 1 else model
        # Every freeze event: a copy of what froze, to check it never changes again.
        frozen_at: dict[str, torch.Tensor] = {}
        pairs = {pair.name: pair for pair in optimizer.controller.pairs}

        def snapshot(event: Any) -> None:
            for adapter in event.adapters:
                for name in pairs[adapter].param_names:
                    frozen_at[name] = model.get_parameter(name).detach().clone()

        optimizer.add_freeze_callback(snapshot)
        train(forward, optimizer, 0, CKPT_STEP, rank, world)
        # The statistics the scores were computed from (summed over the ranks in place).
        torch.save(optimizer.controller._accumulator.stats, out / f"stats{rank}.pt")  # type: ignore[union-attr]
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "ckpt.pt")
        train(forward, optimizer, CKPT_STEP, STEPS, rank, world)
        torch.save(frozen_at, out / f"frozen_at{rank}.pt")
        ddp = forward.ddp if isinstance(forward, FreezeAwareDDP) else None
        save_end(
            out,
            rank,
            model,
            optimizer,
            rewraps=forward.rewraps if isinstance(forward, FreezeAwareDDP) else None,
            find_unused=None if ddp is None else ddp.find_unused_parameters,
        )
        optimizer.close()
    elif mode == "resume":
        model, optimizer = build()
        forward = FreezeAwareDDP(model)  # wrapped before the load: the load's freezes re-wrap it
        state = torch.load(arg, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train(forward, optimizer, CKPT_STEP, STEPS, rank, world)
        save_end(out, rank, model, optimizer, rewraps=forward.rewraps)
        optimizer.close()
    elif mode == "replay":
        model, optimizer = build(plan=FreezePlan.load(arg))
        forward = FreezeAwareDDP(model) if world > 1 else model
        train(forward, optimizer, 0, STEPS, rank, world)
        save_end(out, rank, model, optimizer)
        optimizer.close()
    elif mode == "fsdp":
        # FSDP2 shards every parameter (DTensor) and reduce-scatters the gradients of those
        # that require grad; freezing needs nothing more from it.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model, optimizer = build(shard=lambda m: [fully_shard(x, mesh=mesh) for x in [*m.layers, m]])
        train(model, optimizer, 0, STEPS, rank, world)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a collective
        torch.save(full, out / f"params{rank}.pt")
        optimizer.plan.save(out / f"plan{rank}.json")
        optimizer.close()
    elif mode == "fsdp_peft":
        # PEFT LoRA under FSDP2 with the default merge=True: sharded base weights stay unmerged.
        from models import peft_bert
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        model = peft_bert(layers=2, seed=0)
        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5, units="adapter", order="depth")
        optimizer = SAFEOptimizer(inner, model, config)
        gen = torch.Generator().manual_seed(rank)  # each rank its own data
        for _ in range(6):
            ids = torch.randint(0, 100, (4, 12), generator=gen)  # (B, T)
            labels = torch.randint(0, 3, (4,), generator=gen)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        save_end(out, rank, model, optimizer, merged=optimizer.controller.merged_sites)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a collective
        torch.save(full, out / f"params{rank}.pt")  # whole tensors, not this rank's shards
        optimizer.close()
    elif mode == "disagree":
        messages = {}
        for case in ("scores", "failure", "config"):
            changed = SAFEConfig(**{**CONFIG.to_dict(), "tau_target": 0.5})
            model, optimizer = build(changed if case == "config" and rank == 1 else CONFIG)
            train(FreezeAwareDDP(model), optimizer, 0, 2, rank, world)
            units = list(optimizer.controller.units)
            raw = {u: 0.1 * (i + 1) for i, u in enumerate(units)}
            if rank == 1 and case == "scores":
                raw[units[0]] = 0.25
            if rank == 1 and case == "failure":
                raw.pop(units[0])
            stats = optimizer.controller._accumulator.stats  # type: ignore[union-attr]
            before, started = stats.clone(), time.monotonic()
            try:
                optimizer.controller.finalize_scores(raw_scores=raw)
            except RankDisagreementError as err:
                seconds = time.monotonic() - started
                messages[case] = {"error": str(err), "seconds": seconds, "kept": torch.equal(stats, before)}
            optimizer.close()
        (out / f"messages{rank}.json").write_text(json.dumps(messages))
    elif mode == "plain":
        # Freezing under a plain DDP wrapper: what FreezeAwareDDP exists for. Leaves the
        # process group broken, so it runs last.
        from torch.nn.parallel import DistributedDataParallel

        model, optimizer = build()
        step = 0
        try:
            ddp = DistributedDataParallel(model)
            for step in range(STEPS):
                train(ddp, optimizer, step, step + 1, rank, world)
                save_params(out / f"params{rank}.pt", model)
        except RuntimeError as err:
            (out / f"plain{rank}.txt").write_text(f"{optimizer.controller.step}\n{err}")
    elif mode == "bench":
        bench(rank, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def bench(rank: int, out: Path) -> None:
    """Median step times of a tiny PEFT BERT once SAFE froze its lower half: FreezeAwareDDP
    against ``DDP(find_unused_parameters=True)``, steps interleaved so load slows both alike."""
    import statistics

    from models import peft_bert
    from torch.nn.parallel import DistributedDataParallel

    config = SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=0.5, units="adapter", order="depth")
    runs: dict[str, tuple[Any, SAFEOptimizer]] = {}
    for how in ("FreezeAwareDDP", "find_unused_parameters=True"):
        model = peft_bert(layers=8, seed=0)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        optimizer = SAFEOptimizer(inner, model, config)
        wrapped = FreezeAwareDDP(model) if how == "FreezeAwareDDP" else None
        runs[how] = (wrapped or DistributedDataParallel(model, find_unused_parameters=True), optimizer)
    gen = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {how: [] for how in runs}
    for step in range(105):
        ids = torch.randint(0, 100, (8, 32), generator=gen)  # (B, T)
        labels = torch.randint(0, 3, (8,), generator=gen)
        for how, (forward, optimizer) in runs.items():
            started = time.perf_counter()
            forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 5:  # the freeze happened at step 2
                times[how].append(time.perf_counter() - started)
    result = {
        how: {"ms": 1000 * statistics.median(t), "frozen": len(runs[how][1].frozen_adapters)}
        for how, t in times.items()
    }
    (out / f"bench{rank}.json").write_text(json.dumps(result))


def worker(rank: int, world: int, out: Path, jobs: list[str]) -> None:
    """Run ``jobs`` (``mode`` or ``mode=arg``) in order, each into ``out/mode``."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out}/store",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=20),
        )
    for spec in jobs:
        mode, _, arg = spec.partition("=")
        job(mode, rank, world, out / mode, arg)
    if world > 1 and "plain" not in jobs:
        dist.destroy_process_group()


# ---- the tests ----------------------------------------------------------------------------


def launch(world: int, out: Path, *jobs: str) -> Path:
    """Run ``jobs`` on ``world`` ranks to completion, or kill every rank at the timeout; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    # Output goes to files: a full pipe would block a rank, and its peers with it.
    logs = [out / f"rank{r}.log" for r in range(world)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as sink:
            cmd = [sys.executable, __file__, str(r), str(world), str(out), *jobs]
            procs.append(subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{list(jobs)} on {world} rank(s) did not finish within {LAUNCH_TIMEOUT} s (a hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {r} of {list(jobs)} failed:\n{log.read_text()[-3000:]}"
    return out


def params(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(out / f"params{rank}.pt", weights_only=True)
    return loaded


def info(out: Path, rank: int = 0) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / f"info{rank}.json").read_text())
    return loaded


def plan(out: Path, rank: int = 0) -> FreezePlan:
    return FreezePlan.load(out / f"plan{rank}.json")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"parameters differ bitwise: {different}"


def test_freeze_aware_ddp_follows_requires_grad_in_one_process(tmp_path: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = HandLoRANet(d=DIM, depth=2)
    with pytest.raises(RuntimeError, match=r"needs an initialized torch.distributed process group"):
        FreezeAwareDDP(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match=r"got a DistributedDataParallel; pass ddp.module"):
            FreezeAwareDDP(DistributedDataParallel(model))
        wrapped = FreezeAwareDDP(model, bucket_cap_mb=1)
        first = wrapped.ddp
        assert wrapped.module is model and isinstance(first, DistributedDataParallel)
        x = torch.randn(4, DIM)
        torch.testing.assert_close(wrapped(x), model(x))
        assert wrapped.ddp is first and wrapped.rewraps == 0
        model.layers[0].lora_down.weight.requires_grad_(False)
        wrapped(x).sum().backward()
        assert wrapped.rewraps == 1 and wrapped.ddp is not first
        assert model.layers[0].lora_down.weight.grad is None
        assert model.layers[0].lora_up.weight.grad is not None
        model.requires_grad_(False)  # nothing left to reduce: the module runs unwrapped
        assert wrapped.ddp is None and wrapped.rewraps == 2
        torch.testing.assert_close(wrapped(x), model(x))
        with wrapped.no_sync():
            pass
        assert wrapped.eval() is wrapped and not model.training
    finally:
        dist.destroy_process_group()


def test_agreement_outside_a_process_group_checks_nothing_and_reraises() -> None:
    from safefreeze.distributed import agree, world_size

    assert world_size() == 1
    agree({"scores": [0.1, float("nan")]}, what="a test")  # nothing to compare with
    with pytest.raises(RankDisagreementError, match=r"^a test failed: ValueError: bad") as caught:
        agree(None, what="a test", keys=["scores"], error=ValueError("bad"))
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(ValueError, match=r"pass parts, or keys"):
        agree(None, what="a test")


def test_reducing_statistics_needs_a_process_group() -> None:
    from safefreeze.cka import CKAAccumulator

    with pytest.raises(
        RuntimeError, match=r"all_reduce_ needs an initialized torch.distributed process group"
    ):
        CKAAccumulator(2).all_reduce_()


# Two launches of 2 ranks, and two runs in this process, cover everything; each test reads
# the part it checks.


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process, no process group: a recording run."""
    out = tmp_path_factory.mktemp("one")
    job("record", 0, 1, out / "record", "")
    return out


@pytest.fixture(scope="module")
def two(one: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks: a recording run (rank 0 checkpoints at CKPT_STEP), disagreeing ranks, a replay
    of the 1-process plan, the recording under FSDP2, then plain DDP."""
    jobs = ("record", "disagree", f"replay={one / 'record' / 'plan0.json'}", "fsdp", "fsdp_peft", "plain")
    return launch(2, tmp_path_factory.mktemp("two"), *jobs)


@pytest.fixture(scope="module")
def two_again(two: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks: resume the recording's checkpoint, then replay its plan."""
    out = tmp_path_factory.mktemp("two_again")
    return launch(2, out, f"resume={two / 'record' / 'ckpt.pt'}", f"replay={two / 'record' / 'plan0.json'}")


@pytest.fixture(scope="module")
def one_again(two: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process: replay the 2-rank plan."""
    out = tmp_path_factory.mktemp("one_again")
    job("replay", 0, 1, out / "replay", str(two / "record" / "plan0.json"))
    return out


def test_ranks_end_bit_identical_with_identical_freezes(two: Path) -> None:
    out = two / "record"
    assert_identical(params(out, 0), params(out, 1))
    assert plan(out, 0).to_dict() == plan(out, 1).to_dict()
    # A real schedule: several freeze events after the warm-up, some before the checkpoint
    # and some after it, not everything frozen.
    recorded = plan(out)
    steps = sorted(set(recorded.adapter_freeze_steps.values()))
    assert recorded.scored_at == CONFIG.warmup_steps
    assert CONFIG.warmup_steps <= steps[0] <= CKPT_STEP < steps[-1] <= STEPS
    assert 0 < len(recorded.adapter_freeze_steps) < DEPTH


@pytest.mark.parametrize(("runs", "world"), [("one", 1), ("two", 2)])
def test_scores_come_from_the_statistics_of_every_rank(
    runs: str, world: int, request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(runs) / "record"
    stats = [torch.load(out / f"stats{rank}.pt", weights_only=True) for rank in range(world)]
    for other in stats[1:]:
        assert torch.equal(other, stats[0])
    # (adapters, NUM_STATS): both halves of every warm-up step, on one rank or on two, are
    # one minibatch each of max_tokens rows.
    assert stats[0][:, STAT_BATCHES].tolist() == [2 * CONFIG.warmup_steps] * DEPTH
    assert stats[0][:, STAT_ROWS_USED].tolist() == [2 * CONFIG.warmup_steps * CONFIG.max_tokens] * DEPTH
    kl, kk, ll = stats[0][:, STAT_KL], stats[0][:, STAT_KK], stats[0][:, STAT_LL]
    raw = (1 - kl / (kk.sqrt() * ll.sqrt())).tolist()
    assert plan(out).raw_scores == {f"layers.{i}": r for i, r in enumerate(raw)}


def test_freezes_match_the_plan_on_every_rank(two: Path) -> None:
    out = two / "record"
    recorded = plan(out)
    frozen = {n for a in recorded.adapters if a.name in recorded.adapter_freeze_steps for n, _ in a.params}
    adapters = {n for a in recorded.adapters for n, _ in a.params}
    for rank in (0, 1):
        seen = info(out, rank)
        assert set(seen["trainable"]) == (adapters - frozen) | {"head.weight", "head.bias"}
        assert seen["held"] == seen["trainable"]
        # One re-wrap per freeze event, and never DDP's per-step graph walk.
        assert seen["rewraps"] == len(recorded.events)
        assert seen["find_unused"] is False


def test_frozen_params_do_not_change_after_their_freeze(two: Path) -> None:
    out = two / "record"
    for rank in (0, 1):
        frozen_at: dict[str, torch.Tensor] = torch.load(out / f"frozen_at{rank}.pt", weights_only=True)
        assert len(frozen_at) == 2 * len(plan(out).adapter_freeze_steps)
        final = params(out, rank)
        assert_identical(frozen_at, {n: final[n] for n in frozen_at})


def test_a_checkpoint_saved_under_ddp_resumes_bit_identically(two: Path, two_again: Path) -> None:
    out = two_again / "resume"
    for rank in (0, 1):
        assert_identical(params(out, rank), params(two / "record", 0))
        assert plan(out, rank).to_dict() == plan(two / "record").to_dict()
    # The load froze parameters the first wrapper reduced, then the run froze more: each re-wrapped.
    assert info(out)["rewraps"] == 1 + sum(e.step > CKPT_STEP for e in plan(out).events)


def test_a_two_rank_plan_replays_bit_identically_on_two_ranks(two: Path, two_again: Path) -> None:
    out = two_again / "replay"
    for rank in (0, 1):
        assert_identical(params(out, rank), params(two / "record", 0))
        assert plan(out, rank).events == plan(two / "record").events


def test_a_two_rank_plan_replays_on_one_process(two: Path, one_again: Path) -> None:
    recorded, replayed = plan(two / "record"), plan(one_again / "replay")
    assert replayed.adapter_freeze_steps == recorded.adapter_freeze_steps
    assert [e.units for e in replayed.events] == [e.units for e in recorded.events]
    assert_identical(params(one_again / "replay"), params(two / "record"))


def test_a_one_process_plan_replays_on_two_ranks(one: Path, two: Path) -> None:
    recorded = plan(one / "record")
    assert recorded.events
    out = two / "replay"
    assert_identical(params(out, 0), params(out, 1))
    for rank in (0, 1):
        assert plan(out, rank).adapter_freeze_steps == recorded.adapter_freeze_steps
    assert_identical(params(out), params(one / "record"))


def test_ranks_that_disagree_all_raise_the_same_error_without_hanging(two: Path) -> None:
    out = two / "disagree"
    m0 = json.loads((out / "messages0.json").read_text())
    m1 = json.loads((out / "messages1.json").read_text())
    assert set(m0) == set(m1) == {"scores", "failure", "config"}
    for case in m0:
        assert m0[case]["error"] == m1[case]["error"]
        assert max(m0[case]["seconds"], m1[case]["seconds"]) < 10
        assert m0[case]["kept"] and m1[case]["kept"]  # each rank's own statistics, not the sum
    assert "the ranks disagree" in m0["scores"]["error"]
    assert "Different from rank 0 on rank 1: raw scores, normalized scores." in m0["scores"]["error"]
    assert "failed on rank(s) [1] of 2" in m0["failure"]["error"]
    assert (
        "ValueError: finalize_scores needs a raw score for every unit: missing ['layers.0']"
        in (m0["failure"]["error"])
    )
    # A different config is caught before any statistics are reduced.
    assert "Different from rank 0 on rank 1: config." in m0["config"]["error"]


def test_fsdp2_fully_shard_records_the_same_run_bit_identically(two: Path) -> None:
    """FSDP2 on CPU: the same scores, freezes and final weights as the DDP recording."""
    for rank in (0, 1):
        assert plan(two / "fsdp", rank).to_dict() == plan(two / "record").to_dict()
        assert_identical(params(two / "fsdp", rank), params(two / "record", 0))


def test_fsdp2_fully_shard_trains_and_freezes_peft_lora_alike_on_every_rank(two: Path) -> None:
    out = two / "fsdp_peft"
    recorded = plan(out)
    assert plan(out, 1).to_dict() == recorded.to_dict()
    assert recorded.events and recorded.scored_at == 2
    assert_identical(params(out, 0), params(out, 1))
    frozen = {n for a in recorded.adapters if a.name in recorded.adapter_freeze_steps for n, _ in a.params}
    assert frozen and not frozen & set(info(out)["trainable"])
    # merge=True (the default) leaves the sharded base weights alone: a shard cannot take B A.
    assert recorded.config.merge and info(out)["merged"] == []


def test_freezing_under_a_plain_ddp_wrapper_desynchronizes_then_raises(two: Path) -> None:
    """Why FreezeAwareDDP exists: the recording run under DDP(model) breaks after its first freeze."""
    out = two / "plain"
    first = min(plan(two / "record").adapter_freeze_steps.values())
    for rank in (0, 1):
        step, _, message = (out / f"plain{rank}.txt").read_text().partition("\n")
        # The step after the freeze leaves buckets unreduced; the one after that raises.
        assert int(step) == first + 1
        assert "Expected to have finished reduction in the prior iteration" in message
    # That unreduced step already pulled the replicas apart.
    a, b = params(out, 0), params(out, 1)
    assert [n for n in a if not torch.equal(a[n], b[n])]


def main() -> None:
    """``python tests/test_ddp.py bench OUT``: step times of FreezeAwareDDP and find_unused_parameters."""
    if sys.argv[1] != "bench":
        worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
        return
    out = launch(2, Path(sys.argv[2]), "bench")
    for rank in (0, 1):
        for how, seen in json.loads((out / "bench" / f"bench{rank}.json").read_text()).items():
            print(
                f"rank {rank} {how}: median step {seen['ms']:.2f} ms, {seen['frozen']} of 16 adapters frozen"
            )


if __name__ == "__main__":
    main()
