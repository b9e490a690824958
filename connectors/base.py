"""The contracts between visitwatch and the outside world.

Glossary
--------
source
    Something visitwatch reads calendar entries from: an ICS feed, an Outlook mailbox.
    A source returns :class:`CalendarEvent` occurrences inside a time window.
occurrence
    One concrete instance of a calendar entry. A single event has one occurrence; a
    recurring series has one per date, each identified by ``(uid, recurrence_id)``.
channel
    Somewhere a :class:`Message` is delivered: the outbox file, the console, e-mail.
permanent error
    A :class:`ConnectorError` that retrying cannot fix (bad credentials, unknown
    recipient). A temporary one (connection refused, throttled) is retried with backoff.

This module sits at the bottom of the dependency graph: ``policies`` and ``daemon`` import
it, it imports neither. The project-wide base error lives here for that reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar
from zoneinfo import ZoneInfo


class VisitwatchError(Exception):
    """Base of every error visitwatch raises on purpose.

    Its message is written for the person who can fix the problem: what is wrong,
    where (file, key, event uid) and how to fix it. The CLI shows it without a traceback.
    """


class ConnectorError(VisitwatchError):
    """A source or channel failed. ``permanent`` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# --------------------------------------------------------------------------- options


class Secret:
    """A secret value read from the environment or a file; never printed."""

    __slots__ = ("_origin", "_value")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self._origin = origin  # e.g. "env VISITWATCH_SMTP_PASSWORD": safe to show

    def reveal(self) -> str:
        return self._value

    @property
    def origin(self) -> str:
        return self._origin

    def __repr__(self) -> str:
        return f"Secret(from {self._origin})"

    __str__ = __repr__


@dataclass(frozen=True)
class Option:
    """One setting a connector accepts in its config table.

    ``kind`` is one of: ``str``, ``int``, ``float``, ``bool``, ``list`` (of strings),
    ``duration`` (``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` -> ``timedelta``), ``path``
    (relative to the config file's folder), ``secret`` (a table ``{ env = "NAME" }``,
    ``{ file = "/path" }`` or ``{ credential = "name" }`` -> :class:`Secret`; never an
    inline string), ``str_or_secret`` (either; use it for values such as secret ICS URLs).
    """

    kind: str
    required: bool = False
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConnectorContext:
    """What every connector may rely on, handed over by the daemon."""

    timezone: ZoneInfo  # the organisation's zone: floating times are read in it
    state_dir: Path  # a folder the connector may write to (caches)
    config_dir: Path  # relative paths in the config resolve against this
    user_agent: str = "visitwatch"


# --------------------------------------------------------------------------- calendars


@dataclass(frozen=True)
class TimeWindow:
    """The half-open interval ``[start, end)`` a source is asked about (aware UTC)."""

    start: datetime
    end: datetime

    @classmethod
    def around(cls, now: datetime, past: timedelta, ahead: timedelta) -> TimeWindow:
        return cls(now - past, now + ahead)


@dataclass(frozen=True)
class Attendee:
    email: str  # lower-cased
    name: str = ""
    response: str = ""  # accepted, declined, tentative, needs-action, or ""
    role: str = ""  # required, optional, resource, or ""


@dataclass(frozen=True)
class CalendarEvent:
    """One occurrence of a calendar entry, normalised. All times are aware UTC."""

    source: str  # the configured source name
    uid: str
    recurrence_id: str  # "" for a single event; the original start (ISO, UTC) otherwise
    subject: str
    start: datetime
    end: datetime | None  # None when the feed gave neither an end nor a duration
    description: str = ""
    location: str = ""
    categories: tuple[str, ...] = ()
    attendees: tuple[Attendee, ...] = ()
    organizer: str = ""  # e-mail address, lower-cased, or ""
    owner: str = ""  # the staff id the calendar belongs to, when the source says so
    all_day: bool = False
    cancelled: bool = False
    private: bool = False
    last_modified: datetime | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.uid, self.recurrence_id)


@dataclass(frozen=True)
class EventProblem:
    """An entry (or a whole feed, uid "") that could not be read, and why."""

    source: str
    uid: str
    reason: str


@dataclass
class FetchResult:
    """What one fetch produced.

    ``complete`` is true when the source returned everything in the window, so an entry
    that is missing has really been removed, unless its uid is named in ``problems`` (an
    entry that could not be read is not a removed one). ``fingerprint`` is a hash of the content:
    the same fingerprint for the same window means the same events. ``unchanged`` is true
    when the content matched the fingerprint the caller already knew: ``events`` is then
    empty and the caller keeps what it has.
    """

    events: list[CalendarEvent] = field(default_factory=list)
    problems: list[EventProblem] = field(default_factory=list)
    complete: bool = True
    fingerprint: str | None = None
    unchanged: bool = False


class Connector(ABC):
    """What sources and channels share: a name, validated options, a context."""

    type_name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext):
        self.name = name
        self.settings = dict(settings)
        self.context = context

    def check(self) -> str:
        """Try the connection once; return a one-line success message or raise."""
        return "nothing to check"

    def close(self) -> None:  # noqa: B027 - optional hook, most connectors hold nothing
        """Release sockets and files."""


class CalendarSource(Connector):
    @abstractmethod
    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        """Return the occurrences overlapping ``window``.

        ``known`` is the fingerprint of content the caller has already processed for this
        window; a source that can tell its content is the same returns
        ``FetchResult(unchanged=True)`` without parsing. Raises :class:`ConnectorError` when
        the source cannot be read at all. Problems with single entries go into
        ``FetchResult.problems``; they never raise.
        """


# --------------------------------------------------------------------------- alerts


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
    kind: str  # compliance, reminder, overrun, escalation, all_clear, ended, help, admin
    visit_id: str | None
    recipient: Recipient
    channel: str
    subject: str
    text: str
    created: datetime  # aware UTC

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
            "created": self.created.isoformat(),
        }


class Channel(Connector):
    # The Recipient field this channel delivers to ("email", "mobile"), or None when it can
    # take any message (outbox, console). Recipients without it are not queued here.
    address_field: ClassVar[str | None] = None
    # True for channels that write to this machine's disk (the outbox): when the disk is
    # full, alerts go out from memory through the others.
    writes_locally: ClassVar[bool] = False
    # True when send_many() is cheaper than one send() per message (one write, one fsync).
    sends_batches: ClassVar[bool] = False

    def address_of(self, message: Message) -> str:
        """The recipient's address for this channel; a permanent error when there is none."""
        field_name = self.address_field or "id"
        address = getattr(message.recipient, field_name, "")
        if not address:
            label = {"email": "e-mail address", "mobile": "mobile number"}.get(
                field_name, field_name
            )
            raise ConnectorError(
                f"recipient {message.recipient.id} has no {label} in the staff directory",
                permanent=True,
            )
        return address

    @abstractmethod
    def send(self, message: Message) -> None:
        """Deliver ``message`` or raise :class:`ConnectorError`.

        Returning means the other side accepted it; the dispatcher then marks it sent.
        """

    def send_many(self, messages: list[Message]) -> list[BaseException | None]:
        """Deliver several messages; for each, ``None`` if accepted or the error it met."""
        outcomes: list[BaseException | None] = []
        for message in messages:
            try:
                self.send(message)
            except ConnectorError as err:
                outcomes.append(err)
            else:
                outcomes.append(None)
        return outcomes
