"""The ``safefreeze`` console script.

``safefreeze plan show PLAN`` prints a plan's freeze timeline as a table; ``PLAN`` is a plan
file, a ``runs:/<run_id>[/<path>]`` URI or an MLflow run id (only those two import MLflow).
``safefreeze demo`` fine-tunes pretrained MiniLM-L6 with plain LoRA and with SAFE on Rotten
Tomatoes and compares the two runs. ``safefreeze score MODEL BATCHES --plan PLAN`` recomputes
adapter scores from an ONNX export on CPU (``safefreeze.integrations.onnx``) and flags units
whose rank differs from the plan's.

Each command group is one ``_add_<group>(commands)`` function that adds its subparsers and
sets ``func``; :func:`main` lists them in ``_GROUPS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from safefreeze.plan import SCHEMA_VERSION, FreezePlan, PlanError

# An MLflow run id: a uuid4 in hex.
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class CommandError(Exception):
    """An error the user can fix: printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safefreeze`` command line.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 2 on a usage error or a plan that cannot be read.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help and on usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:  # a group without its subcommand, e.g. `safefreeze plan`
        args.parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except BrokenPipeError:  # `safefreeze plan show ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CommandError, PlanError, OSError) as err:
        # One line, whatever the message holds: a hostile file name must not forge lines either.
        print(f"safefreeze: error: {_escape(' '.join(str(err).split()))}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safefreeze", description="Selective Adapter Freezing (SAFE) tools."
    )
    parser.set_defaults(parser=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _GROUPS:
        add(commands)
    return parser


# ---- safefreeze plan ----------------------------------------------------------------------


def _add_plan(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = commands.add_parser("plan", help="inspect freeze plans", description="Inspect freeze plans.")
    group.set_defaults(parser=group)
    sub = group.add_subparsers(title="commands", metavar="COMMAND")
    show = sub.add_parser(
        "show",
        help="print a plan's freeze timeline",
        description="Print a plan's config and its freeze timeline as a table.",
    )
    show.add_argument(
        "plan", metavar="PLAN", help="plan JSON file, runs:/<run_id>[/<path>] URI, or MLflow run id"
    )
    show.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI for runs:/ URIs and run ids (default: MLflow's own resolution)",
    )
    show.set_defaults(func=_plan_show)


def _plan_show(args: argparse.Namespace) -> int:
    try:
        plan = _load(args.plan, args.tracking_uri)
    except RecursionError:  # FreezePlan refuses deep nesting itself; this only backs it up
        raise CommandError(f"{args.plan!r} is nested too deeply to be a plan") from None
    print(format_plan(plan, source=args.plan))
    return 0


def _load(ref: str, tracking_uri: str | None) -> FreezePlan:
    path = Path(ref)
    if path.exists():
        return FreezePlan.load(path)
    if not (ref.startswith("runs:/") or _RUN_ID.fullmatch(ref)):
        raise CommandError(
            f"no plan file {ref!r}; give a plan JSON file, a runs:/<run_id>[/<path>] URI or an MLflow run id"
        )
    # Imported by name: the core has no static dependency on the integrations (nor MLflow).
    try:
        tracking = importlib.import_module("safefreeze.integrations.mlflow")
    except ImportError as err:  # the extra is missing: the message names it
        raise CommandError(str(err)) from None
    try:
        with _no_progress_bars():
            plan: FreezePlan = tracking.load_plan(ref, tracking_uri=tracking_uri)
    except PlanError:
        raise
    except (tracking.TrackingError, ValueError) as err:  # unreachable store, unknown run, bad URI
        raise CommandError(str(err)) from None
    return plan


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep MLflow's download progress bar off stderr, unless the user asked for it."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def format_plan(plan: FreezePlan, *, source: str = "plan") -> str:
    """The plan as text: a header (config, adapters, scores), then one row per frozen unit.

    Rows are in freeze order; ``frozen`` is the cumulative count of frozen adapters. Units
    never frozen follow with their scores. Every string that comes from the plan or the
    user (names, config values, ``source``) is printed with control characters escaped, so
    a name can neither drive the terminal nor forge a row.

    Args:
        plan: The plan to show.
        source: Where it came from, for the first line.

    Returns:
        The text, without a trailing newline.
    """
    config = " ".join(f"{key}={_escape(str(value))}" for key, value in plan.config.to_dict().items())
    units = len(plan.units) or len(plan.adapters)
    frozen = plan.adapter_freeze_steps
    version = f"schema version {SCHEMA_VERSION}"
    if plan.migrated_from is not None:
        version += f", migrated from version {plan.migrated_from}"
    if plan.scored_at is None:
        scores = "not final yet (the warm-up has not ended)"
    else:
        every = plan.config.score_interval
        cadence = "every warm-up step" if every == 1 else f"every {every} warm-up steps"
        normalization = plan.config.normalization
        scores = f"final at step {plan.scored_at} (normalization {normalization!r}, scored {cadence})"
    lines = [
        f"plan: {_escape(source)} ({version}, fingerprint {plan.fingerprint[:12]})",
        f"config: {config}",
        f"adapters: {len(plan.adapters)} in {_count(units, 'freeze unit')}; "
        f"{len(frozen)} frozen in {_count(len(plan.events), 'event')}",
        f"scores: {scores}",
        "",
    ]
    last = max((e.step for e in plan.events), default=0)
    width = max(4, len(str(last)))
    lines.append(f"{'step':>{width}}  {'threshold':>9}  {'score':>7}  {'frozen':>6}  unit")
    done = 0
    for event in plan.events:
        first = True
        for unit in event.units:
            done += len(plan.units.get(unit, [unit]))
            step = f"{event.step:>{width}}  {event.threshold:9.4f}" if first else " " * (width + 11)
            score = _score(event.normalized_scores.get(unit, math.nan))
            lines.append(f"{step}  {score}  {done:>6}  {_unit(plan, unit)}")
            first = False
    if not plan.events:
        lines.append("(no adapter frozen)")
    all_units = plan.units or {a.name: [a.name] for a in plan.adapters}
    training = [u for u in all_units if not _all_frozen(plan, u)]
    if training:
        lines += ["", f"not frozen ({_count(len(training), 'unit')}):"]
        for unit in training:
            score = _score(plan.normalized_scores.get(unit, math.nan))
            lines.append(f"{'-':>{width}}  {'-':>9}  {score}  {'-':>6}  {_unit(plan, unit)}")
    return "\n".join(lines)


def _score(value: float) -> str:
    if not math.isfinite(value):
        return f"{'n/a':>7}"
    # Tiny scores are common (zero-initialized LoRA B): show them, not 0.0000.
    return f"{value:7.1e}" if 0 < abs(value) < 5e-5 else f"{value:7.4f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _unit(plan: FreezePlan, unit: str) -> str:
    members = plan.units.get(unit, [unit])
    return _escape(unit) if members == [unit] else f"{_escape(unit)} ({len(members)} adapters)"


def _all_frozen(plan: FreezePlan, unit: str) -> bool:
    frozen = plan.adapter_freeze_steps
    return all(a in frozen for a in plan.units.get(unit, [unit]))


# Escapes for the control characters a name is most likely to hold by accident.
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(text: str) -> str:
    r"""``text`` with every non-printable character escaped, so printing it is inert.

    Newlines, escape sequences, bidirectional overrides and lone surrogates (which
    would not even encode) become ``\n``, ``\x1b``, ``\u202e`` and so on.

    Example:
        >>> print(_escape("layer.0\x1b[2J\nforged row"))
        layer.0\x1b[2J\nforged row
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _ESCAPES.get(ch) or _code(ch) for ch in text)


def _code(ch: str) -> str:
    point = ord(ch)
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


# ---- safefreeze demo ----------------------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="plain LoRA vs SAFE on Rotten Tomatoes with pretrained MiniLM-L6 (CPU, under 4 min)",
        description=(
            "Fine-tune pretrained MiniLM-L6 with plain LoRA and with SAFE on Rotten Tomatoes snippets "
            "(same data, order, seed and settings), then compare accuracy, macro-F1, training FLOPs, "
            "bytes saved for backward, optimizer state and wall time, and list which blocks froze when. "
            "Logs both runs to MLflow when it is installed."
        ),
    )
    demo.add_argument(
        "--train-size",
        type=_positive,
        default=None,
        metavar="N",
        help="train on the first N training snippets (default: 4800, sized for minutes on two cores)",
    )
    demo.add_argument(
        "--epochs", type=_positive, default=None, help="passes over the training snippets (default: 1)"
    )
    demo.add_argument(
        "--limit",
        type=_positive,
        default=None,
        metavar="N",
        help="use only the first N snippets of each split",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--order",
        choices=("prefix", "score", "depth"),
        default=None,
        help="SAFEConfig.order: as many blocks as the threshold allows from the lowest up (the default), "
        "a lower prefix of low-scoring blocks, or every low scorer (the paper)",
    )
    demo.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    demo.set_defaults(func=_demo, parser=demo)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    demo = importlib.import_module("safefreeze.demo")
    task = demo.DEMO_TASK
    changes = {"train_size": args.train_size, "epochs": args.epochs, "limit": args.limit}
    task = dataclasses.replace(task, **{k: v for k, v in changes.items() if v is not None})
    try:
        demo.run_demo(task, seed=args.seed, order=args.order, mlflow=False if args.no_mlflow else None)
    except (ModuleNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from None
    return 0


# ---- safefreeze score ---------------------------------------------------------------------


def _add_score(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    score = commands.add_parser(
        "score",
        help="recompute adapter scores from an ONNX export on CPU and compare them with a plan's",
        description=(
            "Run MODEL (an .onnx file written by safefreeze.integrations.onnx.export_scored_model) "
            "with onnx's numpy reference evaluator over the batches in BATCHES (an .npz file written "
            "by save_batches: arrays '<batch>.<input>'), score every adapter with float64 CKA, and "
            "print the scores; with --plan, next to the plan's, flagging units whose rank differs "
            "(exit code 1)."
        ),
    )
    score.add_argument("model", metavar="MODEL", help="the exported .onnx file")
    score.add_argument("batches", metavar="BATCHES", help="the .npz file of batches")
    score.add_argument("--plan", help="plan JSON file whose scores to compare with")
    score.add_argument(
        "--max-rows",
        type=_rows,
        default=None,
        metavar="N",
        help="rows drawn per adapter and batch, or 'all' (default: the plan's max_tokens, else 64)",
    )
    score.add_argument(
        "--seed", type=int, default=None, help="row-drawing seed (default: the plan's, else 0)"
    )
    score.add_argument(
        "--runtime",
        choices=("reference", "onnxruntime"),
        default="reference",
        help="onnx.reference.ReferenceEvaluator (pure numpy, the default) or onnxruntime",
    )
    score.set_defaults(func=_score_command, parser=score)


def _rows(text: str) -> int | str:
    if text == "all":
        return text
    value = int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"expected 'all' or an integer >= 4, got {text}")
    return value


def _score_command(args: argparse.Namespace) -> int:
    reference = importlib.import_module("safefreeze.integrations.onnx")
    plan = FreezePlan.load(args.plan) if args.plan else None
    origin = "from the plan" if plan is not None else "default"
    max_rows = plan.config.max_tokens if plan is not None else 64
    seed = plan.config.seed if plan is not None else 0
    if args.max_rows is not None or args.seed is not None:
        origin = "given"
    if args.max_rows is not None:
        max_rows = None if args.max_rows == "all" else args.max_rows
    if args.seed is not None:
        seed = args.seed
    try:
        batches = reference.load_batches(args.batches)
        result = reference.reference_scores(
            args.model, batches, max_rows=max_rows, seed=seed, runtime=args.runtime
        )
    except (ValueError, KeyError, ModuleNotFoundError, reference.UnsupportedOperatorError) as err:
        raise CommandError(str(err)) from None
    rows = "all" if max_rows is None else max_rows
    print(f"reference scores (1 - CKA) over {len(batches)} batches, max_rows={rows} seed={seed} ({origin})")
    if plan is None:
        width = max(len(n) for n in result.scores)
        print(f"{'adapter':<{width}}  {'reference':>12}")
        for name, value in result.scores.items():
            print(f"{_escape(name):<{width}}  {value:>12.9f}")
        return 0
    try:
        ours = result.unit_scores(plan.units)
    except KeyError as err:
        raise CommandError(str(err.args[0])) from None
    theirs = {unit: plan.raw_scores.get(unit, math.nan) for unit in plan.units}
    ranks_ours, ranks_theirs = _freeze_ranks(ours), _freeze_ranks(theirs)
    width = max(len(n) for n in plan.units)
    label = "adapter" if all(len(m) == 1 and m[0] == u for u, m in plan.units.items()) else "unit"
    print(f"{label:<{width}}  {'reference':>12}  {'plan':>12}  {'rank':>4}  {'plan':>4}")
    differ = 0
    for unit in plan.units:
        flag = ranks_ours[unit] != ranks_theirs[unit]
        differ += flag
        print(
            f"{_escape(unit):<{width}}  {ours[unit]:>12.9f}  {theirs[unit]:>12.9f}  "
            f"{ranks_ours[unit]:>4}  {ranks_theirs[unit]:>4}{'  *' if flag else ''}"
        )
    gap = max(
        (abs(ours[u] - theirs[u]) for u in plan.units if not math.isnan(ours[u] - theirs[u])), default=0.0
    )
    print(f"largest score difference: {gap:.3g}")
    if differ:
        print(f"{differ} of {len(plan.units)} {label}s rank differently (marked *; rank 1 freezes first)")
        return 1
    print(f"ranking agrees for all {len(plan.units)} {label}s (rank 1 freezes first)")
    return 0


def _freeze_ranks(scores: dict[str, float]) -> dict[str, int]:
    """Rank 1 = lowest score (freezes first); NaN (never frozen) ranks last."""
    order = sorted(scores, key=lambda u: (math.isnan(scores[u]), scores[u]))
    return {unit: rank for rank, unit in enumerate(order, start=1)}


# Command groups, in the order `safefreeze --help` lists them. A new group is one
# `_add_<name>(commands)` function above, appended here.
_GROUPS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_plan,
    _add_demo,
    _add_score,
)


if __name__ == "__main__":
    sys.exit(main())
