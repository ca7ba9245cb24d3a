"""FreezePlan: versioned JSON recorded by a real SAFE run, read back exactly, refused clearly."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import train_script
from models import peft_bert, tiny_bert_config
from torch import nn

from safefreeze import (
    FreezeController,
    FreezePlan,
    PlanError,
    PlanMismatchError,
    SAFEOptimizer,
    cubic_threshold,
)

PREFIX = "base_model.model.bert.encoder.layer"
QUERY_0 = f"{PREFIX}.0.attention.self.query"


@dataclasses.dataclass
class Recorded:
    model: nn.Module
    optimizer: SAFEOptimizer
    plan: FreezePlan


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    """8 steps of the replay tests' run: scored for 4 steps, then 3 freezes at steps 5, 6, 7."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the script, so this is the same run
    try:
        model, optimizer = train_script.build(None)
        torch.manual_seed(1)
        train_script.train(model, optimizer, 0, 8)
    finally:
        torch.set_num_threads(threads)
    return Recorded(model, optimizer, optimizer.plan)


@pytest.fixture
def doc(recorded: Recorded) -> dict[str, Any]:
    """A fresh copy of the recorded plan's JSON document, to damage."""
    return copy.deepcopy(recorded.plan.to_dict())


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _inner(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- what a recorded plan holds ------------------------------------------------------------


def test_recorded_events_hold_step_adapters_scores_threshold(recorded: Recorded) -> None:
    plan, cfg = recorded.plan, recorded.plan.config
    assert plan.scored_at == cfg.warmup_steps == 4
    names = [f"{PREFIX}.{i}.attention.self.{part}" for i in range(4) for part in ("query", "value")]
    assert [a.name for a in plan.adapters] == names
    assert plan.units == {name: [name] for name in names}
    assert sorted(plan.raw_scores) == sorted(plan.normalized_scores) == sorted(names)
    top = max(plan.raw_scores.values())
    assert all(plan.normalized_scores[n] == plan.raw_scores[n] / top for n in names)
    # Several freezes at different steps, none at the warm-up's end where tau = 0.
    steps = [e.step for e in plan.events]
    assert len(steps) >= 3 and steps == sorted(set(steps)) and steps[0] > cfg.warmup_steps
    for event in plan.events:
        assert event.threshold == cubic_threshold(
            event.step, warmup_steps=4, freeze_end_step=10, tau_target=cfg.tau_target
        )
        assert event.units == event.adapters
        assert event.raw_scores == {u: plan.raw_scores[u] for u in event.units}
        assert event.normalized_scores == {u: plan.normalized_scores[u] for u in event.units}
        assert all(s < event.threshold for s in event.normalized_scores.values())
    # Everything below the final threshold froze, nothing else did.
    frozen = {a for e in plan.events for a in e.adapters}
    assert frozen == {n for n in names if plan.normalized_scores[n] < plan.events[-1].threshold}
    assert plan.frozen == {a: e.step for e in plan.events for a in e.adapters}
    assert set(recorded.optimizer.frozen) == frozen


def test_recorded_events_count_params_and_adamw_state_freed(recorded: Recorded) -> None:
    params = dict(recorded.model.named_parameters())
    held = {id(p) for p in recorded.optimizer.state}
    for event in recorded.plan.events:
        tensors = [p for n, p in params.items() if any(n.startswith(f"{a}.lora_") for a in event.adapters)]
        assert len(tensors) == 2 * len(event.adapters)  # lora_A and lora_B
        numel = sum(p.numel() for p in tensors)
        assert numel > 0
        assert event.params_freed == numel
        # AdamW held exp_avg and exp_avg_sq (fp32) per element plus a fp32 step per tensor.
        assert event.state_bytes_freed == 2 * 4 * numel + 4 * len(tensors)
        assert all(not p.requires_grad and p.grad is None and id(p) not in held for p in tensors)
    first = recorded.plan.events[0]
    # r=4 LoRA on a 32-wide projection: A (4, 32) and B (32, 4), 256 elements per adapter.
    assert first.params_freed == 256 * len(first.adapters)
    assert first.state_bytes_freed == 2056 * len(first.adapters)


# ---- JSON round trip --------------------------------------------------------------------------


def test_json_round_trip_is_exact(recorded: Recorded, tmp_path: Path) -> None:
    plan = recorded.plan
    text = plan.to_json()
    again = FreezePlan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert path == tmp_path / "sub" / "plan.json"
    assert path.read_text(encoding="utf-8") == text
    loaded = FreezePlan.load(path)
    assert loaded == plan
    assert loaded.events[0].raw_scores == plan.events[0].raw_scores  # floats bit for bit
    assert loaded.fingerprint == plan.fingerprint


def test_file_is_plain_versioned_json(recorded: Recorded, tmp_path: Path) -> None:
    path = recorded.plan.save(tmp_path / "plan.json")

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert data["schema"] == "safefreeze.plan"
    assert data["version"] == 1
    assert set(data) == {"schema", "version", "config", "model", "units", "scores", "events"}
    assert data["config"] == recorded.plan.config.to_dict()
    assert re.fullmatch(r"[0-9a-f]{64}", data["model"]["fingerprint"])
    assert data["model"]["adapters"][0] == {
        "name": QUERY_0,
        "params": [
            [f"{QUERY_0}.lora_A.default.weight", [4, 32]],
            [f"{QUERY_0}.lora_B.default.weight", [32, 4]],
        ],
    }
    assert data["scores"]["scored_at"] == 4
    assert set(data["events"][0]) == {
        "step",
        "units",
        "adapters",
        "threshold",
        "raw_scores",
        "normalized_scores",
        "params_freed",
        "state_bytes_freed",
    }


def test_nan_scores_are_written_as_null_and_read_back_as_nan(recorded: Recorded, tmp_path: Path) -> None:
    plan = copy.deepcopy(recorded.plan)
    plan.raw_scores[QUERY_0] = plan.normalized_scores[QUERY_0] = math.nan
    event = plan.events[0]
    name = event.units[0]
    plan.events[0] = dataclasses.replace(
        event,
        threshold=math.nan,  # as in hand-built plans
        raw_scores={**event.raw_scores, name: math.nan},
        normalized_scores={name: math.inf},
    )
    data = json.loads(plan.save(tmp_path / "plan.json").read_text(encoding="utf-8"))
    assert data["scores"]["raw"][QUERY_0] is None
    assert data["scores"]["normalized"][QUERY_0] is None
    assert data["events"][0]["raw_scores"][name] is None
    assert data["events"][0]["normalized_scores"] == {name: None}
    assert data["events"][0]["threshold"] is None
    loaded = FreezePlan.load(tmp_path / "plan.json")
    assert math.isnan(loaded.raw_scores[QUERY_0]) and math.isnan(loaded.normalized_scores[QUERY_0])
    assert math.isnan(loaded.events[0].raw_scores[name])
    assert math.isnan(loaded.events[0].normalized_scores[name])
    assert math.isnan(loaded.events[0].threshold)
    assert loaded.events[1:] == recorded.plan.events[1:]
    others = {k: v for k, v in loaded.raw_scores.items() if k != QUERY_0}
    assert others == {k: v for k, v in recorded.plan.raw_scores.items() if k != QUERY_0}


def test_save_is_atomic_and_leaves_no_temp_file(
    recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "plan.json"
    recorded.plan.save(path)
    recorded.plan.save(path)  # overwriting goes through a temp file too
    assert os.listdir(tmp_path) == ["plan.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    changed = copy.deepcopy(recorded.plan)
    changed.events.clear()
    with pytest.raises(OSError, match="disk full"):
        changed.save(path)
    assert os.listdir(tmp_path) == ["plan.json"]
    assert path.read_bytes() == before


# ---- files that are not plans -------------------------------------------------------------


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FreezePlan.load(tmp_path / "nope.json")


def test_truncated_file(recorded: Recorded, tmp_path: Path) -> None:
    text = recorded.plan.to_json()
    path = tmp_path / "plan.json"
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    message = r"plan file '.*plan\.json' is not valid JSON \(truncated or corrupt\?\)"
    with pytest.raises(PlanError, match=message):
        FreezePlan.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\xff\xfe garbage \x80", "byte 1 is not UTF-8"),
        (b"garbage", "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b"[1, 2, 3]", "is not a safefreeze plan: expected schema 'safefreeze.plan', got 'list'"),
        (b'{"schema": "other.thing", "version": 1}', "expected schema 'safefreeze.plan', got 'other.thing'"),
        (b'{"version": 1}', "expected schema 'safefreeze.plan', got None"),
    ],
    ids=["binary", "text", "empty", "not-an-object", "other-schema", "no-schema"],
)
def test_corrupt_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=re.escape(message)) as info:
        FreezePlan.load(path)
    assert info.type is PlanError


def test_load_never_unpickles(recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, ("import builtins; builtins._safefreeze_unpickled = True",))

    path = tmp_path / "plan.pkl"
    path.write_bytes(pickle.dumps(recorded.plan.to_dict()))
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("FreezePlan.load used pickle"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("FreezePlan.load used torch.load"))
    with pytest.raises(PlanError, match="not UTF-8; a pickle or other binary file"):
        FreezePlan.load(path)
    path.write_bytes(pickle.dumps(Payload(), protocol=0))  # protocol 0 is ASCII
    with pytest.raises(PlanError, match="is not valid JSON"):
        FreezePlan.load(path)
    assert not hasattr(builtins, "_safefreeze_unpickled")


def test_unknown_schema_version(doc: dict[str, Any], tmp_path: Path) -> None:
    doc["version"] = 99
    with pytest.raises(PlanError, match=r"schema version 99; this safefreeze reads version 1; upgrade"):
        FreezePlan.load(_write(tmp_path / "plan.json", doc))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.pop("events"), "missing field 'events'"),
        (lambda d: d["model"].pop("fingerprint"), "missing field 'fingerprint' in model"),
        (lambda d: d["scores"].pop("raw"), "missing field 'raw' in scores"),
        (lambda d: d["events"][1].pop("threshold"), "missing field 'threshold' in events[1]"),
        (lambda d: d["config"].pop("tau_target"), "missing field 'tau_target' in config"),
        (lambda d: d["config"].update(tau_target=7.0), "bad config: ValueError: SAFEConfig requires 0 <="),
        (lambda d: d["events"][0].update(step="five"), "bad events[0]: ValueError"),
    ],
    ids=["events", "fingerprint", "raw-scores", "threshold", "config-field", "config-value", "step"],
)
def test_missing_or_bad_field(doc: dict[str, Any], tmp_path: Path, damage: Any, message: str) -> None:
    damage(doc)
    with pytest.raises(PlanError, match=re.escape(message)) as info:
        FreezePlan.load(_write(tmp_path / "plan.json", doc))
    assert info.type is PlanError
    assert "is a damaged safefreeze plan" in str(info.value)


