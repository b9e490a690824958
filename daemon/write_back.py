"""Mirroring visit states onto calendar entries, for sources that can and are asked to.

Driven by the audit table (a change is written there in the same transaction as the change
itself), so a restart resumes where it stopped. Best effort: this is a courtesy for office
staff watching Outlook, never a substitute for an alert.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.errors import ConnectorError
from visitwatch.daemon import lifecycle
from visitwatch.daemon.store import Store

log = structlog.get_logger(__name__)

# The states an office sees on the entry; the others stay between visitwatch and its people.
MIRRORED_STATES = (
    lifecycle.OVERDUE,
    lifecycle.ESCALATED,
    lifecycle.RESOLVED,
    lifecycle.ACKNOWLEDGED,
)
# Audit rows read per pass; the loop runs again for the rest.
PASS_SIZE = 200


def write_back_pass(store: Store, sources: Mapping[str, CalendarSource]) -> int:
    """Mirror the next audited state changes; how many entries were written."""
    writers = {name: source for name, source in sources.items() if source.writes_back}
    if not writers:
        return 0
    last = int(store.get_meta("write_back_audit_id") or 0)
    rows = store.query(
        "SELECT a.id, a.to_state, v.source, v.uid, v.recurrence_id FROM audit a"
        " JOIN visits v ON v.id = a.visit_id WHERE a.id > ? AND a.to_state IN"
        f" ({', '.join('?' * len(MIRRORED_STATES))}) ORDER BY a.id LIMIT {PASS_SIZE}",
        (last, *MIRRORED_STATES),
    )
    done = 0
    for row in rows:
        source = writers.get(row["source"])
        if source is not None:
            try:
                source.write_back(row["uid"], row["recurrence_id"], row["to_state"])
                done += 1
            except ConnectorError as err:
                log.warning("write_back_failed", source=row["source"], error=str(err))
        last = row["id"]
    store.set_meta("write_back_audit_id", str(last))
    return done
