"""Pictures of a freeze plan; matplotlib is imported only when one is drawn."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from safefreeze._optional import require
from safefreeze.plan import FreezePlan

__all__ = ["save_timeline", "short_names"]

_TRAINED, _FROZEN, _WARMUP, _END = "#4C72B0", "#D9D9D9", "#C44E52", "#555555"


def short_names(names: Sequence[str]) -> list[str]:
    """Dotted module names shortened for labels, still one distinct label per name.

    A dotted part that every name has at the same place says nothing and is dropped, except
    the one just before the first part that differs, which labels it (``layer``, ``blocks``).
    Names with different numbers of parts only lose the prefix they all share. A single
    name, or names that never differ, come back unchanged.

    Args:
        names: Module names, e.g. the adapters of a plan in model order.

    Returns:
        One label per name, in the same order.

    Example:
        >>> short_names([
        ...     "base_model.model.bert.encoder.layer.0.attention.self.query",
        ...     "base_model.model.bert.encoder.layer.1.attention.self.value",
        ... ])
        ['layer.0.query', 'layer.1.value']
    """
    parts = [name.split(".") for name in names]
    if len(parts) < 2:
        return list(names)
    width = len(parts[0])
    if all(len(p) == width for p in parts):
        differs = [len({p[i] for p in parts}) > 1 for i in range(width)]
    else:  # unaligned: only the shared prefix goes
        shortest = min(len(p) for p in parts)
        prefix = next((i for i in range(shortest) if len({p[i] for p in parts}) > 1), shortest)
        differs = [i >= prefix for i in range(max(len(p) for p in parts))]
    if not any(differs):
        return list(names)
    first = differs.index(True)
    keep = [i for i, d in enumerate(differs) if d or i == first - 1]
    return [".".join(p[i] for i in keep if i < len(p)) for p in parts]


def save_timeline(plan: FreezePlan, path: str | os.PathLike[str], *, steps: int | None = None) -> Path:
    """Draw which adapter froze at which step as a PNG (matplotlib, Agg, no pyplot state).

    One row per adapter in model order, the first adapter on top: trained span, freeze
    step, frozen span; dashed lines mark the end of the warm-up and ``freeze_end_step``.

    Args:
        plan: The plan to draw (a recorded run's, a replay's or a saved file's).
        path: Where to write the PNG.
        steps: Optimizer steps the run took (the x axis ends there or at the last event).

    Returns:
        The path written.

    Raises:
        ImportError: If matplotlib is not installed (it comes with ``safefreeze[mlflow]``).

    Example:
        >>> save_timeline(FreezePlan.load("plan.json"), "timeline.png")  # doctest: +SKIP
        PosixPath('timeline.png')
    """
    require("matplotlib", "mlflow")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = [a.name for a in plan.adapters]
    frozen = plan.adapter_freeze_steps
    cfg = plan.config
    end = max([1, steps or 0, cfg.freeze_end_step, *frozen.values()])
    fig = Figure(figsize=(8.0, 1.8 + 0.26 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row, name in enumerate(names):
        stop = frozen.get(name)
        ax.barh(row, end if stop is None else stop, height=0.6, color=_TRAINED)
        if stop is not None:
            ax.barh(row, end - stop, left=stop, height=0.6, color=_FROZEN)
            ax.plot([stop], [row], marker="|", markersize=10, color="black")
    ax.axvline(cfg.warmup_steps, linestyle="--", linewidth=1, color=_WARMUP)
    ax.axvline(cfg.freeze_end_step, linestyle=":", linewidth=1, color=_END)
    ax.set_yticks(range(len(names)), short_names(names), fontsize=7)
    ax.set_ylim(len(names) - 0.5, -0.5)  # model order, first adapter on top
    ax.set_xlim(0, end)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"SAFE freeze timeline: {len(frozen)} of {len(names)} adapters frozen", fontsize=10)
    fig.legend(
        handles=[
            Patch(color=_TRAINED, label="training"),
            Patch(color=_FROZEN, label="frozen"),
            Line2D([], [], linestyle="--", color=_WARMUP, label=f"end of warm-up ({cfg.warmup_steps})"),
            Line2D([], [], linestyle=":", color=_END, label=f"tau_T reached ({cfg.freeze_end_step})"),
        ],
        loc="outside lower center",
        ncols=4,
        fontsize=7,
        frameon=False,
    )
    target = Path(path)
    fig.savefig(target, format="png", dpi=100)
    return target
