"""The freeze-timeline picture and the label shortener every report shares."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from safefreeze import AdapterRecord, FreezeEvent, FreezePlan, SAFEConfig
from safefreeze.plots import save_timeline, short_names

REPO = Path(__file__).resolve().parents[1]
BERT = "base_model.model.bert.encoder.layer.{}.attention.self.{}"


def _plan(layers: int = 3) -> FreezePlan:
    names = [BERT.format(i, m) for i in range(layers) for m in ("query", "value")]
    adapters = [AdapterRecord(n, ((f"{n}.lora_A.weight", (4, 32)),)) for n in names]
    event = FreezeEvent(
        step=3, units=(names[0],), adapters=(names[0],), threshold=0.3,
        raw_scores={}, normalized_scores={}, params_freed=128, state_bytes_freed=0,
    )  # fmt: skip
    return FreezePlan(
        config=SAFEConfig(warmup_steps=2, freeze_end_step=5, tau_target=0.5),
        adapters=adapters,
        events=[event],
        units={n: [n] for n in names},
    )


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (
            [BERT.format(0, "query"), BERT.format(0, "value"), BERT.format(11, "query")],
            ["layer.0.query", "layer.0.value", "layer.11.query"],
        ),
        (["blocks.0", "blocks.1"], ["blocks.0", "blocks.1"]),
        (["model.blocks.0.lora", "model.blocks.1.lora"], ["blocks.0", "blocks.1"]),
        (["a.b.x", "a.b.y.z"], ["b.x", "b.y.z"]),  # unaligned: the shared prefix goes
        (["only.one.name"], ["only.one.name"]),
        (["same.name", "same.name"], ["same.name", "same.name"]),
        ([], []),
    ],
)
def test_short_names_drop_what_every_name_shares(names: list[str], expected: list[str]) -> None:
    assert short_names(names) == expected


def test_short_names_stay_distinct() -> None:
    names = [f"m.layers.{i}.attn.{p}" for i in range(12) for p in ("q", "k", "v")]
    labels = short_names(names)
    assert len(set(labels)) == len(names) and labels[:2] == ["layers.0.q", "layers.0.k"]


def test_save_timeline_draws_one_row_per_adapter(tmp_path: Path) -> None:
    small = save_timeline(_plan(1), tmp_path / "small.png", steps=10)
    big = save_timeline(_plan(6), tmp_path / "big.png")
    assert small == tmp_path / "small.png"
    # 8 x (1.8 + 0.26 n) inches at 100 dpi: the height grows by 26 px per adapter.
    assert _png_size(small.read_bytes()) == (800, 232)
    assert _png_size(big.read_bytes()) == (800, 492)


def test_importing_plots_loads_no_matplotlib(tmp_path: Path) -> None:
    code = "import sys, safefreeze.plots; print('matplotlib' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["False"]


def test_missing_matplotlib_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'safefreeze\[mlflow\]'"):
        save_timeline(_plan(), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_the_benchmark_report_draws_the_core_timeline(tmp_path: Path) -> None:
    report = _load(REPO / "benchmarks" / "report.py")  # imported as a module, not run as a script
    plan = _plan(2)
    run = {"variant": "safe", "seed": 0, "plan": json.loads(plan.to_json()), "step_flops": [1.0] * 9}
    data = {"seeds": [0], "runs": [run], "config": plan.config.to_dict()}
    report.plot_timeline(data, tmp_path / "bench.png")
    save_timeline(plan, tmp_path / "core.png", steps=9)
    assert (tmp_path / "bench.png").read_bytes() == (tmp_path / "core.png").read_bytes()
