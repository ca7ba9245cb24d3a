"""Several processes, one decision: ranks, score agreement, and DDP that follows freezes.

The rank rule every integration shares (:func:`rank`, :func:`is_main_process`); the
collective that makes every rank finalize the same scores or raise together
(:func:`finalize_across_ranks`, :func:`agree`); and :class:`FreezeAwareDDP`, which tells
DDP's reducer about freezes by re-wrapping the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from safefreeze.cka._torch import CKAAccumulator

__all__ = [
    "FreezeAwareDDP",
    "RankDisagreementError",
    "agree",
    "finalize_across_ranks",
    "is_main_process",
    "rank",
    "world_size",
]


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


class RankDisagreementError(RuntimeError):
    """Raised on every rank when the ranks of a distributed run would not decide alike.

    The message is built from what every rank reported, so it is the same on every rank.
    """


def world_size() -> int:
    """The number of processes of the initialized ``torch.distributed`` group; 1 without one.

    Example:
        >>> world_size()  # a plain process
        1
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


# Bytes of a failing rank's error message carried to every rank.
_MESSAGE_BYTES = 480
_DIGEST_BYTES = 32


def agree(
    parts: Mapping[str, Any] | None,
    *,
    what: str,
    device: torch.device | str = "cpu",
    keys: Sequence[str] | None = None,
    error: BaseException | None = None,
) -> None:
    """Check that every rank holds the same ``parts``; raise the same error on every rank if not.

    Each rank hashes each part (canonical JSON, SHA-256) and all-gathers one fixed-size
    byte tensor, so ranks that disagree, or a rank that failed (``error``), can never make
    the others wait for a collective that does not come: every rank reaches this one call
    and every rank raises. Without an initialized group of more than one process it does
    nothing (and raises ``error`` if given).

    Args:
        parts: What must agree, by name; JSON-serializable values (floats are compared by
            their exact ``repr``, NaN equal to NaN; the order of a dict's keys counts).
            None when this rank failed.
        what: What is being decided, for the message, e.g. ``"finalizing the SAFE scores"``.
        device: Where the gathered tensor lives: the CUDA device under NCCL, else the CPU.
        keys: The names of ``parts`` on every rank; needed when ``parts`` is None.
        error: This rank's failure, if it failed; every rank raises.

    Raises:
        RankDisagreementError: On every rank, if any rank failed or holds other parts than
            rank 0; the message names the ranks and what differed.
        ValueError: If neither ``parts`` nor ``keys`` is given.
    """
    import torch.distributed as dist

    if keys is None:
        if parts is None:
            raise ValueError("agree() needs the part names: pass parts, or keys when this rank failed")
        keys = list(parts)
    size = world_size()
    if size == 1:
        if error is not None:
            raise RankDisagreementError(f"{what} failed: {type(error).__name__}: {error}") from error
        return
    # One row per rank: [failed flag, one SHA-256 digest per key, the failure's message].
    payload = torch.zeros(1 + _DIGEST_BYTES * len(keys) + _MESSAGE_BYTES, dtype=torch.uint8)
    tail = slice(1 + _DIGEST_BYTES * len(keys), None)
    if error is not None or parts is None:
        payload[0] = 1
        text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        payload[tail][: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    else:
        for i, key in enumerate(keys):
            digest = hashlib.sha256(_canonical(parts[key]).encode()).digest()
            payload[_slot(i)] = torch.tensor(list(digest), dtype=torch.uint8)
    payload = payload.to(device)
    gathered = [torch.empty_like(payload) for _ in range(size)]
    dist.all_gather(gathered, payload)
    rows = [row.cpu() for row in gathered]  # (size,) rows of (bytes,)
    failed = [r for r, row in enumerate(rows) if int(row[0]) != 0]
    if failed:
        # Cut at a byte limit, the message may end inside a character: replace it.
        message = bytes(rows[failed[0]][tail].tolist()).rstrip(b"\0").decode(errors="replace")
        raise RankDisagreementError(
            f"{what} failed on rank(s) {failed} of {size}; every rank stops here. Rank {failed[0]}: {message}"
        ) from error
    differ: dict[int, list[str]] = {}
    for r, row in enumerate(rows[1:], start=1):
        names = [key for i, key in enumerate(keys) if not torch.equal(row[_slot(i)], rows[0][_slot(i)])]
        if names:
            differ[r] = names
    if differ:
        shown = "; ".join(f"rank {r}: {', '.join(names)}" for r, names in differ.items())
        raise RankDisagreementError(
            f"{what}: the ranks disagree, so they would freeze different adapters and their replicas "
            f"would drift apart; every rank stops here. Different from rank 0 on {shown}. Give every "
            "rank the same model, SAFEConfig and (if you pass them) raw scores"
        )


def _slot(i: int) -> slice:
    """Where the digest of the ``i``-th part sits in a rank's row."""
    return slice(1 + _DIGEST_BYTES * i, 1 + _DIGEST_BYTES * (i + 1))


def _canonical(value: Any) -> str:
    # Key order counts: units are listed in model order, and prefix freezing walks that order.
    return json.dumps(value, default=repr, allow_nan=True)


def finalize_across_ranks(
    accumulator: CKAAccumulator,
    decide: Callable[[], tuple[dict[str, float], dict[str, float]]],
    context: Mapping[str, Any],
) -> tuple[dict[str, float], dict[str, float]]:
    """Reduce the CKA statistics over every rank, decide the scores, and check that all agree.

    Three collectives, once per run: ``context`` (config, adapters, units, step) is checked
    first, so ranks with different models never reduce tensors of different shapes; then the
    statistics are summed (every column is a sum); then ``decide()`` runs on every rank and
    its (raw, normalized) scores are checked. After this the freeze schedule is a pure
    function of (scores, config, step), so every later freeze is the same on every rank.

    Args:
        accumulator: This rank's CKA statistics; summed in place over the ranks (left as
            they were when the ranks disagree).
        decide: Returns (raw, normalized) scores per unit from the reduced statistics.
        context: What fixes the decision besides the statistics, by name.

    Returns:
        ``decide()``'s scores, the same on every rank.

    Raises:
        RankDisagreementError: On every rank, if the ranks' context or scores differ, or
            ``decide()`` raised on any rank.
    """
    device = accumulator.stats.device
    what = "finalizing the SAFE scores across ranks"
    agree(
        {**context, "CKA statistics shape": list(accumulator.stats.shape)},
        what=what,
        device=device,
    )
    local = accumulator.stats.clone()  # (adapters, NUM_STATS): put back if the ranks disagree
    accumulator.all_reduce_()
    keys = ("raw scores", "normalized scores")
    try:
        try:
            raw, normalized = decide()
        except Exception as err:
            agree(None, what=what, device=device, keys=keys, error=err)
            raise  # not reached: agree raised on every rank
        agree({keys[0]: raw, keys[1]: normalized}, what=what, device=device)
    except RankDisagreementError:
        accumulator.stats.copy_(local)
        raise
    return raw, normalized


class FreezeAwareDDP:
    """A :class:`~torch.nn.parallel.DistributedDataParallel` wrapper that follows freezes.

    DDP's reducer expects a gradient for every parameter that required one when it was
    built. After SAFE freezes an adapter that gradient never comes: the reducer leaves
    buckets unreduced (replicas drift apart) and the next forward raises "Expected to have
    finished reduction". This object re-wraps the module in a fresh DDP (built without
    any collective: every rank froze the same parameters at the same step) whenever the
    set of parameters that require grad has changed, so DDP keeps its speed:
    no ``find_unused_parameters`` graph walk per step, and frozen parameters leave the
    gradient buckets. A freeze replayed from a checkpoint (``load_state_dict``) is seen
    the same way. Call it like the model; the training loop keeps this one reference.

    Args:
        module: The unwrapped model, the one ``SAFEOptimizer`` was built on (so plans and
            checkpoints carry its parameter names, the same with and without DDP).
        setup: Called with each new DDP wrapper, e.g. to register a communication hook.
        **ddp_kwargs: Passed to every ``DistributedDataParallel(...)`` (``device_ids``,
            ``bucket_cap_mb``...). ``init_sync`` applies to the first wrap only; re-wraps
            skip the initial broadcast.

    Raises:
        TypeError: If ``module`` is already a DDP wrapper.
        RuntimeError: If no ``torch.distributed`` process group is initialized.

    Example:
        >>> # under torchrun, after dist.init_process_group(...)
        >>> # model = FreezeAwareDDP(peft_model, device_ids=[local_rank])
        >>> # optimizer = SAFEOptimizer(inner, peft_model, config)
        >>> # loss = model(**batch).loss; loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        setup: Callable[[DistributedDataParallel], None] | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        import torch.distributed as dist

        if isinstance(module, DistributedDataParallel):
            raise TypeError(
                "FreezeAwareDDP wraps the model itself, got a DistributedDataParallel; pass "
                "ddp.module (and build SAFEOptimizer on that same module)"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "FreezeAwareDDP needs an initialized torch.distributed process group; call "
                "torch.distributed.init_process_group(...) first (torchrun sets its environment)"
            )
        self._module = module
        self._setup = setup
        self._kwargs = dict(ddp_kwargs)
        init_sync = bool(self._kwargs.pop("init_sync", True))
        # How many times the module was wrapped since the first wrap.
        self.rewraps = 0
        self._trainable: list[nn.Parameter] = []
        self._ddp: DistributedDataParallel | None = None
        self._wrap(init_sync=init_sync)

    @property
    def module(self) -> nn.Module:
        """The wrapped model (the same object whatever the current DDP wrapper)."""
        return self._module

    @property
    def ddp(self) -> DistributedDataParallel | None:
        """The current DDP wrapper; None once no parameter requires grad (nothing to reduce)."""
        self._follow()
        return self._ddp

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the forward through the current DDP wrapper, re-wrapping first if a freeze happened."""
        self._follow()
        if self._ddp is None:
            return self._module(*args, **kwargs)
        return self._ddp(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """DDP's ``no_sync()`` of the current wrapper, for gradient accumulation."""
        ddp = self.ddp
        return contextlib.nullcontext() if ddp is None else ddp.no_sync()

    def train(self, mode: bool = True) -> FreezeAwareDDP:
        """Set the module's training mode; returns self."""
        self._module.train(mode)
        return self

    def eval(self) -> FreezeAwareDDP:
        """Set the module to evaluation mode; returns self."""
        return self.train(False)

    def _follow(self) -> None:
        """Re-wrap if the parameters that require grad are not those the wrapper was built on."""
        now = [p for p in self._module.parameters() if p.requires_grad]
        if [id(p) for p in now] != [id(p) for p in self._trainable]:  # held params keep their ids
            self.rewraps += 1
            self._wrap(init_sync=False)

    def _wrap(self, *, init_sync: bool) -> None:
        # Drop the old reducer (and its gradient buckets) before building the new one.
        self._ddp = None
        self._trainable = [p for p in self._module.parameters() if p.requires_grad]
        if not self._trainable:
            return
        ddp = DistributedDataParallel(self._module, init_sync=init_sync, **self._kwargs)
        if self._setup is not None:
            self._setup(ddp)
        self._ddp = ddp
