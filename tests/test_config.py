"""What an admin sees when the config file is right, and when it is wrong."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import textwrap
import tomllib
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from visitwatch.connectors.base import Connector
from visitwatch.connectors.registry import CHANNELS, SOURCES, channel_class, source_class
from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import Secret, parse_duration
from visitwatch.daemon.config import ConfigError, load_config
from visitwatch.daemon.reach import unreachable

REPO = Path(__file__).resolve().parents[1]


# A valid config needs a channel, and someone for the preset ladder's "role:director".
MINIMAL = """
[[staff]]
id = "sam@example.org"
name = "Sam"
role = "director"

[[channels]]
name = "outbox"
type = "outbox"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "visitwatch.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


EXAMPLE_PATH = REPO / "examples" / "visitwatch.toml"
SECTIONS = {"sources": (SOURCES, source_class), "channels": (CHANNELS, channel_class)}
# A value every secret option accepts (a Standard Webhooks key is also a fine password).
SAMPLE_SECRET = "whsec_" + base64.b64encode(b"example-secret-of-32-bytes-long!").decode()
SAMPLE_URL = "https://calendar.example.org/secret-token.ics"
# Secrets with a shape of their own: (channel type, option) -> a value of that shape.
SHAPED_SECRETS = {
    # GOV.UK Notify: "{key name}-{service id}-{secret}", both UUIDs.
    ("notify_sms", "api_key"): f"example-{uuid.UUID(int=1)}-{uuid.UUID(int=2)}",
    ("notify_email", "api_key"): f"example-{uuid.UUID(int=1)}-{uuid.UUID(int=2)}",
    ("twilio_sms", "auth_token"): "5ec2e75ec2e75ec2e75ec2e75ec2e75e",  # 32 hex digits
}


def example_blocks() -> list[tuple[str, dict[str, Any]]]:
    """Each [[sources]] and [[channels]] table in the example, with its section."""
    raw = tomllib.loads(EXAMPLE_PATH.read_text(encoding="utf-8"))
    return [(section, block) for section in SECTIONS for block in raw.get(section, [])]


def connector_class(section: str, block: dict[str, Any]) -> type[Connector]:
    return SECTIONS[section][1](block["type"])


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Set every { env = "NAME" } the example names to a value its option accepts."""
    values = []
    for section, block in example_blocks():
        options = connector_class(section, block).options
        for key, value in block.items():
            if isinstance(value, dict) and set(value) == {"env"}:
                sample = SHAPED_SECRETS.get((block.get("type"), key)) or (
                    SAMPLE_URL if options[key].kind == "url" else SAMPLE_SECRET
                )
                monkeypatch.setenv(value["env"], sample)
                values.append(sample)
    return values


def test_the_documented_example_loads(example_env: list[str]):
    """examples/visitwatch.toml, the admin's reference, is itself a valid config."""
    config = load_config(EXAMPLE_PATH)
    blocks = example_blocks()
    assert [s.name for s in config.sources] == [b["name"] for k, b in blocks if k == "sources"]
    assert [c.name for c in config.channels] == [b["name"] for k, b in blocks if k == "channels"]
    email = next(c for c in config.channels if c.type == "smtp")
    assert isinstance(email.settings["password"], Secret)
    settings = repr([c.settings for c in (*config.sources, *config.channels)])
    assert example_env and not [value for value in example_env if value in settings]
    asha = config.directory.get("ASHA.KHAN@example.org")
    assert asha is not None and asha.manager == "maria.jones@example.org"
    assert [s.kind for s in config.policy.escalation] == ["reminder", "overrun", "escalation"]


@pytest.mark.parametrize(
    ("section", "type_name"),
    [(section, name) for section, (known, _) in SECTIONS.items() for name in sorted(known)],
)
def test_the_example_shows_every_connector_and_explains_every_option(section: str, type_name: str):
    """Each registered type has a block in the example naming each of its options (set or
    in a comment), so a new connector cannot land undocumented."""
    text = EXAMPLE_PATH.read_text(encoding="utf-8")
    # A block runs from its [[section]] header to the next header of any table.
    pieces = re.split(r"^(?=\[)", text, flags=re.MULTILINE)
    mine = [
        piece
        for piece in pieces
        if piece.startswith(f"[[{section}]]")
        and re.search(rf'^type = "{re.escape(type_name)}"', piece, re.MULTILINE)
    ]
    assert mine, f"examples/visitwatch.toml has no [[{section}]] block of type {type_name!r}"
    shown = "".join(mine)
    options = SECTIONS[section][1](type_name).options
    missing = [name for name in options if not re.search(rf"\b{name}\b", shown)]
    assert missing == [], f"{type_name}: options not in the example: {missing}"


