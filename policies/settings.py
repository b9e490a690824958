"""The admin's ``[policy]`` table, laid over a preset, checked and turned into settings.

Nothing here raises on bad input: :func:`parse_policy` returns the best settings it could
build plus every :class:`ConfigProblem` it found, so an admin sees all mistakes at once.
Staff ids in the ladder are not checked here; the caller holds the staff directory.
The presets live in :mod:`~visitwatch.policies.library`, the escalation ladder's parsing
in :mod:`~visitwatch.policies.ladder`; this module reads the rest and puts them together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import (
    ConfigProblem,
    Option,
    did_you_mean,
    parse_duration,
    validate_options,
)
from visitwatch.policies.ladder import STEP_KINDS, apply_grace, parse_ladder
from visitwatch.policies.library import (
    DEFAULT_PRESET,
    PresetError,
    known_presets,
    over_preset,
)
from visitwatch.policies.model import PolicySettings, Recognition
from visitwatch.policies.rules import FINDING_NAMES

__all__ = [
    "CLAUSE_KEYS",
    "DEFAULT_PRESET",
    "INSTRUCTION_KEYS",
    "NOTIFICATION_KINDS",
    "STEP_KINDS",
    "PresetError",
    "known_presets",
    "load_preset",
    "parse_policy",
]

# Every notification may quote a clause and say what to do: daemon/messages.py looks both
# up by the notification's kind.
NOTIFICATION_KINDS: tuple[str, ...] = tuple(kind.value for kind in NotificationKind)
# The keys [policy.clauses] takes: every finding (its name) and every notification kind.
CLAUSE_KEYS: tuple[str, ...] = FINDING_NAMES + NOTIFICATION_KINDS
INSTRUCTION_KEYS: tuple[str, ...] = NOTIFICATION_KINDS

# Unused by validate_options for these kinds, but its signature wants one.
_NO_CONFIG_DIR = Path(".")

_TOP_KEYS = (
    "preset",
    "title",
    "recognition",
    "requirements",
    "timing",
    "checkin",
    "escalation",
    "clauses",
    "instructions",
    "texts",
)
_TABLES = ("recognition", "requirements", "timing", "checkin", "clauses", "instructions", "texts")

_RECOGNITION_OPTIONS: dict[str, Option] = {
    "categories": Option("list", default=list(Recognition.categories)),
    "subject_patterns": Option("list", default=list(Recognition.subject_patterns)),
    "lone_working_categories": Option("list", default=list(Recognition.lone_working_categories)),
    "lone_working_patterns": Option("list", default=list(Recognition.lone_working_patterns)),
    "require_location": Option("bool", default=False),
    "include_all_day": Option("bool", default=False),
}
_PATTERN_KEYS = ("subject_patterns", "lone_working_patterns")

# config key -> PolicySettings field
_REQUIREMENT_FIELDS = {
    "risk_assessment": "require_risk_assessment",
    "lone_working_risk_assessment": "require_lone_working_risk_assessment",
    "expected_return": "require_expected_return",
    "address": "require_address",
    "return_defaults_to_end": "return_defaults_to_end",
    "notify_manager_of_findings": "notify_manager_of_findings",
}
_REQUIREMENT_OPTIONS: dict[str, Option] = {
    key: Option("bool", default=PolicySettings.__dataclass_fields__[name].default)
    for key, name in _REQUIREMENT_FIELDS.items()
}
_TIMING_OPTIONS: dict[str, Option] = {
    "grace": Option("duration", default="15m"),
    "default_duration": Option("duration", default="1h"),
    "notice_before_start": Option("duration", default="30m"),
    "ack_timeout": Option("duration", default="30m"),
}
_CHECKIN_OPTIONS: dict[str, Option] = {
    "categories": Option("list", default=["Safe", "Checked in"]),
    "help_categories": Option("list", default=["Help", "Need help"]),
}

_TEXTS_OPTIONS: dict[str, Option] = {
    "names": Option("bool", default=True, help="the worker's name in texts"),
    "address": Option("bool", default=True, help="the visit's address in texts"),
}


def load_preset(name: str) -> PolicySettings:
    """The settings of a shipped preset, unchanged. Raises :class:`PresetError`."""
    settings, problems = parse_policy({"preset": name})
    if problems:
        listed = "; ".join(str(problem) for problem in problems)
        raise PresetError(f"preset {name!r} cannot be used: {listed}")
    return settings


def _unknown_key(key: str, known: tuple[str, ...], path: str) -> ConfigProblem:
    # Worded as validate_options words its own unknown keys.
    hint = did_you_mean(key, known).replace("known: ", "known keys: ", 1)
    return ConfigProblem(path, "unknown key", hint)


def _table(value: Any, path: str, problems: list[ConfigProblem]) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    problems.append(ConfigProblem(path, f"expected a table, got {value!r}"))
    return {}


def _patterns(patterns: list[str], path: str, problems: list[ConfigProblem]) -> tuple[str, ...]:
    """Keep the regexes that compile; report the others with the regex error."""
    good: list[str] = []
    for index, pattern in enumerate(patterns):
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as err:
            problems.append(
                ConfigProblem(
                    f"{path}[{index}]",
                    f"invalid regular expression {pattern!r}: {err}",
                    "patterns are Python regexes; write them in '...' TOML strings",
                )
            )
            continue
        good.append(pattern)
    return tuple(good)


def _names(values: list[str], path: str, problems: list[ConfigProblem]) -> tuple[str, ...]:
    """Trimmed, non-empty category names."""
    names: list[str] = []
    for index, value in enumerate(values):
        if not value.strip():
            problems.append(ConfigProblem(f"{path}[{index}]", "empty name"))
            continue
        names.append(value.strip())
    return tuple(names)


def _texts(
    table: Mapping[str, Any], known: tuple[str, ...], path: str, problems: list[ConfigProblem]
) -> dict[str, str]:
    """A table of name -> text; names outside ``known`` would be silently unused."""
    texts: dict[str, str] = {}
    for key, value in table.items():
        if key not in known:
            problems.append(_unknown_key(key, known, f"{path}.{key}"))
        elif not isinstance(value, str) or not value.strip():
            problems.append(ConfigProblem(f"{path}.{key}", f"expected some text, got {value!r}"))
        else:
            texts[key] = value.strip()
    return texts


def parse_policy(
    table: Mapping[str, Any], prefix: str = "policy"
) -> tuple[PolicySettings, list[ConfigProblem]]:
    """Build settings from the admin's ``[policy]`` table over its preset; list all problems."""
    problems: list[ConfigProblem] = []
    table = _table(table, prefix, problems)

    preset_name, merged = over_preset(table, prefix, problems)

    for key in merged:
        if key not in _TOP_KEYS:
            problems.append(_unknown_key(key, _TOP_KEYS, f"{prefix}.{key}"))
    tables = {name: _table(merged.get(name, {}), f"{prefix}.{name}", problems) for name in _TABLES}

    title = merged.get("title", "")
    if not isinstance(title, str) or not title.strip():
        problems.append(
            ConfigProblem(f"{prefix}.title", f"expected the policy's name, got {title!r}")
        )
        title = preset_name
    title = title.strip()

    path = f"{prefix}.recognition"
    recognition_values, found = validate_options(
        tables["recognition"], _RECOGNITION_OPTIONS, path, _NO_CONFIG_DIR
    )
    problems.extend(found)
    recognition = Recognition(
        categories=_names(
            recognition_values.get("categories") or [], f"{path}.categories", problems
        ),
        subject_patterns=_patterns(
            recognition_values.get("subject_patterns") or [], f"{path}.subject_patterns", problems
        ),
        lone_working_categories=_names(
            recognition_values.get("lone_working_categories") or [],
            f"{path}.lone_working_categories",
            problems,
        ),
        lone_working_patterns=_patterns(
            recognition_values.get("lone_working_patterns") or [],
            f"{path}.lone_working_patterns",
            problems,
        ),
        require_location=bool(recognition_values.get("require_location")),
        include_all_day=bool(recognition_values.get("include_all_day")),
    )

    requirement_values, found = validate_options(
        tables["requirements"], _REQUIREMENT_OPTIONS, f"{prefix}.requirements", _NO_CONFIG_DIR
    )
    problems.extend(found)
    requirements: dict[str, bool] = {}
    for key, field_name in _REQUIREMENT_FIELDS.items():
        value = requirement_values.get(key)
        requirements[field_name] = value if value is not None else _REQUIREMENT_OPTIONS[key].default

    path = f"{prefix}.timing"
    timing_values, found = validate_options(tables["timing"], _TIMING_OPTIONS, path, _NO_CONFIG_DIR)
    problems.extend(found)
    timing: dict[str, timedelta] = {}
    for key, option in _TIMING_OPTIONS.items():
        value = timing_values.get(key)  # None when the admin's value was unreadable
        timing[key] = value if value is not None else parse_duration(option.default)
    if "default_duration" in timing_values and timing["default_duration"] <= timedelta(0):
        problems.append(
            ConfigProblem(f"{path}.default_duration", "must be longer than 0s", 'e.g. "1h"')
        )
        timing["default_duration"] = parse_duration(_TIMING_OPTIONS["default_duration"].default)
    if "ack_timeout" in timing_values and timing["ack_timeout"] <= timedelta(0):
        problems.append(
            ConfigProblem(f"{path}.ack_timeout", "must be longer than 0s", 'e.g. "30m"')
        )
        timing["ack_timeout"] = parse_duration(_TIMING_OPTIONS["ack_timeout"].default)

    path = f"{prefix}.checkin"
    checkin_values, found = validate_options(
        tables["checkin"], _CHECKIN_OPTIONS, path, _NO_CONFIG_DIR
    )
    problems.extend(found)
    texts, found = validate_options(
        tables["texts"], _TEXTS_OPTIONS, f"{prefix}.texts", _NO_CONFIG_DIR
    )
    problems.extend(found)

    if "escalation" in merged:
        escalation = parse_ladder(merged["escalation"], f"{prefix}.escalation", problems)
    else:
        problems.append(
            ConfigProblem(
                f"{prefix}.escalation", "the ladder has no steps", "add [[policy.escalation]]"
            )
        )
        escalation = ()
    admin_timing = table.get("timing")
    escalation, timing["grace"] = apply_grace(
        escalation,
        timing["grace"],
        grace_written=isinstance(admin_timing, Mapping)
        and timing_values.get("grace") is not None
        and "grace" in admin_timing,
        ladder_written="escalation" in table,
        prefix=prefix,
        problems=problems,
    )

    settings = PolicySettings(
        name=preset_name,
        title=title,
        recognition=recognition,
        grace=timing["grace"],
        default_duration=timing["default_duration"],
        notice_before_start=timing["notice_before_start"],
        ack_timeout=timing["ack_timeout"],
        escalation=escalation,
        checkin_categories=_names(
            checkin_values.get("categories") or [], f"{path}.categories", problems
        ),
        help_categories=_names(
            checkin_values.get("help_categories") or [], f"{path}.help_categories", problems
        ),
        clauses=_texts(tables["clauses"], CLAUSE_KEYS, f"{prefix}.clauses", problems),
        instructions=_texts(
            tables["instructions"], INSTRUCTION_KEYS, f"{prefix}.instructions", problems
        ),
        text_names=bool(texts.get("names", True)),
        text_address=bool(texts.get("address", True)),
        **requirements,
    )
    return settings, problems
