"""Visits written straight into a benchmark's database: no calendar, no sync."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from visitwatch.daemon.store import Store, ts


def visit_row(
    index: int,
    *,
    start: datetime,
    end: datetime,
    state: str,
    next_action: datetime | None,
    worker: int | None = None,
) -> dict[str, Any]:
    """A home visit's row ending (and due back) at ``end``; ``worker``: one of many, or W."""
    worker_id = "w@example.org" if worker is None else f"worker{worker}@example.org"
    return {
        "id": f"{index:012x}", "source": "bench", "uid": f"uid-{index}", "recurrence_id": "",
        "kind": "home_visit", "worker_id": worker_id,
        "worker_label": "W" if worker is None else f"Worker {worker}", "worker_known": 1,
        "subject": "Home visit", "private": 0,
        "address": "1 Road" if worker is None else f"{index} Long Road, Preston",
        "start": ts(start), "end": ts(end), "expected_return": ts(end), "deadline": ts(end),
        "state": state, "findings": json.dumps([]), "next_action_at": ts(next_action),
        "first_seen": ts(start), "last_seen": ts(start), "updated": ts(start),
    }  # fmt: skip


def insert_visits(store: Store, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (all with the same columns) in one transaction."""
    with store.transaction() as conn:
        columns = list(rows[0])
        conn.executemany(
            f"INSERT INTO visits ({', '.join(repr(c) for c in columns)})"
            f" VALUES ({', '.join('?' * len(columns))})",
            [tuple(r[c] for c in columns) for r in rows],
        )
