"""Float64 pure-numpy linear CKA: the reference the torch backend is tested against.

Imports numpy only (a test proves it), so it can check the torch backend from outside.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from safefreeze.cka._guards import (
    MIN_ROWS_UNBIASED,
    CKAUndefinedError,
    check_enough_rows,
    check_not_constant,
    check_row_shapes,
    cka_from_hsic,
    constant_tolerance,
    warn_nonfinite,
)

_Array = NDArray[np.float64]
_EPS = float(np.finfo(np.float64).eps)


def hsic_unbiased(k: ArrayLike, l: ArrayLike) -> float:  # noqa: E741 (K, L as in the paper)
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two Gram matrices.

    With ``K~``, ``L~`` the Gram matrices with their diagonals set to zero and ``1``
    the all-ones vector::

        HSIC_1 = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

    Args:
        k: Gram matrix ``K`` of shape ``(n, n)``, e.g. ``X @ X.T``.
        l: Gram matrix ``L`` of shape ``(n, n)``.

    Returns:
        The estimate, in float64. It can be negative.

    Raises:
        ValueError: If the matrices are not square or differ in shape.
        CKAUndefinedError: If ``n < 4``.

    Example:
        >>> x = np.arange(6.0).reshape(6, 1)  # one feature: estimates its variance squared
        >>> hsic_unbiased(x @ x.T, x @ x.T)
        10.5
    """
    kt = np.array(k, dtype=np.float64)  # (n, n), a copy: the diagonal is zeroed below
    lt = np.array(l, dtype=np.float64)  # (n, n)
    if kt.ndim != 2 or kt.shape[0] != kt.shape[1] or kt.shape != lt.shape:
        raise ValueError(
            f"hsic_unbiased needs two square Gram matrices of the same shape (n, n), "
            f"got {kt.shape} and {lt.shape}"
        )
    n = int(kt.shape[0])
    if n < MIN_ROWS_UNBIASED:
        raise CKAUndefinedError(f"unbiased HSIC needs at least {MIN_ROWS_UNBIASED} rows, got {n}")
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    trace = float(np.sum(kt * lt.T))  # tr(K~ L~)
    sums = float(kt.sum() * lt.sum())  # (1'K~1)(1'L~1)
    cross = float(kt.sum(axis=0) @ lt.sum(axis=1))  # 1'K~L~1
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _feature_terms(xc: _Array, yc: _Array, debiased: bool) -> tuple[float, float, float]:
    """HSIC(K, L), HSIC(K, K), HSIC(L, L) from column-centered features (Kornblith 2019)."""
    n = int(xc.shape[0])

    def hsic(a: _Array, b: _Array) -> float:
        dot = float(np.linalg.norm(b.T @ a) ** 2)  # ||b' a||_F^2 = tr(K L), centered
        if not debiased:
            return dot
        # Song's estimator rewritten for centered features, where 1'K = 0 except the diagonal.
        row_a = np.einsum("ij,ij->i", a, a)  # (n,) diag of a a'
        row_b = np.einsum("ij,ij->i", b, b)  # (n,)
        return float(
            dot
            - n / (n - 2.0) * float(row_a @ row_b)
            + float(row_a.sum() * row_b.sum()) / ((n - 1) * (n - 2))
        ) / (n * (n - 3))

    return hsic(xc, yc), hsic(xc, xc), hsic(yc, yc)


def _gram_terms(x: _Array, y: _Array, debiased: bool) -> tuple[float, float, float]:
    """The same three HSICs from Gram matrices of the raw (uncentered) rows."""
    k = x @ x.T  # (n, n)
    l = y @ y.T  # noqa: E741 (n, n)
    if debiased:
        # The unbiased estimator ignores row-constant kernel terms, so no centering.
        return hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)
    h = np.eye(len(k)) - 1.0 / len(k)  # (n, n) centering matrix
    kc, lc = h @ k @ h, h @ l @ h
    return float(np.sum(kc * lc)), float(np.sum(kc * kc)), float(np.sum(lc * lc))


def _pow2_scale(a: _Array) -> _Array:
    """Scale ``a`` by the power of two that brings its largest magnitude into [0.5, 1).

    CKA is scale invariant and a power of two rescales exactly; starting from the largest
    magnitude, not a norm, keeps values like 1e200 from overflowing when squared.
    """
    if a.size == 0:
        return a
    _, exponent = np.frexp(np.max(np.abs(a)))
    return np.ldexp(a, -int(exponent))


def linear_cka_numpy(
    x: ArrayLike,
    y: ArrayLike,
    *,
    debiased: bool = False,
    form: Literal["feature", "gram"] = "feature",
) -> float:
    """Linear CKA of two representations of the same rows, in float64.

    Biased (Kornblith et al. 2019)::

        CKA = ||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F)

    with column-centered ``Xc``, ``Yc``; ``debiased=True`` swaps each HSIC for Song et
    al.'s unbiased estimator. Rows holding NaN/Inf in ``x`` or ``y`` are skipped with a
    warning.

    Args:
        x: Array of shape ``(..., Dx)``; leading dimensions are flattened to rows.
        y: Array of shape ``(..., Dy)`` with the same leading dimensions as ``x``.
        debiased: Use the unbiased HSIC estimator (needs at least 4 rows).
        form: ``"feature"`` computes from ``(D, D)`` cross-covariances, ``"gram"`` from
            ``(n, n)`` Gram matrices; both give the same number.

    Returns:
        The CKA value (1 for identical representations).

    Raises:
        ValueError: If the shapes do not match or ``form`` is unknown.
        CKAUndefinedError: If there are too few rows, a side is constant, or a
            self-HSIC is not positive.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(32, 4))
        >>> round(linear_cka_numpy(x, 3.0 * x), 6)
        1.0
    """
    if form not in ("feature", "gram"):
        raise ValueError(f"form must be one of ('feature', 'gram'), got {form!r}")
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    check_row_shapes(xa.shape, ya.shape)
    xa = xa.reshape(-1, xa.shape[-1])  # (N, Dx)
    ya = ya.reshape(-1, ya.shape[-1])  # (N, Dy)
    finite = np.isfinite(xa).all(axis=1) & np.isfinite(ya).all(axis=1)  # (N,)
    warn_nonfinite(int((~finite).sum()), int(finite.size))
    xa, ya = xa[finite], ya[finite]
    n = xa.shape[0]
    check_enough_rows(n, debiased=debiased)
    xa, ya = _pow2_scale(xa), _pow2_scale(ya)
    xc = xa - xa.mean(axis=0)
    yc = ya - ya.mean(axis=0)
    tol = constant_tolerance(n, _EPS)
    check_not_constant("x", bool(np.linalg.norm(xc) <= tol * np.linalg.norm(xa)))
    check_not_constant("y", bool(np.linalg.norm(yc) <= tol * np.linalg.norm(ya)))
    feature = form == "feature"
    terms = _feature_terms(xc, yc, debiased) if feature else _gram_terms(xa, ya, debiased)
    return cka_from_hsic(*terms, what="unbiased self-HSIC" if debiased else "self-HSIC")
