"""Forward hooks that feed each pair's base and adapted outputs into a CKA accumulator.

The hooks read the training forward itself (no extra pass), keep no activation beyond the
site's own forward, and own their handles: :meth:`ScoreRecorder.remove` leaves the model
with no hook at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safefreeze.cka._torch import CKAAccumulator, RowDraw
from safefreeze.discovery import AdapterPair


class ScoreRecorder:
    """Scores pairs from the forwards that run while :attr:`enabled` and in training mode.

    A padding mask is taken from an ``attention_mask`` keyword of the model's own forward
    (the Hugging Face convention) and applied to outputs whose leading shape is ``(B, T)``.
    The rows to score are drawn and copied as soon as the base representation exists (the
    base layer's output, or the site's input before the site runs), so an adapter that
    adds to it in place cannot change what is scored.

    Args:
        model: The model whose forwards are read.
        pairs: Pairs to score; pair ``i`` feeds row ``i`` of ``accumulator``.
        accumulator: Receives one minibatch per pair per forward.
    """

    def __init__(self, model: nn.Module, pairs: Sequence[AdapterPair], accumulator: CKAAccumulator) -> None:
        self.accumulator = accumulator
        self.enabled = True
        self._mask: torch.Tensor | None = None
        # The mask's flat nonzero indices, found once per forward: finding them waits for the device.
        self._unmasked: torch.Tensor | None = None
        # pair index -> (rows drawn, base rows (n, Dx)) of the forward in flight
        self._pending: dict[int, tuple[RowDraw, torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True)
        ]
        for index, pair in enumerate(pairs):
            site = model.get_submodule(pair.site)
            if pair.base is None:
                self._handles.append(site.register_forward_pre_hook(functools.partial(self._on_input, index)))
            else:
                base = model.get_submodule(pair.base)
                self._handles.append(base.register_forward_hook(functools.partial(self._on_base, index)))
            self._handles.append(site.register_forward_hook(functools.partial(self._on_site, index)))

    @property
    def attached(self) -> bool:
        """Whether any hook is still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook and drop anything held."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._mask = self._unmasked = None

    def _recording(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def _on_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask.detach().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._unmasked = None
        if self._mask is not None and self._recording(module):
            self._unmasked = self._mask.reshape(-1).nonzero().squeeze(1)

    def _capture(self, index: int, module: nn.Module, value: Any) -> None:
        x = _first_tensor(value)
        if x is None or x.dim() < 2 or not self._recording(module):
            return
        mask, unmasked = self._mask, self._unmasked
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = unmasked = None
        draw = self.accumulator.draw(tuple(x.shape), mask, unmasked)
        self._pending[index] = (draw, draw.take(x))

    def _on_base(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._capture(index, module, output)

    def _on_input(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._capture(index, module, args)

    def _on_site(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        pending = self._pending.pop(index, None)
        y = _first_tensor(output)
        if pending is None or y is None or not self._recording(module):
            return
        draw, x = pending
        if math.prod(y.shape[:-1]) != draw.total:  # not the same tokens: nothing to compare
            return
        self.accumulator.add(index, x, draw.take(y), padding=draw.padding)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None
