"""Retention: what the record forgets, and when (UK GDPR storage limitation).

Personal data (names, staff ids, subjects, addresses, mobiles, recipients' addresses) is
anonymised ``[retention] personal_data_after`` after a routine visit ends, and
``incidents_after`` after one that escalated past the manager or asked for help. What makes
statistics stays: states, times, durations, channels, relations, delivery times. Anonymised
rows are deleted ``keep_statistics`` after the visit; a notification's words (and the signed
link in it) go ``message_bodies_after`` it was written, a sign-in message's as soon as its
link has expired; expired short links and used nonces are deleted.

The audit stays append-only (schema migration 0009): each batch is one transaction that
opens a ``retention_runs`` row, and only while it is open do the audit's and the
check-ins' triggers let a row lose its actor and detail, to fixed values. The run is closed
and an audit line says what went, how much, and the cutoffs, in the same transaction.
Batches are small, so the sweep never waits long for the write lock.
"""

from __future__ import annotations

import getpass
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.core.visit_state import TERMINAL_STATES
from visitwatch.daemon.clock import Clock, SystemClock
from visitwatch.daemon.config import Config
from visitwatch.daemon.config_types import RetentionSettings
from visitwatch.daemon.loops import Loop
from visitwatch.daemon.store import Store, from_ts, ts

log = structlog.get_logger(__name__)

ANONYMISED = "(anonymised)"
BATCH = 500
EVERY = timedelta(days=1)
# A sign-in link's lifetime (web/signin.py LINK_TTL; a test keeps them equal).
SIGN_IN_LINK_TTL = timedelta(minutes=15)
# The daily run acts as the daemon: a system actor, which anonymisation leaves in place.
DAILY = "visitwatch"

_TERMINAL = ", ".join(f"'{s}'" for s in sorted(TERMINAL_STATES))
_ENDED = 'COALESCE(ended_at, "end")'
# A visit whose personal data may go now (``visits`` unaliased).
_DUE = f"""state IN ({_TERMINAL}) AND "end" < :personal AND {_ENDED} < :personal
    AND ({_ENDED} < :incident OR (help_requested_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM notifications n WHERE n.visit_id = visits.id
        AND n.kind IN ('escalation', 'help'))))"""
# Visits keeping their personal data for now: their rows elsewhere keep it too.
_HELD = f"SELECT id FROM visits WHERE anonymised IS NULL AND NOT ({_DUE})"


def _linked(time: str) -> str:
    return f"{time} < :personal AND (visit_id IS NULL OR visit_id NOT IN ({_HELD}))"


@dataclass(frozen=True)
class Step:
    """One kind of thing retention does to one table."""

    kind: str  # what the admin reads: "visits anonymised"
    table: str
    time: str  # the column the date range is shown from
    where: str  # the rows it acts on
    change: str  # "DELETE" or "UPDATE ... SET ..." (the rows' ids are appended)
    would: str = ""  # for --dry-run, when it differs from ``where`` (rows anonymised first)

    def act(self, conn: Any, params: dict[str, Any]) -> int:
        verb = "DELETE FROM" if self.change == "DELETE" else "UPDATE"
        sets = "" if self.change == "DELETE" else f" SET {self.change}"
        return int(
            conn.execute(
                f"{verb} {self.table}{sets} WHERE rowid IN (SELECT rowid FROM {self.table}"
                f" WHERE {self.where} LIMIT :batch)",
                params,
            ).rowcount
        )


