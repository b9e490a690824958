"""GraphCalendarSource against Graph's documented answers, mocked with ``responses``.

Graph cannot be reached from the tests: every request is answered by hand-written payloads
shaped like those in Microsoft's documentation, and the tests assert both on what was sent
(URLs, query, Prefer, Authorization, $batch bodies) and on the CalendarEvents that come out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
import responses
from responses import matchers

from tests.connector_settings import config_problems
from tests.graph_mock import (
    ASHA,
    CLIENT,
    GOID,
    GRAPH,
    LOGIN,
    TENANT,
    TOKEN,
    add_discovery,
    add_token,
    jwt,
    view_url,
)
from tests.graph_server import FakeGraph
from tests.graph_server import graph_event as fake_event
from visitwatch.connectors import graph_client
from visitwatch.connectors.graph import WRITE_BACK_CATEGORIES, GraphCalendarSource
from visitwatch.core.calendar import Attendee, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConnectorContext, validate_options
from visitwatch.policies.extraction import category_key
from visitwatch.policies.model import PolicySettings

BEN = "ben.okafor@contoso.org"
VISITS = "home-visits@contoso.org"

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)  # Europe/London on GMT
WINDOW = TimeWindow.around(T0, timedelta(days=1), timedelta(days=14))
SUMMER = datetime(2026, 7, 14, 12, 0, tzinfo=UTC)  # Europe/London on BST
SUMMER_WINDOW = TimeWindow.around(SUMMER, timedelta(days=1), timedelta(days=14))


def gtime(text: str, zone: str = "UTC") -> dict[str, str]:
    return {"dateTime": f"{text}.0000000", "timeZone": zone}


def person(email: str, name: str = "", response: str = "none", kind: str = "required") -> dict:
    return {
        "type": kind,
        "status": {"response": response, "time": "0001-01-01T00:00:00Z"},
        "emailAddress": {"name": name, "address": email},
    }


def gevent(
    graph_id: str,
    start: str = "2026-11-23T13:00:00",
    end: str | None = "2026-11-23T14:00:00",
    **fields: Any,
) -> dict[str, Any]:
    """A Graph event resource as calendarView returns it with Prefer UTC and text body."""
    event: dict[str, Any] = {
        "@odata.etag": f'W/"{graph_id}-etag"',
        "id": graph_id,
        "iCalUId": f"{GOID}00000000{graph_id.encode().hex().upper():0<16}",
        "changeKey": f"{graph_id}-ck1",
        "lastModifiedDateTime": "2026-11-20T09:30:12.3456789Z",
        "type": "singleInstance",
        "seriesMasterId": None,
        "subject": "Home visit - Carter family",
        "bodyPreview": "Risk assessment: complete",
        "body": {
            "contentType": "text",
            "content": "Risk assessment: complete\r\nMobile: 07700 900123",
        },
        "start": gtime(start),
        "end": gtime(end) if end else None,
        "isAllDay": False,
        "isCancelled": False,
        "sensitivity": "normal",
        "showAs": "busy",
        "categories": ["Home Visit"],
        "location": {
            "displayName": "14 Brook Street",
            "locationType": "default",
            "address": {"street": "14 Brook Street", "city": "Preston", "postalCode": "PR1 3XX"},
        },
        "locations": [{"displayName": "14 Brook Street", "locationType": "default"}],
        "organizer": {"emailAddress": {"name": "Asha Khan", "address": ASHA}},
        "attendees": [],
    }
    event.update(fields)
    return event


def page(*events: dict[str, Any], next_link: str = "", delta_link: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"@odata.context": f"{GRAPH}/$metadata#Collection(event)"}
    body["value"] = list(events)
    if next_link:
        body["@odata.nextLink"] = next_link
    if delta_link:
        body["@odata.deltaLink"] = delta_link
    return body


def graph_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def fresh_range(request: Any) -> tuple[bool, str]:
    """A responses matcher: the first request of a read (not a next or delta link)."""
    ok = "startDateTime" in query(request.url)
    return ok, "" if ok else "not a first page"


def graph_calls(mock: responses.RequestsMock) -> list[Any]:
    return [c for c in mock.calls if c.request.url.startswith(GRAPH)]


def first_delta_round(mock: responses.RequestsMock, *events: dict[str, Any]) -> str:
    """A token, and a first delta round holding ``events``; returns the round's deltaLink."""
    add_token(mock)
    link = f"{view_url(delta=True)}?$deltatoken=round2"
    mock.get(view_url(delta=True), json=page(*events, delta_link=link), match=[fresh_range])
    return link


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> Callable[..., GraphCalendarSource]:
    monkeypatch.setenv("VW_GRAPH_SECRET", "not-a-real-secret")

    def build(zone: str = "Europe/London", **table: Any) -> GraphCalendarSource:
        full = {
            "tenant_id": TENANT,
            "client_id": CLIENT,
            "client_secret": {"env": "VW_GRAPH_SECRET"},
            "mailboxes": [ASHA],
            **table,
        }
        settings, problems = validate_options(
            full, GraphCalendarSource.options, "sources[0]", tmp_path
        )
        assert problems == []
        context = ConnectorContext(
            timezone=ZoneInfo(zone),
            state_dir=tmp_path / "state",
            config_dir=tmp_path,
            user_agent="visitwatch-test",
        )
        source = GraphCalendarSource("outlook", settings, context)
        source.client._sleep = sleeps.append  # no waiting; the waits are asserted instead
        source.client._jitter = lambda: 0.0
        return source

    return build


