"""The policy's requirements, one small function each, returning what a visit lacks.

A rule is ``(event, details, settings) -> Finding | None``. Messages are written for the
worker who owns the entry: what is missing and the exact line to add. The clause comes
from ``settings.clauses`` so alerts quote the organisation's own policy.

Choices, per the two seed policies:

* lone-working sessions in the building need no address (there is no home to record)
  and no risk assessment unless ``lone_working_risk_assessment`` is set, because those
  assessments cover the building, not each session;
* an expected return is required for both kinds: Leading Futures asks staff to "inform
  Directors of when they will be working alone, and when they have finished";
* an attendee who is not the organiser or owner, has not declined, is not a room, and
  (when the organiser's domain is known) shares it, counts as the second worker of a
  pair visit: inviting a colleague is how Outlook users record one.
"""

from __future__ import annotations

from collections.abc import Callable

from visitwatch.core.calendar import CalendarEvent
from visitwatch.policies.model import Finding, PolicySettings, VisitDetails

Rule = Callable[[CalendarEvent, VisitDetails, PolicySettings], Finding | None]

ERROR = "error"
WARNING = "warning"


def _finding(settings: PolicySettings, rule: str, severity: str, message: str) -> Finding:
    # A preset quotes a clause for every rule; an admin-made policy may not, so fall back
    # to the policy's title rather than an empty reference.
    clause = settings.clauses.get(rule) or settings.title
    return Finding(rule=rule, severity=severity, message=message, clause=clause)


def _needs_risk_assessment(details: VisitDetails, settings: PolicySettings) -> bool:
    if not settings.require_risk_assessment:
        return False
    return details.kind == "home_visit" or settings.require_lone_working_risk_assessment


def risk_assessment_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not _needs_risk_assessment(details, settings) or details.risk_assessment:
        return None
    return _finding(
        settings,
        "risk_assessment_missing",
        ERROR,
        "No risk assessment is recorded for this visit. Once it is done, add a line "
        '"Risk assessment: complete" (or the RA reference, e.g. "RA: RA-0113") to the entry.',
    )


def risk_assessment_incomplete(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not _needs_risk_assessment(details, settings):
        return None
    if not details.risk_assessment or details.risk_assessment_complete:
        return None
    return _finding(
        settings,
        "risk_assessment_incomplete",
        ERROR,
        f'The risk assessment is recorded as "{details.risk_assessment}", not as complete. '
        "Complete it before the visit, then change the line to "
        '"Risk assessment: complete" (or give the RA reference, e.g. "RA: RA-0113").',
    )


def expected_return_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not settings.require_expected_return or details.expected_return is not None:
        return None
    return _finding(
        settings,
        "expected_return_missing",
        ERROR,
        "No expected return or check-in time could be read from this entry. Add a line "
        '"Return by: 15:30" (or "Check-in by: 15:30") to the entry.',
    )


def expected_return_before_start(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if details.expected_return is None or details.expected_return > event.start:
        return None
    where = (
        "The entry does not end after it starts, so its end cannot be the expected return."
        if details.expected_return_from == "event_end"
        else "The expected return time is not after the visit's start."
    )
    return _finding(
        settings,
        "expected_return_before_start",
        WARNING,
        f'{where} Fix the entry\'s times or add a line "Return by: 15:30" with the time '
        "you expect to be back; alerts are timed from it.",
    )


def address_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not settings.require_address or details.kind != "home_visit" or details.address:
        return None
    return _finding(
        settings,
        "address_missing",
        ERROR,
        "The visit has no address. Put the family's address in the entry's Location, "
        'or add a line "Address: 12 High Street, Preston PR1 2AB" to the entry.',
    )


def pair_without_second_worker(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not details.pair_required or details.second_worker or _colleague_invited(event):
        return None
    return _finding(
        settings,
        "pair_without_second_worker",
        ERROR,
        "This visit is to be made in pairs, but no second worker is named. Invite your "
        'colleague to the entry or add a line "With: <their name>".',
    )


def going_home_after(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> Finding | None:
    if not details.going_home_after:
        return None
    safe = settings.checkin_categories[0] if settings.checkin_categories else "Safe"
    return _finding(
        settings,
        "going_home_after",
        WARNING,
        "You are going home straight after this visit. Make sure the return time allows "
        f'for the journey, and when you arrive home set the "{safe}" category on the entry '
        "(or use the check-in link): that is your safe-arrival notification.",
    )


RULES: tuple[Rule, ...] = (
    risk_assessment_missing,
    risk_assessment_incomplete,
    expected_return_missing,
    expected_return_before_start,
    address_missing,
    pair_without_second_worker,
    going_home_after,
)


def check_visit(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> list[Finding]:
    """Every finding for one visit, errors first, in rule order."""
    findings = [f for rule in RULES if (f := rule(event, details, settings)) is not None]
    return sorted(findings, key=lambda finding: finding.severity != ERROR)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].casefold() if "@" in address else ""


def _colleague_invited(event: CalendarEvent) -> bool:
    """Is someone other than the organiser/owner invited who could be the second worker?"""
    own = {event.organizer.casefold(), event.owner.casefold()} - {""}
    # The organisation's domain, to tell a colleague from an invited family member.
    domain = _domain(event.organizer) or _domain(event.owner)
    for attendee in event.attendees:
        email = attendee.email.casefold()
        if not email or email in own:
            continue
        if attendee.role == "resource" or attendee.response == "declined":
            continue
        if domain and _domain(email) != domain:
            continue
        return True
    return False
