"""The one-tap pages of a test ``world`` through Flask's test client (no server, no port).

``web_world(world)`` turns the conftest ``World`` into one whose messages carry links to
``https://vw.example.org`` and returns a :class:`WebWorld`: the real Store, Watcher and
Actions behind the pages, so a tap in a test does exactly what it does in the daemon.
(``tests/web_world.py`` serves the pages on a loopback port instead.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import World, tick
from visitwatch.daemon.service import Service
from visitwatch.daemon.web.app import create_app
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.links import Purpose

BASE_URL = "https://vw.example.org"
WEB_CONFIG = f'public_base_url = "{BASE_URL}"\n\n[web]\nenabled = true\n'
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
LINK = re.compile(re.escape(BASE_URL) + r"(/[va]/[A-Za-z0-9._%-]+)")


@dataclass
class WebWorld:
    world: World
    service: Service
    app: Flask
    client: FlaskClient
    wakes: list[int] = field(default_factory=list)

    def tick(self) -> None:
        tick(self.service)

    def at(self, moment: datetime) -> None:
        self.world.at(moment)

    def visit_id(self) -> str:
        rows = self.service.store.query("SELECT id FROM visits ORDER BY id")
        assert len(rows) == 1, rows
        return str(rows[0]["id"])

    def link(self, purpose: Purpose, person: str, visit_id: str | None = None) -> str:
        """A freshly signed path, as the router would build it for ``person``."""
        visit = self.service.watcher.visits.current(visit_id or self.visit_id())
        links = self.service.watcher.router.links
        assert links is not None
        url = (links.checkin if purpose is Purpose.CHECKIN else links.ack)(
            visit.id, person, visit.deadline, self.service.clock.now()
        )
        return urlsplit(url).path

    def links_in(self, kind: str, person: str) -> list[str]:
        """The page paths in the ``kind`` messages ``person`` received through the outbox."""
        found = []
        for message in self.world.messages(kind):
            if message["recipient"]["id"] == person:
                found += LINK.findall(message["text"])
        return found

    def csrf(self, path: str) -> str:
        """The CSRF token of the form on the page at ``path``."""
        page = self.client.get(path)
        assert page.status_code == 200, page.text
        match = CSRF_FIELD.search(page.text)
        assert match, "the page has no form"
        return match.group(1)

    def press(self, path: str, action: str, **form: str) -> str:
        """Open ``path``, tap the ``action`` button, follow the redirect; the result page."""
        csrf = self.csrf(path if action != "help" else f"{path}/help")
        response = self.client.post(f"{path}/{action}", data={"csrf": csrf, **form})
        assert response.status_code == 303, (response.status_code, response.text)
        result = self.client.get(response.headers["Location"])
        assert result.status_code == 200, result.text
        return result.text


def web_world(world: World) -> WebWorld:
    """``world`` with [web] enabled; its service, app and test client."""
    world.daemon += WEB_CONFIG
    service = world.service()
    assert service.signer is not None
    wakes: list[int] = []
    context = WebContext(
        config=service.config,
        store=service.store,
        watcher=service.watcher,
        clock=world.clock,
        signer=service.signer,
        wake=lambda: wakes.append(1),
    )
    app = create_app(context)
    app.testing = True
    return WebWorld(world, service, app, app.test_client(), wakes)
