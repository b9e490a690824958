"""Repair of iCalendar feeds that do not follow RFC 5545, before they are parsed.

Real feeds arrive with mixed encodings, cut short, with a BEGIN or END line damaged.
:func:`decode` turns bytes into text line by line; :func:`split_feed` takes the text apart
into its top-level components, so that one broken entry is cut out on its own and its
damage recorded, instead of hiding every entry after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FOLD = re.compile(rb"\r?\n[ \t]")

# Components that sit directly in a VCALENDAR. A BEGIN of one of these inside an open
# entry means the entry's END line is missing.
_TOP_LEVEL = frozenset({"VEVENT", "VTODO", "VJOURNAL", "VFREEBUSY", "VTIMEZONE", "VAVAILABILITY"})
# Lines that belong to an entry, never to the calendar itself (RFC 7986 allows UID,
# DESCRIPTION... on a calendar, so those alone prove nothing before the first entry).
_ENTRY_ONLY = re.compile(r"^(DTSTART|DTEND|DURATION|RRULE|RDATE|EXDATE|RECURRENCE-ID)[;:]", re.I)
_CALENDAR_ONLY = re.compile(
    r"^(VERSION|PRODID|CALSCALE|METHOD|NAME|REFRESH-INTERVAL|SOURCE|COLOR|X-[^:;]*)[;:]", re.I
)
_UID_LINE = re.compile(r"^UID[;:](?:[^:]*:)?(.*)$", re.I)


@dataclass
class Block:
    """The lines of one component found directly in a calendar."""

    kind: str
    lines: list[str]
    damage: list[str] = field(default_factory=list)
    cut: bool = False  # the feed ended inside it: its content is incomplete

    @property
    def uid(self) -> str:
        uids = self.uids
        return uids[0] if uids else ""

    @property
    def uids(self) -> list[str]:
        found: list[str] = []
        for line in self.lines:
            match = _UID_LINE.match(line)
            if match and match.group(1).strip() not in found:
                found.append(match.group(1).strip())
        return found


@dataclass
class Layout:
    """A feed taken apart: calendar properties, time zones, entries, and the damage seen."""

    head: list[str] = field(default_factory=list)
    timezones: list[Block] = field(default_factory=list)
    entries: list[Block] = field(default_factory=list)
    damage: list[str] = field(default_factory=list)  # damage not tied to one entry
    truncated: bool = False

    def text(self, entries: list[Block] | None = None, *, zones: bool = True) -> str:
        lines = ["BEGIN:VCALENDAR", *self.head]
        for block in (self.timezones if zones else []) + (
            self.entries if entries is None else entries
        ):
            lines.extend(block.lines)
        lines.append("END:VCALENDAR")
        return "\r\n".join(lines) + "\r\n"


def split_feed(text: str, max_line: int) -> Layout:
    """Take a feed apart into its top-level components, line by line.

    icalendar nests whatever follows a missing END:VEVENT inside the open entry, and puts
    the lines of an entry whose BEGIN line is damaged on the calendar itself: either way
    the following visits vanish without a word. Here every entry is cut out on its own, a
    misspelt END closes the open component (as icalendar does, so nothing it would have
    read is lost) and every repair is recorded as damage of the entry it touched.
    """
    layout = Layout()
    lines = text.split("\r\n")
    ends_cleanly = text.endswith("\r\n") or text.endswith("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    last = len(lines) - 1
    block: Block | None = None
    stack: list[str] = []
    orphans: list[str] = []
    in_calendar = False
    seen_calendar = False
    after_first_block = False

    def close(reason: str = "") -> None:
        nonlocal block
        assert block is not None
        if reason:
            block.damage.append(reason)
        while len(stack) > 0:
            block.lines.append(f"END:{stack.pop()}")
        _file(layout, block)
        block = None

    def flush_orphans(end_name: str = "") -> None:
        if not any(line.strip() for line in orphans):
            orphans.clear()
            return
        damaged = Block("VEVENT", ["BEGIN:VEVENT", *orphans, "END:VEVENT"])
        damaged.damage.append("its BEGIN:VEVENT line is damaged or missing")
        orphans.clear()
        _file(layout, damaged)

    for index, line in enumerate(lines):
        if len(line) > max_line:
            reason = (
                f"a line longer than max_line ({max_line} characters) was left out; "
                "raise the source's max_line option if such lines are expected"
            )
            (block.damage if block is not None else layout.damage).append(reason)
            continue
        upper = line.strip().upper()
        if upper.startswith("BEGIN:"):
            name = upper[6:].strip()
            if name == "VCALENDAR":
                if block is not None:
                    close(f"no END:{block.kind} before the next calendar")
                flush_orphans()
                in_calendar = seen_calendar = True
                after_first_block = False
                continue
            if not in_calendar:
                if seen_calendar:
                    layout.damage.append(f"BEGIN:{name} outside any calendar was read anyway")
                in_calendar = True
            if block is not None and name in _TOP_LEVEL:
                close(f"no END:{block.kind} before the next BEGIN:{name}")
            if block is None:
                flush_orphans()
                block = Block(name, [f"BEGIN:{name}"])
                stack[:] = [name]
                after_first_block = True
            else:
                stack.append(name)
                block.lines.append(f"BEGIN:{name}")
            continue
        if upper.startswith("END:"):
            name = upper[4:].strip()
            if name == "VCALENDAR":
                if block is not None:
                    close(f"no END:{block.kind} before END:VCALENDAR")
                flush_orphans()
                in_calendar = False
                continue
            if block is None:
                if orphans:
                    flush_orphans(name)
                elif in_calendar:
                    layout.damage.append(f"a stray END:{name} line was ignored")
                continue
            if name != stack[-1]:
                if name in stack:
                    while stack[-1] != name:
                        inner = stack.pop()
                        block.lines.append(f"END:{inner}")
                        block.damage.append(f"no END:{inner} inside the entry")
                else:
                    # icalendar closes the open component on any END line: do the same.
                    block.damage.append(f"END:{name} read as END:{stack[-1]}")
                    name = stack[-1]
            stack.pop()
            block.lines.append(f"END:{name}")
            if not stack:
                close()
            continue
        if index == last and not ends_cleanly:
            continue  # a half line: its value is cut, so it would be wrong
        if block is not None:
            block.lines.append(line)
        elif not in_calendar:
            continue  # text between calendars (a trailing footer) belongs to no component
        elif orphans or (after_first_block and not upper.startswith("X-")):
            orphans.append(line)
        elif _ENTRY_ONLY.match(line):
            # An entry whose BEGIN line is damaged, before any other: its first lines
            # (UID, DTSTAMP...) were taken for calendar properties; take them back.
            while layout.head and not _CALENDAR_ONLY.match(layout.head[-1]):
                orphans.insert(0, layout.head.pop())
            orphans.append(line)
        else:
            layout.head.append(line)
    if block is not None:
        layout.truncated = True
        block.cut = True
        close("the feed was cut off inside this entry")
    elif in_calendar:
        layout.truncated = True
    flush_orphans()
    return layout


def _file(layout: Layout, block: Block) -> None:
    if block.kind == "VTIMEZONE":
        layout.timezones.append(block)
    elif block.kind == "VEVENT":
        layout.entries.append(block)
    elif block.kind in _TOP_LEVEL:
        if block.damage:
            layout.damage.append(f"a damaged {block.kind} was skipped")
    elif any(_ENTRY_ONLY.match(line) for line in block.lines):
        # An entry whose BEGIN line is damaged (BEGIN:VEVENU): read it as the entry it is.
        block.damage.append(f"its BEGIN line is damaged (BEGIN:{block.kind})")
        block.lines[0] = "BEGIN:VEVENT"
        block.lines[-1] = "END:VEVENT"
        block.kind = "VEVENT"
        layout.entries.append(block)
    else:
        layout.damage.append(f"an unknown component {block.kind[:40]} was skipped")


def decode(body: bytes) -> str:
    """Bytes to text, line by line, so one cp1252 line cannot spoil the UTF-8 ones.

    Folding is undone on the bytes first: RFC 5545 folds at octets, so a multi-byte
    character may be split across two physical lines.
    """
    body = _FOLD.sub(b"", body.removeprefix(b"\xef\xbb\xbf"))
    lines: list[str] = []
    for raw in body.split(b"\n"):
        raw = raw.rstrip(b"\r")
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            try:
                lines.append(raw.decode("cp1252"))
            except UnicodeDecodeError:
                lines.append(raw.decode("latin-1"))
    return "\r\n".join(lines)


def describe_non_calendar(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        return "the body is empty"
    if stripped.startswith("<"):
        return "got an HTML/XML page, perhaps a login page or an expired link"
    return "the body does not start with BEGIN:VCALENDAR"
