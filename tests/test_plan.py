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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import train_script
from models import peft_bert, tiny_bert_config
from torch import nn

from safefreeze import (
    AdapterRecord,
    FreezeController,
    FreezeEvent,
    FreezePlan,
    PlanError,
    PlanMismatchError,
    SAFEConfig,
    SAFEOptimizer,
    cubic_threshold,
)
from safefreeze import plan as plan_module
from safefreeze.plan import SCHEMA_VERSION, check_frozen_matches_events, fingerprint, migrate

PREFIX = "base_model.model.bert.encoder.layer"
QUERY_0 = f"{PREFIX}.0.attention.self.query"


@dataclasses.dataclass
class Recorded:
    model: nn.Module
    optimizer: SAFEOptimizer
    plan: FreezePlan


# The paper's rule: one unit per adapter, scores over the top one, every adapter below the
# threshold freezes, nothing merged.
CONFIG = SAFEConfig.paper(warmup_steps=4, freeze_end_step=10, tau_target=0.6, max_tokens=16)


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    """8 steps on the replay tests' model and data under the paper's rule (CONFIG).

    Scored for 4 steps, then 3 freezes at steps 5, 6, 7.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the script: its model, data and thread count
    try:
        model = peft_bert(layers=train_script.LAYERS, seed=0, lora_dropout=0.1)
        model.train()
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        optimizer = SAFEOptimizer(inner, model, CONFIG)
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
    assert plan.adapter_freeze_steps == {a: e.step for e in plan.events for a in e.adapters}
    assert set(recorded.optimizer.frozen_adapters) == frozen


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
    assert data["version"] == SCHEMA_VERSION == 6
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
        (b'{"version": 1}', "expected schema 'safefreeze.plan', got no 'schema' field"),
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


def test_newer_schema_version_asks_for_an_upgrade(doc: dict[str, Any], tmp_path: Path) -> None:
    doc["version"] = 99
    path = _write(tmp_path / "plan.json", doc)
    with pytest.raises(PlanError) as info:
        FreezePlan.load(path)
    assert str(info.value) == (
        f"plan file '{path}' has plan schema version 99; this safefreeze reads versions up to "
        f"{SCHEMA_VERSION}; upgrade safefreeze to read it"
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.pop("events"), "is damaged: missing field 'events'"),
        (lambda d: d["model"].pop("fingerprint"), "is damaged: model: missing field 'fingerprint'"),
        (lambda d: d["scores"].pop("raw"), "is damaged: scores: missing field 'raw'"),
        (lambda d: d["events"][1].pop("threshold"), "is damaged: events[1]: missing field 'threshold'"),
        (lambda d: d["config"].pop("tau_target"), "is damaged: config: missing field 'tau_target'"),
        (
            lambda d: d["config"].update(tau_target=7.0),
            "is damaged: config.tau_target: SAFEConfig requires 0 <= tau_target <= 1.0",
        ),
        (
            lambda d: d["events"][0].update(step="five"),
            "is damaged: events[0].step: expected a positive integer, got 'five'",
        ),
    ],
    ids=["events", "fingerprint", "raw-scores", "threshold", "config-field", "config-value", "step"],
)
def test_missing_or_bad_field(doc: dict[str, Any], tmp_path: Path, damage: Any, message: str) -> None:
    damage(doc)
    with pytest.raises(PlanError, match=re.escape(message)) as info:
        FreezePlan.load(_write(tmp_path / "plan.json", doc))
    assert info.type is PlanError
    assert str(info.value).startswith(f"plan file '{tmp_path / 'plan.json'}' is damaged: ")


def test_edited_adapter_list_no_longer_matches_fingerprint(doc: dict[str, Any]) -> None:
    recorded_fp = doc["model"]["fingerprint"]
    doc["model"]["adapters"][0]["params"][0][1] = [8, 32]
    actual = fingerprint([AdapterRecord.from_dict(a) for a in doc["model"]["adapters"]])
    with pytest.raises(PlanError) as info:
        FreezePlan.from_dict(doc)
    assert str(info.value) == (
        f"plan is damaged: model.fingerprint: expected {actual[:12]}..., the hash of model.adapters, "
        f"got {recorded_fp[:12]}...; the adapter list was edited or the file corrupted"
    )
    del doc["model"]["adapters"][0]
    with pytest.raises(PlanError, match="the adapter list was edited"):
        FreezePlan.from_dict(doc)


def test_events_naming_unknown_units_are_refused_at_load(doc: dict[str, Any]) -> None:
    event = doc["events"][0]
    event["units"] = [*event["units"][:1], "encoder.layer.9.query"]
    message = "plan is damaged: events[0].units[1]: expected a unit of the plan, got 'encoder.layer.9.query'"
    with pytest.raises(PlanError, match=re.escape(message)):
        FreezePlan.from_dict(doc)
    event["units"] = list(event["adapters"])
    FreezePlan.from_dict(doc)  # repaired
    idle = _idle(doc)
    event["adapters"].append(idle)  # not an adapter of the event's units
    message = (
        f"plan is damaged: events[0].adapters[{len(event['units'])}]: expected the end of the list "
        f"(the adapters of the event's units, in order), got '{idle}'"
    )
    with pytest.raises(PlanError) as info:
        FreezePlan.from_dict(doc)
    assert str(info.value) == message
    event["adapters"] = [event["adapters"][1], event["adapters"][0], *event["adapters"][2:-1]]
    with pytest.raises(PlanError, match=re.escape("events[0].adapters[0]: expected '")):
        FreezePlan.from_dict(doc)  # the right adapters in another order


# ---- hostile documents --------------------------------------------------------------------

INF, NAN = math.inf, math.nan


def _idle(d: dict[str, Any]) -> str:
    """The first unit that never froze."""
    frozen = {u for e in d["events"] for u in e["units"]}
    return next(u for u in d["units"] if u not in frozen)


def _units(d: dict[str, Any], i: int) -> list[str]:
    return list(d["events"][i]["units"])


def _set_event_units(d: dict[str, Any], i: int, units: list[str]) -> None:
    d["events"][i]["units"] = units
    d["events"][i]["adapters"] = list(units)  # identity units
    for key in ("raw_scores", "normalized_scores"):
        d["events"][i][key] = {u: d["scores"]["raw"][u] for u in units}


# (damage, message after "plan is damaged: "); {u0} is events[0]'s first unit, {s0}..{s2}
# the events' steps, {q} the first unit that never froze.
DAMAGES: list[tuple[str, Any, str]] = [
    # steps: real ints >= 1, below 2**63
    (
        "step-fraction",
        lambda d: d["events"][0].update(step=1.5),
        "events[0].step: expected a positive integer, got 1.5",
    ),
    (
        "step-zero",
        lambda d: d["events"][0].update(step=0),
        "events[0].step: expected a positive integer, got 0",
    ),
    (
        "step-negative",
        lambda d: d["events"][0].update(step=-3),
        "events[0].step: expected a positive integer, got -3",
    ),
    (
        "step-bool",
        lambda d: d["events"][0].update(step=True),
        "events[0].step: expected a positive integer, got true",
    ),
    (
        "step-string",
        lambda d: d["events"][0].update(step="5"),
        "events[0].step: expected a positive integer, got '5'",
    ),
    (
        "step-huge",
        lambda d: d["events"][0].update(step=2**63),
        "events[0].step: expected a positive integer below 2**63, got 9223372036854775808",
    ),
    (
        "step-enormous",
        lambda d: d["events"][0].update(step=10**5000),
        "events[0].step: expected a positive integer below 2**63, got an integer of 16610 bits",
    ),
    (
        "scored-at-negative",
        lambda d: d["scores"].update(scored_at=-1),
        "scores.scored_at: expected a non-negative integer, got -1",
    ),
    (
        "scored-at-float",
        lambda d: d["scores"].update(scored_at=4.0),
        "scores.scored_at: expected a non-negative integer, got 4.0",
    ),
    (
        "scored-at-bool",
        lambda d: d["scores"].update(scored_at=False),
        "scores.scored_at: expected a non-negative integer, got false",
    ),
    # counts: ints >= 0, below 2**63
    (
        "params-freed-negative",
        lambda d: d["events"][1].update(params_freed=-1),
        "events[1].params_freed: expected a non-negative integer, got -1",
    ),
    (
        "params-freed-float",
        lambda d: d["events"][1].update(params_freed=256.0),
        "events[1].params_freed: expected a non-negative integer, got 256.0",
    ),
    (
        "state-bytes-huge",
        lambda d: d["events"][1].update(state_bytes_freed=2**64),
        "events[1].state_bytes_freed: expected a non-negative integer below 2**63, got 18446744073709551616",
    ),
    # adapter records
    (
        "dim-negative",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, [4, -32]),
        "model.adapters[0].params[0][1][1]: expected a non-negative integer, got -32",
    ),
    (
        "dim-float",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, [4, 32.0]),
        "model.adapters[0].params[0][1][1]: expected a non-negative integer, got 32.0",
    ),
    (
        "dim-bool",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, [True, 32]),
        "model.adapters[0].params[0][1][0]: expected a non-negative integer, got true",
    ),
    (
        "dim-huge",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, [4, 2**63]),
        "model.adapters[0].params[0][1][1]: expected a non-negative integer below 2**63, "
        "got 9223372036854775808",
    ),
    (
        "shape-string",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(1, "4x32"),
        "model.adapters[0].params[0][1]: expected a shape (a list of dims), got '4x32'",
    ),
    (
        "adapter-name-int",
        lambda d: d["model"]["adapters"][0].update(name=3),
        "model.adapters[0].name: expected a name (a non-empty string), got 3",
    ),
    (
        "param-not-a-pair",
        lambda d: d["model"]["adapters"][0]["params"].__setitem__(0, ["x"]),
        "model.adapters[0].params[0]: expected a [name, shape] pair, got a list of 1",
    ),
    (
        "param-name-null",
        lambda d: d["model"]["adapters"][0]["params"][0].__setitem__(0, None),
        "model.adapters[0].params[0][0]: expected a name (a non-empty string), got null",
    ),
    (
        "adapter-twice",
        lambda d: d["model"]["adapters"].__setitem__(1, d["model"]["adapters"][0]),
        f"model.adapters[1].name: expected each adapter once, got '{QUERY_0}' twice",
    ),
    # events: each unit once, increasing steps, not empty
    (
        "unit-frozen-in-two-events",
        lambda d: _set_event_units(d, 1, _units(d, 0)[:1]),
        "events[1].units[0]: expected a unit not frozen yet, got '{u0}', frozen at step {s0}",
    ),
    (
        "unit-frozen-twice-in-one-event",
        lambda d: _set_event_units(d, 0, [_units(d, 0)[0]] * 2),
        "events[0].units[1]: expected each name once, got '{u0}' twice",
    ),
    (
        "two-events-at-one-step",
        lambda d: d["events"][1].update(step=d["events"][0]["step"]),
        "events[1].step: expected a step after {s0} (events in increasing step order, one per step), "
        "got {s0}",
    ),
    (
        "events-out-of-order",
        lambda d: d["events"].reverse(),
        "events[1].step: expected a step after {s2} (events in increasing step order, one per step), "
        "got {s1}",
    ),
    (
        "event-without-units",
        lambda d: _set_event_units(d, 0, []),
        "events[0].units: expected a non-empty list of names, got an empty list",
    ),
    # scores and thresholds: finite numbers >= 0, or null
    (
        "raw-inf",
        lambda d: d["scores"]["raw"].update({_idle(d): INF}),
        "scores.raw['{q}']: expected a finite number >= 0 or null, got inf",
    ),
    (
        "raw-nan",
        lambda d: d["scores"]["raw"].update({_idle(d): NAN}),
        "scores.raw['{q}']: expected a finite number >= 0 or null, got nan",
    ),
    (
        "normalized-negative",
        lambda d: d["scores"]["normalized"].update({_idle(d): -0.5}),
        "scores.normalized['{q}']: expected a finite number >= 0 or null, got -0.5",
    ),
    (
        "raw-string",
        lambda d: d["scores"]["raw"].update({_idle(d): "0.5"}),
        "scores.raw['{q}']: expected a finite number >= 0 or null, got '0.5'",
    ),
    (
        "event-score-bool",
        lambda d: d["events"][0]["normalized_scores"].update({_units(d, 0)[0]: True}),
        "events[0].normalized_scores['{u0}']: expected a finite number >= 0 or null, got true",
    ),
    (
        "threshold-negative",
        lambda d: d["events"][0].update(threshold=-0.1),
        "events[0].threshold: expected a finite number >= 0 or null, got -0.1",
    ),
    (
        "threshold-inf",
        lambda d: d["events"][0].update(threshold=INF),
        "events[0].threshold: expected a finite number >= 0 or null, got inf",
    ),
    (
        "threshold-string",
        lambda d: d["events"][0].update(threshold="0.4"),
        "events[0].threshold: expected a finite number >= 0 or null, got '0.4'",
    ),
    (
        "threshold-bool",
        lambda d: d["events"][0].update(threshold=False),
        "events[0].threshold: expected a finite number >= 0 or null, got false",
    ),
    (
        "score-of-unknown-unit",
        lambda d: d["scores"]["raw"].update(ghost=0.1),
        "scores.raw['ghost']: expected a score for a unit of the plan, got unit 'ghost'",
    ),
    (
        "event-score-of-other-unit",
        lambda d: d["events"][0]["raw_scores"].update({_idle(d): 0.1}),
        "events[0].raw_scores['{q}']: expected a score for a unit of this event, got unit '{q}'",
    ),
    # containers of the wrong type
    ("events-object", lambda d: d.update(events={}), "events: expected a list, got an empty object"),
    (
        "event-list",
        lambda d: d["events"].__setitem__(0, []),
        "events[0]: expected an object, got an empty list",
    ),
    ("units-list", lambda d: d.update(units=[]), "units: expected an object, got an empty list"),
    (
        "event-units-string",
        lambda d: d["events"][0].update(units="abc"),
        "events[0].units: expected a non-empty list of names, got 'abc'",
    ),
    ("model-string", lambda d: d.update(model="x"), "model: expected an object, got 'x'"),
    ("scores-list", lambda d: d.update(scores=[]), "scores: expected an object, got an empty list"),
    ("config-list", lambda d: d.update(config=[1]), "config: expected an object, got a list of 1"),
    (
        "params-object",
        lambda d: d["model"]["adapters"][0].update(params={}),
        "model.adapters[0].params: expected a list, got an empty object",
    ),
    (
        "event-scores-list",
        lambda d: d["events"][0].update(raw_scores=[]),
        "events[0].raw_scores: expected an object, got an empty list",
    ),
    # units: every listed adapter in exactly one non-empty unit
    (
        "unit-string",
        lambda d: d["units"].update({_idle(d): _idle(d)}),
        "units['{q}']: expected a non-empty list of names, got '{q}'",
    ),
    (
        "unit-empty",
        lambda d: d["units"].update({_idle(d): []}),
        "units['{q}']: expected a non-empty list of names, got an empty list",
    ),
    (
        "unit-of-unlisted-adapter",
        lambda d: d["units"][_idle(d)].append("ghost"),
        "units['{q}'][1]: expected an adapter of model.adapters, got 'ghost'",
    ),
    (
        "adapter-in-two-units",
        lambda d: d["units"].update(extra=[_idle(d)]),
        "units['extra'][0]: expected each adapter in one unit, got '{q}' in unit '{q}' too",
    ),
    (
        "adapter-in-no-unit",
        lambda d: d["units"].pop(_idle(d)),
        "units: expected every adapter in a unit, got 1 in none: '{q}'",
    ),
    # config: SAFEConfig's own checks, named by field
    ("config-missing", lambda d: d["config"].pop("order"), "config: missing field 'order'"),
    (
        "config-order",
        lambda d: d["config"].update(order="random"),
        "config.order: SAFEConfig.order must be one of ('prefix', 'score', 'depth'), got order='random'",
    ),
    (
        "config-steps",
        lambda d: d["config"].update(freeze_end_step=2),
        "config.freeze_end_step: SAFEConfig requires freeze_end_step >= warmup_steps, got "
        "freeze_end_step=2, warmup_steps=4",
    ),
    (
        "config-huge-int",
        lambda d: d["config"].update(seed=2**70),
        "config.seed: expected an integer below 2**63, got an integer of 71 bits",
    ),
    (
        "config-list-value",
        lambda d: d["config"].update(group_by=["x"]),
        "config.group_by: expected a number, a string or null, got a list of 1",
    ),
    (
        "version-zero",
        lambda d: d.update(version=0),
        "version: expected a plan schema version from 1 to 6, got 0",
    ),
    (
        "version-string",
        lambda d: d.update(version="2"),
        "version: expected a plan schema version from 1 to 6, got '2'",
    ),
    (
        "version-bool",
        lambda d: d.update(version=True),
        "version: expected a plan schema version from 1 to 6, got true",
    ),
    (
        "version-missing",
        lambda d: d.pop("version"),
        "version: expected a plan schema version from 1 to 6, got no 'version' field",
    ),
]


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in DAMAGES], ids=[c[0] for c in DAMAGES])
def test_every_bad_value_is_a_plan_error_naming_path_expectation_and_value(
    doc: dict[str, Any], damage: Any, message: str
) -> None:
    names = {f"s{i}": e["step"] for i, e in enumerate(doc["events"])}
    expected = "plan is damaged: " + message.format(u0=doc["events"][0]["units"][0], q=_idle(doc), **names)
    damage(doc)
    with pytest.raises(PlanError) as info:
        FreezePlan.from_dict(doc)
    assert info.type is PlanError
    assert str(info.value) == expected


def test_config_errors_name_the_field(doc: dict[str, Any]) -> None:
    doc["config"]["group_by"] = "(("
    with pytest.raises(
        PlanError, match=r"^plan is damaged: config\.group_by: SAFEConfig\.group_by is not a valid regex"
    ):
        FreezePlan.from_dict(doc)
    doc["config"]["group_by"] = None
    doc["config"]["extra"] = 1
    with pytest.raises(
        PlanError, match=r"^plan is damaged: config\.extra: expected a field of SAFEConfig \["
    ):
        FreezePlan.from_dict(doc)


def _json_with(doc: dict[str, Any], set_marker: Any, literal: str) -> str:
    """``doc`` as JSON text with the value that ``set_marker`` puts there spelled ``literal``."""
    set_marker(doc, "@MARK@")
    text = json.dumps(doc)
    assert text.count('"@MARK@"') == 1
    return text.replace('"@MARK@"', literal)


@pytest.mark.parametrize(
    ("where", "literal", "message"),
    [
        ("threshold", "NaN", "expected standard JSON numbers, got the constant NaN (NaN scores are null)"),
        (
            "raw",
            "Infinity",
            "expected standard JSON numbers, got the constant Infinity (NaN scores are null)",
        ),
        (
            "freed",
            "-Infinity",
            "expected standard JSON numbers, got the constant -Infinity (NaN scores are null)",
        ),
        ("step", "1" + "0" * 5000, "expected integers below 2**63, got an integer of 5001 digits"),
        ("step", "1" + "0" * 30, "expected integers below 2**63, got an integer of 31 digits"),
        ("freed", "-" + "9" * 30, "expected integers below 2**63, got an integer of 31 digits"),
        ("raw", "1e999", "expected finite numbers, got 1e999, which overflows a float"),
    ],
    ids=[
        "nan",
        "infinity",
        "minus-infinity",
        "int-5001-digits",
        "int-31-digits",
        "negative-int",
        "float-overflow",
    ],
)
def test_non_standard_json_numbers_are_refused_while_parsing(
    doc: dict[str, Any], where: str, literal: str, message: str
) -> None:
    unit = doc["events"][0]["units"][0]
    setters = {
        "threshold": lambda d, v: d["events"][0].update(threshold=v),
        "raw": lambda d, v: d["scores"]["raw"].update({unit: v}),
        "freed": lambda d, v: d["events"][0].update(params_freed=v),
        "step": lambda d, v: d["events"][0].update(step=v),
    }
    text = _json_with(doc, setters[where], literal)
    with pytest.raises(PlanError) as info:
        FreezePlan.from_json(text)
    assert str(info.value) == "plan is damaged: " + message


def test_null_is_still_how_a_nan_score_is_written(doc: dict[str, Any]) -> None:
    unit = doc["events"][0]["units"][0]
    doc["scores"]["raw"][unit] = doc["events"][0]["raw_scores"][unit] = doc["events"][0]["threshold"] = None
    plan = FreezePlan.from_json(json.dumps(doc))
    assert math.isnan(plan.raw_scores[unit]) and math.isnan(plan.events[0].raw_scores[unit])
    assert math.isnan(plan.events[0].threshold)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[" * 100_000 + "]" * 100_000,
            "plan is not a safefreeze plan: its JSON nests deeper than the parser allows",
        ),
        (
            '{"schema": "safefreeze.plan", "version": 2, "config": ' + "[" * 100_000,
            "plan is not a safefreeze plan: its JSON nests deeper than the parser allows",
        ),
        (
            '{"schema": "safefreeze.plan", "version": 2, "config": '
            + '{"a": ' * 100_000
            + "1"
            + "}" * 100_001,
            "plan is not a safefreeze plan: its JSON nests deeper than the parser allows",
        ),
        (
            '{"schema": "safefreeze.plan", "schema": "safefreeze.plan", "version": 2}',
            "plan is damaged: expected each key once in an object, got 'schema' twice",
        ),
    ],
    ids=["deep-list", "deep-unclosed", "deep-object", "duplicate-key"],
)
def test_deep_nesting_and_duplicate_keys_are_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        FreezePlan.from_json(text)
    assert str(info.value).startswith(message)


def test_moderately_deep_values_are_refused_without_recursing(doc: dict[str, Any]) -> None:
    deep: Any = "x"
    for _ in range(500):  # below the parser's limit, far above what a plan holds
        deep = [deep]
    doc["events"][0]["units"] = deep
    with pytest.raises(
        PlanError,
        match=re.escape("events[0].units[0]: expected a name (a non-empty string), got a list of 1"),
    ):
        FreezePlan.from_json(json.dumps(doc))
    doc["model"]["fingerprint"] = deep
    with pytest.raises(PlanError, match=re.escape("model.fingerprint: expected")):
        FreezePlan.from_dict(doc)


def test_long_lists_are_checked_in_linear_time(doc: dict[str, Any]) -> None:
    names = [f"unit.{i}" for i in range(200_000)]  # a quadratic check would take minutes
    doc["events"][0]["units"] = [*names, names[0]]
    start = time.perf_counter()
    with pytest.raises(PlanError, match=re.escape("events[0].units[200000]: expected each name once")):
        FreezePlan.from_json(json.dumps(doc))
    assert time.perf_counter() - start < 10


def test_from_json_reads_bytes(recorded: Recorded) -> None:
    text = recorded.plan.to_json()
    assert FreezePlan.from_json(text.encode("utf-8")) == recorded.plan
    with pytest.raises(PlanError) as info:
        FreezePlan.from_json(b"\x80" + text.encode(), source="runs:/x/plan.json")
    assert str(info.value) == (
        "runs:/x/plan.json is not a JSON text (byte 0 is not UTF-8; a pickle or other binary file?); "
        "a plan is the JSON written by FreezePlan.save"
    )


def test_record_constructors_are_strict() -> None:
    assert AdapterRecord.from_dict({"name": "a", "params": [["a.w", [2, 0]]]}) == AdapterRecord(
        "a", (("a.w", (2, 0)),)
    )
    with pytest.raises(PlanError) as info:
        AdapterRecord.from_dict({"name": "a", "params": [["a.w", ["2", 3]]]})
    assert (
        str(info.value)
        == "adapter record is damaged: params[0][1][0]: expected a non-negative integer, got '2'"
    )
    with pytest.raises(PlanError, match=r"^adapter record is damaged: expected an object, got 'a'$"):
        AdapterRecord.from_dict("a")
    event = FreezeEvent(3, ("a",), ("a",), 0.5, {"a": 0.1}, {"a": 0.2}, 6, 48)
    assert FreezeEvent.from_dict(event.to_dict()) == event
    with pytest.raises(PlanError) as info:
        FreezeEvent.from_dict({**event.to_dict(), "step": 2.5})
    assert str(info.value) == "freeze event is damaged: step: expected a positive integer, got 2.5"
    with pytest.raises(
        PlanError,
        match=r"^freeze event is damaged: raw_scores\['b'\]: expected a score for a unit of this event",
    ):
        FreezeEvent.from_dict({**event.to_dict(), "raw_scores": {"b": 0.1}})


def test_loading_a_plan_never_runs_its_group_by_pattern(tmp_path: Path) -> None:
    # Matching this pattern against these names backtracks for hours: a load that ran it
    # would time out.
    names = ["a" * 40 + f"!{i}" for i in range(2)]
    adapters = [AdapterRecord(n, ((f"{n}.w", (2, 2)),)) for n in names]
    config = SAFEConfig(warmup_steps=1, freeze_end_step=2, group_by=r"(a+)+b(\d)")
    path = FreezePlan(config, adapters, units={"0": names}).save(tmp_path / "plan.json")
    code = "import sys\nfrom safefreeze import FreezePlan\nprint(FreezePlan.load(sys.argv[1]).units)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr({"0": names})


# ---- schema versions ----------------------------------------------------------------------

PLANS = Path(__file__).parent / "data" / "plans"


def _file_doc(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PLANS / name).read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        # Versions 1 and 2 kept the rule they were recorded under: the paper's, per adapter, unmerged.
        ("v1_without_order.json", ("score", "adapter", False, 1, False)),
        ("v1.json", ("score", "adapter", False, 1, False)),
        ("v2.json", ("score", "adapter", False, 1, False)),
        ("v3.json", ("prefix", "block", True, 1, False)),
        ("v4.json", ("depth", "block", True, 2, False)),
        ("v5.json", ("depth", "block", True, 2, True)),
        ("v6.json", ("depth", "block", True, 2, "attention")),
    ],
)
def test_checked_in_plans_of_every_version_load(name: str, rule: tuple[Any, ...]) -> None:
    raw = _file_doc(name)
    plan = FreezePlan.load(PLANS / name)
    config = plan.config
    assert (config.order, config.units, config.merge, config.score_interval, config.eval_frozen) == rule
    assert plan.migrated_from == (None if raw["version"] == SCHEMA_VERSION else raw["version"])
    # Same adapters, units, scores and events: only the version and the filled fields differ.
    filled = {"order": "score", "units": "adapter", "merge": False} if raw["version"] < 3 else {}
    if raw["version"] < 5:
        filled["eval_frozen"] = False  # frozen units kept their dropout before version 5
    expected = {**raw, "version": SCHEMA_VERSION, "config": {**raw["config"], **filled}}
    assert plan.to_dict() == expected
    assert plan.events and plan.scored_at is not None


def test_a_plan_file_of_each_schema_version_is_checked_in() -> None:
    # Bumping SCHEMA_VERSION needs a migration and a fixture written by the new code.
    assert len(plan_module._MIGRATIONS) == SCHEMA_VERSION - 1
    for version in range(1, SCHEMA_VERSION + 1):
        assert _file_doc(f"v{version}.json")["version"] == version
    current = PLANS / f"v{SCHEMA_VERSION}.json"
    plan = FreezePlan.load(current)
    assert plan.to_json() + "\n" == current.read_text(encoding="utf-8")  # written by this version
    assert plan.migrated_from is None


def test_v1_plans_without_order_migrate_to_score_order() -> None:
    # The benchmark's recorded plans predate SAFEConfig.order and failed with "missing field".
    raw = _file_doc("v1_without_order.json")
    assert raw["version"] == 1 and "order" not in raw["config"]
    plan = FreezePlan.from_dict(raw, source="benchmark plan")
    assert plan.config.order == "score" and plan.migrated_from == 1
    assert plan.events == FreezePlan.load(PLANS / "v1_without_order.json").events
    assert [e.step for e in plan.events] == [e["step"] for e in raw["events"]]
    assert plan.normalized_scores == raw["scores"]["normalized"]


def test_migrate_never_mutates_its_input_and_keeps_a_recorded_order() -> None:
    raw = _file_doc("v1.json")
    raw["config"]["order"] = "depth"
    before = copy.deepcopy(raw)
    new = migrate(raw, source="plan")
    assert raw == before
    assert new["version"] == SCHEMA_VERSION and new["config"]["order"] == "depth"
    assert (new["config"]["units"], new["config"]["merge"]) == ("adapter", False)
    raw["config"].pop("order")
    new = migrate(raw, source="plan")
    assert new["config"]["order"] == "score" and "order" not in raw["config"]
    assert "units" not in raw["config"] and "merge" not in raw["config"]
    current = _file_doc(f"v{SCHEMA_VERSION}.json")
    again = migrate(current, source="plan")
    assert again == current and again is not current


def test_v1_plans_with_empty_units_get_identity_units_unless_grouped() -> None:
    raw = _file_doc("v1_without_order.json")
    raw["units"] = {}
    before = copy.deepcopy(raw)
    plan = FreezePlan.from_dict(raw)
    assert raw == before
    assert plan.units == {a["name"]: [a["name"]] for a in raw["model"]["adapters"]}
    grouped = _file_doc("v1.json")
    grouped["units"] = {}
    with pytest.raises(PlanError) as info:
        FreezePlan.from_dict(grouped, source="plan file 'old.json'")
    assert str(info.value) == (
        "plan file 'old.json' cannot be migrated from plan schema version 1 to 6: units: its units "
        "are not recorded and config.group_by is 'blocks\\\\.(\\\\d+)\\\\..*', so they are not one per "
        "adapter; re-record the plan"
    )
    for name in ("v2.json", "v3.json", "v4.json", "v5.json"):
        stored = _file_doc(name)
        stored["units"] = {}
        with pytest.raises(
            PlanError, match=r"^plan is damaged: units: expected every adapter in a unit, got 8 in none"
        ):
            FreezePlan.from_dict(stored)  # versions 2 on record their units


def test_migrate_refuses_what_is_not_a_plan() -> None:
    with pytest.raises(
        PlanError, match=r"^ckpt is not a safefreeze plan: expected schema 'safefreeze\.plan', got 'list'$"
    ):
        migrate([], source="ckpt")
    with pytest.raises(
        PlanError, match=r"^ckpt has plan schema version 7; this safefreeze reads versions up to 6"
    ):
        migrate({"schema": "safefreeze.plan", "version": 7}, source="ckpt")


def test_check_frozen_matches_events(recorded: Recorded) -> None:
    plan = recorded.plan
    frozen = dict(plan.unit_freeze_steps)
    check_frozen_matches_events(frozen, plan, source="checkpoint")
    first, *_ = plan.events[0].units
    last = plan.events[-1].units[0]
    idle = next(u for u in plan.units if u not in frozen)
    cases: list[tuple[Any, str]] = [
        ({**frozen, idle: 7}, f"1 unit(s) that no event freezes, e.g. ['{idle}']"),
        (
            {k: v for k, v in frozen.items() if k != last},
            f"1 unit(s) missing that the events freeze, e.g. ['{last}']",
        ),
        (
            {**frozen, first: plan.events[0].step + 1},
            f"1 unit(s) at another step, e.g. '{first}' at step {plan.events[0].step + 1} but its event at "
            f"step {plan.events[0].step}",
        ),
    ]
    for bad, problem in cases:
        with pytest.raises(PlanError) as info:
            check_frozen_matches_events(bad, plan, source="checkpoint")
        assert str(info.value) == (
            "checkpoint is damaged: frozen: expected the units and steps its plan's events freeze, "
            f"got {problem}"
        )
    with pytest.raises(
        PlanError, match=r"^checkpoint is damaged: frozen: expected an object, got a list of 1$"
    ):
        check_frozen_matches_events([first], plan, source="checkpoint")
    with pytest.raises(
        PlanError,
        match=rf"^checkpoint is damaged: frozen\['{re.escape(first)}'\]: expected a positive integer, "
        "got '5'$",
    ):
        check_frozen_matches_events({**frozen, first: "5"}, plan, source="checkpoint")


# ---- derived series ---------------------------------------------------------------------------


def test_derived_series(recorded: Recorded) -> None:
    plan = recorded.plan
    assert not hasattr(FreezePlan, "frozen")  # one name per concept
    assert plan.unit_freeze_steps == {u: e.step for e in plan.events for u in e.units}
    assert plan.adapter_freeze_steps == {a: e.step for e in plan.events for a in e.adapters}
    assert list(plan.unit_freeze_steps) == [u for e in plan.events for u in e.units]  # freeze order
    names = [a.name for a in plan.adapters]
    total = sum(p.numel() for n, p in recorded.model.named_parameters() if ".lora_" in n)
    assert total == 256 * len(names)
    assert plan.frozen_adapters_at(plan.events[0].step - 1) == []
    assert plan.trainable_params_at(0) == total
    freed = 0
    for event in plan.events:
        freed += event.params_freed
        frozen = plan.frozen_adapters_at(event.step)
        assert frozen == [n for n in names if plan.adapter_freeze_steps.get(n, math.inf) <= event.step]
        assert set(event.adapters) <= set(frozen)
        assert plan.trainable_params_at(event.step) == total - freed
        assert plan.threshold_at(event.step) == event.threshold
    assert plan.frozen_adapters_at(10**6) == [n for n in names if n in plan.adapter_freeze_steps]
    cfg = plan.config
    assert [plan.threshold_at(t) for t in (0, 4, 7, 10, 99)] == [
        cubic_threshold(t, warmup_steps=4, freeze_end_step=10, tau_target=cfg.tau_target)
        for t in (0, 4, 7, 10, 99)
    ]


# ---- temporary files of killed writers ------------------------------------------------------

_KILLED_SAVE = """\
import os, signal, sys
from safefreeze import FreezePlan
plan = FreezePlan.load(sys.argv[1])
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die between write and rename
plan.save(sys.argv[1])
"""


def test_save_deletes_temp_files_of_killed_writers_of_the_same_target_only(
    recorded: Recorded, tmp_path: Path
) -> None:
    path = recorded.plan.save(tmp_path / "plan.json")
    before = path.read_bytes()

    def killed_save() -> int:
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)], stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err
        return proc.pid

    def temps() -> list[str]:
        return sorted(p.name for p in tmp_path.glob(".plan.json.*.tmp"))

    first = killed_save()
    [orphan] = temps()
    assert orphan.startswith(f".plan.json.{first}.")  # the writer's pid is in the name
    second = killed_save()  # its save deleted the first orphan before being killed in turn
    [orphan] = temps()
    assert orphan.startswith(f".plan.json.{second}.")
    assert path.read_bytes() == before  # the killed saves never replaced the plan
    dead = f".plan.json.{first}.{'e' * 12}.tmp"  # one more of a dead writer
    keep = [
        f".plan.json.{os.getpid()}.{'a' * 12}.tmp",  # a live writer: this process
        f".other.json.{first}.{'b' * 12}.tmp",  # a dead writer of another target
        f".plan.json.1.{first}.{'c' * 12}.tmp",  # a dead writer of the target "plan.json.1"
        f".plan.json.{'d' * 12}.tmp",  # the old name, without a pid: writer unknown
    ]
    for name in [dead, *keep]:
        (tmp_path / name).write_text("{", encoding="utf-8")
    recorded.plan.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["plan.json", *keep])
    assert FreezePlan.load(path) == recorded.plan


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
    assert optimizer.frozen_adapters == []
    assert all(p.requires_grad for p in optimizer.controller.trainable_params())
    optimizer.controller.close()
