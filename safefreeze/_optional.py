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
        ModuleNotFoundError: If the module is not installed.
        ImportError: If it is installed but fails to import; the message names the cause.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'safefreeze[{extra}]'",
            name=module,
        ) from err
    except ImportError as err:
        raise ImportError(
            f"{module!r} is required for this feature (extra 'safefreeze[{extra}]') "
            f"but failed to import: {err}",
            name=module,
        ) from err
