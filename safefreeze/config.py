"""``SAFEConfig``: every knob of the method, validated on construction, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from safefreeze.selection import NORMALIZATIONS as _NORMALIZATIONS
from safefreeze.selection import ORDERS as _ORDERS
from safefreeze.selection import UNITS as _UNITS

# Shares of a run's optimizer steps at which SAFEConfig.for_run ends the warm-up and the ramp,
# by order: the lowest-first rule does not read the scores, so its warm-up is short and its ramp
# long; the rules that read them keep a warm-up long enough for the block ranking to settle.
SCHEDULE_SHARES = {"depth": (0.1, 0.6), "prefix": (0.25, 0.5), "score": (0.25, 0.5)}
# Warm-up steps scored by default (score_every=None) under a rule the scores do not steer.
UNSTEERED_SCORED_STEPS = 8
# The eval_frozen value that runs only a frozen unit's attention modules in evaluation mode.
EVAL_ATTENTION = "attention"


@dataclasses.dataclass(frozen=True)
class SAFEConfig:
    """Configuration of Selective Adapter Freezing.

    Time is counted in optimizer steps, so gradient accumulation does not stretch it;
    :meth:`from_epochs` converts epochs. Every field is validated on construction.

    Example:
        >>> cfg = SAFEConfig(warmup_steps=10, freeze_end_step=40, tau_target=0.5)
        >>> SAFEConfig.from_json(cfg.to_json()) == cfg
        True
    """

    # t_w: optimizer steps of warm-up during which every adapter trains and is scored.
    warmup_steps: int = 100
    # t_f: step at which the cubic threshold reaches tau_target (t_f >= t_w).
    freeze_end_step: int = 200
    # tau_T: final threshold on normalized scores; units scoring below it may freeze. With
    # "rank" normalization it is the share of units that may freeze: tau_T * units, rounded.
    tau_target: float = 0.67
    # How raw importance scores are normalized before thresholding: "rank" (share of units
    # scoring lower), "max" (share of the top score, the paper), "sum" or "none".
    normalization: str = "rank"
    # Score on every k-th optimizer step of the warm-up (1 = every step). None: every step
    # where the scores steer the freezing, else every ceil(warmup_steps / 8)-th: score_interval.
    score_every: int | None = None
    # Tokens (rows) subsampled per adapter per scored step; None keeps every token.
    max_tokens: int | None = 64
    # Regex over adapter names; adapters with equal capture groups freeze as one unit.
    # Overrides `units`.
    group_by: str | None = None
    # Seed of the scoring generator; scoring never touches the global RNG.
    seed: int = 0
    # Which units freeze: "depth" freezes as many units as score below the threshold, lowest
    # in the model first, so the frozen set is always a lower prefix and activations and
    # backward work below the lowest trainable unit disappear (with "rank" normalization the
    # count is tau(t) * units whatever the scores); "prefix" lets the scores pick the prefix:
    # it extends a frozen lower prefix and stops at the first unit at or above the
    # threshold; "score" freezes every unit below it, wherever it is (the paper).
    order: str = "depth"
    # Freeze units: "block" (one per transformer block, from the adapters' names) or
    # "adapter" (one per adapter, the paper).
    units: str = "block"
    # Merge a frozen PEFT LoRA adapter into its float32/float64 base weight (PEFT's own
    # merge), removing its forward cost and the dropout mask it saves for backward.
    merge: bool = True
    # Which parts of a frozen unit run in evaluation mode (dropout off), held at every training
    # forward until the engine is closed. "attention": its attention modules (the innermost
    # modules whose class name ends in "Attention"), so no attention probabilities are dropped
    # and the attention can take its fused kernel, while the dropout on the unit's hidden
    # states, the noise the units above train with, stays on (except a dropout inside the
    # attention module itself, such as GPT-2's on the attention output); a unit without such a
    # module (one adapter per unit) keeps all its dropout. True: the whole unit, a fixed
    # function of its input. False: none; frozen units keep all their dropout (the paper).
    eval_frozen: bool | str = "attention"

    def __post_init__(self) -> None:
        for field in ("warmup_steps", "freeze_end_step", "score_every", "seed"):
            value = getattr(self, field)
            if field == "score_every" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"SAFEConfig.{field} must be an int, got {value!r}")
        if self.warmup_steps < 1:
            raise ValueError(f"SAFEConfig requires warmup_steps >= 1, got warmup_steps={self.warmup_steps}")
        if self.freeze_end_step < self.warmup_steps:
            raise ValueError(
                "SAFEConfig requires freeze_end_step >= warmup_steps, got "
                f"freeze_end_step={self.freeze_end_step}, warmup_steps={self.warmup_steps}"
            )
        if self.score_every is not None and self.score_every < 1:
            raise ValueError(f"SAFEConfig requires score_every >= 1, got score_every={self.score_every}")
        if self.score_every is not None and self.score_every > self.warmup_steps:
            raise ValueError(
                "SAFEConfig requires score_every <= warmup_steps, or no warm-up step is scored; got "
                f"score_every={self.score_every}, warmup_steps={self.warmup_steps}"
            )
        if not 0 <= self.seed < 2**64:
            raise ValueError(
                f"SAFEConfig requires 0 <= seed < 2**64 (a torch.Generator seed), got seed={self.seed}"
            )
        if self.normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"SAFEConfig.normalization must be one of {_NORMALIZATIONS}, "
                f"got normalization={self.normalization!r}"
            )
        if self.units not in _UNITS:
            raise ValueError(f"SAFEConfig.units must be one of {_UNITS}, got units={self.units!r}")
        if not isinstance(self.merge, bool):
            raise TypeError(f"SAFEConfig.merge must be a bool, got merge={self.merge!r}")
        if not isinstance(self.eval_frozen, bool) and self.eval_frozen != EVAL_ATTENTION:
            error = ValueError if isinstance(self.eval_frozen, str) else TypeError
            raise error(
                f"SAFEConfig.eval_frozen must be True, False or {EVAL_ATTENTION!r}, "
                f"got eval_frozen={self.eval_frozen!r}"
            )
        if self.order not in _ORDERS:
            raise ValueError(f"SAFEConfig.order must be one of {_ORDERS}, got order={self.order!r}")
        tau = self.tau_target
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"SAFEConfig.tau_target must be a finite number, got tau_target={tau!r}")
        upper = math.inf if self.normalization == "none" else 1.0
        if not 0.0 <= tau <= upper:
            raise ValueError(
                f"SAFEConfig requires 0 <= tau_target <= {upper} with normalization="
                f"{self.normalization!r}, got tau_target={tau}"
            )
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 4
        ):
            raise ValueError(
                "SAFEConfig requires max_tokens >= 4 (the unbiased CKA estimate needs 4 rows) "
                f"or None, got max_tokens={self.max_tokens!r}"
            )
        if self.group_by is not None:
            if not isinstance(self.group_by, str):
                raise TypeError(
                    "SAFEConfig.group_by must be a regex string or None, got "
                    f"{type(self.group_by).__name__} {self.group_by!r}"
                )
            try:
                pattern = re.compile(self.group_by)
            except re.error as err:
                raise ValueError(
                    f"SAFEConfig.group_by is not a valid regex: {self.group_by!r} ({err})"
                ) from None
            if pattern.groups < 1:
                raise ValueError(
                    "SAFEConfig.group_by needs at least one capture group naming the unit, "
                    rf"e.g. r'.*layer\.(\d+)\..*', got {self.group_by!r}"
                )

    @property
    def scores_steer(self) -> bool:
        """Whether the warm-up scores can change which units freeze, or how many.

        Under ``order="depth"`` with ``normalization="rank"`` (the default) they cannot: by
        each step ``tau(t) * units`` units freeze, lowest first, whatever they score; a unit
        without a finite score still never freezes. Every other rule reads the scores.

        Example:
            >>> SAFEConfig().scores_steer, SAFEConfig(order="prefix").scores_steer
            (False, True)
        """
        return not (self.order == "depth" and self.normalization == "rank")

    @property
    def score_interval(self) -> int:
        """Optimizer steps from one scored warm-up step to the next: ``score_every`` when set.

        When ``score_every`` is None: 1 where the scores steer the freezing
        (:attr:`scores_steer`); where they do not, ``ceil(warmup_steps / 8)``, so at most
        eight steps spread over the warm-up are scored. Their scores are recorded in the plan
        and a unit without a finite score still never freezes, while the other warm-up steps
        run without the scoring hooks' cost.

        Example:
            >>> SAFEConfig(warmup_steps=84).score_interval
            11
            >>> SAFEConfig(warmup_steps=84, order="prefix").score_interval
            1
        """
        if self.score_every is not None:
            return self.score_every
        if self.scores_steer:
            return 1
        return -(-self.warmup_steps // UNSTEERED_SCORED_STEPS)

    @property
    def scored_steps(self) -> int:
        """How many warm-up steps are scored: steps 1, 1 + k, 1 + 2k, ... for ``k = score_interval``.

        Example:
            >>> SAFEConfig(warmup_steps=84).scored_steps
            8
            >>> SAFEConfig(warmup_steps=84, order="score").scored_steps
            84
        """
        return -(-self.warmup_steps // self.score_interval)

    @classmethod
    def paper(cls, **changes: Any) -> SAFEConfig:
        """The paper's rule: per-adapter units scored against the top score, frozen by score.

        Every adapter below ``tau_target`` times the highest score freezes, wherever it is in
        the model, nothing is merged and frozen adapters keep all their dropout (arXiv 2412.03587).
        Other fields keep their defaults unless given in ``changes``.

        Example:
            >>> cfg = SAFEConfig.paper(warmup_steps=10, freeze_end_step=40)
            >>> cfg.order, cfg.normalization, cfg.units, cfg.merge, cfg.eval_frozen, cfg.tau_target
            ('score', 'max', 'adapter', False, False, 0.6)
        """
        fields = {
            "order": "score",
            "normalization": "max",
            "units": "adapter",
            "merge": False,
            "eval_frozen": False,
            "tau_target": 0.6,
        }
        return cls(**{**fields, **changes})

    @classmethod
    def for_run(cls, total_steps: int, **changes: Any) -> SAFEConfig:
        """A config scaled to a run of ``total_steps`` optimizer steps.

        The shares of the run come from ``SCHEDULE_SHARES`` and depend on the ``order`` in
        ``changes`` (default ``"depth"``). The lowest-first rule freezes whatever the blocks
        score, so its warm-up takes the first tenth of the steps and the threshold reaches
        ``tau_target`` at six tenths: the lowest blocks freeze early and the highest frozen
        block trains for a third of the run, which is what keeps the accuracy. Under
        ``order="prefix"`` and ``"score"`` the scores pick the frozen units, so the warm-up
        takes the first quarter (the block ranking is settled by then, less so at a tenth) and
        the ramp ends at half.

        Raises:
            ValueError: If ``total_steps`` is not a positive integer.

        Example:
            >>> cfg = SAFEConfig.for_run(1000)
            >>> cfg.warmup_steps, cfg.freeze_end_step
            (100, 600)
            >>> cfg = SAFEConfig.for_run(1000, order="prefix")
            >>> cfg.warmup_steps, cfg.freeze_end_step
            (250, 500)
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"for_run requires an integer total_steps >= 1, got {total_steps!r}")
        order = changes.get("order", cls.order)
        warmup_share, end_share = SCHEDULE_SHARES.get(order, SCHEDULE_SHARES["score"])
        warmup = max(1, round(warmup_share * total_steps))
        fields = {
            "warmup_steps": warmup,
            "freeze_end_step": max(warmup, round(end_share * total_steps)),
        }
        return cls(**{**fields, **changes})

    @classmethod
    def from_epochs(
        cls,
        steps_per_epoch: int,
        *,
        warmup_epochs: float,
        freeze_end_epoch: float,
        **kwargs: Any,
    ) -> SAFEConfig:
        """Build a config whose stages are given in epochs.

        Args:
            steps_per_epoch: Optimizer steps per epoch (after gradient accumulation).
            warmup_epochs: Length of the warm-up, in epochs.
            freeze_end_epoch: Epoch at which the threshold reaches ``tau_target``.
            **kwargs: Any other :class:`SAFEConfig` field.

        Returns:
            A config with ``warmup_steps`` and ``freeze_end_step`` rounded to whole steps.

        Raises:
            ValueError: If ``steps_per_epoch`` is not a positive integer, an epoch count is
                not a finite number, or the result is invalid.

        Example:
            >>> SAFEConfig.from_epochs(50, warmup_epochs=1, freeze_end_epoch=2.5).freeze_end_step
            125
        """
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"from_epochs requires an integer steps_per_epoch >= 1, got {steps_per_epoch!r}")
        for name, value in (("warmup_epochs", warmup_epochs), ("freeze_end_epoch", freeze_end_epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"from_epochs requires a finite number of epochs, got {name}={value!r}")
        return cls(
            warmup_steps=round(warmup_epochs * steps_per_epoch),
            freeze_end_step=round(freeze_end_epoch * steps_per_epoch),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON-friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAFEConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error.

        Raises:
            ValueError: If ``data`` holds a key that is not a field.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAFEConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """Return the config as a JSON string with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SAFEConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a SAFEConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)
