"""A watched visit, typed, and the one place visits are read from and claimed in the store.

A :class:`Visit` is a frozen snapshot of one ``visits`` row with aware UTC datetimes,
booleans, typed findings and a :class:`VisitState`. :func:`to_column` and
:meth:`Visit.from_row` are the only conversions between the two; every other module works
with :class:`Visit` values.

Every change to a visit goes through :meth:`Visits.claim`: a conditional UPDATE on the
row's ``version`` inside the caller's transaction, with its audit row in the same
transaction (principle 2). A change made concurrently is never overwritten: the claim
raises :class:`VersionConflict`, and the caller reads the visit again and redoes its work.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import structlog

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.policies.model import Finding

log = structlog.get_logger(__name__)

# A claim lost to a concurrent writer is retried this many times before the user hears of it.
CONFLICT_RETRIES = 5


# The changes that start a visit's ladder afresh: nothing raised, nothing acknowledged.
LADDER_RESET: dict[str, Any] = {
    "step": 0,
    "repeats": 0,
    "ack_realerts": 0,
    "acknowledged_at": None,
    "acknowledged_by": None,
}


class ActionError(VisitwatchError):
    """A check-in or acknowledgement that cannot be done (unknown visit, already resolved)."""


class VersionConflict(Exception):
    """The visit changed between reading and claiming it; re-read it and try again."""


@dataclass(frozen=True)
class Visit:
    """One watched visit, as stored. Times are aware UTC."""

    id: str
    source: str
    uid: str
    recurrence_id: str
    kind: str  # "home_visit" or "lone_working" (the policy's recognition)
    worker_id: str
    worker_label: str
    worker_known: bool
    subject: str
    address: str
    private: bool
    start: datetime
    end: datetime
    expected_return: datetime | None
    expected_return_from: str
    extended_until: datetime | None
    deadline: datetime
    risk_assessment: str
    risk_assessment_complete: bool
    worker_mobile: str
    second_worker: str
    pair_required: bool
    going_home_after: bool
    findings: tuple[Finding, ...]
    state: VisitState
    step: int
    repeats: int
    prestart_notice_sent: bool
    next_action_at: datetime | None
    version: int
    help_requested_at: datetime | None
    checked_in_at: datetime | None
    checked_in_by: str | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    ended_at: datetime | None
    event_fingerprint: str
    first_seen: datetime
    last_seen: datetime
    updated: datetime
    ack_realerts: int = 0
    removed_at: datetime | None = None
    categories: tuple[str, ...] | None = None  # at the previous read; None before any

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Visit:
        values: dict[str, Any] = {}
        for name, kind in _FIELD_KINDS.items():
            raw = row.get(name)
            if kind == "time":
                values[name] = from_ts(raw)
            elif kind == "bool":
                values[name] = bool(raw)
            elif kind == "findings":
                values[name] = tuple(_finding(f) for f in json.loads(raw or "[]"))
            elif kind == "categories":
                values[name] = None if raw is None else tuple(json.loads(raw))
            elif kind == "state":
                values[name] = VisitState(str(raw))
            else:
                values[name] = raw if raw is not None or kind == "optional" else _EMPTY[kind]
        return cls(**values)

    @classmethod
    def read(cls, row: Mapping[str, Any]) -> Visit | UnreadableVisit:
        """:meth:`from_row`, or what is known of a row that cannot be read (a damaged time,
        an unknown state): one such row must never stop the others being watched."""
        try:
            return cls.from_row(row)
        except (ValueError, TypeError, KeyError) as err:
            key = (str(row.get("uid")), str(row.get("recurrence_id") or ""))
            return UnreadableVisit(
                str(row.get("id")), row.get("next_action_at"), row.get("deadline"), err, key
            )

    def replace(self, **changes: Any) -> Visit:
        return dataclasses.replace(self, **changes)

    @property
    def has_errors(self) -> bool:
        """Whether the policy found something the visit must not go ahead without."""
        return any(f.severity == "error" for f in self.findings)


@dataclass(frozen=True)
class UnreadableVisit:
    """A visits row :meth:`Visit.from_row` could not read, with what is known of it."""

    id: str
    next_action_at: str | None
    deadline: str | None  # as stored
    error: Exception
    key: tuple[str, str] = ("", "")  # (uid, recurrence_id)


def _finding(stored: Any) -> Finding:
    """A stored finding; keys another version added are ignored, missing ones are blank."""
    if not isinstance(stored, Mapping):
        raise ValueError(f"a finding is stored as {type(stored).__name__}, not a table")
    names = [f.name for f in fields(Finding)]
    return Finding(**{name: str(stored.get(name) or "") for name in names})


def _kind_of(annotation: str) -> str:
    if "datetime" in annotation:
        return "time"
    if annotation == "bool":
        return "bool"
    if annotation == "VisitState":
        return "state"
    if "Finding" in annotation:
        return "findings"
    if "tuple[str" in annotation:
        return "categories"
    if "None" in annotation:
        return "optional"
    return "int" if annotation == "int" else "str"


# How each field is stored, read off the dataclass once: one table drives both directions.
_FIELD_KINDS: dict[str, str] = {f.name: _kind_of(str(f.type)) for f in fields(Visit)}
_EMPTY = {"str": "", "int": 0}


def to_column(name: str, value: Any) -> Any:
    """A field's value as its column stores it (values already in column form pass as is)."""
    kind = _FIELD_KINDS.get(name)
    if kind is None:
        raise KeyError(f"visits has no field {name!r}")
    if value is None:
        return None
    if kind == "time":
        return ts(value) if isinstance(value, datetime) else value
    if kind == "bool":
        return int(bool(value))
    if kind == "findings" and not isinstance(value, str):
        return json.dumps([dataclasses.asdict(f) for f in value])
    if kind == "categories" and not isinstance(value, str):
        return json.dumps(list(value))
    if kind == "state":
        return str(VisitState(value))
    return value


