"""Is this calendar entry a home visit, a lone-working session, or neither?"""

from __future__ import annotations

import re

from visitwatch.core.calendar import CalendarEvent
from visitwatch.core.errors import VisitwatchError
from visitwatch.policies.extraction import ADDRESS, category_key, description_lines, read_line
from visitwatch.policies.model import Recognition

HOME_VISIT = "home_visit"
LONE_WORKING = "lone_working"


class Recogniser:
    """Compiled once per policy: the daemon classifies thousands of entries per sync."""

    def __init__(self, recognition: Recognition) -> None:
        self.recognition = recognition
        self._visit_categories = frozenset(map(category_key, recognition.categories))
        self._lone_categories = frozenset(map(category_key, recognition.lone_working_categories))
        self._visit_patterns = _compile(recognition.subject_patterns)
        self._lone_patterns = _compile(recognition.lone_working_patterns)

    def recognise(self, event: CalendarEvent) -> str | None:
        """``"home_visit"``, ``"lone_working"`` or None. Cancelled entries still count."""
        if event.all_day and not self.recognition.include_all_day:
            return None  # leave days, training days: whole-day blocks are not visits
        categories = {category_key(name) for name in event.categories}
        subject = event.subject or ""
        # A home visit is checked first: "Lone working - home visit" needs an address.
        if categories & self._visit_categories or _any_match(self._visit_patterns, subject):
            if self.recognition.require_location and not _has_location(event):
                return None
            return HOME_VISIT
        # require_location is not applied here: a session in the building has no address.
        if categories & self._lone_categories or _any_match(self._lone_patterns, subject):
            return LONE_WORKING
        return None


def _compile(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    try:
        return tuple(re.compile(pattern, re.IGNORECASE) for pattern in patterns)
    except re.error as err:
        raise VisitwatchError(
            f"invalid recognition pattern: {err}; check [policy.recognition] (parse_policy "
            "reports these as config problems)"
        ) from err


def _any_match(patterns: tuple[re.Pattern[str], ...], text: str) -> bool:
    return any(pattern.search(text) for pattern in patterns)


def _has_location(event: CalendarEvent) -> bool:
    """A Location, or an "Address:" line in the description (read as extraction reads it)."""
    if event.location.strip():
        return True
    for line in description_lines(event.description or ""):
        found = read_line(line)
        if found is not None and found[0] == ADDRESS and found[1]:
            return True
    return False
