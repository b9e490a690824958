"""The systemd unit: hardened ("OK"), valid, installable as the README says, and the daemon
still starts under the restrictions that can be applied without systemd."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from visitwatch.daemon.init_config import render

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "visitwatch.service"
DROP_IN = REPO / "systemd" / "credentials.conf.example"
SYSUSERS = REPO / "systemd" / "visitwatch.sysusers"
README = REPO / "README.md"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def directives(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and line[0] not in "#;"]


@needs_analyze
def test_exposure_is_ok_and_each_remaining_item_is_explained():
    """`systemd-analyze security` rates the unit at most 1.5; the unit's comments name every
    setting it still counts against it."""
    result = analyze("--offline=true", "security", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    exposed = re.findall(r"^✗ (\S+?)=", result.stdout, flags=re.MULTILINE)
    assert exposed  # the network, which it needs, is always counted
    unexplained = {name for name in exposed if f"{name}=" not in comments}
    assert not unexplained, f"exposures without a comment in the unit: {unexplained}"


@needs_analyze
def test_unit_and_credentials_drop_in_verify_cleanly(tmp_path: Path):
    """`systemd-analyze verify` finds no unknown key or bad value in the unit or the drop-in.

    The unit's ExecStart names the installed path, absent here, so the copy verified points
    at this checkout's entry point instead; nothing else is changed."""
    entry = Path(sys.executable).with_name("visitwatch")
    if not entry.exists():
        pytest.skip("no visitwatch entry point beside this Python")
    unit = tmp_path / "visitwatch.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/visitwatch " in text
    unit.write_text(text.replace("ExecStart=/usr/local/bin/visitwatch ", f"ExecStart={entry} "))
    (tmp_path / "visitwatch.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "visitwatch.service.d" / "credentials.conf")
    result = analyze("verify", str(unit))
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_unit_loads_no_credential_itself():
    """A secret is an optional drop-in: the unit starts where no secret file exists."""
    lines = directives(UNIT)
    assert not [line for line in lines if line.startswith(("LoadCredential", "SetCredential"))]
    assert any(line.startswith("LoadCredential=") for line in directives(DROP_IN))
    for needed in ("StateDirectory=visitwatch", "ConfigurationDirectory=visitwatch", "Type=notify"):
        assert needed in lines
    assert any(line.startswith("WatchdogSec=") for line in lines)


def test_sysusers_snippet_makes_the_service_user(tmp_path: Path):
    """systemd-sysusers, run on an empty root, creates the user and group the unit names."""
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    subprocess.run([tool, f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True)
    user = (tmp_path / "etc" / "passwd").read_text().split(":")
    assert user[0] == "visitwatch" and user[5] == "/var/lib/visitwatch"
    assert "User=visitwatch" in directives(UNIT) and "Group=visitwatch" in directives(UNIT)


def readme_commands() -> list[str]:
    """Shell lines of the README's "Running under systemd" code blocks, comments dropped."""
    text = README.read_text()
    section = text[text.index("## Running under systemd") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_install_steps_use_files_that_exist():
    """Every repo file the install steps copy is in the repo; the unit's paths match them."""
    commands = readme_commands()
    named = {word for line in commands for word in line.split() if word.startswith("systemd/")}
    assert named >= {"systemd/visitwatch.service", "systemd/visitwatch.sysusers"}
    assert [name for name in named if not (REPO / name).is_file()] == []
    joined = "\n".join(commands)
    assert "ln -s /opt/visitwatch/bin/visitwatch /usr/local/bin/visitwatch" in joined
    assert "visitwatch init /etc/visitwatch --group visitwatch" in joined
    assert "ExecStart=/usr/local/bin/visitwatch --config /etc/visitwatch/visitwatch.toml run" in (
        directives(UNIT)
    )


def test_readme_never_makes_a_file_the_service_reads_root_only():
    """Files the service reads are 0640 root:visitwatch; only what systemd itself loads as a
    credential (root reads it) may be root-only."""
    credential_sources = {
        line.split(":", 1)[1]
        for line in directives(DROP_IN)
        + [ln.lstrip("# ") for ln in DROP_IN.read_text().splitlines()]
        if line.startswith(("LoadCredential=", "LoadCredentialEncrypted="))
    }
    lines = [line.strip() for line in README.read_text().splitlines()]
    lines += readme_commands()
    checked = 0
    for line in lines:
        words = line.split()
        if "install" not in words or "-m" not in words or "-d" in words:
            continue
        target = words[-1]
        if not target.startswith("/etc/visitwatch") or target in credential_sources:
            continue
        mode = int(words[words.index("-m") + 1], 8)
        assert mode & 0o040 and "-g" in words, f"the service cannot read it: {line}"
        assert words[words.index("-g") + 1] == "visitwatch", line
        checked += 1
    assert checked  # the certificate is installed so
    root_only = [ln for ln in lines if re.match(r"(sudo )?chmod 0?600 /etc/visitwatch", ln)]
    assert root_only == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# No new privileges, no memory both writable and executable (the kernel's MDWE, what
# MemoryDenyWriteExecute= enforces), UMask=0077; then exec the daemon as the unit does.
RESTRICTED = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit(77)
    os.umask(0o077)
    os.execv(sys.executable, [sys.executable, "-m", "visitwatch.daemon.cli", *sys.argv[1:]])
""")


def test_the_daemon_starts_and_serves_under_the_units_restrictions(tmp_path: Path):
    """Under no-new-privileges and write-xor-execute memory, `run` tells systemd it is ready
    over the notify socket, answers /healthz on loopback and stops cleanly on SIGTERM."""
    port = _free_port()
    config = tmp_path / "visitwatch.toml"
    text = render(None).replace(
        "[daemon]\n", f'[daemon]\npublic_base_url = "http://127.0.0.1:{port}"\n', 1
    )
    config.write_text(text + f'\n[web]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\n')
    shutil.copy(REPO / "daemon" / "starter" / "calendar.ics", tmp_path / "calendar.ics")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(tmp_path / "notify")}
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", RESTRICTED, "--config", str(config), "run"],
        cwd=tmp_path, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        messages = b""
        while b"READY=1" not in messages:
            try:
                messages += notify.recv(4096) + b"\n"
            except TimeoutError:
                if process.poll() == 77:
                    pytest.skip("this kernel cannot refuse writable-executable memory (MDWE)")
                raise AssertionError((tmp_path / "daemon.log").read_text()) from None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
                health = json.load(answer)
        except urllib.error.HTTPError as unhealthy:  # 503 still proves it serves
            health = json.load(unhealthy)
        assert health["database"] == "ok"
        assert (tmp_path / "visitwatch.db").stat().st_mode & 0o077 == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        notify.close()
        log.close()
