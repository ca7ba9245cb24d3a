"""Reference adapter scores from an ONNX export, with no torch numerics in the loop.

A model trained on a GPU, or one whose torch scores are in doubt, is exported once with
:func:`export_scored_model`: the ONNX graph returns, for every adapter pair, the base output
``X`` and the adapted output ``Y`` that SAFE's hooks read. :func:`reference_scores` runs it
with ``onnx.reference.ReferenceEvaluator`` (pure numpy) over the batches given, reads the
same rows the torch path reads (padding dropped by the ``attention_mask``, at most
``max_rows`` drawn per pair and batch by ``safefreeze.cka``'s own rule and generator: drawing
row indices is not numerics), and sums float64 unbiased HSIC terms per minibatch as
``CKAAccumulator`` does, with the numpy backend's estimator. ``1 - CKA`` per adapter is the
score.

Example (``model`` a PEFT model, ``batches`` a list of its input dicts; docs/reference-scoring.md
runs it end to end)::

    export_scored_model(model, "scored.onnx", batches[0])
    ref = reference_scores("scored.onnx", batches, max_rows=config.max_tokens, seed=config.seed)
    ref.scores  # adapter name -> 1 - CKA
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from safefreeze._optional import require
from safefreeze.cka._guards import MIN_ROWS_UNBIASED, constant_tolerance
from safefreeze.cka._numpy import hsic_unbiased
from safefreeze.cka._torch import draw_rows
from safefreeze.discovery import AdapterPattern, find_adapter_pairs
from safefreeze.hooks import _first_tensor, _own_delta_module

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_KEY",
    "ReferenceScores",
    "UnsupportedOperatorError",
    "export_scored_model",
    "load_batches",
    "reference_scores",
    "save_batches",
]

# The opset the export asks for unless told otherwise; the reference evaluator implements it.
DEFAULT_OPSET = 18
# metadata_props key of the JSON that names each pair's outputs and the order rows are drawn in.
METADATA_KEY = "safefreeze.scored_pairs"
_FORMAT = 1
_Array = NDArray[Any]


class UnsupportedOperatorError(RuntimeError):
    """The ONNX runtime chosen cannot run an operator of the graph; the message names it."""


@dataclasses.dataclass(frozen=True)
class ReferenceScores:
    """Per-adapter reference scores and the float64 sums behind them.

    ``scores[name]`` is ``1 - CKA`` with CKA clipped to ``[0, 1]``, as ``SAFEOptimizer``'s
    raw scores are; NaN where no minibatch was usable or a side was constant.
    """

    # Adapter name -> 1 - CKA (NaN where undefined).
    scores: dict[str, float]
    # Adapter name -> CKA = sum_kl / sqrt(sum_kk * sum_ll), unclipped (NaN where undefined).
    cka: dict[str, float]
    # Adapter name -> (sum_kl, sum_kk, sum_ll): unbiased HSIC sums over the minibatches.
    sums: dict[str, tuple[float, float, float]]
    # Adapter name -> minibatches that contributed (at least 4 finite rows drawn).
    batches: dict[str, int]
    # Adapter name -> rows that contributed.
    rows: dict[str, int]

    def unit_scores(self, units: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """Scores per freeze unit: a unit is as important as its most important member.

        Args:
            units: Unit name -> member adapter names (``FreezePlan.units``).

        Returns:
            Unit name -> score; NaN where any member is NaN (such a unit never freezes).

        Raises:
            KeyError: If a member is not an adapter of these scores.
        """
        out: dict[str, float] = {}
        for unit, members in units.items():
            missing = [m for m in members if m not in self.scores]
            if missing:
                raise KeyError(
                    f"unit {unit!r} names adapters the exported model does not score: {missing[:5]}; "
                    f"it scores {list(self.scores)[:5]}..."
                )
            values = [self.scores[m] for m in members]
            out[unit] = math.nan if any(math.isnan(v) for v in values) else max(values)
        return out


# ---- export ---------------------------------------------------------------------------------


class _Capture(nn.Module):
    """Runs ``model(**inputs)`` and returns each pair's base and adapted outputs, in pair order."""

    def __init__(self, model: nn.Module, names: Sequence[str], slots: int) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.slots = slots
        self.seen: dict[int, torch.Tensor] = {}
        # Pair indices in the order their base representation appeared: the order rows are drawn.
        self.order: list[int] = []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.seen.clear()
        self.order.clear()
        self.model(**dict(zip(self.names, inputs, strict=True)))
        missing = [slot for slot in range(self.slots) if slot not in self.seen]
        if missing:
            raise RuntimeError(
                f"the forward on the example inputs did not run {len(missing) // 2 or 1} adapter site(s) "
                f"(output slots {missing[:6]}); every scored site must run on the example inputs"
            )
        out = tuple(self.seen[slot] for slot in range(self.slots))
        self.seen.clear()  # hold no tensor after the forward (torch.export checks attributes)
        return out


