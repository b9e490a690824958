"""Write-back: a visit's state shown on its Outlook entry as a ``visitwatch: ...`` category.

The entry's categories are read just before the change and merged: a worker may have set
"Help" or "Safe" since the last poll, and only visitwatch's own labels are ever replaced or
removed. A courtesy, never an alert: the caller logs a failure and moves on.
"""

from __future__ import annotations

from urllib.parse import quote

import structlog

from visitwatch.connectors.graph_client import GraphClient, mailbox_path
from visitwatch.connectors.graph_errors import GraphError
from visitwatch.core.errors import ConnectorError
from visitwatch.core.visit_state import VisitState

log = structlog.get_logger(__name__)

# Labels write_back puts on an entry, by visit state. They carry visitwatch's prefix so they
# can never be mistaken for a check-in or help category ("Safe", "Checked in", "Help"), and
# so that only they are ever removed: a category without the prefix is a person's.
LABEL_PREFIX = "visitwatch: "
WRITE_BACK_CATEGORIES: dict[str, str] = {
    VisitState.RESOLVED: "visitwatch: safe",
    VisitState.OVERDUE: "visitwatch: overdue",
    VisitState.ESCALATED: "visitwatch: escalated",
}


def is_label(category: str) -> bool:
    """A category visitwatch wrote (any state, this version or a later one)."""
    return " ".join(category.split()).casefold().startswith(LABEL_PREFIX.strip().casefold())


def merged_categories(current: list[str], state: str) -> list[str]:
    """``current`` with visitwatch's labels replaced by the one for ``state`` (if any)."""
    wanted = [c for c in current if not is_label(c)]
    if state in WRITE_BACK_CATEGORIES:
        wanted.append(WRITE_BACK_CATEGORIES[state])
    return wanted


def label_entry(
    client: GraphClient, source: str, mailbox: str, graph_id: str, state: str
) -> tuple[str, ...] | None:
    """Label the entry ``graph_id`` in ``mailbox`` for ``state``; its categories now.

    None when the entry no longer exists (the next read sees it gone). Raises
    :class:`ConnectorError` naming ``source`` when it cannot be read or changed.
    """
    path = f"{mailbox_path(mailbox)}/events/{quote(graph_id, safe='')}"
    try:
        entry = client.get(path, params={"$select": "categories"}, mailbox=mailbox)
    except GraphError as err:
        if err.status == 404:
            # Deleted since the poll: nothing to mark; the next sync sees it gone.
            log.info("graph.write_back_gone", source=source, mailbox=mailbox)
            return None
        raise ConnectorError(
            f"source {source!r}: cannot read the entry to mark in {mailbox}: {err}",
            permanent=err.permanent,
        ) from err
    current = [str(c) for c in entry.get("categories") or []]
    wanted = merged_categories(current, state)
    if wanted != current:
        try:
            client.request("PATCH", path, json={"categories": wanted}, mailbox=mailbox)
        except GraphError as err:
            raise ConnectorError(
                f"source {source!r}: cannot mark the entry in {mailbox}: {err}",
                permanent=err.permanent,
            ) from err
        log.info("graph.written_back", source=source, mailbox=mailbox, state=state)
    return tuple(wanted)
