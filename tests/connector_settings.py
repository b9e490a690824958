"""What the config loader finds wrong with one connector's table, for connector tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visitwatch.connectors.base import Connector
from visitwatch.core.options import ConfigProblem, validate_options


def config_problems(
    cls: type[Connector], table: dict[str, Any], config_dir: Path, where: str = "channels[0]"
) -> list[ConfigProblem]:
    """Each option checked on its own, then (when those pass) the checks across them."""
    settings, problems = validate_options(table, cls.options, where, config_dir)
    return problems or cls.settings_problems(settings)
