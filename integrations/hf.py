"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` with SAFE, on the optimizer the Trainer builds.

- :class:`SAFETrainer`: ``transformers.Trainer`` with SAFE;
- ``SAFESFTTrainer``: ``trl.SFTTrainer`` with SAFE (imports TRL when first used);
- :func:`with_safe`: the same for any other Trainer subclass;
- :class:`SAFETrainerMixin`: what they add, for a class hierarchy of your own.

The Trainer keeps building its own optimizer from ``TrainingArguments.optim`` (or
``optimizers=`` / ``optimizer_cls_and_kwargs=``); these trainers wrap it in a
:class:`~safefreeze.SAFEOptimizer`, so SAFE drives the optimizer the user chose. From then
on the Trainer's own events do the rest:

- the Trainer calls ``optimizer.step()`` once per optimizer step, after all gradient
  accumulation micro-batches, so SAFE's warm-up and freeze steps are optimizer steps
  (``state.global_step``);
- every ``Trainer.log`` call carries :data:`METRIC_FROZEN`, :data:`METRIC_TRAINABLE` and
  :data:`METRIC_THRESHOLD`, so they land in ``trainer.state.log_history`` and reach every
  ``report_to`` backend (MLflow, TensorBoard, W&B, ...);
- each checkpoint folder ``checkpoint-N/`` gets the plan so far as :data:`PLAN_FILE`; SAFE's
  full state (step, scoring statistics, frozen set) travels in the Trainer's
  ``optimizer.pt``, so ``train(resume_from_checkpoint=...)`` re-applies every freeze
  (``save_only_model=True`` writes no ``optimizer.pt``, so SAFE would start over).

Example:
    >>> trainer = SAFETrainer(model=peft_model, args=args, train_dataset=data,  # doctest: +SKIP
    ...                       safe_config=SAFEConfig(warmup_steps=100, freeze_end_step=400))
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.safe_optimizer.frozen_adapters  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from safefreeze._optional import require

require("transformers", "hf")  # a missing extra names `pip install 'safefreeze[hf]'`

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

from safefreeze.config import SAFEConfig  # noqa: E402
from safefreeze.discovery import AdapterPattern  # noqa: E402
from safefreeze.optimizer import SAFEOptimizer  # noqa: E402
from safefreeze.plan import FreezePlan  # noqa: E402

__all__ = [
    "METRIC_FROZEN",
    "METRIC_THRESHOLD",
    "METRIC_TRAINABLE",
    "PLAN_FILE",
    "SAFETrainer",
    "SAFETrainerMixin",
    "find_safe_optimizer",
    "safe_logs",
    "with_safe",
]

# Log keys, the same names the MLflow integration gives its metrics.
METRIC_FROZEN = "safefreeze/frozen_adapters"
METRIC_TRAINABLE = "safefreeze/trainable_adapter_params"
METRIC_THRESHOLD = "safefreeze/threshold"
# The plan's file name inside each checkpoint folder.
PLAN_FILE = "safefreeze_plan.json"

# mypy sees the mixin as a Trainer (its super() calls are the Trainer's); at run time it is a
# plain mixin that with_safe() puts in front of any Trainer class.
if TYPE_CHECKING:
    from transformers import Trainer as _MixinBase
else:
    _MixinBase = object


