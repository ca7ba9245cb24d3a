"""Forward hooks that feed each pair's base and adapted outputs into a CKA accumulator.

The hooks read the training forward itself (no extra pass), keep no activation beyond the
site's own forward, and own their handles: :meth:`ScoreRecorder.remove` leaves the model
with no hook at all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safefreeze.cka._torch import CKAAccumulator
from safefreeze.discovery import AdapterPair


class ScoreRecorder:
    """Scores pairs from the forwards that run while :attr:`enabled` and in training mode.

    A padding mask is taken from an ``attention_mask`` keyword of the model's own forward
    (the Hugging Face convention) and applied to outputs whose leading shape is ``(B, T)``.

    Args:
        model: The model whose forwards are read.
        pairs: Pairs to score; pair ``i`` feeds row ``i`` of ``accumulator``.
        accumulator: Receives one minibatch per pair per forward.
    """

    def __init__(self, model: nn.Module, pairs: Sequence[AdapterPair], accumulator: CKAAccumulator) -> None:
        self.accumulator = accumulator
        self.enabled = True
        self._mask: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}  # pair index -> base output, this forward
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True)
        ]
        for index, pair in enumerate(pairs):
            site = model.get_submodule(pair.site)
            if pair.base is None:
                hook = functools.partial(self._on_site_input, index)
            else:
                base = model.get_submodule(pair.base)
                self._handles.append(base.register_forward_hook(functools.partial(self._on_base, index)))
                hook = functools.partial(self._on_site, index)
            self._handles.append(site.register_forward_hook(hook))

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
        self._mask = None

    def _recording(self, module: nn.Module) -> bool:
        return self.enabled and module.training and torch.is_grad_enabled()

    def _on_model(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask.detach().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _on_base(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._recording(module):
            x = _first_tensor(output)
            if x is not None:
                self._pending[index] = x.detach()

    def _on_site(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = self._pending.pop(index, None)
        y = _first_tensor(output)
        if x is not None and y is not None and self._recording(module):
            self._update(index, x, y.detach())

    def _on_site_input(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x, y = _first_tensor(args), _first_tensor(output)
        if x is not None and y is not None and self._recording(module):
            self._update(index, x.detach(), y.detach())

    def _update(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = self._mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = None
        self.accumulator.update(index, x, y, mask)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None
