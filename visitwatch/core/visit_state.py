"""Where a visit is in its life: one enum, shared by the daemon and the connectors that
show a visit's state (Outlook labels)."""

from __future__ import annotations

from enum import StrEnum


class VisitState(StrEnum):
    """Where a visit is in its life. Every list of states in the code derives from this."""

    BOOKED = "booked"  # not started yet
    IN_PROGRESS = "in_progress"  # started, before its deadline
    DUE = "due"  # the deadline passed: the worker was reminded
    OVERDUE = "overdue"  # the manager was alerted
    ESCALATED = "escalated"  # further up the ladder, or help was asked for
    ACKNOWLEDGED = "acknowledged"  # someone is handling it; it is not over
    RESOLVED = "resolved"  # the worker is safe
    CANCELLED = "cancelled"  # cancelled or removed before it started
    EXPIRED = "expired"  # first seen long after its deadline: recorded, never escalated

    @property
    def terminal(self) -> bool:
        """Nothing more will happen to the visit (until a calendar edit re-opens it)."""
        return self in TERMINAL_STATES

    @property
    def under_way(self) -> bool:
        """Started and not over: a worker may be out there now."""
        return not self.terminal and self is not VisitState.BOOKED


TERMINAL_STATES = frozenset({VisitState.RESOLVED, VisitState.CANCELLED, VisitState.EXPIRED})
