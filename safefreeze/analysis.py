"""Sharpness, loss landscapes and adapter weight norms: the measurements behind a regularization claim.

Everything here works on a loss over a fixed set of batches the caller gives and on the
adapter parameters the caller names, so memory and time stay bounded:

- :func:`top_hessian_eigenvalues` wraps Hessian-vector products (double backward, one batch
  graph at a time) in a ``scipy.sparse.linalg.LinearOperator`` and solves it with ``eigsh``;
  the Hessian itself is never formed.
- :func:`hutchinson_trace` estimates the Hessian's trace from Rademacher probes with a fixed seed.
- :func:`loss_landscape_1d` and :func:`loss_landscape_2d` evaluate the loss along
  filter-normalized random directions (Li et al., 2018) and restore the parameters bit for bit;
  :func:`plot_landscapes` draws them (matplotlib, Agg).
- :func:`adapter_norms`, :func:`block_norms` and :class:`NormRecorder` read ``||B A||_F`` of every
  PEFT LoRA adapter, per adapter and per block, once or at every step.

scipy and matplotlib come with ``pip install 'safefreeze[analysis]'`` and are imported only
when a function needs them; ``import safefreeze`` never imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from safefreeze._optional import require

__all__ = [
    "Landscape1D",
    "Landscape2D",
    "NormRecorder",
    "TraceEstimate",
    "adapter_norms",
    "block_norms",
    "filter_normalized_direction",
    "hessian_operator",
    "hessian_vector_product",
    "hutchinson_trace",
    "lora_parameters",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscapes",
    "top_hessian_eigenvalues",
]

B = TypeVar("B")
LossFn = Callable[[B], torch.Tensor]

# A block is the module name up to its first numbered part: "encoder.layer.3.attention..." ->
# "encoder.layer.3" (BERT), "model.layers.0.self_attn..." -> "model.layers.0" (Llama).
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _check(params: Sequence[torch.Tensor], batches: Sequence[Any]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("expected at least one parameter tensor, got an empty sequence")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"every parameter must require grad for Hessian-vector products; parameters at positions "
            f"{frozen[:5]} do not (set requires_grad_(True) on them first)"
        )
    if len(batches) == 0:
        raise ValueError("expected at least one batch, got an empty sequence")
    return params


def _mean_loss(loss_fn: LossFn[B], batches: Sequence[B]) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(b)) for b in batches) / len(batches)


def hessian_vector_product(
    loss_fn: LossFn[B], batches: Sequence[B], params: Sequence[torch.Tensor], vector: torch.Tensor
) -> torch.Tensor:
    """``H v`` for the mean loss over ``batches``, by double backward, one batch graph at a time.

    Args:
        loss_fn: Maps one batch to a scalar loss; called once per batch per product.
        batches: The fixed batch set; the loss is their mean.
        params: Tensors that require grad; ``vector`` is their flattened concatenation.
        vector: A 1-D tensor with one entry per parameter element.

    Returns:
        ``H v`` as a 1-D float tensor on ``vector``'s device, in the parameters' dtype.

    Raises:
        ValueError: If ``params`` or ``batches`` is empty, a parameter does not require grad,
            or ``vector`` has the wrong size.
    """
    params = _check(params, batches)
    size = sum(p.numel() for p in params)
    if vector.dim() != 1 or vector.numel() != size:
        raise ValueError(
            f"expected a 1-D vector of {size} entries (one per parameter element), "
            f"got shape {tuple(vector.shape)}"
        )
    chunks = [
        c.view_as(p).to(p.dtype)
        for c, p in zip(torch.split(vector, [p.numel() for p in params]), params, strict=True)
    ]
    total = torch.zeros(size, dtype=params[0].dtype, device=vector.device)
    for batch in batches:
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum(
            ((g * c).sum() for g, c in zip(grads, chunks, strict=True) if g is not None),
            torch.zeros((), dtype=params[0].dtype, device=vector.device),
        )
        if not dot.requires_grad:  # the loss does not depend on these parameters: H v = 0
            continue
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        total += torch.cat(
            [(torch.zeros_like(p) if h is None else h).reshape(-1) for h, p in zip(hv, params, strict=True)]
        )
    return total / len(batches)


def hessian_operator(loss_fn: LossFn[B], batches: Sequence[B], params: Sequence[torch.Tensor]) -> Any:
    """The Hessian of the mean loss over ``batches`` as a ``scipy.sparse.linalg.LinearOperator``.

    Each ``matvec`` is one :func:`hessian_vector_product` (float64 in and out on the scipy
    side, the parameters' dtype inside); the matrix is never formed.

    Args:
        loss_fn: Maps one batch to a scalar loss.
        batches: The fixed batch set.
        params: Tensors that require grad.

    Returns:
        A symmetric ``LinearOperator`` of shape ``(n, n)``, ``n`` the number of parameter elements.

    Raises:
        ValueError: As :func:`hessian_vector_product`.
        ModuleNotFoundError: If scipy is not installed (``safefreeze[analysis]``).
    """
    params = _check(params, batches)
    linalg = require("scipy.sparse.linalg", "analysis")
    size = sum(p.numel() for p in params)
    device = params[0].device

    def matvec(v: np.ndarray) -> np.ndarray:
        vec = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)).to(device)
        return hessian_vector_product(loss_fn, batches, params, vec).detach().double().cpu().numpy()

    return linalg.LinearOperator((size, size), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def top_hessian_eigenvalues(
    loss_fn: LossFn[B],
    batches: Sequence[B],
    params: Sequence[torch.Tensor],
    k: int = 1,
    *,
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The ``k`` largest (algebraic) Hessian eigenvalues, by Lanczos (``eigsh``) on HVPs.

    The start vector is drawn from ``seed``, so a call is reproducible.

    Args:
        loss_fn: Maps one batch to a scalar loss.
        batches: The fixed batch set; the loss is their mean.
        params: Tensors that require grad (e.g. :func:`lora_parameters`).
        k: How many eigenvalues; ``1 <= k < n``.
        tol: ``eigsh``'s relative accuracy.
        maxiter: ``eigsh``'s iteration cap (default: scipy's).
        seed: Seeds the start vector.

    Returns:
        The eigenvalues, largest first, as float64.

    Raises:
        ValueError: If ``k`` is not in ``[1, n)``, or as :func:`hessian_vector_product`.
        ModuleNotFoundError: If scipy is not installed.

    Example:
        >>> import torch
        >>> w = torch.zeros(2, requires_grad=True)
        >>> loss = lambda x: (x * w * w).sum()  # H = diag(2 x)
        >>> top_hessian_eigenvalues(loss, [torch.tensor([3.0, 1.0])], [w], k=1).round(6)
        array([6.])
    """
    params = _check(params, batches)
    size = sum(p.numel() for p in params)
    if not 1 <= k < size:
        raise ValueError(f"requires 1 <= k < {size} (the number of parameter elements), got k={k}")
    linalg = require("scipy.sparse.linalg", "analysis")
    v0 = np.random.default_rng(seed).standard_normal(size)
    values = linalg.eigsh(
        hessian_operator(loss_fn, batches, params),
        k=k,
        which="LA",
        tol=tol,
        maxiter=maxiter,
        v0=v0,
        return_eigenvectors=False,
    )
    return np.sort(np.asarray(values, dtype=np.float64))[::-1]


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson estimate of a Hessian trace."""

    # Mean of v' H v over the probes.
    trace: float
    # Standard error of that mean (sample std / sqrt(probes)); 0 for one probe.
    stderr: float
    # v' H v of each probe, in draw order.
    samples: tuple[float, ...]


def hutchinson_trace(
    loss_fn: LossFn[B],
    batches: Sequence[B],
    params: Sequence[torch.Tensor],
    probes: int = 32,
    *,
    seed: int = 0,
) -> TraceEstimate:
    """Estimate ``tr(H)`` as the mean of ``v' H v`` over Rademacher probes ``v`` (fixed seed).

    The estimate is unbiased; its variance is ``2 (||H||_F^2 - sum_i H_ii^2) / probes``, so
    it is exact for a diagonal Hessian with any number of probes.

    Args:
        loss_fn: Maps one batch to a scalar loss.
        batches: The fixed batch set; the loss is their mean.
        params: Tensors that require grad.
        probes: Number of probe vectors (one HVP each).
        seed: Seeds the probes (a CPU generator, whatever the device).

    Returns:
        The estimate, its standard error and the per-probe samples.

    Raises:
        ValueError: If ``probes < 1``, or as :func:`hessian_vector_product`.
    """
    params = _check(params, batches)
    if probes < 1:
        raise ValueError(f"requires probes >= 1, got probes={probes}")
    size = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(probes):
        v = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(params[0].device, params[0].dtype)
        samples.append(float(v @ hessian_vector_product(loss_fn, batches, params, v)))
    mean = sum(samples) / probes
    std = math.sqrt(sum((s - mean) ** 2 for s in samples) / (probes - 1)) if probes > 1 else 0.0
    return TraceEstimate(trace=mean, stderr=std / math.sqrt(probes), samples=tuple(samples))


def filter_normalized_direction(
    params: Sequence[torch.Tensor], generator: torch.Generator
) -> list[torch.Tensor]:
    """A Gaussian direction scaled filter by filter to the parameters' norms (Li et al., 2018).

    Each row of a parameter (its first dimension: an output neuron of ``B``, a rank component
    of ``A``) gets a direction row with the same Frobenius norm; 1-D parameters (biases,
    norms) get a zero direction, as in the paper. A zero row gets a zero direction row.

    Args:
        params: The parameters the landscape moves.
        generator: A CPU generator; the direction depends on it alone.

    Returns:
        One tensor per parameter, same shape, dtype and device.
    """
    out = []
    for p in params:
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        w = p.detach().to("cpu", torch.float64)
        rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)  # (R, *)
        scale = rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append((rows_d * scale).reshape(p.shape).to(p.device, p.dtype))
    return out


@dataclasses.dataclass(frozen=True)
class Landscape1D:
    """Mean loss at ``params + alpha * d`` for a filter-normalized direction ``d``."""

    alphas: tuple[float, ...]
    losses: tuple[float, ...]

    def sharpness(self, radius: float) -> float:
        """Highest loss within ``|alpha| <= radius`` minus the loss at ``alpha = 0``.

        Raises:
            ValueError: If ``alpha = 0`` is not among the alphas.
        """
        if 0.0 not in self.alphas:
            raise ValueError(f"the landscape has no alpha = 0 to compare with; alphas are {self.alphas}")
        center = self.losses[self.alphas.index(0.0)]
        near = [loss for a, loss in zip(self.alphas, self.losses, strict=True) if abs(a) <= radius]
        return max(near) - center


@dataclasses.dataclass(frozen=True)
class Landscape2D:
    """Mean loss at ``params + alpha * d1 + beta * d2``; ``losses[i][j]`` is ``(alphas[i], betas[j])``."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]


def _shifted_losses(
    loss_fn: LossFn[B],
    batches: Sequence[B],
    params: Sequence[torch.Tensor],
    directions: Sequence[Sequence[torch.Tensor]],
    points: Iterable[Sequence[float]],
) -> list[float]:
    """Mean loss at every point ``params + sum_k c_k d_k``; the parameters are restored exactly."""
    saved = [p.detach().clone() for p in params]
    losses = []
    try:
        with torch.no_grad():
            for coeffs in points:
                for p, s, *ds in zip(params, saved, *directions, strict=True):
                    shifted = s.clone()
                    for c, d in zip(coeffs, ds, strict=True):
                        shifted.add_(d, alpha=c)
                    p.copy_(shifted)
                losses.append(_mean_loss(loss_fn, batches))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return losses


def loss_landscape_1d(
    loss_fn: LossFn[B],
    batches: Sequence[B],
    params: Sequence[torch.Tensor],
    alphas: Sequence[float],
    *,
    seed: int = 0,
) -> Landscape1D:
    """The mean loss along one filter-normalized random direction.

    Runs under ``torch.no_grad``; the parameters hold their original values (bit for bit)
    afterwards, also when ``loss_fn`` raises. Put the model in eval mode first if dropout
    should not add noise.

    Args:
        loss_fn: Maps one batch to a scalar loss.
        batches: The fixed batch set.
        params: The parameters to move (need not require grad).
        alphas: Step sizes along the direction; 1 is a step as long as the weights themselves.
        seed: Seeds the direction.

    Returns:
        The alphas and the mean loss at each.

    Raises:
        ValueError: If ``params``, ``batches`` or ``alphas`` is empty.
    """
    if not list(params) or len(batches) == 0 or len(alphas) == 0:
        raise ValueError("expected non-empty params, batches and alphas")
    direction = filter_normalized_direction(params, torch.Generator().manual_seed(seed))
    losses = _shifted_losses(loss_fn, batches, params, [direction], ([a] for a in alphas))
    return Landscape1D(tuple(float(a) for a in alphas), tuple(losses))


def loss_landscape_2d(
    loss_fn: LossFn[B],
    batches: Sequence[B],
    params: Sequence[torch.Tensor],
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    seed: int = 0,
) -> Landscape2D:
    """The mean loss over a plane spanned by two filter-normalized random directions.

    The same rules as :func:`loss_landscape_1d`; the two directions come from one generator
    seeded with ``seed``, so the first equals :func:`loss_landscape_1d`'s direction.

    Args:
        loss_fn: Maps one batch to a scalar loss.
        batches: The fixed batch set.
        params: The parameters to move.
        alphas: Steps along the first direction.
        betas: Steps along the second direction.
        seed: Seeds both directions.

    Returns:
        The grid and the mean loss at every point of it.

    Raises:
        ValueError: If any input sequence is empty.
    """
    if not list(params) or len(batches) == 0 or len(alphas) == 0 or len(betas) == 0:
        raise ValueError("expected non-empty params, batches, alphas and betas")
    generator = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(params, generator)
    d2 = filter_normalized_direction(params, generator)
    grid = [(a, b) for a in alphas for b in betas]
    flat = _shifted_losses(loss_fn, batches, params, [d1, d2], grid)
    rows = tuple(tuple(flat[i * len(betas) : (i + 1) * len(betas)]) for i in range(len(alphas)))
    return Landscape2D(tuple(float(a) for a in alphas), tuple(float(b) for b in betas), rows)


def plot_landscapes(
    curves: Mapping[str, Landscape1D],
    path: str | os.PathLike[str],
    *,
    surface: Landscape2D | None = None,
    title: str = "Loss along a filter-normalized direction",
) -> Path:
    """Draw 1-D landscapes as lines (and optionally one 2-D landscape as contours) into a PNG.

    Args:
        curves: Label -> landscape; one line each.
        path: Where the PNG goes (parent folders are created).
        surface: A 2-D landscape drawn as a contour panel beside the lines.
        title: Title of the line panel.

    Returns:
        The path written.

    Raises:
        ValueError: If ``curves`` is empty.
        ModuleNotFoundError: If matplotlib is not installed (``safefreeze[analysis]``).
    """
    if not curves:
        raise ValueError("expected at least one landscape to draw, got none")
    require("matplotlib", "analysis")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if surface is not None else 1
    figure = Figure(figsize=(5.5 * panels, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, panels, 1)
    for label, curve in curves.items():
        axes.plot(curve.alphas, curve.losses, marker="o", markersize=3, label=label)
    axes.set_xlabel("step along the direction (alpha)")
    axes.set_ylabel("mean loss")
    axes.set_title(title)
    axes.legend()
    if surface is not None:
        right = figure.add_subplot(1, panels, 2)
        grid = np.asarray(surface.losses)  # (len(alphas), len(betas))
        contour = right.contour(surface.betas, surface.alphas, grid, levels=12)
        right.clabel(contour, fontsize=7)
        right.set_xlabel("beta")
        right.set_ylabel("alpha")
        right.set_title("Loss over two directions")
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


def _lora_sites(model: nn.Module) -> list[tuple[str, str, nn.Module, nn.Module]]:
    """``(module name, adapter name, lora_A, lora_B)`` of every PEFT LoRA adapter, in model order."""
    sites = []
    for name, module in model.named_modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict):
            for adapter in a:
                if adapter in b:
                    sites.append((name, adapter, a[adapter], b[adapter]))
    if not sites:
        raise ValueError(
            f"expected PEFT LoRA layers (modules with lora_A and lora_B), found none among "
            f"{sum(1 for _ in model.modules())} modules of {type(model).__name__}"
        )
    return sites


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a LoRA factor with a weight tensor, got {type(module).__name__}")
    return weight


def _key(name: str, adapter: str) -> str:
    return name if adapter == "default" else f"{name}[{adapter}]"


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` weights of every PEFT LoRA adapter, by parameter name.

    Args:
        model: A model holding PEFT LoRA layers.

    Returns:
        Parameter name -> parameter, in model order, whether or not they require grad.

    Raises:
        ValueError: If the model holds no PEFT LoRA layer.
    """
    wanted = {id(_weight(m)) for _, _, a, b in _lora_sites(model) for m in (a, b)}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def adapter_norms(model: nn.Module) -> dict[str, float]:
    """``||B A||_F`` of every PEFT LoRA adapter (without PEFT's ``alpha / r`` scaling).

    A merged adapter keeps its ``A`` and ``B``, so its norm is still the update it holds.

    Args:
        model: A model holding PEFT LoRA layers.

    Returns:
        Module name (``name[adapter]`` for an adapter not called ``default``) -> norm, in model order.

    Raises:
        ValueError: If the model holds no PEFT LoRA layer, or an adapter's shapes do not chain.
    """
    norms = {}
    sites = _lora_sites(model)
    for name, adapter, a, b in sites:
        wa = _weight(a).detach().double()  # (r, in)
        wb = _weight(b).detach().double()  # (out, r)
        wa, wb = wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)
        if wb.shape[1] != wa.shape[0]:
            raise ValueError(
                f"adapter {name!r}: expected lora_B with {wa.shape[0]} columns to match lora_A's rank, "
                f"got lora_B of shape {tuple(wb.shape)}"
            )
        norms[_key(name, adapter)] = float((wb @ wa).norm())
    return norms


def block_norms(norms: Mapping[str, float]) -> dict[str, float]:
    """Per-adapter norms combined per block: the root of the sum of squares (``||[B A]_block||_F``).

    A block is a name up to its first numbered part (``...encoder.layer.3``); a name with no
    numbered part is its own block.

    Args:
        norms: Output of :func:`adapter_norms`.

    Returns:
        Block name -> norm, in first-seen order.
    """
    sums: dict[str, float] = {}
    for name, value in norms.items():
        match = _BLOCK.match(name)
        block = match.group(1) if match else name
        sums[block] = sums.get(block, 0.0) + value * value
    return {block: math.sqrt(s) for block, s in sums.items()}


class NormRecorder:
    """Adapter norms over training: call :meth:`record` at any step (each step, or every k).

    Example:
        >>> recorder = NormRecorder()  # doctest: +SKIP
        >>> for step, batch in enumerate(loader):  # doctest: +SKIP
        ...     ...; optimizer.step(); recorder.record(model, step + 1)
        >>> recorder.to_dict()["total"]  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.adapters: dict[str, list[float]] = {}
        self.blocks: dict[str, list[float]] = {}
        self.total: list[float] = []

    def record(self, model: nn.Module, step: int) -> dict[str, float]:
        """Read the norms now and append them under ``step``.

        Args:
            model: The model being trained.
            step: The step these norms belong to; must increase from call to call.

        Returns:
            The per-adapter norms just read.

        Raises:
            ValueError: If ``step`` does not increase, the adapters changed since the first
                record, or the model holds no PEFT LoRA layer.
        """
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"steps must increase; got step={step} after step={self.steps[-1]}")
        norms = adapter_norms(model)
        if self.steps and list(norms) != list(self.adapters):
            raise ValueError(
                f"the model's adapters changed: recorded {list(self.adapters)[:3]}..., "
                f"now {list(norms)[:3]}..."
            )
        blocks = block_norms(norms)
        for store, values in ((self.adapters, norms), (self.blocks, blocks)):
            for key, value in values.items():
                store.setdefault(key, []).append(value)
        self.total.append(math.sqrt(sum(v * v for v in norms.values())))
        self.steps.append(step)
        return norms

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly history: ``steps``, ``total``, ``adapters`` and ``blocks`` (name -> list)."""
        return {
            "steps": list(self.steps),
            "total": list(self.total),
            "adapters": {k: list(v) for k, v in self.adapters.items()},
            "blocks": {k: list(v) for k, v in self.blocks.items()},
        }
