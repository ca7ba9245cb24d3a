"""Every Python block of the README and docs/ runs as written.

A page runs like a notebook: its ``python`` blocks in order, in one namespace, in a fresh
working directory. A block that cannot run here is preceded by a visible reason,
``<!-- not run: needs a tracking server -->``; other fences (bash, text) are not run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->\s*\Z", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # line of the block's first code line in the page
    code: str
    not_run: str | None  # the reason given in the page, or None


def python_blocks(page: Path) -> list[Block]:
    """The ``python`` blocks of a markdown page, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1).strip() != "python":
            continue
        before = text[: match.start()].rstrip()
        marker = NOT_RUN.search(before)
        line = text.count("\n", 0, match.start(2)) + 1
        reason = None if marker is None else marker.group(1).strip()
        blocks.append(Block(page, line, match.group(2), reason))
    return blocks


def run_page(page: Path, workdir: Path) -> dict[str, Any]:
    """Run a page's blocks in order in one namespace inside ``workdir``; return the namespace."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may download
        patch.setenv("MPLBACKEND", "Agg")
        for block in python_blocks(page):
            if block.not_run is not None:
                continue
            # Padding puts a traceback's line numbers on the page's own lines.
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            exec(code, namespace)
    return namespace


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], dict[str, Any]]:
    """Run each page once per module, whichever test asks first."""
    done: dict[Path, dict[str, Any]] = {}

    def get(page: Path) -> dict[str, Any]:
        if page not in done:
            done[page] = run_page(page, tmp_path_factory.mktemp(page.stem))
        return done[page]

    return get


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_page_runs_as_written(page: Path, ran: Callable[[Path], dict[str, Any]]) -> None:
    ran(page)


@pytest.mark.parametrize("name", ["README.md", "docs/quickstart.md"])
def test_training_examples_freeze_adapters(name: str, ran: Callable[[Path], dict[str, Any]]) -> None:
    namespace = ran(REPO / name)
    optimizer = namespace["optimizer"]
    assert 0 < len(optimizer.frozen_adapters) < len(optimizer.controller.pairs)


def test_blocks_that_do_not_run_say_why() -> None:
    skipped = [b for page in PAGES for b in python_blocks(page) if b.not_run is not None]
    assert all(b.not_run for b in skipped), [f"{b.page.name}:{b.line}" for b in skipped if not b.not_run]
    assert len(skipped) <= 3, "keep blocks that cannot run rare"


def test_the_extractor_finds_blocks_and_not_run_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nx = 1\n```\n\n```bash\nexit 1\n```\n\n"
        "<!-- not run: needs a tracking server -->\n```python\nraise SystemExit\n```\n\n"
        "```python\ny = x + 1\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.not_run) for b in blocks] == [
        (4, "x = 1\n", None),
        (13, "raise SystemExit\n", "needs a tracking server"),
        (17, "y = x + 1\n", None),
    ]
    assert run_page(page, tmp_path)["y"] == 2


def test_a_failing_block_points_at_its_page_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```python\nx = 1\nundefined_name\n```\n")
    with pytest.raises(NameError) as failure:
        run_page(page, tmp_path)
    frame = failure.traceback[-1]
    assert (Path(str(frame.path)), frame.lineno + 1) == (page, 5)


def test_readme_keeps_the_fresh_machine_commands() -> None:
    # A fresh machine with only Python and pip runs these; .ci/run calls the second.
    readme = (REPO / "README.md").read_text()
    assert "python3 -m pip install nox && python3 -m nox -s demo" in readme
    assert "python3 -m pip install nox && python3 -m nox -s tests" in readme


def test_readme_and_benchmark_page_give_the_same_regenerate_command() -> None:
    command = "```bash\npython3 -m nox -s bench\n```"
    assert command in (REPO / "README.md").read_text()
    assert command in (REPO / "docs" / "benchmarks.md").read_text()
