"""Merging frozen LoRA adapters into their base weights through PEFT's own ``merge``.

A frozen adapter still costs its branch's forward FLOPs and, in training, the dropout mask
saved for its backward. Merging it (``W <- W + scale * B A``) removes both and leaves
``save_pretrained`` and ``merge_and_unload`` correct: PEFT records the adapter as merged.

Only sites that expose PEFT's layer API (``merge``, ``merged_adapters``, ``get_base_layer``)
and whose base weights are plain float32 or float64 tensors are merged: rounding the small
update into a float16, bfloat16 or quantized weight would change the model, and a sharded
weight (FSDP2's DTensor) holds only this rank's shard, so those adapters stay unmerged (still
frozen).

A merge changes the base weights, so a checkpoint records a digest of them before and after
each merge; on resume, :func:`check_merged` tells whether the model's weights are the merged
ones (mark the adapter merged), the original ones (merge again), or neither (an error).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Float types whose rounding cannot swallow a LoRA update.
_EXACT = (torch.float32, torch.float64)
# Plain tensors only: a tensor subclass (a DTensor shard, a quantized weight) is left unmerged.
_PLAIN = (torch.Tensor,)


def mergeable(site: nn.Module) -> bool:
    """Whether ``site`` is a PEFT adapter layer whose base weights take a merge exactly."""
    if not (
        callable(getattr(site, "merge", None))
        and isinstance(getattr(site, "merged_adapters", None), list)
        and callable(getattr(site, "get_base_layer", None))
    ):
        return False
    params = list(_base(site).parameters())
    # A sharded (FSDP2 DTensor) weight holds one shard per rank: no merge of the full update.
    return bool(params) and all(p.dtype in _EXACT and type(p.data) in _PLAIN for p in params)


def base_digest(site: nn.Module) -> str:
    """SHA-256 over the base layer's parameter names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, param in _base(site).named_parameters():
        value = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge(site: nn.Module, adapters: Sequence[str]) -> tuple[str, str]:
    """Merge ``adapters`` of ``site`` into its base weights; return the digests before and after."""
    before = base_digest(site)
    layer: Any = site  # a PEFT layer: its merge is not typed on nn.Module
    with torch.no_grad():
        layer.merge(adapter_names=list(adapters))
    return before, base_digest(site)


def mark_merged(site: nn.Module, adapters: Sequence[str]) -> None:
    """Record ``adapters`` as merged without touching the weights (they already hold the merge)."""
    merged: list[str] = getattr(site, "merged_adapters")  # noqa: B009  # PEFT's list, not typed on nn.Module
    merged.extend(a for a in adapters if a not in merged)


def check_merged(site: nn.Module, digests: tuple[str, str]) -> bool:
    """Whether the site's base weights already hold the merge (True) or are the originals (False).

    Raises:
        ValueError: If they are neither.
    """
    now = base_digest(site)
    if now == digests[1]:
        return True
    if now == digests[0]:
        return False
    raise ValueError(
        "its base weights are neither the ones the adapter was merged into nor the merged ones; "
        "load the model's weights from the same checkpoint (or the same pretrained model) first"
    )


def _base(site: nn.Module) -> nn.Module:
    """The PEFT layer's base layer (``get_base_layer`` is not typed on ``nn.Module``)."""
    base: nn.Module = getattr(site, "get_base_layer")()  # noqa: B009
    return base
