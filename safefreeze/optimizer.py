"""``SAFEOptimizer``: wraps any torch optimizer so a training loop changes one line."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from safefreeze.config import SAFEConfig
from safefreeze.controller import FreezeCallback, FreezeController
from safefreeze.discovery import AdapterPattern
from safefreeze.hooks import MaskFn
from safefreeze.measure import tensor_bytes
from safefreeze.plan import FreezePlan


class SAFEOptimizer(Optimizer):
    """Wrap ``optimizer`` so adapters that stopped mattering are frozen for real.

    On a freeze each parameter gets ``requires_grad_(False)`` and ``grad = None``, leaves
    its param group and loses its optimizer state. Groups are never deleted or reordered,
    so LR schedulers keep indexing them.

    NOTE: this subclasses :class:`torch.optim.Optimizer` only so LR schedulers,
    ``GradScaler`` and trainers accept it; it skips ``Optimizer.__init__`` and delegates
    ``param_groups``, ``state`` and ``defaults`` to the wrapped optimizer.

    Args:
        optimizer: Any optimizer instance holding the adapters' parameters.
        model: The model holding the adapters.
        config: SAFE settings (default :class:`SAFEConfig`); taken from ``plan`` if given.
        plan: A recorded :class:`FreezePlan` to replay without scoring and without hooks.
        pattern: Adapter layout, or a list of layouts for a model that mixes them
            (default: the PEFT tuners LoRA, AdaLoRA, LoHa, LoKr and IA3).
        mask_fn: Called with ``model``'s forward ``(args, kwargs)`` on every scored forward;
            returns the padding mask (bool ``(B, T)``, True for real tokens) or None for a
            batch without padding. Default: the ``attention_mask`` argument of the model or
            of the outermost module inside it that takes one, by keyword or position.

    Use it as a context manager, or call :meth:`close`, to remove its hooks when training
    ends; only one live SAFEOptimizer may drive a model's adapters at a time.

    Raises:
        TypeError: If ``optimizer`` is not an optimizer instance, or is a SAFEOptimizer, or
            ``mask_fn`` is not callable.
        ValueError: If ``optimizer`` does not hold every trainable adapter parameter, or PEFT
            AdaLoRA still allocates ranks at ``warmup_steps``.
        RuntimeError: If another live SAFEOptimizer already drives the model's adapters.
        AdapterDiscoveryError: If no adapter is found.
        PlanMismatchError: If ``plan`` does not fit ``model``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from safefreeze import AdapterPattern, SAFEConfig
        >>> class LoRA(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base = nn.Linear(8, 8)
        ...         self.lora_down, self.lora_up = nn.Linear(8, 2), nn.Linear(2, 8)
        ...     def forward(self, x):
        ...         return self.base(x) + self.lora_up(self.lora_down(x))
        >>> model = nn.Sequential(LoRA(), nn.Tanh(), LoRA())
        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> config = SAFEConfig.paper(warmup_steps=2, freeze_end_step=2, tau_target=1.0)
        >>> opt = SAFEOptimizer(inner, model, config,
        ...                     pattern=AdapterPattern(base="base", params=r"lora_(?:down|up)\\..+"))
        >>> for _ in range(3):
        ...     model(torch.randn(16, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> len(opt.frozen_adapters)  # the paper's rule at tau_target=1.0: all but the top adapter
        1
        >>> opt.plan.events[0].step
        2
        >>> opt.close()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        config: SAFEConfig | None = None,
        *,
        plan: FreezePlan | None = None,
        pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
        mask_fn: MaskFn | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"SAFEOptimizer wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SAFEOptimizer):
            raise TypeError(
                "SAFEOptimizer got a SAFEOptimizer to wrap; wrap the inner optimizer once "
                "(SAFEOptimizer(torch.optim.AdamW(...), model)), never a SAFEOptimizer again"
            )
        self.optimizer = optimizer
        # Optimizer attributes that torch's own helpers read on any Optimizer.
        # Hook registries of torch's Optimizer API, run by this wrapper's own methods.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._check_named([p for g in optimizer.param_groups for p in g["params"]])
        self.controller = FreezeController(
            model, config, plan=plan, pattern=pattern, freezer=self._drop, mask_fn=mask_fn
        )
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [self._names[id(p)] for p in self.controller.trainable_params() if id(p) not in held]
        if missing:
            self.controller.close()
            raise ValueError(
                f"the wrapped optimizer does not hold {len(missing)} trainable adapter parameter(s), "
                f"e.g. {missing[:3]}; build it from model.parameters() (or the adapters' parameters) "
                "of the same model instance passed to SAFEOptimizer"
            )

    # ---- delegation -------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._names = {id(p): n for n, p in self.controller.model.named_parameters()}
        try:
            self._check_named(self.optimizer.param_groups[-1]["params"])
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the wrapped optimizer, then advance SAFE one optimizer step.

        Step hooks registered on this wrapper run around it; the wrapped optimizer runs
        its own and the global ones.
        """
        if self.controller.closed:
            raise RuntimeError("this SAFEOptimizer was closed; build a new one to go on training with SAFE")
        args: tuple[Any, ...] = () if closure is None else (closure,)
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            pre_hook(self, args, {})
        loss: float | None = self.optimizer.step(*args)
        self.controller.on_step_end()
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, {})
        return loss

    def __repr__(self) -> str:
        frozen, total = len(self.frozen_adapters), len(self.controller.pairs)
        return f"SAFEOptimizer({self.optimizer!r}, frozen_adapters={frozen}/{total})"

    def close(self) -> None:
        """Remove SAFE's hooks from the model and release it; the optimizer stops freezing."""
        self.controller.close()

    def __enter__(self) -> SAFEOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- SAFE -------------------------------------------------------------------------

    @property
    def plan(self) -> FreezePlan:
        """The plan recorded so far (config, adapters, scores, freeze events)."""
        return self.controller.plan

    @property
    def scores(self) -> dict[str, float]:
        """Normalized score per freeze unit (running during the warm-up, final after)."""
        return self.controller.scores

    @property
    def frozen_adapters(self) -> list[str]:
        """Names of the frozen adapters, in model order."""
        return self.controller.frozen_adapters

    @property
    def frozen_units(self) -> list[str]:
        """Names of the frozen units, in model order."""
        return self.controller.frozen_units

    def add_freeze_callback(self, callback: FreezeCallback) -> None:
        """Call ``callback(event)`` after every freeze event."""
        self.controller.add_callback(callback)

    def remove_freeze_callback(self, callback: FreezeCallback) -> None:
        """Stop calling ``callback``."""
        self.controller.remove_callback(callback)

    def _check_named(self, params: list[torch.Tensor]) -> None:
        """Checkpoints key state by parameter name, so every held tensor needs one."""
        unnamed = [p for p in params if id(p) not in self._names]
        if unnamed:
            raise ValueError(
                f"the wrapped optimizer holds {len(unnamed)} tensor(s) that are not parameters of "
                f"the model (shapes {[tuple(p.shape) for p in unnamed[:3]]}); SAFEOptimizer keys its "
                "checkpoints by parameter name, so register them on the model or give them their "
                "own optimizer"
            )

    def _drop(self, params: list[nn.Parameter]) -> int:
        """Take ``params`` out of training: no grad, out of their group, no state."""
        ids = {id(p) for p in params}
        freed = 0
        for p in params:
            p.requires_grad_(False)
            p.grad = None
            freed += tensor_bytes(self.optimizer.state.pop(p, {}).values())
        for group in self.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        return freed

    # ---- checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state keyed by parameter names, plus SAFE's own state."""
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        inner = self.optimizer.state_dict()
        names = [self._names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        state = {
            "inner": {
                "state": {names[i]: s for i, s in inner["state"].items()},
                "param_groups": [
                    {**g, "params": [names[i] for i in g["params"]]} for g in inner["param_groups"]
                ],
            },
            "safe": self.controller.state_dict(),
        }
        for post_hook in list(self._optimizer_state_dict_post_hooks.values()):
            state = post_hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Re-apply SAFE's freezes, then load the inner optimizer's state.

        Everything is checked before anything changes, and a failure of the inner load is
        rolled back: a failed load leaves this optimizer, its groups and state, and the
        model's ``requires_grad`` flags and gradients as they were.

        Raises:
            PlanError: If SAFE's state is malformed, of an unknown version or inconsistent.
            PlanMismatchError: If the checkpoint was saved on other adapters.
            ValueError: If ``state_dict`` is not a SAFEOptimizer checkpoint, its parameter
                names do not match this optimizer's, or the wrapped optimizer refuses its state.
        """
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = pre_hook(self, state_dict) or state_dict
        safe, inner = _split_checkpoint(state_dict)
        pending = self.controller.prepare_load(safe, source="optimizer checkpoint")
        dropped = {self._names[id(p)] for p in pending.params}
        # Per group, the names held here once the checkpoint's freezes are re-applied.
        here = [
            [self._names[id(p)] for p in g["params"] if self._names[id(p)] not in dropped]
            for g in self.optimizer.param_groups
        ]
        there = [list(g["params"]) for g in inner["param_groups"]]
        if here != there:
            mine, theirs = {n for g in here for n in g}, {n for g in there for n in g}
            missing, extra = sorted(theirs - mine)[:3], sorted(mine - theirs)[:3]
            raise ValueError(
                "the optimizer checkpoint does not match this optimizer's parameters after "
                f"re-applying freezes: in the checkpoint only {missing}, here only {extra}"
                + (
                    ""
                    if missing or extra
                    else f"; same names grouped or ordered differently ({len(there)} group(s) in the "
                    f"checkpoint, {len(here)} here)"
                )
            )
        index = {name: i for i, name in enumerate(n for g in here for n in g)}
        unknown = sorted(n for n in inner["state"] if n not in index)
        if unknown:
            raise ValueError(
                f"the optimizer checkpoint holds state for parameters it does not list: {unknown[:3]}"
            )
        undo = _Snapshot(self.optimizer, pending.params)
        try:
            self._drop(pending.params)
            self.optimizer.load_state_dict(
                {
                    "state": {index[n]: s for n, s in inner["state"].items()},
                    "param_groups": [
                        {**g, "params": [index[n] for n in g["params"]]} for g in inner["param_groups"]
                    ],
                }
            )
        except Exception as err:
            undo.restore()
            kinds = sorted({k for s in inner["state"].values() if isinstance(s, dict) for k in s})
            raise ValueError(
                f"the wrapped {type(self.optimizer).__name__} refused the checkpoint's optimizer state "
                f"({type(err).__name__}: {err}); its per-parameter state holds {kinds}: was it saved "
                "from another optimizer class? Nothing was changed"
            ) from err
        pending.commit()
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)


class _Snapshot:
    """What a load may change in the wrapped optimizer and the model, to put it back."""

    def __init__(self, optimizer: Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.groups = optimizer.param_groups
        self.group_items = [dict(g) for g in self.groups]
        self.state = optimizer.state
        self.state_items = dict(optimizer.state)
        self.params = [(p, p.requires_grad, p.grad) for p in params]

    def restore(self) -> None:
        for group, items in zip(self.groups, self.group_items, strict=True):
            group.clear()
            group.update(items)
        self.state.clear()
        self.state.update(self.state_items)
        # Optimizer.load_state_dict rebinds both attributes before it can fail.
        self.optimizer.__dict__["param_groups"] = self.groups
        self.optimizer.__dict__["state"] = self.state
        for p, requires_grad, grad in self.params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _split_checkpoint(state_dict: Any) -> tuple[Any, dict[str, Any]]:
    """``(safe, inner)`` of a SAFEOptimizer checkpoint, or a ValueError saying what it is."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"SAFEOptimizer.load_state_dict takes a dict, got {type(state_dict).__name__}")
    keys = set(state_dict)
    if keys >= {"state", "param_groups"} and "safe" not in keys:
        raise ValueError(
            "this is a plain torch optimizer state dict (keys 'state' and 'param_groups'), not a "
            "SAFEOptimizer checkpoint (keys 'inner' and 'safe'): load it into the inner optimizer "
            "before wrapping it, or save checkpoints with SAFEOptimizer.state_dict()"
        )
    if keys != {"inner", "safe"}:
        raise ValueError(
            f"a SAFEOptimizer checkpoint has exactly the keys ['inner', 'safe'], got {sorted(map(str, keys))}"
        )
    inner = state_dict["inner"]
    if (
        not isinstance(inner, dict)
        or set(inner) != {"state", "param_groups"}
        or not isinstance(inner["state"], dict)
        or not isinstance(inner["param_groups"], list)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in inner["param_groups"])
    ):
        raise ValueError(
            "the checkpoint's 'inner' entry is not an optimizer state keyed by parameter names "
            "({'state': {name: ...}, 'param_groups': [{'params': [names], ...}]})"
        )
    return state_dict["safe"], inner
