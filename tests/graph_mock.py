"""Microsoft Entra and Graph answered by ``responses``: the token set-up and a mailbox.

Graph cannot be reached from the tests. :func:`add_token` registers Entra's discovery
document and token endpoint; :class:`Mailbox` answers ``calendarView`` the way Graph does:
it expands series on the server into ``occurrence`` and ``exception`` resources whose
iCalUId carries the occurrence's date, and answers the window a little generously (entries
touching its edges included), so the source's own half-open filtering is what is tested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import responses

from tests.graph_server import unsigned_token
from tests.source_contract import Entry, series_starts

TENANT = "7f3c1a2e-0000-4000-8000-000000000001"
CLIENT = "11111111-1111-1111-1111-111111111111"
GRAPH = "https://graph.microsoft.com/v1.0"
ASHA = "asha.khan@contoso.org"
GOID = "040000008200E00074C5B7101A82E008"  # Outlook's GlobalObjectId class id
NO_DATE = "00000000"
GOID_TAIL = "00" * 16  # creation time and reserved bytes, unused here


def login(tenant: str = TENANT) -> str:
    """Entra's base address for ``tenant``."""
    return f"https://login.microsoftonline.com/{tenant}"


LOGIN = login()


def jwt(roles: list[str]) -> str:
    """An access token shaped like Entra's (unsigned: only the payload is read)."""
    return unsigned_token({"aud": "https://graph.microsoft.com", "roles": roles})


TOKEN = jwt(["Calendars.ReadWrite", "Mail.Send"])


def add_discovery(mock: responses.RequestsMock, tenant: str = TENANT) -> None:
    """Entra's OpenID discovery document for ``tenant`` (msal reads it on first use)."""
    base = login(tenant)
    mock.get(
        f"{base}/v2.0/.well-known/openid-configuration",
        json={
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "issuer": f"{base}/v2.0",
        },
    )


def add_token(mock: responses.RequestsMock, token: str = TOKEN, tenant: str = TENANT) -> None:
    """Entra's discovery document and a token endpoint that hands out ``token``."""
    add_discovery(mock, tenant)
    mock.post(
        f"{login(tenant)}/oauth2/v2.0/token",
        json={"access_token": token, "expires_in": 3600, "token_type": "Bearer"},
    )


def view_url(mailbox: str = ASHA, delta: bool = False) -> str:
    return f"{GRAPH}/users/{mailbox}/calendarView" + ("/delta" if delta else "")


def ical_uid(uid: str, occurrence: datetime | None = None) -> str:
    """Outlook's GlobalObjectId for ``uid``: bytes 16-19 hold an occurrence's date."""
    day = NO_DATE
    if occurrence is not None:
        day = f"{occurrence.year:04X}{occurrence.month:02X}{occurrence.day:02X}"
    return GOID + day + GOID_TAIL + uid.encode().hex().upper()


def graph_time(moment: datetime) -> dict[str, str]:
    return {"dateTime": f"{moment:%Y-%m-%dT%H:%M:%S}.0000000", "timeZone": "UTC"}


def resource(
    entry: Entry, kind: str, original: datetime | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``entry`` as calendarView returns it (Prefer: outlook.timezone="UTC", text body).

    ``extra`` replaces fields the neutral entry does not describe (organizer, iCalUId,
    lastModifiedDateTime); the changeKey changes whenever anything served changes.
    """
    day = original or entry.start
    change = hashlib.sha256(repr((entry, extra)).encode()).hexdigest()[:16]
    raw = {
        "id": f"AAMk-{entry.uid}-{day:%Y%m%d}",
        "iCalUId": ical_uid(entry.uid, original),
        "changeKey": change,
        "lastModifiedDateTime": "2026-06-01T08:00:00.1234567Z",
        "type": kind,
        "seriesMasterId": f"AAMk-{entry.uid}" if original else None,
        "originalStart": f"{original:%Y-%m-%dT%H:%M:%S}Z" if original else None,
        "subject": entry.subject,
        "body": {"contentType": "text", "content": entry.description},
        "start": {"dateTime": "2026-07-0X", "timeZone": "UTC"}
        if entry.broken
        else graph_time(entry.start),
        "end": graph_time(entry.end) if entry.end else None,
        "isAllDay": False,
        "isCancelled": entry.cancelled,
        "sensitivity": "normal",
        "categories": list(entry.categories),
        "location": {"displayName": entry.location},
        "organizer": {"emailAddress": {"name": "Asha Khan", "address": ASHA}},
        "attendees": [
            {
                "type": "required",
                "status": {"response": "accepted", "time": "2026-06-01T08:00:00Z"},
                "emailAddress": {"name": person.name, "address": person.email},
            }
            for person in entry.attendees
        ],
    }
    return raw | (extra or {})


@dataclass
class Mailbox:
    """What the mocked Graph holds in one calendar.

    ``extra`` maps an entry's uid to fields served in place of :func:`resource`'s own.
    ``failure``, when set, is the error answer every request gets instead (status, body).
    """

    entries: list[Entry] = field(default_factory=list)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    failure: tuple[int, dict[str, Any]] | None = None

    def view(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """calendarView of [start, end]: series expanded, exceptions in their place."""
        moved = {(e.uid, e.original_start) for e in self.entries if e.original_start}
        found: list[tuple[Entry, dict[str, Any]]] = []
        for entry in self.entries:
            extra = self.extra.get(entry.uid)
            if entry.original_start is not None:
                found.append((entry, resource(entry, "exception", entry.original_start, extra)))
            elif entry.rrule:
                length = entry.end - entry.start if entry.end else None
                for begins in series_starts(entry, end):
                    if (entry.uid, begins) in moved:
                        continue
                    ends = begins + length if length is not None else None
                    one = replace(entry, start=begins, end=ends)
                    found.append((one, resource(one, "occurrence", begins, extra)))
            else:
                found.append((entry, resource(entry, "singleInstance", None, extra)))
        return [
            raw
            for entry, raw in found
            if entry.broken or (entry.start <= end and (entry.end or entry.start) >= start)
        ]

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if self.failure is not None:
            status, body = self.failure
            return status, {"Content-Type": "application/json"}, json.dumps(body)
        asked = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        start = datetime.fromisoformat(asked["startDateTime"]).astimezone(UTC)
        end = datetime.fromisoformat(asked["endDateTime"]).astimezone(UTC)
        body = {"value": self.view(start, end)}
        return 200, {"Content-Type": "application/json"}, json.dumps(body)
