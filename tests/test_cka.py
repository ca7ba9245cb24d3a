"""Linear CKA: torch vs the numpy reference, invariances, the accumulator, and the guards."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safefreeze.cka
from safefreeze.cka import CKAAccumulator, CKAUndefinedError, hsic_unbiased, linear_cka
from safefreeze.cka._numpy import linear_cka_numpy
from safefreeze.cka._torch import (
    NUM_STATS,
    STAT_BATCHES,
    STAT_KL,
    STAT_LL,
    STAT_ROWS_NONFINITE,
    STAT_ROWS_PADDING,
    STAT_ROWS_SHORT,
    STAT_ROWS_USED,
)

# The installed package's directory (the suite runs against the installed package).
PACKAGE = Path(safefreeze.cka.__file__).resolve().parents[1]
SHAPES = [(16, 8, 8), (64, 32, 5), (100, 3, 50)]
PROPERTY = settings(max_examples=25, deadline=None)


def _pair(seed: int, n: int, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray]:
    """x (n, dx) and a y (n, dy) that shares part of x's signal, so CKA is far from 0 and 1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx)) + rng.normal(size=dx)  # non-zero column means
    y = x @ rng.normal(size=(dx, dy)) + rng.normal(size=(n, dy))
    return x, y


def _both(x: np.ndarray, y: np.ndarray, *, debiased: bool = False) -> tuple[float, float]:
    """(numpy, torch float64) CKA of the same data."""
    return (
        linear_cka(x, y, backend="numpy", debiased=debiased),
        linear_cka(torch.from_numpy(x), torch.from_numpy(y), backend="torch", debiased=debiased),
    )


def _hsic_by_definition(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012's U-statistic, summed over distinct index tuples as written."""
    n = len(k)

    def falling(m: int) -> int:
        return int(np.prod(range(n - m + 1, n + 1)))

    pairs = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2))
    quads = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4))
    triples = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3))
    return float(pairs / falling(2) + quads / falling(4) - 2 * triples / falling(3))


# --- two implementations agree ---------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "dx", "dy"), SHAPES)
def test_torch_matches_numpy_reference(n: int, dx: int, dy: int, debiased: bool) -> None:
    x, y = _pair(n + dx + dy, n, dx, dy)
    ref = linear_cka_numpy(x, y, debiased=debiased)
    assert 0.01 < abs(ref) < 0.99  # a value that can actually disagree
    t64 = linear_cka(torch.from_numpy(x), torch.from_numpy(y), debiased=debiased)
    t32 = linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float(), debiased=debiased)
    assert t64 == pytest.approx(ref, abs=1e-6)
    assert t32 == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "dx", "dy"), [*SHAPES, (6, 40, 2)])
def test_gram_form_equals_feature_form(n: int, dx: int, dy: int, debiased: bool) -> None:
    x, y = _pair(7, n, dx, dy)
    feature = linear_cka_numpy(x, y, debiased=debiased, form="feature")
    gram = linear_cka_numpy(x, y, debiased=debiased, form="gram")
    assert gram == pytest.approx(feature, abs=1e-10)


def test_hsic_unbiased_matches_u_statistic_definition() -> None:
    x, y = _pair(3, 7, 3, 2)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    assert hsic_unbiased(k, l) == pytest.approx(_hsic_by_definition(k, l), rel=1e-10)
    assert hsic_unbiased(k, k) == pytest.approx(_hsic_by_definition(k, k), rel=1e-10)


