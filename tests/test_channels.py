"""The outbox, console and SMTP channels, against real files, streams and SMTP servers.

SMTP tests run an aiosmtpd server on 127.0.0.1; TLS tests use a self-signed certificate
made here with ``cryptography``.
"""

from __future__ import annotations

import io
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from structlog.testing import capture_logs

from tests.connector_settings import config_problems
from tests.mailserver import Recorder, free_port
from visitwatch.connectors.base import Channel
from visitwatch.connectors.console import ConsoleChannel
from visitwatch.connectors.outbox import OutboxChannel, read_outbox
from visitwatch.connectors.smtp import SmtpChannel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, Recipient
from visitwatch.core.options import ConnectorContext, validate_options

PASSWORD = "correct-horse-battery-staple"
USERNAME = "alerts"
MARIA = Recipient(id="maria@example.org", name="Maria Jones", email="maria@example.org")

# --------------------------------------------------------------------------- helpers


def make_message(
    *,
    id: int = 1,
    kind: str = "overrun",
    recipient: Recipient = MARIA,
    subject: str = "Visit to 12 High Street has overrun",
    text: str = "Sam Green's visit was due to end at 14:00.\nPlease call Sam on 07700 900123.",
    created: datetime | None = None,
) -> Message:
    return Message(
        id=id,
        kind=kind,
        visit_id="v1",
        recipient=recipient,
        channel="email",
        subject=subject,
        text=text,
        created=created or datetime.now(UTC),
    )


@pytest.fixture
def context(tmp_path: Path) -> ConnectorContext:
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"), state_dir=tmp_path, config_dir=tmp_path
    )


def make_channel(cls: type[Channel], table: dict[str, Any], context: ConnectorContext) -> Any:
    """Validate ``table`` the way the config loader does, then construct the channel."""
    settings, problems = validate_options(table, cls.options, "channels[0]", context.config_dir)
    assert problems == [], [str(p) for p in problems]
    return cls("test", settings, context)


def authenticator(
    server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (
        auth_data.login == USERNAME.encode() and auth_data.password == PASSWORD.encode()
    )
    # handled=False: the server must still send its 535 reply itself.
    return AuthResult(success=ok, handled=False)


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "visitwatch test server")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file = folder / "cert.pem"
    key_file = folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_file, key_file)


def smtp_table(port: int, **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "sender": "visitwatch <alerts@example.org>",
        "timeout": "5s",
    }
    table.update(extra)
    return table


