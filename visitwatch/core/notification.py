"""One notification to one person over one channel, and the kinds there are."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class NotificationKind(StrEnum):
    """Why a notification is sent. Every list of kinds in the code derives from this."""

    COMPLIANCE = "compliance"  # before the visit: what the policy finds missing
    REMINDER = "reminder"  # to the worker at the deadline
    OVERRUN = "overrun"  # to the manager: the worker has not checked in
    ESCALATION = "escalation"  # further up the ladder
    HELP = "help"  # the worker asked for help: every rung at once
    ALL_CLEAR = "all_clear"  # the worker is safe: to everyone alerted
    EXTENDED = "extended"  # the worker moved the deadline
    ACKNOWLEDGED = "acknowledged"  # someone has taken the alert on: to the others alerted
    ENDED = "ended"  # the visit stopped being watched while alerts were out
    REMOVED = "removed"  # a visit under way vanished from the calendar: is the worker safe?
    ADMIN = "admin"  # about visitwatch itself: a failing source, an unreachable person
    REPLY = "reply"  # the answer to a text message a person sent in (SAFE, HELP...)

    @property
    def is_alert(self) -> bool:
        """A rung of the ladder: raised because a worker may be in trouble."""
        return self in _ALERTS

    @property
    def urgent(self) -> bool:
        """Sent to someone other than the worker because the worker may be in danger."""
        return self in _URGENT

    @property
    def is_step(self) -> bool:
        """A kind a policy's escalation step may name."""
        return self in _STEPS

    @property
    def withdrawn_at_resolution(self) -> bool:
        """Still queued when the worker is confirmed safe, it goes unsent (superseded)."""
        return self in _ALERTS or self in _WITHDRAWN_EXTRA


_ALERTS = frozenset(
    {
        NotificationKind.REMINDER,
        NotificationKind.OVERRUN,
        NotificationKind.ESCALATION,
        NotificationKind.HELP,
    }
)
_URGENT = _ALERTS - {NotificationKind.REMINDER}
_STEPS = frozenset(
    {NotificationKind.REMINDER, NotificationKind.OVERRUN, NotificationKind.ESCALATION}
)
_WITHDRAWN_EXTRA = frozenset(
    {
        NotificationKind.COMPLIANCE,
        NotificationKind.EXTENDED,
        NotificationKind.ACKNOWLEDGED,
        NotificationKind.REMOVED,
    }
)


@dataclass(frozen=True)
class Recipient:
    id: str  # staff id (usually the e-mail address)
    name: str
    email: str = ""
    mobile: str = ""


@dataclass(frozen=True)
class Message:
    """One notification addressed to one recipient over one channel."""

    id: int
    kind: str  # a NotificationKind value
    visit_id: str | None
    recipient: Recipient
    channel: str
    subject: str
    text: str
    created: datetime  # aware UTC
    # The same news for a text message or a chat card: at most two SMS segments (GSM-7),
    # the short link included. "" for rows written before it existed: use ``subject``.
    short: str = ""
    # The page this message points to: the recipient's signed check-in or acknowledge page,
    # or for a broadcast channel the visit on the board (behind sign-in, since anyone in a
    # shared channel could tap it). "" when there is none ([web] off, admin notices).
    link: str = ""

    def as_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "visit_id": self.visit_id,
            "recipient": {
                "id": self.recipient.id,
                "name": self.recipient.name,
                "email": self.recipient.email,
                "mobile": self.recipient.mobile,
            },
            "channel": self.channel,
            "subject": self.subject,
            "text": self.text,
            "short": self.short,
            "link": self.link,
            "created": self.created.isoformat(),
        }
