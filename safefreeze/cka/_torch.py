"""Torch linear CKA on any device, and the streaming accumulator SAFE scores adapters with.

Rows are tokens: inputs of shape ``(..., D)`` are flattened to ``(N, D)``. Subsampling
draws from its own ``torch.Generator`` and never touches the global RNG, so a replayed
run without scoring sees the same dropout masks and data order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
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
STAT_ROWS_PADDING = 5  # rows left out by the padding mask
STAT_ROWS_NONFINITE = 6  # drawn rows left out for holding NaN/Inf
STAT_ROWS_SHORT = 7  # finite rows of minibatches left with fewer than 4 of them
NUM_STATS = 8
STAT_NAMES = (
    "sum_kl",
    "sum_kk",
    "sum_ll",
    "batches",
    "rows_used",
    "rows_padding",
    "rows_nonfinite",
    "rows_short",
)

_TensorLike = torch.Tensor | np.ndarray[Any, Any]


def _private_generator() -> torch.Generator:
    """A host generator seeded with 0, so scoring is reproducible and the global RNG untouched.

    Rows are drawn on the host whatever the outputs' device: a draw is one host operation
    instead of several kernel launches, and the same seed draws the same rows on any device.
    """
    generator = torch.Generator()
    generator.manual_seed(0)
    return generator


@dataclasses.dataclass(frozen=True)
class RowDraw:
    """Which rows of a ``(..., D)`` output one minibatch reads: the one sampling rule.

    Padding (mask False) is dropped first, then at most ``max_rows`` of the remaining rows
    are drawn without replacement; rows holding NaN/Inf are dropped only after the draw,
    so only the drawn rows are ever read and the cost does not grow with the batch.
    """

    # Flat indices of the drawn rows, or None for every row (no mask, nothing to subsample).
    rows: torch.Tensor | None
    # Rows left out by the mask.
    padding: int
    # Rows of the output drawn from (the product of its leading dimensions).
    total: int
    # ``rows`` copied to each device read from: one copy serves every take of the draw.
    _placed: dict[torch.device, torch.Tensor] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The drawn rows of ``t`` (..., D) as a new (n, D) tensor that owns its memory.

        A copy, never a view: an adapter that adds to its base output in place cannot
        change the rows read before it ran.
        """
        flat = t.detach().reshape(-1, t.shape[-1])  # (N, D), a view where possible
        if self.rows is None:
            return flat.clone()
        rows = self._placed.get(flat.device)
        if rows is None:
            rows = self._placed[flat.device] = _to_device(self.rows, flat.device)
        return flat.index_select(0, rows)  # (n, D), a copy


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a GPU through pinned memory, so the copy does not
    wait for the GPU to finish its queued work (the pinned buffer is kept until it is read)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def draw_rows(
    shape: tuple[int, ...],
    mask: _TensorLike | None,
    max_rows: int | None,
    generator: torch.Generator,
    unmasked: torch.Tensor | None = None,
) -> RowDraw:
    """Draw the rows of an output of ``shape`` (..., D) that one minibatch reads.

    Args:
        shape: Shape of the base output ``x``.
        mask: Bool of shape ``shape[:-1]``, True for real tokens, or None.
        max_rows: Draw at most this many of the unmasked rows; None keeps all.
        generator: Draws the subsample; the global RNG is never used.
        unmasked: ``mask.reshape(-1).nonzero().squeeze(1)``, when the caller has it: finding
            the unmasked rows waits for the device, so hooks find them once per forward, on
            the host, where the draw from a host generator indexes them without a launch.

    Raises:
        ValueError: If the mask is not bool of shape ``shape[:-1]``.
    """
    n = math.prod(shape[:-1])
    if mask is None:
        if max_rows is None or n <= max_rows:
            return RowDraw(None, 0, n)
        # The first max_rows of a permutation of all rows: arange(n)[keep] is keep.
        keep = torch.randperm(n, generator=generator, device=generator.device)[:max_rows]
        return RowDraw(keep, 0, n)
    m = torch.as_tensor(mask)
    check_mask_shape(tuple(m.shape), shape, m.dtype == torch.bool)
    rows = m.reshape(-1).nonzero().squeeze(1) if unmasked is None else unmasked  # (n_valid,)
    padding = n - rows.shape[0]
    if max_rows is not None and rows.shape[0] > max_rows:
        keep = torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:max_rows]
        rows = rows[keep.to(rows.device)]
    return RowDraw(rows, padding, n)


