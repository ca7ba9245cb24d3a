from __future__ import annotations

import json
import math

import pytest

from safefreeze import SAFEConfig


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    config = SAFEConfig(warmup_steps=7, freeze_end_step=30, tau_target=0.4, group_by=r".*layer\.(\d+)\..*")
    assert SAFEConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["tau_target"] == 0.4
    assert SAFEConfig.from_dict(SAFEConfig().to_dict()) == SAFEConfig()


def test_from_epochs_converts_to_optimizer_steps() -> None:
    config = SAFEConfig.from_epochs(40, warmup_epochs=0.5, freeze_end_epoch=3, tau_target=0.3)
    assert (config.warmup_steps, config.freeze_end_step, config.tau_target) == (20, 120, 0.3)
    with pytest.raises(ValueError, match="steps_per_epoch >= 1, got 0"):
        SAFEConfig.from_epochs(0, warmup_epochs=1, freeze_end_epoch=2)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"warmup_steps": 100, "freeze_end_step": 50}, "freeze_end_step=50, warmup_steps=100"),
        ({"warmup_steps": 0}, "warmup_steps >= 1, got warmup_steps=0"),
        ({"tau_target": 1.5}, "0 <= tau_target <= 1.0 with normalization='rank', got tau_target=1.5"),
        (
            {"tau_target": 1.5, "normalization": "max"},
            "0 <= tau_target <= 1.0 with normalization='max', got tau_target=1.5",
        ),
        ({"tau_target": -0.1}, "got tau_target=-0.1"),
        ({"tau_target": float("nan")}, "finite number, got tau_target=nan"),
        ({"normalization": "mean"}, "got normalization='mean'"),
        ({"score_every": 0}, "score_every >= 1, got score_every=0"),
        ({"max_tokens": 3}, "max_tokens >= 4"),
        ({"group_by": "(["}, "not a valid regex"),
        ({"group_by": r"layer\.\d+"}, "at least one capture group"),
        ({"order": "random"}, "order must be one of ('prefix', 'score', 'depth'), got order='random'"),
        ({"units": "layer"}, "units must be one of ('block', 'adapter'), got units='layer'"),
    ],
)
def test_invalid_configs_name_the_bad_value(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError) as info:
        SAFEConfig(**kwargs)  # type: ignore[arg-type]
    assert words in str(info.value)


def test_tau_above_one_is_allowed_for_raw_scores() -> None:
    assert SAFEConfig(normalization="none", tau_target=2.0).tau_target == 2.0


def test_wrong_types_and_unknown_keys() -> None:
    with pytest.raises(TypeError, match=r"warmup_steps must be an int, got 1.5"):
        SAFEConfig(warmup_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown SAFEConfig field\(s\) \['warmup'\]"):
        SAFEConfig.from_dict({"warmup": 3})
    with pytest.raises(ValueError, match="must be an object, got list"):
        SAFEConfig.from_json("[1, 2]")


def test_config_is_frozen() -> None:
    config = SAFEConfig()
    with pytest.raises(AttributeError):
        config.tau_target = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"group_by": 3}, TypeError, r"group_by must be a regex string or None, got int 3"),
        ({"group_by": [r"(\d)"]}, TypeError, r"group_by must be a regex string or None, got list"),
        ({"seed": 2**64}, ValueError, r"0 <= seed < 2\*\*64.*got seed=18446744073709551616"),
        ({"seed": -1}, ValueError, r"0 <= seed < 2\*\*64"),
        (
            {"warmup_steps": 4, "freeze_end_step": 8, "score_every": 5},
            ValueError,
            r"score_every <= warmup_steps.*score_every=5, warmup_steps=4",
        ),
        ({"max_tokens": True}, ValueError, r"max_tokens >= 4"),
        ({"merge": 1}, TypeError, r"merge must be a bool, got merge=1"),
        (
            {"eval_frozen": "yes"},
            ValueError,
            r"eval_frozen must be True, False or 'attention', got eval_frozen='yes'",
        ),
        ({"eval_frozen": 1}, TypeError, r"eval_frozen must be True, False or 'attention', got eval_frozen=1"),
    ],
)
def test_bad_values_fail_in_the_config_with_a_clear_message(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SAFEConfig(**kwargs)


@pytest.mark.parametrize("epochs", [math.nan, math.inf, -math.inf, "2", True])
def test_from_epochs_refuses_non_finite_or_non_numeric_epochs(epochs: object) -> None:
    with pytest.raises(ValueError, match=r"finite number of epochs, got warmup_epochs="):
        SAFEConfig.from_epochs(10, warmup_epochs=epochs, freeze_end_epoch=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"integer steps_per_epoch >= 1, got 2.5"):
        SAFEConfig.from_epochs(2.5, warmup_epochs=1, freeze_end_epoch=2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "steer", "interval"),
    [
        ({}, False, 11),  # the default: ranked scores, lowest first: at most 8 scored steps
        ({"warmup_steps": 80}, False, 10),
        ({"warmup_steps": 8}, False, 1),
        ({"warmup_steps": 9}, False, 2),
        ({"score_every": 3}, False, 3),
        ({"order": "prefix"}, True, 1),
        ({"order": "score"}, True, 1),
        ({"normalization": "max"}, True, 1),  # the scores set how many freeze
        ({"order": "prefix", "score_every": 4}, True, 4),
    ],
)
def test_score_interval_scores_every_step_only_where_the_scores_steer(
    changes: dict[str, object], steer: bool, interval: int
) -> None:
    config = SAFEConfig(**{"warmup_steps": 84, "freeze_end_step": 168, **changes})  # type: ignore[arg-type]
    assert (config.scores_steer, config.score_interval) == (steer, interval)
    scored = [s + 1 for s in range(config.warmup_steps) if s % interval == 0]
    assert config.scored_steps == len(scored)
    assert len(scored) <= (8 if not steer and "score_every" not in changes else config.warmup_steps)
    assert SAFEConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["score_every"] == changes.get("score_every")
    assert SAFEConfig.paper(warmup_steps=84).score_interval == 1


def test_score_every_none_is_the_default_and_bools_are_refused() -> None:
    assert SAFEConfig().score_every is None
    with pytest.raises(TypeError, match=r"score_every must be an int, got True"):
        SAFEConfig(score_every=True)
    with pytest.raises(ValueError, match=r"score_every <= warmup_steps"):
        SAFEConfig(warmup_steps=4, freeze_end_step=8, score_every=5)
