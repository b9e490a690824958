"""The admin's ``[policy]`` table, laid over a preset, checked and turned into settings.

Nothing here raises on bad input: :func:`parse_policy` returns the best settings it could
build plus every :class:`ConfigProblem` it found, so an admin sees all mistakes at once.
Staff ids in the ladder are not checked here; the caller holds the staff directory.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import (
    ConfigProblem,
    Option,
    format_duration,
    parse_duration,
    validate_options,
)
from visitwatch.policies.model import EscalationStep, PolicySettings, Recognition

DEFAULT_PRESET = "pan-lancashire"

RULES = (
    "risk_assessment_missing",
    "risk_assessment_incomplete",
    "expected_return_missing",
    "expected_return_before_start",
    "address_missing",
    "pair_without_second_worker",
    "going_home_after",
)
# The message kinds the daemon sends (connectors.base.Message.kind).
ALERT_KINDS = (
    "compliance",
    "reminder",
    "overrun",
    "escalation",
    "all_clear",
    "ended",
    "help",
    "admin",
)
STEP_KINDS = ("reminder", "overrun", "escalation")

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
)
_TABLES = ("recognition", "requirements", "timing", "checkin", "clauses", "instructions")

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
_STEP_OPTIONS: dict[str, Option] = {
    "after": Option("duration", required=True, help='e.g. after = "15m"'),
    "to": Option("list", required=True, help='e.g. to = ["manager"]'),
    "kind": Option("str", required=True, choices=STEP_KINDS, help='e.g. kind = "overrun"'),
    "repeat": Option("duration"),
}


class PresetError(VisitwatchError):
    """A preset asked for by name is unknown or broken."""


def known_presets() -> list[str]:
    folder = resources.files("visitwatch.policies") / "presets"
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    )


@cache
def _read_preset(name: str) -> Mapping[str, Any]:
    # Cached: the daemon re-reads its config on SIGHUP; the data files never change.
    entry = resources.files("visitwatch.policies") / "presets" / f"{name}.toml"
    return tomllib.loads(entry.read_text(encoding="utf-8"))


def load_preset(name: str) -> PolicySettings:
    """The settings of a shipped preset, unchanged. Raises :class:`PresetError`."""
    settings, problems = parse_policy({"preset": name})
    if problems:
        listed = "; ".join(str(problem) for problem in problems)
        raise PresetError(f"preset {name!r} cannot be used: {listed}")
    return settings


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (lists included) replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _unknown_key(key: str, known: list[str] | tuple[str, ...], path: str) -> ConfigProblem:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))
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


def _recipients(values: list[str], path: str, problems: list[ConfigProblem]) -> tuple[str, ...]:
    if not values:
        problems.append(
            ConfigProblem(
                path,
                "this step alerts nobody",
                'list "worker", "manager", "role:<role>" or staff ids, e.g. to = ["manager"]',
            )
        )
        return ()
    recipients: list[str] = []
    for index, value in enumerate(values):
        value = value.strip()
        if not value or value == "role:" or (value.startswith("role:") and not value[5:].strip()):
            problems.append(
                ConfigProblem(
                    f"{path}[{index}]", f"empty recipient {value!r}", 'e.g. "role:director"'
                )
            )
            continue
        recipients.append(value)
    return tuple(recipients)


def _ladder(value: Any, path: str, problems: list[ConfigProblem]) -> tuple[EscalationStep, ...]:
    if not isinstance(value, list):
        problems.append(
            ConfigProblem(
                path, "expected a list of steps", "write each step as [[policy.escalation]]"
            )
        )
        return ()
    if not value:
        problems.append(
            ConfigProblem(path, "the ladder has no steps", "nobody would hear of an overrun")
        )
        return ()
    steps: list[EscalationStep] = []
    previous_after: timedelta | None = None
    for index, raw in enumerate(value):
        step_path = f"{path}[{index}]"
        if not isinstance(raw, Mapping):
            problems.append(ConfigProblem(step_path, f"expected a table, got {raw!r}"))
            continue
        values, step_problems = validate_options(raw, _STEP_OPTIONS, step_path, _NO_CONFIG_DIR)
        for problem in step_problems:
            written = raw.get("kind")
            if problem.key.endswith(".kind") and isinstance(written, str):
                close = difflib.get_close_matches(written, STEP_KINDS, n=1)
                if close:
                    problem = ConfigProblem(
                        problem.key, problem.message, f"did you mean {close[0]!r}?"
                    )
            problems.append(problem)
        after: timedelta | None = values.get("after")
        listed: list[str] | None = values.get("to")
        to = _recipients(listed, f"{step_path}.to", problems) if listed is not None else ()
        repeat: timedelta | None = values.get("repeat")
        if repeat is not None and repeat <= timedelta(0):
            problems.append(ConfigProblem(f"{step_path}.repeat", "must be longer than 0s"))
            repeat = None
        if "repeat" in raw and index != len(value) - 1:
            problems.append(
                ConfigProblem(
                    f"{step_path}.repeat",
                    "only the last step may repeat",
                    "move repeat to the last [[policy.escalation]] step",
                )
            )
        if after is not None:
            # Strictly increasing: the ladder's position is "the last step whose time has
            # come", which two steps at the same time would make ambiguous.
            if previous_after is not None and after <= previous_after:
                problems.append(
                    ConfigProblem(
                        f"{step_path}.after",
                        f"steps must be in increasing order of 'after'; this one is not later "
                        f"than the step before it ({format_duration(previous_after)})",
                        "put several recipients in one step's 'to' instead",
                    )
                )
            previous_after = after
        kind = values.get("kind")
        if after is not None and to and kind is not None:
            steps.append(EscalationStep(after=after, to=to, kind=kind, repeat=repeat))
    return tuple(steps)


def _first_beyond_worker(ladder: tuple[EscalationStep, ...]) -> int | None:
    """The index of the first rung that alerts anyone but the worker."""
    return next((i for i, step in enumerate(ladder) if set(step.to) - {"worker"}), None)


def _apply_grace(
    ladder: tuple[EscalationStep, ...],
    grace: timedelta,
    *,
    grace_written: bool,
    ladder_written: bool,
    prefix: str,
    problems: list[ConfigProblem],
) -> tuple[tuple[EscalationStep, ...], timedelta]:
    """Give ``grace`` its one meaning: the ``after`` of the first rung beyond the worker.

    - The admin writes their own ladder: that rung's ``after`` is the grace period; an admin
      ``grace`` that says otherwise is a problem naming both keys.
    - Otherwise (the preset's ladder): the rung moves to ``grace`` and every later rung
      keeps its distance from it (Pan Lancashire, grace 5m: manager at +5, directors at +35).
    """
    first = _first_beyond_worker(ladder)
    if first is None:
        if grace_written and ladder:
            problems.append(
                ConfigProblem(
                    f"{prefix}.timing.grace",
                    "the ladder alerts nobody but the worker, so there is no grace period to set",
                    f'add a step with to = ["manager"] to {prefix}.escalation',
                )
            )
        return ladder, grace
    rung = ladder[first]
    if ladder_written:
        if grace_written and grace != rung.after:
            problems.append(
                ConfigProblem(
                    f"{prefix}.timing.grace",
                    f"grace is {format_duration(grace)} but {prefix}.escalation[{first}].after "
                    f"(the first step beyond the worker) is {format_duration(rung.after)}; "
                    "both set when the manager is alerted",
                    f"remove {prefix}.timing.grace, or make the two equal",
                )
            )
        return ladder, rung.after
    shift = grace - rung.after
    if not shift:
        return ladder, grace
    floor = ladder[first - 1].after if first else None
    if grace < timedelta(0) or (floor is not None and grace <= floor):
        earliest = f"later than {format_duration(floor)}" if floor is not None else "at least 0s"
        problems.append(
            ConfigProblem(
                f"{prefix}.timing.grace",
                f"grace {format_duration(grace)} must be {earliest}: the worker is reminded "
                "first, then the manager after the grace period",
                'e.g. grace = "15m"',
            )
        )
        return ladder, rung.after
    shifted = tuple(
        replace(step, after=step.after + shift) if index >= first else step
        for index, step in enumerate(ladder)
    )
    return shifted, grace


def parse_policy(
    table: Mapping[str, Any], prefix: str = "policy"
) -> tuple[PolicySettings, list[ConfigProblem]]:
    """Build settings from the admin's ``[policy]`` table over its preset; list all problems."""
    problems: list[ConfigProblem] = []
    table = _table(table, prefix, problems)

    preset_name = table.get("preset", DEFAULT_PRESET)
    known = known_presets()
    if not isinstance(preset_name, str) or preset_name not in known:
        close = difflib.get_close_matches(str(preset_name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            ConfigProblem(
                f"{prefix}.preset",
                f"unknown preset {preset_name!r}",
                hint + "known presets: " + ", ".join(known),
            )
        )
        # Carry on with the default so the admin's other mistakes are reported too.
        preset_name = DEFAULT_PRESET
    try:
        preset = _read_preset(preset_name)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        # A broken shipped file is our bug, but the admin's config must still be checked.
        problems.append(
            ConfigProblem(f"{prefix}.preset", f"preset {preset_name!r} is unreadable: {err}")
        )
        preset = {}
    merged = _merge(preset, {k: v for k, v in table.items() if k != "preset"})

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

    if "escalation" in merged:
        escalation = _ladder(merged["escalation"], f"{prefix}.escalation", problems)
    else:
        problems.append(
            ConfigProblem(
                f"{prefix}.escalation", "the ladder has no steps", "add [[policy.escalation]]"
            )
        )
        escalation = ()
    admin_timing = table.get("timing")
    escalation, timing["grace"] = _apply_grace(
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
        clauses=_texts(tables["clauses"], RULES + ALERT_KINDS, f"{prefix}.clauses", problems),
        instructions=_texts(
            tables["instructions"], ALERT_KINDS, f"{prefix}.instructions", problems
        ),
        **requirements,
    )
    return settings, problems
