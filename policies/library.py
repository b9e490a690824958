"""The shipped presets: which there are, reading one, and laying the admin's table over it."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import ConfigProblem, did_you_mean

DEFAULT_PRESET = "pan-lancashire"


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


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (lists included) replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def over_preset(
    table: Mapping[str, Any], prefix: str, problems: list[ConfigProblem]
) -> tuple[str, dict[str, Any]]:
    """The preset ``table`` names (the default if it names none) and ``table`` merged over it.

    An unknown or unreadable preset is a problem, and the default (or nothing) stands in,
    so the admin's other mistakes are still reported.
    """
    preset_name = table.get("preset", DEFAULT_PRESET)
    known = known_presets()
    if not isinstance(preset_name, str) or preset_name not in known:
        close = did_you_mean(str(preset_name), known, listing=False)
        problems.append(
            ConfigProblem(
                f"{prefix}.preset",
                f"unknown preset {preset_name!r}",
                (f"{close} " if close else "") + "known presets: " + ", ".join(known),
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
    return preset_name, _merge(preset, {k: v for k, v in table.items() if k != "preset"})
