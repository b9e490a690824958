"""GraphDirectory against FakeGraph over TLS: $batch lookups, managers, the 0600 file cache."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.graph_server import FakeGraph
from visitwatch.connectors.graph_client import GRAPH_OPTIONS, GraphClient
from visitwatch.connectors.graph_directory import CACHE_FILE, GraphDirectory, Person
from visitwatch.core.options import validate_options

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ASHA = "asha.khan@contoso.org"
BEN = "ben.okafor@contoso.org"
MARIA = "maria.jones@contoso.org"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def fake_graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    """FakeGraph holding Asha and Ben, managed by Maria, who has no manager."""
    graph = start_fake_graph(roles=["User.Read.All"], enforce_roles=True)
    graph.add_person(
        ASHA,
        "Asha Khan",
        mobile="+44 7700 900123",
        manager=MARIA,
        business_phones=["+44 1772 000001"],
    )
    graph.add_person(BEN, "Ben Okafor", manager=MARIA)
    graph.add_person(MARIA, "Maria Jones", mobile="+44 7700 900321")
    return graph


@pytest.fixture
def client(fake_graph: FakeGraph, tmp_path: Path) -> Iterator[GraphClient]:
    settings, problems = validate_options(
        fake_graph.config_table("VW_FAKE_GRAPH_SECRET"), GRAPH_OPTIONS, "sources[0]", tmp_path
    )
    assert problems == [], [str(p) for p in problems]
    graph = GraphClient(settings, "visitwatch/test", sleep=lambda seconds: None)
    yield graph
    graph.close()


def batches(fake_graph: FakeGraph) -> int:
    return len([r for r in fake_graph.requests_to("POST", "/v1.0/$batch") if r.batch_id is None])


def test_lookup_reads_people_and_managers_in_one_batch(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """Three people (six inner requests) take one $batch; Maria has no manager (404 -> None)."""
    directory = GraphDirectory(client, tmp_path, Clock(T0))

    people = directory.lookup([ASHA, BEN, MARIA, ASHA])

    assert people == {
        ASHA: Person(ASHA, "Asha Khan", ASHA, "+44 7700 900123", MARIA, "+44 1772 000001"),
        BEN: Person(BEN, "Ben Okafor", BEN, "", MARIA),
        MARIA: Person(MARIA, "Maria Jones", MARIA, "+44 7700 900321", None),
    }
    assert batches(fake_graph) == 1
    inner = [r for r in fake_graph.requests if r.batch_id is not None]
    assert len(inner) == 6
    user_query = next(r.query for r in inner if r.path == f"/v1.0/users/{ASHA}")
    assert (
        user_query["$select"] == "id,displayName,mail,userPrincipalName,mobilePhone,businessPhones"
    )


def test_many_people_are_split_into_batches_of_twenty_requests(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """Twelve people are 24 inner requests: two $batch calls (Graph's limit is 20)."""
    staff = [f"worker{n}@contoso.org" for n in range(12)]
    for n, mail in enumerate(staff):
        fake_graph.add_person(mail, f"Worker {n}", manager=MARIA)

    people = GraphDirectory(client, tmp_path, Clock(T0)).lookup(staff)

    assert sorted(people) == sorted(staff)
    assert all(p.manager_id == MARIA for p in people.values())
    assert batches(fake_graph) == 2


def test_cache_is_reused_within_max_age_and_refreshed_after(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """A day-old answer is not fetched again; after a day a changed mobile is picked up."""
    clock = Clock(T0)
    directory = GraphDirectory(client, tmp_path, clock)
    directory.lookup([ASHA])
    fake_graph.people[ASHA]["mobilePhone"] = "+44 7700 900999"

    clock.now = T0 + timedelta(hours=23, minutes=59)
    assert directory.lookup([ASHA])[ASHA].mobile == "+44 7700 900123"
    assert batches(fake_graph) == 1

    clock.now = T0 + timedelta(days=1)
    assert directory.lookup([ASHA])[ASHA].mobile == "+44 7700 900999"
    assert batches(fake_graph) == 2


def test_cache_survives_a_restart(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """A new GraphDirectory on the same state_dir answers from the file without asking Graph."""
    GraphDirectory(client, tmp_path, Clock(T0)).lookup([ASHA, MARIA])

    again = GraphDirectory(client, tmp_path, Clock(T0 + timedelta(hours=2))).lookup([ASHA, MARIA])

    assert again[ASHA].manager_id == MARIA and again[MARIA].manager_id is None
    assert batches(fake_graph) == 1


def test_cache_file_is_private(fake_graph: FakeGraph, client: GraphClient, tmp_path: Path) -> None:
    """The cache holds names and phones, so it is written with mode 0600."""
    GraphDirectory(client, tmp_path / "state", Clock(T0)).lookup([ASHA])

    path = tmp_path / "state" / CACHE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text(encoding="utf-8"))["people"][ASHA]
    assert record["person"]["mobile"] == "+44 7700 900123"
    assert datetime.fromisoformat(record["fetched_at"]) == T0
    assert [p.name for p in (tmp_path / "state").iterdir()] == [CACHE_FILE]  # no temp left


def test_stale_entry_is_kept_when_graph_fails(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """When $batch keeps failing, the two-day-old entry is still served and a warning logged."""
    clock = Clock(T0)
    directory = GraphDirectory(client, tmp_path, clock)
    directory.lookup([ASHA])
    clock.now = T0 + timedelta(days=2)
    fake_graph.fail_next[("POST", "/v1.0/$batch")] = [(503, {})] * 5

    with capture_logs() as logs:
        people = directory.lookup([ASHA, BEN])

    assert list(people) == [ASHA]  # Ben was never cached, so there is nothing to serve
    assert people[ASHA].mobile == "+44 7700 900123"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["directory.fetch_failed"]
    # Names and phone numbers stay out of everything above debug.
    assert "Asha Khan" not in json.dumps(warnings, default=str)
    assert "900123" not in json.dumps(warnings, default=str)


def test_failed_inner_request_keeps_that_entry_only(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """A 500 on Asha's manager keeps Asha's cached entry; Ben is refreshed in the same batch."""
    clock = Clock(T0)
    directory = GraphDirectory(client, tmp_path, clock)
    directory.lookup([ASHA, BEN])
    fake_graph.people[ASHA]["displayName"] = "Asha Khan-Patel"
    fake_graph.people[BEN]["mobilePhone"] = "+44 7700 900456"
    fake_graph.fail_next[("GET", f"/v1.0/users/{ASHA}/manager")] = [(500, {})]
    clock.now = T0 + timedelta(days=2)

    people = directory.lookup([ASHA, BEN])

    assert people[ASHA].name == "Asha Khan"  # the stale entry, not half an answer
    assert people[BEN].mobile == "+44 7700 900456"
    clock.now = T0 + timedelta(days=2, hours=1)
    assert directory.lookup([ASHA])[ASHA].name == "Asha Khan-Patel"  # stale is retried


def test_throttled_inner_requests_are_retried(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """An inner 429 is retried by the client's batch, so the lookup still succeeds."""
    fake_graph.fail_next[("GET", f"/v1.0/users/{BEN}")] = [(429, {"Retry-After": "1"})]

    people = GraphDirectory(client, tmp_path, Clock(T0)).lookup([BEN])

    assert people[BEN].name == "Ben Okafor"
    assert batches(fake_graph) == 2


def test_unknown_user_is_absent_and_forgotten(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """Someone no longer in the directory (404) is left out and dropped from the cache."""
    clock = Clock(T0)
    directory = GraphDirectory(client, tmp_path, clock)
    directory.lookup([BEN])
    del fake_graph.people[BEN]
    clock.now = T0 + timedelta(days=2)

    assert directory.lookup([BEN, "nobody@contoso.org"]) == {}
    saved = json.loads((tmp_path / CACHE_FILE).read_text(encoding="utf-8"))
    assert saved["people"] == {}


def test_unreadable_cache_is_ignored(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """A damaged cache file costs one fetch, not a failure, and is replaced."""
    (tmp_path / CACHE_FILE).write_text("{not json", encoding="utf-8")

    people = GraphDirectory(client, tmp_path, Clock(T0)).lookup([MARIA])

    assert people[MARIA].name == "Maria Jones"
    assert json.loads((tmp_path / CACHE_FILE).read_text(encoding="utf-8"))["version"] == 1


GUEST = "gina.guest@partner.org"
RENAMED = "asha.patel@contoso.org"


def test_guests_and_renamed_users_are_found_by_mail(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """/users/{x} takes an id or UPN only: a guest or a renamed user is found by mail instead."""
    fake_graph.add_person(
        GUEST, "Gina Guest", upn="gina.guest_partner.org#EXT#@contoso.onmicrosoft.com",
        manager=MARIA,
    )  # fmt: skip
    # Renamed: the mail address changed, the UPN (sign-in name) did not.
    fake_graph.add_person(RENAMED, "Asha Patel", upn="akhan@contoso.org", mobile="07700 900777")

    people = GraphDirectory(client, tmp_path, Clock(T0)).lookup([GUEST, RENAMED, BEN])

    assert people[GUEST] == Person(GUEST, "Gina Guest", GUEST, "", MARIA)
    assert people[RENAMED].mobile == "07700 900777" and people[RENAMED].manager_id is None
    assert people[BEN].name == "Ben Okafor"
    filters = [r.query["$filter"] for r in fake_graph.requests if "$filter" in r.query]
    assert sorted(filters) == [f"mail eq '{RENAMED}'", f"mail eq '{GUEST}'"]


def test_mail_filter_escapes_quotes(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """An address with an apostrophe is quoted for OData ('' inside the string)."""
    fake_graph.add_person("o'brien@partner.org", "Sean O'Brien", upn="obrien_partner#EXT#@x.org")

    people = GraphDirectory(client, tmp_path, Clock(T0)).lookup(["o'brien@partner.org"])

    assert people["o'brien@partner.org"].name == "Sean O'Brien"
    assert [r.query["$filter"] for r in fake_graph.requests if "$filter" in r.query] == [
        "mail eq 'o''brien@partner.org'"
    ]


def test_people_not_matched_are_counted(
    fake_graph: FakeGraph, client: GraphClient, tmp_path: Path
) -> None:
    """Ids found neither by UPN nor by mail are reported as a count, without their addresses."""
    directory = GraphDirectory(client, tmp_path, Clock(T0))
    with capture_logs() as logs:
        people = directory.lookup([ASHA, "nobody@contoso.org", "family@example.com"])

    assert list(people) == [ASHA]
    assert directory.unmatched == 2
    [event] = [e for e in logs if e["event"] == "directory.not_matched"]
    assert event["log_level"] == "warning" and event["count"] == 2
    assert "nobody" not in json.dumps(event) and "family@" not in json.dumps(event)
