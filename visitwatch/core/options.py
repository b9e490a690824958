"""Validating config tables against declared options, collecting every problem.

Used for connector tables and for the daemon's own sections. Nothing here raises on bad
input: each function returns the values it could read plus a list of
:class:`ConfigProblem`, so an admin sees every mistake at once.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo


class Secret:
    """A secret value read from the environment or a file; never printed."""

    __slots__ = ("_origin", "_value")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self._origin = origin  # e.g. "env VISITWATCH_SMTP_PASSWORD": safe to show

    def reveal(self) -> str:
        return self._value

    @property
    def origin(self) -> str:
        return self._origin

    def __repr__(self) -> str:
        return f"Secret(from {self._origin})"

    __str__ = __repr__


@dataclass(frozen=True)
class Option:
    """One setting a connector accepts in its config table.

    ``kind`` is one of: ``str``, ``int``, ``float``, ``bool``, ``list`` (of strings),
    ``duration`` (``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` -> ``timedelta``), ``path``
    (relative to the config file's folder), ``secret`` (a table ``{ env = "NAME" }``,
    ``{ file = "/path" }`` or ``{ credential = "name" }`` -> :class:`Secret`; never an
    inline string), ``str_or_secret`` (either; use it for values such as secret ICS URLs),
    ``date`` (``"2027-03-31"`` or a TOML date -> :class:`datetime.date`), ``url`` (an
    http:// or https:// address, written inline or as a secret table -> ``str`` or
    :class:`Secret`; only its scheme is ever shown), ``email`` (one e-mail address),
    ``table`` (a table of strings, such as extra HTTP headers -> ``dict[str, str]``).

    ``positive`` asks for a number of at least 1, or a duration longer than zero (a limit
    or time budget of zero would fail every read). ``maximum`` bounds a number from above
    (a port is at most 65535). ``nonempty`` asks for a string or list with something in it
    besides blanks. Checks across several options (one of ``url`` or
    ``path``) belong to :meth:`Connector.settings_problems`.
    """

    kind: str
    required: bool = False
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    positive: bool = False
    maximum: float | None = None
    nonempty: bool = False


@dataclass(frozen=True)
class ConnectorContext:
    """What every connector may rely on, handed over by the daemon."""

    timezone: ZoneInfo  # the organisation's zone: floating times are read in it
    state_dir: Path  # a folder the connector may write to (caches)
    config_dir: Path  # relative paths in the config resolve against this
    user_agent: str = "visitwatch"
    # Where the daemon's pages are reached from outside ([daemon] public_base_url), "" when
    # unset: a channel's check() can verify a provider calls back to the right address.
    public_base_url: str = ""


@dataclass(frozen=True)
class ConfigProblem:
    key: str  # dotted path, e.g. "channels[2].port"
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# No setting needs longer; a bound keeps a typo ("99999999999d") a config error, not an
# OverflowError deep in datetime arithmetic.
MAX_DURATION = timedelta(days=366)


def parse_duration(text: str | int | float) -> timedelta:
    """``"15m"``, ``"1h30m"``, ``"90s"``, ``"2d"`` or a number of seconds."""
    if isinstance(text, bool):
        raise ValueError('expected a duration such as "15m", not true/false')
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:  # an int beyond any float
            seconds = math.inf
        return _bounded(seconds, repr(text))
    if not isinstance(text, str):
        raise ValueError(f'expected a duration such as "15m", got {text!r}')
    compact = text.strip().replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    pos = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
        pos = match.end()
    if pos != len(compact):
        raise ValueError(
            f'{text!r} is not a duration; write e.g. "90s", "15m", "2h", "1h30m", "1d"'
        )
    return _bounded(seconds, repr(text))


def _bounded(seconds: float, shown: str) -> timedelta:
    if len(shown) > 40:
        shown = shown[:37] + "..."
    if not math.isfinite(seconds):
        raise ValueError(f'{shown} is not a duration; write e.g. "90s", "15m", "2h", "1d"')
    if abs(seconds) > MAX_DURATION.total_seconds():
        raise ValueError(f"{shown} is too long: at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds and seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def read_secret(spec: Any, key: str) -> tuple[Secret | None, ConfigProblem | None]:
    """Resolve ``{ env = "NAME" }``, ``{ file = "/path" }`` or ``{ credential = "name" }``."""
    how = 'write { env = "NAME" }, { file = "/path" } or { credential = "name" }'
    if isinstance(spec, str):
        return None, ConfigProblem(key, "secrets cannot be written in the config file", how)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        return None, ConfigProblem(key, "expected a table naming where the secret is", how)
    ((where, name),) = spec.items()
    if not isinstance(name, str) or not name:
        return None, ConfigProblem(key, f"{where} must name something", how)
    if where == "env":
        value = os.environ.get(name)
        if value is None:
            return None, ConfigProblem(key, f"environment variable {name} is not set")
        return Secret(value, f"env {name}"), None
    if where == "credential":
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            return None, ConfigProblem(
                key,
                f"credential {name!r} asked for, but CREDENTIALS_DIRECTORY is not set",
                "systemd sets it for LoadCredential=; outside systemd use { file = ... }",
            )
        path = Path(folder) / name
    elif where == "file":
        path = Path(name)
    else:
        return None, ConfigProblem(key, f"unknown secret location {where!r}", how)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        return None, ConfigProblem(key, f"cannot read secret file {path}: {err.strerror}")
    except UnicodeDecodeError:
        # Never quote the bytes: they are the secret.
        return None, ConfigProblem(
            key, f"secret file {path} is not UTF-8 text", "save the secret as plain UTF-8 text"
        )
    return Secret(value, f"file {path}"), None


def _convert(
    value: Any, option: Option, key: str, config_dir: Path
) -> tuple[Any, ConfigProblem | None]:
    kind = option.kind
    wrong = lambda expected: (None, ConfigProblem(key, f"expected {expected}, got {value!r}"))  # noqa: E731
    if kind in ("secret", "str_or_secret"):
        if kind == "str_or_secret" and isinstance(value, str):
            return value, None
        return read_secret(value, key)
    if kind == "str":
        if not isinstance(value, str):
            return wrong("a string")
        if option.choices and value not in option.choices:
            return None, ConfigProblem(key, f"{value!r} is not one of {', '.join(option.choices)}")
        return value, None
    if kind == "int":
        return (
            (value, None)
            if isinstance(value, int) and not isinstance(value, bool)
            else wrong("a whole number")
        )
    if kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return (float(value), None) if ok else wrong("a number")
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else wrong("true or false")
    if kind == "list":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), None
        return wrong("a list of strings")
    if kind == "duration":
        try:
            return parse_duration(value), None
        except (ValueError, TypeError, OverflowError) as err:
            return None, ConfigProblem(key, str(err))
    if kind == "url":
        if isinstance(value, str):
            text: str = value
            converted: Any = value
        else:
            converted, problem = read_secret(value, key)
            if problem:
                return None, problem
            text = converted.reveal()
        try:
            parts = urlsplit(text.strip())
            host = parts.hostname
        except ValueError:  # e.g. "https://[broken": never quote it, it may hold a secret
            return None, ConfigProblem(key, "must be an http:// or https:// address (not one)")
        if parts.scheme.lower() not in ("http", "https") or not host:
            # Only the scheme is shown: the rest of a calendar URL is often its secret.
            shown = f"a {parts.scheme}:// address" if parts.scheme else "not an address"
            return None, ConfigProblem(key, f"must be an http:// or https:// address ({shown})")
        return converted, None
    if kind == "email":
        if not isinstance(value, str):
            return wrong("an e-mail address")
        _name, address = parseaddr(value)
        local, at, domain = address.rpartition("@")
        # A single-label domain ("alerts@mailhub") is a real address on an internal relay.
        if not (at and local and domain) or any(c.isspace() for c in address):
            return None, ConfigProblem(
                key, f"{value!r} is not an e-mail address", 'write e.g. "visitwatch@example.org"'
            )
        return value, None
    if kind == "table":
        if isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value), None
        return wrong('a table of strings, e.g. { "X-Team" = "north" }')
    if kind == "date":
        if isinstance(value, date) and not isinstance(value, datetime):
            return value, None
        if isinstance(value, str):
            if not value.strip():
                return None, None  # blank: not recorded, as before the date kind
            try:
                return date.fromisoformat(value.strip()), None
            except ValueError:
                pass
        return None, ConfigProblem(key, f"{value!r} is not a date", "write YYYY-MM-DD")
    if kind == "path":
        if not isinstance(value, str) or not value:
            return wrong("a path")
        path = Path(value).expanduser()
        return (path if path.is_absolute() else config_dir / path), None
    raise AssertionError(f"unknown option kind {kind!r} for {key}")


def did_you_mean(word: str, known: Iterable[str], *, listing: bool = True) -> str:
    """A hint for a mistyped name: the closest known one, else (``listing``) all of them."""
    names = sorted(known)
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    if not listing:
        return ""
    return "known: " + ", ".join(names) if names else "nothing is known here"


def _constraint(value: Any, option: Option, key: str) -> ConfigProblem | None:
    """``positive``, ``maximum`` and ``nonempty``, checked on the converted value."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if option.positive:
        if isinstance(value, timedelta) and value <= timedelta(0):
            return ConfigProblem(key, "must be longer than zero")
        if number is not None and number < 1:
            return ConfigProblem(key, "must be 1 or more")
    if option.maximum is not None and number is not None and number > option.maximum:
        return ConfigProblem(key, f"must be at most {option.maximum:g}", option.help)
    if option.nonempty:
        blank = (isinstance(value, str) and not value.strip()) or (
            isinstance(value, list) and not [v for v in value if v.strip()]
        )
        if blank:
            return ConfigProblem(key, "is empty", option.help)
    return None


def validate_options(
    table: Mapping[str, Any],
    options: Mapping[str, Option],
    prefix: str,
    config_dir: Path,
    *,
    ignore: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Check ``table`` against ``options``; return converted values and all problems.

    Keys in ``ignore`` (such as ``name`` and ``type``, handled by the caller) are skipped.
    Missing optional keys get their default.
    """
    settings: dict[str, Any] = {}
    problems: list[ConfigProblem] = []
    for key, value in table.items():
        if key in ignore:
            continue
        option = options.get(key)
        if option is None:
            hint = (
                did_you_mean(key, options).replace("known: ", "known keys: ", 1)
                if options
                else "this table takes no keys"
            )
            problems.append(ConfigProblem(f"{prefix}.{key}", "unknown key", hint))
            continue
        converted, problem = _convert(value, option, f"{prefix}.{key}", config_dir)
        problem = problem or _constraint(converted, option, f"{prefix}.{key}")
        if problem:
            problems.append(problem)
        else:
            settings[key] = converted
    for key, option in options.items():
        if key in table:
            continue
        if option.required:
            problems.append(ConfigProblem(f"{prefix}.{key}", "is required", option.help))
        else:
            default = option.default
            if option.kind == "duration" and default is not None:
                default = parse_duration(default)
            elif option.kind == "path" and default is not None:
                default = config_dir / default
            settings[key] = default
    return settings, problems