def _finite_rows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop rows with NaN/Inf in ``x`` (n, Dx) or ``y`` (n, Dy); return them and the count dropped."""
    finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)  # (n,)
    dropped = int((~finite).sum())
    if dropped:
        x, y = x[finite], y[finite]
    return x, y, dropped


def _sample(
    x: _TensorLike,
    y: _TensorLike,
    mask: _TensorLike | None,
    max_rows: int | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, RowDraw]:
    """The drawn rows of ``x`` and ``y`` (finite or not) and the draw, with shape checks."""
    xt = torch.as_tensor(x).detach()
    yt = torch.as_tensor(y).detach().to(xt.device)
    check_row_shapes(tuple(xt.shape), tuple(yt.shape))
    draw = draw_rows(tuple(xt.shape), mask, max_rows, generator)
    return draw.take(xt), draw.take(yt), draw


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """Scale ``x`` by the power of two that brings its largest magnitude into [0.5, 1).

    CKA is scale invariant; a power of two rescales exactly, and working from the largest
    magnitude (never a norm, which squares) keeps 1e30 in float32 or 1e200 in float64 from
    overflowing before anything else is computed.
    """
    peak = x.abs().max() if x.numel() else x.new_zeros(())
    _, exponent = torch.frexp(peak)
    return torch.ldexp(x, -exponent)


def _coarse_scale(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each minibatch of ``x`` (A, n, Dx) and ``y`` (A, n, Dy) by one power of two,
    2**(-64 k), that keeps their fourth powers finite.

    The factor is 1 for any magnitude in [2**-64, 2**64), so every usual minibatch adds its
    HSIC terms unscaled; only extreme activations (1e200 in float64) are brought into range.
    One factor for both sides scales a minibatch's three terms alike, so the ratio of sums
    stays a consistent estimate.
    """
    peak = torch.maximum(x.abs().amax(dim=(1, 2)), y.abs().amax(dim=(1, 2)))  # (A,)
    _, exponent = torch.frexp(peak)
    shift = (torch.div(exponent, 64, rounding_mode="floor") * 64)[:, None, None]  # (A, 1, 1)
    # Two equal powers of two, each finite where 2**-shift alone may not be (2**1024): the
    # products are exact, as ldexp's, and cheaper.
    half = torch.exp2(-0.5 * shift.to(x.dtype))
    return x * half * half, y * half * half