class Visits:
    """The repository: reading visits, and claiming a change to one."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, visit_id: str) -> Visit | None:
        row = self.store.one("SELECT * FROM visits WHERE id = ?", (visit_id,))
        return _readable(row) if row else None

    def current(self, visit_id: str) -> Visit:
        """The visit as stored now; an :class:`ActionError` when there is none."""
        visit = self.get(visit_id)
        if visit is None:
            raise ActionError(f"no visit {visit_id!r}; `visitwatch status` lists them")
        return visit

    def find(self, ref: str) -> Visit:
        """A visit by id or unique id prefix, or ``#N`` for the visit of alert number N."""
        ref = ref.strip().lower()
        if ref.startswith("#"):
            number = ref[1:]
            note = self.store.one(
                "SELECT visit_id FROM notifications WHERE id = ?",
                (int(number) if number.isdigit() else -1,),
            )
            if not note or not note["visit_id"]:
                raise ActionError(f"no alert {ref}; `visitwatch status` lists the visits")
            ref = note["visit_id"]
        if len(ref) < 4:
            raise ActionError(f"give at least 4 characters of the visit id, not {ref!r}")
        exact = self.store.one("SELECT * FROM visits WHERE id = ?", (ref,))
        if exact is not None:  # through the primary key; links and pages always give it whole
            return _readable(exact)
        rows = self.store.query(
            "SELECT * FROM visits WHERE substr(id, 1, ?) = ? LIMIT 2", (len(ref), ref)
        )
        if not rows:
            raise ActionError(f"no visit {ref!r}; `visitwatch status` lists them")
        if len(rows) > 1:
            raise ActionError(f"{ref!r} matches more than one visit; give more of the id")
        return _readable(rows[0])

    def of_source(self, source: str) -> list[Visit | UnreadableVisit]:
        """The source's visits. A row that cannot be read comes as an
        :class:`UnreadableVisit`: the sync leaves its entry alone, and the sweep reports it
        to an admin and keeps trying."""
        return [
            Visit.read(row)
            for row in self.store.query("SELECT * FROM visits WHERE source = ?", (source,))
        ]

    def due(
        self, now: datetime, after: tuple[str, str] = ("", ""), limit: int | None = None
    ) -> list[Visit | UnreadableVisit]:
        """Visits whose next action is due by ``now``, in (next_action_at, id) order after
        ``after``, through the visits_next_action index. A row that cannot be read comes as
        an :class:`UnreadableVisit`, for the sweep to report and retry."""
        rows = self.store.query(
            "SELECT * FROM visits WHERE next_action_at IS NOT NULL"
            " AND next_action_at <= ? AND (next_action_at > ?"
            " OR (next_action_at = ? AND id > ?))"
            " ORDER BY next_action_at, id LIMIT ?",
            (ts(now), after[0], after[0], after[1], -1 if limit is None else limit),
        )
        return [Visit.read(r) for r in rows]

    def next_due(self) -> datetime | None:
        row = self.store.one(
            "SELECT MIN(next_action_at) AS due FROM visits WHERE next_action_at IS NOT NULL"
        )
        return from_ts(row["due"]) if row else None

    def claim(
        self,
        conn: sqlite3.Connection,
        visit: Visit,
        changes: Mapping[str, Any],
        cause: str,
        actor: str,
        now: datetime,
        *,
        audit: bool = True,
    ) -> Visit:
        """Apply ``changes`` to ``visit`` if it is still the version read; return the result.

        Must run inside the caller's transaction (the audit row and whatever the change
        causes commit together). Raises :class:`VersionConflict` when the visit has changed
        since it was read. ``audit=False`` is for bookkeeping that is no state change (the
        sweep records its own audit lines).
        """
        assert conn.in_transaction, "Visits.claim must run inside a transaction"
        columns = {k: to_column(k, v) for k, v in changes.items()}
        assignments = "".join(f'"{k}" = ?, ' for k in columns)
        claimed = conn.execute(
            f"UPDATE visits SET {assignments}version = version + 1, updated = ?"
            " WHERE id = ? AND version = ?",
            (*columns.values(), ts(now), visit.id, visit.version),
        ).rowcount
        if not claimed:
            raise VersionConflict(visit.id)
        stored = {name: to_column(name, getattr(visit, name)) for name in _FIELD_KINDS}
        after = Visit.from_row(
            {**stored, **columns, "version": visit.version + 1, "updated": ts(now)}
        )
        if audit:
            self.store.audit(conn, visit.id, now, cause, actor, visit.state, after.state)
        return after


def _readable(row: Mapping[str, Any]) -> Visit:
    visit = Visit.read(row)
    if isinstance(visit, UnreadableVisit):
        raise ActionError(
            f"visit {visit.id} cannot be read from the record ({visit.error}); nothing was "
            "changed. See `visitwatch status` and the daemon's log (event sweep_failed)."
        )
    return visit