@pytest.fixture
def password_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The password as an admin would configure it: from the environment."""
    monkeypatch.setenv("VW_TEST_SMTP_PASSWORD", PASSWORD)
    return {"env": "VW_TEST_SMTP_PASSWORD"}


# --------------------------------------------------------------------------- outbox


def test_outbox_appends_one_json_line_per_message(
    tmp_path: Path, context: ConnectorContext
) -> None:
    """Each send appends one complete JSON line with the message fields and a sent time."""
    channel = make_channel(OutboxChannel, {"path": "out/outbox.jsonl"}, context)
    channel.send(make_message(id=1))
    channel.send(make_message(id=2, kind="escalation", subject="Ünïcode Ōverrun"))

    path = tmp_path / "out" / "outbox.jsonl"
    raw = path.read_text(encoding="utf-8")
    assert raw.count("\n") == 2 and raw.endswith("\n")
    assert "Ünïcode Ōverrun" in raw  # ensure_ascii=False: readable for an admin

    first, second = read_outbox(path)
    assert first["id"] == 1 and second["id"] == 2
    assert first["kind"] == "overrun" and second["kind"] == "escalation"
    assert first["visit_id"] == "v1"
    assert first["recipient"] == {
        "id": "maria@example.org",
        "name": "Maria Jones",
        "email": "maria@example.org",
        "mobile": "",
    }
    assert first["subject"] == "Visit to 12 High Street has overrun"
    assert first["text"].startswith("Sam Green's visit")
    sent = datetime.fromisoformat(first["sent"])
    assert sent.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)


def test_outbox_default_path_is_relative_to_config_dir(
    tmp_path: Path, context: ConnectorContext
) -> None:
    """Without a path the outbox is outbox.jsonl next to the config file."""
    channel = make_channel(OutboxChannel, {}, context)
    channel.send(make_message())
    assert len(read_outbox(tmp_path / "outbox.jsonl")) == 1


def test_read_outbox_skips_trailing_partial_line(tmp_path: Path) -> None:
    """A line still being written (no newline yet) is not returned; a missing file is empty."""
    path = tmp_path / "outbox.jsonl"
    assert read_outbox(path) == []
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "kin', encoding="utf-8")
    assert read_outbox(path) == [{"id": 1}, {"id": 2}]


def test_read_outbox_rejects_corrupt_complete_line(tmp_path: Path) -> None:
    """A broken line in the middle is reported with its number, not silently dropped."""
    path = tmp_path / "outbox.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        read_outbox(path)


def test_outbox_concurrent_threads_write_whole_lines(
    tmp_path: Path, context: ConnectorContext
) -> None:
    """Many threads appending at once produce only complete, valid JSON lines."""
    channel = make_channel(OutboxChannel, {"path": "outbox.jsonl"}, context)
    long_text = "x" * 20_000  # larger than any stdio buffer, so one write really matters
    threads = [
        threading.Thread(
            target=lambda n=n: [
                channel.send(make_message(id=n * 100 + i, text=long_text)) for i in range(20)
            ]
        )
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = (tmp_path / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 160
    ids = sorted(json.loads(line)["id"] for line in lines)
    assert ids == sorted(n * 100 + i for n in range(8) for i in range(20))


def test_outbox_concurrent_processes_write_whole_lines(tmp_path: Path) -> None:
    """Several processes appending to the same file never interleave their lines."""
    script = (
        "import sys\n"
        "from datetime import UTC, datetime\n"
        "from pathlib import Path\n"
        "from zoneinfo import ZoneInfo\n"
        "from visitwatch.core.notification import Message, Recipient\n"
        "from visitwatch.core.options import ConnectorContext\n"
        "from visitwatch.connectors.outbox import OutboxChannel\n"
        "n = int(sys.argv[1]); path = Path(sys.argv[2])\n"
        "ctx = ConnectorContext(ZoneInfo('UTC'), path.parent, path.parent)\n"
        "ch = OutboxChannel('o', {'path': path}, ctx)\n"
        "r = Recipient(id='m', name='M')\n"
        "for i in range(25):\n"
        "    ch.send(Message(n * 100 + i, 'overrun', 'v1', r, 'o', 's', 'y' * 30000,"
        " datetime.now(UTC)))\n"
    )
    path = tmp_path / "outbox.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n), str(path)]) for n in range(4)]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0, 0]
    records = read_outbox(path)
    assert sorted(r["id"] for r in records) == sorted(
        n * 100 + i for n in range(4) for i in range(25)
    )


def test_outbox_unwritable_path_raises_connector_error(
    tmp_path: Path, context: ConnectorContext
) -> None:
    """A path that cannot be written gives a temporary ConnectorError naming the file."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    channel = make_channel(OutboxChannel, {"path": "blocker/outbox.jsonl"}, context)
    with pytest.raises(ConnectorError, match=r"blocker/outbox\.jsonl") as caught:
        channel.send(make_message())
    assert caught.value.permanent is False
    with pytest.raises(ConnectorError, match="not writable"):
        channel.check()


def test_outbox_check_reports_writable_file(tmp_path: Path, context: ConnectorContext) -> None:
    """check() creates the folder and says the file is writable."""
    channel = make_channel(OutboxChannel, {"path": "new/outbox.jsonl"}, context)
    assert channel.check() == f"outbox file {tmp_path / 'new' / 'outbox.jsonl'} is writable"
    assert read_outbox(tmp_path / "new" / "outbox.jsonl") == []


