"""What an admin sees when the config file is right, and when it is wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from visitwatch.connectors.base import Secret
from visitwatch.daemon.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "visitwatch.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_documented_example_loads(monkeypatch: pytest.MonkeyPatch):
    """examples/visitwatch.toml, the admin's reference, is itself a valid config."""
    monkeypatch.setenv("VISITWATCH_ASHA_ICS_URL", "https://calendar.example.org/secret-token.ics")
    monkeypatch.setenv("VISITWATCH_SMTP_PASSWORD", "correct horse")
    config = load_config(REPO / "examples" / "visitwatch.toml")
    assert [s.name for s in config.sources] == [
        "asha-calendar",
        "team-home-visits",
        "outlook-home-visits",
    ]
    assert [c.name for c in config.channels] == ["outbox", "console", "email", "outlook"]
    assert isinstance(config.channels[2].settings["password"], Secret)
    assert "correct horse" not in repr(config.channels[2].settings)
    assert config.directory.get("ASHA.KHAN@example.org").manager == "maria.jones@example.org"
    assert [s.kind for s in config.policy.escalation] == ["reminder", "overrun", "escalation"]


def test_every_problem_is_reported_at_once_with_its_key(tmp_path: Path):
    """Typos, wrong types, unknown connectors, unknown managers and bad ladders, all listed."""
    path = write(
        tmp_path,
        """
        [daemon]
        databse = "x.db"
        poll_interval = "soon"
        timezone = "Mars/Olympus"

        [[staff]]
        id = "asha@example.org"
        name = "Asha"
        manager = "nobody@example.org"

        [[sources]]
        name = "cal"
        type = "caldav"

        [[channels]]
        name = "mail"
        type = "smtp"
        host = "smtp.example.org"
        port = "587"
        sender = "visitwatch@example.org"
        password = "hunter2"

        [policy]
        preset = "pan-lancashire"
        [[policy.escalation]]
        after = "0m"
        to = []
        kind = "reminder"
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    by_key = {p.key: p for p in caught.value.problems}
    assert "did you mean 'database'" in by_key["daemon.databse"].hint
    assert "daemon.poll_interval" in by_key
    assert "unknown time zone" in by_key["daemon.timezone"].message
    assert "not in the staff directory" in by_key["staff[0].manager"].message
    assert "known types: graph, ics" in by_key["sources[0].type"].message
    assert "whole number" in by_key["channels[0].port"].message
    assert "cannot be written in the config" in by_key["channels[0].password"].message
    assert "policy.escalation[0].to" in by_key
    assert "hunter2" not in str(caught.value)


def test_unreadable_secret_file_is_a_config_error(tmp_path: Path):
    """A password file that cannot be read is reported with its key, before the daemon starts."""
    path = write(
        tmp_path,
        f"""
        [[channels]]
        name = "mail"
        type = "smtp"
        host = "localhost"
        sender = "v@example.org"
        username = "v"
        password = {{ file = "{tmp_path / "missing-secret"}" }}
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = [p for p in caught.value.problems if p.key == "channels[0].password"]
    assert "cannot read secret file" in problem.message


def test_secret_from_a_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """{ credential = "name" } reads $CREDENTIALS_DIRECTORY/name, as LoadCredential= provides."""
    (tmp_path / "smtp-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    path = write(
        tmp_path,
        """
        [[staff]]
        id = "sam@example.org"
        name = "Sam"
        role = "director"

        [[channels]]
        name = "mail"
        type = "smtp"
        host = "localhost"
        sender = "v@example.org"
        username = "v"
        password = { credential = "smtp-password" }
    """,
    )
    secret = load_config(path).channels[0].settings["password"]
    assert secret.reveal() == "s3cret"


def test_cli_shows_config_errors_without_a_traceback(tmp_path: Path):
    """`visitwatch check` on a broken file exits 2 and prints the problems, not a traceback."""
    path = write(
        tmp_path,
        """
        [[channels]]
        name = "out"
        type = "pigeon"
    """,
    )
    result = subprocess.run(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config", str(path), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "channels[0].type: unknown channel type 'pigeon'" in result.stderr
    assert "known types: console, graph_mail, outbox, smtp" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch):
    """Without --config or VISITWATCH_CONFIG the CLI says how to give one."""
    monkeypatch.delenv("VISITWATCH_CONFIG", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "visitwatch.daemon.cli", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--config" in result.stderr and "VISITWATCH_CONFIG" in result.stderr
