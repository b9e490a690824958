"""Outlook calendars read through Microsoft Graph (app-only, many mailboxes).

Each configured mailbox (and, optionally, named calendars inside it) is read as a
``calendarView``: Graph expands recurring series itself, so what arrives is single events,
occurrences and exceptions, never a series master. Times are asked for in UTC
(``Prefer: outlook.timezone="UTC"``) and leave this module as aware UTC.

Incremental reads
-----------------
With ``delta = true`` each calendar is read with ``calendarView/delta``. A delta round is
bound to the date range of its first request (the range is encoded in the state token), so
the range is the requested window widened to whole UTC days, and a new round starts when
the window moves to another day. Between rounds the ``@odata.deltaLink`` and the current
events are kept per (mailbox, calendar, first day, last day), in memory and in
``state_dir`` so a restart continues the round.

Graph marks a removed entry ``{"id": ..., "@removed": {"reason": ...}}``, and documents only
``deleted`` for events. Only ``deleted`` drops an event. Any other reason (OData also defines
``changed``), or none, re-reads the event by id: gone (404) drops it, found updates it (the
window filter then decides), and any other answer keeps the copy we had, so a visit still in
the window is never ended by a removal Graph did not explain.

Failure model
-------------
A mailbox that cannot be read becomes an :class:`EventProblem` (uid ``""``) and makes the
result incomplete, because none of its entries may then be taken as removed. Only when every
mailbox fails does :meth:`fetch` raise, so the daemon marks the whole source as failing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from itertools import zip_longest
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests
import structlog
from icalendar.timezone.windows_to_olson import WINDOWS_TO_OLSON

from visitwatch.connectors.base import CalendarSource
from visitwatch.connectors.graph_client import (
    EXPIRED_DELTA_CODES,
    GRAPH_OPTIONS,
    GraphClient,
    GraphError,
    app_problems,
    mailbox_path,
    shared_client,
)
from visitwatch.connectors.graph_directory import GraphDirectory
from visitwatch.core.calendar import Attendee, CalendarEvent, EventProblem, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option

log = structlog.get_logger(__name__)

# Only what the mapping reads: smaller pages, fewer throttling units. originalStart is the
# original time of an occurrence or exception, which is what recurrence ids are made of.
SELECT = (
    "id,iCalUId,type,seriesMasterId,originalStart,subject,body,bodyPreview,start,end,isAllDay,"
    "location,locations,categories,isCancelled,sensitivity,showAs,organizer,attendees,"
    "changeKey,lastModifiedDateTime"
)

# Labels write_back puts on an entry, by visit state. They carry visitwatch's prefix so they
# can never be mistaken for a check-in or help category ("Safe", "Checked in", "Help"), and
# so that only they are ever removed: a category without the prefix is a person's.
LABEL_PREFIX = "visitwatch: "
WRITE_BACK_CATEGORIES: dict[str, str] = {
    "resolved": "visitwatch: safe",
    "overdue": "visitwatch: overdue",
    "escalated": "visitwatch: escalated",
}


def _is_label(category: str) -> bool:
    """A category visitwatch wrote (any state, this version or a later one)."""
    return " ".join(category.split()).casefold().startswith(LABEL_PREFIX.strip().casefold())


# Calendars (some shared or resource calendars) where calendarView/delta is refused.
_DELTA_REFUSED_CODES = frozenset(
    {"ErrorInvalidRequest", "NotSupported", "ErrorNotSupported", "ErrorInvalidUrlQuery"}
)
# Inner $batch answers worth one more try as a plain request (which retries with backoff).
_RETRY_DIRECT = frozenset({429, 500, 502, 503, 504})

# Outlook's GlobalObjectId (iCalUId) class id; bytes 16-19 hold the occurrence's date.
_GOID_PREFIX = "040000008200E00074C5B7101A82E008"
_GOID_DATE = slice(32, 40)

_RESPONSES = {
    "accepted": "accepted",
    "organizer": "accepted",
    "declined": "declined",
    "tentativelyaccepted": "tentative",
    "none": "needs-action",
    "notresponded": "needs-action",
}
_ROLES = {"required": "required", "optional": "optional", "resource": "resource"}
_UTC_NAMES = frozenset({"utc", "etc/utc", "tzone://microsoft/utc", "coordinated universal time"})
_FRACTION = re.compile(r"(\.\d{1,6})\d*")
_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr)\b[^>]*>", re.IGNORECASE)
_STATE_VERSION = 1


class _Malformed(ValueError):
    """An entry whose times cannot be read; becomes an EventProblem for that uid."""


@dataclass(frozen=True)
class _Target:
    """One calendar to read: a mailbox's default calendar or a named one."""

    mailbox: str
    calendar: str  # as configured; "" for the default calendar
    prefix: str  # "/users/x" or "/users/x/calendars/{id}"

    @property
    def ident(self) -> str:
        return f"{self.mailbox.lower()}|{self.calendar}"


