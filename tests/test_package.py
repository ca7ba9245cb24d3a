"""The package as installed: lean import, layout, optional dependencies."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import safefreeze

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = [
    "mlflow",
    "transformers",
    "lightning",
    "pytorch_lightning",
    "onnx",
    "onnxruntime",
    "scipy",
    "peft",
    "accelerate",
    "matplotlib",
]


def _python(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_loads_nothing_optional_and_no_cuda(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import safefreeze, safefreeze.cka\n"
        "import torch\n"
        f"print(json.dumps({{'loaded': [m for m in {OPTIONAL!r} if m in sys.modules],"
        " 'cuda': torch.cuda.is_initialized()}))\n"
    )
    report = json.loads(_python(code, tmp_path))
    assert report == {"loaded": [], "cuda": False}


def test_integrations_install_under_safefreeze_only(tmp_path: Path) -> None:
    code = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('integrations') is None,"
        " importlib.util.find_spec('safefreeze.integrations') is not None)\n"
    )
    assert _python(code, tmp_path).split() == ["True", "True"]


def test_distribution_files_have_no_top_level_integrations(tmp_path: Path) -> None:
    code = (
        "import importlib.metadata, json\n"
        "files = importlib.metadata.files('safefreeze') or []\n"
        "print(json.dumps(sorted({'/'.join(f.parts[:2]) for f in files if f.suffix == '.py'})))\n"
    )
    dirs = json.loads(_python(code, tmp_path))
    assert not any(d.startswith("integrations") for d in dirs)
    if "safefreeze/__init__.py" in dirs:  # a wheel install lists its modules
        assert "safefreeze/integrations" in dirs


@pytest.mark.skipif(os.environ.get("SAFEFREEZE_TEST_INSTALLED") != "1", reason="set by `nox -s tests`")
def test_suite_runs_against_the_installed_package() -> None:
    installed = Path(safefreeze.__file__).resolve().parent
    assert installed != REPO / "safefreeze"
    assert "site-packages" in installed.parts


def test_public_api_is_a_string_all() -> None:
    assert all(isinstance(name, str) for name in safefreeze.__all__)
    assert all(hasattr(safefreeze, name) for name in safefreeze.__all__)
    assert sorted(safefreeze.__all__) == safefreeze.__all__
    assert safefreeze.__version__ == importlib.metadata.version("safefreeze")


def test_public_api_is_what_users_need() -> None:
    from safefreeze.controller import FreezeCallback

    assert safefreeze.FreezeCallback is FreezeCallback  # the type of add_freeze_callback's argument
    # The schedule is public; the selection helpers are the engine's and stay in their module.
    assert "cubic_threshold" in safefreeze.__all__
    for helper in ("lowest_first", "normalize_scores", "select_to_freeze"):
        assert helper not in safefreeze.__all__ and not hasattr(safefreeze, helper)
        assert callable(getattr(importlib.import_module("safefreeze.selection"), helper))


def test_missing_extra_names_what_to_install() -> None:
    from safefreeze._optional import require

    assert require("json", "none") is json
    with pytest.raises(ImportError, match=r"pip install 'safefreeze\[mlflow\]'"):
        require("safefreeze_no_such_module", "mlflow")


def test_every_extra_has_code_that_needs_it_and_the_docs_name_only_real_extras() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    code = "\n".join(p.read_text() for d in ("safefreeze", "integrations") for p in (REPO / d).rglob("*.py"))
    features = sorted(set(extras) - {"all"})
    for extra in features:  # an extra is only there for code that imports it through require()
        assert re.search(rf"require\([^()]*,\s*[\"']{extra}[\"']\)", code), extra
    assert extras["all"] == [f"safefreeze[{','.join(features)}]"]
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "docs").glob("*.rst")]
    named = {
        e for p in pages for m in re.findall(r"safefreeze\[([\w,]+)\]", p.read_text()) for e in m.split(",")
    }
    assert named <= set(extras), sorted(named - set(extras))