def find_safe_optimizer(optimizer: object) -> SAFEOptimizer | None:
    """The :class:`~safefreeze.SAFEOptimizer` inside ``optimizer``, or None.

    Accelerate wraps the Trainer's optimizer (``AcceleratedOptimizer``), and so may
    others; each wrapper holds the next one as ``.optimizer``.

    Args:
        optimizer: The Trainer's ``optimizer`` (a callback gets it as ``optimizer=``).

    Returns:
        The SAFEOptimizer found by following ``.optimizer``, or None if there is none.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, SAFEOptimizer):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def safe_logs(optimizer: SAFEOptimizer) -> dict[str, float]:
    """SAFE's figures at the optimizer's current step, keyed as the Trainer logs them.

    Args:
        optimizer: The SAFEOptimizer driving the run.

    Returns:
        The frozen adapter count under ``METRIC_FROZEN``, the adapter parameter elements
        still training under ``METRIC_TRAINABLE`` and the cubic threshold under
        ``METRIC_THRESHOLD``, read from the plan.
    """
    plan, step = optimizer.plan, optimizer.controller.step
    return {
        METRIC_FROZEN: len(plan.frozen_adapters_at(step)),
        METRIC_TRAINABLE: plan.trainable_params_at(step),
        METRIC_THRESHOLD: plan.threshold_at(step),
    }


class _SavePlan(TrainerCallback):
    """Writes the plan into each checkpoint folder the Trainer saves."""

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        safe = find_safe_optimizer(optimizer)
        if safe is None or not args.should_save or args.output_dir is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            safe.plan.save(os.path.join(folder, PLAN_FILE))


class SAFETrainerMixin(_MixinBase):
    """Put in front of a ``transformers.Trainer`` class to train its model's adapters with SAFE.

    The Trainer builds its optimizer as usual (``TrainingArguments.optim``, or
    ``optimizers=`` / ``optimizer_cls_and_kwargs=``); :meth:`create_optimizer` wraps it in a
    :class:`~safefreeze.SAFEOptimizer` over ``trainer.model``. An optimizer passed in that
    already is a SAFEOptimizer is used as it is. :func:`with_safe` builds the subclass.

    Args:
        *args: The Trainer's positional arguments.
        safe_config: SAFE settings (default :class:`~safefreeze.SAFEConfig`).
        safe_plan: A recorded :class:`~safefreeze.FreezePlan` to replay instead of scoring
            (e.g. ``FreezePlan.load("checkpoint-500/safefreeze_plan.json")``).
        safe_pattern: Adapter layout, or a list of them for a model that mixes layouts
            (default: the PEFT tuners, see :class:`~safefreeze.AdapterPattern`).
        **kwargs: The Trainer's keyword arguments.

    Raises:
        TypeError: If ``safe_config`` is not a SAFEConfig, ``safe_plan`` not a FreezePlan
            or ``safe_pattern`` not an AdapterPattern (or a list of them), or if ``optimizers=`` passes a
            SAFEOptimizer together with any of them.
    """

    def __init__(
        self,
        *args: Any,
        safe_config: SAFEConfig | None = None,
        safe_plan: FreezePlan | None = None,
        safe_pattern: AdapterPattern | Sequence[AdapterPattern] | None = None,
        **kwargs: Any,
    ) -> None:
        patterns = list(safe_pattern) if isinstance(safe_pattern, (list, tuple)) else [safe_pattern]
        for name, values, kind, expected in (
            ("safe_config", [safe_config], SAFEConfig, "a SAFEConfig"),
            ("safe_plan", [safe_plan], FreezePlan, "a FreezePlan"),
            ("safe_pattern", patterns, AdapterPattern, "an AdapterPattern (or a list of them)"),
        ):
            for value in values:
                if value is not None and not isinstance(value, kind):
                    raise TypeError(f"{name} must be {expected} or None, got {type(value).__name__}")
        self.safe_config = safe_config
        self.safe_plan = safe_plan
        self.safe_pattern = safe_pattern
        self._safe: SAFEOptimizer | None = None
        super().__init__(*args, **kwargs)
        if find_safe_optimizer(self.optimizer) is not None and any(
            v is not None for v in (safe_config, safe_plan, safe_pattern)
        ):
            raise TypeError(
                "the trainer got a SAFEOptimizer (optimizers=...) and safe_config/safe_plan/safe_pattern "
                "as well; give the settings to the SAFEOptimizer only, or pass a plain optimizer and let "
                "the trainer wrap it"
            )
        self.add_callback(_SavePlan())

    @property
    def safe_optimizer(self) -> SAFEOptimizer | None:
        """The SAFEOptimizer driving this trainer's adapters; None before training starts."""
        return self._safe

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the Trainer's optimizer as usual, then wrap it in a SAFEOptimizer.

        Args:
            model: The model to optimize (default ``self.model``), as the Trainer passes it.

        Returns:
            The optimizer to train with: the new SAFEOptimizer, or the optimizer passed in
            (or built by an earlier ``train()``) that already holds one. Either way the
            SAFEOptimizer is :attr:`safe_optimizer`.

        Raises:
            TypeError: If the optimizer the Trainer built is not a ``torch.optim.Optimizer``
                (some ``optim`` choices build other objects).
            ValueError: If the trainer has no model.
        """
        optimizer: object = super().create_optimizer(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optim = getattr(self.args.optim, "value", self.args.optim)
            raise TypeError(
                f"SAFE wraps a torch.optim.Optimizer, but the trainer built a {type(optimizer).__name__} "
                f"(TrainingArguments.optim={optim!r}); choose an optim that builds a torch optimizer "
                "(adamw_torch, sgd, adafactor, ...)"
            )
        safe = find_safe_optimizer(optimizer)
        if safe is not None:  # passed in, or built by an earlier train() call
            self._safe = safe
            return optimizer
        target = self.model if model is None else model
        if target is None:
            raise ValueError(
                "the trainer has no model to wrap the optimizer around; pass model= or model_init="
            )
        self._safe = SAFEOptimizer(
            optimizer,
            target,
            self.safe_config,
            plan=self.safe_plan,
            pattern=self.safe_pattern,
        )
        self.optimizer = self._safe
        return self._safe

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add SAFE's figures (:func:`safe_logs`) to ``logs``, then log as the Trainer does.

        Args:
            logs: The values to log.
            start_time: The start of training, as the Trainer passes it.
        """
        if self._safe is not None:
            logs.update(safe_logs(self._safe))
        super().log(logs, start_time)


