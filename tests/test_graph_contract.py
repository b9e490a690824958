"""GraphCalendarSource keeps the calendar source contract: entries served as Graph JSON.

Graph is mocked with ``responses`` by ``tests/graph_mock.py`` (Entra's token set-up and a
:class:`Mailbox` answering ``calendarView`` as Graph does, series expanded on the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
import responses

from tests.graph_mock import ASHA, CLIENT, TENANT, TOKEN, Mailbox, add_token, ical_uid, view_url
from tests.source_contract import CalendarSourceContract, Entry, MakeSource
from visitwatch.connectors.base import CalendarSource
from visitwatch.connectors.graph import GraphCalendarSource
from visitwatch.core.options import ConnectorContext, validate_options

CLIENT_SECRET = "vw-contract-client-secret-3f9a"


def build_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GraphCalendarSource:
    monkeypatch.setenv("VW_GRAPH_SECRET", CLIENT_SECRET)
    table = {
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": {"env": "VW_GRAPH_SECRET"},
        "mailboxes": [ASHA],
        "delta": False,
    }
    settings, problems = validate_options(table, GraphCalendarSource.options, "s", tmp_path)
    assert problems == []
    context = ConnectorContext(
        timezone=ZoneInfo("Europe/London"), state_dir=tmp_path / "state", config_dir=tmp_path
    )
    return GraphCalendarSource("outlook", settings, context)


class TestGraphSourceContract(CalendarSourceContract):
    """The contract, for one Outlook mailbox read with calendarView."""

    def reported_uid(self, uid: str) -> str:
        return ical_uid(uid)

    @pytest.fixture
    def make_source(
        self, mock: responses.RequestsMock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> MakeSource:
        mailbox = Mailbox()
        add_token(mock)
        mock.add_callback(responses.GET, view_url(), callback=mailbox.answer)

        def build(entries: Sequence[Entry]) -> CalendarSource:
            mailbox.entries = list(entries)
            return build_source(tmp_path, monkeypatch)

        return build

    @pytest.fixture(
        params=[
            "timeout",
            "mailbox-unknown",
            "access-denied",
            "not-json",
        ]
    )
    def broken_source(
        self,
        request: pytest.FixtureRequest,
        mock: responses.RequestsMock,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> CalendarSource:
        add_token(mock)
        url = view_url()
        kind = request.param
        if kind == "timeout":
            mock.get(url, body=requests.exceptions.ConnectTimeout("no answer"))
        elif kind == "mailbox-unknown":
            error = {"code": "ErrorInvalidUser", "message": f"The requested user '{ASHA}'"}
            mock.get(url, status=404, json={"error": error})
        elif kind == "access-denied":
            error = {"code": "ErrorAccessDenied", "message": "Access is denied."}
            mock.get(url, status=403, json={"error": error})
        else:
            mock.get(url, status=200, body="<html>Service unavailable</html>")
        return build_source(tmp_path, monkeypatch)

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [CLIENT_SECRET, TOKEN]