def _center(x: torch.Tensor, *, rescale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-center ``x`` (N, D), first scaled to unit magnitude unless ``rescale`` is False;
    also return whether it is constant (0-dim bool)."""
    if rescale:
        x = _pow2_scale(x)
    xc = x - x.mean(dim=0)
    tol = constant_tolerance(x.shape[0], torch.finfo(x.dtype).eps)
    return xc, torch.linalg.norm(xc) <= tol * torch.linalg.norm(x)


def _center_rows(x: torch.Tensor, weight: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_center` of each minibatch of ``x`` (A, n, D) over its rows with ``weight`` 1
    (``n`` (A,) of them); the others stay zero. Also return which are constant, (A,) bool."""
    count = n.clamp_min(1.0)  # (A,)
    mean = x.sum(dim=1, keepdim=True) / count[:, None, None]  # (A, 1, D)
    xc = (x - mean) * weight
    tol = constant_tolerance(1, torch.finfo(x.dtype).eps) * count.sqrt()
    norm = torch.linalg.vector_norm
    return xc, norm(xc, dim=(1, 2)) <= tol * norm(x, dim=(1, 2))


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


def _hsic_unbiased(x: torch.Tensor, y: torch.Tensor, n: torch.Tensor | int | None = None) -> torch.Tensor:
    """(3,) unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) for ``K = x x'``, ``L = y y'``.

    Song et al. 2012's estimator computed from features, never forming ``(N, N)`` Gram
    matrices unless they are the smaller product, so memory stays O(N D). ``n`` is the
    number of rows (default: all); rows that are all zeros beyond it add nothing to any
    sum, so zeroed rows with ``n`` their count estimate over the other rows alone.
    """
    if n is None:
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


def _cross_sq_terms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(3, A) :func:`_cross_sq` of each minibatch of (x, y), (x, x) and (y, y), for ``x``
    (A, N, Dx) and ``y`` (A, N, Dy), each Gram matrix made once."""
    n = x.shape[1]

    @functools.cache
    def gram(t: torch.Tensor) -> torch.Tensor:
        return t @ t.mT  # (A, N, N), made once per tensor

    def cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if n * n <= a.shape[2] * b.shape[2]:
            return gram(a) * gram(b)  # (A, N, N)
        return (a.mT @ b).square()  # (A, Da, Db)

    products = [cross(x, y), cross(x, x), cross(y, y)]
    if all(p.shape == products[0].shape for p in products):
        return torch.stack(products).sum(dim=(2, 3))  # one reduction for the three
    return torch.stack([p.sum(dim=(1, 2)) for p in products])


def _hsic_unbiased_batch(x: torch.Tensor, y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """:func:`_hsic_unbiased` of each minibatch of ``x`` (A, N, Dx), ``y`` (A, N, Dy) with
    ``n`` (A,) rows each: (A, 3) unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L).

    The three estimates are computed side by side, one operation for all three where the
    formula allows: on a GPU each small operation is a kernel launch.
    """
    kd = x.square().sum(dim=2)  # (A, N) diagonals of K
    ld = y.square().sum(dim=2)  # (A, N)
    k1 = (x @ x.sum(dim=1)[..., None])[..., 0] - kd  # (A, N) row sums of K, diagonal zeroed
    l1 = (y @ y.sum(dim=1)[..., None])[..., 0] - ld  # (A, N)
    # Row j of each (A, 3, N) pairs the two kernels of estimate j: (K, L), (K, K), (L, L).
    left_d, right_d = torch.stack([kd, kd, ld], dim=1), torch.stack([ld, kd, ld], dim=1)
    left_1, right_1 = torch.stack([k1, k1, l1], dim=1), torch.stack([l1, k1, l1], dim=1)
    n = n[:, None]  # (A, 1)
    trace = _cross_sq_terms(x, y).T - (left_d * right_d).sum(dim=2)  # (A, 3) tr(K~ L~)
    sums = left_1.sum(dim=2) * right_1.sum(dim=2) / ((n - 1) * (n - 2))
    return (trace + sums - 2.0 / (n - 2) * (left_1 * right_1).sum(dim=2)) / (n * (n - 3))


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
    float64. Rows are drawn as the accumulator draws them (:func:`draw_rows`): padding
    (``mask`` False) is dropped, at most ``max_rows`` rows are subsampled, then drawn rows
    with NaN/Inf in ``x`` or ``y`` are skipped with a warning.

    Args:
        x: Base output of shape ``(..., Dx)``; leading dimensions are flattened to rows.
        y: Adapted output of shape ``(..., Dy)``, same leading dimensions as ``x``.
        debiased: Use the unbiased HSIC estimator (needs at least 4 rows).
        mask: Bool of shape ``x.shape[:-1]``, True for real tokens.
        max_rows: Subsample this many rows when more remain; None keeps all.
        generator: Draws the subsample; by default a private host generator seeded with
            0, so repeated calls pick the same rows. The global RNG is never used.

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
    generator = generator or _private_generator()
    xf, yf, _ = _sample(x, y, mask, max_rows, generator)
    xf, yf, skipped = _finite_rows(xf, yf)
    warn_nonfinite(skipped, xf.shape[0] + skipped)
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
        generator: Draws the subsamples; by default a private host generator seeded
            with 0 (a host generator draws without launching kernels, whatever ``device``).
            The global RNG is never used.
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
        self.generator = generator if generator is not None else _private_generator()
        self._stats = torch.zeros(num_adapters, NUM_STATS, dtype=torch.float64, device=device)
        # Minibatches added but not yet summed: (index, x (n, Dx), y (n, Dy)).
        # They are summed in batches of the same shapes, one batched computation for many
        # adapters, when ``stats`` is read or one minibatch per adapter has queued up.
        self._queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        # Padding rows per adapter, known on the host; folded into stats when they are read,
        # so queuing and summing copy nothing to the device (a copy waits for it).
        self._padding = [0] * num_adapters
        # Index tensors of the batches summed so far, by their indices: made once per layout.
        self._index_tensors: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def stats(self) -> torch.Tensor:
        """``(num_adapters, NUM_STATS)`` float64 sums, with every minibatch added so far."""
        self.flush()
        if any(self._padding):
            padding = torch.tensor(self._padding, dtype=torch.float64)
            self._stats[:, STAT_ROWS_PADDING] += padding.to(self._stats.device)
            self._padding = [0] * self.num_adapters
        return self._stats

    def flush(self) -> None:
        """Sum the queued minibatches into ``stats`` now, in batches of equal shapes."""
        queue, self._queue = self._queue, []
        groups: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for item in queue:
            groups.setdefault((tuple(item[1].shape), tuple(item[2].shape), item[1].device), []).append(item)
        for items in groups.values():
            self._add_batch(
                tuple(i for i, _, _ in items),
                torch.stack([x for _, x, _ in items]),  # (A, n, Dx)
                torch.stack([y for _, _, y in items]),  # (A, n, Dy)
            )

    @property
    def num_adapters(self) -> int:
        """Number of adapters (rows of ``stats``)."""
        return self._stats.shape[0]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_adapters:
            raise IndexError(f"adapter index must be in [0, {self.num_adapters}), got {index}")

    def update(self, index: int, x: _TensorLike, y: _TensorLike, mask: _TensorLike | None = None) -> None:
        """Add one minibatch of adapter ``index``'s base and adapted outputs.

        Rows are drawn by :meth:`draw` (padding dropped, at most ``max_rows`` kept), then
        passed to :meth:`add`. Only the drawn rows are read, so the cost does not grow
        with the batch.

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
        xr, yr, draw = _sample(x, y, mask, self.max_rows, self.generator)
        self.add(index, xr, yr, padding=draw.padding)

    def draw(
        self, shape: tuple[int, ...], mask: _TensorLike | None = None, unmasked: torch.Tensor | None = None
    ) -> RowDraw:
        """Draw the rows of an output of ``shape`` that the next :meth:`add` reads.

        The forward hooks draw when the base output appears and copy only those rows, so
        an adapter that later writes into its base output in place changes nothing read.
        ``unmasked`` is the mask's flat nonzero indices when the caller has them already.
        """
        return draw_rows(shape, mask, self.max_rows, self.generator, unmasked)

    def add(self, index: int, x: torch.Tensor, y: torch.Tensor, *, padding: int = 0) -> None:
        """Add drawn rows ``x`` (n, Dx) and ``y`` (n, Dy) of adapter ``index`` as one minibatch.

        The minibatch is queued and summed with the others of its shapes in one batched
        computation, once one per adapter has queued up or when ``stats`` is read.

        Rows with NaN/Inf are dropped and counted; a minibatch left with fewer than 4 rows
        is counted and skipped instead of raising. Extreme magnitudes are brought into
        range by one power of two for both sides (see ``_coarse_scale``), so float64 sums
        never overflow; usual activations are added unscaled.

        Raises:
            IndexError: If ``index`` is out of range.
            ValueError: If ``x`` and ``y`` are not (n, D) with the same n.
        """
        self._check_index(index)
        check_row_shapes(tuple(x.shape), tuple(y.shape))
        self._padding[index] += padding
        self._queue.append((index, x, y))
        if len(self._queue) >= self.num_adapters:  # a forward's worth: bounded memory
            self.flush()

    def _add_batch(self, indices: tuple[int, ...], x: torch.Tensor, y: torch.Tensor) -> None:
        """Add minibatch ``a`` of ``x`` (A, n, Dx) and ``y`` (A, n, Dy) to adapter ``indices[a]``.

        One computation for all ``A``: on a GPU each small operation is a kernel launch, and
        per adapter they cost more than the step they score.
        """
        stats = self._stats
        # Rows with NaN/Inf are zeroed and weighted out rather than dropped, and every count
        # stays a tensor: nothing here waits for the device.
        x, y = x.to(stats.device, self.dtype), y.to(stats.device, self.dtype)
        finite = torch.isfinite(x).all(dim=-1) & torch.isfinite(y).all(dim=-1)  # (A, n)
        weight = finite.to(self.dtype)[..., None]  # (A, n, 1)
        x = torch.where(finite[..., None], x, 0.0)
        y = torch.where(finite[..., None], y, 0.0)
        n = weight.sum(dim=(1, 2))  # (A,) finite rows
        zero = torch.zeros_like(n)
        if x.shape[1] < MIN_ROWS_UNBIASED:  # known without the device: too few rows drawn
            terms, enough = zero[:, None].expand(-1, 3), zero.bool()
        else:
            x, y = _coarse_scale(x, y)
            xc, x_constant = _center_rows(x, weight, n)
            yc, y_constant = _center_rows(y, weight, n)
            # The estimator ignores centering; centering only cuts cancellation error. A
            # constant side is snapped to exact zeros so rounding noise never scores.
            xc = xc.masked_fill(x_constant[:, None, None], 0.0)
            yc = yc.masked_fill(y_constant[:, None, None], 0.0)
            enough = n >= MIN_ROWS_UNBIASED  # (A,)
            terms = _hsic_unbiased_batch(xc, yc, n.clamp_min(MIN_ROWS_UNBIASED))  # (A, 3)
        counts = [  # (A,) each: the columns after STAT_LL, in order
            enough.to(n.dtype),  # STAT_BATCHES
            torch.where(enough, n, 0.0),  # STAT_ROWS_USED
            zero,  # STAT_ROWS_PADDING: kept on the host until stats are read
            x.shape[1] - n,  # STAT_ROWS_NONFINITE
            torch.where(enough, 0.0, n),  # STAT_ROWS_SHORT
        ]
        add = torch.cat([torch.where(enough[:, None], terms, 0.0), torch.stack(counts, dim=1)], dim=1)
        add = add.to(torch.float64)  # (A, NUM_STATS)
        index = self._index_tensors.get(indices)
        if index is None:
            index = self._index_tensors[indices] = torch.tensor(indices, device=stats.device)
        stats.index_add_(0, index, add)

    def undefined_reason(self, index: int) -> str | None:
        """Why adapter ``index`` has no CKA value, in words; None when it has one."""
        _, kk, ll, batches, used, padding, nonfinite, short = self.stats[index].tolist()
        if batches == 0:
            seen = used + padding + nonfinite + short
            if seen == 0:
                cause = "no training forward reached it (model in eval mode or under torch.no_grad()?)"
            elif padding and not (nonfinite or short):
                cause = f"all {int(padding)} rows it saw were padding"
            elif nonfinite >= short:
                cause = f"{int(nonfinite)} of its drawn rows held NaN/Inf"
            else:
                cause = (
                    f"its minibatches had fewer than {MIN_ROWS_UNBIASED} usable rows "
                    f"({int(short)} rows in all)"
                )
            return f"adapter {index} has no usable minibatch: {cause}"
        for name, value in (("x (base output)", kk), ("y (adapted output)", ll)):
            if not (value > 0 and math.isfinite(value)):
                return (
                    f"adapter {index}: unbiased self-HSIC sum of {name} must be positive "
                    f"and finite, got {value:.6g} over {int(batches)} minibatches "
                    f"({int(used)} rows); its features are constant"
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
        reason = self.undefined_reason(index)
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
            first = self.undefined_reason(bad[0])
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
        self.stats.add_(other.stats.to(self._stats.device))
        return self

    def all_reduce_(self, group: Any = None) -> CKAAccumulator:
        """Sum the statistics of every rank of a ``torch.distributed`` group into each; returns self.

        Every column is a sum, so after this each rank holds the statistics of all the
        minibatches every rank saw. A collective: every rank of ``group`` must call it.

        Args:
            group: The process group; None is the default group.

        Raises:
            RuntimeError: If no process group is initialized.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce_ needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        dist.all_reduce(self.stats, op=dist.ReduceOp.SUM, group=group)
        return self

    def reset(self) -> None:
        """Zero the statistics (the generator keeps its state)."""
        self.stats.zero_()

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: column names, stats as lists of floats, generator state."""
        return {
            "columns": list(STAT_NAMES),
            "stats": self.stats.tolist(),
            "generator_device": self.generator.device.type,
            "generator_state": self.generator.get_state().tolist(),
        }

    def load_state_dict(self, state: Any, *, reseed: int | None = None) -> None:
        """Restore from ``state_dict()`` output, e.g. after a JSON round trip.

        Everything is checked before anything changes. A generator state saved on another
        kind of device (a CUDA generator's state on the CPU, or the other way round) cannot
        be restored; with ``reseed`` the generator is seeded with it instead and a warning
        says so, without it that is an error.

        Raises:
            ValueError: If the state is malformed, or its columns, number of adapters or
                generator state do not fit.
        """
        self.prepare_load(state, reseed=reseed)()

    def prepare_load(self, state: Any, *, reseed: int | None = None) -> Callable[[], None]:
        """Validate ``state`` and return the function that applies it (and cannot fail)."""
        if not isinstance(state, dict):
            raise ValueError(f"an accumulator state is a dict, got {type(state).__name__}")
        missing = sorted({"columns", "stats", "generator_state"} - set(state))
        if missing:
            raise ValueError(f"the accumulator state misses {missing}")
        if list(state["columns"]) != list(STAT_NAMES):
            raise ValueError(f"state columns {state['columns']} do not match {list(STAT_NAMES)}")
        try:
            stats = torch.tensor(state["stats"], dtype=torch.float64)
            saved = torch.tensor(state["generator_state"], dtype=torch.uint8)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"the accumulator state holds non-numeric values: {err}") from None
        if stats.shape != self.stats.shape:
            raise ValueError(
                f"state holds stats of shape {tuple(stats.shape)}, this accumulator "
                f"{tuple(self.stats.shape)} (num_adapters={self.num_adapters})"
            )
        here = self.generator.get_state()
        device = state.get("generator_device", "cpu")
        if saved.shape != here.shape or device != self.generator.device.type:
            if reseed is None:
                raise ValueError(
                    f"the accumulator state holds a {device} generator state of {saved.numel()} bytes; "
                    f"this accumulator's generator is on {self.generator.device.type} "
                    f"({here.numel()} bytes)"
                )
            seed = reseed

            def apply_reseeded() -> None:
                self.stats.copy_(stats)
                self.generator.manual_seed(seed)
                warnings.warn(
                    f"the checkpoint's scoring generator state is for a {device} generator and cannot "
                    f"be restored on {self.generator.device.type}; the generator was reseeded "
                    f"deterministically ({seed}), so the rows sampled from now on differ from an "
                    "uninterrupted run and the final scores may differ slightly",
                    RuntimeWarning,
                    stacklevel=4,
                )

            return apply_reseeded

        def apply() -> None:
            self.stats.copy_(stats)
            self.generator.set_state(saved)

        return apply