class SAFETrainer(SAFETrainerMixin, Trainer):
    """``transformers.Trainer`` that trains its model's adapters with SAFE.

    Takes every argument the Trainer takes, plus ``safe_config``, ``safe_plan`` and
    ``safe_pattern`` (see :class:`SAFETrainerMixin`).
    """


# Trainer class -> its SAFE subclass, so with_safe returns one class per Trainer class.
_SAFE_CLASSES: dict[type[Trainer], type[SAFETrainerMixin]] = {Trainer: SAFETrainer}


def with_safe(trainer_cls: type[Trainer]) -> type[SAFETrainerMixin]:
    """A subclass of ``trainer_cls`` that trains with SAFE, named ``SAFE<Name>``.

    Args:
        trainer_cls: ``transformers.Trainer`` or any subclass of it (``trl.SFTTrainer``, ...).

    Returns:
        The subclass, with :class:`SAFETrainerMixin` in front; the same class on every call,
        and ``trainer_cls`` itself if it already has the mixin.

    Raises:
        TypeError: If ``trainer_cls`` is not a subclass of ``transformers.Trainer``.

    Example:
        >>> with_safe(Trainer) is SAFETrainer
        True
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_safe takes a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, SAFETrainerMixin):
        return trainer_cls
    if trainer_cls not in _SAFE_CLASSES:
        name = f"SAFE{trainer_cls.__name__}"
        _SAFE_CLASSES[trainer_cls] = type(
            name,
            (SAFETrainerMixin, trainer_cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"``{trainer_cls.__qualname__}`` with SAFE.",
            },
        )
    return _SAFE_CLASSES[trainer_cls]


def __getattr__(name: str) -> Any:
    # SAFESFTTrainer imports TRL, which only its users need.
    if name == "SAFESFTTrainer":
        try:
            trl = importlib.import_module("trl")
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "SAFESFTTrainer needs TRL, which is not installed; install it with: pip install trl",
                name="trl",
            ) from err
        return with_safe(trl.SFTTrainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
