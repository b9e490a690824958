"""What a policy says, and what it finds about one visit."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from visitwatch.core.notification import NotificationKind

VISIT_KINDS = ("home_visit", "lone_working")


@dataclass(frozen=True)
class Finding:
    """One way a visit falls short of the policy."""

    rule: str  # e.g. "risk_assessment_missing"
    severity: str  # "error" (the policy requires it) or "warning"
    message: str  # written for the worker: what is missing and what to add
    clause: str  # the policy clause it comes from, quoted, with its reference


@dataclass(frozen=True)
class VisitDetails:
    """What visitwatch read out of a calendar entry."""

    kind: str  # one of VISIT_KINDS
    risk_assessment: str = ""  # as written: "complete", "RA-0113", "pending", "" if absent
    risk_assessment_complete: bool = False
    expected_return: datetime | None = None  # aware UTC
    expected_return_from: str = ""  # "description", "event_end" or "" (none)
    address: str = ""
    worker_mobile: str = ""
    worker_hint: str = ""  # a "Worker:" line: a name or e-mail address
    going_home_after: bool = False
    pair_required: bool = False  # the assessment says this visit is made in pairs
    second_worker: str = ""  # a "With:" / "Second worker:" line
    checked_in: bool = False  # a check-in category ("Safe", "Checked in") is set
    help_requested: bool = False  # a help category ("Help", "Need help") is set


@dataclass(frozen=True)
class EscalationStep:
    """One rung of the ladder, timed from the visit's deadline (expected return)."""

    after: timedelta  # from the deadline
    to: tuple[str, ...]  # "worker", "manager", "role:<role>", or a staff id
    kind: NotificationKind  # one whose ``is_step`` is true: reminder, overrun, escalation
    repeat: timedelta | None = None  # only the last step may repeat, until acknowledged

    def __post_init__(self) -> None:
        # A kind written as its string value becomes the enum member (ValueError if it is
        # no kind at all), so every step carries a real NotificationKind.
        object.__setattr__(self, "kind", NotificationKind(self.kind))


@dataclass(frozen=True)
class Recognition:
    categories: tuple[str, ...] = ("Home Visit",)  # compared case-insensitively
    subject_patterns: tuple[str, ...] = (r"\bhome[ -]?visit\b", r"^\s*HV\s*[:\-]")  # regex, i
    lone_working_categories: tuple[str, ...] = ("Lone Working",)
    lone_working_patterns: tuple[str, ...] = (r"\blone[ -]?working\b",)
    require_location: bool = False  # only entries with a location count as visits
    include_all_day: bool = False  # all-day entries are not visits unless this is set


@dataclass(frozen=True)
class PolicySettings:
    name: str  # preset key, e.g. "pan-lancashire"
    title: str  # the policy's own title, quoted in alerts
    recognition: Recognition = field(default_factory=Recognition)
    require_risk_assessment: bool = True
    require_expected_return: bool = True
    require_address: bool = True
    return_defaults_to_end: bool = True  # no "Return by:" line: the entry's end is the deadline
    notify_manager_of_findings: bool = True
    # The `after` of the first rung that alerts anyone but the worker (see ladder.py).
    grace: timedelta = timedelta(minutes=15)
    # An acknowledged visit still unresolved this long after the ack re-alerts (lifecycle.py).
    ack_timeout: timedelta = timedelta(minutes=30)
    default_duration: timedelta = timedelta(hours=1)
    notice_before_start: timedelta = timedelta(minutes=30)
    escalation: tuple[EscalationStep, ...] = ()
    checkin_categories: tuple[str, ...] = ("Safe", "Checked in")
    help_categories: tuple[str, ...] = ("Help", "Need help")
    clauses: dict[str, str] = field(default_factory=dict)  # rule or alert kind -> clause
    instructions: dict[str, str] = field(default_factory=dict)  # alert kind -> what to do
    # Added for the rules: lone-working sessions in the building carry no risk assessment
    # line unless the organisation asks for one ([policy.requirements]
    # lone_working_risk_assessment). Defaulted, so existing constructors keep working.
    require_lone_working_risk_assessment: bool = False
    # What a text message (SMS, a chat card) may carry ([policy.texts]): a text sits on a
    # lock screen, so an organisation may keep the worker's name or the address out of it;
    # the link's page (behind its signed token) still says everything.
    text_names: bool = True
    text_address: bool = True
