"""Forward hooks that feed each pair's base and adapted outputs into a CKA accumulator.

The hooks read the training forward itself (no extra pass), keep no activation beyond the
site's own forward, and own their handles: :meth:`ScoreRecorder.remove` leaves the model
with no hook at all.

Every hook is one function shared by all modules of its kind, which finds its adapters
through a dict keyed by the module, and runs outside ``torch.compile``'s graphs
(``torch.compiler.disable``): Dynamo then sees the same hooks on every layer and compiles
one variant, where a hook carrying its adapter's index made it recompile per adapter until
it hit its recompile limit during the warm-up.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from safefreeze.cka._torch import CKAAccumulator, RowDraw
from safefreeze.discovery import AdapterPair

# Called with the model's forward arguments (args, kwargs); returns its padding mask, bool
# (B, T) True for real tokens, or None for a batch without padding.
MaskFn = Callable[[tuple[Any, ...], dict[str, Any]], "torch.Tensor | None"]
_MASK_ARG = "attention_mask"
_F = TypeVar("_F", bound=Callable[..., Any])


def run_eagerly(fn: _F) -> _F:
    """``fn`` run outside any ``torch.compile`` graph: Dynamo breaks the graph where it is called."""
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    Gradient checkpointing runs forwards during backward to recompute what it did not save.
    """
    return bool(torch._C._current_graph_task_id() != -1)


