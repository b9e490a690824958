"""The admin's TOML file, read into typed settings with every problem reported at once."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from visitwatch.connectors.base import CalendarSource, Channel, Connector
from visitwatch.connectors.registry import (
    CHANNELS,
    SOURCES,
    UnknownConnectorType,
    channel_class,
    source_class,
)
from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import ConfigProblem, Option, validate_options
from visitwatch.policies import parse_policy
from visitwatch.policies.model import PolicySettings

EXAMPLE = "examples/visitwatch.toml"
CONFIG_ENV = "VISITWATCH_CONFIG"

DAEMON_OPTIONS: dict[str, Option] = {
    "database": Option("path", default="visitwatch.db", help="SQLite file; relative to this file"),
    "state_dir": Option("path", default=".", help="folder for caches and the outbox"),
    "timezone": Option("str", default="Europe/London", help="IANA zone, e.g. Europe/London"),
    "poll_interval": Option("duration", default="5m", help="how often calendars are read"),
    "sweep_interval": Option("duration", default="10s", help="how often deadlines are checked"),
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
        help="an alert not delivered within this long goes to its channel's fallback and "
        "raises an admin notice",
    ),
    "send_timeout": Option(
        "duration",
        default="30s",
        help="the longest one delivery attempt may take before it counts as failed",
    ),
    "removal_guard": Option(
        "float",
        default=0.5,
        help="a read that would remove more than this share of a source's watched visits "
        "(and at least removal_guard_min of them), or all of them, is held, not applied",
    ),
    "removal_guard_min": Option(
        "int", default=3, help="the fewest removals the removal_guard share applies to"
    ),
    "removal_hold": Option(
        "duration",
        default="30m",
        help="a held read is applied once it has repeated this long (or an admin confirms "
        "it with `visitwatch sources confirm NAME`)",
    ),
    "public_base_url": Option("str", default="", help="where staff reach check-in links"),
    "log_level": Option("str", default="info", choices=("debug", "info", "warning", "error")),
}

STAFF_OPTIONS: dict[str, Option] = {
    "id": Option("str", required=True, help="usually the e-mail address"),
    "name": Option("str", required=True),
    "email": Option("str", default=""),
    "mobile": Option("str", default=""),
    "role": Option("str", default="worker", help="worker, manager, director, admin, ..."),
    "manager": Option("str", default="", help="the id of this person's line manager"),
}

# Per-source overrides of the [daemon] removal guard (sync.py); absent: the daemon's.
SOURCE_COMMON: dict[str, Option] = {
    "removal_guard": Option("float", help="this source's removal_guard share"),
    "removal_guard_min": Option("int", help="this source's removal_guard_min"),
    "removal_hold": Option("duration", help="this source's removal_hold"),
}

CHANNEL_COMMON: dict[str, Option] = {
    "fallback": Option("str", default="", help="channel used when this one keeps failing"),
    "kinds": Option("list", default=None, help="notification kinds sent here (default: all)"),
}

NOTIFICATION_KINDS = (
    "compliance",
    "reminder",
    "overrun",
    "escalation",
    "help",
    "all_clear",
    "extended",
    "ended",
    "removed",  # a visit under way was removed from the calendar: is the worker safe?
    "admin",
)


class ConfigError(VisitwatchError):
    def __init__(self, path: Path | None, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        where = str(path) if path else "configuration"
        lines = [f"{where}: {len(problems)} problem(s)"]
        lines += [f"  - {p}" for p in problems]
        lines.append(f"  (every setting is explained in {EXAMPLE})")
        super().__init__("\n".join(lines))


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
    cls: type[Connector]
    settings: Mapping[str, Any]
    fallback: str = ""
    kinds: tuple[str, ...] | None = None

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
    # is told (dispatch.py).
    delivery_deadline: timedelta = timedelta(minutes=2)
    # The longest one delivery attempt may take before it counts as failed.
    send_timeout: timedelta = timedelta(seconds=30)
    # The mass-removal guard (sync.py): share, fewest removals, how long a held read waits.
    removal_guard: float = 0.5
    removal_guard_min: int = 3
    removal_hold: timedelta = timedelta(minutes=30)


@dataclass(frozen=True)
class Config:
    path: Path | None
    daemon: DaemonSettings
    directory: Directory
    sources: tuple[ConnectorConfig, ...]
    channels: tuple[ConnectorConfig, ...]
    policy: PolicySettings


def config_path(explicit: str | None) -> Path:
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise VisitwatchError(
            f"no configuration given: pass --config PATH or set {CONFIG_ENV} "
            f"(start from {EXAMPLE}, or try `visitwatch demo`)"
        )
    return Path(chosen)


def load_config(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(path, [ConfigProblem("(file)", f"cannot read: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        problem = ConfigProblem(
            "(file)",
            f"not UTF-8 text: byte 0x{err.object[err.start]:02x} on line {line}",
            "save the file as UTF-8",
        )
        raise ConfigError(path, [problem]) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [ConfigProblem("(file)", f"not valid TOML: {err}")]) from err
    return parse_config(raw, path.resolve().parent, path)


def parse_config(raw: Mapping[str, Any], config_dir: Path, path: Path | None = None) -> Config:
    problems: list[ConfigProblem] = []
    known_sections = {"daemon", "staff", "sources", "channels", "policy"}
    for key in raw:
        if key not in known_sections:
            problems.append(
                ConfigProblem(
                    key, "unknown section", "sections: " + ", ".join(sorted(known_sections))
                )
            )

    daemon = _parse_daemon(_table(raw, "daemon", problems), config_dir, problems)
    directory = _parse_staff(_array(raw, "staff", problems), config_dir, problems)
    sources = _parse_connectors(
        _array(raw, "sources", problems), "sources", SOURCES, source_class, config_dir, problems
    )
    channels = _parse_connectors(
        _array(raw, "channels", problems), "channels", CHANNELS, channel_class, config_dir, problems
    )
    policy, policy_problems = parse_policy(_table(raw, "policy", problems))
    problems += policy_problems

    _cross_check(directory, sources, channels, policy, problems)
    if problems:
        raise ConfigError(path, problems)
    assert daemon is not None
    return Config(path, daemon, directory, tuple(sources), tuple(channels), policy)


def _table(raw: Mapping[str, Any], key: str, problems: list[ConfigProblem]) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        problems.append(ConfigProblem(key, f"expected a table [{key}]"))
        return {}
    return value


def _array(raw: Mapping[str, Any], key: str, problems: list[ConfigProblem]) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.append(ConfigProblem(key, f"expected an array of tables [[{key}]]"))
        return []
    return value


def _parse_daemon(
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
    for key in ("poll_interval", "sweep_interval", "delivery_deadline", "send_timeout"):
        value = settings.get(key)
        if isinstance(value, timedelta) and value <= timedelta(0):
            problems.append(ConfigProblem(f"daemon.{key}", "must be longer than zero"))
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


def _parse_staff(entries: list[Any], config_dir: Path, problems: list[ConfigProblem]) -> Directory:
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
        if settings["id"] in members:
            problems.append(ConfigProblem(f"{prefix}.id", f"{settings['id']!r} appears twice"))
        members[settings["id"]] = StaffMember(**settings)
    for index, member in enumerate(members.values()):
        if member.manager and member.manager not in members:
            problems.append(
                ConfigProblem(
                    f"staff[{index}].manager",
                    f"manager {member.manager!r} is not in the staff directory",
                    "add them as a [[staff]] entry or correct the id",
                )
            )
    return Directory(members)


def _parse_connectors(
    entries: list[Any],
    section: str,
    known: Mapping[str, str],
    load: Any,
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
                ConfigProblem(f"{prefix}.type", "is required", "known types: " + ", ".join(known))
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
                if kind not in NOTIFICATION_KINDS:
                    problems.append(
                        ConfigProblem(
                            f"{prefix}.kinds",
                            f"unknown kind {kind!r}",
                            "known: " + ", ".join(NOTIFICATION_KINDS),
                        )
                    )
        result.append(
            ConnectorConfig(
                name, type_name, cls, settings, fallback, tuple(kinds) if kinds else None
            )
        )
    return result


def _guard_problems(settings: Mapping[str, Any], prefix: str) -> list[ConfigProblem]:
    problems = []
    share = settings.get("removal_guard")
    if share is not None and not 0 <= share < 1:
        problems.append(
            ConfigProblem(
                f"{prefix}.removal_guard",
                f"{share} is not a share",
                "a number from 0 up to (not including) 1, e.g. 0.5",
            )
        )
    minimum = settings.get("removal_guard_min")
    if minimum is not None and minimum < 1:
        problems.append(ConfigProblem(f"{prefix}.removal_guard_min", "must be at least 1"))
    hold = settings.get("removal_hold")
    if isinstance(hold, timedelta) and hold <= timedelta(0):
        problems.append(ConfigProblem(f"{prefix}.removal_hold", "must be longer than zero"))
    return problems


def _cross_check(
    directory: Directory,
    sources: list[ConnectorConfig],
    channels: list[ConnectorConfig],
    policy: PolicySettings,
    problems: list[ConfigProblem],
) -> None:
    for index, source in enumerate(sources):
        owner = source.owner
        if owner and directory.get(owner) is None:
            problems.append(
                ConfigProblem(f"sources[{index}].owner", f"{owner!r} is not in the staff directory")
            )
    channel_names = {c.name for c in channels}
    for index, channel in enumerate(channels):
        if channel.fallback and channel.fallback not in channel_names:
            problems.append(
                ConfigProblem(
                    f"channels[{index}].fallback",
                    f"no channel is named {channel.fallback!r}",
                    "channels: " + ", ".join(sorted(channel_names)),
                )
            )
        if channel.fallback == channel.name:
            problems.append(
                ConfigProblem(f"channels[{index}].fallback", "cannot be the channel itself")
            )
    if not channels:
        problems.append(
            ConfigProblem(
                "channels",
                "no alert channel configured",
                'add at least [[channels]] name = "outbox" type = "outbox"',
            )
        )
    for index, step in enumerate(policy.escalation):
        for target in step.to:
            key = f"policy.escalation[{index}].to"
            if target in ("worker", "manager"):
                continue
            if target.startswith("role:"):
                role = target.removeprefix("role:")
                if not directory.with_role(role):
                    problems.append(
                        ConfigProblem(key, f"nobody in the staff directory has role {role!r}")
                    )
            elif directory.get(target) is None:
                problems.append(
                    ConfigProblem(
                        key,
                        f"{target!r} is not in the staff directory",
                        'use "worker", "manager", "role:<role>" or a staff id',
                    )
                )
