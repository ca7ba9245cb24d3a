"""Guards shared by both CKA backends: the checks that keep CKA from returning NaN.

Public CKA code returns NaN on small batches, constant features and negative unbiased
HSIC. Both backends call these helpers so that they raise the same errors with the
same words.
"""

from __future__ import annotations

import math
import warnings

# Song et al. 2012's unbiased HSIC divides by n (n - 3) and (n - 1) (n - 2).
MIN_ROWS_UNBIASED = 4
# Centering a single row leaves nothing to compare.
MIN_ROWS_BIASED = 2
# Centering a constant column leaves rounding noise of a few eps, not exact zeros;
# anything below this many multiples of sqrt(n) * eps (relative) is treated as zero.
_CONSTANT_RTOL = 16.0


class CKAUndefinedError(ValueError):
    """CKA is undefined for the data given.

    Raised for too few rows, a side with constant features, or a non-positive
    (unbiased) self-HSIC, where other implementations would return NaN.
    """


def check_row_shapes(x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless x and y are ``(..., D)`` with the same leading (row) shape."""
    if len(x_shape) < 2 or len(y_shape) < 2 or x_shape[:-1] != y_shape[:-1]:
        raise ValueError(
            "x and y must have shape (..., D) with the same leading (row) dimensions; "
            f"got x.shape={x_shape} and y.shape={y_shape}"
        )


def check_mask_shape(mask_shape: tuple[int, ...], x_shape: tuple[int, ...], is_bool: bool) -> None:
    """Raise ValueError unless the mask is boolean with shape ``x.shape[:-1]``."""
    if mask_shape != x_shape[:-1] or not is_bool:
        raise ValueError(
            f"mask must be a bool array of shape x.shape[:-1]={x_shape[:-1]} "
            f"(True = real token), got shape {mask_shape} (bool: {is_bool})"
        )


def warn_nonfinite(skipped: int, total: int) -> None:
    """Warn that ``skipped`` of ``total`` rows held NaN/Inf and were left out."""
    if skipped:
        warnings.warn(
            f"linear CKA skipped {skipped} of {total} rows with non-finite values (NaN/Inf) in x or y",
            RuntimeWarning,
            stacklevel=3,
        )


def check_enough_rows(n: int, *, debiased: bool) -> None:
    """Raise CKAUndefinedError if ``n`` rows cannot give the requested estimate."""
    if debiased and n < MIN_ROWS_UNBIASED:
        raise CKAUndefinedError(f"unbiased HSIC needs at least {MIN_ROWS_UNBIASED} rows, got {n}")
    if n < MIN_ROWS_BIASED:
        raise CKAUndefinedError(f"linear CKA needs at least {MIN_ROWS_BIASED} rows, got {n}")


def constant_tolerance(n: int, eps: float) -> float:
    """Relative Frobenius norm below which centered features count as constant."""
    return _CONSTANT_RTOL * math.sqrt(n) * eps


def check_not_constant(name: str, constant: bool) -> None:
    """Raise CKAUndefinedError if side ``name`` has zero variance across rows."""
    if constant:
        raise CKAUndefinedError(
            f"{name} has constant features (zero variance across rows after centering), "
            "so its self-HSIC is zero; CKA needs rows that vary in both x and y"
        )


def cka_from_hsic(kl: float, kk: float, ll: float, *, what: str) -> float:
    """``kl / sqrt(kk * ll)``, raising CKAUndefinedError where that is not a number.

    Args:
        kl: HSIC(K, L) (or its sum over minibatches).
        kk: HSIC(K, K).
        ll: HSIC(L, L).
        what: Names the estimate in error messages, e.g. ``"unbiased self-HSIC"``.

    Returns:
        The CKA value.

    Raises:
        CKAUndefinedError: If a self-HSIC is not positive and finite.
    """
    for name, value in (("x", kk), ("y", ll)):
        # `not value > 0` also catches NaN.
        if not (value > 0 and math.isfinite(value)):
            raise CKAUndefinedError(
                f"{what} of {name} must be positive and finite, got {value:.6g}; "
                "use more rows per estimate, or debiased=False"
            )
    return kl / (math.sqrt(kk) * math.sqrt(ll))
