"""Linear CKA: the similarity SAFE scores adapters with (importance = 1 - CKA).

``linear_cka`` computes it once; ``CKAAccumulator`` streams it over minibatches for
many adapters. The numpy backend is the float64 reference and imports numpy only; the
torch backend (and the accumulator) load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safefreeze.cka._api import linear_cka
from safefreeze.cka._guards import CKAUndefinedError
from safefreeze.cka._numpy import hsic_unbiased

if TYPE_CHECKING:
    from safefreeze.cka._torch import CKAAccumulator

__all__ = [
    "CKAAccumulator",
    "CKAUndefinedError",
    "hsic_unbiased",
    "linear_cka",
]


def __getattr__(name: str) -> object:
    # The accumulator lives in the torch backend; loading it on first use keeps
    # `import safefreeze.cka._numpy` free of torch.
    if name == "CKAAccumulator":
        from safefreeze.cka._torch import CKAAccumulator

        return CKAAccumulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
