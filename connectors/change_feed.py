"""The change-feed capability: a calendar that can tell the daemon it changed.

A source whose calendars can push change notifications (Outlook, through Microsoft Graph
subscriptions) offers a :class:`ChangeFeed`; the daemon (``daemon/subscriptions.py``) keeps
one subscription per calendar the feed names, and reads the source at once when one fires.
Polling stays the safety net: a feed is a way to see changes sooner, never the only way.

Glossary
--------
resource
    One calendar to watch, as the feed names it (for Graph ``users/{m}/events``).
subscription
    The other side's promise to tell ``notify_url`` about changes to one resource until
    ``expires``; renewed before then, deleted when the daemon stops.
client state
    A random secret sent with each subscription and echoed in every notification: a
    notification without the right one is not believed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from visitwatch.core.errors import ConnectorError


@dataclass(frozen=True)
class Endpoints:
    """Where the other side delivers: change notifications and lifecycle events."""

    notify_url: str
    lifecycle_url: str


@dataclass(frozen=True)
class Subscribed:
    """A subscription the other side accepted: its id and when it ends."""

    id: str
    expires: datetime


class SubscriptionGone(ConnectorError):
    """The subscription no longer exists on the other side: create a new one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, permanent=True)


class ChangeFeed(Protocol):
    """Change notifications for a source's calendars (see the module's glossary)."""

    @property
    def max_lifetime(self) -> timedelta:
        """The longest a subscription may last before it must be renewed."""
        ...

    def resources(self) -> list[str]:
        """The calendars to watch, one resource each; may ask the network, may raise
        :class:`ConnectorError`."""
        ...

    def subscribe(
        self, resource: str, endpoints: Endpoints, client_state: str, expires: datetime
    ) -> Subscribed:
        """Create a subscription (the other side checks ``endpoints`` answer first)."""
        ...

    def renew(self, subscription_id: str, expires: datetime) -> datetime:
        """Move a subscription's end; the end granted. Raises :class:`SubscriptionGone`."""
        ...

    def delete(self, subscription_id: str) -> None:
        """End a subscription; one already gone is not an error."""
        ...
