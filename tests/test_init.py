"""`visitwatch init`: a starter config from package data that loads and checks as written."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon.config import ConfigError, config_path, load_config, parse_config
from visitwatch.daemon.init_config import default_state_dir, render, write_starter

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "visitwatch.daemon.cli"]


def clean_env() -> dict[str, str]:
    """No VISITWATCH_* or other variables: what an admin's fresh shell has, at most."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=60
    )


def test_init_writes_a_config_that_check_passes_with_no_environment(tmp_path: Path):
    """`init` then `check` in a clean environment: both succeed, the files are 0640."""
    made = run(["init"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "visitwatch --config" in made.stdout and "check" in made.stdout  # what next
    config = tmp_path / "visitwatch.toml"
    for path in (config, tmp_path / "calendar.ics"):
        assert path.stat().st_mode & 0o777 == 0o640
    checked = run(["--config", str(config), "check"], cwd=REPO.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok   channel outbox" in checked.stdout
    assert "ok   source starter-calendar" in checked.stdout
    assert "FAIL" not in checked.stdout


def test_the_starter_config_loads_with_its_record_beside_it(tmp_path: Path):
    """Written to a plain folder, the record, state and outbox resolve inside that folder."""
    (config,) = [p for p in write_starter(tmp_path) if p.suffix == ".toml"]
    loaded = load_config(config)
    assert loaded.daemon.database == tmp_path / "visitwatch.db"
    assert loaded.daemon.state_dir == tmp_path
    assert {c.type for c in loaded.channels} == {"outbox", "console"}
    assert Path(loaded.channels[0].settings["path"]) == tmp_path / "outbox.jsonl"
    assert [s.type for s in loaded.sources] == ["ics"]
    assert loaded.directory.with_role("director")  # the preset's last rung reaches someone
    text = config.read_text()
    for commented in ('# type = "graph"', '# type = "smtp"', "# [web]"):
        assert commented in text


def test_for_etc_visitwatch_the_record_goes_to_the_state_directory():
    """/etc/visitwatch is read-only to the service: the record is in /var/lib/visitwatch."""
    etc = Path("/etc/visitwatch")
    raw = tomllib.loads(render(default_state_dir(etc)))
    raw["sources"] = []  # the placeholder calendar is not on this machine
    config = parse_config(raw, etc)
    assert config.daemon.database == Path("/var/lib/visitwatch/visitwatch.db")
    assert config.daemon.state_dir == Path("/var/lib/visitwatch")
    assert Path(config.channels[0].settings["path"]) == Path("/var/lib/visitwatch/outbox.jsonl")


def test_a_state_dir_with_awkward_characters_survives(tmp_path: Path):
    """--state-dir is written as a TOML string: quotes and backslashes come back unchanged."""
    odd = tmp_path / 'state "quoted" \\ dir'
    (config,) = [p for p in write_starter(tmp_path, state_dir=odd) if p.suffix == ".toml"]
    assert load_config(config).daemon.database == odd / "visitwatch.db"


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path):
    """An existing config is kept (exit 2, named); --force replaces it and resets 0640."""
    config = tmp_path / "visitwatch.toml"
    config.write_text("# mine\n")
    config.chmod(0o644)
    refused = run(["init", str(tmp_path)], cwd=tmp_path)
    assert refused.returncode == 2
    assert str(config) in refused.stderr and "--force" in refused.stderr
    assert config.read_text() == "# mine\n"
    assert not (tmp_path / "calendar.ics").exists()
    forced = run(["init", str(tmp_path), "--force"], cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "[daemon]" in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o640


def test_group_gives_the_files_to_the_service_group(tmp_path: Path):
    """--group sets the files' group; an unknown group says how to create it."""
    group = grp.getgrgid(os.getgid()).gr_name
    for path in write_starter(tmp_path, group=group):
        assert path.stat().st_gid == os.getgid()
    with pytest.raises(VisitwatchError, match="systemd-sysusers"):
        write_starter(tmp_path / "other", group="no-such-group-visitwatch")
    assert not (tmp_path / "other").exists()


def test_the_template_is_package_data():
    """pyproject ships daemon/starter/*, so `init` works after `pip install` too."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["visitwatch.daemon"]
    for name in ("visitwatch.toml", "calendar.ics"):
        assert (REPO / "daemon" / "starter" / name).is_file()
        assert any(fnmatch(f"starter/{name}", pattern) for pattern in patterns)


def test_messages_name_init_not_a_repo_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A config error and a missing --config point at `visitwatch init`, not examples/."""
    monkeypatch.delenv("VISITWATCH_CONFIG", raising=False)
    with pytest.raises(VisitwatchError) as missing:
        config_path(None)
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\ndatabse = 'x'\n")
    with pytest.raises(ConfigError) as invalid:
        load_config(bad)
    for message in (str(missing.value), str(invalid.value)):
        assert "visitwatch init" in message and "examples/" not in message
    shipped = [REPO / folder for folder in ("daemon", "connectors", "policies")]
    shipped.append(REPO / "visitwatch" / "core")
    naming = [
        path
        for folder in shipped
        for path in folder.rglob("*.py")
        if "examples/visitwatch.toml" in path.read_text(encoding="utf-8")
    ]
    assert naming == []