@dataclass
class _Plan:
    """The first request for one target in this fetch."""

    target: _Target
    delta: bool
    url: str  # relative to the Graph base ("/users/...") or an absolute deltaLink
    key: str = ""  # the delta state key, when delta


@dataclass
class _DeltaState:
    link: str
    events: dict[str, dict[str, Any]] = field(default_factory=dict)


class GraphCalendarSource(CalendarSource):
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
        "page_size": Option("int", default=200, help="entries per Graph page (max 1000)"),
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
        # Addresses are case-insensitive: one listed twice is read once.
        unique: dict[str, str] = {}
        for mailbox in self.settings.get("mailboxes") or []:
            if mailbox.strip():
                unique.setdefault(mailbox.strip().lower(), mailbox.strip())
        self.mailboxes: list[str] = list(unique.values())
        if not self.mailboxes:
            raise ConnectorError(
                f"source {name!r}: mailboxes is empty; list the mailboxes to read",
                permanent=True,
            )
        self.calendars: list[str] = [
            c.strip() for c in self.settings.get("calendars") or [] if c.strip()
        ]
        self.shared: bool = bool(self.settings.get("shared"))
        self.use_delta: bool = self.settings.get("delta", True) is not False
        self.page_size: int = max(1, min(int(self.settings.get("page_size") or 200), 1000))
        self.private_details: bool = bool(self.settings.get("private_details"))
        self.client: GraphClient = shared_client(
            {k: self.settings.get(k) for k in GRAPH_OPTIONS}, context.user_agent
        )
        self.prefer: str = (
            'outlook.timezone="UTC", outlook.body-content-type="text", '
            f"odata.maxpagesize={self.page_size}"
        )
        # Calendar ids by mailbox, resolved once (names rarely change; ids never do).
        self._calendar_ids: dict[str, dict[str, str]] = {}
        self._deltas: dict[str, _DeltaState] = {}
        self._no_delta: set[str] = set()  # target idents where Graph refused delta
        # (uid, recurrence_id) -> (mailbox, graph id, categories), for write_back.
        self._index: dict[tuple[str, str], tuple[str, str, tuple[str, ...]]] = {}
        self._state_file: Path = context.state_dir / f"graph-{_safe_name(name)}.json"
        self._load_state()

    # ------------------------------------------------------------------ capabilities

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        return app_problems(settings)

    @classmethod
    def credential_expiry(cls, settings: Mapping[str, Any]) -> date | None:
        return settings.get("secret_expires")

    @property
    def writes_back(self) -> bool:
        return bool(self.settings.get("write_back"))

    def people(self, clock: Callable[[], datetime]) -> GraphDirectory | None:
        if not self.settings.get("directory"):
            return None
        if self._people is None:
            self._people = GraphDirectory(self.client, self.context.state_dir, clock)
        return self._people

    # ------------------------------------------------------------------ public API

    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        window = _utc_window(window)
        span = _day_span(window)
        # A refused token says nothing about any mailbox: let the daemon see it as is.
        self.client.token()
        problems: list[EventProblem] = []
        failed: list[GraphError | ConnectorError] = []
        complete = True
        collected: list[tuple[_Target, dict[str, Any]]] = []

        plans_by_mailbox: dict[str, list[_Plan]] = {}
        for mailbox in self.mailboxes:
            try:
                targets, missing = self._targets(mailbox)
            except ConnectorError as err:
                failed.append(err)
                problems.append(EventProblem(self.name, "", _mailbox_text(mailbox, err)))
                complete = False
                log.warning("graph.mailbox_failed", source=self.name, mailbox=mailbox)
                continue
            for reason in missing:
                problems.append(EventProblem(self.name, "", reason))
                complete = False  # that calendar's entries are unknown, not removed
            if not targets:
                failed.append(ConnectorError(missing[0], permanent=True))
                continue
            plans_by_mailbox[mailbox] = [self._plan(t, window, span) for t in targets]

        total = sum(len(p) for p in plans_by_mailbox.values())
        # One round per calendar position: each round holds at most one request per
        # mailbox, which keeps us well inside Graph's 4-concurrent-requests-per-mailbox.
        rounds = [
            [p for p in row if p is not None] for row in zip_longest(*plans_by_mailbox.values())
        ]
        failed_targets: dict[str, int] = {}
        for plans in rounds:
            inner = self._prefetch(plans) if total > 1 else {}
            for index, plan in enumerate(plans):
                mailbox = plan.target.mailbox
                try:
                    raws = self._read(plan, inner.get(str(index)), window, span)
                except ConnectorError as err:
                    failed_targets[mailbox] = failed_targets.get(mailbox, 0) + 1
                    if failed_targets[mailbox] == len(plans_by_mailbox[mailbox]):
                        failed.append(err)
                    problems.append(EventProblem(self.name, "", _mailbox_text(mailbox, err)))
                    complete = False
                    log.warning(
                        "graph.calendar_failed",
                        source=self.name,
                        mailbox=mailbox,
                        status=getattr(err, "status", None),
                        code=getattr(err, "code", None),
                    )
                    continue
                collected.extend((plan.target, raw) for raw in raws)
                log.info("graph.mailbox_read", source=self.name, mailbox=mailbox, entries=len(raws))

        self._save_state()
        if len(failed) == len(self.mailboxes):
            first = failed[0]
            raise ConnectorError(
                f"source {self.name!r}: {first}",
                permanent=all(e.permanent for e in failed),
            ) from first

        events, index, seen = self._convert_all(collected, window, problems)
        fingerprint = _fingerprint(seen, span, problems, complete)
        self._index = index
        log.info(
            "graph.fetched",
            source=self.name,
            events=len(events),
            problems=len(problems),
            complete=complete,
        )
        if known is not None and fingerprint == known:
            return FetchResult(fingerprint=fingerprint, unchanged=True, complete=complete)
        return FetchResult(
            events=events, problems=problems, complete=complete, fingerprint=fingerprint
        )

    def write_back(self, uid: str, recurrence_id: str, state: str) -> None:
        """Mirror a visit's state onto its Outlook entry as a ``visitwatch: ...`` category.

        The entry's categories are read just before the change and merged: a worker may
        have set "Help" or "Safe" since the last poll, and only visitwatch's own labels are
        ever replaced or removed.
        """
        if not self.writes_back:
            return
        found = self._index.get((uid, recurrence_id))
        if found is None:
            log.info("graph.write_back_unknown", source=self.name)
            return
        mailbox, graph_id, _categories = found
        path = f"{mailbox_path(mailbox)}/events/{quote(graph_id, safe='')}"
        try:
            current_entry = self.client.get(path, params={"$select": "categories"}, mailbox=mailbox)
        except GraphError as err:
            if err.status == 404:
                # Deleted since the poll: nothing to mark; the next sync sees it gone.
                log.info("graph.write_back_gone", source=self.name, mailbox=mailbox)
                return
            raise ConnectorError(
                f"source {self.name!r}: cannot read the entry to mark in {mailbox}: {err}",
                permanent=err.permanent,
            ) from err
        current = [str(c) for c in current_entry.get("categories") or []]
        wanted = [c for c in current if not _is_label(c)]
        if state in WRITE_BACK_CATEGORIES:
            wanted.append(WRITE_BACK_CATEGORIES[state])
        if wanted != current:
            try:
                self.client.request("PATCH", path, json={"categories": wanted}, mailbox=mailbox)
            except GraphError as err:
                raise ConnectorError(
                    f"source {self.name!r}: cannot mark the entry in {mailbox}: {err}",
                    permanent=err.permanent,
                ) from err
            log.info("graph.written_back", source=self.name, mailbox=mailbox, state=state)
        self._index[(uid, recurrence_id)] = (mailbox, graph_id, tuple(wanted))

    def check(self) -> str:
        token = self.client.token()
        roles = _token_roles(token)
        note = self._check_roles(roles) if roles is not None else ""
        now = datetime.now(UTC)
        window = _utc_window(TimeWindow.around(now, timedelta(days=1), timedelta(days=14)))
        parts = [f"token ok ({note})" if note else "token ok"]
        failures: list[ConnectorError] = []
        for mailbox in self.mailboxes:
            try:
                targets, missing = self._targets(mailbox)
                if missing:
                    raise ConnectorError(missing[0], permanent=True)
                count = 0
                for target in targets:
                    raws = self._read_full(target, window)
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
        self._save_state()

    # ------------------------------------------------------------------ calendars

    def _targets(self, mailbox: str) -> tuple[list[_Target], list[str]]:
        """The calendars to read in ``mailbox``, and a reason for each one not found."""
        base = mailbox_path(mailbox)
        if not self.calendars:
            return [_Target(mailbox, "", base)], []
        ids = self._calendar_ids.get(mailbox)
        if ids is None:
            ids = {}
            for page in self.client.pages(
                f"{base}/calendars", params={"$select": "id,name"}, mailbox=mailbox
            ):
                for calendar in page.get("value", []):
                    cal_id, cal_name = str(calendar.get("id", "")), str(calendar.get("name", ""))
                    ids[cal_id] = cal_id
                    ids.setdefault(cal_name.casefold(), cal_id)
        targets: list[_Target] = []
        missing: list[str] = []
        for wanted in self.calendars:
            cal_id = ids.get(wanted) or ids.get(wanted.casefold())
            if cal_id is None:
                missing.append(
                    f"mailbox {mailbox}: no calendar named {wanted!r}; check the calendars "
                    "setting against the calendar's name in Outlook"
                )
                continue
            targets.append(_Target(mailbox, wanted, f"{base}/calendars/{quote(cal_id, safe='')}"))
        if not missing:
            # Kept only when complete: a calendar created after a typo is noticed next time.
            self._calendar_ids[mailbox] = ids
        return targets, missing

    # ------------------------------------------------------------------ reading

    def _plan(self, target: _Target, window: TimeWindow, span: TimeWindow) -> _Plan:
        if self.use_delta and target.ident not in self._no_delta:
            key = _delta_key(target, span)
            state = self._deltas.get(key)
            if state is not None:
                return _Plan(target, True, state.link, key)
            params = {"startDateTime": _iso(span.start), "endDateTime": _iso(span.end)}
            return _Plan(target, True, f"{target.prefix}/calendarView/delta?{_query(params)}", key)
        return _Plan(target, False, self._full_url(target, window))

    def _full_url(self, target: _Target, window: TimeWindow) -> str:
        params = {
            "startDateTime": _iso(window.start),
            "endDateTime": _iso(window.end),
            "$select": SELECT,
        }
        return f"{target.prefix}/calendarView?{_query(params)}"

    def _prefetch(self, plans: list[_Plan]) -> dict[str, dict[str, Any]]:
        """First pages of several calendars in one ``$batch`` (inner answers by plan index)."""
        batchable = []
        for index, plan in enumerate(plans):
            relative = self._relative(plan.url)
            if relative is not None:
                batchable.append(
                    {
                        "id": str(index),
                        "method": "GET",
                        "url": relative,
                        "headers": {"Prefer": self.prefer},
                    }
                )
        if len(batchable) < 2:
            return {}
        try:
            return self.client.batch(batchable)
        except GraphError as err:
            # The batch itself failed: read each calendar on its own, which judges each.
            log.warning("graph.batch_failed", source=self.name, status=err.status)
            return {}

    def _relative(self, url: str) -> str | None:
        if url.startswith("/"):
            return url
        base = self.client.base
        if url.startswith(base + "/"):
            return url[len(base) :]
        return None  # a link to another host cannot go through our $batch

    def _first_page(self, plan: _Plan, inner: dict[str, Any] | None) -> dict[str, Any]:
        mailbox = plan.target.mailbox
        if inner is not None:
            status = int(inner.get("status") or 0)
            if 200 <= status < 300:
                body = inner.get("body")
                return body if isinstance(body, dict) else {}
            if status not in _RETRY_DIRECT:
                raise self.client.error(_as_response(inner), mailbox)
        return self.client.get(plan.url, headers={"Prefer": self.prefer}, mailbox=mailbox)

    def _read(
        self,
        plan: _Plan,
        inner: dict[str, Any] | None,
        window: TimeWindow,
        span: TimeWindow,
    ) -> list[dict[str, Any]]:
        if not plan.delta:
            return self._read_full(plan.target, window, self._first_page(plan, inner))
        try:
            return self._read_delta(plan, inner, span)
        except GraphError as err:
            if err.status == 410 or err.code.casefold() in EXPIRED_DELTA_CODES:
                # The round is gone on Graph's side: read everything now, and start a new
                # round on the next fetch.
                self._deltas.pop(plan.key, None)
                log.info("graph.delta_expired", source=self.name, mailbox=plan.target.mailbox)
            elif err.status == 501 or (err.status == 400 and err.code in _DELTA_REFUSED_CODES):
                self._no_delta.add(plan.target.ident)
                self._drop_deltas(plan.target)
                log.warning(
                    "graph.delta_refused",
                    source=self.name,
                    mailbox=plan.target.mailbox,
                    status=err.status,
                    code=err.code,
                )
            else:
                raise
        return self._read_full(plan.target, window)

    def _read_full(
        self, target: _Target, window: TimeWindow, first: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        headers = {"Prefer": self.prefer}
        page = first
        if page is None:
            page = self.client.get(
                self._full_url(target, window), headers=headers, mailbox=target.mailbox
            )
        raws: list[dict[str, Any]] = list(page.get("value", []))
        while page.get("@odata.nextLink"):
            page = self.client.get(page["@odata.nextLink"], headers=headers, mailbox=target.mailbox)
            raws.extend(page.get("value", []))
        return raws

    def _read_delta(
        self, plan: _Plan, inner: dict[str, Any] | None, span: TimeWindow
    ) -> list[dict[str, Any]]:
        headers = {"Prefer": self.prefer}
        mailbox = plan.target.mailbox
        state = self._deltas.get(plan.key)
        page = self._first_page(plan, inner)
        changes: list[dict[str, Any]] = list(page.get("value", []))
        while page.get("@odata.nextLink"):
            page = self.client.get(page["@odata.nextLink"], headers=headers, mailbox=mailbox)
            changes.extend(page.get("value", []))
        # Work on a copy: a round that fails half-way must leave the last good state intact.
        events = dict(state.events) if state is not None else {}
        for item in changes:
            graph_id = str(item.get("id", ""))
            if not graph_id:
                continue
            removed = item.get("@removed")
            if removed is not None:
                if state is None:
                    continue  # the first round has nothing to remove from
                reason = str((removed or {}).get("reason", "")).lower()
                if reason == "deleted":
                    events.pop(graph_id, None)
                elif graph_id in events:
                    self._recheck(plan.target, graph_id, events)
                continue
            # Updates may carry only the changed properties: merge over what we had.
            events[graph_id] = {**events.get(graph_id, {}), **item}
        link = page.get("@odata.deltaLink")
        if link:
            if state is None:
                self._drop_deltas(plan.target)  # rounds of earlier days are no use now
            self._deltas[plan.key] = _DeltaState(str(link), events)
        else:
            self._deltas.pop(plan.key, None)
        log.info(
            "graph.delta_round",
            source=self.name,
            mailbox=mailbox,
            changes=len(changes),
            fresh=state is None,
        )
        return list(events.values())

    def _recheck(self, target: _Target, graph_id: str, events: dict[str, dict[str, Any]]) -> None:
        """An entry left the view for a reason other than deletion: see where it went."""
        path = f"{mailbox_path(target.mailbox)}/events/{quote(graph_id, safe='')}"
        try:
            fresh = self.client.get(
                f"{path}?{_query({'$select': SELECT})}",
                headers={"Prefer": self.prefer},
                mailbox=target.mailbox,
            )
        except GraphError as err:
            if err.status == 404:
                events.pop(graph_id, None)
            else:
                # Keep the copy we had: watching a moved visit a little longer is safe,
                # dropping one that is still on is not.
                log.warning(
                    "graph.recheck_failed",
                    source=self.name,
                    mailbox=target.mailbox,
                    status=err.status,
                )
            return
        events[graph_id] = {**events[graph_id], **fresh}

    def _drop_deltas(self, target: _Target) -> None:
        prefix = target.ident + "|"
        for key in [k for k in self._deltas if k.startswith(prefix)]:
            del self._deltas[key]

    # ------------------------------------------------------------------ mapping

    def _convert_all(
        self,
        collected: list[tuple[_Target, dict[str, Any]]],
        window: TimeWindow,
        problems: list[EventProblem],
    ) -> tuple[
        list[CalendarEvent],
        dict[tuple[str, str], tuple[str, str, tuple[str, ...]]],
        list[tuple[str, str, bool]],
    ]:
        events: list[CalendarEvent] = []
        index: dict[tuple[str, str], tuple[str, str, tuple[str, ...]]] = {}
        seen: list[tuple[str, str, bool]] = []
        positions: dict[tuple[str, str], int] = {}
        for target, raw in collected:
            if raw.get("type") == "seriesMaster" or "@removed" in raw:
                continue  # a master is not an occurrence; Graph sends those separately
            uid = _uid(raw)
            try:
                event = self._convert(raw, target, uid)
            except _Malformed as err:
                problems.append(EventProblem(self.name, uid, f"{target.mailbox}: {err}"))
                log.warning("graph.entry_skipped", source=self.name, mailbox=target.mailbox)
                continue
            if not _overlaps(event, window):
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
            index[(event.uid, event.recurrence_id)] = (
                target.mailbox,
                str(raw.get("id", "")),
                event.categories,
            )
            seen.append(
                (
                    str(raw.get("id", "")),
                    str(raw.get("changeKey", "")),
                    bool(raw.get("isCancelled")),
                )
            )
        events.sort(key=lambda e: (e.start, e.uid, e.recurrence_id))
        return events, index, seen

    def _convert(self, raw: dict[str, Any], target: _Target, uid: str) -> CalendarEvent:
        zone = self.context.timezone
        all_day = bool(raw.get("isAllDay"))
        start_value = raw.get("start")
        if not isinstance(start_value, dict) or not start_value.get("dateTime"):
            raise _Malformed("no start time")
        end_value = raw.get("end")
        has_end = isinstance(end_value, dict) and bool(end_value.get("dateTime"))
        if all_day:
            # An all-day entry is a date, not an instant: midnight in the organisation's zone.
            start = _all_day(start_value, zone)
            end = _all_day(end_value, zone) if has_end else start + timedelta(days=1)
        else:
            start = _graph_time(start_value)
            end = _graph_time(end_value) if has_end else None
        recurrence_id = ""
        if raw.get("type") in ("occurrence", "exception"):
            original = start
            if raw.get("originalStart"):
                try:
                    original = _parse_iso(str(raw["originalStart"]), UTC)
                except ValueError as err:
                    raise _Malformed(f"originalStart cannot be read ({err})") from None
            recurrence_id = original.astimezone(UTC).isoformat()
        mailbox = target.mailbox.lower()
        attendees = tuple(
            a
            for a in (_attendee(item) for item in raw.get("attendees") or [])
            if a.email and not (self.shared and a.email == mailbox)
        )
        sensitivity = str(raw.get("sensitivity") or "").lower()
        return CalendarEvent(
            source=self.name,
            uid=uid,
            recurrence_id=recurrence_id,
            subject=str(raw.get("subject") or ""),
            start=start,
            end=end,
            description=_description(raw),
            location=_location(raw),
            categories=tuple(str(c) for c in raw.get("categories") or []),
            attendees=attendees,
            organizer=_email(raw.get("organizer")),
            owner="" if self.shared else mailbox,
            all_day=all_day,
            cancelled=bool(raw.get("isCancelled")),
            private=sensitivity in ("private", "confidential") and not self.private_details,
            last_modified=_optional_time(raw.get("lastModifiedDateTime")),
        )

    # ------------------------------------------------------------------ check

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
        if self.settings.get("write_back") and "Calendars.ReadWrite" not in roles:
            return (
                f"write_back needs Calendars.ReadWrite, the token has only {shown}: grant "
                "it (Entra or RBAC for Applications) or set write_back = false"
            )
        return ""

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        try:
            data = json.loads(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            # A damaged cache costs one full read, nothing more.
            log.warning("graph.state_unreadable", source=self.name, error=type(err).__name__)
            return
        if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
            return
        mailboxes = {m.lower() for m in self.mailboxes}
        for key, value in (data.get("deltas") or {}).items():
            if key.split("|", 1)[0] in mailboxes and isinstance(value, dict) and value.get("link"):
                self._deltas[key] = _DeltaState(str(value["link"]), dict(value.get("events") or {}))
        self._no_delta = {str(i) for i in data.get("no_delta") or []}

    def _save_state(self) -> None:
        if not self.use_delta:
            return
        data = {
            "version": _STATE_VERSION,
            "deltas": {k: {"link": s.link, "events": s.events} for k, s in self._deltas.items()},
            "no_delta": sorted(self._no_delta),
        }
        tmp = self._state_file.with_suffix(".tmp")
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            # Entries hold visit details: readable by the service user only.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(tmp, self._state_file)
        except OSError as err:
            log.warning("graph.state_not_saved", source=self.name, error=err.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()


# ---------------------------------------------------------------------- helpers


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


def _mailbox_text(mailbox: str, err: Exception) -> str:
    text = str(err)
    return text if text.startswith("mailbox ") else f"mailbox {mailbox}: {text}"


def _utc_window(window: TimeWindow) -> TimeWindow:
    def fix(moment: datetime) -> datetime:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    return TimeWindow(fix(window.start), fix(window.end))


def _day_span(window: TimeWindow) -> TimeWindow:
    """The window widened to whole UTC days: the range of a delta round."""
    start = datetime.combine(window.start.date(), time(0), tzinfo=UTC)
    end = datetime.combine(window.end.date(), time(0), tzinfo=UTC) + timedelta(days=1)
    return TimeWindow(start, end)


def _delta_key(target: _Target, span: TimeWindow) -> str:
    return f"{target.ident}|{span.start.date().isoformat()}|{span.end.date().isoformat()}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _query(params: Mapping[str, str]) -> str:
    # "$" and "," stay readable: Graph accepts both, and logs and tests stay legible.
    return urlencode(params, safe="$,:", quote_via=quote)


def _as_response(inner: Mapping[str, Any]) -> requests.Response:
    """An inner $batch answer as a Response, so the client's error wording applies to it."""
    response = requests.Response()
    response.status_code = int(inner.get("status") or 0)
    body = inner.get("body")
    response._content = json.dumps(body if body is not None else {}).encode()
    response.headers.update({str(k): str(v) for k, v in (inner.get("headers") or {}).items()})
    return response


def _uid(raw: Mapping[str, Any]) -> str:
    """The entry's iCalendar UID, the same for every occurrence of a series.

    Graph gives each occurrence its own iCalUId: Outlook's GlobalObjectId with the
    occurrence's date in bytes 16-19. Zeroing them gives the series' id (what an ICS export
    calls UID); the recurrence id then tells the occurrences apart.
    """
    uid = str(raw.get("iCalUId") or raw.get("id") or "")
    if (
        raw.get("type") in ("occurrence", "exception")
        and uid.upper().startswith(_GOID_PREFIX)
        and len(uid) >= _GOID_DATE.stop
    ):
        uid = uid[: _GOID_DATE.start] + "00000000" + uid[_GOID_DATE.stop :]
    return uid


def _parse_iso(text: str, default_zone: tzinfo) -> datetime:
    # Graph writes seven fractional digits; Python reads at most six.
    value = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()))
    return value.replace(tzinfo=default_zone) if value.tzinfo is None else value


def _zone(name: str) -> tzinfo:
    """An IANA or Windows zone name (Graph uses both) as a tzinfo."""
    cleaned = name.strip()
    if not cleaned or cleaned.lower() in _UTC_NAMES:
        return UTC
    for candidate in (cleaned, WINDOWS_TO_OLSON.get(cleaned)):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    raise _Malformed(f"unknown time zone {cleaned!r}")


def _graph_time(value: Mapping[str, Any]) -> datetime:
    """A dateTimeTimeZone as aware UTC."""
    zone = _zone(str(value.get("timeZone") or "UTC"))
    try:
        return _parse_iso(str(value["dateTime"]), zone).astimezone(UTC)
    except ValueError:
        raise _Malformed(f"unreadable time {value.get('dateTime')!r}") from None


def _all_day(value: Mapping[str, Any], zone: tzinfo) -> datetime:
    text = str(value.get("dateTime") or "")
    try:
        day = datetime.fromisoformat(_FRACTION.sub(r"\1", text)).date()
    except ValueError:
        raise _Malformed(f"unreadable date {text!r}") from None
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _optional_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return _parse_iso(str(text), UTC).astimezone(UTC)
    except ValueError:
        return None  # only metadata: not worth losing the entry over


def _overlaps(event: CalendarEvent, window: TimeWindow) -> bool:
    if event.end is None or event.end <= event.start:
        return window.start <= event.start < window.end
    return event.start < window.end and event.end > window.start


def _email(recipient: Any) -> str:
    if not isinstance(recipient, Mapping):
        return ""
    address = (recipient.get("emailAddress") or {}).get("address") or ""
    return str(address).strip().lower()


def _attendee(item: Mapping[str, Any]) -> Attendee:
    status = str(((item.get("status") or {}).get("response")) or "").lower()
    return Attendee(
        email=_email(item),
        name=str((item.get("emailAddress") or {}).get("name") or ""),
        response=_RESPONSES.get(status, ""),
        role=_ROLES.get(str(item.get("type") or "").lower(), ""),
    )


def _description(raw: Mapping[str, Any]) -> str:
    body = raw.get("body") or {}
    content = str(body.get("content") or "")
    if content and str(body.get("contentType") or "text").lower() == "html":
        # Asked for text, given HTML anyway: keep line breaks, drop the markup.
        content = html.unescape(_TAG.sub("", _BREAK.sub("\n", content)))
    content = content.replace("\r\n", "\n").strip()
    return content or str(raw.get("bodyPreview") or "").strip()


def _location(raw: Mapping[str, Any]) -> str:
    location = raw.get("location") or {}
    text = str(location.get("displayName") or "").strip()
    address = location.get("address") or {}
    for key in ("street", "city", "postalCode"):
        part = str(address.get(key) or "").strip()
        if part and part.lower() not in text.lower():
            text = f"{text}, {part}" if text else part
    for other in raw.get("locations") or []:
        name = str((other or {}).get("displayName") or "").strip()
        if name and name.lower() not in text.lower():
            text = f"{text}; {name}" if text else name
    return text


def _fingerprint(
    seen: Iterable[tuple[str, str, bool]],
    span: TimeWindow,
    problems: list[EventProblem],
    complete: bool,
) -> str:
    # The day span, not the exact window: the window moves every poll, and hashing it would
    # make every poll look new. The entries that fall out of the window change the hash.
    digest = hashlib.sha256()
    digest.update(f"{_iso(span.start)}|{_iso(span.end)}|{complete}\n".encode())
    for graph_id, change_key, cancelled in sorted(seen):
        digest.update(f"{graph_id}|{change_key}|{cancelled}\n".encode())
    for problem in sorted(problems, key=lambda p: (p.uid, p.reason)):
        digest.update(f"!{problem.uid}|{problem.reason}\n".encode())
    return digest.hexdigest()


def _token_roles(token: str) -> set[str] | None:
    """The ``roles`` claim of an access token (not verified: Graph does that), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    return {str(r) for r in payload.get("roles") or []}
