"""Deterministic cost counters for one training step: FLOPs and bytes saved for backward.

Both figures depend only on the model, the batch shape and what requires grad, not on the
machine, so they compare runs exactly where timings cannot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_attention_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *_: object, **__: object
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))  # type: ignore[no-untyped-call]


def _cpu_attention_backward_flops(
    grad_out_shape: torch.Size,
    query_shape: torch.Size,
    key_shape: torch.Size,
    value_shape: torch.Size,
    *_: object,
    **__: object,
) -> int:
    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))  # type: ignore[no-untyped-call]


# torch counts the CUDA attention kernels and the math path, which CPU attention with dropout
# takes, but not the CPU flash kernel that attention without dropout runs: count it alike.
_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """What one training step cost."""

    # FLOPs of the forward pass (including anything hooks computed during it).
    forward_flops: int
    # FLOPs of the backward pass.
    backward_flops: int
    # Bytes of distinct tensors autograd kept for backward, parameters and buffers excluded.
    saved_bytes: int

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward_flops + self.backward_flops


def measure_step(model: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, StepCosts]:
    """Run ``forward()`` and the backward of the loss it returns, counting their costs.

    Saved tensors are counted once per storage, and the model's own parameters and
    buffers are left out: they live whether or not autograd keeps them, so only the
    activation memory that freezing can remove is counted. Attention counts alike on every
    device and path: the fused CPU kernel, which torch's counter skips, gets the formula of
    the CUDA kernels (a backward that recomputes the attention scores counts that work).

    Args:
        model: The model, whose parameters and buffers are excluded from the byte count.
        forward: Computes and returns the scalar loss.

    Returns:
        The loss (already backpropagated) and the step's costs.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> _, costs = measure_step(net, lambda: net(torch.ones(2, 4)).sum())
        >>> costs.forward_flops, costs.backward_flops, costs.saved_bytes
        (160, 192, 96)
    """
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    forward_counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION)
    with forward_counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    backward_counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION)
    with backward_counter:
        torch.autograd.backward(loss)
    costs = StepCosts(
        forward_flops=forward_counter.get_total_flops(),
        backward_flops=backward_counter.get_total_flops(),
        saved_bytes=sum(seen.values()),
    )
    return loss, costs


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters, ...).

    Example:
        >>> p = nn.Parameter(torch.zeros(10))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(10)
        >>> opt.step()
        >>> optimizer_state_bytes(opt)  # exp_avg, exp_avg_sq (10 floats each) and step
        84
    """
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def tensor_bytes(values: Iterable[object]) -> int:
    """Bytes of the tensors among ``values``; anything else counts zero."""
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
