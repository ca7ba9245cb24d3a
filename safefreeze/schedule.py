"""The cubic freezing threshold: a pure function of the optimizer step."""

from __future__ import annotations


def cubic_threshold(step: int, *, warmup_steps: int, freeze_end_step: int, tau_target: float) -> float:
    """Threshold ``tau(t)`` below which adapters are frozen at optimizer step ``t``.

    .. math::

        \\tau(t) = \\begin{cases}
            0 & t < t_w \\\\
            \\tau_T \\left(1 - \\left(1 - \\frac{t - t_w}{t_f - t_w}\\right)^3\\right) & t_w \\le t < t_f \\\\
            \\tau_T & t \\ge t_f
        \\end{cases}

    With ``t_w == t_f`` the threshold jumps from 0 to ``tau_T`` at ``t_w``.

    Args:
        step: Optimizer step ``t`` (0-based count of steps taken).
        warmup_steps: ``t_w``, the end of the warm-up.
        freeze_end_step: ``t_f``, the step at which the threshold reaches ``tau_target``.
        tau_target: ``tau_T``, the final threshold.

    Returns:
        The threshold, in ``[0, tau_target]``.

    Raises:
        ValueError: If ``freeze_end_step < warmup_steps``.

    Example:
        >>> [round(cubic_threshold(t, warmup_steps=10, freeze_end_step=20, tau_target=0.8), 4)
        ...  for t in (0, 10, 15, 20, 30)]
        [0.0, 0.0, 0.7, 0.8, 0.8]
    """
    if freeze_end_step < warmup_steps:
        raise ValueError(
            "cubic_threshold requires freeze_end_step >= warmup_steps, got "
            f"freeze_end_step={freeze_end_step}, warmup_steps={warmup_steps}"
        )
    if step < warmup_steps:
        return 0.0
    if step >= freeze_end_step:
        return float(tau_target)
    progress = (step - warmup_steps) / (freeze_end_step - warmup_steps)
    return float(tau_target * (1.0 - (1.0 - progress) ** 3))
