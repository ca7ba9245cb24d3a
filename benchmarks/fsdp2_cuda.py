"""FSDP2 (``fully_shard``) with SAFE's default rule on one CUDA rank (NCCL), against the same run unsharded.

A tiny PEFT LoRA BERT (4 blocks, LoRA on query and value, no dropout) trains 12 steps on
padded random batches under ``fully_shard`` and then without it, from the same seed. The
rule is ``order="depth"`` so that blocks freeze whatever the scores of a random model.
Checks: the two runs record the same plan; nothing is merged into a sharded weight; frozen
adapter weights never change after their freeze; the LoRA weights of the two runs agree.

Run ``python benchmarks/fsdp2_cuda.py`` on a machine with a CUDA device; it prints the
figures as JSON and writes them to ``benchmarks/results/fsdp2_cuda.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

from safefreeze import SAFEConfig, SAFEOptimizer

CONFIG = SAFEConfig(warmup_steps=4, freeze_end_step=8, tau_target=0.5, order="depth")
STEPS = 12


def build() -> nn.Module:
    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.0)
    return get_peft_model(BertForSequenceClassification(bert), lora).cuda()


def run(shard: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = build()
    if shard:
        mesh = init_device_mesh("cuda", (dist.get_world_size(),))
        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def whole(p: torch.Tensor) -> torch.Tensor:
        return (p.full_tensor() if shard else p).detach().clone()  # type: ignore[operator]

    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    opt = SAFEOptimizer(inner, model, CONFIG)
    gen = torch.Generator().manual_seed(1)
    at_freeze: dict[str, torch.Tensor] = {}
    torch.cuda.reset_peak_memory_stats()
    for _ in range(STEPS):
        ids = torch.randint(1, 200, (8, 16), generator=gen)  # (B, T)
        mask = torch.ones_like(ids)
        mask[4:, 10:] = 0  # padding
        labels = torch.randint(0, 2, (8,), generator=gen)
        out = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        for name, p in model.named_parameters():
            if "lora_" in name and not p.requires_grad and name not in at_freeze:
                at_freeze[name] = whole(p)
    end = {name: whole(p) for name, p in model.named_parameters()}
    result = {
        "events": [[e.step, list(e.units)] for e in opt.plan.events],
        "frozen_adapters": len(opt.frozen_adapters),
        "merged_sites": opt.controller.merged_sites,
        "frozen_unchanged": bool(at_freeze) and all(torch.equal(end[n], v) for n, v in at_freeze.items()),
        "final_loss": float(out.loss.detach()),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
    }
    opt.close()
    return result, end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "fsdp2_cuda.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error(f"torch {torch.__version__} sees no CUDA device")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    sharded, a = run(shard=True)
    plain, b = run(shard=False)
    dist.destroy_process_group()
    lora = [n for n in a if "lora_" in n]
    figures = {
        "command": "python benchmarks/fsdp2_cuda.py",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "fsdp2": sharded,
        "unsharded": plain,
        "same_plan": sharded["events"] == plain["events"],
        "max_lora_weight_difference": max(float((a[n] - b[n]).abs().max()) for n in lora),
    }
    print(json.dumps(figures, indent=1))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(figures, indent=1))
    ok = figures["same_plan"] and not sharded["merged_sites"] and sharded["frozen_unchanged"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
