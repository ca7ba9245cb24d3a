"""Every docstring example in the package runs and prints what it claims."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import safefreeze

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
