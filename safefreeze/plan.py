"""``FreezePlan``: what was frozen, when and why, as versioned JSON that can be replayed.

Plans come from files, MLflow runs and checkpoints, so a plan document is untrusted input:
it is parsed with every JSON extension refused (``NaN``, ``Infinity``, huge integers,
duplicate keys), migrated from older schema versions, then validated field by field. Every
problem is a :class:`PlanError` naming the field path, what was expected and what was seen.
Nothing in a plan is ever executed, unpickled, or matched as a regular expression.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from safefreeze.config import SAFEConfig
from safefreeze.schedule import cubic_threshold
from safefreeze.selection import group_units

SCHEMA = "safefreeze.plan"
# Bump on every change of the plan or checkpoint layout, with a migration in _MIGRATIONS and
# a fixture tests/data/plans/v<N>.json (see docs/plans.md).
SCHEMA_VERSION = 6

# Integers in a plan (steps, shape dims, byte counts) are below 2**63, as in a C int64.
_INT_LIMIT = 2**63
# Longer integer literals are refused while parsing: int() of them is slow, or refused past
# 4300 digits. 20 characters hold every int64 with its sign.
_INT_DIGITS = 20


class PlanError(ValueError):
    """A plan file or document that cannot be read: corrupt, truncated or of another version."""


class PlanMismatchError(PlanError):
    """A plan that does not fit the model it is replayed onto."""


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """An adapter as the plan knows it: its name and its parameters' names and shapes."""

    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": [[n, list(s)] for n, s in self.params]}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "adapter record") -> AdapterRecord:
        """Build a record from :meth:`to_dict` output.

        Raises:
            PlanError: If a name is not a string or a shape not a list of non-negative ints.
        """
        try:
            return _read_adapter(data, "")
        except _Damage as err:
            raise err.error(source) from None


@dataclasses.dataclass(frozen=True)
class FreezeEvent:
    """One freezing step.

    Scores are those of the frozen units only; the plan holds every unit's score.
    """

    # Optimizer steps completed when the freeze took effect.
    step: int
    # Freeze units frozen at this step (adapter names, or group names with group_by).
    units: tuple[str, ...]
    # Adapter names frozen at this step.
    adapters: tuple[str, ...]
    # The threshold tau(step) that the units' normalized scores fell below.
    threshold: float
    # Raw importance (1 - CKA) of each frozen unit.
    raw_scores: Mapping[str, float]
    # Normalized importance of each frozen unit.
    normalized_scores: Mapping[str, float]
    # Parameter elements that stopped training.
    params_freed: int
    # Bytes of optimizer state deleted.
    state_bytes_freed: int

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["units"], data["adapters"] = list(self.units), list(self.adapters)
        data["threshold"] = _encode_float(self.threshold)
        data["raw_scores"] = _encode_scores(self.raw_scores)
        data["normalized_scores"] = _encode_scores(self.normalized_scores)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "freeze event") -> FreezeEvent:
        """Build an event from :meth:`to_dict` output, checking every field's type and range.

        Raises:
            PlanError: If a field is missing or holds a value of the wrong kind.
        """
        try:
            return _read_event(data, "")
        except _Damage as err:
            raise err.error(source) from None


