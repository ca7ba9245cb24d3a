"""Step time with the lowest blocks frozen, by what their dropout does.

MiniLM-L6 with LoRA on query and value, a batch of a task's training data, and the number
of blocks the default freezes (``round(tau_target * 6)``, the lowest ones, merged) frozen
from the first step: the default rule with a one-step warm-up and no ramp. Four settings
train on the same batch, one step of each per round, so the machine's slower and faster
spells fall on all of them alike:

- ``lora``: plain LoRA, nothing frozen;
- ``kept``: the frozen blocks keep all their dropout (``SAFEConfig.eval_frozen=False``);
- ``attention-off``: the frozen blocks drop no attention probabilities, so their attention
  can take the fused kernel, and keep the dropout on their hidden states
  (``eval_frozen="attention"``, the default);
- ``eval``: the frozen blocks in evaluation mode (``eval_frozen=True``).

It writes the median step of each to ``benchmarks/results/frozen_dropout_<device>.json``
(``--results``)::

    python benchmarks/frozen_dropout.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from safefreeze import SAFEConfig, SAFEOptimizer
from safefreeze.demo.task import build_model, encode, machine, timed_step

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("lora", "kept", "attention-off", "eval")


def _load_tradeoff() -> ModuleType:
    """``tradeoff.py`` beside this file, whether this runs as a script or is imported."""
    path = Path(__file__).with_name("tradeoff.py")
    spec = importlib.util.spec_from_file_location("safefreeze_benchmark_tradeoff", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tradeoff = _load_tradeoff()


def _trainer(
    setting: str, task: Any, batch: dict[str, torch.Tensor], total: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """The model and optimizer of one setting, its blocks already frozen; and how many froze."""
    model = build_model(task, 0).to(task.device).train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    if setting == "lora":
        return model, inner, 0
    held = {"kept": False, "attention-off": "attention", "eval": True}[setting]
    config = dataclasses.replace(
        SAFEConfig.for_run(total), warmup_steps=1, freeze_end_step=1, eval_frozen=held
    )
    safe = SAFEOptimizer(inner, model, config)
    for _ in range(2):  # the warm-up step, then the step at which the freeze lands
        timed_step(model, batch, safe)
    return model, safe, len(safe.frozen_units)


def measure(task_name: str, device: str, rounds: int, limit: int | None = None) -> dict[str, Any]:
    """Median step seconds of every setting on one batch of ``task_name``, interleaved."""
    task = dataclasses.replace(tradeoff.tasks()[task_name], device=device)
    if limit:
        task = dataclasses.replace(task, limit=limit, max_length=16)
    train_split, _ = task.load()
    data = encode(train_split, task)
    batch = {k: v[: task.batch_size].to(device) for k, v in data.items()}
    total = task.steps(data["labels"].shape[0])
    trainers = {s: _trainer(s, task, batch, total) for s in SETTINGS}
    for model, optimizer, _ in trainers.values():  # one untimed round
        timed_step(model, batch, optimizer)
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for setting, (model, optimizer, _) in trainers.items():
            times[setting].append(timed_step(model, batch, optimizer))
    median = {s: statistics.median(t) for s, t in times.items()}
    return {
        "task": task_name,
        "frozen": trainers["kept"][2],
        "rounds": rounds,
        "median_step_ms": {s: 1000 * m for s, m in median.items()},
        "x_lora": {s: m / median["lora"] for s, m in median.items()},
        "x_kept": {s: m / median["kept"] for s, m in median.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "drugreview"])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps of each setting")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--limit", type=int, default=None, help="examples per split (smoke runs)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    words = argv if argv is not None else sys.argv[1:]
    data: dict[str, Any] = {
        "command": " ".join(["python benchmarks/frozen_dropout.py", *words]),
        "machine": machine(args.device),
        "tasks": [],
    }
    for name in args.tasks:
        row = measure(name, args.device, args.rounds, args.limit)
        data["tasks"].append(row)
        print(json.dumps(row), flush=True)
    device = torch.device(args.device).type
    results = args.results or ROOT / "benchmarks" / "results" / f"frozen_dropout_{device}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