def test_biased_cka_matches_kornblith_formula() -> None:
    x, y = _pair(5, 30, 4, 6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert _both(x, y) == pytest.approx((expected, expected), abs=1e-12)


# --- properties -------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cka_of_x_with_itself_is_one(backend: str, debiased: bool) -> None:
    x, _ = _pair(0, 50, 12, 1)
    xs = torch.from_numpy(x) if backend == "torch" else x
    assert linear_cka(xs, xs, backend=backend, debiased=debiased) == pytest.approx(1.0, abs=1e-6)  # type: ignore[arg-type]


_sizes = {
    "seed": st.integers(0, 2**32 - 1),
    "n": st.integers(8, 40),
    "dx": st.integers(1, 12),
    "dy": st.integers(1, 12),
    "debiased": st.booleans(),
}


@PROPERTY
@given(**_sizes)
def test_invariant_to_orthogonal_rotation(seed: int, n: int, dx: int, dy: int, debiased: bool) -> None:
    x, y = _pair(seed, n, dx, dy)
    q, _ = np.linalg.qr(np.random.default_rng(seed + 1).normal(size=(dx, dx)))  # (dx, dx)
    before = _both(x, y, debiased=debiased)
    assert _both(x @ q, y, debiased=debiased) == pytest.approx(before, abs=1e-6)


@PROPERTY
@given(**_sizes, scale=st.floats(1e-3, 1e3))
def test_invariant_to_isotropic_scaling(
    seed: int, n: int, dx: int, dy: int, debiased: bool, scale: float
) -> None:
    x, y = _pair(seed, n, dx, dy)
    before = _both(x, y, debiased=debiased)
    assert _both(scale * x, y, debiased=debiased) == pytest.approx(before, abs=1e-6)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(8, 40), d=st.integers(1, 12))
def test_self_similarity_property(seed: int, n: int, d: int) -> None:
    x, _ = _pair(seed, n, d, 1)
    for debiased in (False, True):
        assert _both(x, x, debiased=debiased) == pytest.approx((1.0, 1.0), abs=1e-6)


# --- masks, subsampling, dtypes -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mask_drops_padding_rows(backend: str) -> None:
    x, y = _pair(11, 2 * 10, 6, 4)
    lengths = [7, 10]
    mask = np.arange(10)[None, :] < np.array(lengths)[:, None]  # (B, T)
    xp, yp = x.reshape(2, 10, 6).copy(), y.reshape(2, 10, 4).copy()  # (B, T, D)
    xp[~mask], yp[~mask] = np.nan, 1e30  # padding must be neither used nor reported
    expected = linear_cka_numpy(xp[mask], yp[mask])
    args = (xp, yp, mask) if backend == "numpy" else map(torch.from_numpy, (xp, yp, mask))
    xs, ys, ms = args
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = linear_cka(xs, ys, backend=backend, mask=ms)  # type: ignore[arg-type]
    assert got == pytest.approx(expected, abs=1e-10)
    assert got != pytest.approx(linear_cka_numpy(x, y), abs=1e-3)


