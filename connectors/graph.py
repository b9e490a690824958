"""Outlook calendars read through Microsoft Graph (app-only, many mailboxes).

Each configured mailbox (and, optionally, named calendars inside it) is read as a
``calendarView``, in full or as delta rounds; entries leave this module as aware UTC
:class:`CalendarEvent` occurrences. The pieces, each in its own module:

- :mod:`graph_targets`: which calendars the configured mailboxes and calendars name;
- :mod:`graph_reader`: reading them (pages, ``$batch``, delta rounds and their removals);
- :mod:`graph_delta`: the delta rounds kept between reads and on disk;
- :mod:`graph_mapping`: a Graph event's JSON as a :class:`CalendarEvent`;
- :mod:`graph_writeback`: a visit's state shown on its entry as a category.

Failure model
-------------
A mailbox that cannot be read becomes an :class:`EventProblem` (uid ``""``) and makes the
result incomplete, because none of its entries may then be taken as removed. Only when every
mailbox fails does :meth:`fetch` raise, so the daemon marks the whole source as failing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import zip_longest
from typing import Any, ClassVar

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.connectors.change_feed import ChangeFeed
from visitwatch.connectors.graph_auth import token_roles
from visitwatch.connectors.graph_client import GRAPH_OPTIONS, GraphClient, GraphConnector
from visitwatch.connectors.graph_delta import DeltaStore, day_span
from visitwatch.connectors.graph_directory import GraphDirectory
from visitwatch.connectors.graph_mapping import Malformed, Reading, to_event, uid
from visitwatch.connectors.graph_reader import CalendarReader, Plan, Raw, utc_param
from visitwatch.connectors.graph_targets import CalendarTargets, Target, unique_mailboxes
from visitwatch.connectors.graph_writeback import WRITE_BACK_CATEGORIES, label_entry
from visitwatch.core.calendar import (
    CalendarEvent,
    EventProblem,
    FetchResult,
    TimeWindow,
    overlaps,
    utc_window,
)
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option

__all__ = ["WRITE_BACK_CATEGORIES", "GraphCalendarSource"]

log = structlog.get_logger(__name__)

MAX_PAGE_SIZE = 1000  # Graph's largest odata.maxpagesize for events

# (uid, recurrence_id) -> (mailbox, graph id, categories): where write_back finds an entry.
EntryIndex = dict[tuple[str, str], tuple[str, str, tuple[str, ...]]]


@dataclass
class _Read:
    """What one fetch has gathered so far."""

    problems: list[EventProblem] = field(default_factory=list)
    failed: list[ConnectorError] = field(default_factory=list)  # one per mailbox lost
    complete: bool = True
    collected: list[tuple[Target, Raw]] = field(default_factory=list)


class GraphCalendarSource(GraphConnector, CalendarSource):
    """Occurrences from Outlook calendars of staff or shared mailboxes, via Microsoft Graph."""

    type_name: ClassVar[str] = "graph"
    options: ClassVar[dict[str, Option]] = {
        **GRAPH_OPTIONS,
        "mailboxes": Option(
            "list",
            required=True,
            nonempty=True,
            help="user principal names or ids of the mailboxes to read",
        ),
        "calendars": Option(
            "list", default=[], help="calendar names or ids in each mailbox; empty: the default"
        ),
        "shared": Option(
            "bool",
            default=False,
            help="true: a shared visits mailbox, the worker is an attendee or the organiser",
        ),
        "delta": Option("bool", default=True, help="read only changes (calendarView/delta)"),
        "page_size": Option(
            "int", default=200, positive=True, help=f"entries per Graph page (max {MAX_PAGE_SIZE})"
        ),
        "private_details": Option(
            "bool", default=False, help="treat private entries as ordinary ones"
        ),
        "write_back": Option(
            "bool",
            default=False,
            help='label entries "visitwatch: overdue", "...: escalated", "...: safe" (ReadWrite)',
        ),
        "directory": Option(
            "bool",
            default=False,
            help="read names, mobiles and line managers from Microsoft 365 (User.Read.All)",
        ),
    }

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        self._people: GraphDirectory | None = None
        self.mailboxes: list[str] = unique_mailboxes(self.settings["mailboxes"])
        self.client: GraphClient = self.app_client()
        self.reading = Reading(
            source=name,
            zone=context.timezone,
            shared=self.settings["shared"],
            private_details=self.settings["private_details"],
        )
        self.targets = CalendarTargets(self.client, self.settings["calendars"])
        self.deltas = DeltaStore(context.state_dir / f"graph-{_safe_name(name)}.json", name)
        self.deltas.load(self.mailboxes)
        self.reader = CalendarReader(
            self.client,
            self.deltas,
            source=name,
            use_delta=self.settings["delta"],
            page_size=self.settings["page_size"],
        )
        self._index: EntryIndex = {}

    # ------------------------------------------------------------------ capabilities

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        problems = super().settings_problems(settings)
        if settings.get("page_size", 0) > MAX_PAGE_SIZE:
            problems.append(
                ConfigProblem("page_size", f"must be {MAX_PAGE_SIZE} or less (Graph's largest)")
            )
        return problems

    @property
    def writes_back(self) -> bool:
        return bool(self.settings["write_back"])

    def change_feed(self) -> ChangeFeed:
        from visitwatch.connectors.graph_subscriptions import GraphChangeFeed

        return GraphChangeFeed(self.name, self.client, self.mailboxes, self.targets)

    def people(self, clock: Callable[[], datetime]) -> GraphDirectory | None:
        if not self.settings["directory"]:
            return None
        if self._people is None:
            self._people = GraphDirectory(self.client, self.context.state_dir, clock)
        return self._people

    # ------------------------------------------------------------------ public API

    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        window = utc_window(window)
        span = day_span(window)
        # A refused token says nothing about any mailbox: let the daemon see it as is.
        self.client.token()
        read = _Read()
        self._read_all(read, self._plan_all(read, window, span), window, span)
        self.deltas.save()
        if len(read.failed) == len(self.mailboxes):
            first = read.failed[0]
            raise ConnectorError(
                f"source {self.name!r}: {first}",
                permanent=all(e.permanent for e in read.failed),
            ) from first

        events, entries, seen = self._convert_all(read.collected, window, read.problems)
        fingerprint = _fingerprint(seen, span, read.problems, read.complete)
        self._index = entries
        log.info(
            "graph.fetched",
            source=self.name,
            events=len(events),
            problems=len(read.problems),
            complete=read.complete,
        )
        if known is not None and fingerprint == known:
            return FetchResult(fingerprint=fingerprint, unchanged=True, complete=read.complete)
        return FetchResult(
            events=events, problems=read.problems, complete=read.complete, fingerprint=fingerprint
        )

    def write_back(self, uid: str, recurrence_id: str, state: str) -> None:
        """Mirror a visit's state onto its Outlook entry (see :mod:`graph_writeback`)."""
        if not self.writes_back:
            return
        found = self._index.get((uid, recurrence_id))
        if found is None:
            log.info("graph.write_back_unknown", source=self.name)
            return
        mailbox, graph_id, _categories = found
        categories = label_entry(self.client, self.name, mailbox, graph_id, state)
        if categories is not None:
            self._index[(uid, recurrence_id)] = (mailbox, graph_id, categories)

    def check(self) -> str:
        roles = token_roles(self.client.token())
        note = self._check_roles(roles) if roles is not None else ""
        now = datetime.now(UTC)
        window = utc_window(TimeWindow.around(now, timedelta(days=1), timedelta(days=14)))
        parts = [f"token ok ({note})" if note else "token ok"]
        failures: list[ConnectorError] = []
        for mailbox in self.mailboxes:
            try:
                targets, missing = self.targets.resolve(mailbox)
                if missing:
                    raise ConnectorError(missing[0], permanent=True)
                count = 0
                for target in targets:
                    raws = self.reader.read_full(target, window)
                    count += sum(1 for r in raws if r.get("type") != "seriesMaster")
                parts.append(f"{mailbox}: {count} entries")
            except ConnectorError as err:
                failures.append(ConnectorError(_mailbox_text(mailbox, err), permanent=True))
        if failures:
            raise ConnectorError(
                "; ".join(str(f) for f in failures),
                permanent=all(f.permanent for f in failures),
            )
        return "; ".join(parts)

    def close(self) -> None:
        # The client is shared with other Graph connectors (the mail channel): not ours to close.
        self.deltas.save()

    # ------------------------------------------------------------------ reading

    def _plan_all(self, read: _Read, window: TimeWindow, span: TimeWindow) -> dict[str, list[Plan]]:
        """The first request for each calendar to read, by mailbox."""
        plans: dict[str, list[Plan]] = {}
        for mailbox in self.mailboxes:
            try:
                targets, missing = self.targets.resolve(mailbox)
            except ConnectorError as err:
                read.failed.append(err)
                read.problems.append(EventProblem(self.name, "", _mailbox_text(mailbox, err)))
                read.complete = False
                log.warning("graph.mailbox_failed", source=self.name, mailbox=mailbox)
                continue
            for reason in missing:
                read.problems.append(EventProblem(self.name, "", reason))
                read.complete = False  # that calendar's entries are unknown, not removed
            if not targets:
                read.failed.append(ConnectorError(missing[0], permanent=True))
                continue
            plans[mailbox] = [self.reader.plan(t, window, span) for t in targets]
        return plans

    def _read_all(
        self, read: _Read, plans: dict[str, list[Plan]], window: TimeWindow, span: TimeWindow
    ) -> None:
        total = sum(len(p) for p in plans.values())
        # One round per calendar position: each round holds at most one request per
        # mailbox, which keeps us well inside Graph's 4-concurrent-requests-per-mailbox.
        rounds = [[p for p in row if p is not None] for row in zip_longest(*plans.values())]
        failed_targets: dict[str, int] = {}
        for batch in rounds:
            inner = self.reader.prefetch(batch) if total > 1 else {}
            for position, plan in enumerate(batch):
                mailbox = plan.target.mailbox
                try:
                    raws = self.reader.read(plan, inner.get(str(position)), window, span)
                except ConnectorError as err:
                    failed_targets[mailbox] = failed_targets.get(mailbox, 0) + 1
                    if failed_targets[mailbox] == len(plans[mailbox]):
                        read.failed.append(err)
                    read.problems.append(EventProblem(self.name, "", _mailbox_text(mailbox, err)))
                    read.complete = False
                    log.warning(
                        "graph.calendar_failed",
                        source=self.name,
                        mailbox=mailbox,
                        status=getattr(err, "status", None),
                        code=getattr(err, "code", None),
                    )
                    continue
                read.collected.extend((plan.target, raw) for raw in raws)
                log.info("graph.mailbox_read", source=self.name, mailbox=mailbox, entries=len(raws))

    def _convert_all(
        self,
        collected: list[tuple[Target, Raw]],
        window: TimeWindow,
        problems: list[EventProblem],
    ) -> tuple[list[CalendarEvent], EntryIndex, list[tuple[str, str, bool]]]:
        events: list[CalendarEvent] = []
        entries: EntryIndex = {}
        seen: list[tuple[str, str, bool]] = []
        positions: dict[tuple[str, str], int] = {}
        for target, raw in collected:
            if raw.get("type") == "seriesMaster" or "@removed" in raw:
                continue  # a master is not an occurrence; Graph sends those separately
            try:
                event = to_event(raw, target.mailbox, self.reading)
            except Malformed as err:
                problems.append(EventProblem(self.name, uid(raw), f"{target.mailbox}: {err}"))
                log.warning("graph.entry_skipped", source=self.name, mailbox=target.mailbox)
                continue
            if not overlaps(event, window):
                continue
            if event.key[1:] in positions:
                # The same entry in two configured calendars or mailboxes: a manager books
                # the visit and invites the worker. The visit is the worker's, so the
                # organiser's copy gives way to an invitee's; otherwise the first one stays.
                current = events[positions[event.key[1:]]]
                if not (current.owner == current.organizer and event.owner != event.organizer):
                    continue
                events[positions[event.key[1:]]] = event
            else:
                positions[event.key[1:]] = len(events)
                events.append(event)
            graph_id = str(raw.get("id", ""))
            entries[(event.uid, event.recurrence_id)] = (target.mailbox, graph_id, event.categories)
            seen.append((graph_id, str(raw.get("changeKey", "")), bool(raw.get("isCancelled"))))
        events.sort(key=lambda e: (e.start, e.uid, e.recurrence_id))
        return events, entries, seen

    def _check_roles(self, roles: set[str]) -> str:
        """A note on the token's permissions; the mailbox reads that follow are the proof.

        With Exchange RBAC for Applications (the recommended, mailbox-scoped set-up) the
        permission is granted in Exchange and never appears in the token, so a missing role
        is a hint, not a failure.
        """
        shown = ", ".join(sorted(roles)) or "none"
        if not roles & {"Calendars.Read", "Calendars.ReadWrite"}:
            return (
                f"the token carries no Calendars.Read (application permissions: {shown}); "
                "fine if RBAC for Applications grants it, otherwise grant it in Entra"
            )
        if self.writes_back and "Calendars.ReadWrite" not in roles:
            return (
                f"write_back needs Calendars.ReadWrite, the token has only {shown}: grant "
                "it (Entra or RBAC for Applications) or set write_back = false"
            )
        return ""


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


def _mailbox_text(mailbox: str, err: Exception) -> str:
    text = str(err)
    return text if text.startswith("mailbox ") else f"mailbox {mailbox}: {text}"


def _fingerprint(
    seen: Iterable[tuple[str, str, bool]],
    span: TimeWindow,
    problems: list[EventProblem],
    complete: bool,
) -> str:
    # The day span, not the exact window: the window moves every poll, and hashing it would
    # make every poll look new. The entries that fall out of the window change the hash.
    digest = hashlib.sha256()
    digest.update(f"{utc_param(span.start)}|{utc_param(span.end)}|{complete}\n".encode())
    for graph_id, change_key, cancelled in sorted(seen):
        digest.update(f"{graph_id}|{change_key}|{cancelled}\n".encode())
    for problem in sorted(problems, key=lambda p: (p.uid, p.reason)):
        digest.update(f"!{problem.uid}|{problem.reason}\n".encode())
    return digest.hexdigest()
