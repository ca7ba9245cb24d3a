"""Torch linear CKA on any device, and the streaming accumulator SAFE scores adapters with.

Rows are tokens: inputs of shape ``(..., D)`` are flattened to ``(N, D)``. Subsampling
draws from its own ``torch.Generator`` and never touches the global RNG, so a replayed
run without scoring sees the same dropout masks and data order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from safefreeze.cka._guards import (
    MIN_ROWS_UNBIASED,
    CKAUndefinedError,
    check_enough_rows,
    check_mask_shape,
    check_not_constant,
    check_row_shapes,
    cka_from_hsic,
    constant_tolerance,
    warn_nonfinite,
)

# Columns of CKAAccumulator.stats. Every column is a sum, so stats from several ranks
# (or several accumulators fed disjoint batches) merge by adding them.
STAT_KL = 0  # sum over minibatches of unbiased HSIC(K, L)
STAT_KK = 1  # sum of unbiased HSIC(K, K)
STAT_LL = 2  # sum of unbiased HSIC(L, L)
STAT_BATCHES = 3  # minibatches that contributed
STAT_ROWS_USED = 4  # rows that contributed
STAT_ROWS_SKIPPED = 5  # non-finite drawn rows, plus rows of minibatches with < 4 valid rows
NUM_STATS = 6
STAT_NAMES = ("sum_kl", "sum_kk", "sum_ll", "batches", "rows_used", "rows_skipped")

_TensorLike = torch.Tensor | np.ndarray[Any, Any]


def _private_generator(device: torch.device | str) -> torch.Generator:
    """A generator seeded with 0, so scoring is reproducible and the global RNG untouched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    return generator