def by_subject(result: FetchResult) -> dict[str, Any]:
    return {e.subject: e for e in result.events}


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"page_size": 0}, "page_size", "1 or more"),
        ({"page_size": 1001}, "page_size", "1000 or less"),
        ({"mailboxes": [" "]}, "mailboxes", "empty"),
        ({"certificate": "graph.pem"}, "client_secret", "exactly one"),
    ],
)
def test_settings_graph_cannot_honour_are_config_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], key: str, words: str
) -> None:
    """A page size Graph refuses, no mailbox, or two credentials: one problem naming the key."""
    monkeypatch.setenv("VW_GRAPH_SECRET", "not-a-real-secret")
    table = {
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": {"env": "VW_GRAPH_SECRET"},
        "mailboxes": [ASHA],
        **extra,
    }
    problems = config_problems(GraphCalendarSource, table, tmp_path, "sources[0]")
    assert len(problems) == 1, problems
    assert problems[0].key.endswith(key) and words in str(problems[0])


# --------------------------------------------------------------------------- full reads


def test_full_read_follows_next_link_and_sends_the_documented_request(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """A full calendarView read sends UTC window, $select and Prefer, and follows nextLink."""
    add_token(mock)
    second = f"{view_url()}?$skiptoken=page2"
    mock.get(view_url(), json=page(gevent("AAMk1"), next_link=second), match=[fresh_range])
    mock.get(second, json=page(gevent("AAMk2", subject="Home visit - Smith")))
    source = make_source(delta=False, page_size=50)

    result = source.fetch(WINDOW)

    calls = graph_calls(mock)
    assert [urlsplit(c.request.url).path for c in calls] == [
        f"/v1.0/users/{ASHA}/calendarView",
        f"/v1.0/users/{ASHA}/calendarView",
    ]
    first = calls[0].request
    params = query(first.url)
    assert params["startDateTime"] == ["2026-11-22T12:00:00Z"]
    assert params["endDateTime"] == ["2026-12-07T12:00:00Z"]
    selected = set(params["$select"][0].split(","))
    assert {"subject", "body", "start", "end", "attendees", "iCalUId", "changeKey"} <= selected
    prefer = first.headers["Prefer"]
    assert 'outlook.timezone="UTC"' in prefer
    assert 'outlook.body-content-type="text"' in prefer
    assert "odata.maxpagesize=50" in prefer
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    assert calls[1].request.url == second
    assert calls[1].request.headers["Prefer"] == prefer

    assert result.complete and result.problems == []
    assert [e.subject for e in result.events] == [
        "Home visit - Carter family",
        "Home visit - Smith",
    ]
    visit = result.events[0]
    assert visit.start == datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
    assert visit.end == datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
    assert visit.owner == ASHA
    assert visit.recurrence_id == ""
    assert visit.description == "Risk assessment: complete\nMobile: 07700 900123"
    assert visit.location == "14 Brook Street, Preston, PR1 3XX"
    assert visit.categories == ("Home Visit",)
    assert visit.organizer == ASHA
    assert visit.last_modified == datetime(2026, 11, 20, 9, 30, 12, 345678, tzinfo=UTC)
    assert visit.source == "outlook"


def test_attendees_are_mapped_with_responses_and_roles(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Attendee e-mail is lower-cased, Graph's responses and types become ours."""
    add_token(mock)
    attendees = [
        person("Ben.Okafor@Contoso.org", "Ben Okafor", "tentativelyAccepted"),
        person("maria@contoso.org", "Maria", "accepted", "optional"),
        person("car-1@contoso.org", "Pool car", "notResponded", "resource"),
        person("sam@contoso.org", "Sam", "declined"),
    ]
    mock.get(view_url(), json=page(gevent("AAMk1", attendees=attendees)))
    result = make_source(delta=False).fetch(WINDOW)
    assert result.events[0].attendees == (
        Attendee("ben.okafor@contoso.org", "Ben Okafor", "tentative", "required"),
        Attendee("maria@contoso.org", "Maria", "accepted", "optional"),
        Attendee("car-1@contoso.org", "Pool car", "needs-action", "resource"),
        Attendee("sam@contoso.org", "Sam", "declined", "required"),
    )


def test_same_content_gives_the_same_fingerprint_and_unchanged(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """A second read with the same ids and changeKeys reports unchanged with no events."""
    add_token(mock)
    mock.get(view_url(), json=page(gevent("AAMk1")))
    source = make_source(delta=False)
    first = source.fetch(WINDOW)
    later = TimeWindow(WINDOW.start + timedelta(minutes=5), WINDOW.end + timedelta(minutes=5))
    again = source.fetch(later, known=first.fingerprint)
    assert again.unchanged and again.events == []
    assert again.fingerprint == first.fingerprint


# --------------------------------------------------------------------------- delta


def test_delta_rounds_apply_changes_and_only_deleted_removals(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Round 1 is a full delta; round 2 updates, deletes on "deleted" (the one reason Graph
    documents for events) and re-reads on any other (OData's "changed"), keeping the entry."""
    add_token(mock)
    skip = f"{view_url(delta=True)}?$skiptoken=page2"
    link1 = f"{view_url(delta=True)}?$deltatoken=round2"
    link2 = f"{view_url(delta=True)}?$deltatoken=round3"
    mock.get(
        view_url(delta=True),
        json=page(gevent("AAMk1"), gevent("AAMk2", subject="Visit two"), next_link=skip),
        match=[
            matchers.query_param_matcher(
                {"startDateTime": "2026-11-22T00:00:00Z", "endDateTime": "2026-12-08T00:00:00Z"}
            )
        ],
    )
    mock.get(
        skip,
        json=page(gevent("AAMk3", subject="Visit three"), delta_link=link1),
    )
    moved = gevent("AAMk1", "2026-11-24T10:00:00", "2026-11-24T11:00:00", changeKey="AAMk1-ck2")
    mock.get(
        link1,
        json=page(
            moved,
            {"id": "AAMk2", "@removed": {"reason": "deleted"}},
            {"id": "AAMk3", "@removed": {"reason": "changed"}},
            delta_link=link2,
        ),
    )
    # Where did AAMk3 go? Still in the window: it must stay a visit.
    recheck = f"{GRAPH}/users/{ASHA}/events/AAMk3"
    mock.get(
        recheck,
        json=gevent("AAMk3", "2026-11-25T09:00:00", "2026-11-25T10:00:00", subject="Visit three"),
    )
    source = make_source()

    first = source.fetch(WINDOW)
    assert sorted(e.subject for e in first.events) == [
        "Home visit - Carter family",
        "Visit three",
        "Visit two",
    ]
    request = graph_calls(mock)[0].request
    assert "$select" not in query(request.url)  # calendarView/delta does not take $select
    assert "odata.maxpagesize=200" in request.headers["Prefer"]

    second = source.fetch(WINDOW, known=first.fingerprint)
    assert graph_calls(mock)[2].request.url == link1
    events = by_subject(second)
    assert set(events) == {"Home visit - Carter family", "Visit three"}
    assert events["Home visit - Carter family"].start == datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert events["Visit three"].start == datetime(2026, 11, 25, 9, tzinfo=UTC)
    recheck_call = next(c for c in graph_calls(mock) if c.request.url.startswith(recheck))
    assert "$select" in query(recheck_call.request.url)
    assert 'outlook.timezone="UTC"' in recheck_call.request.headers["Prefer"]
    assert second.complete

    # The next round continues from the newest deltaLink.
    mock.get(link2, json=page(delta_link=link2))
    third = source.fetch(WINDOW, known=second.fingerprint)
    assert graph_calls(mock)[-1].request.url == link2
    assert third.unchanged


def test_changed_removal_of_an_unreadable_event_keeps_the_visit(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """A removal not marked "deleted" (OData's "changed", which Graph does not document for
    events) never ends a visit unless Graph says the event is gone (404)."""
    link = first_delta_round(mock, gevent("AAMk1"), gevent("AAMk2", subject="Gone"))
    mock.get(
        link,
        json=page(
            {"id": "AAMk1", "@removed": {"reason": "changed"}},
            {"id": "AAMk2", "@removed": {"reason": "changed"}},
            delta_link=link,
        ),
    )
    mock.get(
        f"{GRAPH}/users/{ASHA}/events/AAMk1",
        status=500,
        json=graph_error("InternalServerError", "try later"),
    )
    mock.get(
        f"{GRAPH}/users/{ASHA}/events/AAMk2",
        status=404,
        json=graph_error("ErrorItemNotFound", "The specified object was not found."),
    )
    source = make_source()
    source.fetch(WINDOW)
    result = source.fetch(WINDOW)
    assert [e.subject for e in result.events] == ["Home visit - Carter family"]


def test_delta_state_survives_a_restart(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """The deltaLink and events are kept in state_dir: a new instance continues the round."""
    link = first_delta_round(mock, gevent("AAMk1"))
    mock.get(link, json=page(delta_link=link))
    make_source().fetch(WINDOW)
    graph_client._clients.clear()

    result = make_source().fetch(WINDOW)

    assert graph_calls(mock)[-1].request.url == link
    assert [e.subject for e in result.events] == ["Home visit - Carter family"]


def test_window_moving_to_a_new_day_starts_a_new_delta_round(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """A delta round is bound to its date range: the next day asks for a fresh range."""
    first_delta_round(mock, gevent("AAMk1"))
    source = make_source()
    source.fetch(WINDOW)
    tomorrow = TimeWindow(WINDOW.start + timedelta(days=1), WINDOW.end + timedelta(days=1))
    source.fetch(tomorrow)
    last = graph_calls(mock)[-1].request
    assert query(last.url) == {
        "startDateTime": ["2026-11-23T00:00:00Z"],
        "endDateTime": ["2026-12-09T00:00:00Z"],
    }


def test_expired_delta_token_falls_back_to_a_full_read(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """410 SyncStateNotFound: read calendarView in full now, a fresh delta round next time."""
    add_token(mock)
    link = f"{view_url(delta=True)}?$deltatoken=old"
    fresh = {"startDateTime": "2026-11-22T00:00:00Z", "endDateTime": "2026-12-08T00:00:00Z"}
    mock.get(
        view_url(delta=True),
        json=page(gevent("AAMk1"), delta_link=link),
        match=[matchers.query_param_matcher(fresh)],
    )
    mock.get(
        link,
        status=410,
        json=graph_error("SyncStateNotFound", "The sync state generation is not found."),
    )
    mock.get(view_url(), json=page(gevent("AAMk1"), gevent("AAMk9", subject="New visit")))
    source = make_source()
    source.fetch(WINDOW)

    result = source.fetch(WINDOW)

    urls = [c.request.url for c in graph_calls(mock)]
    assert urls[1] == link
    assert urlsplit(urls[2]).path == f"/v1.0/users/{ASHA}/calendarView"
    assert "$select" in query(urls[2])
    assert {e.subject for e in result.events} == {"Home visit - Carter family", "New visit"}
    assert result.complete

    source.fetch(WINDOW)
    assert query(graph_calls(mock)[-1].request.url) == {k: [v] for k, v in fresh.items()}


@pytest.mark.parametrize("code", ["SyncStateNotFound", "syncStateNotFound", "resyncRequired"])
def test_expired_delta_code_is_recognised_in_any_case(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource], code: str
) -> None:
    """An expired round named by its code alone (400), in Graph's spellings: a full read."""
    add_token(mock)
    link = f"{view_url(delta=True)}?$deltatoken=old"
    mock.get(view_url(delta=True), json=page(gevent("AAMk1"), delta_link=link))
    mock.get(link, status=400, json=graph_error(code, "The sync state is not found."))
    mock.get(view_url(), json=page(gevent("AAMk1"), gevent("AAMk9", subject="New visit")))
    source = make_source()
    source.fetch(WINDOW)

    result = source.fetch(WINDOW)

    assert result.complete and result.problems == []
    assert {e.subject for e in result.events} == {"Home visit - Carter family", "New visit"}


def test_calendar_refusing_delta_is_read_in_full_from_then_on(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """400 ErrorInvalidRequest on calendarView/delta: full reads for that calendar afterwards."""
    add_token(mock)
    mock.get(
        view_url(delta=True),
        status=400,
        json=graph_error("ErrorInvalidRequest", "Delta is not supported for this calendar."),
    )
    mock.get(view_url(), json=page(gevent("AAMk1")))
    source = make_source()
    assert len(source.fetch(WINDOW).events) == 1
    assert len(source.fetch(WINDOW).events) == 1
    paths = [urlsplit(c.request.url).path for c in graph_calls(mock)]
    assert paths == [
        f"/v1.0/users/{ASHA}/calendarView/delta",
        f"/v1.0/users/{ASHA}/calendarView",
        f"/v1.0/users/{ASHA}/calendarView",
    ]


# --------------------------------------------------------------------------- many mailboxes


def test_batch_reads_three_mailboxes_judging_each_answer(
    mock: responses.RequestsMock,
    make_source: Callable[..., GraphCalendarSource],
    sleeps: list[float],
) -> None:
    """$batch: 200 pages on, 404 becomes a problem naming the mailbox, 429 is sent again."""
    add_token(mock)
    next_a = f"{view_url(ASHA)}?$skiptoken=a2"
    mock.post(
        f"{GRAPH}/$batch",
        json={
            "responses": [
                {
                    "id": "0",
                    "status": 200,
                    "headers": {},
                    "body": page(gevent("A1"), next_link=next_a),
                },
                {
                    "id": "1",
                    "status": 404,
                    "headers": {},
                    "body": graph_error("ErrorInvalidUser", "The requested user is invalid."),
                },
                {"id": "2", "status": 429, "headers": {"Retry-After": "3"}, "body": {}},
            ]
        },
    )
    mock.post(
        f"{GRAPH}/$batch",
        json={
            "responses": [
                {
                    "id": "2",
                    "status": 200,
                    "headers": {},
                    "body": page(gevent("C1", subject="Visit C", organizer=None)),
                }
            ]
        },
    )
    mock.get(next_a, json=page(gevent("A2", subject="Visit A2")))
    missing = "nobody@contoso.org"
    source = make_source(delta=False, mailboxes=[ASHA, missing, BEN])

    result = source.fetch(WINDOW)

    batches = [c for c in mock.calls if c.request.url == f"{GRAPH}/$batch"]
    assert len(batches) == 2
    sent = json.loads(batches[0].request.body)["requests"]
    assert [r["id"] for r in sent] == ["0", "1", "2"]
    assert [r["method"] for r in sent] == ["GET"] * 3
    assert [urlsplit(r["url"]).path for r in sent] == [
        f"/users/{ASHA}/calendarView",
        f"/users/{missing}/calendarView",
        f"/users/{BEN}/calendarView",
    ]
    assert all('outlook.timezone="UTC"' in r["headers"]["Prefer"] for r in sent)
    assert query(sent[0]["url"])["startDateTime"] == ["2026-11-22T12:00:00Z"]
    assert [r["id"] for r in json.loads(batches[1].request.body)["requests"]] == ["2"]
    assert sleeps == [3.0]
    assert graph_calls(mock)[-1].request.url == next_a

    assert {(e.subject, e.owner) for e in result.events} == {
        ("Home visit - Carter family", ASHA),
        ("Visit A2", ASHA),
        ("Visit C", BEN),
    }
    assert not result.complete  # nobody's entries are unknown, not removed
    assert len(result.problems) == 1
    assert result.problems[0].uid == ""
    assert result.problems[0].reason.startswith(f"mailbox {missing}: not found")


def test_every_mailbox_failing_raises(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """When no mailbox can be read the fetch raises, with the first mailbox's reason."""
    add_token(mock)
    denied = {
        "status": 403,
        "headers": {},
        "body": graph_error("ErrorAccessDenied", "Access is denied. Check credentials."),
    }
    mock.post(
        f"{GRAPH}/$batch",
        json={"responses": [{"id": "0", **denied}, {"id": "1", **denied}]},
    )
    source = make_source(delta=False, mailboxes=[ASHA, BEN])
    with pytest.raises(ConnectorError) as caught:
        source.fetch(WINDOW)
    assert f"mailbox {ASHA}: access denied" in str(caught.value)
    assert caught.value.permanent


def test_access_denied_mailbox_names_the_policy_to_check(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """403 ErrorAccessDenied for one mailbox: a problem pointing at access policy / RBAC."""
    add_token(mock)
    mock.post(
        f"{GRAPH}/$batch",
        json={
            "responses": [
                {"id": "0", "status": 200, "headers": {}, "body": page(gevent("A1"))},
                {
                    "id": "1",
                    "status": 403,
                    "headers": {},
                    "body": graph_error("ErrorAccessDenied", "Access is denied."),
                },
            ]
        },
    )
    result = make_source(delta=False, mailboxes=[ASHA, BEN]).fetch(WINDOW)
    assert len(result.events) == 1 and not result.complete
    reason = result.problems[0].reason
    assert reason.startswith(f"mailbox {BEN}: access denied")
    assert "application access policy" in reason and "RBAC" in reason


def test_single_mailbox_access_denied_raises_with_the_fix(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """One mailbox and a plain 403: ConnectorError that says what to check."""
    add_token(mock)
    mock.get(view_url(), status=403, json=graph_error("ErrorAccessDenied", "Access is denied."))
    with pytest.raises(ConnectorError, match="RBAC for Applications"):
        make_source(delta=False).fetch(WINDOW)


def test_throttled_request_waits_for_retry_after(
    mock: responses.RequestsMock,
    make_source: Callable[..., GraphCalendarSource],
    sleeps: list[float],
) -> None:
    """429 with Retry-After: the client sleeps that long and the retry's answer is used."""
    add_token(mock)
    mock.get(
        view_url(),
        status=429,
        headers={"Retry-After": "7"},
        json=graph_error("ApplicationThrottled", "Too many requests"),
    )
    mock.get(view_url(), json=page(gevent("AAMk1")))
    result = make_source(delta=False).fetch(WINDOW)
    assert sleeps == [7.0]
    assert len(result.events) == 1
    assert len(graph_calls(mock)) == 2


def test_wrong_client_secret_raises_with_the_fix(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Entra's AADSTS7000215 becomes a ConnectorError saying the secret is wrong."""
    add_discovery(mock)
    mock.post(
        f"{LOGIN}/oauth2/v2.0/token",
        status=400,
        json={
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the "
            "secret being sent in the request is the client secret value, not the client "
            "secret ID.\r\nTrace ID: 0000",
            "error_codes": [7000215],
        },
    )
    with pytest.raises(ConnectorError) as caught:
        make_source().fetch(WINDOW)
    assert "client secret is wrong" in str(caught.value)
    assert caught.value.permanent
    assert graph_calls(mock) == []


# --------------------------------------------------------------------------- mapping


def test_private_entries_are_flagged_unless_private_details(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """sensitivity private/confidential sets private; private_details = true turns it off."""
    add_token(mock)
    mock.get(
        view_url(),
        json=page(
            gevent("P1", subject="Private one", sensitivity="private"),
            gevent("P2", subject="Confidential one", sensitivity="confidential"),
            gevent("P3", subject="Personal one", sensitivity="personal"),
        ),
    )
    flags = {e.subject: e.private for e in make_source(delta=False).fetch(WINDOW).events}
    assert flags == {"Private one": True, "Confidential one": True, "Personal one": False}
    graph_client._clients.clear()
    relaxed = make_source(delta=False, private_details=True).fetch(WINDOW)
    assert not any(e.private for e in relaxed.events)


def test_all_day_entries_start_at_local_midnight(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """All-day entries run from midnight Europe/London, in GMT (November) and BST (July)."""
    add_token(mock)
    winter = gevent("D1", "2026-11-24T00:00:00", "2026-11-25T00:00:00", isAllDay=True)
    summer = gevent(
        "D2", "2026-07-15T00:00:00", "2026-07-17T00:00:00", isAllDay=True, subject="Summer"
    )
    mock.get(view_url(), json=page(winter, summer))
    source = make_source(delta=False)
    event = source.fetch(WINDOW).events[0]
    assert event.all_day
    assert (event.start, event.end) == (
        datetime(2026, 11, 24, 0, 0, tzinfo=UTC),
        datetime(2026, 11, 25, 0, 0, tzinfo=UTC),
    )
    event = source.fetch(SUMMER_WINDOW).events[0]
    assert event.subject == "Summer" and event.all_day
    assert (event.start, event.end) == (
        datetime(2026, 7, 14, 23, 0, tzinfo=UTC),
        datetime(2026, 7, 16, 23, 0, tzinfo=UTC),
    )


def test_windows_time_zone_names_are_converted(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """start/end in "GMT Standard Time" during BST are read as UTC+1, so 10:00 is 09:00Z."""
    add_token(mock)
    event = gevent("W1", start="", end="")
    event["start"] = gtime("2026-07-15T10:00:00", "GMT Standard Time")
    event["end"] = gtime("2026-07-15T11:30:00", "GMT Standard Time")
    mock.get(view_url(), json=page(event))
    visit = make_source(delta=False).fetch(SUMMER_WINDOW).events[0]
    assert visit.start == datetime(2026, 7, 15, 9, 0, tzinfo=UTC)
    assert visit.end == datetime(2026, 7, 15, 10, 30, tzinfo=UTC)


def test_series_occurrences_and_an_exception_have_their_own_recurrence_ids(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Occurrences share the series uid; the moved exception keeps its original start as id."""
    add_token(mock)
    series = "AAMkSERIES"

    def occurrence(graph_id: str, day: str, kind: str, start: str, end: str) -> dict:
        return gevent(
            graph_id,
            start,
            end,
            type=kind,
            seriesMasterId=series,
            originalStart=f"{day}T09:00:00Z",
            # Outlook puts the occurrence's date into its iCalUId.
            iCalUId=f"{GOID}{day.replace('-', '')[:8]}ABCDEF0123456789",
        )

    mock.get(
        view_url(),
        json=page(
            occurrence(
                "O1", "2026-11-24", "occurrence", "2026-11-24T09:00:00", "2026-11-24T10:00:00"
            ),
            occurrence(
                "O2", "2026-12-01", "exception", "2026-12-01T15:00:00", "2026-12-01T16:00:00"
            ),
            gevent("M1", type="seriesMaster"),
        ),
    )
    events = make_source(delta=False).fetch(WINDOW).events
    assert len(events) == 2  # the series master is not an occurrence
    assert events[0].uid == events[1].uid == f"{GOID}00000000ABCDEF0123456789"
    assert [e.recurrence_id for e in events] == [
        "2026-11-24T09:00:00+00:00",
        "2026-12-01T09:00:00+00:00",
    ]
    assert events[1].start == datetime(2026, 12, 1, 15, 0, tzinfo=UTC)


def test_shared_mailbox_leaves_the_owner_to_the_attendees(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """shared = true: owner is "", the mailbox itself is not an attendee, the worker is."""
    add_token(mock)
    visit = gevent(
        "S1",
        organizer={"emailAddress": {"name": "Home visits", "address": "Home-Visits@contoso.org"}},
        attendees=[
            person("Home-Visits@contoso.org", "Home visits", "organizer"),
            person(ASHA, "Asha Khan", "accepted"),
        ],
    )
    mock.get(view_url(VISITS), json=page(visit))
    event = make_source(delta=False, shared=True, mailboxes=[VISITS]).fetch(WINDOW).events[0]
    assert event.owner == ""
    assert event.attendees == (Attendee(ASHA, "Asha Khan", "accepted", "required"),)
    assert event.organizer == VISITS


def test_a_malformed_event_is_a_problem_and_the_rest_come_through(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Missing start or an unreadable dateTime: EventProblem for that uid, others continue."""
    add_token(mock)
    no_start = gevent("B1", subject="No start")
    no_start["start"] = None
    garbled = gevent("B2", subject="Garbled")
    garbled["end"] = {"dateTime": "next tuesday", "timeZone": "UTC"}
    mock.get(view_url(), json=page(no_start, garbled, gevent("G1")))
    result = make_source(delta=False).fetch(WINDOW)
    assert [e.subject for e in result.events] == ["Home visit - Carter family"]
    assert result.complete
    assert {p.uid for p in result.problems} == {no_start["iCalUId"], garbled["iCalUId"]}
    assert any("no start time" in p.reason for p in result.problems)
    assert any("unreadable time" in p.reason for p in result.problems)


def test_named_calendars_are_resolved_and_a_missing_one_is_a_problem(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """calendars = [...]: names resolve to ids; an unknown name is reported, others read."""
    add_token(mock)
    mock.get(
        f"{GRAPH}/users/{ASHA}/calendars",
        json={"value": [{"id": "CAL-1", "name": "Calendar"}, {"id": "CAL-2", "name": "Visits"}]},
    )
    mock.get(f"{GRAPH}/users/{ASHA}/calendars/CAL-2/calendarView", json=page(gevent("V1")))
    source = make_source(delta=False, calendars=["visits", "Lone working"])
    result = source.fetch(WINDOW)
    assert len(result.events) == 1 and not result.complete
    assert result.problems[0].uid == ""
    assert result.problems[0].reason.startswith(f"mailbox {ASHA}: no calendar named 'Lone working'")
    listing = [c for c in graph_calls(mock) if urlsplit(c.request.url).path.endswith("/calendars")]
    assert query(listing[0].request.url)["$select"] == ["id,name"]


def test_calendar_ids_are_looked_up_once(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """When every configured calendar is found, the list is not asked for again."""
    add_token(mock)
    mock.get(f"{GRAPH}/users/{ASHA}/calendars", json={"value": [{"id": "CAL-2", "name": "Visits"}]})
    mock.get(f"{GRAPH}/users/{ASHA}/calendars/CAL-2/calendarView", json=page(gevent("V1")))
    source = make_source(delta=False, calendars=["Visits"])
    source.fetch(WINDOW)
    assert len(source.fetch(WINDOW).events) == 1
    paths = [urlsplit(c.request.url).path for c in graph_calls(mock)]
    assert paths.count(f"/v1.0/users/{ASHA}/calendars") == 1


def test_delta_links_of_several_mailboxes_go_through_one_batch(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """Round 2 for two mailboxes: their deltaLinks are sent relative, in one $batch."""
    add_token(mock)
    links = {m: f"{view_url(m, delta=True)}?$deltatoken={m[:4]}" for m in (ASHA, BEN)}
    first = {
        "responses": [
            {"id": "0", "status": 200, "body": page(gevent("A1"), delta_link=links[ASHA])},
            {"id": "1", "status": 200, "body": page(gevent("B1"), delta_link=links[BEN])},
        ]
    }
    second = {
        "responses": [
            {"id": "1", "status": 200, "body": page(delta_link=links[BEN])},
            {
                "id": "0",
                "status": 410,
                "body": graph_error("syncStateNotFound", "sync state not found"),
            },
        ]
    }
    mock.post(f"{GRAPH}/$batch", json=first)
    mock.post(f"{GRAPH}/$batch", json=second)
    mock.get(view_url(ASHA), json=page(gevent("A1")))
    source = make_source(mailboxes=[ASHA, BEN])
    source.fetch(WINDOW)
    result = source.fetch(WINDOW)

    batches = [json.loads(c.request.body) for c in mock.calls if c.request.url.endswith("$batch")]
    assert [urlsplit(r["url"]).path for r in batches[0]["requests"]] == [
        f"/users/{ASHA}/calendarView/delta",
        f"/users/{BEN}/calendarView/delta",
    ]
    assert [r["url"] for r in batches[1]["requests"]] == [
        f"/users/{ASHA}/calendarView/delta?$deltatoken=asha",
        f"/users/{BEN}/calendarView/delta?$deltatoken=ben.",
    ]
    # Asha's expired round was replaced by a full read; Ben's events came from the store.
    assert sorted(e.owner for e in result.events) == [ASHA, BEN]
    assert result.complete


# --------------------------------------------------------------------------- write_back


def test_write_back_patches_our_category_only(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """write_back swaps our label, keeping the user's own, on the event's mailbox."""
    add_token(mock)
    mock.get(view_url(), json=page(gevent("AAMk1", categories=["Home Visit"])))
    mock.get(
        f"{GRAPH}/users/{ASHA}/events/AAMk1",
        json={"id": "AAMk1", "categories": ["Home Visit", "visitwatch: overdue"]},
    )
    mock.patch(f"{GRAPH}/users/{ASHA}/events/AAMk1", json={})
    source = make_source(delta=False, write_back=True)
    event = source.fetch(WINDOW).events[0]

    source.write_back(event.uid, event.recurrence_id, "resolved")
    source.write_back("unknown-uid", "", "overdue")  # not from the last fetch: nothing sent

    patches = [c for c in mock.calls if c.request.method == "PATCH"]
    assert len(patches) == 1
    assert json.loads(patches[0].request.body) == {"categories": ["Home Visit", "visitwatch: safe"]}
    assert patches[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


# write_back against FakeGraph over TLS: the worker's own categories must survive.


@pytest.fixture
def fake_graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    return start_fake_graph(roles=("Calendars.ReadWrite",), enforce_roles=True)


def fake_source(graph: FakeGraph, tmp_path: Path, **extra: Any) -> GraphCalendarSource:
    table = graph.config_table("VW_FAKE_GRAPH_SECRET", mailboxes=[ASHA], **extra)
    settings, problems = validate_options(table, GraphCalendarSource.options, "s", tmp_path)
    assert problems == [], [str(p) for p in problems]
    context = ConnectorContext(ZoneInfo("Europe/London"), tmp_path / "state", tmp_path, "vw")
    source = GraphCalendarSource("outlook", settings, context)
    source.client._sleep = lambda seconds: None
    return source


def categories_on(graph: FakeGraph, event_id: str) -> list[str]:
    with graph.lock:
        return list(next(e for e in graph.events[ASHA] if e["id"] == event_id)["categories"])


def written_visit(graph: FakeGraph, tmp_path: Path) -> tuple[GraphCalendarSource, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    graph.add_event(ASHA, fake_event("v1", "Home visit", now - timedelta(hours=1), now))
    source = fake_source(graph, tmp_path, write_back=True)
    window = TimeWindow.around(now, timedelta(days=1), timedelta(days=1))
    [event] = source.fetch(window).events
    return source, event


def test_write_back_keeps_a_help_category_set_after_the_last_poll(
    fake_graph: FakeGraph, tmp_path: Path
) -> None:
    """ "Help" set in Outlook since the last poll survives the "overdue" mark (read, then merged)."""
    source, event = written_visit(fake_graph, tmp_path)
    fake_graph.update_event(ASHA, "v1", categories=["Home Visit", "Help"])

    source.write_back(event.uid, event.recurrence_id, "overdue")

    assert categories_on(fake_graph, "v1") == ["Home Visit", "Help", "visitwatch: overdue"]
    [read] = [
        r for r in fake_graph.requests_to("GET", f"/v1.0/users/{ASHA}/events/v1")
        if r.query.get("$select") == "categories"
    ]  # fmt: skip
    assert fake_graph.requests.index(read) < fake_graph.requests.index(
        fake_graph.requests_to("PATCH", f"/v1.0/users/{ASHA}/events/v1")[0]
    )


def test_write_back_replaces_only_its_own_labels(fake_graph: FakeGraph, tmp_path: Path) -> None:
    """Overdue, escalated, safe, re-opened: each replaces visitwatch's label, nothing else."""
    source, event = written_visit(fake_graph, tmp_path)
    # The worker's "Safe", and categories that look like ours but were set by people.
    mine = ["Home Visit", "Safe", "Overdue", "Checked in", "Escalated"]
    fake_graph.update_event(ASHA, "v1", categories=mine)

    seen = []
    for state in ("overdue", "escalated", "resolved", "in_progress"):
        source.write_back(event.uid, event.recurrence_id, state)
        seen.append(categories_on(fake_graph, "v1"))

    assert seen == [
        [*mine, "visitwatch: overdue"],
        [*mine, "visitwatch: escalated"],
        [*mine, "visitwatch: safe"],
        mine,
    ]


def test_write_back_labels_are_not_check_in_or_help_categories() -> None:
    """No label visitwatch writes can be read back as a check-in or a help request."""
    defaults = PolicySettings(name="test", title="test")
    ours = {category_key(c) for c in WRITE_BACK_CATEGORIES.values()}
    theirs = {category_key(c) for c in (*defaults.checkin_categories, *defaults.help_categories)}
    assert ours and not ours & theirs
    assert all(c.startswith("visitwatch: ") for c in WRITE_BACK_CATEGORIES.values())


def test_write_back_of_an_entry_deleted_since_the_poll_patches_nothing(
    fake_graph: FakeGraph, tmp_path: Path
) -> None:
    """The entry is gone when visitwatch goes to mark it: nothing is sent, nothing raised."""
    source, event = written_visit(fake_graph, tmp_path)
    fake_graph.delete_event(ASHA, "v1")
    source.write_back(event.uid, event.recurrence_id, "overdue")
    assert fake_graph.patches == []


def test_write_back_is_a_no_op_when_off(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """With write_back = false nothing is ever patched."""
    add_token(mock)
    mock.get(view_url(), json=page(gevent("AAMk1")))
    source = make_source(delta=False)
    event = source.fetch(WINDOW).events[0]
    source.write_back(event.uid, event.recurrence_id, "overdue")
    assert not [c for c in mock.calls if c.request.method == "PATCH"]


# --------------------------------------------------------------------------- check


def test_check_reports_each_mailbox(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """check(): token ok and the number of entries per mailbox."""
    add_token(mock)
    mock.get(view_url(ASHA), json=page(gevent("A1"), gevent("A2")))
    mock.get(view_url(BEN), json=page(gevent("B1")))
    text = make_source(mailboxes=[ASHA, BEN]).check()
    assert text == f"token ok; {ASHA}: 2 entries; {BEN}: 1 entries"


def test_check_without_roles_passes_when_the_mailbox_reads(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """RBAC for Applications grants in Exchange, not the token: a note, not a failure."""
    add_token(mock, jwt(["Mail.Send"]))
    mock.get(view_url(ASHA), json=page(gevent("A1")))
    text = make_source().check()
    assert text.startswith("token ok (the token carries no Calendars.Read")
    assert "RBAC for Applications" in text and text.endswith(f"{ASHA}: 1 entries")


def test_check_without_roles_fails_when_the_mailbox_is_denied(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """No permission anywhere: the read is denied and check() says what to grant."""
    add_token(mock, jwt([]))
    mock.get(view_url(ASHA), status=403, json=graph_error("ErrorAccessDenied", "Access is denied."))
    with pytest.raises(ConnectorError) as caught:
        make_source().check()
    assert "Calendars.Read" in str(caught.value) and ASHA in str(caught.value)


def test_check_notes_read_write_for_write_back(
    mock: responses.RequestsMock, make_source: Callable[..., GraphCalendarSource]
) -> None:
    """write_back = true with only Calendars.Read in the token: check() says to grant ReadWrite."""
    add_token(mock, jwt(["Calendars.Read"]))
    mock.get(view_url(ASHA), json=page())
    assert "write_back needs Calendars.ReadWrite" in make_source(write_back=True).check()
