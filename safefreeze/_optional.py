"""Lazy imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the ``safefreeze[extra]`` to install.

    Args:
        module: Importable module name, e.g. ``"mlflow"``.
        extra: The safefreeze extra that provides it, e.g. ``"mlflow"``.

    Returns:
        The imported module.

    Raises:
        ImportError: If the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'safefreeze[{extra}]'"
        ) from err
