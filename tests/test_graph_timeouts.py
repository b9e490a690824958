"""A Graph or Entra server that accepts and never answers cannot hang visitwatch.

Every call made through a GraphClient (msal's discovery and token requests included) ends
with a temporary error after the configured ``timeout``, and no thread waits behind another
thread's network call: the calendar source, the mail channel and directory lookups share
one client per tenant. The bounds below ("finished within 10 s") are hang checks with a
small configured timeout, not speed measurements.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.graph_server import FakeGraph, SilentServer
from visitwatch.connectors.graph_client import GRAPH_OPTIONS, GraphClient
from visitwatch.connectors.graph_directory import GraphDirectory
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import validate_options

HANG_CHECK = 10.0  # seconds: far above every timeout configured here
ASHA = "asha.khan@contoso.org"
BEN = "ben.okafor@contoso.org"


@dataclass
class Outcome:
    """What a call running in its own thread did."""

    thread: threading.Thread
    result: Any = None
    error: BaseException | None = None

    def wait(self, seconds: float = HANG_CHECK) -> Outcome:
        self.thread.join(seconds)
        assert not self.thread.is_alive(), f"still waiting after {seconds:.0f}s: it hangs"
        return self

    def temporary_error(self) -> ConnectorError:
        self.wait()
        assert isinstance(self.error, ConnectorError), f"expected an error, got {self!r}"
        assert not self.error.permanent, f"a hung server is temporary: {self.error}"
        return self.error


def in_thread(call: Callable[[], Any]) -> Outcome:
    """Start ``call`` in a daemon thread (so a hang fails the test instead of freezing it)."""
    outcome = Outcome(threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            outcome.result = call()
        except BaseException as err:  # handed to the test to judge
            outcome.error = err

    outcome.thread = threading.Thread(target=run, daemon=True)
    outcome.thread.start()
    return outcome


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + HANG_CHECK
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture
def graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    fake = start_fake_graph()
    fake.add_person(ASHA, "Asha Khan")
    fake.add_person(BEN, "Ben Okafor")
    return fake


def make_client(graph: FakeGraph, tmp_path: Path, timeout: str, **extra: Any) -> GraphClient:
    table = graph.config_table("VW_FAKE_GRAPH_SECRET", timeout=timeout, **extra)
    settings, problems = validate_options(table, GRAPH_OPTIONS, "sources[0]", tmp_path)
    assert problems == [], [str(p) for p in problems]
    return GraphClient(settings, "visitwatch/test", sleep=lambda _: None)


TOKEN_PATH = "/{tenant}/oauth2/v2.0/token"


def test_hung_token_endpoint_fails_the_token_with_a_temporary_error(
    graph: FakeGraph, tmp_path: Path
):
    """msal's token request gets the configured timeout: a silent Entra is a temporary error."""
    graph.hang_next[("POST", TOKEN_PATH.format(tenant=graph.tenant))] = 1
    client = make_client(graph, tmp_path, "0.5s")
    error = in_thread(client.token).temporary_error()
    assert graph.hung, "the token request never reached the hung endpoint"
    assert "Entra" in str(error)


def test_hung_tenant_discovery_fails_the_token_with_a_temporary_error(
    graph: FakeGraph, tmp_path: Path
):
    """msal's OpenID discovery request (on first use) gets the configured timeout too."""
    graph.hang_next[("GET", f"/{graph.tenant}/v2.0/.well-known")] = 1
    client = make_client(graph, tmp_path, "0.5s")
    in_thread(client.token).temporary_error()
    assert graph.hung


def test_authority_that_accepts_tcp_and_never_answers(graph: FakeGraph, tmp_path: Path):
    """An Entra host that never even completes TLS: the token fails, temporary, and recovers."""
    with SilentServer() as silent:
        client = make_client(graph, tmp_path, "0.5s", authority_host=silent.url)
        in_thread(client.token).temporary_error()
        assert silent.accepted >= 1


