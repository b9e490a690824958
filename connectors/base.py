"""The contracts between visitwatch and the outside world: sources and channels.

Glossary
--------
source
    Something visitwatch reads calendar entries from: an ICS feed, an Outlook mailbox.
    A source returns :class:`CalendarEvent` occurrences inside a time window.
channel
    Somewhere a :class:`Message` is delivered: the outbox file, the console, e-mail.
permanent error
    A :class:`ConnectorError` that retrying cannot fix (bad credentials, unknown
    recipient). A temporary one (connection refused, throttled) is retried with backoff.
capability
    Something only some connectors can do (label entries in the calendar, look people up,
    expire a credential). Each is declared here with a default that means "cannot"; a
    connector that can overrides it. The daemon asks; it never inspects a connector's
    attributes or option names.

The types both sides share (events, messages, options, errors) live in
:mod:`visitwatch.core`; this module adds only the connector classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any, ClassVar, Protocol

import structlog

from visitwatch.connectors.change_feed import ChangeFeed
from visitwatch.core.calendar import FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option


class Person(Protocol):
    """Someone a source's directory knows (see :meth:`CalendarSource.people`)."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def email(self) -> str: ...
    @property
    def mobile(self) -> str: ...
    @property
    def manager_id(self) -> str | None: ...


class PeopleDirectory(Protocol):
    def lookup(self, ids: Iterable[str]) -> Mapping[str, Person]:
        """The people with these ids it knows; never raises for a lookup that failed."""
        ...


class Connector(ABC):
    """What sources and channels share: a name, validated options, a context."""

    type_name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext):
        self.name = name
        self.settings = dict(settings)
        self.context = context

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """Checks across options that the schema cannot state one by one.

        ``settings`` have passed :func:`~visitwatch.core.options.validate_options`; keys
        of the problems are option names (the caller adds where the table is). Called
        once, at config time: constructors trust their settings and never re-check them.
        """
        return []

    @classmethod
    def credential_expiry(cls, settings: Mapping[str, Any]) -> date | None:
        """When this connector's credential stops working (admins are warned before), if known."""
        return None

    def check(self) -> str:
        """Try the connection once; return a one-line success message or raise."""
        return "nothing to check"

    def close(self) -> None:  # noqa: B027 - optional hook, most connectors hold nothing
        """Release sockets and files."""


class CalendarSource(Connector):
    @classmethod
    def owner(cls, settings: Mapping[str, Any]) -> str:
        """The staff id of the person whose calendar this is, or "" when it is shared."""
        return ""

    @property
    def writes_back(self) -> bool:
        """True when :meth:`write_back` is available and the admin asked for it."""
        return False

    def write_back(self, uid: str, recurrence_id: str, state: str) -> None:
        """Show ``state`` on the calendar entry (best effort; a courtesy, never an alert)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write to its calendar")

    def change_feed(self) -> ChangeFeed | None:
        """Change notifications for this source's calendars, when it can push them (the
        daemon then reads it at once on a change); None: it is polled only."""
        return None

    def people(self, clock: Callable[[], datetime]) -> PeopleDirectory | None:
        """A staff directory this source's tenant can answer, when the admin asked for it."""
        return None

    @abstractmethod
    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        """Return the occurrences overlapping ``window``.

        ``known`` is the fingerprint of content the caller has already processed for this
        window; a source that can tell its content is the same returns
        ``FetchResult(unchanged=True)`` without parsing. Raises :class:`ConnectorError` when
        the source cannot be read at all. Problems with single entries go into
        ``FetchResult.problems``; they never raise.
        """


class Channel(Connector):
    # The Recipient field this channel delivers to ("email", "mobile"), or None when it can
    # take any message (outbox, console). Recipients without it are not queued here.
    address_field: ClassVar[str | None] = None
    # True for channels that write to this machine's disk (the outbox): when the disk is
    # full, alerts go out from memory through the others.
    writes_locally: ClassVar[bool] = False
    # True when send_many() is cheaper than one send() per message (one write, one fsync).
    sends_batches: ClassVar[bool] = False
    # True for channels that post to a place (a Teams channel, a webhook receiver) rather
    # than to a person: they get one message per event, not one per recipient. Its
    # ``recipient`` stands for the place (id = the channel's name) and its text lists who
    # was alerted.
    broadcast: ClassVar[bool] = False

    @classmethod
    def takes_replies(cls, settings: Mapping[str, Any]) -> bool:
        """Whether people can answer this channel's messages (a text reply: SAFE, HELP...)
        and visitwatch hears them; only then do messages invite a reply."""
        return False

    def delivery_log(self, message: Message, **context: Any) -> Any:
        """A logger bound with what every line about one delivery names: the channel, the
        message and its visit, never the recipient (addresses go at debug level only)."""
        return structlog.get_logger(type(self).__module__).bind(
            channel=self.name, message_id=message.id, visit_id=message.visit_id, **context
        )

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
                recipient_fault=True,
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
