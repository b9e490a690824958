"""The admin's TOML file, read into typed settings with every problem reported at once.

This module is the entry point (:func:`load_config`, :class:`Config`, :class:`ConfigError`);
the sections are parsed in :mod:`visitwatch.daemon.config_sections` and the types they
become live in :mod:`visitwatch.daemon.config_types`. Both are re-exported here, so callers
import everything from ``visitwatch.daemon.config``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visitwatch.connectors.base import Channel
from visitwatch.connectors.registry import CHANNELS, SOURCES, channel_class, source_class
from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import ConfigProblem, did_you_mean
from visitwatch.daemon.config_sections import (
    CHANNEL_COMMON,
    DAEMON_OPTIONS,
    KINDS,
    SOURCE_COMMON,
    STAFF_OPTIONS,
    parse_connectors,
    parse_daemon,
    parse_retention,
    parse_staff,
    parse_web,
)
from visitwatch.daemon.config_types import (
    ConnectorConfig,
    DaemonSettings,
    Directory,
    RetentionSettings,
    StaffMember,
    WebSettings,
)
from visitwatch.policies import parse_policy
from visitwatch.policies.model import PolicySettings

__all__ = [
    "CHANNEL_COMMON",
    "CONFIG_ENV",
    "DAEMON_OPTIONS",
    "KINDS",
    "SOURCE_COMMON",
    "STAFF_OPTIONS",
    "STARTER_HINT",
    "Config",
    "ConfigError",
    "ConnectorConfig",
    "DaemonSettings",
    "Directory",
    "StaffMember",
    "config_path",
    "load_config",
    "parse_config",
]

# Named in messages: what exists after `pip install` (the repo's examples/ does not).
STARTER_HINT = "`visitwatch init` writes a commented starter config"
CONFIG_ENV = "VISITWATCH_CONFIG"
# The longest public_base_url a text's short link may start with: the link (this, "/s/" and
# a 16-character code) leaves about 190 of two segments' 306 characters for the news.
MAX_TEXT_BASE_URL = 100

SECTIONS = ("daemon", "staff", "sources", "channels", "policy", "web", "retention")


class ConfigError(VisitwatchError):
    def __init__(self, path: Path | None, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        where = str(path) if path else "configuration"
        lines = [f"{where}: {len(problems)} problem(s)"]
        lines += [f"  - {p}" for p in problems]
        lines.append(f"  ({STARTER_HINT}: every setting is explained there)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Config:
    path: Path | None
    daemon: DaemonSettings
    directory: Directory
    sources: tuple[ConnectorConfig, ...]
    channels: tuple[ConnectorConfig, ...]
    policy: PolicySettings
    web: WebSettings = field(default_factory=WebSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)


def config_path(explicit: str | None) -> Path:
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise VisitwatchError(
            f"no configuration given: pass --config PATH or set {CONFIG_ENV} "
            f"({STARTER_HINT}; or try `visitwatch demo`)"
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
    for key in raw:
        if key not in SECTIONS:
            hint = did_you_mean(key, SECTIONS).replace("known: ", "sections: ", 1)
            problems.append(ConfigProblem(key, "unknown section", hint))

    daemon = parse_daemon(_table(raw, "daemon", problems), config_dir, problems)
    directory = parse_staff(_array(raw, "staff", problems), config_dir, problems)
    sources = parse_connectors(
        _array(raw, "sources", problems), "sources", SOURCES, source_class, config_dir, problems
    )
    channel_entries = _array(raw, "channels", problems)
    channels = parse_connectors(
        channel_entries, "channels", CHANNELS, channel_class, config_dir, problems
    )
    # Every name written, also of channels that could not be built (their problem is
    # reported already): a fallback naming one is not a second, misleading problem.
    declared = [e.get("name") if isinstance(e, Mapping) else None for e in channel_entries]
    web = parse_web(_table(raw, "web", problems), config_dir, problems)
    retention = parse_retention(_table(raw, "retention", problems), config_dir, problems)
    policy, policy_problems = parse_policy(_table(raw, "policy", problems))
    problems += policy_problems

    if web.enabled and daemon is not None and not daemon.public_base_url:
        problems.append(
            ConfigProblem(
                "daemon.public_base_url",
                "is required when [web] is enabled: messages carry links to it",
                'e.g. public_base_url = "https://visitwatch.example.org"',
            )
        )
    texting = [
        c.name for c in channels if issubclass(c.cls, Channel) and c.cls.address_field == "mobile"
    ]
    base = daemon.public_base_url if daemon is not None else ""
    if texting and base and len(base) > MAX_TEXT_BASE_URL:
        problems.append(
            ConfigProblem(
                "daemon.public_base_url",
                f"is {len(base)} characters: a text ({', '.join(texting)}) carries its link "
                "whole within two segments, with the news, only if the address is at most "
                f"{MAX_TEXT_BASE_URL}",
                "serve the pages at a shorter address, e.g. https://visits.example.org",
            )
        )
    _cross_check(directory, sources, channels, declared, policy, problems)
    if problems:
        raise ConfigError(path, problems)
    assert daemon is not None
    return Config(path, daemon, directory, tuple(sources), tuple(channels), policy, web, retention)


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


def _cross_check(
    directory: Directory,
    sources: list[ConnectorConfig],
    channels: list[ConnectorConfig],
    declared: list[Any],
    policy: PolicySettings,
    problems: list[ConfigProblem],
) -> None:
    for index, source in enumerate(sources):
        owner = source.owner
        if owner and directory.get(owner) is None:
            problems.append(
                ConfigProblem(f"sources[{index}].owner", f"{owner!r} is not in the staff directory")
            )
    by_name = {c.name: c for c in channels}
    for channel in channels:
        index = declared.index(channel.name)  # its place in the file, for the key
        if channel.fallback and channel.fallback not in declared:
            hint = did_you_mean(
                channel.fallback, [n for n in declared if isinstance(n, str)]
            ).replace("known: ", "channels: ")
            problems.append(
                ConfigProblem(
                    f"channels[{index}].fallback",
                    f"no channel is named {channel.fallback!r}",
                    hint,
                )
            )
        if channel.fallback == channel.name:
            problems.append(
                ConfigProblem(f"channels[{index}].fallback", "cannot be the channel itself")
            )
        fallback = by_name.get(channel.fallback)
        if fallback is not None and fallback.broadcasts != channel.broadcasts:
            # A person's message carries their own signed link: copied to a shared place,
            # anyone there could act as them. A place's post has no person to reach.
            shared = fallback if fallback.broadcasts else channel
            problems.append(
                ConfigProblem(
                    f"channels[{index}].fallback",
                    f"{shared.name!r} posts to a shared place ({shared.type}), the other "
                    "reaches people: one cannot stand in for the other",
                    "fall back from a person's channel to another person's channel (sms, "
                    "smtp, outbox), and from a shared place to another place",
                )
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
                close = did_you_mean(target, directory.members, listing=False)
                problems.append(
                    ConfigProblem(
                        key,
                        f"{target!r} is not in the staff directory",
                        close or 'use "worker", "manager", "role:<role>" or a staff id',
                    )
                )
