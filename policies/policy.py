"""One organisation's policy, ready to run over calendar entries."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from visitwatch.core.calendar import CalendarEvent
from visitwatch.policies.extraction import Extractor
from visitwatch.policies.model import Finding, PolicySettings, VisitDetails
from visitwatch.policies.recognition import Recogniser
from visitwatch.policies.rules import check_visit


class Policy:
    """Recognise, extract, check. Build one per settings and reuse it for every entry.

    Everything settings-dependent (category sets, subject regexes) is prepared here once;
    the line grammar's patterns are module constants, compiled once per process.
    """

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._recogniser = Recogniser(settings.recognition)
        self._extractor = Extractor(settings)

    def recognise(self, event: CalendarEvent) -> str | None:
        """``"home_visit"``, ``"lone_working"`` or None (not a visit)."""
        return self._recogniser.recognise(event)

    def extract(self, event: CalendarEvent, kind: str, tz: ZoneInfo) -> VisitDetails:
        """What the entry says; clock times are read in ``tz``, the organisation's zone."""
        return self._extractor.extract(event, kind, tz)

    def check(self, event: CalendarEvent, details: VisitDetails) -> list[Finding]:
        """Everything the visit lacks under this policy, errors first."""
        return check_visit(event, details, self.settings)

    def __repr__(self) -> str:
        return f"Policy({self.settings.name!r})"
