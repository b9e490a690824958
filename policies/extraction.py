"""Reading what a worker wrote into a calendar entry: ``Key: value`` lines and categories.

Workers type these by hand, in Outlook or on a phone, so the grammar is forgiving:

* one field per line; leading bullets (``-``, ``*``, ``•``, ``1.``) and HTML leftovers
  (``<p>``, ``<br>``, ``&nbsp;``) are ignored; Windows and old Mac line endings are fine;
* a label, then ``:``, ``=`` or a dash with a space on either side, then the value; labels
  ignore case, spacing, hyphens and a bracketed note (``Check-in by (approx): 15:30``);
* a few phrases need no separator: ``Back by 3.30pm``, ``Risk assessment complete``,
  ``RA RA-0113``, ``Pair visit``, ``Going home after``; a line that is just an RA
  reference (``RA-0113``) counts as one;
* categories are read like lines, so ``RA complete`` or ``Pair visit`` work as categories.

Unknown lines are ignored. Nothing here raises on odd text.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from visitwatch.core.calendar import CalendarEvent
from visitwatch.policies.model import PolicySettings, VisitDetails

# Field names used between the line parser and the extractor.
RISK = "risk_assessment"
RETURN = "expected_return"
ADDRESS = "address"
MOBILE = "worker_mobile"
WORKER = "worker_hint"
GOING_HOME = "going_home_after"
PAIRS = "pairs"
ALONE = "visit_alone"  # "Visit alone: no" means the visit is made in pairs
SECOND = "second_worker"

# Labels as _label_key() leaves them: lower case, hyphens and punctuation as spaces.
# fmt: off
_LABELS: dict[str, tuple[str, ...]] = {
    RISK: (
        "risk assessment", "risk assessment status", "risk assessment ref",
        "risk assessment reference", "risk assessment number", "risk assessment no",
        "risk assessment complete", "risk assessment completed", "risk assessment done",
        "risk assessed", "ra", "ra status", "ra ref", "ra reference", "ra number", "ra no",
        "ra complete", "ra completed", "ra done",
    ),
    RETURN: (
        "return by", "back by", "back at", "return at", "return", "return time",
        "returning by", "expected return", "expected return time", "expected back",
        "expected back by", "due back", "due back by", "check in by", "checkin by",
        "check in", "checkin", "check in time", "checkin time", "expected check in",
        "expected check in time", "expected return or check in time",
    ),
    ADDRESS: ("address", "visit address", "home address", "family address"),
    MOBILE: (
        "mobile", "mobile number", "mobile no", "worker mobile", "worker mobile number",
        "worker s mobile", "workers mobile", "phone", "phone number", "worker phone",
        "mob", "tel", "telephone", "contact number",
    ),
    WORKER: ("worker", "visiting worker", "lone worker", "staff", "staff member"),
    GOING_HOME: (
        "going home after", "going home after visit", "going home after the visit",
        "going directly home", "going straight home", "going home", "home after",
        "home after visit", "going directly home after visit",
    ),
    PAIRS: (
        "pairs", "pair", "pair visit", "paired visit", "visit in pairs", "joint visit",
        "two workers", "double up",
    ),
    ALONE: ("visit alone", "safe to visit alone", "lone visit", "alone"),
    SECOND: (
        "with", "second worker", "2nd worker", "co worker", "coworker", "accompanied by",
        "joint with", "paired with", "second staff member", "visiting with",
    ),
}
# fmt: on
_FIELD_OF_LABEL: dict[str, str] = {
    label: name for name, labels in _LABELS.items() for label in labels
}
_LONGEST_LABEL = max(map(len, _FIELD_OF_LABEL))

# Module-level patterns compile once per process, not once per entry. Settings-dependent
# ones (categories) are prepared in Extractor.__init__.
_BREAK_TAGS = re.compile(r"<\s*(?:br|/p|/div|/li|li|p|div|tr|/tr)\b[^>]*>", re.IGNORECASE)
# Only tag-shaped text: "<sam@example.org>" in a "Worker:" line must survive.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:]*(?:\s[^<>]{0,500})?/?>|<!--.*?-->", re.DOTALL)
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BULLET = re.compile(r"^(?:[-*•·‣▪◦○●–—>]+|\d{1,2}[.)](?=\s))\s*")
_SEPARATOR = re.compile(r"\s*[:=]\s*|\s+[-–—]+(?:\s+|$)|[-–—]+\s+")
_BRACKETED = re.compile(r"\([^)]*\)|\[[^\]]*\]")
_NOT_WORD = re.compile(r"[\W_]+")

_LOOSE: tuple[tuple[str, re.Pattern[str]], ...] = (
    (RISK, re.compile(r"^(?:risk\s+assessment|RA)\s+(?P<value>\S.*)$", re.IGNORECASE)),
    (RISK, re.compile(r"^(?P<value>RA[-_/ ]?\d+\b.*)$", re.IGNORECASE)),
    (
        RETURN,
        re.compile(
            r"^(?:return(?:ing)?\s+(?:by|at|time)|back\s+(?:by|at)|due\s+back(?:\s+by)?|"
            r"check[\s-]?in\s+(?:by|at|time)|expected\s+(?:return|back)(?:\s+time)?(?:\s+by)?)"
            r"\s+(?P<value>\S.*)$",
            re.IGNORECASE,
        ),
    ),
    (
        PAIRS,
        re.compile(
            # A bare "Pairs" only as the whole line: "Pair of shoes by the door" is not one.
            r"^(?:(?:pair(?:ed)?\s+visit|visit\s+in\s+pairs|joint\s+visit)\b(?P<value>.*)|pairs?)$",
            re.IGNORECASE,
        ),
    ),
    (
        GOING_HOME,
        re.compile(
            r"^going\s+(?:directly\s+|straight\s+)?home(?:\s+after(?:\s+(?:the\s+)?visit)?)?"
            r"\b(?P<value>.*)$",
            re.IGNORECASE,
        ),
    ),
)

# Every _LOOSE pattern starts with one of these words: one cheap match skips the rest for
# the many lines ("Notes: ...", "Hi team") that are none of them.
_LOOSE_START = re.compile(
    r"(?:risk|ra|return|back|due|check|expected|pair|visit|joint|going)", re.I
)

# Risk assessment statuses. A negative word wins over a positive one ("not complete").
_RA_NOT = re.compile(
    r"^\W*no\b|\bnot\b|\bn't\b|\bpending\b|\bto\s*-?\s*do\b|\bexpired\b|\bout\s+of\s+date\b|"
    r"\bout-of-date\b|\boverdue\b|\bincomplete\b|\boutstanding\b|\bawaiting\b|\bin\s+progress\b|"
    r"\btbc\b|\btbd\b|\bdraft\b|\bneeds?\b|\bunsigned\b",
    re.IGNORECASE,
)
_RA_DONE = re.compile(
    r"\b(?:complete|completed|done|yes|y|in\s+date|up\s+to\s+date|approved|signed\s*-?\s*off|"
    r"valid|current)\b|[✓✔✅]",
    re.IGNORECASE,
)
_RA_REFERENCE = re.compile(r"\bRA[-_/ ]?\d+\b", re.IGNORECASE)

_YES = re.compile(r"^\W*(?:yes|y|true|required|needed|essential)\b", re.IGNORECASE)
_NO = re.compile(
    r"^\W*(?:no|n|false|none|nope|not)\b|\bnot\b|\bn't\b|\bunsafe\b|\bunnecessary\b",
    re.IGNORECASE,
)

_ISO_DATETIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<time>\d{1,2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)"
    r"\s*(?P<offset>Z|[+-]\d{2}:?\d{2})?(?!\d)",
    re.IGNORECASE,
)
_CLOCK_TIME = re.compile(
    r"(?<![\d:.])(?:"
    r"(?P<h12>\d{1,2})(?:\s*[:.h]\s*(?P<m12>\d{2}))?\s*(?P<ampm>[ap])\.?\s*m\b\.?"
    r"|(?P<h24>\d{1,2})\s*[:.h]\s*(?P<m24>\d{2})(?!\d)"
    r"|(?P<hhmm>[01]\d|2[0-3])(?P<mm>[0-5]\d)(?!\d)"
    r"|(?P<noon>noon|midday)"
    r")",
    re.IGNORECASE,
)


@dataclass
class EntryFields:
    """Raw values found in one entry, before they are interpreted. First one wins."""

    values: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, value: str) -> None:
        self.values.setdefault(name, []).append(value.strip())

    def all(self, name: str) -> list[str]:
        return self.values.get(name, [])

    def first(self, name: str) -> str:
        return next((value for value in self.all(name) if value), "")

    def has(self, name: str) -> bool:
        return name in self.values


def category_key(name: str) -> str:
    """Outlook categories compare case-insensitively, ignoring stray spaces."""
    return " ".join(name.split()).casefold()


def description_lines(text: str) -> list[str]:
    """The description as clean lines: tags, entities, bullets and odd spaces removed."""
    if "<" in text:
        text = _TAG.sub(" ", _BREAK_TAGS.sub("\n", text))
    if "&" in text:
        text = html.unescape(text)
    text = _INVISIBLE.sub("", text.replace("\xa0", " "))
    lines: list[str] = []
    for raw in text.splitlines():  # also splits on \r\n, \r, \u2028
        line = _BULLET.sub("", raw.strip()).strip(" *_\t")
        if line:
            lines.append(line)
    return lines


def _label_key(label: str) -> str:
    """ "Check-in by (approx)" -> "check in by"; "**RA**" -> "ra"."""
    return " ".join(_NOT_WORD.sub(" ", _BRACKETED.sub(" ", label)).split()).casefold()


def read_line(line: str) -> tuple[str, str] | None:
    """(field, value) for a recognised line, else None."""
    separator = _SEPARATOR.search(line)
    if separator is not None and 0 < separator.start() <= _LONGEST_LABEL + 20:
        name = _FIELD_OF_LABEL.get(_label_key(line[: separator.start()]))
        if name is not None:
            return name, line[separator.end() :].strip(" *_")
    if not _LOOSE_START.match(line):
        return None
    for name, pattern in _LOOSE:
        match = pattern.match(line)
        if match is not None:
            return name, (match.group("value") or "").strip(" :=-–—*_")
    return None


def read_fields(lines: list[str]) -> EntryFields:
    fields = EntryFields()
    for line in lines:
        found = read_line(line)
        if found is not None:
            fields.add(*found)
    return fields


def risk_assessment_complete(status: str) -> bool:
    """complete / done / yes / in date / approved / signed off, or a reference (RA-0113)."""
    if _RA_NOT.search(status):
        return False
    return bool(_RA_DONE.search(status) or _RA_REFERENCE.search(status))


def is_yes(value: str) -> bool:
    """A bare flag ("Pair visit") or anything but a no ("Pairs: yes", "Pairs: required")."""
    return bool(_YES.search(value)) or not _NO.search(value)


def parse_return_time(text: str, start: datetime, tz: ZoneInfo) -> datetime | None:
    """The deadline written in ``text`` as aware UTC, or None if no time can be read.

    A clock time is on the visit's local date; one earlier than the start is the next
    day (a visit from 22:00 "back by 00:30"). An ISO datetime is taken as written, in
    ``tz`` when it has no offset.
    """
    iso = _ISO_DATETIME.search(text)
    if iso is not None:
        offset = iso.group("offset") or ""
        try:
            moment = datetime.fromisoformat(f"{iso.group('date')}T{iso.group('time')}{offset}")
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz)
            return moment.astimezone(UTC)
    clock = _clock_time(text)
    if clock is None:
        return None
    start_local = start.astimezone(tz)
    day: date = start_local.date()
    if clock < start_local.time().replace(tzinfo=None):
        day += timedelta(days=1)
    # Combining in local time (not adding 24h in UTC) keeps the wall time across DST.
    return datetime.combine(day, clock, tzinfo=tz).astimezone(UTC)


def _clock_time(text: str) -> time | None:
    for match in _CLOCK_TIME.finditer(text):
        if match.group("noon"):
            return time(12, 0)
        if match.group("ampm"):
            hour, minute = int(match.group("h12")), int(match.group("m12") or 0)
            if not 1 <= hour <= 12 or minute > 59:
                continue
            hour = hour % 12 + (12 if match.group("ampm").lower() == "p" else 0)
        elif match.group("h24"):
            hour, minute = int(match.group("h24")), int(match.group("m24"))
        else:
            hour, minute = int(match.group("hhmm")), int(match.group("mm"))
        if hour <= 23 and minute <= 59:
            return time(hour, minute)
    return None


class Extractor:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._checkin = frozenset(map(category_key, settings.checkin_categories))
        self._help = frozenset(map(category_key, settings.help_categories))

    def extract(self, event: CalendarEvent, kind: str, tz: ZoneInfo) -> VisitDetails:
        start = _aware(event.start)
        # Categories first: a category set in Outlook is deliberate, a line may be stale.
        lines = [name.strip() for name in event.categories if name.strip()]
        lines += description_lines(event.description or "")
        fields = read_fields(lines)

        risk_statuses = [value for value in fields.all(RISK) if value]
        complete = [value for value in risk_statuses if risk_assessment_complete(value)]
        risk_assessment = complete[0] if complete else (risk_statuses[0] if risk_statuses else "")

        expected_return: datetime | None = None
        expected_from = ""
        for value in fields.all(RETURN):
            expected_return = parse_return_time(value, start, tz)
            if expected_return is not None:
                expected_from = "description"
                break
        if expected_return is None and self.settings.return_defaults_to_end:
            end = _aware(event.end) if event.end is not None else None
            expected_return = end if end is not None else start + self.settings.default_duration
            expected_from = "event_end"

        pairs = [is_yes(value) for value in fields.all(PAIRS)]
        # "Visit alone: no" / "Safe to visit alone: no" -> pairs.
        pairs += [not is_yes(value) for value in fields.all(ALONE) if value]
        going_home = [is_yes(value) for value in fields.all(GOING_HOME)]

        categories = {category_key(name) for name in event.categories}
        return VisitDetails(
            kind=kind,
            risk_assessment=risk_assessment,
            risk_assessment_complete=bool(complete),
            expected_return=expected_return,
            expected_return_from=expected_from,
            address=(event.location or "").strip() or fields.first(ADDRESS),
            worker_mobile=fields.first(MOBILE),
            worker_hint=fields.first(WORKER),
            going_home_after=bool(going_home) and going_home[0],
            pair_required=bool(pairs) and pairs[0],
            second_worker=_second_worker(fields.first(SECOND)),
            checked_in=bool(categories & self._checkin),
            help_requested=bool(categories & self._help),
        )


def _second_worker(value: str) -> str:
    # "With: none" / "Second worker: n/a" name nobody.
    if not value or _label_key(value) in {"none", "n a", "na", "no", "nobody", "tbc", "tbd"}:
        return ""
    return value


def _aware(moment: datetime) -> datetime:
    # The contract says aware UTC; a naive time from a broken connector is read as UTC
    # rather than as the server's local time.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