def test_max_rows_subsample_is_deterministic_and_leaves_global_rng_alone() -> None:
    x, y = _pair(2, 200, 5, 5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng_before = torch.get_rng_state()

    def run(seed: int | None) -> float:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return linear_cka(xt, yt, max_rows=32, generator=gen)

    keep = torch.randperm(200, generator=torch.Generator().manual_seed(5))[:32]
    assert run(5) == run(5) == pytest.approx(linear_cka_numpy(x[keep], y[keep]), abs=1e-10)
    assert run(5) != pytest.approx(run(6), abs=1e-6)
    default = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:32]
    assert run(None) == run(None) == pytest.approx(linear_cka_numpy(x[default], y[default]))
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype: torch.dtype) -> None:
    x, y = _pair(4, 64, 16, 8)
    xh, yh = torch.from_numpy(x).to(dtype), torch.from_numpy(y).to(dtype)
    expected = linear_cka_numpy(xh.double().numpy(), yh.double().numpy())  # same rounded data
    assert linear_cka(xh, yh) == pytest.approx(expected, abs=1e-5)
    assert linear_cka(xh, yh, debiased=True) == pytest.approx(
        linear_cka_numpy(xh.double().numpy(), yh.double().numpy(), debiased=True), abs=1e-4
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_leaves_cuda_rng_alone() -> None:
    x, y = _pair(6, 300, 8, 8)
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    rng_before = torch.cuda.get_rng_state()
    assert linear_cka(xt, yt, debiased=True) == pytest.approx(
        linear_cka_numpy(x, y, debiased=True), abs=1e-10
    )
    assert linear_cka(xt, yt, max_rows=64) == linear_cka(xt, yt, max_rows=64)
    acc = CKAAccumulator(1, max_rows=None, device="cuda")
    acc.update(0, xt, yt)
    assert acc.stats.device.type == "cuda"
    assert acc.value(0) == pytest.approx(linear_cka_numpy(x, y, debiased=True), abs=1e-10)
    assert torch.equal(torch.cuda.get_rng_state(), rng_before)


# --- streaming accumulator ----------------------------------------------------------------


def _batches(seed: int, sizes: list[int], dx: int = 6, dy: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    return [_pair(seed + i, n, dx, dy) for i, n in enumerate(sizes)]


def test_accumulator_matches_minibatch_definition() -> None:
    batches = _batches(20, [10, 3, 25, 8])  # the 3-row batch cannot give an unbiased estimate
    batches[2][0][4, 1] = np.inf  # one non-finite row in the third batch
    acc = CKAAccumulator(1, max_rows=None)
    for x, y in batches:
        acc.update(0, torch.from_numpy(x), torch.from_numpy(y))
    sums = np.zeros(3)
    for x, y in (
        batches[0],
        (batches[2][0][np.arange(25) != 4], batches[2][1][np.arange(25) != 4]),
        batches[3],
    ):
        k, l = x @ x.T, y @ y.T  # noqa: E741  raw Gram matrices, as Nguyen et al. define them
        sums += [hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)]
    expected = sums[0] / np.sqrt(sums[1] * sums[2])
    assert acc.value(0) == pytest.approx(expected, abs=1e-10)
    assert acc.stats[0, STAT_KL : STAT_LL + 1].numpy() == pytest.approx(sums, rel=1e-9)
    assert acc.stats[0, STAT_BATCHES].item() == 3
    assert acc.stats[0, STAT_ROWS_USED].item() == 10 + 24 + 8
    assert acc.stats[0, STAT_ROWS_SHORT].item() == 3
    assert acc.stats[0, STAT_ROWS_NONFINITE].item() == 1


def test_accumulator_scale_of_a_minibatch_does_not_change_its_score() -> None:
    x, y = _pair(5, 40, 6, 6)
    small, huge = CKAAccumulator(1, max_rows=None), CKAAccumulator(1, max_rows=None)
    small.update(0, torch.from_numpy(x), torch.from_numpy(y))
    # float64 activations near 1e200 overflow a sum of fourth powers unless rescaled first.
    huge.update(0, torch.from_numpy(x * 1e200), torch.from_numpy(y * 1e200))
    expected = linear_cka_numpy(x, y, debiased=True)
    assert huge.value(0) == pytest.approx(expected, abs=1e-12)
    assert small.value(0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e30), (np.float64, 1e200), (np.float64, 1e-200)])
def test_large_and_tiny_magnitudes_are_not_called_constant(backend: str, dtype: type, scale: float) -> None:
    x, y = _pair(6, 50, 5, 5)
    expected = linear_cka_numpy(x, y)
    xs, ys = (x * scale).astype(dtype), (y * scale).astype(dtype)
    if backend == "torch":
        xs, ys = torch.from_numpy(xs), torch.from_numpy(ys)  # type: ignore[assignment]
    assert linear_cka(xs, ys, backend=backend) == pytest.approx(expected, abs=1e-5)  # type: ignore[arg-type]


