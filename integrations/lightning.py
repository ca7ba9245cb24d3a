"""Lightning: one callback puts SAFE around the optimizer of any ``lightning.Trainer`` run.

:class:`SAFECallback` wraps the optimizer returned by ``configure_optimizers`` in a
:class:`~safefreeze.SAFEOptimizer` when fitting starts (or adopts the one it returns), before
Lightning restores a checkpoint's optimizer state, so a resumed run re-applies its freezes
first. Lightning calls the wrapper's ``step`` once per optimizer step, gradient accumulation
included, and that call drives the engine: the callback only wires it in, logs its figures
and keeps the plan in the checkpoint.

What goes where:

- ``pl_module.log`` at the start of every training batch, so every Lightning logger gets
  them: ``safefreeze/frozen_adapters``, ``safefreeze/trainable_adapter_params`` and
  ``safefreeze/threshold``, read from the plan at the optimizer steps taken so far;
- the checkpoint: the optimizer entry holds SAFE's full state (what resuming uses), and the
  callback's entry holds the plan (what :func:`load_plan` reads).
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

from safefreeze._optional import require

require("lightning", "lightning")  # a missing extra names `pip install 'safefreeze[lightning]'`

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from safefreeze.config import SAFEConfig  # noqa: E402
from safefreeze.discovery import AdapterPattern  # noqa: E402
from safefreeze.hooks import MaskFn  # noqa: E402
from safefreeze.optimizer import SAFEOptimizer  # noqa: E402
from safefreeze.plan import FreezePlan, PlanError  # noqa: E402

__all__ = [
    "METRIC_FROZEN",
    "METRIC_THRESHOLD",
    "METRIC_TRAINABLE",
    "SAFECallback",
    "load_plan",
]

METRIC_FROZEN = "safefreeze/frozen_adapters"
METRIC_TRAINABLE = "safefreeze/trainable_adapter_params"
METRIC_THRESHOLD = "safefreeze/threshold"


class SAFECallback(Callback):
    """Freeze adapters that stopped mattering in a ``lightning.Trainer`` run.

    Add it to the trainer's callbacks and return a plain optimizer from
    ``configure_optimizers``; nothing else changes. The wrapped model is the
    LightningModule, so adapter names start with the attribute that holds the network
    (``net.base_model.model...``). Time is counted in optimizer steps: with
    ``accumulate_grad_batches=k`` SAFE advances once every ``k`` batches, like
    ``trainer.global_step``.

    Resume with ``trainer.fit(module, ckpt_path=...)``: Lightning loads the optimizer's
    state into the wrapper, which re-applies every freeze before it restores the inner
    optimizer's state, so frozen parameters stay frozen and hold no optimizer state.

    Args:
        config: SAFE settings (default :class:`~safefreeze.SAFEConfig`).
        plan: A recorded :class:`~safefreeze.FreezePlan` to replay instead of scoring.
        pattern: Adapter layout, or a list of layouts (default: SAFEOptimizer's).
        mask_fn: Returns the padding mask from the LightningModule's forward ``(args, kwargs)``
            (see :class:`~safefreeze.SAFEOptimizer`); default: the ``attention_mask``
            argument of the module or of the outermost module inside it that takes one.
        log_figures: Whether to log SAFE's figures with ``pl_module.log``.
        **options: Any other keyword option of :class:`~safefreeze.SAFEOptimizer`, passed on.

    Raises:
        ValueError: If both ``config`` and ``plan`` are given (a plan brings its config).
        TypeError: If ``options`` names something SAFEOptimizer does not take.

    Example:
        >>> from safefreeze import SAFEConfig
        >>> callback = SAFECallback(SAFEConfig(warmup_steps=50, freeze_end_step=100))
        >>> # trainer = lightning.Trainer(max_steps=200, callbacks=[callback])
        >>> callback.optimizer is None
        True
    """

    def __init__(
        self,
        config: SAFEConfig | None = None,
        *,
        plan: FreezePlan | None = None,
        pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
        mask_fn: MaskFn | None = None,
        log_figures: bool = True,
        **options: Any,
    ) -> None:
        if config is not None and plan is not None:
            raise ValueError(
                "SAFECallback got both a config and a plan; a plan replays under its own config "
                "(plan.config): pass one of them"
            )
        allowed = _optimizer_options()
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"SAFECallback got unexpected keyword argument(s) {unknown}; besides config, plan, "
                f"pattern, mask_fn and log_figures it takes SAFEOptimizer's keyword options "
                f"{sorted(allowed)}"
            )
        self.config = config
        self.replay_plan = plan
        self.pattern = pattern
        self.mask_fn = mask_fn
        # Not `log`: Lightning sets every callback's `log` to the module's `log` method.
        self.log_figures = log_figures
        self.options = options
        self._optimizer: SAFEOptimizer | None = None

    @property
    def optimizer(self) -> SAFEOptimizer | None:
        """The SAFEOptimizer of the current (or last) fit; None before the first fit starts."""
        return self._optimizer

    @property
    def plan(self) -> FreezePlan:
        """The plan recorded so far by the current (or last) fit.

        Raises:
            RuntimeError: If no fit has started yet.
        """
        if self._optimizer is None:
            raise RuntimeError("SAFECallback has no plan before trainer.fit(...) starts")
        return self._optimizer.plan

    # ---- Lightning events ---------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the optimizer from ``configure_optimizers``, or adopt the SAFEOptimizer it returned.

        Lightning calls this after ``configure_optimizers`` and before it restores a
        checkpoint's optimizer state.

        Raises:
            ValueError: If there is no optimizer, several and none or more than one is a
                SAFEOptimizer, or a returned SAFEOptimizer meets this callback's own
                settings.
        """
        optimizers = list(trainer.strategy.optimizers)
        safe = [opt for opt in optimizers if isinstance(opt, SAFEOptimizer)]
        if len(safe) > 1:
            raise ValueError(
                f"configure_optimizers returned {len(safe)} SAFEOptimizers; SAFE drives one optimizer, "
                "the one that holds the adapters"
            )
        if safe:
            given = [
                name
                for name, value in (
                    ("config", self.config),
                    ("plan", self.replay_plan),
                    ("pattern", self.pattern),
                    ("mask_fn", self.mask_fn),
                )
                if value is not None
            ] + sorted(self.options)
            if given:
                raise ValueError(
                    "configure_optimizers returned a SAFEOptimizer, and SAFECallback was given "
                    f"{' and '.join(given)} as well; give them in one place: either return the plain "
                    "optimizer and let the callback wrap it, or build SAFECallback() without arguments"
                )
            self._optimizer = safe[0]
            return
        if len(optimizers) != 1:
            raise ValueError(
                f"SAFECallback wraps the one optimizer of configure_optimizers, got {len(optimizers)}; "
                "with several optimizers, return SAFEOptimizer(optimizer, self, config) for the one "
                "that holds the adapters and add SAFECallback() without arguments"
            )
        self._optimizer = SAFEOptimizer(
            optimizers[0],
            pl_module,
            self.config,
            plan=self.replay_plan,
            pattern=self.pattern,
            mask_fn=self.mask_fn,
            **self.options,
        )
        # The setter also rebuilds the LightningOptimizer views that the loops step.
        trainer.strategy.optimizers = [self._optimizer]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log SAFE's figures in effect for this batch: those after the optimizer steps taken so far.

        Lightning logs them at its step ``s`` (``trainer.global_step``), so the value at ``s``
        is the plan's at step ``s``, as :mod:`safefreeze.integrations.mlflow` logs it.
        """
        if not self.log_figures or self._optimizer is None:
            return
        plan, step = self._optimizer.plan, self._optimizer.controller.step
        # float64: a float32 count is exact only up to 2**24 parameters.
        figures = {
            METRIC_FROZEN: float(len(plan.frozen_adapters_at(step))),
            METRIC_TRAINABLE: float(plan.trainable_params_at(step)),
            METRIC_THRESHOLD: plan.threshold_at(step),
        }
        for name, value in figures.items():
            # A CPU tensor is logged as it is, on any accelerator; only its .item() is read.
            pl_module.log(name, torch.tensor(value, dtype=torch.float64), on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove SAFE's hooks when fitting ends; the plan stays readable."""
        if stage == "fit":
            self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove SAFE's hooks when fitting fails, so the model can be wrapped again."""
        self._close()

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The plan so far, as JSON-friendly data; SAFE's full state is in the optimizer's entry."""
        if self._optimizer is None:
            return {}
        return {"plan": self._optimizer.plan.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here: the optimizer's checkpoint entry re-applies SAFE's state."""

    def _close(self) -> None:
        if self._optimizer is not None:
            self._optimizer.close()


def _optimizer_options() -> set[str]:
    """SAFEOptimizer's keyword-only options other than the callback's own."""
    parameters = inspect.signature(SAFEOptimizer).parameters.values()
    own = {"plan", "pattern", "mask_fn"}
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY} - own