@dataclasses.dataclass
class FreezePlan:
    """A record of a SAFE run that a second run can replay without scoring.

    Example:
        >>> plan = FreezePlan(config=SAFEConfig(), adapters=[AdapterRecord("a", (("a.w", (2, 3)),))])
        >>> plan.units  # units by config.units: "a" names no block, so it is its own
        {'a': ['a']}
        >>> FreezePlan.from_json(plan.to_json()) == plan
        True
    """

    config: SAFEConfig
    adapters: list[AdapterRecord]
    events: list[FreezeEvent] = dataclasses.field(default_factory=list)
    # Freeze unit name -> adapter names; left empty, grouped as config.units and config.group_by say.
    units: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # Finalized scores per unit, set at the end of the warm-up.
    raw_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    normalized_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    # Step at which scores were finalized (None before).
    scored_at: int | None = None
    # Schema version of the document this plan was migrated from when read (None if it was
    # read at SCHEMA_VERSION or built in memory). Never written.
    migrated_from: int | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.units:
            self.units = group_units([a.name for a in self.adapters], self.config.units, self.config.group_by)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the adapters' names and parameter shapes."""
        return fingerprint(self.adapters)

    @property
    def unit_freeze_steps(self) -> dict[str, int]:
        """Freeze unit -> step at which it was frozen, in freeze order.

        Example:
            >>> _example_plan().unit_freeze_steps
            {'b': 3}
        """
        return {unit: event.step for event in self.events for unit in event.units}

    @property
    def adapter_freeze_steps(self) -> dict[str, int]:
        """Adapter name -> step at which it was frozen, in freeze order.

        Example:
            >>> _example_plan().adapter_freeze_steps
            {'b': 3}
        """
        return {name: event.step for event in self.events for name in event.adapters}

    def frozen_adapters_at(self, step: int) -> list[str]:
        """Adapters frozen at or before ``step``, in model order.

        Example:
            >>> plan = _example_plan()
            >>> plan.frozen_adapters_at(2), plan.frozen_adapters_at(3)
            ([], ['b'])
        """
        frozen = self.adapter_freeze_steps
        return [a.name for a in self.adapters if a.name in frozen and frozen[a.name] <= step]

    def trainable_params_at(self, step: int) -> int:
        """Parameter elements of the adapters that still train at ``step``.

        Counted from the recorded shapes; parameters outside the adapters are not counted.

        Example:
            >>> plan = _example_plan()  # two adapters of 2 x 3 elements
            >>> plan.trainable_params_at(2), plan.trainable_params_at(3)
            (12, 6)
        """
        frozen = set(self.frozen_adapters_at(step))
        return sum(math.prod(shape) for a in self.adapters if a.name not in frozen for _, shape in a.params)

    def threshold_at(self, step: int) -> float:
        """The cubic threshold ``tau(step)`` under the plan's config.

        Example:
            >>> plan = _example_plan()  # warm-up 2 steps, tau_T = 0.5 reached at step 4
            >>> [plan.threshold_at(t) for t in (1, 3, 4)]
            [0.0, 0.4375, 0.5]
        """
        cfg = self.config
        return cubic_threshold(
            step,
            warmup_steps=cfg.warmup_steps,
            freeze_end_step=cfg.freeze_end_step,
            tau_target=cfg.tau_target,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-friendly dict (NaN scores and thresholds become ``None``)."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "config": self.config.to_dict(),
            "model": {
                "fingerprint": self.fingerprint,
                "adapters": [a.to_dict() for a in self.adapters],
            },
            "units": {k: list(v) for k, v in self.units.items()},
            "scores": {
                "scored_at": self.scored_at,
                "raw": _encode_scores(self.raw_scores),
                "normalized": _encode_scores(self.normalized_scores),
            },
            "events": [e.to_dict() for e in self.events],
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> FreezePlan:
        """Migrate, validate and build a plan from :meth:`to_dict` output of any version.

        Args:
            data: The document, e.g. ``json.loads`` output or a checkpoint's ``"plan"``.
            source: What the document is, for error messages ("plan file 'x.json'").

        Returns:
            The plan; ``migrated_from`` says which older version it was read from.

        Raises:
            PlanError: If the document is not a safefreeze plan, is of a newer schema
                version, cannot be migrated, or any field is missing, of the wrong kind,
                out of range or inconsistent with the others (the message names its path).
        """
        current = migrate(data, source=source)
        try:
            plan = _read_plan(current)
        except _Damage as err:
            raise err.error(source) from None
        if data["version"] != SCHEMA_VERSION:
            plan.migrated_from = data["version"]
        return plan

    def to_json(self) -> str:
        """Serialize to a JSON string (standard JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> FreezePlan:
        """Parse :meth:`to_json` output of any schema version.

        Args:
            text: The JSON, as text or as UTF-8 bytes.
            source: What the text is, for error messages.

        Raises:
            PlanError: If ``text`` is not UTF-8 JSON, uses ``NaN``/``Infinity``, huge numbers,
                duplicate keys or nesting too deep for a plan, or is not a valid plan.
        """
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PlanError(
                    f"{source} is not a JSON text (byte {err.start} is not UTF-8; a pickle or other "
                    f"binary file?); a plan is the JSON written by FreezePlan.save"
                ) from None
        return cls.from_dict(_parse_json(text, source), source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically and return its path.

        The JSON goes to a temporary file beside ``path`` that is synced and renamed over
        it, so a crash leaves either the old file or the new one, never half a file, and a
        failed save leaves no temporary file behind. A process killed mid-save leaves its
        temporary file; the next save to the same ``path`` deletes it once its writer (whose
        pid the name holds) is gone.
        """
        target = Path(path)
        text = self.to_json()
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_temps(target)
        # open(..., "x") rather than mkstemp: the file gets the umask's mode, not 0600.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FreezePlan:
        """Read a plan written by :meth:`save`, of this or an older schema version.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            PlanError: If the file is not UTF-8 JSON (a pickle is refused, never loaded),
                is truncated or corrupt, is of a newer schema version, or is damaged.
        """
        return cls.from_json(Path(path).read_bytes(), source=f"plan file {os.fspath(path)!r}")

    def check_matches(self, adapters: Sequence[AdapterRecord]) -> None:
        """Raise :class:`PlanMismatchError` naming how ``adapters`` differ from the plan's."""
        if fingerprint(adapters) == self.fingerprint:
            return
        mine = {a.name: a for a in self.adapters}
        theirs = {a.name: a for a in adapters}
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        problems = []
        if missing:
            problems.append(f"{len(missing)} adapter(s) in the plan are not in the model, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} adapter(s) in the model are not in the plan, e.g. {extra[:3]}")
        changed = [name for name in mine if name in theirs and mine[name].params != theirs[name].params]
        if changed:
            name = changed[0]
            problems.append(
                f"{len(changed)} adapter(s) have other parameters, e.g. adapter {name!r} has "
                f"{_show(theirs[name])} in the model but {_show(mine[name])} in the plan"
            )
        if not problems:
            problems.append("the adapters are listed in a different order")
        raise PlanMismatchError("the freeze plan does not fit this model: " + "; ".join(problems))


def fingerprint(adapters: Iterable[AdapterRecord]) -> str:
    """SHA-256 over adapter names and their parameters' names and shapes, in order."""
    payload = json.dumps([a.to_dict() for a in adapters], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _show(record: AdapterRecord) -> str:
    prefix = record.name.partition(":")[0] + "."
    return ", ".join(f"{n.removeprefix(prefix)}{list(s)}" for n, s in record.params)


def _example_plan() -> FreezePlan:
    """Two adapters of one 2 x 3 parameter each; ``b`` froze at step 3 (for doctests)."""
    adapters = [AdapterRecord(n, ((f"{n}.w", (2, 3)),)) for n in ("a", "b")]
    event = FreezeEvent(3, ("b",), ("b",), 0.4375, {"b": 0.1}, {"b": 0.2}, 6, 48)
    config = SAFEConfig(warmup_steps=2, freeze_end_step=4, tau_target=0.5)
    return FreezePlan(config, adapters, [event], scored_at=2)


# ---- schema versions ----------------------------------------------------------------------


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 2 added ``config.order`` and requires ``units``: fill both as version 1 behaved."""
    new = dict(doc, version=2)
    config = doc.get("config")
    if isinstance(config, dict) and "order" not in config:
        new["config"] = {**config, "order": "score"}  # version 1 froze the lowest scores first
    if doc.get("units") == {}:
        new["units"] = _identity_units(doc)
    return new


def _identity_units(doc: dict[str, Any]) -> dict[str, list[str]]:
    """One unit per adapter, as version 1 meant by empty units; not derivable with group_by."""
    config = _object(_get(doc, "config", ""), "config")
    group_by = _get(config, "group_by", "config")
    if group_by is not None:
        raise _Damage(
            "units",
            f"its units are not recorded and config.group_by is {_seen(group_by)}, so they are not "
            "one per adapter; re-record the plan",
        )
    model = _object(_get(doc, "model", ""), "model")
    adapters = _list(_get(model, "adapters", "model"), "model.adapters")
    names = [
        _name(
            _get(_object(a, f"model.adapters[{i}]"), "name", f"model.adapters[{i}]"),
            f"model.adapters[{i}].name",
        )
        for i, a in enumerate(adapters)
    ]
    return {name: [name] for name in names}


def _v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 3 added ``config.units`` and ``config.merge``: one unit per adapter, no merging."""
    new = dict(doc, version=3)
    config = doc.get("config")
    if isinstance(config, dict):
        new["config"] = {"units": "adapter", "merge": False, **config}
    return new


def _v3_to_v4(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 4 lets ``config.score_every`` be null (chosen by the rule); before, unset meant 1."""
    new = dict(doc, version=4)
    config = doc.get("config")
    if isinstance(config, dict):
        new["config"] = {"score_every": 1, **config}
    return new


def _v4_to_v5(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 5 added ``config.eval_frozen``; before, frozen units kept their dropout."""
    new = dict(doc, version=5)
    config = doc.get("config")
    if isinstance(config, dict):
        new["config"] = {"eval_frozen": False, **config}
    return new


def _v5_to_v6(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 6 lets ``config.eval_frozen`` be ``"attention"``; a version-5 value stays as it is."""
    return dict(doc, version=6)


# Migrations in order: _MIGRATIONS[n - 1] turns a version-n document into version n + 1.
# Each returns a new dict and leaves its input untouched.
_MIGRATIONS: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (
    _v1_to_v2,
    _v2_to_v3,
    _v3_to_v4,
    _v4_to_v5,
    _v5_to_v6,
)


def migrate(data: Any, *, source: str) -> dict[str, Any]:
    """Bring a plan document of any known schema version to :data:`SCHEMA_VERSION`.

    Migrations only fill what an older version did not record, with the value that
    reproduces the old behaviour; the result still needs validating (:meth:`FreezePlan.from_dict`
    does both). ``data`` is never modified.

    Args:
        data: A plan document (``FreezePlan.to_dict`` output of any version).
        source: What the document is, for error messages.

    Returns:
        A new dict at the current version.

    Raises:
        PlanError: If ``data`` is not a safefreeze plan, has no valid version, is newer than
            this safefreeze reads, or lacks what a migration needs.

    Example:
        >>> old = {"schema": "safefreeze.plan", "version": 1, "config": {"group_by": None}}
        >>> new = migrate(old, source="plan")
        >>> new["version"], new["config"]["order"], new["config"]["units"], "order" in old["config"]
        (6, 'score', 'adapter', False)
    """
    if not isinstance(data, dict):
        raise PlanError(
            f"{source} is not a safefreeze plan: expected schema {SCHEMA!r}, got {type(data).__name__!r}"
        )
    if data.get("schema") != SCHEMA:
        seen = _seen(data["schema"]) if "schema" in data else "no 'schema' field"
        raise PlanError(f"{source} is not a safefreeze plan: expected schema {SCHEMA!r}, got {seen}")
    version = data.get("version")
    if not _is_int(version) or version < 1:
        seen = _seen(version) if "version" in data else "no 'version' field"
        raise PlanError(
            f"{source} is damaged: version: expected a plan schema version from 1 to "
            f"{SCHEMA_VERSION}, got {seen}"
        )
    if version > SCHEMA_VERSION:
        raise PlanError(
            f"{source} has plan schema version {_seen(version)}; this safefreeze reads versions up "
            f"to {SCHEMA_VERSION}; upgrade safefreeze to read it"
        )
    doc = dict(data)
    try:
        for step in _MIGRATIONS[version - 1 :]:
            doc = step(doc)
    except _Damage as err:
        raise PlanError(
            f"{source} cannot be migrated from plan schema version {version} to {SCHEMA_VERSION}: "
            f"{err.where}{err.what}"
        ) from None
    return doc


def check_frozen_matches_events(frozen: object, plan: FreezePlan, *, source: str) -> None:
    """Check a version-1 checkpoint's ``frozen`` map (unit -> step) against its plan's events.

    Version 1 checkpoints stored the frozen units twice, in ``frozen`` and in the plan's
    events; version 2 keeps the events only, so the two must agree before ``frozen`` is dropped.

    Args:
        frozen: The checkpoint's ``frozen`` value.
        plan: The checkpoint's plan, already read with :meth:`FreezePlan.from_dict`.
        source: What the checkpoint is, for error messages.

    Raises:
        PlanError: If ``frozen`` is not a map of unit names to steps, or differs from
            ``plan.unit_freeze_steps``.
    """
    try:
        steps = {
            _name(unit, f"frozen[{_seen(unit)}]"): _integer(step, f"frozen[{_seen(unit)}]", minimum=1)
            for unit, step in _object(frozen, "frozen").items()
        }
    except _Damage as err:
        raise err.error(source) from None
    expected = plan.unit_freeze_steps
    if steps == expected:
        return
    extra = [u for u in steps if u not in expected]
    missing = [u for u in expected if u not in steps]
    moved = [u for u in steps if u in expected and steps[u] != expected[u]]
    problems = []
    if extra:
        problems.append(f"{len(extra)} unit(s) that no event freezes, e.g. {extra[:3]}")
    if missing:
        problems.append(f"{len(missing)} unit(s) missing that the events freeze, e.g. {missing[:3]}")
    if moved:
        unit = moved[0]
        problems.append(
            f"{len(moved)} unit(s) at another step, e.g. {unit!r} at step {steps[unit]} but its "
            f"event at step {expected[unit]}"
        )
    raise PlanError(
        f"{source} is damaged: frozen: expected the units and steps its plan's events freeze, got "
        + "; ".join(problems)
    )


# ---- parsing ------------------------------------------------------------------------------


def _parse_json(text: str, source: str) -> Any:
    """``json.loads`` that accepts standard JSON only and raises :class:`PlanError` for the rest."""
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_keys,
        )
    except _Damage as err:
        raise err.error(source) from None
    except json.JSONDecodeError as err:
        raise PlanError(f"{source} is not valid JSON (truncated or corrupt?): {err}") from None
    except RecursionError:
        raise PlanError(
            f"{source} is not a safefreeze plan: its JSON nests deeper than the parser allows "
            "(a plan nests 6 levels)"
        ) from None


def _refuse_constant(name: str) -> Any:
    raise _Damage("", f"expected standard JSON numbers, got the constant {name} (NaN scores are null)")


def _parse_int(literal: str) -> int:
    if len(literal) > _INT_DIGITS:
        raise _Damage("", f"expected integers below 2**63, got an integer of {len(literal)} digits")
    return int(literal)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e999 overflows to inf
        shown = literal if len(literal) <= 30 else f"{literal[:20]}... ({len(literal)} characters)"
        raise _Damage("", f"expected finite numbers, got {shown}, which overflows a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:  # json.loads would keep the last silently
            raise _Damage("", f"expected each key once in an object, got {_seen(key)} twice")
        data[key] = value
    return data


# ---- validation: one reader per kind of value ---------------------------------------------


class _Damage(Exception):
    """A bad value at a field path; the public entry point adds the source (a :class:`PlanError`)."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(path, what)
        self.path, self.what = path, what

    @property
    def where(self) -> str:
        return f"{self.path}: " if self.path else ""

    def error(self, source: str) -> PlanError:
        return PlanError(f"{source} is damaged: {self.where}{self.what}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _seen(value: object) -> str:
    """A short description of a value for an error message, never a huge or recursive repr."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**20 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 200 else f"{value[:200]!r}... ({len(value)} characters)"
    if isinstance(value, list):
        return f"a list of {len(value)}" if value else "an empty list"
    if isinstance(value, dict):
        return f"an object of {len(value)} fields" if value else "an empty object"
    return f"a {type(value).__name__}"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise _Damage(path, f"missing field {key!r}")
    return obj[key]


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Damage(path, f"expected an object, got {_seen(value)}")
    return value


def _list(value: Any, path: str, *, what: str = "a list", nonempty: bool = False) -> list[Any]:
    if not isinstance(value, list) or (nonempty and not value):
        raise _Damage(path, f"expected {what}, got {_seen(value)}")
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Damage(path, f"expected a name (a non-empty string), got {_seen(value)}")
    return value


def _names(value: Any, path: str) -> list[str]:
    """A non-empty list of names, each once."""
    items = _list(value, path, what="a non-empty list of names", nonempty=True)
    names = [_name(v, f"{path}[{i}]") for i, v in enumerate(items)]
    _check_unique(names, path, "name")
    return names


def _check_unique(names: Sequence[str], path: str, what: str, suffix: str = "") -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise _Damage(f"{path}[{i}]{suffix}", f"expected each {what} once, got {_seen(name)} twice")
        seen.add(name)


def _integer(value: Any, path: str, *, minimum: int) -> int:
    """An int (not a bool) in ``[minimum, 2**63)``: steps have minimum 1, counts 0."""
    kind = "a positive integer" if minimum == 1 else "a non-negative integer"
    if not _is_int(value) or value < minimum:
        raise _Damage(path, f"expected {kind}, got {_seen(value)}")
    if value >= _INT_LIMIT:
        raise _Damage(path, f"expected {kind} below 2**63, got {_seen(value)}")
    return int(value)


def _score(value: Any, path: str) -> float:
    """A score or threshold: a finite number >= 0, or null for NaN (no score)."""
    if value is None:
        return math.nan
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or value < 0:
        raise _Damage(path, f"expected a finite number >= 0 or null, got {_seen(value)}")
    return float(value)


def _scores(value: Any, path: str, units: Collection[str], whose: str) -> dict[str, float]:
    """Unit name -> score, for units in ``units`` only (``whose`` says which those are)."""
    scores = {}
    for unit, score in _object(value, path).items():
        where = f"{path}[{_seen(unit)}]"
        if unit not in units:
            raise _Damage(where, f"expected a score for a unit of {whose}, got unit {_seen(unit)}")
        scores[unit] = _score(score, where)
    return scores


def _read_adapter(value: Any, path: str) -> AdapterRecord:
    record = _object(value, path)
    name = _name(_get(record, "name", path), _at(path, "name"))
    params_path = _at(path, "params")
    params = []
    for i, param in enumerate(_list(_get(record, "params", path), params_path)):
        where = f"{params_path}[{i}]"
        if not isinstance(param, list) or len(param) != 2:
            raise _Damage(where, f"expected a [name, shape] pair, got {_seen(param)}")
        shape = _list(param[1], f"{where}[1]", what="a shape (a list of dims)")
        dims = tuple(_integer(d, f"{where}[1][{j}]", minimum=0) for j, d in enumerate(shape))
        params.append((_name(param[0], f"{where}[0]"), dims))
    return AdapterRecord(name=name, params=tuple(params))


def _read_event(value: Any, path: str, units: Collection[str] | None = None) -> FreezeEvent:
    """One event; its scores must be of its own units, and these of ``units`` if given."""
    event = _object(value, path)

    def field(key: str) -> tuple[Any, str]:
        return _get(event, key, path), _at(path, key)

    step = _integer(*field("step"), minimum=1)
    frozen = _names(*field("units"))
    if units is not None:
        for i, unit in enumerate(frozen):
            if unit not in units:
                where = f"{_at(path, 'units')}[{i}]"
                raise _Damage(where, f"expected a unit of the plan, got {_seen(unit)}")
    return FreezeEvent(
        step=step,
        units=tuple(frozen),
        adapters=tuple(_names(*field("adapters"))),
        threshold=_score(*field("threshold")),
        raw_scores=_scores(*field("raw_scores"), set(frozen), "this event"),
        normalized_scores=_scores(*field("normalized_scores"), set(frozen), "this event"),
        params_freed=_integer(*field("params_freed"), minimum=0),
        state_bytes_freed=_integer(*field("state_bytes_freed"), minimum=0),
    )


def _read_config(value: Any, path: str) -> SAFEConfig:
    config = _object(value, path)
    fields = [f.name for f in dataclasses.fields(SAFEConfig)]
    for key in config:
        if key not in fields:
            raise _Damage(_at(path, key), f"expected a field of SAFEConfig {fields}, got an unknown field")
    # Every field is required: a default silently standing in would change the replay.
    for key in fields:
        value = _get(config, key, path)
        if isinstance(value, (list, dict)):
            raise _Damage(_at(path, key), f"expected a number, a string or null, got {_seen(value)}")
        if _is_int(value) and abs(value) >= _INT_LIMIT:
            raise _Damage(_at(path, key), f"expected an integer below 2**63, got {_seen(value)}")
    try:
        return SAFEConfig.from_dict(config)
    except (TypeError, ValueError, OverflowError, RecursionError) as err:
        # SAFEConfig's messages name the bad field first ("requires freeze_end_step >= warmup_steps").
        message = str(err)
        named = [(message.find(k), k) for k in fields if re.search(rf"\b{k}\b", message)]
        raise _Damage(_at(path, min(named)[1]) if named else path, message) from None


def _read_units(value: Any, path: str, adapters: Sequence[AdapterRecord]) -> dict[str, list[str]]:
    """Unit -> adapters; every listed adapter in exactly one unit."""
    listed = {a.name for a in adapters}
    owner: dict[str, str] = {}
    units = {}
    for unit, members in _object(value, path).items():
        where = f"{path}[{_seen(_name(unit, path))}]"
        names = _names(members, where)
        for i, name in enumerate(names):
            if name not in listed:
                raise _Damage(f"{where}[{i}]", f"expected an adapter of model.adapters, got {_seen(name)}")
            if name in owner:
                raise _Damage(
                    f"{where}[{i}]",
                    f"expected each adapter in one unit, got {_seen(name)} in unit {_seen(owner[name])} too",
                )
            owner[name] = unit
        units[unit] = names
    lost = [_seen(a.name) for a in adapters if a.name not in owner]
    if lost:
        raise _Damage(
            path, f"expected every adapter in a unit, got {len(lost)} in none: {', '.join(lost[:3])}"
        )
    return units


def _read_plan(doc: dict[str, Any]) -> FreezePlan:
    """Validate a current-version document field by field, then across fields."""
    model = _object(_get(doc, "model", ""), "model")
    adapters = [
        _read_adapter(a, f"model.adapters[{i}]")
        for i, a in enumerate(_list(_get(model, "adapters", "model"), "model.adapters"))
    ]
    _check_unique([a.name for a in adapters], "model.adapters", "adapter", ".name")
    recorded = _get(model, "fingerprint", "model")
    actual = fingerprint(adapters)
    if recorded != actual:
        seen = f"{recorded[:12]}..." if isinstance(recorded, str) else _seen(recorded)
        raise _Damage(
            "model.fingerprint",
            f"expected {actual[:12]}..., the hash of model.adapters, got {seen}; the adapter list "
            "was edited or the file corrupted",
        )
    config = _read_config(_get(doc, "config", ""), "config")
    units = _read_units(_get(doc, "units", ""), "units", adapters)
    scores = _object(_get(doc, "scores", ""), "scores")
    scored_at = _get(scores, "scored_at", "scores")
    plan = FreezePlan(
        config=config,
        adapters=adapters,
        units=units,
        raw_scores=_scores(_get(scores, "raw", "scores"), "scores.raw", units, "the plan"),
        normalized_scores=_scores(
            _get(scores, "normalized", "scores"), "scores.normalized", units, "the plan"
        ),
        # finalize_scores() may run before the first step: scores can be final at step 0.
        scored_at=None if scored_at is None else _integer(scored_at, "scores.scored_at", minimum=0),
    )
    for i, value in enumerate(_list(_get(doc, "events", ""), "events")):
        plan.events.append(_read_event(value, f"events[{i}]", units))
    _check_events(plan)
    return plan


def _check_events(plan: FreezePlan) -> None:
    """Events in increasing step order, each unit frozen once, adapters those of the units."""
    frozen_at: dict[str, int] = {}
    previous = 0
    for i, event in enumerate(plan.events):
        path = f"events[{i}]"
        if event.step <= previous:
            raise _Damage(
                f"{path}.step",
                f"expected a step after {previous} (events in increasing step order, one per step), "
                f"got {event.step}",
            )
        previous = event.step
        for j, unit in enumerate(event.units):
            if unit in frozen_at:
                raise _Damage(
                    f"{path}.units[{j}]",
                    f"expected a unit not frozen yet, got {_seen(unit)}, frozen at step {frozen_at[unit]}",
                )
            frozen_at[unit] = event.step
        expected = [a for u in event.units for a in plan.units[u]]
        got = list(event.adapters)
        if got != expected:
            # The first position where they differ; past the end of a list, the end is "seen".
            j = next(
                (j for j, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                min(len(got), len(expected)),
            )
            want = _seen(expected[j]) if j < len(expected) else "the end of the list"
            seen = _seen(got[j]) if j < len(got) else "the end of the list"
            raise _Damage(
                f"{path}.adapters[{j}]",
                f"expected {want} (the adapters of the event's units, in order), got {seen}",
            )


# ---- writing ------------------------------------------------------------------------------


def _remove_orphaned_temps(target: Path) -> None:
    """Delete temporary files of saves to ``target`` whose writing process has died."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process on POSIX only
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([1-9][0-9]{{0,9}})\.[0-9a-f]{{12}}\.tmp")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match.group(1))):
            Path(entry.path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not a pid at all
        return True
    return True


def _encode_float(value: float) -> float | None:
    """JSON has no NaN or Inf: a non-finite value is written as null."""
    return float(value) if math.isfinite(value) else None


def _encode_scores(scores: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _encode_float(v) for k, v in scores.items()}
