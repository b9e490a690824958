"""Board sign-in: the one-time e-mail link, Microsoft 365 (Entra mocked with ``responses``),
and the signed session that follows (expiry, tampering, removal from the directory, sign
out). Pages are driven through Flask's test client against a real store and dispatcher;
the e-mailed link is read from the outbox, as the person would read it."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import T0, World
from tests.graph_mock import CLIENT, TENANT, add_discovery, login
from tests.graph_server import unsigned_token
from tests.web_world import enable_web
from visitwatch.daemon.service import Service
from visitwatch.daemon.web.app import create_app
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.links import Purpose, Signer
from visitwatch.daemon.web.sessions import COOKIE
from visitwatch.daemon.web.signin_mail import mailer

MARIA = "maria.jones@example.org"  # manager: may open the board
SAM = "sam.webster@example.org"  # director: may open the board
ASHA = "asha.khan@example.org"  # worker: may not
ENTRA_SECRET_ENV = "VW_TEST_ENTRA_SECRET"
ENTRA_SECRET = "entra-client-secret-for-tests"
SENT_PAGE = "If that address can sign in to the board, a sign-in link is on its way"


@dataclass
class Web:
    """One organisation with the pages on: its service, the app and a browser."""

    world: World
    service: Service
    context: WebContext
    app: Flask
    client: FlaskClient

    def browser(self) -> FlaskClient:
        """Another browser, with no cookies."""
        return self.app.test_client()


def web_world(world: World, monkeypatch: pytest.MonkeyPatch, *events: str) -> Web:
    """``world`` with [web] on, both sign-in methods and an Entra app; its calendar
    holds ``events``."""
    monkeypatch.setenv(ENTRA_SECRET_ENV, ENTRA_SECRET)
    enable_web(
        world,
        sign_in=["email", "microsoft365"],
        entra_tenant_id=TENANT,
        entra_client_id=CLIENT,
    )
    world.policy += f'entra_client_secret = {{ env = "{ENTRA_SECRET_ENV}" }}\n'
    world.write_calendar(*events)
    return web_of(world, world.service())


def web_of(world: World, service: Service, **daemon: Any) -> Web:
    """The pages of ``service``; ``daemon`` replaces [daemon] settings (public_base_url)."""
    assert service.signer is not None
    config = service.config
    if daemon:
        config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **daemon))
    context = WebContext(config, service.store, service.watcher, service.clock, service.signer)
    app = create_app(context)
    return Web(world, service, context, app, app.test_client())


@pytest.fixture
def web(world: World, monkeypatch: pytest.MonkeyPatch) -> Web:
    return web_world(world, monkeypatch)


def form_csrf(page: TestResponse) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True))
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


def ask_for_link(web: Web, address: str, client: FlaskClient | None = None) -> TestResponse:
    client = client or web.client
    csrf = form_csrf(client.get("/signin"))
    answer = client.post("/signin/email", data={"email": address, "csrf": csrf})
    assert mailer(web.app, web.context).drain(), "the mailer handled the request"
    return answer


def link_sent_to(web: Web, person: str) -> str:
    """The sign-in link in the newest message the outbox delivered to ``person``."""
    web.service.dispatch()
    texts = [m["text"] for m in web.world.messages("admin") if m["recipient"]["id"] == person]
    assert texts, f"a sign-in message reached {person}"
    found = re.search(r"https://\S+/signin/link/\S+|http://\S+/signin/link/\S+", texts[-1])
    assert found, "the message carries a sign-in link"
    return found.group(0)


def open_link(client: FlaskClient, link: str) -> TestResponse:
    """Open an e-mailed link and press its "Sign in" button."""
    path = urlsplit(link).path
    page = client.get(path)
    if page.status_code != 200:
        return page
    return client.post(path, data={"csrf": form_csrf(page)})


def sign_in(web: Web, person: str = MARIA, client: FlaskClient | None = None) -> FlaskClient:
    """Sign ``person`` in by e-mail link, in ``client`` (default: the web's browser)."""
    client = client or web.client
    ask_for_link(web, person, client)
    answer = open_link(client, link_sent_to(web, person))
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/board")
    return client


def on_board(client: FlaskClient) -> bool:
    page = client.get("/board")
    return page.status_code == 200 and "Today's visits" in page.get_data(as_text=True)


# ---------------------------------------------------------------------- the e-mail link


def test_board_sends_a_stranger_to_sign_in(web: Web) -> None:
    """Without a session the board redirects to the sign-in page, which offers both ways."""
    answer = web.client.get("/board")
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")
    page = web.client.get("/signin").get_data(as_text=True)
    assert "Sign in with Microsoft 365" in page and "Send me a sign-in link" in page


def test_email_link_signs_a_manager_in(web: Web) -> None:
    """Maria asks for a link, it reaches her through the outbox, and it opens the board
    with a session cookie that scripts cannot read and other sites do not send."""
    assert SENT_PAGE in ask_for_link(web, "Maria.Jones@Example.org").get_data(as_text=True)
    link = link_sent_to(web, MARIA)
    [message] = [m for m in web.world.messages("admin") if m["recipient"]["id"] == MARIA]
    assert message["subject"] == "Your visitwatch board sign-in link"
    assert "works once" in message["text"]
    answer = open_link(web.client, link)
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # public_base_url is http here
    page = web.client.get("/board").get_data(as_text=True)
    assert "Sign out Maria Jones" in page


def test_opening_the_link_alone_does_not_use_it(web: Web) -> None:
    """A mail scanner fetching the link leaves it working: only the button signs in."""
    ask_for_link(web, MARIA)
    link = link_sent_to(web, MARIA)
    scanner = web.browser()
    assert scanner.get(urlsplit(link).path).status_code == 200
    assert scanner.get_cookie(COOKIE) is None
    assert open_link(web.client, link).status_code == 303


def test_link_works_once(web: Web) -> None:
    """A used link is refused with a plain 4xx page, in any browser, and signs nobody in;
    pressing its button again (the form kept open) is refused too."""
    ask_for_link(web, MARIA)
    path = urlsplit(link_sent_to(web, MARIA)).path
    kept_open = web.client.get(path)
    assert web.client.post(path, data={"csrf": form_csrf(kept_open)}).status_code == 303
    other = web.browser()
    replay = other.get(path)
    assert replay.status_code == 410 and "already been used" in replay.get_data(as_text=True)
    assert other.post(path, data={"csrf": form_csrf(kept_open)}).status_code == 410
    assert other.get_cookie(COOKIE) is None and not on_board(other)


def test_expired_link_refused(web: Web) -> None:
    """A link opened 16 minutes after it was sent is refused and signs nobody in."""
    ask_for_link(web, MARIA)
    link = link_sent_to(web, MARIA)
    web.world.at(T0 + timedelta(minutes=16))
    answer = web.client.get(urlsplit(link).path)
    assert answer.status_code == 400
    assert "expired" in answer.get_data(as_text=True)
    assert not on_board(web.client)


def test_altered_link_refused(web: Web) -> None:
    """A link with a changed character is refused with a plain 400 page."""
    ask_for_link(web, MARIA)
    path = urlsplit(link_sent_to(web, MARIA)).path
    altered = path[:-3] + ("A" if path[-3] != "A" else "B") + path[-2:]
    answer = web.client.get(altered)
    assert answer.status_code == 400
    assert "Traceback" not in answer.get_data(as_text=True)


def test_same_page_for_everyone_and_a_link_only_for_board_staff(web: Web) -> None:
    """A worker, an unknown address and a manager see the same page; only the manager is
    sent a link, so the form tells nobody who works here or who may sign in."""
    pages = [
        ask_for_link(web, address)
        for address in (ASHA, "nobody@example.org", "not an address", MARIA)
    ]
    assert {p.status_code for p in pages} == {200}
    assert len({p.get_data() for p in pages}) == 1
    assert SENT_PAGE in pages[0].get_data(as_text=True)
    web.service.dispatch()
    assert web.world.recipients("admin") == [MARIA]


def test_form_without_csrf_sends_nothing(web: Web) -> None:
    """A sign-in form posted from elsewhere (no CSRF token) is refused and sends no link."""
    answer = web.client.post("/signin/email", data={"email": MARIA})
    assert answer.status_code == 400
    web.service.dispatch()
    assert web.world.recipients("admin") == []


def test_repeated_requests_send_one_link_a_minute(web: Web) -> None:
    """Pressing "send" five times sends one link; a minute later another may be sent."""
    for _ in range(5):
        ask_for_link(web, MARIA)
    web.service.dispatch()
    assert web.world.recipients("admin") == [MARIA]
    web.world.at(T0 + timedelta(minutes=1, seconds=1))
    ask_for_link(web, MARIA)
    web.service.dispatch()
    assert web.world.recipients("admin") == [MARIA, MARIA]


# ---------------------------------------------------------------------- the session


def test_session_expires(web: Web) -> None:
    """A session lasts session_ttl (8 hours by default), then the board asks to sign in."""
    sign_in(web)
    web.world.at(T0 + timedelta(hours=7, minutes=59))
    assert on_board(web.client)
    web.world.at(T0 + timedelta(hours=8))
    answer = web.client.get("/board")
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")


def test_tampered_cookie_refused(web: Web) -> None:
    """A session cookie with its person changed (or any byte altered) opens nothing."""
    sign_in(web)
    token = web.client.get_cookie(COOKIE)
    assert token is not None
    real = token.value
    half = len(real) // 2
    altered = real[:half] + ("A" if real[half] != "A" else "B") + real[half + 1 :]
    # Sam's session, as someone without our key would have to make it.
    later = web.world.clock.now() + timedelta(hours=1)
    forged = Signer(["not-our-key"]).sign(Purpose.SESSION, "", SAM, later, extra="x")
    for value in (altered, forged, real[:-2] + "xx"):
        browser = web.browser()
        browser.set_cookie(COOKIE, value)
        assert not on_board(browser)


def test_session_ends_when_the_person_leaves_the_board_roles(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maria's cookie stops working once the directory no longer gives her a board role
    (the admin edited the config and restarted)."""
    web = web_world(world, monkeypatch)
    sign_in(web)
    token = web.client.get_cookie(COOKIE)
    assert token is not None
    world.policy = world.policy.replace("[web]\n", '[web]\nboard_roles = ["director"]\n')
    later = web_of(world, world.service())
    later.client.set_cookie(COOKIE, token.value)
    assert not on_board(later.client)
    assert on_board(sign_in(later, SAM, later.browser()))


def test_sign_out(web: Web) -> None:
    """Signing out needs the form's CSRF token; afterwards even a copy of the old cookie
    opens nothing."""
    sign_in(web)
    token = web.client.get_cookie(COOKIE)
    assert token is not None
    assert web.client.post("/signout", data={"csrf": "forged"}).status_code == 400
    assert on_board(web.client)
    csrf = form_csrf(web.client.get("/board"))
    answer = web.client.post("/signout", data={"csrf": csrf})
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")
    assert web.client.get_cookie(COOKIE) is None
    copy = web.browser()
    copy.set_cookie(COOKIE, token.value)
    assert not on_board(copy)


def test_cookie_is_secure_behind_https(web: Web) -> None:
    """With an https public_base_url the session cookie is marked Secure."""
    secure = web_of(web.world, web.service, public_base_url="https://visitwatch.example.org")
    ask_for_link(secure, MARIA)
    link = link_sent_to(secure, MARIA)
    assert link.startswith("https://visitwatch.example.org/signin/link/")
    answer = open_link(secure.client, link)
    assert "Secure" in answer.headers["Set-Cookie"]


# ---------------------------------------------------------------------- Microsoft 365


@pytest.fixture
def entra(mock: responses.RequestsMock) -> Iterator[dict[str, Any]]:
    """Entra's discovery and token endpoints. The token endpoint answers with an ID token
    for ``claims`` (set by the test) carrying the nonce msal sent, and records what it
    was asked."""
    add_discovery(mock)
    state: dict[str, Any] = {"claims": {}, "requests": []}

    def token(request: Any) -> tuple[int, dict[str, str], str]:
        body = parse_qs(str(request.body))
        state["requests"].append(body)
        claims = {
            "aud": CLIENT,
            "iss": f"{login()}/v2.0",
            "tid": TENANT,
            "exp": int((T0 + timedelta(hours=1)).timestamp()),
            "iat": int(T0.timestamp()),
            "nonce": state["nonce"],
            "sub": "subject-1",
            **state["claims"],
        }
        answer = {
            "token_type": "Bearer",
            "expires_in": 3600,
            "access_token": unsigned_token({"aud": "00000003-0000-0000-c000-000000000000"}),
            "id_token": unsigned_token(claims),
        }
        return 200, {}, json.dumps(answer)

    mock.add_callback(responses.POST, f"{login()}/oauth2/v2.0/token", callback=token)
    yield state


def start_microsoft(web: Web, entra: dict[str, Any]) -> dict[str, str]:
    """Press "Sign in with Microsoft 365": the redirect to Entra's authorize endpoint."""
    answer = web.client.get("/signin/microsoft")
    assert answer.status_code == 303
    location = urlsplit(answer.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == (
        f"{login()}/oauth2/v2.0/authorize"
    )
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert query["redirect_uri"].endswith("/signin/microsoft/callback")
    assert query["code_challenge_method"] == "S256"
    entra["nonce"] = query["nonce"]
    return query


def test_microsoft_sign_in(web: Web, entra: dict[str, Any]) -> None:
    """A director signed in by Entra (address in another case) reaches the board; the
    code was exchanged with our client secret and the PKCE verifier."""
    query = start_microsoft(web, entra)
    entra["claims"] = {"preferred_username": "Sam.Webster@Example.org", "oid": "oid-sam"}
    answer = web.client.get(
        "/signin/microsoft/callback", query_string={"code": "code-1", "state": query["state"]}
    )
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/board")
    assert "Sign out Sam Webster" in web.client.get("/board").get_data(as_text=True)
    [asked] = entra["requests"]
    assert asked["code"] == ["code-1"] and asked["client_secret"] == [ENTRA_SECRET]
    verifier = asked["code_verifier"][0]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    assert challenge.rstrip(b"=").decode() == query["code_challenge"]


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"preferred_username": ASHA}, "a worker"),
        ({"preferred_username": "stranger@example.org", "oid": "oid-x"}, "not in the directory"),
        ({"preferred_username": SAM, "aud": "another-app"}, "a token for another app"),
        ({"preferred_username": SAM, "tid": "another-tenant"}, "another tenant"),
    ],
)
def test_microsoft_sign_in_refused(
    web: Web, entra: dict[str, Any], claims: dict[str, str], why: str
) -> None:
    """Entra signing someone in is not enough: a worker, a stranger, or a token meant
    for another app or tenant gets a plain 403 page and no session."""
    query = start_microsoft(web, entra)
    entra["claims"] = claims
    answer = web.client.get(
        "/signin/microsoft/callback", query_string={"code": "code-1", "state": query["state"]}
    )
    assert answer.status_code == 403, why
    assert len(entra["requests"]) == 1, "the code was exchanged before the refusal"
    assert "Traceback" not in answer.get_data(as_text=True)
    assert not on_board(web.client)