# --------------------------------------------------------------------------- console


def test_console_prints_readable_block(
    capsys: pytest.CaptureFixture[str], context: ConnectorContext
) -> None:
    """The block shows kind, recipient, local time, subject and indented text, no ANSI."""
    channel = make_channel(ConsoleChannel, {}, context)
    created = datetime(2025, 7, 1, 13, 32, 5, tzinfo=UTC)  # 14:32:05 in London (BST)
    channel.send(make_message(created=created))

    out = capsys.readouterr().out
    assert "[OVERRUN] to Maria Jones <maria@example.org> via email · 14:32:05" in out
    assert "\nVisit to 12 High Street has overrun\n" in out
    assert "\n    Sam Green's visit was due to end at 14:00.\n" in out
    assert "\n    Please call Sam on 07700 900123.\n" in out
    assert "\x1b[" not in out


def test_console_stream_stderr(
    capsys: pytest.CaptureFixture[str], context: ConnectorContext
) -> None:
    """stream = "stderr" prints there and leaves stdout alone."""
    channel = make_channel(ConsoleChannel, {"stream": "stderr"}, context)
    channel.send(make_message())
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Maria Jones" in captured.err


def test_console_rejects_unknown_stream(context: ConnectorContext) -> None:
    """The stream option only takes stdout or stderr."""
    _, problems = validate_options(
        {"stream": "printer"}, ConsoleChannel.options, "channels[0]", context.config_dir
    )
    assert [p.key for p in problems] == ["channels[0].stream"]


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_colours_only_on_tty_without_no_color(
    monkeypatch: pytest.MonkeyPatch, context: ConnectorContext
) -> None:
    """Overruns are red and all-clears green on a terminal; NO_COLOR turns colour off."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    channel = make_channel(ConsoleChannel, {}, context)

    tty = FakeTty()
    monkeypatch.setattr(sys, "stdout", tty)
    channel.send(make_message(kind="overrun"))
    channel.send(make_message(kind="all_clear"))
    assert "\x1b[1m\x1b[31m[OVERRUN]" in tty.getvalue()
    assert "\x1b[1m\x1b[32m[ALL_CLEAR]" in tty.getvalue()

    monkeypatch.setenv("NO_COLOR", "1")
    plain = FakeTty()
    monkeypatch.setattr(sys, "stdout", plain)
    channel.send(make_message())
    assert "\x1b[" not in plain.getvalue()


def test_console_threads_do_not_interleave(
    monkeypatch: pytest.MonkeyPatch, context: ConnectorContext
) -> None:
    """Blocks printed from several threads come out whole."""

    class SlowStream(io.StringIO):
        def write(self, text: str) -> int:
            # Writing in pieces would let another thread slip in without the lock.
            total = 0
            for char in text:
                total += super().write(char)
            return total

    stream = SlowStream()
    monkeypatch.setattr(sys, "stdout", stream)
    channel = make_channel(ConsoleChannel, {}, context)
    threads = [
        threading.Thread(target=channel.send, args=(make_message(id=n, subject=f"subject {n}"),))
        for n in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    blocks = [b for b in stream.getvalue().split("─" * 72 + "\n") if b]
    assert len(blocks) == 6
    for block in blocks:
        assert block.startswith("[OVERRUN] to Maria Jones")
        assert block.count("subject") == 1


# --------------------------------------------------------------------------- smtp


def test_smtp_delivers_readable_mail(
    smtp_server: Callable[..., tuple[Recorder, int]], context: ConnectorContext
) -> None:
    """A manager receives To, Subject, body text and the visitwatch headers."""
    handler, port = smtp_server()
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    channel.send(make_message(id=42))

    envelope = handler.envelopes[0]
    assert envelope.mail_from == "alerts@example.org"
    assert envelope.rcpt_tos == ["maria@example.org"]
    mail = handler.received()
    assert mail["To"].addresses[0].addr_spec == "maria@example.org"
    assert mail["To"].addresses[0].display_name == "Maria Jones"
    assert mail["From"].addresses[0].addr_spec == "alerts@example.org"
    assert mail["Subject"] == "Visit to 12 High Street has overrun"
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    assert "Please call Sam on 07700 900123." in body.get_content()
    assert mail["X-Visitwatch-Notification"] == "42"
    assert mail["X-Visitwatch-Visit"] == "v1"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Message-ID"].endswith("@example.org>")
    assert mail["Date"] is not None


def test_smtp_non_ascii_name_and_subject(
    smtp_server: Callable[..., tuple[Recorder, int]], context: ConnectorContext
) -> None:
    """Accented names and subjects arrive intact."""
    handler, port = smtp_server()
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    zoe = Recipient(id="zoe@example.org", name="Zoë Müller", email="zoe@example.org")
    channel.send(make_message(recipient=zoe, subject="Überfällig: Besuch", text="Grüße"))
    mail = handler.received()
    assert mail["To"].addresses[0].display_name == "Zoë Müller"
    assert mail["Subject"] == "Überfällig: Besuch"
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().strip() == "Grüße"


def test_smtp_logs_no_personal_data_above_debug(
    smtp_server: Callable[..., tuple[Recorder, int]], context: ConnectorContext
) -> None:
    """Info and warning logs carry message and visit ids, never names, addresses or subject."""
    handler, port = smtp_server()
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    with capture_logs() as logs:
        channel.send(make_message(id=7))
        handler.data_reply = "550 5.1.1 <maria@example.org> Maria Jones unknown"
        with pytest.raises(ConnectorError) as caught:
            channel.send(make_message(id=8))
    assert "maria@example.org" not in str(caught.value)
    loud = [entry for entry in logs if entry["log_level"] != "debug"]
    assert {entry["message_id"] for entry in loud} == {7, 8}
    text = repr(loud)
    for private in ("maria@example.org", "Maria Jones", "High Street"):
        assert private not in text


def test_smtp_starttls_login_with_secret(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    certificate: Certificate,
    password_env: dict[str, str],
) -> None:
    """STARTTLS with a trusted CA file, then login with the password from a Secret."""
    logins: list[bytes] = []

    def remembering(*args: Any) -> AuthResult:
        logins.append(args[4].login)
        return authenticator(*args)

    handler, port = smtp_server(
        tls_context=certificate.server_context(),
        require_starttls=True,
        auth_required=True,
        authenticator=remembering,
    )
    table = smtp_table(
        port,
        security="starttls",
        ca_file=str(certificate.cert_file),
        username=USERNAME,
        password=password_env,
    )
    channel = make_channel(SmtpChannel, table, context)
    channel.send(make_message())
    assert logins == [USERNAME.encode()]
    assert handler.received()["Subject"] == "Visit to 12 High Street has overrun"
    assert channel.check() == f"SMTP 127.0.0.1:{port} accepted login as alerts over starttls"


def test_smtp_implicit_tls(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    certificate: Certificate,
) -> None:
    """security = "tls" speaks TLS from the first byte (port 465 style)."""
    handler, port = smtp_server(ssl_context=certificate.server_context())
    table = smtp_table(port, security="tls", ca_file=str(certificate.cert_file))
    channel = make_channel(SmtpChannel, table, context)
    channel.send(make_message())
    assert handler.received()["X-Visitwatch-Visit"] == "v1"


def test_smtp_untrusted_certificate_is_permanent(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    certificate: Certificate,
) -> None:
    """A certificate the system does not trust fails verification, permanently."""
    handler, port = smtp_server(tls_context=certificate.server_context())
    channel = make_channel(SmtpChannel, smtp_table(port, security="starttls"), context)
    with pytest.raises(ConnectorError, match="ca_file") as caught:
        channel.send(make_message())
    assert caught.value.permanent is True
    assert handler.envelopes == []


def test_smtp_verify_tls_false_accepts_any_certificate(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    certificate: Certificate,
) -> None:
    """verify_tls = false (test servers only) skips certificate checks."""
    handler, port = smtp_server(tls_context=certificate.server_context())
    table = smtp_table(port, security="starttls", verify_tls=False)
    channel = make_channel(SmtpChannel, table, context)
    channel.send(make_message())
    assert len(handler.envelopes) == 1


def test_smtp_starttls_not_offered_is_permanent(
    smtp_server: Callable[..., tuple[Recorder, int]], context: ConnectorContext
) -> None:
    """Asking for STARTTLS from a server without it is a configuration error."""
    _, port = smtp_server()
    channel = make_channel(SmtpChannel, smtp_table(port, security="starttls"), context)
    with pytest.raises(ConnectorError, match="security") as caught:
        channel.send(make_message())
    assert caught.value.permanent is True


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_wrong_password_is_permanent_and_secret(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused login is permanent, names where the password came from, never the password."""
    _, port = smtp_server(auth_required=True, auth_require_tls=False, authenticator=authenticator)
    wrong = "wrong-password-4711"
    monkeypatch.setenv("VW_TEST_SMTP_PASSWORD", wrong)
    table = smtp_table(port, username=USERNAME, password={"env": "VW_TEST_SMTP_PASSWORD"})
    channel = make_channel(SmtpChannel, table, context)
    with capture_logs() as logs, pytest.raises(ConnectorError) as caught:
        channel.send(make_message())
    error = caught.value
    assert error.permanent is True
    assert "env VW_TEST_SMTP_PASSWORD" in str(error)
    assert "username" in str(error)
    assert wrong not in str(error) and wrong not in repr(logs)

    with pytest.raises(ConnectorError) as checked:
        channel.check()
    assert checked.value.permanent is True and wrong not in str(checked.value)


