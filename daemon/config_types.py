"""What a read config holds: the staff directory, connector entries, the daemon's settings."""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from visitwatch.connectors.base import CalendarSource, Channel, Connector
from visitwatch.core.options import Secret


@dataclass(frozen=True)
class StaffMember:
    id: str
    name: str
    email: str = ""
    mobile: str = ""
    role: str = "worker"
    manager: str = ""


@dataclass(frozen=True)
class Directory:
    """The staff directory: who works here, how to reach them, who their manager is."""

    members: Mapping[str, StaffMember] = field(default_factory=dict)

    def get(self, staff_id: str) -> StaffMember | None:
        return self.members.get(staff_id.strip().lower())

    def find(self, text: str) -> StaffMember | None:
        """Match an id, e-mail address or display name, ignoring case."""
        needle = text.strip().lower().removeprefix("mailto:")
        if not needle:
            return None
        for member in self.members.values():
            if needle in (member.id, member.email.lower(), member.name.lower()):
                return member
        return None

    def by_mobile(self, number: str) -> list[StaffMember]:
        """Everyone whose mobile is ``number`` (E.164, as every stored mobile is)."""
        return [m for m in self.members.values() if m.mobile and m.mobile == number]

    def with_role(self, role: str) -> list[StaffMember]:
        return [m for m in self.members.values() if m.role == role]

    def filled_from(self, people: Iterable[StaffMember]) -> Directory:
        """This directory, with gaps filled from another (Microsoft 365): ours always wins."""
        members = dict(self.members)
        for person in people:
            known = members.get(person.id)
            if known is None:
                members[person.id] = person
                continue
            members[person.id] = StaffMember(
                known.id,
                known.name or person.name,
                known.email or person.email,
                known.mobile or person.mobile,
                known.role,
                known.manager or person.manager,
            )
        return Directory(members)


@dataclass(frozen=True)
class ConnectorConfig:
    name: str
    type: str
    cls: builtins.type[Connector]  # `type` above is the config's type string
    settings: Mapping[str, Any]
    fallback: str = ""
    kinds: tuple[str, ...] | None = None

    @property
    def broadcasts(self) -> bool:
        """For a channel: it posts to a shared place (once per event), not to a person."""
        return issubclass(self.cls, Channel) and self.cls.broadcast

    @property
    def owner(self) -> str:
        """For a source: the staff id whose calendar it is ("" when shared)."""
        if issubclass(self.cls, CalendarSource):
            return self.cls.owner(self.settings)
        return ""

    @property
    def credential_expiry(self) -> date | None:
        """When the connector's credential stops working, if its settings say."""
        return self.cls.credential_expiry(self.settings)


@dataclass(frozen=True)
class WebSettings:
    """The [web] section: the pages staff reach from their messages, and the board."""

    enabled: bool = False
    listen: str = "127.0.0.1"
    port: int = 8470
    # How long a check-in or acknowledge link works after the visit's deadline.
    link_ttl: timedelta = timedelta(hours=24)
    # How long a board sign-in lasts.
    session_ttl: timedelta = timedelta(hours=8)
    # The key links and sessions are signed with; None: generated once in the state dir.
    signing_key: Secret | None = None
    # Who may sign in to the board (staff roles).
    board_roles: tuple[str, ...] = ("manager", "director", "admin")
    # Board sign-in: "microsoft365" (Entra OpenID Connect) and/or "email" (one-time link).
    sign_in: tuple[str, ...] = ("email",)
    entra_tenant_id: str = ""
    entra_client_id: str = ""
    entra_client_secret: Secret | None = None
    entra_authority_host: str = "https://login.microsoftonline.com"
    # Bounds: a request body larger than this is refused; requests per minute per client.
    max_body: int = 16_384
    rate_limit: int = 120
    threads: int = 8
    # The reverse proxy whose X-Forwarded-For is believed: an address, "auto" (any peer
    # when listening on loopback) or "none" (clients connect directly).
    proxy: str = "auto"

    def trusted_proxy(self) -> str | None:
        """The peer address waitress believes forwarded headers from ("*": any); None
        when clients connect directly (each peer is a client)."""
        if self.proxy == "none":
            return None
        if self.proxy == "auto":
            return "*" if is_loopback(self.listen) else None
        return self.proxy


@dataclass(frozen=True)
class DaemonSettings:
    database: Path
    state_dir: Path
    timezone: ZoneInfo
    poll_interval: timedelta
    sweep_interval: timedelta
    window_past: timedelta
    window_ahead: timedelta
    adopt_overdue_within: timedelta
    public_base_url: str
    log_level: str
    # An alert not delivered within this long goes to its channel's fallback, and an admin
    # is told (outages.py).
    delivery_deadline: timedelta = timedelta(minutes=2)
    # The longest one delivery attempt may take before it counts as failed.
    send_timeout: timedelta = timedelta(seconds=30)
    # The mass-removal guard (sync.py): share, fewest removals, how long a held read waits.
    removal_guard: float = 0.5
    removal_guard_min: int = 3
    removal_hold: timedelta = timedelta(minutes=30)
    # The external heartbeat (heartbeat.py): where, how, and at most how often on success.
    heartbeat_url: str | Secret | None = None
    heartbeat_style: str = "auto"
    heartbeat_every: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class RetentionSettings:
    """The [retention] section: how long the record keeps what (retention.py, README)."""

    # Names, addresses, subjects, staff ids and recipients' addresses are anonymised this
    # long after a routine visit ends.
    personal_data_after: timedelta = timedelta(days=90)
    # ... and this long after a visit that reached the top of the ladder or asked for help
    # (evidence should a claim follow: the UK limitation period for injury is three years).
    incidents_after: timedelta = timedelta(days=3 * 366)
    # Anonymised rows (statistics) are deleted this long after the visit; None: kept.
    keep_statistics: timedelta | None = timedelta(days=6 * 366)
    # A notification's words (subject, text, link) are removed this long after it was written.
    message_bodies_after: timedelta = timedelta(days=30)
    # Whether the daemon runs retention itself, once a day.
    scheduled: bool = True


def is_loopback(address: str) -> bool:
    """Whether ``address`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
