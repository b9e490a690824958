"""What a calendar entry says about a visit, as the visit's columns.

Pure functions of the entry, what the policy read out of it, and the staff directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from visitwatch.core.calendar import CalendarEvent, EventProblem
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.config import Directory
from visitwatch.daemon.store import from_ts, ts
from visitwatch.daemon.visits import LADDER_RESET
from visitwatch.policies.model import Finding, PolicySettings, VisitDetails


def visit_id(source: str, uid: str, recurrence_id: str) -> str:
    digest = hashlib.sha256(f"{source}\x1f{uid}\x1f{recurrence_id}".encode()).hexdigest()
    return digest[:12]


def entry_fields(
    event: CalendarEvent,
    kind: str,
    details: VisitDetails,
    findings: list[Finding],
    policy: PolicySettings,
    directory: Directory,
) -> dict[str, Any]:
    """The visit's columns as an entry gives them (the sync adds its own bookkeeping)."""
    worker_id, worker_label, known = worker_of(event, details, directory)
    if not known:
        findings = [
            *findings,
            Finding(
                "worker_unknown",
                "warning",
                "visitwatch could not tell who is making this visit: add a line "
                '"Worker: <name or e-mail>" or invite the worker.',
                policy.clauses.get("worker_unknown", ""),
            ),
        ]
    end = event.end or event.start + policy.default_duration
    expected = details.expected_return
    return {
        "id": visit_id(event.source, event.uid, event.recurrence_id),
        "source": event.source,
        "uid": event.uid,
        "recurrence_id": event.recurrence_id,
        "kind": kind,
        "worker_id": worker_id,
        "worker_label": worker_label,
        "worker_known": int(known),
        "subject": event.subject,
        "address": details.address,
        "private": int(event.private),
        "start": ts(event.start),
        "end": ts(end),
        # Watched even when the entry gives no return time: the end stands in, and a
        # finding tells the worker to add one.
        "expected_return": ts(expected or end),
        "expected_return_from": details.expected_return_from if expected else "event_end",
        "risk_assessment": details.risk_assessment,
        "risk_assessment_complete": int(details.risk_assessment_complete),
        "worker_mobile": details.worker_mobile,
        "second_worker": details.second_worker,
        "pair_required": int(details.pair_required),
        "going_home_after": int(details.going_home_after),
        "findings": json.dumps([asdict(f) for f in findings]),
        "categories": json.dumps(list(event.categories)),
    }


def worker_of(
    event: CalendarEvent, details: VisitDetails, directory: Directory
) -> tuple[str, str, bool]:
    """Whose visit is this? The calendar's owner, a Worker: line, an attendee, the organiser."""
    candidates = [event.owner, details.worker_hint]
    candidates += [a.email for a in event.attendees if a.email != event.organizer]
    candidates.append(event.organizer)
    for candidate in candidates:
        member = directory.find(candidate) if candidate else None
        if member:
            return member.id, member.name, True
    label = details.worker_hint or next((a.name or a.email for a in event.attendees), "")
    label = label or event.organizer
    return (label.lower() if "@" in label else label), label, False


def watched_afresh(fields: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The changes that make an ended visit a new one to watch from its start."""
    has_errors = any(f["severity"] == "error" for f in json.loads(fields["findings"]))
    start = from_ts(fields["start"])
    assert start is not None
    return {
        **LADDER_RESET,
        "state": VisitState.BOOKED if start > now else VisitState.IN_PROGRESS,
        "deadline": fields["expected_return"],
        "extended_until": None,
        "help_requested_at": None,
        "checked_in_at": None,
        "checked_in_by": None,
        "ended_at": None,
        "prestart_notice_sent": int(not has_errors),
        "next_action_at": ts(now),
    }


def entry_fingerprint(fields: dict[str, Any], details: VisitDetails) -> str:
    material = {**fields, "checked_in": details.checked_in, "help": details.help_requested}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def duplicate(event: CalendarEvent) -> EventProblem:
    when = f"starting {event.start:%Y-%m-%d %H:%M} UTC"
    return EventProblem(
        event.source,
        event.uid,
        f"appears twice in the feed with the same UID, {when}: the second copy was ignored;"
        " give each entry its own UID",
    )
