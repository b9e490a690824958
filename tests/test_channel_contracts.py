"""The channel contract (tests/channel_contract.py), kept by outbox, console, SMTP and Graph mail.

Each class only says how to build its channel, read what the far side received, and break
the far side; the contract's tests do the rest.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import responses
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from tests.channel_contract import ChannelContract, Delivered, build_channel
from tests.graph_mock import add_token
from tests.graph_server import unsigned_token
from tests.mailserver import Recorder
from visitwatch.connectors.base import Channel
from visitwatch.connectors.console import ConsoleChannel
from visitwatch.connectors.graph_mail import GraphMailChannel
from visitwatch.connectors.outbox import OutboxChannel, read_outbox
from visitwatch.connectors.smtp import SmtpChannel
from visitwatch.core.options import ConnectorContext


@pytest.fixture
def context(tmp_path: Path) -> ConnectorContext:
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/contract",
    )


# --------------------------------------------------------------------------- outbox


class TestOutboxContract(ChannelContract):
    """The outbox file; its only failure is the disk, which can always clear."""

    fails_permanently = False

    @pytest.fixture
    def make_channel(self, context: ConnectorContext) -> Callable[[], Channel]:
        return lambda: build_channel(OutboxChannel, {"path": "box/outbox.jsonl"}, context)

    @pytest.fixture
    def delivered(self, tmp_path: Path) -> Callable[[], list[Delivered]]:
        def read() -> list[Delivered]:
            path = tmp_path / "box" / "outbox.jsonl"
            if not path.is_file():
                return []
            return [Delivered(r["subject"], r["text"]) for r in read_outbox(path)]

        return read

    @pytest.fixture
    def break_far_side(self, tmp_path: Path) -> Callable[[bool], None]:
        def block(permanent: bool) -> None:
            # A file where the folder should be: every append fails until an admin fixes it.
            shutil.rmtree(tmp_path / "box", ignore_errors=True)
            (tmp_path / "box").write_text("not a folder")

        return block


# --------------------------------------------------------------------------- console


class TestConsoleContract(ChannelContract):
    """The console; its only failure is a closed stream (a journal restarting)."""

    fails_permanently = False

    @pytest.fixture
    def make_channel(self, context: ConnectorContext) -> Callable[[], Channel]:
        return lambda: build_channel(ConsoleChannel, {"stream": "stdout"}, context)

    @pytest.fixture
    def delivered(self, capsys: pytest.CaptureFixture[str]) -> Callable[[], list[Delivered]]:
        printed: list[str] = []

        def read() -> list[Delivered]:
            printed.append(capsys.readouterr().out)
            blocks = "".join(printed).split("─" * 72 + "\n")
            found = []
            for block in filter(None, blocks):
                _header, subject, *body = block.rstrip("\n").split("\n")
                found.append(Delivered(subject, "\n".join(line[4:] for line in body)))
            return found

        return read

    @pytest.fixture
    def break_far_side(self, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
        def close(permanent: bool) -> None:
            closed = io.StringIO()
            closed.close()
            monkeypatch.setattr(sys, "stdout", closed)

        return close


# --------------------------------------------------------------------------- smtp

SMTP_PASSWORD = "contract-smtp-password-0451"


def _login(
    server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
class TestSmtpContract(ChannelContract):
    """SMTP with a login, against a real aiosmtpd server on loopback."""

    @pytest.fixture
    def server(
        self,
        smtp_server: Callable[..., tuple[Recorder, int]],
        monkeypatch: pytest.MonkeyPatch,
    ) -> tuple[Recorder, int]:
        monkeypatch.setenv("VW_CONTRACT_SMTP_PASSWORD", SMTP_PASSWORD)
        return smtp_server(auth_required=True, auth_require_tls=False, authenticator=_login)

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [SMTP_PASSWORD]

    @pytest.fixture
    def make_channel(
        self, server: tuple[Recorder, int], context: ConnectorContext
    ) -> Callable[[], Channel]:
        table = {
            "host": "127.0.0.1",
            "port": server[1],
            "security": "none",
            "sender": "visitwatch <alerts@example.org>",
            "username": "alerts",
            "password": {"env": "VW_CONTRACT_SMTP_PASSWORD"},
            "timeout": "5s",
        }
        return lambda: build_channel(SmtpChannel, table, context)

    @pytest.fixture
    def delivered(self, server: tuple[Recorder, int]) -> Callable[[], list[Delivered]]:
        def read() -> list[Delivered]:
            found = []
            for envelope in server[0].envelopes:
                content = envelope.original_content or envelope.content
                assert isinstance(content, bytes)
                mail = email.message_from_bytes(content, policy=email.policy.default)
                assert isinstance(mail, EmailMessage)
                body = mail.get_body(preferencelist=("plain",))
                assert body is not None
                found.append(Delivered(str(mail["Subject"]), body.get_content()))
            return found

        return read

    @pytest.fixture
    def break_far_side(self, server: tuple[Recorder, int]) -> Callable[[bool], None]:
        def refuse(permanent: bool) -> None:
            server[0].data_reply = (
                "554 5.7.1 Message refused" if permanent else "451 4.3.0 Try again later"
            )

        return refuse


# --------------------------------------------------------------------------- graph mail

TENANT = "00000000-0000-0000-0000-0000000000cc"
GRAPH_SECRET = "contract-graph-client-secret-7788"
SENDER = "visitwatch@contoso.org"
SEND_URL = f"https://graph.microsoft.com/v1.0/users/{SENDER}/sendMail"


ACCESS_TOKEN = unsigned_token({"roles": ["Mail.Send"], "tid": TENANT})


class TestGraphMailContract(ChannelContract):
    """Graph sendMail, with Entra and Graph answered by ``responses``."""

    @pytest.fixture
    def graph(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[responses.RequestsMock]:
        monkeypatch.setenv("VW_CONTRACT_GRAPH_SECRET", GRAPH_SECRET)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            add_token(mock, ACCESS_TOKEN, tenant=TENANT)
            mock.post(SEND_URL, status=202)
            yield mock

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [GRAPH_SECRET, ACCESS_TOKEN]

    @pytest.fixture
    def make_channel(
        self, graph: responses.RequestsMock, context: ConnectorContext
    ) -> Callable[[], Channel]:
        # A fresh app id per test: channels of one app share a client (and its tokens).
        table = {
            "tenant_id": TENANT,
            "client_id": str(uuid.uuid4()),
            "client_secret": {"env": "VW_CONTRACT_GRAPH_SECRET"},
            "sender": SENDER,
        }
        return lambda: build_channel(GraphMailChannel, table, context)

    @pytest.fixture
    def delivered(self, graph: responses.RequestsMock) -> Callable[[], list[Delivered]]:
        def read() -> list[Delivered]:
            found = []
            for call in graph.calls:
                answer = call.response
                if call.request.url != SEND_URL or getattr(answer, "status_code", 0) != 202:
                    continue
                assert call.request.body is not None
                mail = json.loads(call.request.body)["message"]
                found.append(Delivered(mail["subject"], mail["body"]["content"]))
            return found

        return read

    @pytest.fixture
    def break_far_side(self, graph: responses.RequestsMock) -> Callable[[bool], None]:
        def fail(permanent: bool) -> None:
            # 500 is not retried by the client (429/503/504 are, after a wait), so the
            # temporary case costs no test time.
            status, code = (403, "ErrorAccessDenied") if permanent else (500, "InternalServerError")
            graph.replace(
                responses.POST,
                SEND_URL,
                status=status,
                json={"error": {"code": code, "message": "refused by the contract test"}},
            )

        return fail