_ANON = f"'{ANONYMISED}'"
STEPS = (
    Step("visits anonymised", "visits", _ENDED, f"anonymised IS NULL AND {_DUE}",
         f"""anonymised = :run, worker_id = '', worker_label = {_ANON}, subject = {_ANON},
         address = '', uid = 'anonymised:' || id, risk_assessment = '', worker_mobile = '',
         second_worker = '', event_fingerprint = '', categories = NULL,
         checked_in_by = CASE WHEN checked_in_by IS NULL THEN NULL ELSE {_ANON} END,
         acknowledged_by = CASE WHEN acknowledged_by IS NULL THEN NULL ELSE {_ANON} END,
         findings = (SELECT json_group_array(json_set(value, '$.message', ''))
                     FROM json_each(visits.findings)),
         version = version + 1, updated = :now"""),
    Step("audit lines anonymised", "audit", "at", f"anonymised IS NULL AND {_linked('at')}",
         f"""anonymised = :run, detail = '{{}}', actor = CASE WHEN actor IN
         ('visitwatch', 'calendar') THEN actor ELSE {_ANON} END"""),
    Step("check-ins anonymised", "checkins", "at", f"anonymised IS NULL AND {_linked('at')}",
         f"anonymised = :run, actor = {_ANON}, detail = '{{}}'"),
    Step("notifications anonymised", "notifications", "created",
         f"anonymised IS NULL AND status != 'pending' AND {_linked('created')}",
         f"""anonymised = :run, key = 'anonymised:' || id, recipient_id = '',
         recipient_name = {_ANON}, recipient_email = '', recipient_mobile = '',
         last_error = CASE WHEN last_error IS NULL THEN NULL ELSE '(removed)' END,
         subject = '', text = '', short = '', link = '',
         body_removed = COALESCE(body_removed, :run)"""),
    Step("message words removed", "notifications", "created",
         "body_removed IS NULL AND status != 'pending' AND created < :bodies",
         "subject = '', text = '', short = '', link = '', body_removed = :run"),
    Step("sign-in messages removed", "notifications", "created",
         "body_removed IS NULL AND status != 'pending' AND created < :signin"
         " AND key LIKE 'signin|%'",
         "subject = '', text = '', short = '', link = '', body_removed = :run"),
    Step("audit lines deleted", "audit", "at", "anonymised IS NOT NULL AND at < :stats",
         "DELETE", would=f"at < :stats AND (anonymised IS NOT NULL OR {_linked('at')})"),
    Step("check-ins deleted", "checkins", "at", "anonymised IS NOT NULL AND at < :stats",
         "DELETE", would=f"at < :stats AND (anonymised IS NOT NULL OR {_linked('at')})"),
    Step("notifications deleted", "notifications", "created",
         "anonymised IS NOT NULL AND created < :stats", "DELETE",
         would=f"created < :stats AND status != 'pending'"
         f" AND (anonymised IS NOT NULL OR {_linked('created')})"),
    Step("visits deleted", "visits", _ENDED, f"anonymised IS NOT NULL AND {_ENDED} < :stats",
         "DELETE", would=f"{_ENDED} < :stats AND (anonymised IS NOT NULL OR {_DUE})"),
    Step("unreadable-entry notes deleted", "problems", "last_seen", "last_seen < :personal",
         "DELETE"),
    Step("expired short links deleted", "short_links", "expires", "expires < :now", "DELETE"),
    Step("expired sign-in nonces deleted", "web_used_nonces", "expires", "expires < :now",
         "DELETE"),
)  # fmt: skip


@dataclass(frozen=True)
class Cutoffs:
    """Before when each kind of thing goes, as stored UTC text ("" : nothing goes)."""

    now: str
    personal: str
    incident: str
    stats: str
    bodies: str
    signin: str

    @classmethod
    def of(cls, settings: RetentionSettings, now: datetime, window_past: timedelta) -> Cutoffs:
        # A visit the calendar sync may still read keeps its data: the sync would write it
        # back (a visit is found by its calendar entry).
        floor = window_past + timedelta(days=1)
        personal = now - max(settings.personal_data_after, floor)
        incident = now - max(settings.incidents_after, settings.personal_data_after, floor)
        kept = settings.keep_statistics
        stats = "" if kept is None else ts(min(now - kept, incident))
        return cls(
            now=str(ts(now)),
            personal=str(ts(personal)),
            incident=str(ts(incident)),
            stats=stats or "",
            bodies=str(ts(now - settings.message_bodies_after)),
            signin=str(ts(now - SIGN_IN_LINK_TTL)),
        )

    def params(self) -> dict[str, Any]:
        return {**self.__dict__, "batch": BATCH}


@dataclass(frozen=True)
class Pending:
    """What one step would do now: how many rows, and the span of their times."""

    kind: str
    count: int
    first: datetime | None
    last: datetime | None


def settings_of(config: Config) -> RetentionSettings:
    """The [retention] settings."""
    return config.retention


