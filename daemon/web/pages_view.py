"""What the one-tap pages say: a visit's state in plain words, people by name, who was told.

Nothing here changes the record; :mod:`pages` acts, this module only reads and words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote_plus

from visitwatch.core.notification import NotificationKind
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.messages import fmt_local, minutes_between, plural
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import Visit
from visitwatch.daemon.web.context import WebContext

MAPS_SEARCH = "https://www.google.com/maps/search/?api=1&query="


@dataclass(frozen=True)
class Told:
    """One person a page's action queued a notification for."""

    name: str
    relation: str  # in plain words: "manager", "director", "acknowledged"

    def __str__(self) -> str:
        return f"{self.name} ({self.relation})" if self.relation else self.name


def person_name(context: WebContext, person: str) -> str:
    """A token's person as staff know them: the directory's name, else the id itself."""
    member = context.watcher.staff.current.get(person)
    return member.name if member and member.name else person


def relation_words(relation: str) -> str:
    """``role:director`` -> ``director``; ``manager (fallback: role x)`` stays readable."""
    return relation.removeprefix("role:").replace("(fallback: role ", "(standing in as ").strip()


def local(context: WebContext, moment: datetime | None) -> str:
    return fmt_local(moment, context.config.daemon.timezone) if moment else "not given"


def clock_time(context: WebContext, moment: datetime | None) -> str:
    """Just the local time of day, for "resolved at 14:05"."""
    if moment is None:
        return "an unknown time"
    return f"{moment.astimezone(context.config.daemon.timezone):%H:%M}"


def subject_of(visit: Visit) -> str:
    # Private entries may name the family in their subject: never show it.
    return "(private entry)" if visit.private else (visit.subject or "(no title)")


def kind_label(visit: Visit) -> str:
    return "lone-working session" if visit.kind == "lone_working" else "home visit"


def maps_link(address: str) -> str:
    return MAPS_SEARCH + quote_plus(address) if address.strip() else ""


def tel_link(mobile: str) -> str:
    """``tel:`` with only what a dialler takes (digits and a leading +)."""
    digits = re.sub(r"[^\d+]", "", mobile)
    return f"tel:{digits}" if digits.strip("+") else ""


def alert_kind(context: WebContext, visit: Visit) -> NotificationKind:
    """The alert a manager's link most likely came from, for the policy's instruction: help,
    removal, else the last rung that fired (a worker's reminder reads as an overrun here)."""
    if visit.help_requested_at is not None:
        return NotificationKind.HELP
    if visit.removed_at is not None:
        return NotificationKind.REMOVED
    ladder = context.watcher.ladder
    fired = ladder[min(visit.step, len(ladder)) - 1].kind if visit.step and ladder else None
    return (
        NotificationKind.ESCALATION
        if fired == NotificationKind.ESCALATION
        else NotificationKind.OVERRUN
    )


def ended_words(context: WebContext, visit: Visit, already: bool = True) -> str:
    """Why a finished visit can no longer be acted on, with when and who."""
    at = clock_time(context, visit.ended_at)
    if visit.state is VisitState.RESOLVED:
        who = visit.checked_in_by or visit.acknowledged_by or "someone"
        was = "was already" if already else "was"
        return f"This visit {was} resolved at {at} by {who}. Nothing more is needed."
    if visit.state is VisitState.CANCELLED:
        return (
            f"This visit is no longer watched: its calendar entry was cancelled or removed "
            f"at {at}. If you are not sure the worker is safe, phone them."
        )
    return (
        "This visit was first seen after it had already ended, so it was recorded but "
        "never watched. Nothing can be done with this link."
    )


def state_words(
    context: WebContext, visit: Visit, now: datetime, for_worker: bool, already: bool = True
) -> str:
    """Where the visit is, as the person holding the link needs to hear it."""
    state = visit.state
    deadline = local(context, visit.deadline)
    you = "you" if for_worker else "the worker"
    if state.terminal:
        return ended_words(context, visit, already)
    if visit.help_requested_at is not None:
        return (
            f"Help was asked for at {clock_time(context, visit.help_requested_at)}: "
            "everyone on the alert list has been told."
        )
    if state is VisitState.BOOKED:
        return f"Booked: starts {local(context, visit.start)}. Not started yet."
    if state is VisitState.IN_PROGRESS:
        return f"Under way. Expected back by {deadline}."
    minutes = minutes_between(now, visit.deadline)
    if state is VisitState.DUE:
        late = f"{plural(minutes, 'minute')} ago" if minutes else "just now"
        return f"The return time, {deadline}, passed {late}; {you} have been reminded."
    if state is VisitState.ACKNOWLEDGED:
        return (
            f"{visit.acknowledged_by} is handling the alert (since "
            f"{clock_time(context, visit.acknowledged_at)}); nobody has confirmed the worker "
            "is safe yet."
        )
    who = "the manager has" if state is VisitState.OVERDUE else "the manager and director have"
    return f"Overdue by {plural(minutes, 'minute')}: {who} been alerted."


def told_since(store: Store, visit_id: str, since: datetime, kinds: tuple[str, ...]) -> list[Told]:
    """Who was queued a ``kinds`` notification for the visit at or after ``since``."""
    marks = ", ".join("?" for _ in kinds)
    rows = store.query(
        "SELECT recipient_name, recipient_relation FROM notifications WHERE visit_id = ?"
        f" AND created >= ? AND kind IN ({marks}) AND fallback_of IS NULL"
        " GROUP BY recipient_id ORDER BY MIN(id)",
        (visit_id, ts(since), *kinds),
    )
    return [Told(r["recipient_name"], relation_words(r["recipient_relation"])) for r in rows]


def help_list(context: WebContext, visit: Visit) -> list[Told]:
    """Who a help request would alert now: every rung of the ladder, but the worker."""
    watcher = context.watcher
    targets = [target for step in watcher.ladder for target in step.to]
    people = []
    for addressee in watcher.recipients.addressees(targets, visit):
        if addressee.relation == "worker":
            continue
        if watcher.router.channels_for(NotificationKind.HELP, addressee.recipient):
            people.append(Told(addressee.recipient.name, relation_words(addressee.relation)))
    return people


def departure(store: Store, visit: Visit) -> datetime | None:
    """When the worker said they had left a going-home visit (``left`` check-in), if they did."""
    row = store.one(
        "SELECT MAX(at) AS at FROM checkins WHERE visit_id = ? AND action = 'left' AND at >= ?",
        (visit.id, ts(visit.start)),
    )
    return from_ts(row["at"]) if row and row["at"] else None
