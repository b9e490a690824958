"""The words people receive. One function per notification kind; plain text.

Alerts carry what a manager needs to act without opening anything else: who, where, since
when, how to reach them, what the policy says to do, and how to acknowledge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from visitwatch.core.notification import NotificationKind
from visitwatch.core.phone import readable
from visitwatch.daemon.visits import Visit
from visitwatch.policies.model import Finding, PolicySettings


@dataclass(frozen=True)
class VisitView:
    """A stored visit, with its worker resolved, ready to be described."""

    visit: Visit
    worker_name: str
    worker_mobile: str
    tz: ZoneInfo
    policy: PolicySettings
    link: str = ""  # this recipient's signed page (check-in or acknowledge), "" without [web]

    @property
    def id(self) -> str:
        return self.visit.id

    @property
    def label(self) -> str:
        return "lone-working session" if self.visit.kind == "lone_working" else "home visit"

    @property
    def subject(self) -> str:
        # Private entries: the subject may name the family; keep it out of alerts.
        return "(private entry)" if self.visit.private else (self.visit.subject or "(no title)")

    def local(self, moment: datetime | None) -> str:
        return fmt_local(moment, self.tz) if moment else "not given"

    def findings(self) -> tuple[Finding, ...]:
        return self.visit.findings


def fmt_local(moment: datetime, tz: ZoneInfo) -> str:
    local = moment.astimezone(tz)
    return f"{local:%a %d %b %H:%M} ({local.tzname()})"


def plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def minutes_between(later: datetime, earlier: datetime) -> int:
    return max(0, int((later - earlier).total_seconds() // 60))


def _facts(view: VisitView, now: datetime) -> list[str]:
    visit = view.visit
    deadline = visit.deadline
    lines = [
        f"Worker:           {view.worker_name}"
        + (
            f", mobile {readable(view.worker_mobile)}"
            if view.worker_mobile
            else ", no mobile on record"
        ),
        f"Visit:            {view.subject}",
        f"Address:          {visit.address or 'NOT RECORDED'}",
        f"Started:          {view.local(view.visit.start)}",
        f"Expected return:  {view.local(view.visit.deadline)}",
    ]
    if deadline and now > deadline:
        lines.append(f"Overdue by:       {plural(minutes_between(now, deadline), 'minute')}")
    status = visit.risk_assessment or "none recorded"
    if not visit.risk_assessment_complete:
        status += " (NOT complete)"
    elif "complete" not in status.lower():
        status += " (complete)"
    lines.append(f"Risk assessment:  {status}")
    if visit.pair_required:
        lines.append(f"Pair visit:       yes; second worker: {visit.second_worker or 'none named'}")
    if visit.going_home_after:
        lines.append("Going home after: yes (should notify on safe arrival)")
    return lines


def _policy_lines(view: VisitView, kind: str) -> list[str]:
    lines = []
    instruction = view.policy.instructions.get(kind)
    if instruction:
        lines += ["", f"What to do: {instruction}"]
    clause = view.policy.clauses.get(kind)
    if clause:
        lines += ["", f"{view.policy.title}: {clause}"]
    return lines


def _how_to_ack(view: VisitView, notification_hint: str) -> list[str]:
    tap = ["", f"Open to acknowledge or confirm safe: {view.link}"] if view.link else []
    return [
        *tap,
        "",
        "To acknowledge (stops the repeats, records that you are handling it):",
        f'  visitwatch ack {view.id} --by "Your Name"',
        "When the worker is confirmed safe:",
        f'  visitwatch ack {view.id} --by "Your Name" --safe',
        notification_hint,
    ]


def alert(view: VisitView, kind: str, now: datetime, relation: str) -> tuple[str, str]:
    """Reminder to the worker, or overrun/escalation/help to a manager."""
    deadline = view.visit.deadline
    late = minutes_between(now, deadline) if deadline else 0
    if kind == NotificationKind.REMINDER and relation == "worker":
        subject = f"Check in: your {view.label} was due to end at {view.local(view.visit.deadline)}"
        body = [
            f'Your {view.label} "{view.subject}" was expected to end at {view.local(view.visit.deadline)}.',
            "If you are safe, check in now:",
            *([f"  {view.link}", "or:"] if view.link else []),
            f"  visitwatch checkin {view.id}",
            f"Need longer? visitwatch checkin {view.id} --extend 30m",
            f"Need help? visitwatch help {view.id}",
            "If you do not check in, your manager will be alerted.",
        ]
        return subject, "\n".join(body + _policy_lines(view, NotificationKind.REMINDER))
    if kind == NotificationKind.HELP:
        subject = f"HELP REQUESTED: {view.worker_name} on a {view.label}"
        intro = f"{view.worker_name} has asked for help during a {view.label}. Act now."
    elif kind == NotificationKind.ESCALATION:
        subject = f"ESCALATION: {view.worker_name} is {late} min overdue from a {view.label}"
        intro = (
            f"{view.worker_name} has still not checked in and nobody has acknowledged "
            "the earlier alerts."
        )
    else:
        subject = f"OVERDUE: {view.worker_name} is {late} min past the expected return"
        intro = f"{view.worker_name} has not checked in from a {view.label}."
    acknowledged_by = view.visit.acknowledged_by
    if acknowledged_by and kind != NotificationKind.HELP:
        # An acknowledgement covers earlier alerts only; this one says why it still came.
        subject = f"STILL NOT SAFE: {view.worker_name} is {late} min overdue from a {view.label}"
        intro = (
            f"{view.worker_name} has still not checked in. {acknowledged_by} acknowledged at "
            f"{view.local(view.visit.acknowledged_at)}, but nobody has confirmed that the worker is safe."
        )
    body = [intro, "", *_facts(view, now), *_policy_lines(view, kind)]
    body += _how_to_ack(view, f"Visit id: {view.id}")
    return subject, "\n".join(body)


def compliance(
    view: VisitView, now: datetime, relation: str, before_start: bool
) -> tuple[str, str]:
    findings = view.findings()
    when = "starts soon" if before_start else "is booked"
    who = "Your" if relation == "worker" else f"{view.worker_name}'s"
    subject = (
        f"{who} {view.label} on {view.local(view.visit.start)} is missing what the policy requires"
    )
    body = [f'{who} {view.label} "{view.subject}" {when} ({view.local(view.visit.start)}).', ""]
    for finding in findings:
        body.append(f"- {finding.message}")
        if finding.clause:
            body.append(f"    {view.policy.title}: {finding.clause}")
    body += [
        "",
        "Edit the calendar entry; visitwatch reads it again at the next sync.",
        *(
            [f"Your visit's page (check in, extend, ask for help): {view.link}"]
            if view.link
            else []
        ),
        f"Visit id: {view.id}",
    ]
    return subject, "\n".join(body)


def resolution(view: VisitView, kind: str, now: datetime, by: str) -> tuple[str, str]:
    """All clear, extension or end of monitoring, to everyone who was alerted."""
    if kind == NotificationKind.ALL_CLEAR:
        subject = f"All clear: {view.worker_name} is safe"
        first = f"{view.worker_name} is confirmed safe ({by}) at {fmt_local(now, view.tz)}."
        asked = view.visit.help_requested_at
        if asked is not None:
            first += (
                f" They asked for help at {fmt_local(asked, view.tz)} before this: if you "
                "have any doubt, phone them."
            )
    elif kind == NotificationKind.EXTENDED:
        subject = f"Visit extended: {view.worker_name} now expected back {view.local(view.visit.deadline)}"
        first = (
            f"{view.worker_name} checked in and extended the {view.label}; "
            f"new expected return {view.local(view.visit.deadline)}."
        )
    elif kind == NotificationKind.ACKNOWLEDGED:
        subject = f"Being handled: {by} is dealing with the alert about {view.worker_name}"
        first = (
            f"{by} acknowledged the alert about {view.worker_name}'s {view.label} at "
            f"{fmt_local(now, view.tz)} and is handling it. Nobody has confirmed the worker "
            f"is safe yet; you will get the all clear when they are. To help or to hear "
            f"more, contact {by}."
        )
    else:
        subject = f"Monitoring ended: {view.worker_name}'s {view.label} was {by}"
        first = (
            f"The calendar entry for {view.worker_name}'s {view.label} was {by}, so "
            "visitwatch has stopped watching it. If you are not sure the worker is "
            "safe, contact them."
        )
    body = [
        first,
        "",
        f"Visit:   {view.subject}",
        f"Address: {view.visit.address or '-'}",
        f"Visit id: {view.id}",
    ]
    return subject, "\n".join(body + _policy_lines(view, kind))