class Retention:
    """Applies the [retention] settings to the record, in small audited batches."""

    def __init__(self, store: Store, config: Config, clock: Clock) -> None:
        self.store = store
        self.settings = settings_of(config)
        self.window_past = config.daemon.window_past
        self.clock = clock

    def cutoffs(self) -> Cutoffs:
        return Cutoffs.of(self.settings, self.clock.now(), self.window_past)

    def pending(self) -> list[Pending]:
        """What a run now would do (``purge --dry-run``); changes nothing."""
        params = self.cutoffs().params()
        found = []
        for step in STEPS:
            row = self.store.one(
                f"SELECT COUNT(*) AS n, MIN({step.time}) AS first, MAX({step.time}) AS last"
                f" FROM {step.table} WHERE {step.would or step.where}",
                params,
            )
            assert row is not None
            found.append(Pending(step.kind, row["n"], _time(row["first"]), _time(row["last"])))
        return found

    def apply(self, actor: str) -> dict[str, int]:
        """Do now what is due, batch by batch; the totals by kind."""
        totals = dict.fromkeys((s.kind for s in STEPS), 0)
        first = True
        while True:
            done = self._batch(actor, keep_empty=first)
            first = False
            for kind, count in done.items():
                totals[kind] += count
            if not any(done.values()):
                break
        if any(totals.values()):
            log.info("retention_applied", **{k.replace(" ", "_"): v for k, v in totals.items()})
        return totals

    def _batch(self, actor: str, keep_empty: bool) -> dict[str, int]:
        """One transaction: open a run, act on up to BATCH rows per step, close, audit."""
        cutoffs = self.cutoffs()
        params = {**cutoffs.params(), "run": cutoffs.now}
        try:
            with self.store.transaction() as conn:
                run = conn.execute(
                    "INSERT INTO retention_runs (started, personal_cutoff, incident_cutoff,"
                    " statistics_cutoff, body_cutoff, actor) VALUES (?, ?, ?, ?, ?, ?)",
                    (cutoffs.now, cutoffs.personal, cutoffs.incident, cutoffs.stats,
                     cutoffs.bodies, actor),
                ).lastrowid  # fmt: skip
                done = {step.kind: step.act(conn, params) for step in STEPS}
                if not keep_empty and not any(done.values()):
                    raise _Nothing
                conn.execute(
                    "UPDATE retention_runs SET finished = ?, counts = ? WHERE id = ?",
                    (ts(self.clock.now()), json.dumps(done), run),
                )
                self.store.audit(
                    conn, None, self.clock.now(), "retention applied", actor,
                    run=run, done={k: v for k, v in done.items() if v},
                    personal_data_before=cutoffs.personal, incidents_before=cutoffs.incident,
                    statistics_before=cutoffs.stats or "kept", words_before=cutoffs.bodies,
                )  # fmt: skip
        except _Nothing:
            return {}
        return done

    def last_run(self) -> datetime | None:
        row = self.store.one("SELECT MAX(started) AS at FROM retention_runs")
        return _time(row["at"] if row else None)


class _Nothing(Exception):
    """A batch found nothing more to do: leave no run behind it."""


def _time(text: str | None) -> datetime | None:
    try:
        return from_ts(text)
    except ValueError:
        return None


def retention_loop(
    store: Store,
    config: Config,
    clock: Clock,
    stop: threading.Event,
    tell_admins: Callable[[str, str, str], None],
) -> Loop:
    """The daemon's daily run: due a day after the last (any) run, checked hourly."""
    retention = Retention(store, config, clock)
    failing = [False]

    def step() -> float | None:
        if not retention.settings.scheduled:
            return None
        now = clock.now()
        last = retention.last_run()
        if last is not None and now - last < EVERY:
            return (last + EVERY - now).total_seconds()
        try:
            retention.apply(DAILY)
        except Exception as err:  # kept too long is an admin's problem, never the sweep's
            log.exception("retention_failed")
            if not failing[0]:
                tell_admins(
                    "retention",
                    "visitwatch: retention could not run",
                    f"visitwatch could not apply its retention periods ({type(err).__name__}: "
                    f"{err}), so personal data may be kept longer than [retention] says. It "
                    "tries again within the hour; `visitwatch purge --dry-run` shows what is "
                    "due and `visitwatch purge` applies it now.",
                )
            failing[0] = True
            return None
        failing[0] = False
        return EVERY.total_seconds()

    return Loop("retention", step, 3600.0, stop)


def cmd_purge(args: Any) -> int:
    """``visitwatch purge [--dry-run]``: what retention would remove now, or remove it."""
    from visitwatch.daemon.export import command_config
    from visitwatch.daemon.messages import fmt_local

    config = command_config(args)
    tz = config.daemon.timezone
    store = Store(config.daemon.database)
    retention = Retention(store, config, SystemClock())
    try:
        cut = retention.cutoffs()
        print(
            f"retention: personal data of visits ended before "
            f"{fmt_local(_at(cut.personal), tz)} (incidents: {fmt_local(_at(cut.incident), tz)});"
            f" message words before {fmt_local(_at(cut.bodies), tz)}; statistics "
            + (f"before {fmt_local(_at(cut.stats), tz)}" if cut.stats else "kept")
        )
        if args.dry_run:
            for item in retention.pending():
                span = ""
                if item.first and item.last:
                    span = f"  ({item.first.astimezone(tz):%Y-%m-%d} to {item.last.astimezone(tz):%Y-%m-%d})"
                print(f"  would: {item.kind:32} {item.count:>8}{span}")
            print("dry run: nothing was changed")
            return 0
        done = retention.apply(f"visitwatch purge ({getpass.getuser()})")
        for kind, count in done.items():
            print(f"  done:  {kind:32} {count:>8}")
        print("recorded in the audit (cause: retention applied)")
    finally:
        store.close()
    return 0


def _at(text: str) -> datetime:
    moment = from_ts(text)
    assert moment is not None
    return moment
