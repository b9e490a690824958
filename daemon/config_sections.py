"""The [daemon], [[staff]], [[sources]] and [[channels]] sections: their options and parsing.

Each function adds what it finds wrong to ``problems`` and goes on, so an admin sees every
mistake at once; :mod:`visitwatch.daemon.config` puts the sections together.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from visitwatch.connectors.base import Channel, Connector
from visitwatch.connectors.registry import UnknownConnectorType
from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import ConfigProblem, Option, did_you_mean, validate_options
from visitwatch.core.phone import InvalidNumber, e164
from visitwatch.daemon.config_types import (
    ConnectorConfig,
    DaemonSettings,
    Directory,
    RetentionSettings,
    StaffMember,
    WebSettings,
)

DAEMON_OPTIONS: dict[str, Option] = {
    "database": Option("path", default="visitwatch.db", help="SQLite file; relative to this file"),
    "state_dir": Option("path", default=".", help="folder for caches and the outbox"),
    "timezone": Option("str", default="Europe/London", help="IANA zone, e.g. Europe/London"),
    "poll_interval": Option(
        "duration", default="5m", positive=True, help="how often calendars are read"
    ),
    "sweep_interval": Option(
        "duration", default="10s", positive=True, help="how often deadlines are checked"
    ),
    "window_past": Option("duration", default="2d"),
    "window_ahead": Option("duration", default="14d"),
    "adopt_overdue_within": Option(
        "duration",
        default="12h",
        help="a visit first seen longer than this after its deadline is recorded, not escalated",
    ),
    "delivery_deadline": Option(
        "duration",
        default="2m",
        positive=True,
        help="an alert not delivered within this long goes to its channel's fallback and "
        "raises an admin notice",
    ),
    "send_timeout": Option(
        "duration",
        default="30s",
        positive=True,
        help="the longest one delivery attempt may take before it counts as failed",
    ),
    "removal_guard": Option(
        "float",
        default=0.5,
        help="a read that would remove more than this share of a source's watched visits "
        "(and at least removal_guard_min of them), or all of them, is held, not applied",
    ),
    "removal_guard_min": Option(
        "int",
        default=3,
        positive=True,
        help="the fewest removals the removal_guard share applies to",
    ),
    "removal_hold": Option(
        "duration",
        default="30m",
        positive=True,
        help="a held read is applied once it has repeated this long (or an admin confirms "
        "it with `visitwatch sources confirm NAME`)",
    ),
    "public_base_url": Option(
        "url",
        default="",
        help="where staff reach check-in links, e.g. https://visitwatch.example.org",
    ),
    "log_level": Option("str", default="info", choices=("debug", "info", "warning", "error")),
    "heartbeat_url": Option(
        "url",
        help="an external monitor pinged while the daemon is healthy (Healthchecks or Uptime "
        'Kuma push URL); it holds the check\'s secret: prefer { env = "..." }',
    ),
    "heartbeat_style": Option(
        "str",
        default="auto",
        choices=("auto", "healthchecks", "uptime-kuma"),
        help='how to ping it; "auto": Uptime Kuma for a /api/push/ URL, else Healthchecks',
    ),
    "heartbeat_every": Option(
        "duration",
        default="1m",
        positive=True,
        help="at most one success ping this often (a change of health is pinged at once)",
    ),
}

WEB_OPTIONS: dict[str, Option] = {
    "enabled": Option("bool", default=False, help="serve the check-in pages and the board"),
    "listen": Option("str", default="127.0.0.1", help="address to listen on (loopback: behind a proxy)"),
    "port": Option("int", default=8470, positive=True, maximum=65535),
    "link_ttl": Option(
        "duration", default="24h", positive=True,
        help="how long a check-in or acknowledge link works after the visit's deadline",
    ),
    "session_ttl": Option("duration", default="8h", positive=True, help="how long a board sign-in lasts"),
    "signing_key": Option(
        "secret", help="key for links and sessions; absent: generated once in state_dir (0600)"
    ),
    "board_roles": Option(
        "list", default=["manager", "director", "admin"], nonempty=True,
        help="staff roles that may sign in to the board",
    ),
    "sign_in": Option(
        "list", default=["email"], nonempty=True,
        help='"email" (a one-time link by e-mail) and/or "microsoft365" (Entra sign-in)',
    ),
    "entra_tenant_id": Option("str", default="", help="for microsoft365 sign-in"),
    "entra_client_id": Option("str", default="", help="for microsoft365 sign-in"),
    "entra_client_secret": Option("secret", help="for microsoft365 sign-in"),
    "entra_authority_host": Option("url", default="https://login.microsoftonline.com"),
    "max_body": Option("int", default=16_384, positive=True, help="largest request body, bytes"),
    "rate_limit": Option("int", default=120, positive=True, help="requests per minute per client"),
    "threads": Option("int", default=8, positive=True, maximum=64),
    "proxy": Option(
        "str", default="auto",
        help='the reverse proxy in front, whose X-Forwarded-For is believed: its address, '
        '"auto" (any peer when listening on loopback, none otherwise) or "none"',
    ),
}  # fmt: skip

SIGN_IN_METHODS = ("email", "microsoft365")


def parse_web(
    table: Mapping[str, Any], config_dir: Path, problems: list[ConfigProblem]
) -> WebSettings:
    settings, found = validate_options(table, WEB_OPTIONS, "web", config_dir)
    for method in settings.get("sign_in") or ():
        if method not in SIGN_IN_METHODS:
            found.append(
                ConfigProblem(
                    "web.sign_in",
                    f"unknown method {method!r}",
                    did_you_mean(method, SIGN_IN_METHODS),
                )
            )
    proxy = str(settings.get("proxy") or "").strip()
    if proxy not in ("auto", "none"):
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            found.append(
                ConfigProblem(
                    "web.proxy",
                    f'{proxy!r} is not an IP address, "auto" or "none"',
                    'give the address the reverse proxy connects from, e.g. "10.0.0.5"',
                )
            )
    if "microsoft365" in (settings.get("sign_in") or ()):
        for key in ("entra_tenant_id", "entra_client_id"):
            if not str(settings.get(key) or "").strip():
                found.append(ConfigProblem(f"web.{key}", "is required for microsoft365 sign-in"))
        if settings.get("entra_client_secret") is None:
            found.append(
                ConfigProblem("web.entra_client_secret", "is required for microsoft365 sign-in")
            )
    problems += found
    if found:
        return WebSettings()
    settings["board_roles"] = tuple(settings["board_roles"])
    settings["sign_in"] = tuple(settings["sign_in"])
    return WebSettings(**settings)


RETENTION_OPTIONS: dict[str, Option] = {
    "personal_data_after": Option(
        "str", default="90d",
        help="names, addresses, subjects and staff ids are anonymised this long after a "
        'routine visit ends ("90d", "12w", "1y")',
    ),
    "incidents_after": Option(
        "str", default="3y",
        help="the same for a visit that escalated past the manager or asked for help",
    ),
    "keep_statistics": Option(
        "str", default="6y",
        help='anonymised rows are deleted this long after the visit ("forever": kept)',
    ),
    "message_bodies_after": Option(
        "str", default="30d", help="a notification's words are removed this long after it",
    ),
    "scheduled": Option("bool", default=True, help="the daemon applies retention daily"),
}  # fmt: skip

_PERIOD = re.compile(r"(\d+)\s*([dwy])", re.IGNORECASE)
_PERIOD_DAYS = {"d": 1, "w": 7, "y": 366}  # a year counts as 366 days: never a day short


def retention_period(text: Any) -> timedelta:
    """``"90d"``, ``"12w"``, ``"6y"`` (or a mix, ``"1y6w"``) as days; ValueError otherwise."""
    compact = text.strip().replace(" ", "") if isinstance(text, str) else ""
    days, pos = 0, 0
    for match in _PERIOD.finditer(compact):
        if match.start() != pos:
            break
        days += int(match.group(1)) * _PERIOD_DAYS[match.group(2).lower()]
        pos = match.end()
    if not compact or pos != len(compact) or days <= 0 or days > 100 * 366:
        raise ValueError(f'{text!r} is not a retention period; write e.g. "30d", "12w", "6y"')
    return timedelta(days=days)


def parse_retention(
    table: Mapping[str, Any], config_dir: Path, problems: list[ConfigProblem]
) -> RetentionSettings:
    settings, found = validate_options(table, RETENTION_OPTIONS, "retention", config_dir)
    periods: dict[str, timedelta | None] = {}
    for key in (
        "personal_data_after",
        "incidents_after",
        "keep_statistics",
        "message_bodies_after",
    ):
        if key not in settings:
            continue
        if key == "keep_statistics" and str(settings[key]).strip().lower() == "forever":
            periods[key] = None
            continue
        try:
            periods[key] = retention_period(settings[key])
        except ValueError as err:
            found.append(ConfigProblem(f"retention.{key}", str(err)))
    personal, incidents = periods.get("personal_data_after"), periods.get("incidents_after")
    kept = periods.get("keep_statistics")
    if personal and incidents and incidents < personal:
        found.append(ConfigProblem(
            "retention.incidents_after", "is shorter than personal_data_after",
            "an incident is kept at least as long as a routine visit",
        ))  # fmt: skip
    if kept and incidents and personal and kept < max(personal, incidents):
        found.append(ConfigProblem(
            "retention.keep_statistics", "is shorter than the personal-data periods",
            "statistics outlive the names: make it longer, or \"forever\"",
        ))  # fmt: skip
    problems += found
    if found:
        return RetentionSettings()
    return RetentionSettings(scheduled=settings["scheduled"], **periods)  # type: ignore[arg-type]


STAFF_OPTIONS: dict[str, Option] = {
    "id": Option("str", required=True, help="usually the e-mail address"),
    "name": Option("str", required=True),
    "email": Option("str", default=""),
    "mobile": Option(
        "str", default="", help='for texts: "07700 900123" (read as UK) or "+44 7700 900123"'
    ),
    "role": Option("str", default="worker", help="worker, manager, director, admin, ..."),
    "manager": Option("str", default="", help="the id of this person's line manager"),
}

# Per-source overrides of the [daemon] removal guard (sync.py); absent: the daemon's.
SOURCE_COMMON: dict[str, Option] = {
    "removal_guard": Option("float", help="this source's removal_guard share"),
    "removal_guard_min": Option("int", positive=True, help="this source's removal_guard_min"),
    "removal_hold": Option("duration", positive=True, help="this source's removal_hold"),
}

# Every kind a channel's `kinds` may name, in the order NotificationKind declares them.
KINDS: tuple[str, ...] = tuple(NotificationKind)

CHANNEL_COMMON: dict[str, Option] = {
    "fallback": Option("str", default="", help="channel used when this one keeps failing"),
    "kinds": Option("list", default=None, help="notification kinds sent here (default: all)"),
}


def parse_daemon(
    table: Mapping[str, Any], config_dir: Path, problems: list[ConfigProblem]
) -> DaemonSettings | None:
    settings, found = validate_options(table, DAEMON_OPTIONS, "daemon", config_dir)
    problems += found
    zone = None
    if isinstance(settings.get("timezone"), str):
        try:
            zone = ZoneInfo(settings["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(
                ConfigProblem(
                    "daemon.timezone",
                    f"unknown time zone {settings['timezone']!r}",
                    'use an IANA name such as "Europe/London"',
                )
            )
    problems += _guard_problems(settings, "daemon")
    for key in ("database", "state_dir"):
        if isinstance(settings.get(key), Path):
            problems += _unusable_path(f"daemon.{key}", settings[key], folder=key == "state_dir")
    if found or zone is None:
        return None
    settings["timezone"] = zone
    return DaemonSettings(**settings)


def _unusable_path(key: str, path: Path, *, folder: bool) -> list[ConfigProblem]:
    """A file path that names a folder, or lies under a file, can never be opened."""
    if folder:
        if path.exists() and not path.is_dir():
            return [ConfigProblem(key, f"{path} is a file, not a folder")]
    elif path.is_dir():
        return [ConfigProblem(key, f"{path} is a folder", "name a file, e.g. visitwatch.db")]
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return [ConfigProblem(key, f"{parent} is a file, so {path} cannot be made")]
            break
    return []


def parse_staff(entries: list[Any], config_dir: Path, problems: list[ConfigProblem]) -> Directory:
    members: dict[str, StaffMember] = {}
    for index, entry in enumerate(entries):
        prefix = f"staff[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(ConfigProblem(prefix, "expected a table [[staff]]"))
            continue
        settings, found = validate_options(entry, STAFF_OPTIONS, prefix, config_dir)
        problems += found
        if found:
            continue
        settings["id"] = settings["id"].strip().lower()
        settings["manager"] = settings["manager"].strip().lower()
        if not settings["email"] and "@" in settings["id"]:
            settings["email"] = settings["id"]
        if settings["mobile"].strip():
            # One form (E.164) everywhere: providers want it, inbound texts arrive in it.
            try:
                settings["mobile"] = e164(settings["mobile"])
            except InvalidNumber as err:
                problems.append(
                    ConfigProblem(
                        f"{prefix}.mobile",
                        str(err),
                        'write it as "07700 900123" or with its country code, "+44 7700 900123"',
                    )
                )
                continue
        else:
            settings["mobile"] = ""
        if settings["id"] in members:
            problems.append(ConfigProblem(f"{prefix}.id", f"{settings['id']!r} appears twice"))
        members[settings["id"]] = StaffMember(**settings)
    for index, member in enumerate(members.values()):
        if member.manager and member.manager not in members:
            close = did_you_mean(member.manager, members, listing=False)
            problems.append(
                ConfigProblem(
                    f"staff[{index}].manager",
                    f"manager {member.manager!r} is not in the staff directory",
                    close or "add them as a [[staff]] entry or correct the id",
                )
            )
    return Directory(members)


def parse_connectors(
    entries: list[Any],
    section: str,
    known: Mapping[str, str],
    load: Callable[[str], type[Connector]],
    config_dir: Path,
    problems: list[ConfigProblem],
) -> list[ConnectorConfig]:
    result: list[ConnectorConfig] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        prefix = f"{section}[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(ConfigProblem(prefix, f"expected a table [[{section}]]"))
            continue
        name, type_name = entry.get("name"), entry.get("type")
        if not isinstance(name, str) or not name:
            problems.append(ConfigProblem(f"{prefix}.name", "is required (a short unique name)"))
            name = f"{section}[{index}]"
        elif name in names:
            problems.append(ConfigProblem(f"{prefix}.name", f"{name!r} is used twice"))
        names.add(name)
        if not isinstance(type_name, str):
            problems.append(
                ConfigProblem(
                    f"{prefix}.type", "is required", "known types: " + ", ".join(sorted(known))
                )
            )
            continue
        try:
            cls = load(type_name)
        except UnknownConnectorType as err:
            problems.append(ConfigProblem(f"{prefix}.type", str(err)))
            continue
        options = dict(cls.options)
        is_channel = issubclass(cls, Channel)
        if is_channel:
            options.update(CHANNEL_COMMON)
        else:
            options.update(SOURCE_COMMON)
        settings, found = validate_options(
            entry, options, prefix, config_dir, ignore=frozenset({"name", "type"})
        )
        if not found:
            # Checks across options, declared by the connector class itself.
            found = [
                ConfigProblem(f"{prefix}.{p.key}", p.message, p.hint)
                for p in cls.settings_problems(settings)
            ]
        if not is_channel and not found:
            found = _guard_problems(settings, prefix)
        problems += found
        if found:
            continue
        fallback, kinds = "", None
        if is_channel:
            fallback = settings.pop("fallback") or ""
            kinds = settings.pop("kinds")
            for kind in kinds or ():
                if kind not in KINDS:
                    problems.append(
                        ConfigProblem(f"{prefix}.kinds", f"unknown kind {kind!r}", kind_hint(kind))
                    )
        result.append(
            ConnectorConfig(
                name, type_name, cls, settings, fallback, tuple(kinds) if kinds else None
            )
        )
    return result


def kind_hint(kind: str) -> str:
    """The hint for a notification kind nobody knows: the closest, else all of them."""
    close = did_you_mean(kind, KINDS, listing=False)
    return close or "known: " + ", ".join(KINDS)


def _guard_problems(settings: Mapping[str, Any], prefix: str) -> list[ConfigProblem]:
    """The removal guard's share is a fraction below 1 (its count and hold are options)."""
    share = settings.get("removal_guard")
    if share is None or 0 <= share < 1:
        return []
    return [
        ConfigProblem(
            f"{prefix}.removal_guard",
            f"{share} is not a share",
            "a number from 0 up to (not including) 1, e.g. 0.5",
        )
    ]
