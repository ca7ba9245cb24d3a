"""Every docstring example runs; the API reference documents the public API and nothing else."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import safefreeze
import safefreeze.cka
import safefreeze.integrations

REPO = Path(__file__).resolve().parents[1]
# `.. autoclass:: safefreeze.X`, `.. py:data:: safefreeze.__version__`, `.. automodule:: ...`
DIRECTIVE = re.compile(
    r"^\.\. (?:py:)?(?:auto)?(?:module|class|exception|function|data|method)::\s*(\S+)", re.M
)

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(safefreeze.__path__, prefix="safefreeze.")
    if not info.name.startswith("safefreeze.integrations")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_api_reference_documents_the_public_api_and_nothing_private() -> None:
    documented = DIRECTIVE.findall((REPO / "docs" / "api.rst").read_text())
    public = {f"safefreeze.{name}" for name in safefreeze.__all__}
    public |= {f"safefreeze.cka.{name}" for name in safefreeze.cka.__all__}
    integrations = {
        f"safefreeze.integrations.{m.name}"
        for m in pkgutil.iter_modules(safefreeze.integrations.__path__)
        if not m.name.startswith("_")
    }
    assert integrations, "no integration module found"
    modules = {
        "safefreeze",
        "safefreeze.cka",
        "safefreeze.plots",
        "safefreeze.distributed",
        "safefreeze.analysis",
    } | integrations
    assert sorted((public | modules) - set(documented)) == []
    assert sorted(set(documented) - public - modules) == []
    assert len(documented) == len(set(documented)), "a name documented twice"
