"""A deterministic SAFE training run that the replay and resume tests start in fresh processes.

The model is ``peft_bert`` with dropout on (BERT's and LoRA's), seeded; the batch of step
``i`` is a pure function of ``i``, so two runs see the same data whatever process they run in
and wherever they start. Modes:

    train_script.py --record PLAN.json --out W.pt                 # score + freeze, save the plan
    train_script.py --replay PLAN.json --plan-out P2.json --out W.pt
    train_script.py --save-ckpt CKPT.pt --stop-at 7               # interrupted run
    train_script.py --resume CKPT.pt --record PLAN.json --out W.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import peft_bert

from safefreeze import FreezePlan, SAFEConfig, SAFEOptimizer

STEPS = 16
LAYERS = 4
BATCH, TOKENS, VOCAB, LABELS = 4, 12, 100, 3
# max_tokens below the 48 tokens of a batch, so scoring draws subsamples from its generator;
# every other warm-up step is scored (steps 1 and 3), so a resumed run must pick the cadence up.
# Depth order over single adapters freezes a lower prefix at several steps, merging each
# adapter as it freezes, so the checkpoints fall between freezes.
CONFIG = SAFEConfig(
    warmup_steps=4,
    freeze_end_step=10,
    tau_target=0.7,
    max_tokens=16,
    score_every=2,
    order="depth",
    units="adapter",
)


def batch(step: int) -> dict[str, torch.Tensor]:
    """The batch of optimizer step ``step``: a pure function of ``step``, with padding."""
    gen = torch.Generator().manual_seed(1000 + step)
    input_ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)  # (B, T)
    lengths = torch.randint(TOKENS // 2, TOKENS + 1, (BATCH,), generator=gen)  # (B,)
    attention_mask = (torch.arange(TOKENS) < lengths[:, None]).long()  # (B, T)
    labels = torch.randint(0, LABELS, (BATCH,), generator=gen)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build(plan: FreezePlan | None) -> tuple[torch.nn.Module, SAFEOptimizer]:
    """The model (train mode, dropout on) and AdamW wrapped in SAFE, recording or replaying."""
    model = peft_bert(layers=LAYERS, seed=0, lora_dropout=0.1)
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if plan is not None:
        return model, SAFEOptimizer(inner, model, plan=plan)
    return model, SAFEOptimizer(inner, model, CONFIG)


def train(model: torch.nn.Module, optimizer: SAFEOptimizer, start: int, stop: int) -> None:
    """Run optimizer steps ``start .. stop - 1``."""
    for step in range(start, stop):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps in all")
    parser.add_argument("--seed", type=int, default=1, help="seed of the global RNG (dropout)")
    parser.add_argument("--record", type=Path, help="score and freeze; save the plan here at the end")
    parser.add_argument("--replay", type=Path, help="replay this plan instead of scoring")
    parser.add_argument("--plan-out", type=Path, help="save the run's plan here at the end")
    parser.add_argument("--save-ckpt", type=Path, help="checkpoint here after --stop-at steps, then exit")
    parser.add_argument("--stop-at", type=int, help="steps done when --save-ckpt is written")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint")
    parser.add_argument("--out", type=Path, help="save every parameter and the frozen list here")
    args = parser.parse_args(argv)
    if (args.save_ckpt is None) != (args.stop_at is None):
        parser.error("--save-ckpt and --stop-at go together")
    if args.record is not None and args.replay is not None:
        parser.error("--record and --replay exclude each other")

    # One thread: the tests run several of these at once, and every run must use the same count.
    torch.set_num_threads(1)
    model, optimizer = build(None if args.replay is None else FreezePlan.load(args.replay))
    torch.manual_seed(args.seed)
    start = 0
    if args.resume is not None:
        ckpt = torch.load(args.resume, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]

    if args.stop_at is not None:
        train(model, optimizer, start, args.stop_at)
        ckpt = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "step": args.stop_at,
        }
        torch.save(ckpt, args.save_ckpt)
        return
    train(model, optimizer, start, args.steps)

    for path in (args.record, args.plan_out):
        if path is not None:
            optimizer.plan.save(path)
    if args.out is not None:
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        merged = optimizer.controller.merged_sites
        torch.save({"params": params, "frozen": optimizer.frozen_adapters, "merged": merged}, args.out)


if __name__ == "__main__":
    main()