def test_the_example_lists_every_notification_kind():
    """The channels' `kinds` comment names every kind a channel may be limited to."""
    text = EXAMPLE_PATH.read_text(encoding="utf-8")
    listed = text.split("# Kinds:")[1].split("\n\n")[0]
    assert [k for k in NotificationKind if not re.search(rf"\b{k}\b", listed)] == []


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
    assert "known types: " + ", ".join(sorted(SOURCES)) in by_key["sources[0].type"].message
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
    assert "known types: " + ", ".join(sorted(CHANNELS)) in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_smtp_settings_that_cannot_work(tmp_path: Path):
    """`visitwatch check` refuses a sender that is no address, a port beyond 65535, TLS on a
    plain-text port and a login without its password, instead of saying the config is OK."""
    smtp = '[[channels]]\nname = "{name}"\ntype = "smtp"\nhost = "smtp.example.org"\n{extra}\n'
    path = write(
        tmp_path,
        MINIMAL
        + smtp.format(name="a", extra='sender = "not-an-address"')
        + smtp.format(name="b", extra='sender = "v@example.org"\nport = 70000')
        + smtp.format(
            name="c",
            extra='sender = "v@example.org"\nport = 587\nsecurity = "tls"\nusername = "v"',
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config", str(path), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout
    assert "channels[1].sender: 'not-an-address' is not an e-mail address" in result.stderr
    assert "channels[2].port: must be at most 65535" in result.stderr
    assert "channels[3].security:" in result.stderr and "plain text" in result.stderr
    assert "channels[3].password: username is set but password is not" in result.stderr
    assert "config OK" not in result.stdout


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


# --------------------------------------------------------------------------- durations


def test_delivery_deadline_and_send_timeout_have_documented_defaults(tmp_path: Path):
    """Unset, an alert has 2 minutes to be delivered and one attempt 30 seconds."""
    path = write(tmp_path, MINIMAL)
    daemon = load_config(path).daemon
    assert daemon.delivery_deadline == timedelta(minutes=2)
    assert daemon.send_timeout == timedelta(seconds=30)


def test_delivery_deadline_and_send_timeout_are_read_and_must_be_positive(tmp_path: Path):
    """Both are read as durations; zero is refused with the key named."""
    path = write(tmp_path, '[daemon]\ndelivery_deadline = "5m"\nsend_timeout = "10s"\n' + MINIMAL)
    daemon = load_config(path).daemon
    assert (daemon.delivery_deadline, daemon.send_timeout) == (
        timedelta(minutes=5),
        timedelta(seconds=10),
    )
    path = write(tmp_path, '[daemon]\ndelivery_deadline = "0s"\nsend_timeout = 0\n' + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = {p.key: p.message for p in caught.value.problems}
    assert keys["daemon.delivery_deadline"] == "must be longer than zero"
    assert keys["daemon.send_timeout"] == "must be longer than zero"


def test_the_example_documents_the_delivery_settings(example_env: list[str]):
    """examples/visitwatch.toml sets and explains delivery_deadline and send_timeout."""
    text = (REPO / "examples" / "visitwatch.toml").read_text(encoding="utf-8")
    assert "\ndelivery_deadline = " in text and "\nsend_timeout = " in text
    explained = text.split("\ndelivery_deadline = ")[1].split("\nsend_timeout = ")[0]
    assert "fallback" in explained and "admin" in explained
    daemon = load_config(REPO / "examples" / "visitwatch.toml").daemon
    assert (daemon.delivery_deadline, daemon.send_timeout) == (
        timedelta(minutes=2),
        timedelta(seconds=30),
    )


@pytest.mark.parametrize(
    "text", ["99999999999d", "367d", "1000000000000000000000000h", float("inf"), 10**30]
)
def test_a_duration_beyond_a_year_is_refused_not_overflowed(text: str | float):
    """parse_duration bounds durations (366 days) instead of raising OverflowError."""
    with pytest.raises(ValueError, match=r"too long|not a duration"):
        parse_duration(text)
    assert parse_duration("366d") == timedelta(days=366)


# --------------------------------------------------------------------------- reach

REACH_STAFF = """
[[staff]]
id = "asha"
name = "Asha Khan"
email = "asha@example.org"
manager = "maria"

[[staff]]
id = "ben"
name = "Ben Okafor"
mobile = "07700 900111"

[[staff]]
id = "maria"
name = "Maria Jones"
role = "manager"

[[staff]]
id = "sam"
name = "Sam Webster"
email = "sam@example.org"
role = "director"

[[staff]]
id = "dee"
name = "Dee Admin"
role = "admin"
"""

EMAIL_ONLY = """
[[channels]]
name = "email"
type = "smtp"
host = "127.0.0.1"
sender = "v@example.org"
"""


def test_reach_lists_everyone_the_ladder_cannot_reach_and_why(tmp_path: Path):
    """E-mail only: the worker, her manager, the fallback director and the admin without
    addresses are named with their relation and the missing address."""
    config = load_config(write(tmp_path, REACH_STAFF + EMAIL_ONLY))
    found = {u.staff_id: u for u in unreachable(config)}
    # Ben has no e-mail (worker); he has no manager, so the director is his fallback
    # manager, and Sam has an address. Maria manages Asha; Dee gets the admin notices.
    assert sorted(found) == ["ben", "dee", "maria"]
    assert found["ben"].relation == "worker" and "reminder" in found["ben"].kinds
    assert found["maria"].relation == "manager" and found["maria"].kinds == ("overrun", "help")
    assert "admin" in found["dee"].kinds
    for person in found.values():
        assert "no e-mail address on record" in person.reason
        assert "email (smtp, needs e-mail address)" in person.reason
    assert str(found["maria"]).startswith("Maria Jones (manager) cannot be sent overrun, help")


def test_reach_follows_explicit_ladders_and_channel_kinds(tmp_path: Path):
    """A step to a staff id or a role, and a channel limited by `kinds`, are judged as sent."""
    channels = """
[[channels]]
name = "log"
type = "outbox"
path = "outbox.jsonl"
kinds = ["reminder", "overrun", "help", "admin"]
"""
    ladder = """
[policy]
preset = "pan-lancashire"
[[policy.escalation]]
after = "0m"
to = ["worker"]
kind = "reminder"
[[policy.escalation]]
after = "15m"
to = ["manager", "ben"]
kind = "overrun"
[[policy.escalation]]
after = "45m"
to = ["role:director"]
kind = "escalation"
repeat = "15m"
"""
    config = load_config(write(tmp_path, REACH_STAFF + channels + ladder))
    [sam] = unreachable(config)
    assert (sam.staff_id, sam.relation, sam.kinds) == ("sam", "role:director", ("escalation",))
    assert sam.reason == "no channel is configured to carry escalation notifications"


def test_reach_is_empty_when_a_channel_takes_everything(tmp_path: Path):
    """With an outbox (no address needed, every kind) nobody is unreachable."""
    outbox = '\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "o.jsonl"\n'
    config = load_config(write(tmp_path, REACH_STAFF + EMAIL_ONLY + outbox))
    assert unreachable(config) == []


def test_a_fallback_to_a_channel_that_failed_to_load_is_not_a_second_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One unset secret is one problem: the channel falling back to it is not also told it
    names no channel, and later channels' keys keep their place in the file."""
    monkeypatch.delenv("VW_TEST_UNSET_PASSWORD", raising=False)
    path = write(
        tmp_path,
        """
        [[staff]]
        id = "sam@example.org"
        name = "Sam"
        role = "director"

        [[channels]]
        name = "email"
        type = "smtp"
        host = "localhost"
        sender = "visitwatch@example.org"
        username = "visitwatch"
        password = { env = "VW_TEST_UNSET_PASSWORD" }

        [[channels]]
        name = "outbox"
        type = "outbox"
        fallback = "email"

        [[channels]]
        name = "second"
        type = "outbox"
        path = "second.jsonl"
        fallback = "emial"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = [str(p) for p in caught.value.problems]
    assert problems[0].startswith("channels[0].password")
    assert not any(p.startswith("channels[1].fallback") for p in problems)
    assert any(p.startswith("channels[2].fallback") and "'email'" in p for p in problems)


def test_the_retention_section_is_read(tmp_path: Path):
    """[retention] periods reach the daemon; a wrong one is a problem naming its key."""
    base = """
        [[staff]]
        id = "sam@example.org"
        name = "Sam"
        role = "director"

        [[channels]]
        name = "outbox"
        type = "outbox"
    """
    config = load_config(write(tmp_path, base + '[retention]\npersonal_data_after = "30d"\n'))
    assert config.retention.personal_data_after == timedelta(days=30)
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, base + '[retention]\npersonal_data_after = "soon"\n'))
    assert "retention.personal_data_after" in str(caught.value)
