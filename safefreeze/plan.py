"""``FreezePlan``: what was frozen, when and why, as versioned JSON that can be replayed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safefreeze.config import SAFEConfig

SCHEMA = "safefreeze.plan"
SCHEMA_VERSION = 1


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
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterRecord:
        return cls(
            name=str(data["name"]),
            params=tuple((str(n), tuple(int(d) for d in s)) for n, s in data["params"]),
        )


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
    def from_dict(cls, data: Mapping[str, Any]) -> FreezeEvent:
        return cls(
            step=int(data["step"]),
            units=tuple(data["units"]),
            adapters=tuple(data["adapters"]),
            threshold=_decode_float(data["threshold"]),
            raw_scores=_decode_scores(data["raw_scores"]),
            normalized_scores=_decode_scores(data["normalized_scores"]),
            params_freed=int(data["params_freed"]),
            state_bytes_freed=int(data["state_bytes_freed"]),
        )


@dataclasses.dataclass
class FreezePlan:
    """A record of a SAFE run that a second run can replay without scoring.

    Example:
        >>> plan = FreezePlan(config=SAFEConfig(), adapters=[AdapterRecord("a", (("a.w", (2, 3)),))])
        >>> FreezePlan.from_json(plan.to_json()) == plan
        True
    """

    config: SAFEConfig
    adapters: list[AdapterRecord]
    events: list[FreezeEvent] = dataclasses.field(default_factory=list)
    # Freeze unit name -> adapter names (identity when no group_by).
    units: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # Finalized scores per unit, set at the end of the warm-up.
    raw_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    normalized_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    # Step at which scores were finalized (None before).
    scored_at: int | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the adapters' names and parameter shapes."""
        return fingerprint(self.adapters)

    @property
    def frozen(self) -> dict[str, int]:
        """Adapter name -> step at which it was frozen."""
        return {name: event.step for event in self.events for name in event.adapters}

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
        """Validate and build a plan from :meth:`to_dict` output.

        Raises:
            PlanError: If the document is not a safefreeze plan, is of an unknown schema
                version, misses fields, or its fingerprint does not match its adapters.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            seen = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"{source} is not a safefreeze plan: expected schema {SCHEMA!r}, got {seen!r}")
        version = data.get("version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"{source} has plan schema version {version!r}; this safefreeze reads version "
                f"{SCHEMA_VERSION}; upgrade safefreeze or re-record the plan"
            )
        missing = [key for key in ("config", "model", "units", "scores", "events") if key not in data]
        if missing:
            raise PlanError(f"{source} is a damaged safefreeze plan: missing field {missing[0]!r}")
        where = "model"
        try:
            model, scores = data["model"], data["scores"]
            adapters = [AdapterRecord.from_dict(a) for a in model["adapters"]]
            recorded = str(model["fingerprint"])
            where = "scores"
            raw_scores = _decode_scores(scores["raw"])
            normalized_scores = _decode_scores(scores["normalized"])
            scored_at = None if scores["scored_at"] is None else int(scores["scored_at"])
            events = []
            for i, event in enumerate(data["events"]):
                where = f"events[{i}]"
                events.append(FreezeEvent.from_dict(event))
            where = "config"
            # Every field is required: a default silently standing in would change the replay.
            for field in dataclasses.fields(SAFEConfig):
                if field.name not in data["config"]:
                    raise KeyError(field.name)
            config = SAFEConfig.from_dict(data["config"])
            where = "units"
            units = {str(k): [str(n) for n in v] for k, v in data["units"].items()}
        except KeyError as err:
            raise PlanError(
                f"{source} is a damaged safefreeze plan: missing field {err.args[0]!r} in {where}"
            ) from err
        except (TypeError, ValueError, AttributeError) as err:
            raise PlanError(
                f"{source} is a damaged safefreeze plan: bad {where}: {type(err).__name__}: {err}"
            ) from err
        plan = cls(
            config=config,
            adapters=adapters,
            events=events,
            units=units,
            raw_scores=raw_scores,
            normalized_scores=normalized_scores,
            scored_at=scored_at,
        )
        if recorded != plan.fingerprint:
            raise PlanError(
                f"{source} is damaged: its fingerprint {recorded[:12]} does not match its adapter "
                f"list ({plan.fingerprint[:12]}); the adapter list was edited or the file corrupted"
            )
        _check_consistent(plan, source)
        return plan

    def to_json(self) -> str:
        """Serialize to a JSON string (standard JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> FreezePlan:
        """Parse :meth:`to_json` output.

        Raises:
            PlanError: If ``text`` is not valid JSON or not a valid plan.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"{source} is not valid JSON (truncated or corrupt?): {err}") from err
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically and return its path.

        The JSON goes to a temporary file beside ``path`` that is synced and renamed over
        it, so a crash leaves either the old file or the new one, never half a file, and a
        failed save leaves no temporary file behind.
        """
        target = Path(path)
        text = self.to_json()
        target.parent.mkdir(parents=True, exist_ok=True)
        # open(..., "x") rather than mkstemp: the file gets the umask's mode, not 0600.
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
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
        """Read a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            PlanError: If the file is not UTF-8 JSON (a pickle is refused, never loaded),
                is truncated or corrupt, is of another schema version, or is damaged.
        """
        source = f"plan file {os.fspath(path)!r}"
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PlanError(
                f"{source} is not a JSON text (byte {err.start} is not UTF-8; a pickle or other "
                f"binary file?); a plan is the JSON written by FreezePlan.save"
            ) from None
        return cls.from_json(text, source=source)

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


def _check_consistent(plan: FreezePlan, source: str) -> None:
    """Raise :class:`PlanError` if the units or events name adapters the plan does not list."""
    known = {a.name for a in plan.adapters}
    for unit, members in plan.units.items():
        unknown = [a for a in members if a not in known]
        if unknown:
            raise PlanError(f"{source} is damaged: unit {unit!r} holds unlisted adapters {unknown[:3]}")
    for event in plan.events:
        units = [u for u in event.units if u not in plan.units]
        if units:
            raise PlanError(
                f"{source} is damaged: the event at step {event.step} freezes unknown units {units[:3]}"
            )
        expected = [a for u in event.units for a in plan.units[u]]
        if list(event.adapters) != expected:
            raise PlanError(
                f"{source} is damaged: the event at step {event.step} lists adapters "
                f"{list(event.adapters)} but its units {list(event.units)} hold {expected}"
            )


def _encode_float(value: float) -> float | None:
    """JSON has no NaN or Inf: a non-finite value is written as null."""
    return float(value) if math.isfinite(value) else None


def _decode_float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _encode_scores(scores: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _encode_float(v) for k, v in scores.items()}


def _decode_scores(scores: Mapping[str, float | None]) -> dict[str, float]:
    return {str(k): _decode_float(v) for k, v in scores.items()}