def _rows(x: _TensorLike, y: _TensorLike, mask: _TensorLike | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten to rows, drop padding, then drop non-finite rows.

    Returns:
        ``(x, y, skipped)``: x ``(N, Dx)`` and y ``(N, Dy)`` on x's device, and the
        number of unmasked rows dropped for holding NaN/Inf.
    """
    xt = torch.as_tensor(x).detach()
    yt = torch.as_tensor(y).detach().to(xt.device)
    x_shape = tuple(xt.shape)
    check_row_shapes(x_shape, tuple(yt.shape))
    xt = xt.reshape(-1, xt.shape[-1])  # (N, Dx)
    yt = yt.reshape(-1, yt.shape[-1])  # (N, Dy)
    if mask is not None:
        m = torch.as_tensor(mask)
        check_mask_shape(tuple(m.shape), x_shape, m.dtype == torch.bool)
        m = m.reshape(-1).to(xt.device)  # (N,)
        xt, yt = xt[m], yt[m]
    # Padding is dropped first so that NaN padding is neither used nor reported.
    finite = torch.isfinite(xt).all(dim=1) & torch.isfinite(yt).all(dim=1)  # (N,)
    skipped = int((~finite).sum())
    if skipped:
        xt, yt = xt[finite], yt[finite]
    return xt, yt, skipped


def _subsample(
    x: torch.Tensor, y: torch.Tensor, max_rows: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``max_rows`` rows drawn without replacement, if there are more."""
    n = x.shape[0]
    if max_rows is None or n <= max_rows:
        return x, y
    keep = torch.randperm(n, generator=generator, device=generator.device)[:max_rows]
    keep = keep.to(x.device)
    return x[keep], y[keep]


def _sample_rows(
    x: _TensorLike,
    y: _TensorLike,
    mask: _TensorLike | None,
    max_rows: int | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Draw up to ``max_rows`` unmasked rows, then drop the non-finite ones among them.

    Only the drawn rows are ever read, so the cost does not grow with the batch: this
    runs inside the training forward.

    Returns:
        ``(x, y, skipped)``: the drawn finite rows, x ``(n, Dx)`` and y ``(n, Dy)``, and
        how many drawn rows held NaN/Inf.
    """
    xt = torch.as_tensor(x).detach()
    yt = torch.as_tensor(y).detach().to(xt.device)
    x_shape = tuple(xt.shape)
    check_row_shapes(x_shape, tuple(yt.shape))
    xt = xt.reshape(-1, xt.shape[-1])  # (N, Dx), a view where possible
    yt = yt.reshape(-1, yt.shape[-1])  # (N, Dy)
    if mask is None:
        rows = None if max_rows is None or xt.shape[0] <= max_rows else torch.arange(xt.shape[0])
    else:
        m = torch.as_tensor(mask)
        check_mask_shape(tuple(m.shape), x_shape, m.dtype == torch.bool)
        rows = m.reshape(-1).nonzero().squeeze(1)  # (n_valid,)
    if rows is not None and max_rows is not None and rows.shape[0] > max_rows:
        keep = torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:max_rows]
        rows = rows[keep.to(rows.device)]
    if rows is not None:
        rows = rows.to(xt.device)
        xt, yt = xt[rows], yt[rows]  # (n, Dx), (n, Dy)
    finite = torch.isfinite(xt).all(dim=1) & torch.isfinite(yt).all(dim=1)  # (n,)
    skipped = int((~finite).sum())
    if skipped:
        xt, yt = xt[finite], yt[finite]
    return xt, yt, skipped


def _center(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-center ``x`` (N, D); also return whether it is constant (0-dim bool)."""
    xc = x - x.mean(dim=0)
    tol = constant_tolerance(x.shape[0], torch.finfo(x.dtype).eps)
    return xc, torch.linalg.norm(xc) <= tol * torch.linalg.norm(x)


def _cross_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a' b||_F^2 == tr(A B)`` for ``A = a a'``, ``B = b b'``, via the smaller product."""
    n = a.shape[0]
    if n * n <= a.shape[1] * b.shape[1]:
        ka = a @ a.T  # (N, N)
        kb = ka if b is a else b @ b.T  # (N, N)
        return (ka * kb).sum()
    return (a.T @ b).square().sum()  # (Da, Db)


def _hsic_biased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(3,) HSIC(K, L), HSIC(K, K), HSIC(L, L) of centered rows, up to a shared factor."""
    return torch.stack([_cross_sq(x, y), _cross_sq(x, x), _cross_sq(y, y)])


def _hsic_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(3,) unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) for ``K = x x'``, ``L = y y'``.

    Song et al. 2012's estimator computed from features, never forming ``(N, N)`` Gram
    matrices unless they are the smaller product, so memory stays O(N D).
    """
    n = x.shape[0]
    kd = x.square().sum(dim=1)  # (N,) diagonal of K
    ld = y.square().sum(dim=1)  # (N,) diagonal of L
    k1 = x @ x.sum(dim=0) - kd  # (N,) row sums of K with its diagonal zeroed
    l1 = y @ y.sum(dim=0) - ld  # (N,)

    def hsic(
        cross: torch.Tensor, ad: torch.Tensor, bd: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor
    ) -> torch.Tensor:
        trace = cross - (ad * bd).sum()  # tr(K~ L~)
        sums = a1.sum() * b1.sum() / ((n - 1) * (n - 2))  # (1'K~1)(1'L~1) / ((n-1)(n-2))
        return (trace + sums - 2.0 / (n - 2) * (a1 @ b1)) / (n * (n - 3))

    return torch.stack(
        [
            hsic(_cross_sq(x, y), kd, ld, k1, l1),
            hsic(_cross_sq(x, x), kd, kd, k1, k1),
            hsic(_cross_sq(y, y), ld, ld, l1, l1),
        ]
    )


def _pow2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale ``x`` by the power of two nearest ``1 / ||x||_F``.

    CKA is scale invariant; unit-order inputs keep float32 fourth powers far from
    overflow, and a power of two rescales exactly, so an exact zero stays zero.
    """
    _, exponent = torch.frexp(torch.linalg.norm(x))
    return torch.ldexp(x, -exponent)


def linear_cka_torch(
    x: _TensorLike,
    y: _TensorLike,
    *,
    debiased: bool = False,
    mask: _TensorLike | None = None,
    max_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Linear CKA of two representations of the same tokens, on their device.

    Biased (Kornblith et al. 2019) or, with ``debiased=True``, with Song et al.'s
    unbiased HSIC. float16/bfloat16/float32 inputs are computed in float32, float64 in
    float64. Padding (``mask`` False) is dropped, then rows with NaN/Inf in ``x`` or
    ``y`` are skipped with a warning, then at most ``max_rows`` rows are subsampled.

    Args:
        x: Base output of shape ``(..., Dx)``; leading dimensions are flattened to rows.
        y: Adapted output of shape ``(..., Dy)``, same leading dimensions as ``x``.
        debiased: Use the unbiased HSIC estimator (needs at least 4 rows).
        mask: Bool of shape ``x.shape[:-1]``, True for real tokens.
        max_rows: Subsample this many rows when more remain; None keeps all.
        generator: Draws the subsample; by default a private generator seeded with 0,
            so repeated calls pick the same rows. The global RNG is never used.

    Returns:
        The CKA value.

    Raises:
        ValueError: If shapes or the mask do not match.
        CKAUndefinedError: If there are too few rows, a side is constant, or a
            self-HSIC is not positive.

    Example:
        >>> x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
        >>> round(linear_cka_torch(x, 2.0 * x), 6)
        1.0
    """
    xf, yf, skipped = _rows(x, y, mask)
    warn_nonfinite(skipped, xf.shape[0] + skipped)
    if max_rows is not None and xf.shape[0] > max_rows:
        xf, yf = _subsample(xf, yf, max_rows, generator or _private_generator(xf.device))
    n = xf.shape[0]
    check_enough_rows(n, debiased=debiased)
    dtype = torch.float64 if torch.float64 in (xf.dtype, yf.dtype) else torch.float32
    xc, x_constant = _center(xf.to(dtype))
    yc, y_constant = _center(yf.to(dtype))
    check_not_constant("x", bool(x_constant))
    check_not_constant("y", bool(y_constant))
    xc, yc = _pow2_normalize(xc), _pow2_normalize(yc)
    terms = (_hsic_unbiased if debiased else _hsic_biased)(xc, yc)
    kl, kk, ll = terms.tolist()
    return cka_from_hsic(kl, kk, ll, what="unbiased self-HSIC" if debiased else "self-HSIC")


class CKAAccumulator:
    """Streaming minibatch CKA for many adapters, a few float64 scalars each.

    Nguyen, Raghu & Kornblith 2021: for each minibatch, with ``K = X X'`` and
    ``L = Y Y'``, add the unbiased ``HSIC(K, L)``, ``HSIC(K, K)``, ``HSIC(L, L)`` to
    running sums; then ``CKA = sum_kl / sqrt(sum_kk * sum_ll)``. Only ``stats``
    ``(num_adapters, NUM_STATS)`` is kept, so memory grows with neither hidden size nor
    data. Columns (module constants): ``STAT_KL``, ``STAT_KK``, ``STAT_LL``,
    ``STAT_BATCHES``, ``STAT_ROWS_USED``, ``STAT_ROWS_SKIPPED``.

    Every column is a sum, so ``torch.distributed.all_reduce(acc.stats)`` (SUM, the
    default op) merges ranks, and ``merge_`` merges two accumulators.

    Args:
        num_adapters: Number of adapters scored; ``update`` takes an index below it.
        max_rows: Rows per minibatch kept after masking (subsampled beyond that);
            None keeps all. At least 4.
        generator: Draws the subsamples; by default a private generator on ``device``
            seeded with 0. The global RNG is never used.
        device: Where ``stats`` lives.
        dtype: Precision of each minibatch's HSIC terms. float64 by default: early in
            warm-up ``1 - CKA`` is often below float32 resolution.

    Raises:
        ValueError: If ``num_adapters < 1`` or ``max_rows < 4``.

    Example:
        >>> acc = CKAAccumulator(2, max_rows=None)
        >>> x = torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(0))
        >>> acc.update(0, x, x)
        >>> acc.update(1, x, x + 0.5 * x.square())
        >>> [round(v, 3) for v in acc.values().tolist()]
        [1.0, 0.667]
    """

    COLUMNS = STAT_NAMES

    def __init__(
        self,
        num_adapters: int,
        *,
        max_rows: int | None = 256,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if num_adapters < 1:
            raise ValueError(f"CKAAccumulator needs num_adapters >= 1, got {num_adapters}")
        if max_rows is not None and max_rows < MIN_ROWS_UNBIASED:
            raise ValueError(
                f"max_rows must be None or >= {MIN_ROWS_UNBIASED} (unbiased HSIC needs "
                f"{MIN_ROWS_UNBIASED} rows per minibatch), got {max_rows}"
            )
        self.max_rows = max_rows
        self.dtype = dtype
        self.generator = generator if generator is not None else _private_generator(device)
        self.stats = torch.zeros(num_adapters, NUM_STATS, dtype=torch.float64, device=device)

    @property
    def num_adapters(self) -> int:
        """Number of adapters (rows of ``stats``)."""
        return self.stats.shape[0]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_adapters:
            raise IndexError(f"adapter index must be in [0, {self.num_adapters}), got {index}")

    def update(self, index: int, x: _TensorLike, y: _TensorLike, mask: _TensorLike | None = None) -> None:
        """Add one minibatch of adapter ``index``'s base and adapted outputs.

        Padding (``mask`` False) is dropped and at most ``max_rows`` rows are drawn;
        drawn rows with NaN/Inf are skipped and counted in ``STAT_ROWS_SKIPPED``; a
        minibatch with fewer than 4 valid rows is skipped (its rows counted) instead of
        raising. Only the drawn rows are read, so the cost does not grow with the batch.

        Args:
            index: Adapter index in ``[0, num_adapters)``.
            x: Base output ``(..., Dx)``.
            y: Adapted output ``(..., Dy)``, same leading dimensions as ``x``.
            mask: Bool of shape ``x.shape[:-1]``, True for real tokens.

        Raises:
            IndexError: If ``index`` is out of range.
            ValueError: If shapes or the mask do not match.
        """
        self._check_index(index)
        xf, yf, skipped = _sample_rows(x, y, mask, self.max_rows, self.generator)
        n = xf.shape[0]
        row = self.stats[index]  # (NUM_STATS,) view: in-place adds update stats
        if n < MIN_ROWS_UNBIASED:
            row[STAT_ROWS_SKIPPED] += skipped + n
            return
        xc, x_constant = _center(xf.to(self.dtype))
        yc, y_constant = _center(yf.to(self.dtype))
        # The estimator ignores centering; centering only cuts cancellation error. A
        # constant side is snapped to exact zeros so rounding noise never scores.
        xc = xc.masked_fill(x_constant, 0.0)
        yc = yc.masked_fill(y_constant, 0.0)
        row[STAT_KL : STAT_LL + 1] += _hsic_unbiased(xc, yc).to(row)
        row[STAT_BATCHES] += 1
        row[STAT_ROWS_USED] += n
        row[STAT_ROWS_SKIPPED] += skipped

    def _undefined_reason(self, index: int) -> str | None:
        _, kk, ll, batches, used, skipped = self.stats[index].tolist()
        if batches == 0:
            return (
                f"adapter {index} has no usable minibatch ({int(skipped)} rows skipped); "
                f"each minibatch needs at least {MIN_ROWS_UNBIASED} finite, unmasked rows"
            )
        for name, value in (("x (base output)", kk), ("y (adapted output)", ll)):
            if not (value > 0 and math.isfinite(value)):
                return (
                    f"adapter {index}: unbiased self-HSIC sum of {name} must be positive "
                    f"and finite, got {value:.6g} over {int(batches)} minibatches "
                    f"({int(used)} rows); its features are constant or too few rows were seen"
                )
        return None

    def defined(self) -> torch.Tensor:
        """(num_adapters,) bool: True where ``value(i)`` would not raise."""
        kk, ll = self.stats[:, STAT_KK], self.stats[:, STAT_LL]
        return (
            (self.stats[:, STAT_BATCHES] > 0) & (kk > 0) & (ll > 0) & torch.isfinite(kk) & torch.isfinite(ll)
        )

    def value(self, index: int) -> float:
        """CKA of adapter ``index`` over every minibatch seen.

        Raises:
            IndexError: If ``index`` is out of range.
            CKAUndefinedError: If the adapter has no usable minibatch or a non-positive
                self-HSIC sum; the message names the adapter.
        """
        self._check_index(index)
        reason = self._undefined_reason(index)
        if reason is not None:
            raise CKAUndefinedError(reason)
        kl, kk, ll = self.stats[index, STAT_KL : STAT_LL + 1].tolist()
        return float(kl) / (math.sqrt(kk) * math.sqrt(ll))

    def values(self, *, strict: bool = True) -> torch.Tensor:
        """(num_adapters,) float64 CKA of every adapter, on ``stats``' device.

        Args:
            strict: Raise if any adapter is undefined; with False, undefined adapters
                (see ``defined()``) get NaN instead.

        Raises:
            CKAUndefinedError: With ``strict``, if any adapter is undefined; names them and
                the first one's reason.
        """
        defined = self.defined()
        bad = (~defined).nonzero().flatten().tolist()
        if bad and strict:
            first = self._undefined_reason(bad[0])
            raise CKAUndefinedError(
                f"CKA is undefined for {len(bad)} of {self.num_adapters} adapters {bad[:10]}; first: {first}"
            )
        kl, kk, ll = self.stats[:, STAT_KL], self.stats[:, STAT_KK], self.stats[:, STAT_LL]
        # Undefined rows may hold a zero or negative self-HSIC: never take their root.
        one = torch.ones_like(kk)
        norm = torch.where(defined, kk, one).sqrt() * torch.where(defined, ll, one).sqrt()
        return torch.where(defined, kl / norm, torch.nan)

    def merge_(self, other: CKAAccumulator) -> CKAAccumulator:
        """Add ``other``'s statistics into this one (same adapters); returns self.

        Raises:
            ValueError: If the adapter counts differ.
        """
        if other.stats.shape != self.stats.shape:
            raise ValueError(
                f"cannot merge accumulators of {other.num_adapters} and {self.num_adapters} adapters"
            )
        self.stats += other.stats.to(self.stats.device)
        return self

    def reset(self) -> None:
        """Zero the statistics (the generator keeps its state)."""
        self.stats.zero_()

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: column names, stats as lists of floats, generator state."""
        return {
            "columns": list(STAT_NAMES),
            "stats": self.stats.tolist(),
            "generator_state": self.generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output, e.g. after a JSON round trip.

        Raises:
            ValueError: If the columns or the number of adapters differ.
        """
        if list(state["columns"]) != list(STAT_NAMES):
            raise ValueError(f"state columns {state['columns']} do not match {list(STAT_NAMES)}")
        stats = torch.tensor(state["stats"], dtype=torch.float64)
        if stats.shape != self.stats.shape:
            raise ValueError(
                f"state holds stats of shape {tuple(stats.shape)}, this accumulator "
                f"{tuple(self.stats.shape)} (num_adapters={self.num_adapters})"
            )
        self.stats.copy_(stats)
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
