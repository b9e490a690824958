"""The policy's requirements, one small function each, returning what a visit lacks.

Every finding's name and severity are declared once, in :data:`FINDINGS`; every list of
rule names derives from it. A rule's check is ``(event, details, settings) -> str | None``:
the message when the visit falls short, written for the worker who owns the entry (what is
missing and the exact line to add). The clause comes from ``settings.clauses`` so alerts
quote the organisation's own policy.

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
from dataclasses import dataclass

from visitwatch.core.calendar import CalendarEvent
from visitwatch.policies.model import Finding, PolicySettings, VisitDetails

Check = Callable[[CalendarEvent, VisitDetails, PolicySettings], str | None]

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class FindingSpec:
    """One kind of finding: its name (also its clause key), severity and check."""

    name: str
    severity: str  # ERROR (the policy requires it) or WARNING
    check: Check | None  # None: raised outside the policy's rules (see its entry)

    def finding(self, message: str, settings: PolicySettings) -> Finding:
        # A preset quotes a clause for every rule; an admin-made policy may not, so fall
        # back to the policy's title rather than an empty reference.
        clause = settings.clauses.get(self.name) or settings.title
        return Finding(rule=self.name, severity=self.severity, message=message, clause=clause)


def _needs_risk_assessment(details: VisitDetails, settings: PolicySettings) -> bool:
    if not settings.require_risk_assessment:
        return False
    return details.kind == "home_visit" or settings.require_lone_working_risk_assessment


def risk_assessment_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not _needs_risk_assessment(details, settings) or details.risk_assessment:
        return None
    return (
        "No risk assessment is recorded for this visit. Once it is done, add a line "
        '"Risk assessment: complete" (or the RA reference, e.g. "RA: RA-0113") to the entry.'
    )


def risk_assessment_incomplete(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not _needs_risk_assessment(details, settings):
        return None
    if not details.risk_assessment or details.risk_assessment_complete:
        return None
    return (
        f'The risk assessment is recorded as "{details.risk_assessment}", not as complete. '
        "Complete it before the visit, then change the line to "
        '"Risk assessment: complete" (or give the RA reference, e.g. "RA: RA-0113").'
    )


def expected_return_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not settings.require_expected_return or details.expected_return is not None:
        return None
    return (
        "No expected return or check-in time could be read from this entry. Add a line "
        '"Return by: 15:30" (or "Check-in by: 15:30") to the entry.'
    )


def expected_return_before_start(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if details.expected_return is None or details.expected_return > event.start:
        return None
    where = (
        "The entry does not end after it starts, so its end cannot be the expected return."
        if details.expected_return_from == "event_end"
        else "The expected return time is not after the visit's start."
    )
    return (
        f'{where} Fix the entry\'s times or add a line "Return by: 15:30" with the time '
        "you expect to be back; alerts are timed from it."
    )


def address_missing(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not settings.require_address or details.kind != "home_visit" or details.address:
        return None
    return (
        "The visit has no address. Put the family's address in the entry's Location, "
        'or add a line "Address: 12 High Street, Preston PR1 2AB" to the entry.'
    )


def pair_without_second_worker(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not details.pair_required or details.second_worker or _colleague_invited(event):
        return None
    return (
        "This visit is to be made in pairs, but no second worker is named. Invite your "
        'colleague to the entry or add a line "With: <their name>".'
    )


def going_home_after(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> str | None:
    if not details.going_home_after:
        return None
    safe = settings.checkin_categories[0] if settings.checkin_categories else "Safe"
    return (
        "You are going home straight after this visit. Make sure the return time allows "
        f'for the journey, and when you arrive home set the "{safe}" category on the entry '
        "(or use the check-in link): that is your safe-arrival notification."
    )


FINDINGS: tuple[FindingSpec, ...] = (
    FindingSpec("risk_assessment_missing", ERROR, risk_assessment_missing),
    FindingSpec("risk_assessment_incomplete", ERROR, risk_assessment_incomplete),
    FindingSpec("expected_return_missing", ERROR, expected_return_missing),
    FindingSpec("expected_return_before_start", WARNING, expected_return_before_start),
    FindingSpec("address_missing", ERROR, address_missing),
    FindingSpec("pair_without_second_worker", ERROR, pair_without_second_worker),
    FindingSpec("going_home_after", WARNING, going_home_after),
    # Raised by the daemon (daemon/sync.py), not by a rule: it alone holds the staff
    # directory that tells whether the entry names a known worker.
    FindingSpec("worker_unknown", WARNING, None),
)
FINDINGS_BY_NAME: dict[str, FindingSpec] = {spec.name: spec for spec in FINDINGS}
# The policy's own rules, in the order they run; a preset quotes a clause for each.
RULE_NAMES: tuple[str, ...] = tuple(spec.name for spec in FINDINGS if spec.check is not None)
# Every finding that may quote a clause of [policy.clauses].
FINDING_NAMES: tuple[str, ...] = tuple(FINDINGS_BY_NAME)


def check_visit(
    event: CalendarEvent, details: VisitDetails, settings: PolicySettings
) -> list[Finding]:
    """Every finding for one visit, errors first, in rule order."""
    findings = [
        spec.finding(message, settings)
        for spec in FINDINGS
        if spec.check is not None and (message := spec.check(event, details, settings))
    ]
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
