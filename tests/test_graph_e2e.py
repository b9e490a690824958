"""The daemon against a Graph-shaped server on loopback: the real HTTP path, end to end.

The daemon runs as its own process (`visitwatch run`), signs in through msal at the fake
Entra endpoint over TLS, reads a shared mailbox through calendarView delta (after a 429),
learns the worker and her manager from the directory, and sends the overrun alert as
Outlook mail. Nothing is mocked inside the process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest

from tests.graph_server import FakeGraph, graph_event, toml_table

REPO = Path(__file__).resolve().parents[1]
SHARED = "home-visits@contoso.org"
SENDER = "visitwatch@contoso.org"
ASHA = "asha.khan@contoso.org"
MARIA = "maria.jones@contoso.org"


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with FakeGraph(roles=("Calendars.ReadWrite", "Mail.Send", "User.Read.All"),
                   enforce_roles=True) as fake:  # fmt: skip
        fake.add_person(ASHA, "Asha Khan", manager=MARIA, mobile="+44 7700 900123")
        fake.add_person(MARIA, "Maria Jones", mobile="+44 7700 900321")
        fake.add_person(SENDER, "visitwatch")  # a shared mailbox is a user object too
        yield fake


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(graph: FakeGraph, folder: Path) -> Path:
    config = folder / "visitwatch.toml"
    config.write_text(
        '[daemon]\ndatabase = "visitwatch.db"\npoll_interval = "3s"\nsweep_interval = "1s"\n\n'
        '[[staff]]\nid = "sam.webster@contoso.org"\nname = "Sam Webster"\nrole = "director"\n\n'
        + toml_table("sources", {"name": "home-visits", "type": "graph", "mailboxes": [SHARED],
                                 "shared": True, "directory": True, "write_back": True,
                                 **graph.config_table("VW_GRAPH_SECRET")})
        + toml_table("channels", {"name": "outlook", "type": "graph_mail", "sender": SENDER,
                                  **graph.config_table("VW_GRAPH_SECRET")})
        + toml_table("channels", {"name": "outbox", "type": "outbox"})
        + '\n[policy]\npreset = "pan-lancashire"\n'
        '[[policy.escalation]]\nafter = "0s"\nto = ["worker"]\nkind = "reminder"\n'
        '[[policy.escalation]]\nafter = "5s"\nto = ["manager"]\nkind = "overrun"\n'
        '[[policy.escalation]]\nafter = "1h"\nto = ["role:director"]\nkind = "escalation"\n',
        encoding="utf-8",
    )  # fmt: skip
    return config


def environment(graph: FakeGraph) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "VW_GRAPH_SECRET": graph.client_secret,
        # ca_file must win over these (requests would otherwise let them replace it).
        "REQUESTS_CA_BUNDLE": certifi.where(),
        "CURL_CA_BUNDLE": certifi.where(),
    }


def test_check_reports_token_mailbox_visits_and_sender(graph: FakeGraph, tmp_path: Path):
    """`visitwatch check` against the tenant: token, mailbox, visits in window, sender."""
    now = datetime.now(UTC).replace(microsecond=0)
    graph.add_event(
        SHARED,
        graph_event(
            "v1",
            "Home visit - Lee",
            now + timedelta(hours=2),
            now + timedelta(hours=3),
            attendees=[ASHA],
        ),
    )
    graph.add_event(
        SHARED,
        graph_event(
            "m1", "Team meeting", now + timedelta(hours=4), now + timedelta(hours=5), categories=()
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config",
         str(write_config(graph, tmp_path)), "check"],
        cwd=REPO, env=environment(graph), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"ok   source home-visits: token ok; {SHARED}: 2 entries; 1 visits in the sync window"
    ) in result.stdout
    assert "ok   channel outlook: token ok (Mail.Send granted)" in result.stdout
    assert SENDER in result.stdout


def test_overrun_in_a_shared_mailbox_reaches_the_manager_as_outlook_mail(
    graph: FakeGraph, tmp_path: Path
):
    """A visit in a shared mailbox runs over: Maria gets an Outlook mail; the entry is marked."""
    now = datetime.now(UTC).replace(microsecond=0)
    graph.add_event(SHARED, graph_event(
        "visit-1", "Home visit - Carter family", now - timedelta(hours=1),
        now - timedelta(seconds=30),
        body="Risk assessment: complete\nPurpose: review", location="14 Brook Street, Preston",
        attendees=[ASHA, SHARED], organizer="office@contoso.org",
    ))  # fmt: skip
    # Throttled once: the daemon must honour Retry-After and carry on.
    graph.fail_next[("GET", f"/v1.0/users/{SHARED}/calendarView")] = [(429, {"Retry-After": "1"})]

    config = write_config(graph, tmp_path)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config", str(config), "run"],
        cwd=REPO, env=environment(graph), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    def mail_to(address: str) -> list[dict]:
        return [m["message"] for m in list(graph.sent)
                if any(r["emailAddress"]["address"] == address
                       for r in m["message"]["toRecipients"])]  # fmt: skip

    try:
        wait_for(lambda: mail_to(MARIA) and any(
            "visitwatch: overdue" in p.body.get("categories", []) for p in list(graph.patches)
        ), 60, "the manager's Outlook mail and the write-back")  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err[-2000:]

    [alert] = mail_to(MARIA)
    assert alert["subject"].startswith("OVERDUE: Asha Khan")
    assert alert["importance"] == "high"
    assert (
        "07700 900123" in alert["body"]["content"]
    )  # her mobile, from the directory, as written in the UK
    assert "14 Brook Street" in alert["body"]["content"]
    assert mail_to(ASHA)[0]["subject"].startswith("Check in:")
    # The 429 was answered and the read retried; the token came from the fake Entra.
    reads = graph.requests_to("GET", f"/v1.0/users/{SHARED}/calendarView")
    assert len(reads) >= 2
    assert all(r.header("Authorization").startswith("Bearer ") for r in reads)
    assert [p.event_id for p in graph.patches if "visitwatch: overdue" in p.body["categories"]] == [
        "visit-1"
    ]
    # The log is JSON and carries no personal data.
    assert "Asha" not in err and "Brook Street" not in err