def load_plan(checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> FreezePlan:
    """Read the freeze plan that :class:`SAFECallback` stored in a Lightning checkpoint.

    Args:
        checkpoint: A checkpoint file written by ``lightning.Trainer`` (or
            ``trainer.save_checkpoint``), or the dict loaded from one.

    Returns:
        The plan recorded up to the checkpoint's step, ready for ``SAFECallback(plan=...)``.

    Raises:
        PlanError: If the checkpoint holds no SAFECallback entry, or a malformed plan.

    Example:
        >>> plan = load_plan("checkpoints/last.ckpt")  # doctest: +SKIP
    """
    if isinstance(checkpoint, Mapping):
        data: Mapping[str, Any] = checkpoint
        source = "checkpoint"
    else:
        source = os.fspath(checkpoint)
        try:
            # The plan is plain data, so the safe loader reads it.
            data = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise PlanError(
                f"{source}: torch.load(weights_only=True) refused the checkpoint ({err}); if you trust "
                "the file, pass torch.load(path, weights_only=False) to load_plan instead of the path"
            ) from None
    callbacks = data.get("callbacks")
    entries = (
        [v for k, v in callbacks.items() if str(k).split("{", 1)[0] == SAFECallback.__qualname__]
        if isinstance(callbacks, Mapping)
        else []
    )
    found = [e["plan"] for e in entries if isinstance(e, Mapping) and "plan" in e]
    if len(found) != 1:
        keys = sorted(map(str, callbacks)) if isinstance(callbacks, Mapping) else []
        raise PlanError(
            f"{source}: expected one SAFECallback entry with a plan among the checkpoint's callbacks, "
            f"found {len(found)} (callback entries: {keys}); was it written by a run with SAFECallback?"
        )
    return FreezePlan.from_dict(found[0], source=source)
