"""Rank rule shared by the integrations: process group first, then RANK, then 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from safefreeze.distributed import is_main_process, rank


@pytest.fixture(autouse=True)
def _no_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)


def test_a_plain_process_is_rank_zero() -> None:
    assert rank() == 0 and is_main_process()


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("3", 3), (" 1 ", 1), ("", 0)])
def test_rank_comes_from_the_environment_before_any_process_group(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: int
) -> None:
    monkeypatch.setenv("RANK", value)
    assert rank() == expected
    assert is_main_process() is (expected == 0)


def test_a_bad_rank_names_the_variable_and_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "worker-1")
    with pytest.raises(ValueError, match=r"RANK environment variable must be an integer.*RANK='worker-1'"):
        rank()
    with pytest.raises(ValueError, match=r"RANK='worker-1'"):
        is_main_process()


def test_an_initialized_process_group_decides_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "5")
    assert not is_main_process()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert rank() == 0 and is_main_process()
    finally:
        dist.destroy_process_group()
    assert rank() == 5