def test_microsoft_state_mismatch(web: Web, entra: dict[str, Any]) -> None:
    """A callback whose state is not the one this browser started with (a forged or
    crossed sign-in) is refused before any code is exchanged."""
    start_microsoft(web, entra)
    entra["claims"] = {"preferred_username": SAM}
    answer = web.client.get(
        "/signin/microsoft/callback", query_string={"code": "code-1", "state": "forged"}
    )
    assert answer.status_code == 400
    assert entra["requests"] == []
    assert not on_board(web.client)
    # A browser that never started a sign-in is refused too.
    stranger = web.browser()
    answer = stranger.get("/signin/microsoft/callback", query_string={"code": "c", "state": "s"})
    assert answer.status_code == 400


def test_the_form_answers_before_anything_about_the_address_is_known(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page comes back while the address is still unlooked-up (the mailer's thread is
    held), so the time it takes cannot tell a board user from a stranger."""
    held = threading.Event()
    mail = mailer(web.app, web.context)
    handle = mail._handle
    monkeypatch.setattr(mail, "_handle", lambda address: (held.wait(10), handle(address)))
    csrf = form_csrf(web.client.get("/signin"))
    answers = [
        web.client.post("/signin/email", data={"email": who, "csrf": csrf})
        for who in (MARIA, "nobody@example.org")
    ]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].get_data() == answers[1].get_data()
    assert web.service.store.query("SELECT id FROM notifications") == []  # nothing yet
    held.set()
    assert mail.drain()
    web.service.dispatch()
    assert web.world.recipients("admin") == [MARIA]
