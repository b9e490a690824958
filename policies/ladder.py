"""The escalation ladder: ``[[policy.escalation]]`` steps read, checked, and timed by grace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import (
    ConfigProblem,
    Option,
    did_you_mean,
    format_duration,
    validate_options,
)
from visitwatch.policies.model import EscalationStep

# The kinds a step may name, in NotificationKind's order.
STEP_KINDS: tuple[str, ...] = tuple(kind.value for kind in NotificationKind if kind.is_step)

# Unused by validate_options for these kinds, but its signature wants one.
_NO_CONFIG_DIR = Path(".")

_STEP_OPTIONS: dict[str, Option] = {
    "after": Option("duration", required=True, help='e.g. after = "15m"'),
    "to": Option("list", required=True, help='e.g. to = ["manager"]'),
    "kind": Option("str", required=True, choices=STEP_KINDS, help='e.g. kind = "overrun"'),
    "repeat": Option("duration"),
}


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


def parse_ladder(
    value: Any, path: str, problems: list[ConfigProblem]
) -> tuple[EscalationStep, ...]:
    """The steps that are whole; every mistake in any step is added to ``problems``."""
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
                close = did_you_mean(written, STEP_KINDS, listing=False)
                if close:
                    problem = ConfigProblem(problem.key, problem.message, close)
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
        kind: str | None = values.get("kind")
        if after is not None and to and kind is not None:
            steps.append(
                EscalationStep(after=after, to=to, kind=NotificationKind(kind), repeat=repeat)
            )
    return tuple(steps)


def _first_beyond_worker(ladder: tuple[EscalationStep, ...]) -> int | None:
    """The index of the first rung that alerts anyone but the worker."""
    return next((i for i, step in enumerate(ladder) if set(step.to) - {"worker"}), None)


def apply_grace(
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