def test_one_sampler_linear_cka_and_accumulator_read_the_same_rows() -> None:
    x, y = _pair(11, 300, 6, 4)
    x[7, 0] = np.nan  # drawn or not, a non-finite row is dropped after the draw
    mask = np.ones(300, dtype=bool)
    mask[::5] = False
    xt, yt, mt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)
    acc = CKAAccumulator(1, max_rows=64, generator=torch.Generator().manual_seed(4))
    acc.update(0, xt, yt, mt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        direct = linear_cka(
            xt, yt, mask=mt, max_rows=64, generator=torch.Generator().manual_seed(4), debiased=True
        )
    assert acc.value(0) == pytest.approx(direct, abs=1e-12)
    assert acc.stats[0, STAT_ROWS_PADDING].item() == 60
    used, nonfinite = acc.stats[0, STAT_ROWS_USED].item(), acc.stats[0, STAT_ROWS_NONFINITE].item()
    assert used + nonfinite == 64


def test_accumulator_with_large_batches_approaches_full_data_cka() -> None:
    x, y = _pair(8, 4000, 6, 6)
    acc = CKAAccumulator(1, max_rows=None)
    for xb, yb in zip(np.split(x, 8), np.split(y, 8), strict=True):
        acc.update(0, torch.from_numpy(xb), torch.from_numpy(yb))
    full = linear_cka_numpy(x, y, debiased=True)
    assert acc.value(0) == pytest.approx(full, abs=1e-4)


def test_queued_minibatches_sum_in_one_batch_as_they_would_one_by_one() -> None:
    """Adds queue until a forward's worth (one per adapter) and are summed in one batch."""
    rng = np.random.default_rng(5)
    minibatches = []
    for i in range(8):
        x = rng.standard_normal((20, 6)) * 10.0 ** rng.integers(-3, 4)
        y = x + 0.4 * x**2 if i % 3 else x * 2.0  # one side constant-free, some CKA exactly 1
        if i == 5:
            x[3, 2] = np.nan  # weighted out, counted
        minibatches.append((i % 4, torch.from_numpy(x), torch.from_numpy(y), i))
    constant = torch.zeros(20, 6, dtype=torch.float64), torch.ones(20, 4, dtype=torch.float64)
    minibatches.append((1, *constant, 0))  # both sides constant
    batched, single = CKAAccumulator(4, max_rows=None), CKAAccumulator(4, max_rows=None)
    for count, (index, x, y, padding) in enumerate(minibatches, start=1):
        batched.add(index, x, y, padding=padding)
        single.add(index, x, y, padding=padding)
        single.flush()  # one minibatch at a time
        assert len(batched._queue) == count % 4  # summed at every 4th, a forward's worth
    torch.testing.assert_close(batched.stats, single.stats, rtol=1e-13, atol=0)
    assert not batched._queue
    assert batched.stats[:, STAT_ROWS_PADDING].tolist() == [4.0, 6.0, 8.0, 10.0]
    assert batched.stats[:, STAT_ROWS_NONFINITE].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_accumulator_stats_sum_across_ranks() -> None:
    batches = _batches(30, [12, 9, 16, 7])
    one, rank0, rank1 = (CKAAccumulator(2, max_rows=None) for _ in range(3))
    for i, (x, y) in enumerate(batches):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        one.update(i % 2, xt, yt)
        (rank0 if i < 2 else rank1).update(i % 2, xt, yt)
    # What torch.distributed.all_reduce(acc.stats) computes across two ranks.
    torch.testing.assert_close(rank0.stats + rank1.stats, one.stats, rtol=1e-12, atol=0)
    torch.testing.assert_close(rank0.merge_(rank1).values(), one.values(), rtol=1e-12, atol=0)
    assert one.value(0) != pytest.approx(one.value(1), abs=1e-3)  # adapters kept apart


def test_accumulator_state_dict_json_round_trip_resumes_exactly() -> None:
    batches = _batches(40, [300, 280, 310])  # above max_rows: each update subsamples
    acc = CKAAccumulator(2, max_rows=64, generator=torch.Generator().manual_seed(3))
    acc.update(1, *map(torch.from_numpy, batches[0]))
    restored = CKAAccumulator(2, max_rows=64)
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert torch.equal(restored.stats, acc.stats)
    for a in (acc, restored):
        for x, y in batches[1:]:
            a.update(1, torch.from_numpy(x), torch.from_numpy(y))
    assert torch.equal(restored.stats, acc.stats)
    assert acc.stats[1, STAT_ROWS_USED].item() == 3 * 64
    acc.reset()
    assert torch.count_nonzero(acc.stats) == 0


def test_accumulator_keeps_only_the_stats_tensor() -> None:
    acc = CKAAccumulator(3)
    for d in (4, 64, 512):
        x = torch.randn(2, 300, d, generator=torch.Generator().manual_seed(d))
        acc.update(d % 3, x, x + 0.1)
    tensors = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    assert [tuple(t.shape) for t in tensors] == [(3, NUM_STATS)]
    assert acc.stats.dtype == torch.float64


def test_accumulator_global_rng_untouched() -> None:
    before = torch.get_rng_state()
    acc = CKAAccumulator(1, max_rows=16)
    acc.update(0, torch.ones(100, 3).cumsum(0), torch.rand(100, 3, generator=torch.Generator()))
    assert torch.equal(torch.get_rng_state(), before)


# --- guards -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_non_finite_rows_are_skipped_with_a_warning(backend: str) -> None:
    x, y = _pair(9, 20, 5, 3)
    x[3, 0], y[11, 2] = np.nan, -np.inf
    keep = ~np.isin(np.arange(20), [3, 11])
    xs, ys = (x, y) if backend == "numpy" else (torch.from_numpy(x), torch.from_numpy(y))
    with pytest.warns(RuntimeWarning, match=r"skipped 2 of 20 rows with non-finite"):
        got = linear_cka(xs, ys, backend=backend)  # type: ignore[arg-type]
    assert got == pytest.approx(linear_cka_numpy(x[keep], y[keep]), abs=1e-10)


def test_accumulator_counts_non_finite_rows_and_skips_small_batches() -> None:
    acc = CKAAccumulator(3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x[:3, 0] = torch.nan  # leaves 3 valid rows: too few, so the whole batch is skipped
    acc.update(2, x, x)
    assert acc.stats[2, STAT_ROWS_NONFINITE].item() == 3
    assert acc.stats[2, STAT_ROWS_SHORT].item() == 3
    assert acc.stats[2, STAT_BATCHES].item() == 0
    with pytest.raises(
        CKAUndefinedError, match=r"adapter 2 has no usable minibatch: 3 of its drawn rows held NaN"
    ):
        acc.value(2)


def test_undefined_reasons_name_the_real_cause() -> None:
    acc = CKAAccumulator(4)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    acc.update(0, x, x, torch.zeros(2, 6, dtype=torch.bool))  # every token is padding
    acc.update(1, x[:, :1], x[:, :1])  # 2 rows per minibatch: too few
    acc.update(2, torch.full((12, 4), 0.1), x.reshape(12, 4))  # constant base output
    reasons = [acc.undefined_reason(i) for i in range(4)]
    assert reasons[0] == "adapter 0 has no usable minibatch: all 12 rows it saw were padding"
    assert (
        reasons[1]
        == "adapter 1 has no usable minibatch: its minibatches had fewer than 4 usable rows (2 rows in all)"
    )
    assert (
        reasons[2] is not None
        and "x (base output) must be positive" in reasons[2]
        and "constant" in reasons[2]
    )
    assert reasons[3] is not None and "no training forward reached it" in reasons[3]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("fill", [0.1, 0.0])
def test_constant_features_raise(backend: str, side: str, fill: float) -> None:
    x, y = _pair(1, 30, 4, 4)
    if side == "x":
        x = np.full_like(x, fill)  # 0.1 is not representable: centering leaves rounding noise
    else:
        y = np.full_like(y, fill)
    for xs, ys in [(x, y), (torch.from_numpy(x).float(), torch.from_numpy(y).float())]:
        with pytest.raises(CKAUndefinedError, match=rf"^{side} has constant features"):
            linear_cka(xs, ys, backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_too_few_rows_raise(backend: str) -> None:
    x, y = _pair(1, 3, 4, 4)
    xs, ys = (x, y) if backend == "numpy" else (torch.from_numpy(x), torch.from_numpy(y))
    with pytest.raises(CKAUndefinedError, match=r"unbiased HSIC needs at least 4 rows, got 3"):
        linear_cka(xs, ys, backend=backend, debiased=True)  # type: ignore[arg-type]
    with pytest.raises(CKAUndefinedError, match=r"linear CKA needs at least 2 rows, got 1"):
        linear_cka(xs[:1], ys[:1], backend=backend)  # type: ignore[arg-type]
    with pytest.raises(CKAUndefinedError, match=r"at least 4 rows, got 2"):
        hsic_unbiased(np.eye(2), np.eye(2))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_non_positive_unbiased_self_hsic_raises(backend: str) -> None:
    # One outlier among 4 rows: the unbiased estimate of Var(x)^2 is exactly 0.
    x = np.array([[0.0], [0.0], [0.0], [4.0]])
    y = np.random.default_rng(0).normal(size=(4, 3))
    xs, ys = (x, y) if backend == "numpy" else (torch.from_numpy(x), torch.from_numpy(y))
    with pytest.raises(CKAUndefinedError, match=r"unbiased self-HSIC of x must be positive .*got 0"):
        linear_cka(xs, ys, backend=backend, debiased=True)  # type: ignore[arg-type]
    assert linear_cka(xs, ys, backend=backend) > 0  # type: ignore[arg-type]  # biased is fine


def test_accumulator_undefined_adapter_is_named() -> None:
    acc = CKAAccumulator(3)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # Constant base output; centering 0.1 in float64 leaves ~1e-17 noise, not zeros.
    acc.update(0, torch.full((40, 5), 0.1, dtype=torch.float64), x)
    acc.update(1, x, x + 0.3 * x.square())
    assert acc.defined().tolist() == [False, True, False]
    with pytest.raises(
        CKAUndefinedError,
        match=r"adapter 0: unbiased self-HSIC sum of x \(base output\) must be positive.*got 0",
    ):
        acc.value(0)
    with pytest.raises(CKAUndefinedError, match=r"undefined for 2 of 3 adapters \[0, 2\]; first: adapter 0"):
        acc.values()
    assert 0 < acc.value(1) < 1
    lenient = acc.values(strict=False).tolist()
    assert math.isnan(lenient[0]) and math.isnan(lenient[2])
    assert lenient[1] == acc.value(1)


def test_shape_mismatch_names_both_shapes() -> None:
    x, y = np.zeros((16, 8)), np.zeros((15, 8))
    for xs, ys in [(x, y), (torch.from_numpy(x), torch.from_numpy(y))]:
        for backend in ("numpy", "torch"):
            with pytest.raises(ValueError, match=r"x.shape=\(16, 8\) and y.shape=\(15, 8\)"):
                linear_cka(xs, ys, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x.shape=\(16, 8\) and y.shape=\(15, 8\)"):
        CKAAccumulator(1).update(0, torch.from_numpy(x), torch.from_numpy(y))
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape x.shape\[:-1\]=\(16,\)"):
        linear_cka(torch.zeros(16, 8), torch.zeros(16, 8), mask=torch.ones(16, 8, dtype=torch.bool))


def test_argument_errors() -> None:
    x = np.zeros((8, 2))
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'numpy'\), got 'jax'"):
        linear_cka(x, x, backend="jax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"options of the torch backend.*max_rows=4"):
        linear_cka(x, x, backend="numpy", max_rows=4)
    with pytest.raises(ValueError, match=r"form must be one of \('feature', 'gram'\), got 'dual'"):
        linear_cka_numpy(x, x, form="dual")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_rows must be None or >= 4.*got 2"):
        CKAAccumulator(1, max_rows=2)
    with pytest.raises(IndexError, match=r"adapter index must be in \[0, 2\), got 2"):
        CKAAccumulator(2).update(2, torch.zeros(8, 2), torch.zeros(8, 2))
    with pytest.raises(ValueError, match=r"stats of shape \(3, 8\), this accumulator \(2, 8\)"):
        CKAAccumulator(2).load_state_dict(CKAAccumulator(3).state_dict())


# --- imports ------------------------------------------------------------------------------


def test_numpy_reference_imports_without_torch() -> None:
    # Stub the parent package: safefreeze/__init__.py loads torch for the rest of the
    # library, but safefreeze.cka and its numpy reference must not.
    code = (
        "import sys, types; pkg = types.ModuleType('safefreeze'); "
        f"pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules['safefreeze'] = pkg; "
        "import safefreeze.cka._numpy, safefreeze.cka; "
        "from safefreeze.cka import linear_cka; import numpy as np; "
        "x = np.arange(12.0).reshape(6, 2) ** 2; "
        "assert abs(linear_cka(x, x, backend='numpy') - 1) < 1e-12; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