def test_smtp_refused_connection_is_temporary(context: ConnectorContext) -> None:
    """Nothing listening on the port: a temporary error, the dispatcher retries."""
    channel = make_channel(SmtpChannel, smtp_table(free_port()), context)
    with pytest.raises(ConnectorError, match="refused the connection") as caught:
        channel.send(make_message())
    assert caught.value.permanent is False


def test_smtp_silent_server_times_out_temporarily(context: ConnectorContext) -> None:
    """A server that accepts but never greets hits the timeout: temporary."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        channel = make_channel(SmtpChannel, smtp_table(port, timeout="0.3s"), context)
        with pytest.raises(ConnectorError, match="did not answer") as caught:
            channel.send(make_message())
    assert caught.value.permanent is False


def test_smtp_recipient_without_email_is_permanent(context: ConnectorContext) -> None:
    """No address in the staff directory cannot be fixed by retrying."""
    channel = make_channel(SmtpChannel, smtp_table(free_port()), context)
    nobody = Recipient(id="sam", name="Sam Green")
    with pytest.raises(ConnectorError, match="recipient sam has no e-mail address") as caught:
        channel.send(make_message(recipient=nobody))
    assert caught.value.permanent is True


@pytest.mark.parametrize(
    ("reply", "permanent"),
    [
        ("550 5.7.1 Message rejected as spam", True),
        ("554 5.6.0 Transaction failed", True),
        ("451 4.3.0 Try again later", False),
        ("452 4.3.1 Insufficient system storage", False),
    ],
)
def test_smtp_data_reply_codes(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    reply: str,
    permanent: bool,
) -> None:
    """5xx after DATA is permanent, 4xx temporary; the error shows the server's reply."""
    handler, port = smtp_server()
    handler.data_reply = reply
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    with pytest.raises(ConnectorError, match=reply.split()[0]) as caught:
        channel.send(make_message())
    assert caught.value.permanent is permanent


