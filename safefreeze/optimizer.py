"""``SAFEOptimizer``: wraps any torch optimizer so a training loop changes one line."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from safefreeze.config import SAFEConfig
from safefreeze.controller import FreezeCallback, FreezeController
from safefreeze.discovery import AdapterPattern
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
        pattern: Adapter layout (default: PEFT LoRA).

    Raises:
        TypeError: If ``optimizer`` is not an optimizer instance.
        ValueError: If ``optimizer`` does not hold every trainable adapter parameter.
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
        >>> opt = SAFEOptimizer(inner, model, SAFEConfig(warmup_steps=2, freeze_end_step=2, tau_target=1.0),
        ...                     pattern=AdapterPattern(base="base", params=r"lora_(?:down|up)\\..+"))
        >>> for _ in range(3):
        ...     model(torch.randn(16, 8)).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> len(opt.frozen)  # with tau_target=1.0 all but the top adapter freeze at step 2
        1
        >>> opt.plan.events[0].step
        2
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        config: SAFEConfig | None = None,
        *,
        plan: FreezePlan | None = None,
        pattern: AdapterPattern | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"SAFEOptimizer wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
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
        self.controller = FreezeController(model, config, plan=plan, pattern=pattern, freezer=self._drop)
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
        args: tuple[Any, ...] = () if closure is None else (closure,)
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            pre_hook(self, args, {})
        loss: float | None = self.optimizer.step(*args)
        self.controller.on_step_end()
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, {})
        return loss

    def __repr__(self) -> str:
        return f"SAFEOptimizer({self.optimizer!r}, frozen={len(self.frozen)}/{len(self.controller.pairs)})"

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
    def frozen(self) -> list[str]:
        """Names of the frozen adapters, in model order."""
        return self.controller.frozen_adapters

    def add_freeze_callback(self, callback: FreezeCallback) -> None:
        """Call ``callback(event)`` after every freeze event."""
        self.controller.callbacks.append(callback)

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

        Everything is checked before anything changes: a failed load leaves this optimizer,
        its groups and the model's ``requires_grad`` flags as they were.

        Raises:
            PlanMismatchError: If the checkpoint was saved on other adapters.
            ValueError: If the parameter names in ``state_dict`` do not match this optimizer's.
        """
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = pre_hook(self, state_dict) or state_dict
        safe, inner = state_dict["safe"], state_dict["inner"]
        saved_plan = FreezePlan.from_dict(safe["plan"], source="optimizer checkpoint")
        saved_plan.check_matches(self.controller.plan.adapters)
        owned = {a.name: [n for n, _ in a.params] for a in saved_plan.adapters}
        dropped = {n for event in saved_plan.events for a in event.adapters for n in owned[a]}
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
        self.controller.load_state_dict(safe)
        index = {
            self._names[id(p)]: i
            for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])
        }
        self.optimizer.load_state_dict(
            {
                "state": {index[n]: s for n, s in inner["state"].items()},
                "param_groups": [
                    {**g, "params": [index[n] for n in g["params"]]} for g in inner["param_groups"]
                ],
            }
        )
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)
