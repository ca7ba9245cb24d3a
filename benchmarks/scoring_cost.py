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

For the scored optimizer it also reads the host time spent in SAFE's scoring per step: in
its forward hooks (the row draws and copies, and the batched CKA computation that the last
hook of a forward starts) and, of that, in the batched CKA computation alone. On CUDA a
step whose GPU idles most of the time is bound by such host work: Python, operator dispatch
and kernel launches.

Run ``python benchmarks/scoring_cost.py --device cuda``; it prints the figures and writes
them to ``benchmarks/results/scoring_cost_<device>.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from safefreeze import SAFEConfig
from safefreeze.cka._torch import CKAAccumulator
from safefreeze.demo.task import ROTTEN_TOMATOES, always_scoring, build_model, encode, machine, timed_step
from safefreeze.hooks import ScoreRecorder

ROOT = Path(__file__).resolve().parents[1]
WARM, PROFILED, TIMED = 5, 5, 20
# The recorder's methods that run as hooks: forward hooks of the adapters' layers, and the
# hooks that find the padding mask.
HOOKS = (
    "_on_base",
    "_on_input",
    "_on_site",
    "_on_delta",
    "_on_model_mask_fn",
    "_on_carrier_enter",
    "_on_carrier_leave",
)


class HostClock:
    """Host seconds spent in SAFE's scoring hooks and, of that, in its batched CKA computation.

    The recorder binds its hooks when the optimizer is built, so :meth:`installed` wraps the
    methods before that; the wrapped methods count only while ``on`` is set.
    """

    def __init__(self) -> None:
        self.on = False
        self.seconds = {"hooks": 0.0, "batched_cka": 0.0}

    def _timed(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[HostClock]:
        hooks = {name: getattr(ScoreRecorder, name) for name in HOOKS}
        flush = CKAAccumulator.flush
        try:
            for name, fn in hooks.items():
                setattr(ScoreRecorder, name, self._timed(fn, "hooks"))
            CKAAccumulator.flush = self._timed(flush, "batched_cka")  # type: ignore[method-assign]
            yield self
        finally:
            for name, fn in hooks.items():
                setattr(ScoreRecorder, name, fn)
            CKAAccumulator.flush = flush  # type: ignore[method-assign]


def measure(device: torch.device, scored: bool, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Median step time, host time in the scoring (scored only) and, on CUDA, kernels and
    GPU-busy time per step of one optimizer."""
    task = dataclasses.replace(ROTTEN_TOMATOES, device=str(device))
    model = build_model(task, 0).to(device).train()
    clock = HostClock()
    with clock.installed():  # before the optimizer binds its hooks; a plain optimizer has none
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
        clock.on = True  # its own steps, so the clock's reads stay out of the step times
        for _ in range(TIMED if scored else 0):
            timed_step(model, batch, optimizer)
        clock.on = False
    busy_us = sum(e.self_device_time_total for e in on_gpu)
    host = {part: 1000 * seconds / TIMED if scored else None for part, seconds in clock.seconds.items()}
    return {
        "kernels_per_step": sum(e.count for e in on_gpu) / PROFILED if cuda else None,
        "gpu_busy_ms_per_step": busy_us / PROFILED / 1000 if cuda else None,
        "median_step_ms": 1000 * statistics.median_high(times),
        "scoring_host_ms_per_step": host["hooks"],
        "batched_cka_host_ms_per_step": host["batched_cka"],
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