def test_edited_adapter_list_no_longer_matches_fingerprint(doc: dict[str, Any]) -> None:
    recorded_fp = doc["model"]["fingerprint"]
    doc["model"]["adapters"][0]["params"][0][1] = [8, 32]
    with pytest.raises(PlanError, match=rf"fingerprint {recorded_fp[:12]} does not match its adapter list"):
        FreezePlan.from_dict(doc)
    del doc["model"]["adapters"][0]
    with pytest.raises(PlanError, match="the adapter list was edited"):
        FreezePlan.from_dict(doc)


def test_events_naming_unknown_units_are_refused_at_load(doc: dict[str, Any]) -> None:
    doc["events"][0]["units"] = ["encoder.layer.9.query"]
    step = doc["events"][0]["step"]
    message = f"the event at step {step} freezes unknown units ['encoder.layer.9.query']"
    with pytest.raises(PlanError, match=re.escape(message)):
        FreezePlan.from_dict(doc)
    event = doc["events"][0]
    event["units"] = list(event["adapters"])
    FreezePlan.from_dict(doc)  # repaired
    event["adapters"].append(QUERY_0)  # never frozen: above every threshold
    message = rf"the event at step {step} lists adapters \[.*'{QUERY_0}'\] but its units"
    with pytest.raises(PlanError, match=message):
        FreezePlan.from_dict(doc)


