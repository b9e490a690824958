"""Delta rounds of ``calendarView/delta``: what is kept between reads, and on disk.

A delta round is bound to the date range of its first request (the range is encoded in the
state token), so the range is the requested window widened to whole UTC days, and a new
round starts when the window moves to another day. Between rounds the ``@odata.deltaLink``
and the current events are kept per (mailbox, calendar, first day, last day), in memory and
in a file under ``state_dir`` so a restart continues the round. The calendars where Graph
refused delta are kept there too.

Graph marks a removed entry ``{"id": ..., "@removed": {"reason": ...}}``, and documents only
``deleted`` for events. Only ``deleted`` drops an event; any other reason is for the caller
to re-check (see :func:`apply_changes`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import structlog

from visitwatch.connectors.graph_targets import Target
from visitwatch.core.calendar import TimeWindow
from visitwatch.core.private_files import make_dirs

log = structlog.get_logger(__name__)

_STATE_VERSION = 1

Events = dict[str, dict[str, Any]]  # Graph id -> the entry as last read


@dataclass
class DeltaState:
    link: str
    events: Events = field(default_factory=dict)


def day_span(window: TimeWindow) -> TimeWindow:
    """The window widened to whole UTC days: the range of a delta round."""
    start = datetime.combine(window.start.date(), time(0), tzinfo=UTC)
    end = datetime.combine(window.end.date(), time(0), tzinfo=UTC) + timedelta(days=1)
    return TimeWindow(start, end)


def delta_key(target: Target, span: TimeWindow) -> str:
    return f"{target.ident}|{span.start.date().isoformat()}|{span.end.date().isoformat()}"


def apply_changes(
    previous: Events | None,
    changes: Iterable[dict[str, Any]],
    recheck: Callable[[str, Events], None],
) -> Events:
    """The events of a round after ``changes``, on a copy of ``previous`` (None: a first round).

    A removal with a reason other than ``deleted`` (or none) is handed to ``recheck``, which
    updates or drops that entry in the events it is given.
    """
    # Work on a copy: a round that fails half-way must leave the last good state intact.
    events = dict(previous) if previous is not None else {}
    for item in changes:
        graph_id = str(item.get("id", ""))
        if not graph_id:
            continue
        removed = item.get("@removed")
        if removed is not None:
            if previous is None:
                continue  # the first round has nothing to remove from
            reason = str((removed or {}).get("reason", "")).lower()
            if reason == "deleted":
                events.pop(graph_id, None)
            elif graph_id in events:
                recheck(graph_id, events)
            continue
        # Updates may carry only the changed properties: merge over what we had.
        events[graph_id] = {**events.get(graph_id, {}), **item}
    return events


class DeltaStore:
    """The rounds under way and the calendars without delta, kept in ``path``."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        self.rounds: dict[str, DeltaState] = {}
        self.refused: set[str] = set()  # target idents where Graph refused delta

    def drop(self, target: Target) -> None:
        """Forget every round of ``target`` (rounds of earlier days are no use now)."""
        prefix = target.ident + "|"
        for key in [k for k in self.rounds if k.startswith(prefix)]:
            del self.rounds[key]

    def refuse(self, target: Target) -> None:
        """Graph will not give ``target`` a delta: read it in full from now on."""
        self.refused.add(target.ident)
        self.drop(target)

    def load(self, mailboxes: Iterable[str]) -> None:
        """Read the rounds of ``mailboxes`` from the file; a damaged file costs a full read."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            # A damaged cache costs one full read, nothing more.
            log.warning("graph.state_unreadable", source=self.source, error=type(err).__name__)
            return
        if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
            return
        wanted = {m.lower() for m in mailboxes}
        for key, value in (data.get("deltas") or {}).items():
            if key.split("|", 1)[0] in wanted and isinstance(value, dict) and value.get("link"):
                self.rounds[key] = DeltaState(str(value["link"]), dict(value.get("events") or {}))
        self.refused = {str(i) for i in data.get("no_delta") or []}

    def save(self) -> None:
        data = {
            "version": _STATE_VERSION,
            "deltas": {k: {"link": s.link, "events": s.events} for k, s in self.rounds.items()},
            "no_delta": sorted(self.refused),
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            make_dirs(self.path.parent)
            # Entries hold visit details: readable by the service user only.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("graph.state_not_saved", source=self.source, error=err.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()