@pytest.mark.parametrize(
    ("reply", "permanent"),
    [("550 5.1.1 No such user", True), ("450 4.2.0 Greylisted, try again", False)],
)
def test_smtp_refused_recipient(
    smtp_server: Callable[..., tuple[Recorder, int]],
    context: ConnectorContext,
    reply: str,
    permanent: bool,
) -> None:
    """A recipient refused with 5xx is permanent; a greylisting 4xx is retried."""
    handler, port = smtp_server()
    handler.rcpt_reply = reply
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    with pytest.raises(ConnectorError, match="refused the recipient") as caught:
        channel.send(make_message())
    assert caught.value.permanent is permanent


def test_smtp_check_success_and_failure(
    smtp_server: Callable[..., tuple[Recorder, int]], context: ConnectorContext
) -> None:
    """check() reports a reachable server in one line and raises for an unreachable one."""
    handler, port = smtp_server()
    channel = make_channel(SmtpChannel, smtp_table(port), context)
    assert channel.check() == f"SMTP 127.0.0.1:{port} answered (no login configured)"
    assert handler.envelopes == []

    dead = make_channel(SmtpChannel, smtp_table(free_port()), context)
    with pytest.raises(ConnectorError) as caught:
        dead.check()
    assert caught.value.permanent is False


