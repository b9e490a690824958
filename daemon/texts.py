"""The same news as :mod:`messages`, for a text message: two SMS segments, the link whole.

A text is read on a lock screen, often by someone driving between visits, so it says only
what makes a person act: who, how late, where (when the policy allows), and the link that
opens everything else. The worker's texts invite a reply (SAFE, EXTEND 30, HELP) only when
a channel that hears replies is configured: a reply nobody reads is worse than none.
"""

from __future__ import annotations

from datetime import datetime

from visitwatch.core import sms
from visitwatch.core.notification import NotificationKind
from visitwatch.core.phone import readable
from visitwatch.daemon.messages import VisitView, minutes_between


def _who(view: VisitView) -> str:
    return view.worker_name if view.policy.text_names else "A colleague"


def _where(view: VisitView) -> str:
    address = view.visit.address.strip()
    return f" at {address}" if address and view.policy.text_address else ""


def _hhmm(view: VisitView, moment: datetime | None) -> str:
    return f"{moment.astimezone(view.tz):%H:%M}" if moment else "an unknown time"


def _mobile(view: VisitView) -> str:
    return f" Mobile {readable(view.worker_mobile)}." if view.worker_mobile else ""


def alert(
    view: VisitView, kind: str, now: datetime, relation: str, short_link: str, replies: bool
) -> str:
    """A reminder to the worker, or an overrun, escalation or help alert to others."""
    deadline = view.visit.deadline
    late = minutes_between(now, deadline) if deadline else 0
    if kind == NotificationKind.REMINDER and relation == "worker":
        body = f"visitwatch: your {view.label} was due to end at {_hhmm(view, deadline)}."
        if replies:
            body += " Safe? Reply SAFE, EXTEND 30 or HELP."
        elif short_link:
            body += " Safe? Check in:"
        return sms.fit(body, short_link)
    who = _who(view)
    if kind == NotificationKind.HELP:
        body = f"HELP REQUESTED by {who} on a {view.label}{_where(view)}. Act now."
    elif view.visit.acknowledged_by:
        body = (
            f"STILL NOT SAFE: {who} is {late} min overdue{_where(view)}; acknowledged by "
            f"{view.visit.acknowledged_by}, nobody has confirmed them safe."
        )
    elif kind == NotificationKind.ESCALATION:
        body = f"ESCALATION: {who} is {late} min overdue{_where(view)}; nobody has acknowledged."
    else:
        body = f"OVERDUE: {who} is {late} min past the expected return{_where(view)}."
    return sms.fit(body + _mobile(view), short_link)


def compliance(view: VisitView, relation: str, short_link: str) -> str:
    whose = "Your" if relation == "worker" else f"{_who(view)}'s"
    missing = "; ".join(f.message for f in view.findings()) or "details"
    local = view.visit.start.astimezone(view.tz) if view.visit.start else None
    when = f"{local:%a %H:%M}" if local else "soon"
    body = f"visitwatch: {whose} {view.label} {when} is missing: {missing}."
    return sms.fit(body, short_link)


def resolution(view: VisitView, kind: str, by: str) -> str:
    who = _who(view)
    if kind == NotificationKind.ALL_CLEAR:
        body = f"All clear: {who} is safe ({by})."
        if view.visit.help_requested_at is not None:
            body += f" They asked for help at {_hhmm(view, view.visit.help_requested_at)}: if in doubt, phone them."
    elif kind == NotificationKind.EXTENDED:
        body = f"{who} extended the {view.label}; now due back {_hhmm(view, view.visit.deadline)}."
    elif kind == NotificationKind.ACKNOWLEDGED:
        body = f"{by} is handling the alert about {who}. Not yet confirmed safe."
    else:
        body = f"{who}'s {view.label} is no longer watched: it was {by}. Unsure? Contact them."
    return sms.fit(body)


def plain(subject: str) -> str:
    """Admin notices and anything without a visit: the subject is the news."""
    return sms.fit(subject)