# ---- replaying onto a model that does not match ---------------------------------------------


def _replay_error(model: nn.Module, plan: FreezePlan) -> str:
    with pytest.raises(PlanMismatchError) as info:
        SAFEOptimizer(_inner(_trainable(model)), model, plan=plan)
    assert not _has_hooks(model)
    with pytest.raises(PlanMismatchError, match=re.escape(str(info.value))):
        FreezeController(model, plan=plan)
    return str(info.value)


def _layers(*names: str) -> list[str]:
    return [f"{PREFIX}.{name}" for name in names]


MISMATCH = "the freeze plan does not fit this model: 4 adapter(s) in the {} are not in the {}, e.g. {}"


def test_replay_onto_other_target_modules(recorded: Recorded) -> None:
    values = _layers("0.attention.self.value", "1.attention.self.value", "2.attention.self.value")
    message = _replay_error(peft_bert(("query",), layers=4), recorded.plan)
    assert message == MISMATCH.format("plan", "model", values)
    keys = _layers("0.attention.self.key", "1.attention.self.key", "2.attention.self.key")
    message = _replay_error(peft_bert(("query", "key", "value"), layers=4), recorded.plan)
    assert message == MISMATCH.format("model", "plan", keys)


def test_replay_onto_other_lora_rank(recorded: Recorded) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification(tiny_bert_config(4))
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert _replay_error(model, recorded.plan) == (
        f"the freeze plan does not fit this model: 8 adapter(s) have other parameters, e.g. adapter "
        f"'{QUERY_0}' has lora_A.default.weight[8, 32], lora_B.default.weight[32, 8] in the model but "
        "lora_A.default.weight[4, 32], lora_B.default.weight[32, 4] in the plan"
    )


def test_replay_onto_other_number_of_layers(recorded: Recorded) -> None:
    missing = _layers("2.attention.self.query", "2.attention.self.value", "3.attention.self.query")
    assert _replay_error(peft_bert(layers=2), recorded.plan) == MISMATCH.format("plan", "model", missing)
    extra = _layers("4.attention.self.query", "4.attention.self.value", "5.attention.self.query")
    assert _replay_error(peft_bert(layers=6), recorded.plan) == MISMATCH.format("model", "plan", extra)


def test_checkpoint_onto_other_model_names_the_difference(recorded: Recorded) -> None:
    state = recorded.optimizer.state_dict()
    model = peft_bert(("query",), layers=4)
    optimizer = SAFEOptimizer(_inner(_trainable(model)), model, recorded.plan.config)
    with pytest.raises(PlanMismatchError, match=r"4 adapter\(s\) in the plan are not in the model"):
        optimizer.load_state_dict(state)
    assert optimizer.frozen == []
    assert all(p.requires_grad for p in optimizer.controller.trainable_params())
    optimizer.controller.close()