@pytest.mark.parametrize("where", ["http", "tcp"])
def test_hung_graph_call_is_a_temporary_error(graph: FakeGraph, tmp_path: Path, where: str):
    """A Graph request that is never answered ends after the timeout and is not re-sent."""
    if where == "http":
        graph.hang_next[("GET", f"/v1.0/users/{ASHA}")] = 5
        client = make_client(graph, tmp_path, "0.5s")
        in_thread(lambda: client.get(f"/users/{ASHA}")).temporary_error()
        # Waiting the whole timeout again would only multiply the wait of the channel or
        # source that called; their own retry schedules try again later.
        assert len(graph.hung) == 1
        return
    with SilentServer() as silent:
        client = make_client(graph, tmp_path, "0.5s", graph_url=f"{silent.url}/v1.0")
        in_thread(lambda: client.get(f"/users/{ASHA}")).temporary_error()
        assert silent.accepted == 1


def test_hung_send_mail_is_a_temporary_error(graph: FakeGraph, tmp_path: Path):
    """sendMail that is never answered: one attempt, a temporary failure the dispatcher retries."""
    sender = "visitwatch@contoso.org"
    graph.mailboxes.add(sender)
    graph.hang_next[("POST", f"/v1.0/users/{sender}/sendMail")] = 1
    client = make_client(graph, tmp_path, "0.5s")
    message = {"subject": "Check in", "toRecipients": [{"emailAddress": {"address": ASHA}}]}
    call = in_thread(
        lambda: client.request("POST", f"/users/{sender}/sendMail", json={"message": message})
    )
    call.temporary_error()
    assert len(graph.requests_to("POST", f"/v1.0/users/{sender}/sendMail")) == 1
    assert graph.sent == []


def test_two_threads_while_the_token_endpoint_hangs_both_get_errors(
    graph: FakeGraph, tmp_path: Path
):
    """The calendar source and the mail channel both asking for a token: neither waits for ever."""
    graph.hang_next[("POST", TOKEN_PATH.format(tenant=graph.tenant))] = 2
    client = make_client(graph, tmp_path, "0.5s")
    source = in_thread(lambda: client.get(f"/users/{ASHA}/calendarView"))
    channel = in_thread(client.token)
    source.temporary_error()
    channel.temporary_error()


def test_a_hung_token_request_does_not_hold_up_another_thread(graph: FakeGraph, tmp_path: Path):
    """While one thread's token request hangs, another gets its own token and its answer."""
    graph.hang_next[("POST", TOKEN_PATH.format(tenant=graph.tenant))] = 1
    client = make_client(graph, tmp_path, "60s")  # the hung one is held until released
    stuck = in_thread(client.token)
    wait_until(lambda: len(graph.hung) == 1, "the first token request hangs")
    other = in_thread(lambda: client.get(f"/users/{BEN}")).wait()
    assert other.error is None, other.error
    assert other.result["displayName"] == "Ben Okafor"
    assert stuck.thread.is_alive(), "the first request was meant to be still hanging"
    graph.release_hung()  # the hung connection is dropped: that caller sees a failure
    stuck.temporary_error()


def test_directory_lookup_does_not_wait_behind_another_threads_fetch(
    graph: FakeGraph, tmp_path: Path
):
    """A directory fetch hanging in the sync thread does not hold up dispatch's cached lookup."""
    client = make_client(graph, tmp_path, "60s")
    directory = GraphDirectory(
        client, tmp_path / "state", lambda: datetime(2026, 11, 23, tzinfo=UTC)
    )
    assert ASHA in directory.lookup([ASHA])  # now cached
    graph.hang_next[("POST", "/v1.0/$batch")] = 1
    fetching = in_thread(lambda: directory.lookup([BEN]))
    wait_until(lambda: len(graph.hung) == 1, "the directory fetch hangs")
    cached = in_thread(lambda: directory.lookup([ASHA])).wait()
    assert cached.error is None, cached.error
    assert cached.result[ASHA].name == "Asha Khan"
    assert fetching.thread.is_alive(), "the fetch was meant to be still hanging"
    graph.release_hung()  # the dropped connection is retried, and Graph answers this time
    assert fetching.wait().result[BEN].name == "Ben Okafor"
