"""Outlook change notifications: Microsoft Graph subscriptions on the watched calendars.

:class:`GraphChangeFeed` is the Graph side of the :class:`~visitwatch.connectors.change_feed.
ChangeFeed` capability: it subscribes to ``/users/{m}/events`` (or a named calendar's
``/users/{m}/calendars/{id}/events``) for ``created,updated,deleted``, renews with a PATCH,
deletes on stop. Graph checks both endpoints answer its validation request before it
answers the POST, so a daemon Graph cannot reach fails to subscribe, loudly.

:func:`parse_notices` reads what Graph POSTs to the endpoints: change notifications and
lifecycle events (``reauthorizationRequired``, ``subscriptionRemoved``, ``missed``), in
both cases a ``{"value": [...]}`` collection whose items carry ``subscriptionId`` and the
``clientState`` secret. Nothing here trusts them: the daemon compares the secret.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog

from visitwatch.connectors.change_feed import Endpoints, Subscribed, SubscriptionGone
from visitwatch.connectors.graph_client import GraphClient
from visitwatch.connectors.graph_errors import GraphError
from visitwatch.connectors.graph_targets import CalendarTargets
from visitwatch.core.errors import ConnectorError

log = structlog.get_logger(__name__)

# Graph's limit for Outlook event subscriptions was 4230 minutes when it was introduced and
# is 10080 today; the lower one is accepted everywhere (national clouds too).
MAX_LIFETIME = timedelta(minutes=4230)
CHANGE_TYPES = "created,updated,deleted"
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")


@dataclass(frozen=True)
class Notice:
    """One item Graph posted: a change, or a lifecycle event (``lifecycle`` is its name)."""

    subscription_id: str
    client_state: str
    lifecycle: str = ""


class GraphChangeFeed:
    """Graph subscriptions for one Graph calendar source's mailboxes and calendars."""

    max_lifetime = MAX_LIFETIME

    def __init__(self, source: str, client: GraphClient, mailboxes: Iterable[str],
                 targets: CalendarTargets) -> None:  # fmt: skip
        self.source = source
        self.client = client
        self.mailboxes = list(mailboxes)
        self.targets = targets

    def resources(self) -> list[str]:
        """One ``.../events`` resource per calendar the source reads.

        Raises :class:`ConnectorError` naming the mailbox when one cannot be resolved: the
        caller retries the whole list later, and polling reads it meanwhile.
        """
        resources: list[str] = []
        for mailbox in self.mailboxes:
            targets, _missing = self.targets.resolve(mailbox)  # a missing one: polls report it
            resources += [f"{t.prefix.lstrip('/')}/events" for t in targets]
        return resources

    def subscribe(
        self, resource: str, endpoints: Endpoints, client_state: str, expires: datetime
    ) -> Subscribed:
        body = {
            "changeType": CHANGE_TYPES,
            "notificationUrl": endpoints.notify_url,
            "lifecycleNotificationUrl": endpoints.lifecycle_url,
            "resource": resource,
            "expirationDateTime": _graph_moment(expires),
            "clientState": client_state,
        }
        answer = self.client.request("POST", "subscriptions", json=body).json()
        try:
            return Subscribed(str(answer["id"]), _parse_moment(answer["expirationDateTime"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConnectorError("Graph accepted a subscription but did not say its id") from err

    def renew(self, subscription_id: str, expires: datetime) -> datetime:
        try:
            answer = self.client.request(
                "PATCH",
                f"subscriptions/{quote(subscription_id, safe='')}",
                json={"expirationDateTime": _graph_moment(expires)},
            ).json()
        except GraphError as err:
            if err.status == 404:
                raise SubscriptionGone(f"subscription {subscription_id} is gone") from err
            raise
        try:
            return _parse_moment(answer["expirationDateTime"])
        except (KeyError, TypeError, ValueError):
            return expires

    def delete(self, subscription_id: str) -> None:
        try:
            self.client.request("DELETE", f"subscriptions/{quote(subscription_id, safe='')}")
        except GraphError as err:
            if err.status != 404:
                raise


def parse_notices(body: Any) -> list[Notice]:
    """The items of a notification POST; anything not shaped like one is left out."""
    items = body.get("value") if isinstance(body, dict) else None
    notices: list[Notice] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        subscription_id = item.get("subscriptionId")
        client_state = item.get("clientState")
        if not isinstance(subscription_id, str) or not isinstance(client_state, str):
            continue
        lifecycle = item.get("lifecycleEvent")
        notices.append(
            Notice(subscription_id, client_state, lifecycle if isinstance(lifecycle, str) else "")
        )
    return notices


def _graph_moment(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _parse_moment(text: Any) -> datetime:
    value = str(text).strip().replace("Z", "+00:00")
    # Graph writes seven fractional digits; Python before 3.11 read at most six.
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        value = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
