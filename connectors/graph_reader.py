"""Reading calendars through Graph: full ``calendarView`` reads and delta rounds.

Each calendar is read as a ``calendarView``: Graph expands recurring series itself, so what
arrives is single events, occurrences and exceptions (and, in a delta round, series
masters, which the caller skips). Times are asked for in UTC
(``Prefer: outlook.timezone="UTC"``). The first pages of several calendars travel together
in one ``$batch``; an inner answer that was throttled is asked again as a plain request,
which retries with backoff.

With delta on, a removal Graph did not explain as ``deleted`` re-reads the event by id:
gone (404) drops it, found updates it (the window filter then decides), and any other answer
keeps the copy we had, so a visit still in the window is never ended by a removal Graph did
not explain. A round Graph has forgotten is read in full, and a new round starts next time;
a calendar where Graph refuses delta is read in full from then on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import structlog

from visitwatch.connectors.graph_client import GraphClient, mailbox_path
from visitwatch.connectors.graph_delta import (
    DeltaState,
    DeltaStore,
    Events,
    apply_changes,
    delta_key,
)
from visitwatch.connectors.graph_errors import GraphError, graph_error, is_expired_delta
from visitwatch.connectors.graph_mapping import SELECT
from visitwatch.connectors.graph_targets import Target
from visitwatch.core.calendar import TimeWindow

log = structlog.get_logger(__name__)

# Calendars (some shared or resource calendars) where calendarView/delta is refused.
_DELTA_REFUSED_CODES = frozenset(
    {"ErrorInvalidRequest", "NotSupported", "ErrorNotSupported", "ErrorInvalidUrlQuery"}
)
# Inner $batch answers worth one more try as a plain request (which retries with backoff).
_RETRY_DIRECT = frozenset({429, 500, 502, 503, 504})

Raw = dict[str, Any]  # one Graph event resource


@dataclass
class Plan:
    """The first request for one target in this fetch."""

    target: Target
    delta: bool
    url: str  # relative to the Graph base ("/users/...") or an absolute deltaLink
    key: str = ""  # the delta state key, when delta


class CalendarReader:
    """Reads targets' entries through ``client``, keeping delta rounds in ``deltas``."""

    def __init__(
        self,
        client: GraphClient,
        deltas: DeltaStore,
        *,
        source: str,
        use_delta: bool,
        page_size: int,
    ) -> None:
        self.client = client
        self.deltas = deltas
        self.source = source
        self.use_delta = use_delta
        self.prefer = (
            'outlook.timezone="UTC", outlook.body-content-type="text", '
            f"odata.maxpagesize={page_size}"
        )

    def plan(self, target: Target, window: TimeWindow, span: TimeWindow) -> Plan:
        if self.use_delta and target.ident not in self.deltas.refused:
            key = delta_key(target, span)
            state = self.deltas.rounds.get(key)
            if state is not None:
                return Plan(target, True, state.link, key)
            params = {"startDateTime": utc_param(span.start), "endDateTime": utc_param(span.end)}
            return Plan(target, True, f"{target.prefix}/calendarView/delta?{_query(params)}", key)
        return Plan(target, False, self._full_url(target, window))

    def prefetch(self, plans: list[Plan]) -> dict[str, dict[str, Any]]:
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
            log.warning("graph.batch_failed", source=self.source, status=err.status)
            return {}

    def read(
        self,
        plan: Plan,
        inner: dict[str, Any] | None,
        window: TimeWindow,
        span: TimeWindow,
    ) -> list[Raw]:
        """The target's entries (``inner``: its first page's answer from a ``$batch``)."""
        if not plan.delta:
            return self.read_full(plan.target, window, self._first_page(plan, inner))
        try:
            return self._read_delta(plan, inner, span)
        except GraphError as err:
            if is_expired_delta(err):
                # The round is gone on Graph's side: read everything now, and start a new
                # round on the next fetch.
                self.deltas.rounds.pop(plan.key, None)
                log.info("graph.delta_expired", source=self.source, mailbox=plan.target.mailbox)
            elif err.status == 501 or (err.status == 400 and err.code in _DELTA_REFUSED_CODES):
                self.deltas.refuse(plan.target)
                log.warning(
                    "graph.delta_refused",
                    source=self.source,
                    mailbox=plan.target.mailbox,
                    status=err.status,
                    code=err.code,
                )
            else:
                raise
        return self.read_full(plan.target, window)

    def read_full(
        self, target: Target, window: TimeWindow, first: dict[str, Any] | None = None
    ) -> list[Raw]:
        """Every entry of ``target`` in ``window``, page by page."""
        page = first
        if page is None:
            page = self.client.get(
                self._full_url(target, window),
                headers={"Prefer": self.prefer},
                mailbox=target.mailbox,
            )
        return self._all_pages(page, target.mailbox)[0]

    # ------------------------------------------------------------------ internals

    def _all_pages(self, first: dict[str, Any], mailbox: str) -> tuple[list[Raw], dict[str, Any]]:
        """The entries of ``first`` and of every page after it, and the last page."""
        page = first
        raws: list[Raw] = list(page.get("value", []))
        while page.get("@odata.nextLink"):
            page = self.client.get(
                page["@odata.nextLink"], headers={"Prefer": self.prefer}, mailbox=mailbox
            )
            raws.extend(page.get("value", []))
        return raws, page

    def _full_url(self, target: Target, window: TimeWindow) -> str:
        params = {
            "startDateTime": utc_param(window.start),
            "endDateTime": utc_param(window.end),
            "$select": SELECT,
        }
        return f"{target.prefix}/calendarView?{_query(params)}"

    def _relative(self, url: str) -> str | None:
        if url.startswith("/"):
            return url
        base = self.client.base
        if url.startswith(base + "/"):
            return url[len(base) :]
        return None  # a link to another host cannot go through our $batch

    def _first_page(self, plan: Plan, inner: dict[str, Any] | None) -> dict[str, Any]:
        mailbox = plan.target.mailbox
        if inner is not None:
            status = int(inner.get("status") or 0)
            if 200 <= status < 300:
                body = inner.get("body")
                return body if isinstance(body, dict) else {}
            if status not in _RETRY_DIRECT:
                raise graph_error(status, inner.get("body"), mailbox)
        return self.client.get(plan.url, headers={"Prefer": self.prefer}, mailbox=mailbox)

    def _read_delta(self, plan: Plan, inner: dict[str, Any] | None, span: TimeWindow) -> list[Raw]:
        state = self.deltas.rounds.get(plan.key)
        changes, last = self._all_pages(self._first_page(plan, inner), plan.target.mailbox)
        events = apply_changes(
            state.events if state is not None else None,
            changes,
            lambda graph_id, current: self._recheck(plan.target, graph_id, current),
        )
        link = last.get("@odata.deltaLink")
        if link:
            if state is None:
                self.deltas.drop(plan.target)  # rounds of earlier days are no use now
            self.deltas.rounds[plan.key] = DeltaState(str(link), events)
        else:
            self.deltas.rounds.pop(plan.key, None)
        log.info(
            "graph.delta_round",
            source=self.source,
            mailbox=plan.target.mailbox,
            changes=len(changes),
            fresh=state is None,
        )
        return list(events.values())

    def _recheck(self, target: Target, graph_id: str, events: Events) -> None:
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
                    source=self.source,
                    mailbox=target.mailbox,
                    status=err.status,
                )
            return
        events[graph_id] = {**events[graph_id], **fresh}


def utc_param(moment: datetime) -> str:
    """A moment as Graph's query parameters take it: UTC, whole seconds, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _query(params: Mapping[str, str]) -> str:
    # "$" and "," stay readable: Graph accepts both, and logs and tests stay legible.
    return urlencode(params, safe="$,:", quote_via=quote)