def export_scored_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Mapping[str, torch.Tensor],
    *,
    pattern: AdapterPattern | None = None,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
) -> list[str]:
    """Export ``model`` to ONNX with every adapter pair's base and adapted outputs as graph outputs.

    The graph takes the named ``example_inputs`` (called as ``model(**inputs)``), with their
    first two axes dynamic (batch, sequence), and returns ``pair{i}_base`` and
    ``pair{i}_adapted`` for the pairs :func:`safefreeze.find_adapter_pairs` finds: the base
    layer's output (or the site's input for layouts without a base module) and the site's
    output. The model is exported in eval mode (dropout off: with dropout 0 that is the
    training forward SAFE scores) and its modes are restored after. The pair names and the
    order their rows are drawn in are stored in the file's ``metadata_props``
    (:data:`METADATA_KEY`).

    Pass every input the forward reads, e.g. BERT's ``token_type_ids``: an input left to a
    registered buffer can export to operators the reference evaluator mishandles.

    Args:
        model: The model with its adapters (a PEFT model, or any layout ``pattern`` matches).
        path: Where the ``.onnx`` file goes.
        example_inputs: Input name -> example tensor, passed to ``model`` as keywords.
        pattern: The adapter layout; default PEFT LoRA.
        opset: ONNX opset to export to.
        dynamo: Use ``torch.onnx.export(dynamo=True)`` (torch.export and onnxscript) instead of
            the TorchScript exporter; slower to export, same scores.

    Returns:
        The names of the pairs, in output order.

    Raises:
        ValueError: If ``example_inputs`` is empty or not tensors, or a site runs several
            active LoRA adapters (their own contributions are not separate outputs).
        RuntimeError: If a scored site does not run on the example inputs.
    """
    onnx = require("onnx", "onnx")
    if not example_inputs or not all(isinstance(v, torch.Tensor) for v in example_inputs.values()):
        described = {k: type(v).__name__ for k, v in example_inputs.items()}
        raise ValueError(f"example_inputs must map input names to tensors, got {described or 'nothing'}")
    pairs = find_adapter_pairs(model, pattern)
    for pair in pairs:
        if _own_delta_module(model.get_submodule(pair.site), pair.adapter) is not None:
            raise ValueError(
                f"site {pair.site!r} runs several active LoRA adapters; the reference export scores one "
                "adapter per site: set_adapter() to the one to score, or merge the others first"
            )
    names = list(example_inputs)
    capture = _Capture(model, names, 2 * len(pairs))

    def keep(slot: int, value: Any, *, base: bool) -> None:
        tensor = _first_tensor(value)
        if tensor is None:
            return
        if base and slot not in capture.seen:
            capture.order.append(slot // 2)
        capture.seen[slot] = tensor

    handles = []
    for index, pair in enumerate(pairs):
        site = model.get_submodule(pair.site)
        if pair.base is None:
            handles.append(site.register_forward_pre_hook(lambda m, a, i=index: keep(2 * i, a, base=True)))
        else:
            base = model.get_submodule(pair.base)
            handles.append(base.register_forward_hook(lambda m, a, o, i=index: keep(2 * i, o, base=True)))
        handles.append(site.register_forward_hook(lambda m, a, o, i=index: keep(2 * i + 1, o, base=False)))
    modes = {module: module.training for module in model.modules()}
    outputs = [f"pair{i}_{side}" for i in range(len(pairs)) for side in ("base", "adapted")]
    args = tuple(example_inputs[n] for n in names)
    try:
        capture.eval()  # the model too
        with torch.no_grad():
            capture(*args)  # the draw order, from a plain forward
        order = list(capture.order)
        if dynamo:
            dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
            torch.onnx.export(
                capture,
                args,
                os.fspath(path),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                # One entry for forward's *inputs, holding one spec per input.
                dynamic_shapes=(tuple({a: d for a, d in dims.items() if a < t.dim()} for t in args),),
                verbose=False,
            )
        else:
            # The TorchScript exporter is deprecated in favour of dynamo=True, but exports these
            # models 20-30x faster to the same scores; it stays the default while torch ships it.
            axes = {
                n: {a: ("batch", "sequence")[a] for a in range(min(2, t.dim()))}
                for n, t in zip(names, args, strict=True)
            }
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
                torch.onnx.export(
                    capture,
                    args,
                    os.fspath(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=outputs,
                    dynamic_axes={**axes, **{o: {0: "batch", 1: "sequence"} for o in outputs}},
                    training=torch.onnx.TrainingMode.EVAL,
                )
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    exported = onnx.load(os.fspath(path))
    meta = {
        "format": _FORMAT,
        "inputs": names,
        "pairs": [
            {"name": p.name, "base": f"pair{i}_base", "adapted": f"pair{i}_adapted"}
            for i, p in enumerate(pairs)
        ],
        "draw_order": order,
    }
    del exported.metadata_props[:]
    entry = exported.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(exported, os.fspath(path))
    return [p.name for p in pairs]


# ---- batches on disk ------------------------------------------------------------------------


def save_batches(path: str | os.PathLike[str], batches: Iterable[Mapping[str, Any]]) -> int:
    """Write batches to an ``.npz`` file that :func:`load_batches` and ``safefreeze score`` read.

    Batch ``k``'s input ``name`` is stored as the array ``"{k}.{name}"``.

    Args:
        path: The ``.npz`` file.
        batches: Each a mapping of input name -> array or tensor.

    Returns:
        The number of batches written.
    """
    arrays: dict[str, _Array] = {}
    count = 0
    for k, batch in enumerate(batches):
        for name, value in batch.items():
            arrays[f"{k}.{name}"] = _numpy(value)
        count = k + 1
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return count


def load_batches(path: str | os.PathLike[str]) -> list[dict[str, _Array]]:
    """Read batches written by :func:`save_batches`, in order.

    Raises:
        ValueError: If an array name is not ``"{k}.{name}"`` with ``k`` a batch number.
    """
    batches: dict[int, dict[str, _Array]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            number, _, name = key.partition(".")
            if not number.isdigit() or not name:
                raise ValueError(
                    f"batch file {os.fspath(path)!r} holds an array named {key!r}; expected "
                    "'<batch number>.<input name>', e.g. '0.input_ids' (see save_batches)"
                )
            batches.setdefault(int(number), {})[name] = data[key]
    return [batches[k] for k in sorted(batches)]


def _numpy(value: Any) -> _Array:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ---- scoring --------------------------------------------------------------------------------


def _check_operators(model: Any) -> None:
    """Raise UnsupportedOperatorError naming every operator the reference evaluator lacks."""
    onnx = require("onnx", "onnx")
    from onnx.reference.ops import load_op

    local = {(f.domain, f.name) for f in model.functions}
    versions = {o.domain: o.version for o in model.opset_import}
    missing: dict[tuple[str, str], str] = {}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        key = (node.domain, node.op_type)
        if key in local or key in missing:
            continue
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            load_op(
                domain,
                node.op_type,
                versions.get(node.domain, versions.get("", onnx.defs.onnx_opset_version())),
            )
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            missing[key] = node.name
    if missing:
        described = ", ".join(f"{d or 'ai.onnx'}::{op} (node {name!r})" for (d, op), name in missing.items())
        raise UnsupportedOperatorError(
            f"onnx.reference.ReferenceEvaluator does not support operator(s) {described}; "
            "export with another opset (opset=...) or the other exporter (dynamo=...), or score "
            "with runtime='onnxruntime'"
        )


def _failed_operator(err: BaseException) -> str | None:
    """The operator whose kernel raised ``err`` inside the reference evaluator, if any."""
    from onnx.reference.op_run import OpRun

    tb: types.TracebackType | None = err.__traceback__
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, OpRun):
            node = owner.onnx_node
            found = f"{node.domain or 'ai.onnx'}::{node.op_type} (node {node.name!r})"
        tb = tb.tb_next
    return found


class _Session:
    """One way to run the graph: the numpy reference evaluator or onnxruntime."""

    def __init__(self, model: Any, runtime: str) -> None:
        self.runtime = runtime
        if runtime == "reference":
            _check_operators(model)
            from onnx.reference import ReferenceEvaluator

            self._ref = ReferenceEvaluator(model)
        elif runtime == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError as err:
                raise ModuleNotFoundError(
                    "runtime='onnxruntime' needs onnxruntime, which is not installed: pip install "
                    "onnxruntime (or use runtime='reference', onnx's own numpy evaluator)",
                    name="onnxruntime",
                ) from err
            self._ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        else:
            raise ValueError(f"runtime must be 'reference' or 'onnxruntime', got {runtime!r}")

    def run(self, outputs: list[str], feed: dict[str, _Array]) -> list[_Array]:
        if self.runtime == "onnxruntime":
            return [np.asarray(a) for a in self._ort.run(outputs, feed)]
        try:
            return [np.asarray(a) for a in self._ref.run(outputs, feed)]
        except Exception as err:
            operator = _failed_operator(err)
            if operator is None:
                raise
            raise UnsupportedOperatorError(
                f"onnx.reference.ReferenceEvaluator failed in operator {operator}: "
                f"{type(err).__name__}: {err}"
            ) from err


def _metadata(model: Any, path: str) -> dict[str, Any]:
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(
            f"{path!r} carries no {METADATA_KEY!r} metadata: it was not written by "
            "safefreeze.integrations.onnx.export_scored_model, which names each pair's outputs"
        )
    meta: dict[str, Any] = json.loads(props[METADATA_KEY])
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{path!r} holds scored-pairs metadata format {meta.get('format')!r}; expected {_FORMAT}"
        )
    return meta


def _minibatch_terms(x: _Array, y: _Array) -> tuple[float, float, float, int] | None:
    """Unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) and the row count of drawn rows ``x`` (n, Dx),
    ``y`` (n, Dy), as ``CKAAccumulator`` adds one minibatch; None with fewer than 4 finite rows."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    finite = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)  # (n,)
    x, y = x[finite], y[finite]
    n = x.shape[0]
    if n < MIN_ROWS_UNBIASED:
        return None
    # One power of two, 2**(-64 k), for both sides keeps fourth powers finite; 1 for usual values.
    _, exponent = np.frexp(max(float(np.abs(x).max()), float(np.abs(y).max())))
    shift = int(exponent) // 64 * 64
    x, y = np.ldexp(x, -shift), np.ldexp(y, -shift)
    tol = constant_tolerance(1, float(np.finfo(np.float64).eps)) * math.sqrt(n)
    sides = []
    for side in (x, y):
        centered = side - side.mean(axis=0)  # centering only cuts cancellation; the estimator ignores it
        if np.linalg.norm(centered) <= tol * np.linalg.norm(side):
            centered = np.zeros_like(centered)  # constant: rounding noise must not score
        sides.append(centered)
    k = sides[0] @ sides[0].T  # (n, n)
    l = sides[1] @ sides[1].T  # noqa: E741 (n, n)
    return hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l), n


def reference_scores(
    model: str | os.PathLike[str],
    batches: Iterable[Mapping[str, Any]],
    *,
    max_rows: int | None = 64,
    seed: int = 0,
    mask_key: str | None = "attention_mask",
    runtime: str = "reference",
) -> ReferenceScores:
    """Score every adapter pair of an exported model over ``batches``, in numpy float64.

    Each batch is run through the graph once; for each pair, in the order the torch forward
    reaches them, the rows are drawn as SAFE's hooks draw them: rows where the batch's
    ``mask_key`` entry is False are dropped when the output's leading shape is the mask's
    (B, T), then at most ``max_rows`` rows are drawn with a ``torch.Generator`` seeded with
    ``seed`` (``SAFEConfig.max_tokens`` and ``SAFEConfig.seed`` reproduce a run's draws).
    Each pair's drawn rows are one minibatch of unbiased HSIC sums.

    Args:
        model: Path of a file written by :func:`export_scored_model`.
        batches: Each a mapping of input name -> array or tensor; every graph input must be
            there, extra entries are ignored.
        max_rows: Rows drawn per pair and batch; None reads every unmasked row.
        seed: Seed of the row-drawing generator.
        mask_key: The batch entry holding the padding mask (True or 1 for real tokens);
            None scores every row.
        runtime: ``"reference"`` (``onnx.reference.ReferenceEvaluator``, pure numpy) or
            ``"onnxruntime"`` (faster; install ``onnxruntime`` separately).

    Returns:
        The scores and the sums behind them.

    Raises:
        ValueError: If the file was not written by :func:`export_scored_model`, a batch
            misses an input, ``max_rows`` is below 4, or ``runtime`` is unknown.
        UnsupportedOperatorError: If the runtime cannot run an operator of the graph.
        ModuleNotFoundError: If ``runtime="onnxruntime"`` and onnxruntime is not installed.
    """
    onnx = require("onnx", "onnx")
    if max_rows is not None and max_rows < MIN_ROWS_UNBIASED:
        raise ValueError(f"max_rows must be None or >= {MIN_ROWS_UNBIASED}, got {max_rows}")
    path = os.fspath(model)
    proto = onnx.load(path)
    meta = _metadata(proto, path)
    session = _Session(proto, runtime)
    inputs: list[str] = list(meta["inputs"])
    pairs: list[dict[str, str]] = list(meta["pairs"])
    order: list[int] = list(meta["draw_order"])
    wanted = [name for p in pairs for name in (p["base"], p["adapted"])]
    sums = np.zeros((len(pairs), 3), dtype=np.float64)  # (P, 3): kl, kk, ll
    used = np.zeros((len(pairs), 2), dtype=np.int64)  # (P, 2): batches, rows
    generator = torch.Generator().manual_seed(seed)
    for number, batch in enumerate(batches):
        missing = [n for n in inputs if n not in batch]
        if missing:
            raise ValueError(
                f"batch {number} misses input(s) {missing} of the exported graph (inputs {inputs}); "
                f"it holds {sorted(batch)}"
            )
        outputs = dict(zip(wanted, session.run(wanted, {n: _numpy(batch[n]) for n in inputs}), strict=True))
        mask = None
        if mask_key is not None and mask_key in batch:
            mask = torch.from_numpy(_numpy(batch[mask_key]).astype(bool))
        for index in order:
            x = outputs[pairs[index]["base"]]  # (..., Dx)
            y = outputs[pairs[index]["adapted"]]  # (..., Dy)
            fits = mask is not None and mask.dim() == 2 and tuple(mask.shape) == tuple(x.shape[:-1])
            draw = draw_rows(tuple(x.shape), mask if fits else None, max_rows, generator)
            rows = slice(None) if draw.rows is None else draw.rows.numpy()
            terms = _minibatch_terms(x.reshape(-1, x.shape[-1])[rows], y.reshape(-1, y.shape[-1])[rows])
            if terms is not None:
                sums[index] += terms[:3]
                used[index] += (1, terms[3])
    scores: dict[str, float] = {}
    cka: dict[str, float] = {}
    for index, pair in enumerate(pairs):
        kl, kk, ll = sums[index].tolist()
        defined = used[index, 0] > 0 and kk > 0 and ll > 0 and math.isfinite(kk) and math.isfinite(ll)
        value = kl / (math.sqrt(kk) * math.sqrt(ll)) if defined else math.nan
        cka[pair["name"]] = value
        scores[pair["name"]] = math.nan if math.isnan(value) else 1.0 - min(max(value, 0.0), 1.0)
    return ReferenceScores(
        scores=scores,
        cka=cka,
        sums={
            p["name"]: (float(a), float(b), float(c))
            for p, (a, b, c) in zip(pairs, sums.tolist(), strict=True)
        },
        batches={p["name"]: int(u[0]) for p, u in zip(pairs, used.tolist(), strict=True)},
        rows={p["name"]: int(u[1]) for p, u in zip(pairs, used.tolist(), strict=True)},
    )