def test_smtp_options_validated(context: ConnectorContext) -> None:
    """Required keys, security choices and inline passwords are reported by validation."""
    _, problems = validate_options(
        {"security": "ssl", "password": "inline"},
        SmtpChannel.options,
        "channels[0]",
        context.config_dir,
    )
    keys = sorted(p.key for p in problems)
    assert keys == [
        "channels[0].host",
        "channels[0].password",
        "channels[0].security",
        "channels[0].sender",
    ]


def smtp_problems(table: dict[str, Any], context: ConnectorContext) -> dict[str, str]:
    """What the config loader finds wrong with an SMTP table, by key."""
    return {p.key: p.message for p in config_problems(SmtpChannel, table, context.config_dir)}


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"sender": "visitwatch"}, "channels[0].sender", "not an e-mail address"),
        ({"sender": "not-an-address"}, "channels[0].sender", "not an e-mail address"),
        ({"port": 70000}, "channels[0].port", "at most 65535"),
        ({"port": 0}, "channels[0].port", "1 or more"),
        ({"timeout": "0s"}, "channels[0].timeout", "longer than zero"),
        ({"host": " "}, "channels[0].host", "empty"),
        ({"username": "alerts"}, "password", "password is not"),
        ({"password": {"env": "VW_TEST_SMTP_PASSWORD"}}, "username", "username is empty"),
        ({"security": "tls", "port": 587}, "security", "plain text"),
        ({"security": "starttls", "port": 465}, "security", "TLS from the first byte"),
        ({"security": "none", "port": 465}, "security", "TLS from the first byte"),
    ],
)
def test_smtp_settings_that_cannot_work_are_config_problems(
    context: ConnectorContext,
    password_env: dict[str, str],
    extra: dict[str, Any],
    key: str,
    words: str,
) -> None:
    """A bad sender, port, login pair or security/port mix is found when the config is read."""
    found = smtp_problems({**smtp_table(25), **extra}, context)
    assert list(found) == [key] and words in found[key]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"security": "starttls", "port": 587},
        {"security": "tls", "port": 465},
        {"security": "none", "port": 2525},
        {"username": USERNAME, "password": {"env": "VW_TEST_SMTP_PASSWORD"}},
    ],
)
def test_smtp_settings_that_work_pass(
    context: ConnectorContext, password_env: dict[str, str], extra: dict[str, Any]
) -> None:
    """The usual setups (and a test server on any port) raise no problem."""
    assert smtp_problems({**smtp_table(25), **extra}, context) == {}


def test_registry_knows_the_channels() -> None:
    """The config type names map to these classes."""
    from visitwatch.connectors.registry import channel_class

    assert channel_class("outbox") is OutboxChannel
    assert channel_class("console") is ConsoleChannel
    assert channel_class("smtp") is SmtpChannel
