"""Change-notification subscriptions for :class:`~tests.graph_server.FakeGraph`.

``FakeGraph.subscriptions`` serves ``POST /v1.0/subscriptions`` (with Graph's validation
handshake: before answering, it POSTs ``?validationToken=...`` to the notification and the
lifecycle URL and wants the token back, 200 ``text/plain``, within 10 s),
``PATCH``/``DELETE /v1.0/subscriptions/{id}`` and ``GET /v1.0/subscriptions``, and lets a
test make Graph post to the daemon, as real Graph does::

    graph.update_event(ASHA, "e1", categories=["Home Visit", "Safe"])
    assert graph.subscriptions.notify(ASHA) == [202]          # a change notification
    graph.subscriptions.lifecycle(sub_id, "missed")           # a lifecycle event

Deliveries go to whatever URL the subscription names (plain HTTP on loopback is accepted
here; real Graph wants HTTPS). Failures of the endpoints to answer make the creation fail
with Graph's own 400.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import requests

from tests.graph_server import _graph_error, _parse_moment, _Reply, graph_timestamp

if TYPE_CHECKING:
    from tests.graph_server import FakeGraph

# Graph's limit for Outlook event subscriptions today (10080 minutes, minus its margin).
MAX_MINUTES = 10_070
VALIDATION_TIMEOUT = 10.0


@dataclass(frozen=True)
class Delivery:
    """One POST the fake made to the daemon, and what it answered (0: no answer)."""

    url: str
    body: Any
    status: int
    text: str = ""
    content_type: str = ""


class FakeSubscriptions:
    """Graph's ``/subscriptions``: ``active`` maps id to the subscription as Graph shows it;
    ``deliveries`` records every POST made to a daemon (validations included);
    ``validate`` set to False skips the handshake (as if the endpoint had answered)."""

    def __init__(self, fake: FakeGraph) -> None:
        self.fake = fake
        self.active: dict[str, dict[str, Any]] = {}
        self.deliveries: list[Delivery] = []
        self.validate = True

    # ------------------------------------------------------------------ Graph's side

    def create(self, body: Any) -> _Reply:
        if not isinstance(body, dict):
            return _graph_error(400, "InvalidRequest", "Empty Payload. JSON content expected.")
        for name in ("changeType", "notificationUrl", "resource", "expirationDateTime"):
            if not body.get(name):
                return _graph_error(400, "InvalidRequest", f"'{name}' is required.")
        resource = str(body["resource"]).strip("/")
        parts = resource.split("/")
        if len(parts) < 3 or parts[0].lower() != "users" or parts[-1].lower() != "events":
            return _graph_error(400, "InvalidRequest", f"Unsupported resource '{resource}'.")
        if self.fake._mailbox(parts[1]) is None:
            return self.fake._unknown_user(parts[1])
        expires = self._expiry(body["expirationDateTime"])
        if isinstance(expires, _Reply):
            return expires
        urls = [body["notificationUrl"], body.get("lifecycleNotificationUrl")]
        for url in [u for u in urls if u]:
            if self.validate and not self._handshake(str(url)):
                return _graph_error(
                    400, "InvalidRequest",
                    "Subscription validation request failed. Notification endpoint must "
                    "respond with 200 OK to validation request.",
                )  # fmt: skip
        subscription = {
            "@odata.context": f"{self.fake.graph_url}/$metadata#subscriptions/$entity",
            "id": str(uuid.uuid4()),
            "resource": body["resource"],
            "applicationId": self.fake.client_id,
            "changeType": body["changeType"],
            "clientState": body.get("clientState"),
            "notificationUrl": body["notificationUrl"],
            "lifecycleNotificationUrl": body.get("lifecycleNotificationUrl"),
            "expirationDateTime": graph_timestamp(expires),
            "creatorId": str(uuid.uuid4()),
            "latestSupportedTlsVersion": "v1_2",
        }
        self.active[subscription["id"]] = subscription
        return _Reply(201, copy.deepcopy(subscription))

    def renew(self, subscription_id: str, body: Any) -> _Reply:
        subscription = self.active.get(subscription_id)
        if subscription is None:
            return _graph_error(404, "ResourceNotFound", "The object was not found.")
        if not isinstance(body, dict) or not body.get("expirationDateTime"):
            return _graph_error(400, "InvalidRequest", "'expirationDateTime' is required.")
        expires = self._expiry(body["expirationDateTime"])
        if isinstance(expires, _Reply):
            return expires
        subscription["expirationDateTime"] = graph_timestamp(expires)
        return _Reply(200, copy.deepcopy(subscription))

    def delete(self, subscription_id: str) -> _Reply:
        if self.active.pop(subscription_id, None) is None:
            return _graph_error(404, "ResourceNotFound", "The object was not found.")
        return _Reply(204)

    def listing(self) -> _Reply:
        return _Reply(200, {"value": [copy.deepcopy(s) for s in self.active.values()]})

    # ------------------------------------------------------------------ the test's side

    def of(self, mailbox: str) -> list[dict[str, Any]]:
        """The active subscriptions on ``mailbox``'s calendars."""
        wanted = mailbox.lower()
        with self.fake.lock:
            return [
                copy.deepcopy(s) for s in self.active.values()
                if str(s["resource"]).strip("/").split("/")[1].lower() == wanted
            ]  # fmt: skip

    def notify(self, mailbox: str, change_type: str = "updated", event_id: str = "") -> list[int]:
        """Post a change notification for each subscription on ``mailbox``; the statuses."""
        statuses = []
        for subscription in self.of(mailbox):
            resource = f"Users/{uuid.uuid5(uuid.NAMESPACE_URL, mailbox.lower())}/Events/"
            item = {
                "subscriptionId": subscription["id"],
                "subscriptionExpirationDateTime": subscription["expirationDateTime"],
                "changeType": change_type,
                "resource": resource + (event_id or "AAMkAGI2"),
                "resourceData": {"@odata.type": "#Microsoft.Graph.Event", "id": event_id},
                "clientState": subscription["clientState"],
                "tenantId": self.fake.tenant,
            }
            statuses.append(self.post(subscription["notificationUrl"], {"value": [item]}))
        return statuses

    def lifecycle(self, subscription_id: str, event: str) -> int:
        """Post a lifecycle event (``reauthorizationRequired``, ``subscriptionRemoved``,
        ``missed``) for a subscription; Graph forgets a removed one first."""
        with self.fake.lock:
            subscription = copy.deepcopy(self.active[subscription_id])
            if event == "subscriptionRemoved":
                del self.active[subscription_id]
        item = {
            "subscriptionId": subscription_id,
            "subscriptionExpirationDateTime": subscription["expirationDateTime"],
            "tenantId": self.fake.tenant,
            "clientState": subscription["clientState"],
            "lifecycleEvent": event,
        }
        return self.post(subscription["lifecycleNotificationUrl"], {"value": [item]})

    def post(self, url: str, body: Any) -> int:
        """POST ``body`` as JSON to ``url`` as Graph would; the status (0: no answer)."""
        try:
            answer = requests.post(url, json=body, timeout=VALIDATION_TIMEOUT)
        except requests.RequestException:
            self.deliveries.append(Delivery(url, body, 0))
            return 0
        self.deliveries.append(
            Delivery(url, body, answer.status_code, answer.text,
                     answer.headers.get("Content-Type", ""))
        )  # fmt: skip
        return answer.status_code

    # ------------------------------------------------------------------ helpers

    def _handshake(self, url: str) -> bool:
        token = f"Validation: Testing client application reachability {uuid.uuid4()}"
        target = url + ("&" if "?" in url else "?") + urlencode({"validationToken": token})
        try:
            answer = requests.post(
                target, data=b"", headers={"Content-Type": "text/plain; charset=utf-8"},
                timeout=VALIDATION_TIMEOUT,
            )  # fmt: skip
        except requests.RequestException:
            self.deliveries.append(Delivery(target, None, 0))
            return False
        content_type = answer.headers.get("Content-Type", "")
        self.deliveries.append(
            Delivery(target, None, answer.status_code, answer.text, content_type)
        )
        return (
            answer.status_code == 200
            and answer.text == token
            and content_type.split(";")[0].strip() == "text/plain"
        )

    def _expiry(self, value: Any) -> datetime | _Reply:
        try:
            expires = _parse_moment(str(value))
        except ValueError:
            return _graph_error(400, "InvalidRequest", "Invalid expirationDateTime.")
        now = datetime.now(UTC)
        if expires <= now or expires > now + timedelta(minutes=MAX_MINUTES):
            return _graph_error(
                400, "InvalidRequest",
                f"Subscription expiration can only be {MAX_MINUTES} minutes in the future.",
            )  # fmt: skip
        return expires
