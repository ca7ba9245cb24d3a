"""What SAFE's scoring adds to a training step: a plain LoRA step against a scored one.

The benchmark's model (MiniLM-L6 with LoRA on query and value) trains on the first 32
Rotten Tomatoes snippets, once plainly under AdamW and once under a SAFE optimizer that
scores every step (``safefreeze.demo.task.always_scoring``). For each: the median of 20
timed steps (after 5 warm-up steps and 5 profiled ones) and, on CUDA, the kernels launched
and the time the GPU was busy per step, read with ``torch.profiler``. A step whose GPU is
busy for a fraction of its wall time is bound by launching kernels, not by arithmetic, and
the scoring's cost there is the number of kernels it adds. The two step times come from
one optimizer after the other; ``benchmarks/rotten.py`` measures the overhead itself with
interleaved steps.

Run ``python benchmarks/scoring_cost.py --device cuda``; it prints the figures and writes
them to ``benchmarks/results/scoring_cost_<device>.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from safefreeze import SAFEConfig
from safefreeze.demo.task import ROTTEN_TOMATOES, always_scoring, build_model, encode, machine, timed_step

ROOT = Path(__file__).resolve().parents[1]
WARM, PROFILED, TIMED = 5, 5, 20


def measure(device: torch.device, scored: bool, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Median step time and, on CUDA, kernels and GPU-busy time per step of one optimizer."""
    task = dataclasses.replace(ROTTEN_TOMATOES, device=str(device))
    model = build_model(task, 0).to(device).train()
    if scored:
        optimizer: torch.optim.Optimizer = always_scoring(model, SAFEConfig.for_run(337), task.lr)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.lr)
    for _ in range(WARM):
        timed_step(model, batch, optimizer)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(PROFILED):
            timed_step(model, batch, optimizer)  # synchronized on CUDA: every kernel lands in the window
    on_gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    times = [timed_step(model, batch, optimizer) for _ in range(TIMED)]
    busy_us = sum(e.self_device_time_total for e in on_gpu)
    return {
        "kernels_per_step": sum(e.count for e in on_gpu) / PROFILED if cuda else None,
        "gpu_busy_ms_per_step": busy_us / PROFILED / 1000 if cuda else None,
        "median_step_ms": 1000 * statistics.median_high(times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = dataclasses.replace(ROTTEN_TOMATOES, limit=64)
    train_split, _ = task.load()
    batch = {k: v[: task.batch_size].to(device) for k, v in encode(train_split, task).items()}
    words = argv if argv is not None else sys.argv[1:]
    data: dict[str, Any] = {
        "command": " ".join(["python benchmarks/scoring_cost.py", *words]),
        "machine": machine(str(device)),
    }
    for name in ("plain", "scored"):
        data[name] = measure(device, name == "scored", batch)
        print(name, data[name], flush=True)
    results = args.results or ROOT / "benchmarks" / "results" / f"scoring_cost_{device.type}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
