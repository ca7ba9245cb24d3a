"""``linear_cka``: one entry point over the torch and numpy backends."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from safefreeze.cka._guards import check_mask_shape, check_row_shapes
from safefreeze.cka._numpy import linear_cka_numpy

if TYPE_CHECKING:
    import torch

_BACKENDS = ("torch", "numpy")


def _to_numpy(a: Any) -> np.ndarray[Any, Any]:
    """``a`` as a numpy array; tensors are detached and moved to the CPU first."""
    # A tensor can only exist if torch is already imported, so this never imports it.
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(a, torch_module.Tensor):
        t = a.detach().cpu()
        # numpy has no bfloat16; float64 is what the reference computes in anyway.
        return np.asarray((t.double() if t.is_floating_point() else t).numpy())
    return np.asarray(a)


def linear_cka(
    x: np.ndarray[Any, Any] | torch.Tensor,
    y: np.ndarray[Any, Any] | torch.Tensor,
    *,
    backend: Literal["torch", "numpy"] = "torch",
    debiased: bool = False,
    mask: np.ndarray[Any, Any] | torch.Tensor | None = None,
    max_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Linear CKA between two representations of the same tokens.

    Rows are tokens: ``(..., D)`` inputs are flattened to ``(N, D)``. Padding (``mask``
    False) is dropped; rows with NaN/Inf in ``x`` or ``y`` are skipped with a warning
    saying how many. SAFE scores an adapter as ``1 - linear_cka(base, adapted)``.

    Args:
        x: Base output ``(..., Dx)``, a tensor or an array.
        y: Adapted output ``(..., Dy)``, same leading dimensions as ``x``.
        backend: ``"torch"`` (any device; float64 inputs in float64, others in float32)
            or ``"numpy"`` (float64 reference; imports numpy only).
        debiased: Use Song et al.'s unbiased HSIC estimator (needs at least 4 rows).
        mask: Bool of shape ``x.shape[:-1]``, True for real tokens.
        max_rows: torch backend only: subsample this many rows when more remain.
        generator: torch backend only: draws the subsample; by default a private
            generator seeded with 0. The global RNG is never used.

    Returns:
        The CKA value.

    Raises:
        ValueError: For an unknown backend, torch-only options given to the numpy
            backend, or mismatched shapes.
        CKAUndefinedError: If there are too few rows, a side is constant, or a
            self-HSIC is not positive.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(64, 8))
        >>> round(linear_cka(x, x @ np.diag(np.arange(1.0, 9.0)), backend="numpy"), 4)
        0.8545
    """
    if backend == "torch":
        from safefreeze.cka._torch import linear_cka_torch

        return linear_cka_torch(x, y, debiased=debiased, mask=mask, max_rows=max_rows, generator=generator)
    if backend == "numpy":
        if max_rows is not None or generator is not None:
            raise ValueError(
                "max_rows and generator are options of the torch backend; the numpy "
                f"backend uses every row, got max_rows={max_rows}, generator={generator}"
            )
        xa, ya = _to_numpy(x), _to_numpy(y)
        if mask is not None:
            m = _to_numpy(mask)
            check_row_shapes(xa.shape, ya.shape)
            check_mask_shape(m.shape, xa.shape, m.dtype == np.bool_)
            xa, ya = xa[m], ya[m]  # (M, Dx), (M, Dy)
        return linear_cka_numpy(xa, ya, debiased=debiased)
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
