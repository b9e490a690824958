"""Entries a complete read no longer lists: ended, held by the mass-removal guard, or, for
a visit already under way, kept watched with a question to everyone: is the worker safe?

Only a complete, believable read ends a visit (principle 8). A read that would remove all,
or more than ``removal_guard`` (a share, once at least ``removal_guard_min`` visits), of a
source's watched visits is **held**: nothing is removed until the same read has repeated for
``removal_hold`` or an admin confirms it (``visitwatch sources confirm NAME``). A visit
under way whose entry is removed is never ended.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import TimeWindow
from visitwatch.core.notification import NotificationKind
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.actions import Actions
from visitwatch.daemon.config import Config
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.recipients import Addressee, Recipients, alerted
from visitwatch.daemon.routing import Router, enqueue
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import CONFLICT_RETRIES, VersionConflict, Visit, Visits

log = structlog.get_logger(__name__)

# The mass-removal guard's defaults ([daemon] settings, or per source).
REMOVAL_GUARD = 0.5
REMOVAL_GUARD_MIN = 3
REMOVAL_HOLD = timedelta(minutes=30)

Key = tuple[str, str]  # (uid, recurrence_id)


class Removals:
    def __init__(
        self,
        store: Store,
        config: Config,
        visits: Visits,
        actions: Actions,
        router: Router,
        recipients: Recipients,
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.config = config
        self.visits = visits
        self.actions = actions
        self.router = router
        self.recipients = recipients
        self.wake = wake
        self.tz = config.daemon.timezone

    def apply(
        self,
        source: CalendarSource,
        state: dict[str, Any],
        existing: dict[Key, Visit],
        seen: set[Key],
        window: TimeWindow,
        now: datetime,
    ) -> tuple[int, int]:
        """End what a complete read no longer lists, unless the guard holds the read.

        Returns (visits ended, removals held).
        """
        current = {v.id: v for v in self.visits.of_source(source.name) if isinstance(v, Visit)}
        live: list[tuple[Key, Visit]] = []
        for key, old in existing.items():
            visit = current.get(old.id)
            if visit is None or visit.state.terminal or visit.removed_at:
                continue
            # Only entries the window fully covers can be known to be gone; one that merely
            # slid out of the window has not been removed.
            if window.start <= visit.start and visit.end <= window.end:
                live.append((key, visit))
        removing = [visit for key, visit in live if key not in seen]
        if removing and self._guarded(source, len(removing), len(live)):
            ids = json.dumps(sorted(v.id for v in removing))
            held_since = from_ts(state.get("held_since"))
            confirmed = from_ts(state.get("held_confirmed_at"))
            same = state.get("held_removals") == ids and held_since is not None
            hold = self._setting(source, "removal_hold", REMOVAL_HOLD)
            if not (
                same
                and held_since is not None
                and (now - held_since >= hold or (confirmed and confirmed >= held_since))
            ):
                if not same:
                    log.warning(
                        "removal_held", source=source.name, removing=len(removing), of=len(live)
                    )
                    with self.store.transaction() as conn:
                        conn.execute(
                            "UPDATE sources SET held_removals = ?, held_since = ?, held_live = ?,"
                            " held_confirmed_at = NULL, held_confirmed_by = NULL WHERE name = ?",
                            (ids, ts(now), len(live), source.name),
                        )
                return 0, len(removing)
            log.warning("removal_applied_after_hold", source=source.name, removing=len(removing))
        if state.get("held_removals"):
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE sources SET held_removals = NULL, held_since = NULL, held_live = 0,"
                    " held_confirmed_at = NULL, held_confirmed_by = NULL WHERE name = ?",
                    (source.name,),
                )
        ended = 0
        for visit in removing:
            if visit.state == VisitState.BOOKED:
                with self.store.transaction():
                    self.actions.end_monitoring(visit, now, "removed from the calendar")
                ended += 1
            else:
                self.removed_while_under_way(visit, now)
        return ended, 0

    def _guarded(self, source: CalendarSource, removing: int, live: int) -> bool:
        """Would this read remove all, or too large a share, of the source's visits?"""
        share = self._setting(source, "removal_guard", REMOVAL_GUARD)
        minimum = self._setting(source, "removal_guard_min", REMOVAL_GUARD_MIN)
        if removing == live:
            return True
        return bool(removing >= minimum and removing > share * live)

    def _setting(self, source: CalendarSource, key: str, default: Any) -> Any:
        """The source's own guard setting, else the [daemon] one, else the default."""
        value = source.settings.get(key)
        if value is None:
            value = getattr(self.config.daemon, key, None)
        return default if value is None else value

    def removed_while_under_way(self, visit: Visit, now: datetime) -> None:
        """Never end a started visit because its entry went: keep watching, ask if all is well."""
        for _ in range(CONFLICT_RETRIES):
            try:
                with self.store.transaction() as conn:
                    visit = self.visits.current(visit.id)
                    if visit.state.terminal or visit.removed_at:
                        return
                    self.actions.change(
                        visit, now, "removed_from_calendar", "calendar", {"removed_at": now}
                    )
                    self._ask_if_safe(conn, visit, now)
                self.wake()
                return
            except VersionConflict:
                continue
        log.error("removed_visit_kept_changing", visit=visit.id)

    def _ask_if_safe(self, conn: Any, visit: Visit, now: datetime) -> None:
        worker = Addressee(self.recipients.worker(visit), "worker")
        people = [worker] + [
            a for a in alerted(conn, visit.id) if a.recipient.id != worker.recipient.id
        ]
        name = worker.recipient.name
        subject = f"visitwatch: is {name} safe? A visit was removed from the calendar"
        text = (
            f"The visit {visit.id} ({name}, started {fmt_local(visit.start, self.tz)},"
            f" back by {fmt_local(visit.deadline, self.tz)}) was removed from the"
            f" calendar while in progress: is {name} safe?\n\n"
            "visitwatch keeps watching it and its alerts go on until someone checks in"
            f" (`visitwatch checkin {visit.id}`) or confirms the worker is safe"
            f" (`visitwatch ack {visit.id} --by NAME --safe`)."
        )
        removed = NotificationKind.REMOVED
        for addressee in people:
            recipient = addressee.recipient
            # Its own kind where channels take it; else wherever this person gets reminders,
            # else any channel that reaches them: this question must not be dropped.
            channels = (
                self.router.channels_for(removed, recipient)
                or self.router.channels_for(NotificationKind.REMINDER, recipient)
                or self.router.channels_for(removed, recipient, any_kind=True)
            )
            if not channels:
                log.error("removed_visit_unreachable", visit=visit.id, relation=addressee.relation)
            for channel in channels:
                enqueue(
                    conn, visit.id, removed, addressee, channel.name, subject, text, now,
                    f"{visit.id}|removed|{ts(now)}",
                )  # fmt: skip
