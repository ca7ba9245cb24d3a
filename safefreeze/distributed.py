"""Which process of a multi-process launch this is: the rank rule every integration shares."""

from __future__ import annotations

import os

__all__ = ["is_main_process", "rank"]


def rank() -> int:
    """The global rank of this process.

    The rank of the initialized ``torch.distributed`` process group; before (or without)
    one, the ``RANK`` environment variable, which torchrun, accelerate and Lightning set in
    every process before any init; else 0.

    Returns:
        The rank, 0 in a single-process run.

    Raises:
        ValueError: If ``RANK`` is set to something that is not an integer.

    Example:
        >>> rank()  # a plain process
        0
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    value = os.environ.get("RANK", "").strip()
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"the RANK environment variable must be an integer (the process's global rank), got "
            f"RANK={os.environ['RANK']!r}; unset it or set it to this process's rank"
        ) from None


def is_main_process() -> bool:
    """Whether this is rank 0, the process that logs, saves and reports for all of them.

    Raises:
        ValueError: If ``RANK`` is set to something that is not an integer.

    Example:
        >>> is_main_process()
        True
    """
    return rank() == 0
