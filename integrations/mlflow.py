"""MLflow tracking for SAFE: the plan as an artifact, the freeze timeline as metrics, replay by run id.

What goes where (MLflow params are write-once, so everything that evolves during training is
a metric, a tag or an artifact):

- params: every :class:`~safefreeze.SAFEConfig` field as ``safefreeze.<field>``, the
  adapter count as ``safefreeze.adapters`` and the warm-up steps between two scored ones
  (:attr:`~safefreeze.SAFEConfig.score_interval`) as ``safefreeze.score_interval``, logged once;
- metrics, one value per optimizer step: ``safefreeze/frozen_adapters``,
  ``safefreeze/trainable_adapter_params`` and ``safefreeze/threshold``; once, at the step the
  warm-up ended: ``safefreeze/score/<unit>`` (normalized) and ``safefreeze/raw_score/<unit>``;
- artifacts: ``safefreeze/plan.json`` (the :class:`~safefreeze.FreezePlan`) and
  ``safefreeze/freeze_timeline.png``;
- tags: ``safefreeze.plan = "true"``, ``safefreeze.plan_artifact`` (where the plan is),
  ``safefreeze.fingerprint``, and on a replay ``safefreeze.replayed_from = <source run id>``.

Nothing here sets a tracking URI: without ``tracking_uri=`` MLflow's own resolution applies
(``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory).

Every per-step value comes from the plan (:meth:`~safefreeze.FreezePlan.threshold_at`,
:meth:`~safefreeze.FreezePlan.trainable_params_at`, :meth:`~safefreeze.FreezePlan.frozen_adapters_at`)
and the picture from :func:`safefreeze.plots.save_timeline`; this module only translates them
into MLflow calls.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from safefreeze._optional import require

require("mlflow", "mlflow")  # a missing extra names `pip install 'safefreeze[mlflow]'`

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from safefreeze.controller import FreezeController  # noqa: E402
from safefreeze.distributed import is_main_process  # noqa: E402
from safefreeze.optimizer import SAFEOptimizer  # noqa: E402
from safefreeze.plan import FreezeEvent, FreezePlan, PlanError  # noqa: E402
from safefreeze.plots import save_timeline  # noqa: E402

__all__ = [
    "ARTIFACT_PATH",
    "METRIC_FROZEN",
    "METRIC_RAW_SCORE",
    "METRIC_SCORE",
    "METRIC_THRESHOLD",
    "METRIC_TRAINABLE",
    "PARAM_PREFIX",
    "PLAN_FILE",
    "TAG_FINGERPRINT",
    "TAG_PLAN",
    "TAG_PLAN_ARTIFACT",
    "TAG_REPLAYED_FROM",
    "TIMELINE_FILE",
    "ConfigConflictError",
    "MLflowFreezeLogger",
    "TrackingError",
    "load_plan",
    "log_plan",
    "tag_replay",
]

ARTIFACT_PATH = "safefreeze"
PLAN_FILE = "plan.json"
TIMELINE_FILE = "freeze_timeline.png"
PARAM_PREFIX = "safefreeze."
TAG_PLAN = "safefreeze.plan"
TAG_PLAN_ARTIFACT = "safefreeze.plan_artifact"
TAG_FINGERPRINT = "safefreeze.fingerprint"
TAG_REPLAYED_FROM = "safefreeze.replayed_from"
METRIC_FROZEN = "safefreeze/frozen_adapters"
METRIC_TRAINABLE = "safefreeze/trainable_adapter_params"
METRIC_THRESHOLD = "safefreeze/threshold"
METRIC_SCORE = "safefreeze/score/"
METRIC_RAW_SCORE = "safefreeze/raw_score/"

# MLflow's REST API takes at most 1000 metrics per log_batch request.
_BATCH = 1000
_T = TypeVar("_T")


class TrackingError(RuntimeError):
    """An MLflow call failed; the message names the tracking URI, the action and the cause."""


class ConfigConflictError(ValueError):
    """The run already holds SAFE params with other values; MLflow params are write-once."""


# ---- plans in runs ----------------------------------------------------------------------


def log_plan(
    plan: FreezePlan,
    *,
    run_id: str | None = None,
    artifact_path: str = ARTIFACT_PATH,
    tracking_uri: str | None = None,
) -> str:
    """Log ``plan`` to an MLflow run: config params, the JSON artifact and the plan tags.

    Params are write-once: a param that already holds the same value is skipped; one that
    holds another value raises :class:`ConfigConflictError` and nothing is logged.

    Args:
        plan: The plan to log, e.g. ``optimizer.plan``.
        run_id: The run to log into; default the active run.
        artifact_path: Artifact directory of the plan (``""`` for the run's root).
        tracking_uri: Where to log; default MLflow's own resolution.

    Returns:
        The plan's URI, ``runs:/<run_id>/<artifact_path>/plan.json``, which
        :func:`load_plan` reads.

    Raises:
        ValueError: If no run is given and none is active.
        ConfigConflictError: If the run holds SAFE params with other values.
        TrackingError: If an MLflow call fails.

    Example:
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     uri = log_plan(optimizer.plan)
    """
    uri = _resolve_uri(tracking_uri)
    run_id = run_id or _active_run_id(uri, "log_plan")
    client = _call(uri, "opening the tracking store", lambda: _client(uri))
    _log_params(client, uri, run_id, plan)
    path = _call(
        uri, f"logging the plan to run {run_id}", lambda: _log_plan(client, run_id, plan, artifact_path)
    )
    return f"runs:/{run_id}/{path}"


def load_plan(ref: str, *, tracking_uri: str | None = None) -> FreezePlan:
    """Load and validate the plan logged to an MLflow run.

    Args:
        ref: A run id (the plan is found through the ``safefreeze.plan_artifact`` tag), or a
            ``runs:/<run_id>[/<path>]`` URI whose path is the plan file or its directory.
        tracking_uri: Where the run is; default MLflow's own resolution.

    Returns:
        The plan, ready for ``SAFEOptimizer(inner, model, plan=...)``.

    Raises:
        ValueError: If ``ref`` is neither a run id nor a ``runs:/`` URI.
        PlanError: If the run carries no plan, or the artifact is corrupt, truncated or of
            another schema version.
        TrackingError: If the run or the artifact cannot be read.

    Example:
        >>> plan = load_plan("runs:/0f1e.../safefreeze/plan.json")  # doctest: +SKIP
    """
    run_id, path = _parse_ref(ref)
    uri = _resolve_uri(tracking_uri)
    _check_store_exists(uri)
    client = _call(uri, "opening the tracking store", lambda: _client(uri))
    if path is None:
        run = _call(uri, f"reading run {run_id}", lambda: client.get_run(run_id))
        tags = run.data.tags
        if tags.get(TAG_PLAN) != "true":
            raise PlanError(
                f"MLflow run {run_id} at {uri} carries no safefreeze plan (tag {TAG_PLAN!r} is not "
                "set); log one with log_plan() or MLflowFreezeLogger, or pass runs:/<run_id>/<path>"
            )
        path = tags.get(TAG_PLAN_ARTIFACT) or _join(ARTIFACT_PATH, PLAN_FILE)
    source = f"plan artifact runs:/{run_id}/{path}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            _call(uri, f"downloading {source}", lambda: client.download_artifacts(run_id, path, tmp))
        )
        if local.is_dir():
            raise PlanError(f"{source} is a directory, not a plan file; name the JSON file in the URI")
        raw = local.read_bytes()
    return FreezePlan.from_json(raw, source=source)


def tag_replay(source: str, *, run_id: str | None = None, tracking_uri: str | None = None) -> None:
    """Mark a run as the replay of the plan logged to ``source``.

    Sets the tag ``safefreeze.replayed_from`` to the source run id.

    Args:
        source: The run id or ``runs:/`` URI the plan was loaded from.
        run_id: The replaying run; default the active run.
        tracking_uri: Where the replaying run is; default MLflow's own resolution.

    Raises:
        ValueError: If ``source`` is not a run reference, or no run is given and none is active.
        TrackingError: If the MLflow call fails.
    """
    source_id, _ = _parse_ref(source)
    uri = _resolve_uri(tracking_uri)
    run_id = run_id or _active_run_id(uri, "tag_replay")
    client = _call(uri, "opening the tracking store", lambda: _client(uri))
    _call(uri, f"tagging run {run_id}", lambda: client.set_tag(run_id, TAG_REPLAYED_FROM, source_id))


# ---- the logger -------------------------------------------------------------------------


class MLflowFreezeLogger:
    """Log a SAFE run to MLflow while it trains; the plan and its timeline at the end.

    The logger subscribes to the engine's freeze events and, at each of them, logs every
    step not logged yet; :meth:`log_step` does the same on demand. Call it after
    ``optimizer.step()`` for live per-step metrics (the one extra line of a plain loop);
    without it the same values arrive in batches at each freeze and at :meth:`finish`.
    Every per-step value is a function of the plan and the step, so none is ever missed.

    Run: ``run_id=`` if given; else the active run (when logging to the active run's
    tracking URI); else a new run, started with ``mlflow.start_run`` (so your own
    ``mlflow.log_metric`` calls land in it) or, for another ``tracking_uri``, created through
    a client. :meth:`finish` ends only a run the logger started.

    Faults: by default an MLflow failure never stops training, from opening the store to
    ending the run. The first one is warned about (tracking URI, action, exception), logging
    stops, and :meth:`finish` saves the plan to a local file (:attr:`fallback_path`): the
    ``fallback_path=`` file, else, if that cannot be written, a file in the temporary
    directory; stderr and a warning say where it is. It then contacts MLflow once more: a run
    the logger started is ended as ``FAILED`` and gets the plan artifact, or, if MLflow is
    still unreachable, stderr and a warning say that the run stays ``RUNNING`` and name it.
    With ``strict=True`` the failure raises :class:`TrackingError`; the plan is still saved
    locally when :meth:`finish` runs. A local sqlite store that cannot be opened fails at
    once; over HTTP MLflow's own retries apply first: bound them with
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT``.

    Several processes may open a new sqlite store at once: its creation is serialized through
    a lock file beside it (``<store>.lock``).

    Under DDP or any multi-process launch only rank 0 logs
    (:func:`safefreeze.distributed.is_main_process`); other ranks do nothing.

    Args:
        source: The :class:`~safefreeze.SAFEOptimizer` or :class:`~safefreeze.FreezeController`.
        tracking_uri: Where to log; default MLflow's own resolution (``MLFLOW_TRACKING_URI``,
            else ``sqlite:///mlflow.db`` in the working directory). Never set globally.
        run_id: An existing run to log into.
        experiment_name: Experiment of a new run (created if missing); default MLflow's
            (``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME``, else Default).
        run_name: Name of a new run.
        artifact_path: Artifact directory of the plan and the timeline.
        replayed_from: Run id or ``runs:/`` URI of the plan this run replays; logged as the
            ``safefreeze.replayed_from`` tag.
        strict: Raise :class:`TrackingError` on MLflow failures instead of falling back.
        fallback_path: Where to save the plan if MLflow failed; default
            ``./safefreeze-plan-<run id or time>.json``.

    Raises:
        TypeError: If ``source`` is neither a SAFEOptimizer nor a FreezeController.
        ConfigConflictError: If the run already holds SAFE params with other values.
        TrackingError: With ``strict=True``, if starting or reading the run fails.

    Example:
        >>> with MLflowFreezeLogger(optimizer) as logger:  # doctest: +SKIP
        ...     for batch in loader:
        ...         model(**batch).loss.backward()
        ...         optimizer.step()
        ...         optimizer.zero_grad()
        ...         logger.log_step()
    """

    def __init__(
        self,
        source: SAFEOptimizer | FreezeController,
        *,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        artifact_path: str = ARTIFACT_PATH,
        replayed_from: str | None = None,
        strict: bool = False,
        fallback_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(source, SAFEOptimizer):
            source = source.controller
        if not isinstance(source, FreezeController):
            raise TypeError(
                f"MLflowFreezeLogger takes a SAFEOptimizer or a FreezeController, got {type(source).__name__}"
            )
        self.controller = source
        self.strict = strict
        self.artifact_path = artifact_path.strip("/")
        self.replayed_from = None if replayed_from is None else _parse_ref(replayed_from)[0]
        self.tracking_uri = _resolve_uri(tracking_uri)
        # Rank 0 logs; every other process of a multi-process launch does nothing.
        self.enabled = is_main_process()
        self.run_id: str | None = None
        # The first MLflow failure; once set, no further MLflow call is made until finish().
        self.error: Exception | None = None
        # Where finish() saved the plan after a failure.
        self.fallback_path: Path | None = None
        self._fallback_target = None if fallback_path is None else Path(fallback_path)
        self._owns_run = False
        self._fluent = False
        self._finished = False
        self._next_step = source.step
        self._scores_logged = False
        self._keys = _metric_keys(source.units)
        self._client: mlflow.MlflowClient | None = None
        # One bound method, so that unsubscribing finds the very object subscribed.
        self._callback: Callable[[FreezeEvent], None] | None = None
        if not self.enabled:
            return
        self._client = self._guard("opening the tracking store", lambda: _client(self.tracking_uri))
        client = self._client
        run = None
        if client is not None:
            run = self._guard(
                "starting the run", lambda: self._start(client, run_id, experiment_name, run_name)
            )
        if client is not None and run is not None:
            plan, tag = source.plan, self.replayed_from
            try:
                self._guard(
                    "logging the config params", lambda: _log_params(client, self.tracking_uri, run, plan)
                )
                if tag is not None:
                    self._guard("tagging the replay", lambda: client.set_tag(run, TAG_REPLAYED_FROM, tag))
            except BaseException:  # a config conflict, or strict: leave no run of ours open
                if self._owns_run:
                    with contextlib.suppress(Exception):
                        self._end_run(client, run, "FAILED")
                raise
        self._callback = self._on_freeze
        source.add_callback(self._callback)

    def log_step(self) -> None:
        """Log every step from the last one logged up to the engine's current step."""
        if not self._finished:
            self._flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Log the remaining steps, the plan artifact and the timeline; end the run if ours.

        After an MLflow failure, save the plan to :attr:`fallback_path` instead (printed to
        stderr and warned), then try MLflow once more to end a run the logger started as
        ``FAILED`` with the plan in it; if that fails too, say that the run stays
        ``RUNNING``. Calling it again does nothing.

        Args:
            status: End status of a run the logger started (``"FINISHED"``, ``"FAILED"``, ...).

        Raises:
            TrackingError: With ``strict=True``, if an MLflow call fails now (after the plan
                was saved locally).
        """
        if self._finished:
            return
        self._finished = True
        if self._callback is not None:
            self.controller.remove_callback(self._callback)
            self._callback = None
        if not self.enabled:
            return
        raised: TrackingError | None = None
        try:
            self._flush()
            run, client = self.run_id, self._client
            if run is not None and client is not None:
                plan, steps = self.controller.plan, self.controller.step
                self._guard("logging the plan", lambda: _log_plan(client, run, plan, self.artifact_path))
                self._guard(
                    "logging the freeze timeline", lambda: self._log_timeline(client, run, plan, steps)
                )
                if self._owns_run:
                    self._guard("ending the run", lambda: self._end_run(client, run, status))
        except TrackingError as err:  # strict: save the plan first, then raise
            raised = err
        if self.error is not None:
            self._save_fallback()
            self._close_failed_run()
        if raised is not None:
            raise raised

    def __enter__(self) -> MLflowFreezeLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
            return
        # Training already failed: end as FAILED, and never hide that error behind ours.
        with contextlib.suppress(TrackingError):
            self.finish(status="KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ---- internals --------------------------------------------------------------------

    def _start(
        self,
        client: mlflow.MlflowClient,
        run_id: str | None,
        experiment_name: str | None,
        run_name: str | None,
    ) -> str:
        """Pick or start the run; return its id."""
        fluent = self.tracking_uri == mlflow.get_tracking_uri()
        active = _active_id()
        if run_id is None and active is not None and fluent:
            run_id = active
        if run_id is None:
            experiment_id = None
            if experiment_name is not None:
                found = client.get_experiment_by_name(experiment_name)
                experiment_id = found.experiment_id if found else client.create_experiment(experiment_name)
            if fluent:  # the new run becomes the active one, so the user's own metrics go there too
                run_id = mlflow.start_run(experiment_id=experiment_id, run_name=run_name).info.run_id
            else:
                experiment_id = experiment_id or _default_experiment(client)
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            self._owns_run, self._fluent = True, fluent
        self.run_id = run_id
        return run_id

    def _end_run(self, client: mlflow.MlflowClient, run_id: str, status: str) -> None:
        if self._fluent and _active_id() == run_id:
            # end_run pops the run before contacting the server, so even when that fails the
            # process is free to start another run.
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)

    def _on_freeze(self, event: FreezeEvent) -> None:
        self._flush()

    def _flush(self) -> None:
        run, client = self.run_id, self._client
        if not self.enabled or run is None or client is None or self.error is not None:
            return
        first, last = self._next_step, self.controller.step
        if last < first:
            return
        metrics = self._metrics(first, last)
        self._next_step = last + 1
        for start in range(0, len(metrics), _BATCH):
            send = functools.partial(
                client.log_batch, run, metrics=metrics[start : start + _BATCH], synchronous=True
            )
            self._guard(f"logging the metrics of steps {first}..{last}", send)

    def _metrics(self, first: int, last: int) -> list[Metric]:
        """Per-step values of steps ``first..last``, and the final scores once they exist."""
        plan = self.controller.plan
        now = int(time.time() * 1000)
        metrics = []
        for step in range(first, last + 1):
            metrics += [
                Metric(METRIC_FROZEN, float(len(plan.frozen_adapters_at(step))), now, step),
                Metric(METRIC_TRAINABLE, float(plan.trainable_params_at(step)), now, step),
                Metric(METRIC_THRESHOLD, plan.threshold_at(step), now, step),
            ]
        if not self._scores_logged and plan.scored_at is not None:
            self._scores_logged = True
            for unit, key in self._keys.items():
                for prefix, scores in (
                    (METRIC_SCORE, plan.normalized_scores),
                    (METRIC_RAW_SCORE, plan.raw_scores),
                ):
                    value = scores.get(unit, math.nan)
                    if math.isfinite(value):  # a unit without a usable score has none to log
                        metrics.append(Metric(prefix + key, value, now, plan.scored_at))
        return metrics

    def _log_timeline(self, client: mlflow.MlflowClient, run_id: str, plan: FreezePlan, steps: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            png = save_timeline(plan, Path(tmp) / TIMELINE_FILE, steps=steps)
            client.log_artifact(run_id, str(png), self.artifact_path or None)

    def _guard(self, what: str, action: Callable[[], _T]) -> _T | None:
        """Run one MLflow action; on failure warn and stop logging, or raise when strict."""
        if self.error is not None:
            return None
        try:
            return action()
        except ConfigConflictError:
            raise
        except Exception as err:
            # A TrackingError from a shared helper already names the action: report its cause.
            if isinstance(err, TrackingError) and isinstance(err.__cause__, Exception):
                err = err.__cause__
            self.error = err
            message = f"MLflow logging to {self.tracking_uri} failed while {what}: {_describe(err)}"
            if self.strict:
                raise TrackingError(message) from err
            warnings.warn(
                f"{message}; training continues without MLflow, and finish() saves the plan to a local file",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def _save_fallback(self) -> None:
        """Save the plan to the fallback file, else to the temporary directory; say where."""
        plan = self.controller.plan
        name = f"safefreeze-plan-{self.run_id or time.strftime('%Y%m%d-%H%M%S')}.json"
        failed = ""
        target = self._fallback_target
        try:
            if target is None:
                target = Path.cwd() / name
            self.fallback_path = plan.save(target)
        except OSError as err:  # an unwritable directory: the temporary one is the last resort
            where = "the working directory" if target is None else str(target)
            failed = f" ({where} could not be written: {_describe(err)})"
            try:
                self.fallback_path = plan.save(Path(tempfile.gettempdir()) / name)
            except OSError as err2:
                failed += f"; nor could the temporary directory ({_describe(err2)})"
        head = f"safefreeze: MLflow logging to {self.tracking_uri} failed ({_describe(self.error)})"
        if self.fallback_path is None:  # nowhere to write: the plan goes to stderr
            _tell(f"{head}{failed}; the freeze plan follows on stderr")
            print(plan.to_json(), file=sys.stderr)
        else:
            _tell(f"{head}; the freeze plan was saved to {self.fallback_path}{failed}")

    def _close_failed_run(self) -> None:
        """After a failure, contact MLflow once more: end our run as FAILED, put the plan in it."""
        run, client = self.run_id, self._client
        if run is None or client is None:
            return
        if self._owns_run:
            try:
                self._end_run(client, run, "FAILED")
            except Exception as err:  # still unreachable: stop here, one failed call is enough
                _tell(
                    f"safefreeze: MLflow run {run} at {self.tracking_uri} stays RUNNING: ending it as "
                    f"FAILED failed too ({_describe(err)}); once MLflow is back, end it with "
                    f"mlflow.MlflowClient({self.tracking_uri!r}).set_terminated({run!r}, 'FAILED')"
                )
                return
        try:
            _log_plan(client, run, self.controller.plan, self.artifact_path)
        except Exception:
            return  # the plan is in the fallback file; the run simply has none
        ended = " was ended as FAILED and" if self._owns_run else ""
        _tell(
            f"safefreeze: MLflow at {self.tracking_uri} answered again: run {run}{ended} now holds the plan"
        )


# ---- helpers ----------------------------------------------------------------------------


def _resolve_uri(tracking_uri: str | None) -> str:
    # MLflow's own resolution (MLFLOW_TRACKING_URI, else its default store); never set here.
    return tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()


def _active_id() -> str | None:
    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def _active_run_id(uri: str, caller: str) -> str:
    run_id = _active_id()
    if run_id is None or uri != mlflow.get_tracking_uri():
        raise ValueError(
            f"{caller} needs a run: none is active at {uri}; start one with mlflow.start_run() "
            "or pass run_id=..."
        )
    return run_id


def _default_experiment(client: mlflow.MlflowClient) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"


def _call(uri: str, what: str, action: Callable[[], _T]) -> _T:
    try:
        return action()
    except Exception as err:
        raise TrackingError(f"MLflow at {uri} failed while {what}: {_describe(err)}") from err


def _describe(err: BaseException | None) -> str:
    return "" if err is None else f"{type(err).__name__}: {' '.join(str(err).split())}"


def _tell(message: str) -> None:
    """Say it on stderr, which a log keeps, and as a warning, which code can catch."""
    print(message, file=sys.stderr)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` store, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    return None if not path or path == ":memory:" else Path(path)


def _check_store_exists(uri: str) -> None:
    """Refuse to read from a sqlite store that does not exist (MLflow would create it)."""
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(
            f"no MLflow store at {uri}: {path} does not exist; set MLFLOW_TRACKING_URI or pass "
            "the tracking URI of the run"
        )


def _client(uri: str) -> mlflow.MlflowClient:
    """An MLflow client; a local sqlite store is checked first and created under a lock.

    MLflow retries opening a sqlite file for about 100 s (ten tries, doubling waits) before
    it gives up, so a file that cannot be opened is caught here first, in milliseconds. A new
    store is created (tables, then every schema migration) by the first client that opens
    it; two processes doing that at once break each other's migrations, so creation takes
    an exclusive lock on ``<store>.lock`` beside the database.
    """
    path = _sqlite_path(uri)
    if path is None:
        return mlflow.MlflowClient(uri)
    path.parent.mkdir(parents=True, exist_ok=True)  # what MLflow does first, failing at once
    with _store_lock(path):
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
                db.execute("PRAGMA schema_version")  # reads the header: garbage fails here too
        except sqlite3.Error as err:
            raise TrackingError(
                f"cannot open the MLflow store {uri}: {path} is not a readable, creatable sqlite "
                f"database ({_describe(err)}); pass another tracking_uri or set MLFLOW_TRACKING_URI"
            ) from err
        return mlflow.MlflowClient(uri)


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<db>.lock``; released when the file closes."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock, first use stays unserialized
        fcntl = None  # type: ignore[assignment]
    handle = None
    if fcntl is not None:
        # A store on a read-only medium can be read but gets no lock file; it is never created
        # or migrated by us either, so there is nothing to serialize.
        with contextlib.suppress(OSError):
            handle = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _parse_ref(ref: str) -> tuple[str, str | None]:
    """``(run_id, plan file path or None)`` of a run id or a ``runs:/`` URI."""
    if ref.startswith("runs:/"):
        match = re.fullmatch(r"runs:/([^/\s]+)(?:/(.*))?", ref)
        if match is None:
            raise ValueError(f"expected runs:/<run_id>[/<path>], got {ref!r}")
        path = (match.group(2) or "").strip("/")
        if not path:
            return match.group(1), None
        return match.group(1), path if path.endswith(".json") else _join(path, PLAN_FILE)
    if not ref or re.search(r"[/:\s]", ref):
        raise ValueError(f"expected an MLflow run id or a runs:/<run_id>[/<path>] URI, got {ref!r}")
    return ref, None


def _join(directory: str, name: str) -> str:
    return f"{directory.strip('/')}/{name}" if directory.strip("/") else name


def _config_params(plan: FreezePlan) -> dict[str, str]:
    params = {PARAM_PREFIX + key: str(value) for key, value in plan.config.to_dict().items()}
    params[PARAM_PREFIX + "adapters"] = str(len(plan.adapters))
    # The warm-up steps between two scored ones, as the config resolves score_every=None.
    params[PARAM_PREFIX + "score_interval"] = str(plan.config.score_interval)
    return params


def _same(logged: str, value: str) -> bool:
    if logged == value:
        return True
    try:  # 1 and 1.0 are the same tau_target
        return float(logged) == float(value)
    except ValueError:
        return False


def _log_params(client: mlflow.MlflowClient, uri: str, run_id: str, plan: FreezePlan) -> None:
    """Log the config params write-once: skip equal values, refuse changed ones."""
    params = _config_params(plan)
    logged = _call(uri, f"reading run {run_id}", lambda: client.get_run(run_id)).data.params
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and not _same(logged[k], v)}
    if changed:
        shown = "; ".join(f"{k}: logged {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigConflictError(
            f"MLflow run {run_id} already holds another SAFE config ({shown}); MLflow params are "
            "write-once: log this plan to a new run (mlflow.start_run(), or run_id=...)"
        )
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    if new:
        _call(
            uri,
            f"logging params to run {run_id}",
            lambda: client.log_batch(run_id, params=new, synchronous=True),
        )


def _log_plan(client: mlflow.MlflowClient, run_id: str, plan: FreezePlan, artifact_path: str) -> str:
    """Log the plan artifact, then the tags that point at it; return its artifact path."""
    path = _join(artifact_path, PLAN_FILE)
    client.log_dict(run_id, plan.to_dict(), path)
    tags = [
        RunTag(TAG_PLAN, "true"),
        RunTag(TAG_PLAN_ARTIFACT, path),
        RunTag(TAG_FINGERPRINT, plan.fingerprint),
    ]
    client.log_batch(run_id, tags=tags, synchronous=True)
    return path


def _metric_keys(units: Iterable[str]) -> dict[str, str]:
    """A valid, unique MLflow metric-name suffix per freeze unit."""
    keys: dict[str, str] = {}
    for unit in units:
        # MLflow accepts [\w.\- /] (and ':' except on Windows); paths must stay normal.
        key = re.sub(r"[^\w.\- /]", "_", unit)
        key = "/".join(p for p in key.split("/") if p not in ("", ".", ".."))[:200] or "_"
        base, n = key, 1
        while key in keys.values():
            n += 1
            key = f"{base}_{n}"
        keys[unit] = key
    return keys