class ScoreRecorder:
    """Scores pairs from the forwards that run while :attr:`enabled` and in training mode.

    The padding mask is found wherever the forward carries it: the ``attention_mask``
    argument, by keyword or by position, of the model or of the outermost module inside it
    that takes one (a Hugging Face model inside a wrapper or a ``LightningModule``). ``mask_fn``
    replaces that search for other layouts. The mask is applied to outputs whose leading
    shape is ``(B, T)``. A batch of sequences scored without one warns once when the model got a
    ``(B, T)`` bool tensor or an argument named like a mask, since its padding tokens would
    then count as real ones.

    The rows to score are drawn and copied as soon as the base representation exists (the
    base layer's output, or the site's input before the site runs), so an adapter that
    adds to it in place cannot change what is scored. Where several PEFT LoRA adapters are
    active at one site, each is scored on the base output plus its own contribution
    (``lora_B(lora_A(dropout(x))) * scaling``, read from its ``lora_B``), never on the sum
    of all of them; other layouts are scored on the site's output.

    Gradient checkpointing recomputes forwards during backward: a pair whose forward was
    scored is not scored again there, and one whose forward ran without grad (reentrant
    checkpointing) is scored from the recomputation, so each forward counts once.

    While :attr:`enabled` is False the hooks are off the model. Put back, they run after any
    forward hooks registered on the same modules in the meantime, so a hook that changes a
    base layer's output in place, registered after SAFE, is seen by the scoring from then on.

    Args:
        model: The model whose forwards are read.
        pairs: Pairs to score; pair ``i`` feeds row ``i`` of ``accumulator``.
        accumulator: Receives one minibatch per pair per forward.
        mask_fn: Called with ``model``'s forward ``(args, kwargs)``; returns the padding mask
            (bool ``(B, T)``, True for real tokens) or None for a batch without padding.
            Default: find the ``attention_mask`` argument.

    Raises:
        TypeError: If ``mask_fn`` is not callable.
    """

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[AdapterPair],
        accumulator: CKAAccumulator,
        *,
        mask_fn: MaskFn | None = None,
    ) -> None:
        if mask_fn is not None and not callable(mask_fn):
            raise TypeError(
                f"mask_fn must be a callable (args, kwargs) -> bool (B, T) mask or None, got "
                f"{type(mask_fn).__name__}"
            )
        self.accumulator = accumulator
        self._enabled = True
        self._mask_fn = mask_fn
        # The padding mask of the forward in flight, and whether a source answered for it
        # (an attention_mask argument that was passed, or mask_fn).
        self._mask: torch.Tensor | None = None
        self._answered = False
        # The mask's flat nonzero indices, found once per forward: finding them waits for the device.
        self._unmasked: torch.Tensor | None = None
        # Mask-carrying modules in flight: the outermost call of a forward sets the mask.
        self._depth = 0
        self._warned = False
        # A (B, T) tensor the model got that looks like a padding mask under another name: the
        # sign that a forward without a mask found scores padding.
        self._lookalike: tuple[str, tuple[int, ...]] | None = None
        self._model_params: list[str] = []
        # pair index -> (rows drawn, base rows (n, Dx)) of the forward in flight
        self._pending: dict[int, tuple[RowDraw, torch.Tensor]] = {}
        # pair index -> its own contribution at the drawn rows (n, Dy), for shared sites
        self._deltas: dict[int, torch.Tensor] = {}
        # pair index -> whether its last forward outside backward was scored
        self._scored: dict[int, bool] = {}
        # module -> pair indices it feeds, one dict per role
        self._bases: dict[nn.Module, list[int]] = {}
        self._inputs: dict[nn.Module, list[int]] = {}
        self._sites: dict[nn.Module, list[int]] = {}
        # lora_B module -> (pair index, site, adapter name)
        self._delta_of: dict[nn.Module, tuple[int, nn.Module, str]] = {}
        # module -> position of its attention_mask parameter (None: keyword only)
        self._mask_arg: dict[nn.Module, int | None] = {}
        for index, pair in enumerate(pairs):
            site = model.get_submodule(pair.site)
            if pair.base is None:
                self._inputs.setdefault(site, []).append(index)
            else:
                self._bases.setdefault(model.get_submodule(pair.base), []).append(index)
            self._sites.setdefault(site, []).append(index)
            lora_b = _own_delta_module(site, pair.adapter)
            if lora_b is not None and pair.adapter is not None:
                self._delta_of[lora_b] = (index, site, pair.adapter)
        # Pairs scored on the base output plus their own contribution, not the site's output.
        self._own_delta = {index for index, _, _ in self._delta_of.values()}
        self._model = model
        if mask_fn is None:
            self._find_mask_carriers(model)
        # One function per role, shared by every module (see the module docstring).
        self._hook: dict[str, Callable[..., None]] = {
            "base": run_eagerly(self._on_base),
            "input": run_eagerly(self._on_input),
            "site": run_eagerly(self._on_site),
            "delta": run_eagerly(self._on_delta),
            "mask_fn": run_eagerly(self._on_model_mask_fn),
            "enter": run_eagerly(self._on_carrier_enter),
            "leave": run_eagerly(self._on_carrier_leave),
        }
        self._handles: list[RemovableHandle] = []
        self._removed = False
        self._attach()

    @property
    def enabled(self) -> bool:
        """Whether forwards are scored. While False the hooks are off the model, so they cost nothing."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        on = bool(on)
        if on == self._enabled:
            return
        self._enabled = on
        if self._removed:
            return
        if on:
            self._attach()
        else:
            self._detach()

    def remove(self) -> None:
        """Remove every hook and drop anything held; for good."""
        self._removed = True
        self._detach()

    def _attach(self) -> None:
        """Register the hooks, the same functions each time, so compiled graphs meet them again."""
        hook = self._hook
        self._handles += [m.register_forward_hook(hook["base"]) for m in self._bases]
        self._handles += [m.register_forward_pre_hook(hook["input"]) for m in self._inputs]
        self._handles += [m.register_forward_hook(hook["site"]) for m in self._sites]
        self._handles += [m.register_forward_hook(hook["delta"]) for m in self._delta_of]
        if self._mask_fn is not None:
            self._handles.append(self._model.register_forward_pre_hook(hook["mask_fn"], with_kwargs=True))
            return
        for module in self._mask_arg:
            self._handles.append(module.register_forward_pre_hook(hook["enter"], with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(hook["leave"], with_kwargs=True, always_call=True)
            )

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._deltas.clear()
        self._scored.clear()
        self._mask = self._unmasked = None
        self._depth = 0

    # ---- the padding mask -------------------------------------------------------------

    def _find_mask_carriers(self, model: nn.Module) -> None:
        # The model and the outermost modules below it that take an attention_mask: a Hugging
        # Face model inside a wrapper. Modules nested in those get the mask from them (BERT's
        # layers get it in another form), and every hooked module splits compiled graphs.
        carriers = {model: _mask_position(model)}
        outer: list[str] = []
        for name, module in model.named_modules():  # parents before children
            if module is model or not _signature_has(module, _MASK_ARG):
                continue
            if not any(name.startswith(f"{o}.") for o in outer):
                outer.append(name)
                carriers[module] = _mask_position(module)
        self._mask_arg = carriers
        self._model_params = _positional_names(model)

    def _set_mask(self, mask: Any, *, answered: bool) -> None:
        self._mask = mask.detach().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._answered = answered
        self._unmasked = None

    def _on_model_mask_fn(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if in_backward() or self._mask_fn is None:  # a recomputation keeps its forward's mask
            return
        mask = self._mask_fn(args, kwargs)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            described = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"mask_fn must return a (B, T) mask (True for real tokens) or None, got {described}"
            )
        self._set_mask(mask, answered=True)

    def _on_carrier_enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if in_backward():  # a recomputation keeps its forward's mask
            return
        if self._depth == 0:  # the outermost carrier: a new forward
            self._set_mask(None, answered=False)
            self._lookalike = _mask_lookalike(args, kwargs, self._model_params)
        self._depth += 1
        if self._mask is None:
            position = self._mask_arg.get(module)
            if _MASK_ARG in kwargs:
                mask = kwargs[_MASK_ARG]
            elif position is not None and position < len(args):
                mask = args[position]
            else:
                return
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._set_mask(mask, answered=True)

    def _on_carrier_leave(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not in_backward():
            self._depth = max(self._depth - 1, 0)

    def _rows_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mask and its flat unmasked indices for an output ``x`` (..., D), if it fits."""
        mask = self._mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:-1]):
            self._warn_padding(x, mask)
            return None, None
        if self._unmasked is None:
            # Found where the rows are drawn (the host, by default): one copy of the mask per
            # forward, and every draw of it indexes these without touching the device.
            here = self.accumulator.generator.device
            self._unmasked = mask.reshape(-1).to(here).nonzero().squeeze(1)
        return mask, self._unmasked

    def _warn_padding(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self._warned or x.dim() < 3 or x.shape[0] < 2 or (mask is None and self._answered):
            return
        lookalike = self._lookalike
        if lookalike is not None and lookalike[1] != tuple(x.shape[:-1]):
            lookalike = None
        if mask is not None:
            found = f"the padding mask found has shape {tuple(mask.shape)}, which does not fit"
        elif lookalike is not None:
            found = f"no attention_mask was found, but the model got {lookalike[0]} of shape {lookalike[1]}"
        else:
            # Nothing in the forward suggests padding: a model without masks, or one that takes an
            # attention_mask and was called without it, so it attends to every token too.
            return
        self._warned = True
        warnings.warn(
            f"SAFE is scoring batches of sequences (output shape {tuple(x.shape)}) whose padding may "
            f"count as real tokens: {found}; the mask is read from an 'attention_mask' argument "
            "(keyword or positional) of the model or of a module inside it. Pass "
            "mask_fn=lambda args, kwargs: mask (bool (B, T), True for real tokens) to SAFEOptimizer, "
            "or mask_fn=lambda args, kwargs: None if the batches hold no padding",
            UserWarning,
            stacklevel=2,
        )

    # ---- scoring ----------------------------------------------------------------------

    def _recording(self, module: nn.Module) -> bool:
        return self._enabled and module.training and torch.is_grad_enabled()

    def _should_score(self, index: int, module: nn.Module) -> bool:
        recording = self._recording(module)
        if in_backward():
            # Checkpointing recomputes a forward: score it only if its first run was not scored.
            return recording and not self._scored.get(index, False)
        self._scored[index] = recording
        return recording

    def _capture(self, indices: list[int], module: nn.Module, value: Any) -> None:
        x = _first_tensor(value)
        if x is None or x.dim() < 2:
            return
        for index in indices:
            self._deltas.pop(index, None)
            if not self._should_score(index, module):
                self._pending.pop(index, None)
                continue
            mask, unmasked = self._rows_mask(x)
            draw = self.accumulator.draw(tuple(x.shape), mask, unmasked)
            self._pending[index] = (draw, draw.take(x))

    def _on_base(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._capture(self._bases[module], module, output)

    def _on_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._capture(self._inputs[module], module, args)

    def _on_delta(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        index, site, adapter = self._delta_of[module]
        pending = self._pending.get(index)
        delta = _first_tensor(output)
        if pending is None or delta is None or math.prod(delta.shape[:-1]) != pending[0].total:
            return
        scaling = getattr(site, "scaling", {}).get(adapter, 1.0)
        self._deltas[index] = pending[0].take(delta) * scaling  # (n, Dy)

    def _on_site(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        y = _first_tensor(output)
        for index in self._sites[module]:
            pending = self._pending.pop(index, None)
            delta = self._deltas.pop(index, None)
            if pending is None or y is None or not self._recording(module):
                continue
            draw, x = pending
            if math.prod(y.shape[:-1]) != draw.total:  # not the same tokens: nothing to compare
                continue
            if index in self._own_delta:
                if delta is None:  # the adapter did not run in this forward
                    continue
                adapted = x + delta.to(x.dtype)  # (n, D): the base plus this adapter alone
            else:
                adapted = draw.take(y)
            self.accumulator.add(index, x, adapted, padding=draw.padding)


def _own_delta_module(site: nn.Module, adapter: str | None) -> nn.Module | None:
    """The ``lora_B`` module of ``adapter`` when ``site`` runs it beside other active adapters.

    Only plain PEFT LoRA adds ``lora_B(lora_A(dropout(x))) * scaling``; variants (DoRA) and
    other layouts have no such term and are scored on the site's output.
    """
    lora_a, lora_b = getattr(site, "lora_A", None), getattr(site, "lora_B", None)
    scaling = getattr(site, "scaling", None)
    if adapter is None or not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
        return None
    active = getattr(site, "active_adapters", [])
    active = [active] if isinstance(active, str) else list(active)
    if len([a for a in active if a in lora_a]) < 2 or adapter not in lora_b or not isinstance(scaling, dict):
        return None
    if adapter in getattr(site, "lora_variant", {}) or getattr(site, "use_dora", {}).get(adapter, False):
        return None
    return lora_b[adapter]


def _signature_has(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _mask_position(module: nn.Module) -> int | None:
    """Position of ``attention_mask`` among ``module.forward``'s positional parameters, if any."""
    positional = _positional_names(module)
    return positional.index(_MASK_ARG) if _MASK_ARG in positional else None


def _positional_names(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _mask_lookalike(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]
) -> tuple[str, tuple[int, ...]] | None:
    """A forward argument that looks like a padding mask: (B, T) bool, or named like a mask."""
    named = [(names[i] if i < len(names) else f"#{i}", a) for i, a in enumerate(args)]
    for name, value in [*named, *kwargs.items()]:
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        if value.dtype == torch.bool or "mask" in name.lower():
            return f"a {value.dtype} argument {name!r}", tuple(value.shape)
    return None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None
