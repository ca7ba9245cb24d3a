"""Tiny models shared by the tests: real PEFT LoRA on a small BERT, and hand-written adapters."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert_config(layers: int = 2, hidden: int = 32, labels: int = 3):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=labels,
    )


def bert_batch(seed: int, batch: int = 4, tokens: int = 10) -> dict[str, torch.Tensor]:
    """A random batch for :func:`peft_bert`: token ids, a full attention mask, 3-class labels."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (batch, tokens), generator=gen),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch,), generator=gen),
    }


def peft_bert(
    target_modules: tuple[str, ...] = ("query", "value"), layers: int = 2, seed: int = 0, **lora_kwargs
) -> nn.Module:
    """A randomly initialised BERT classifier wrapped by PEFT LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config(layers))
    config = LoraConfig(r=4, target_modules=list(target_modules), task_type="SEQ_CLS", **lora_kwargs)
    return get_peft_model(base, config)


class HandLoRALinear(nn.Module):
    """LoRA written by hand: base + up(down(x)), parts named lora_down / lora_up."""

    def __init__(self, d_in: int, d_out: int, r: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_down = nn.Linear(d_in, r, bias=False)
        self.lora_up = nn.Linear(r, d_out, bias=False)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(x))


class Bottleneck(nn.Module):
    """Houlsby-style adapter: x + up(act(down(x)))."""

    def __init__(self, d: int, r: int = 4) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = nn.GELU()
        self.up = nn.Linear(r, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class BottleneckBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ffn = nn.Linear(d, d)
        self.ffn.requires_grad_(False)
        self.adapter = Bottleneck(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(torch.relu(self.ffn(x)))


class BottleneckNet(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BottleneckBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class HandLoRANet(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HandLoRALinear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)
