"""Headless Chromium against the daemon's real server on loopback (``tests/test_browser.py``).

Debian's ``chromium`` is driven by Playwright (``executable_path``; nothing is downloaded).
Where it is not installed the browser tests are skipped, saying so. One browser serves a
whole module; each test gets a fresh browser context (no cookies) at a desktop or a phone
viewport, and a world of its own whose pages waitress serves on a free loopback port, with
the world's FrozenClock behind them, so a deadline is passed by moving the clock.

``look(page, name)`` is what each page goes through: axe-core finds no accessibility
violation; at phone size nothing is wider than the screen and every button is a big touch
target; and a full-page screenshot ``<name>.png`` is saved into ``$VISITWATCH_SCREENSHOTS``
(default: the test's ``tmp_path``) to be checked by eye.

Import the fixtures (``*_fixture``, each named without the suffix) into the test module.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import World, tick
from tests.web_world import enable_web
from visitwatch.daemon.service import Service
from visitwatch.daemon.web.server import WebServer

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "chromium is not installed: apt-get install chromium (CI installs it)"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
VIEWPORTS = {"desktop": DESKTOP, "phone": PHONE}
MIN_TOUCH_PX = 44  # the smallest comfortable touch target (WCAG 2.5.5, Apple's HIG)
SCREENSHOTS_ENV = "VISITWATCH_SCREENSHOTS"
LINK = r"http://127\.0\.0\.1:\d+(/[a-z/]+/[A-Za-z0-9._%~-]+)"

# What every button-like thing on the page measures: (label, left, right, height).
_TOUCH_TARGETS = """() => [...document.querySelectorAll('button, a.button, input[type=email]')]
  .filter(e => e.getClientRects().length > 0)
  .map(e => { const r = e.getBoundingClientRect();
              return [e.innerText || e.name, r.left, r.right, r.height]; })"""


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Browser]:
    """One headless Chromium for the module; skipped (with the reason) where it is absent."""
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(params=list(VIEWPORTS), name="page")
def page_fixture(request: pytest.FixtureRequest, browser: Browser) -> Iterator[Page]:
    """A fresh browser (no cookies) at a desktop, then a phone-sized viewport."""
    context = browser.new_context(viewport=VIEWPORTS[request.param])  # type: ignore[arg-type]
    context.set_default_timeout(10_000)
    opened = context.new_page()
    yield opened
    context.close()


def is_phone(page: Page) -> bool:
    return page.viewport_size == PHONE


@pytest.fixture(name="screenshots")
def screenshots_fixture(tmp_path: Path) -> Path:
    """Where screenshots go: ``$VISITWATCH_SCREENSHOTS``, else the test's own folder."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(name="look")
def look_fixture(screenshots: Path) -> Callable[..., None]:
    """Check the page as it is now (axe, and at phone size its fit) and screenshot it.

    ``waive`` names axe rules not checked on this page, each a known, reported issue with a
    strict xfail test of its own (so fixing it is noticed).
    """
    axe = Axe()

    def check(page: Page, name: str, waive: tuple[str, ...] = ()) -> None:
        rules = {rule: {"enabled": False} for rule in waive}
        results = axe.run(page, options={"resultTypes": ["violations"], "rules": rules})
        assert results.violations_count == 0, f"{name}: {results.generate_report()}"
        if not is_phone(page):
            return
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{name} is {width}px wide on a {PHONE['width']}px phone"
        for label, left, right, height in page.evaluate(_TOUCH_TARGETS):
            assert left >= 0 and right <= PHONE["width"], f"{name}: {label!r} is cut off"
            assert height >= MIN_TOUCH_PX, f"{name}: {label!r} is {height}px high"
        page.screenshot(path=screenshots / f"{name}.png", full_page=True)

    return check


def main_text(page: Page) -> str:
    """What a person reads in the page's main part, spaces folded."""
    return re.sub(r"\s+", " ", page.locator("main").inner_text()).strip()


@dataclass
class Served:
    """A world whose pages the daemon's real server serves on loopback."""

    world: World
    service: Service
    server: WebServer

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def at(self, moment: Any) -> None:
        """Move the clock to ``moment`` and do what the daemon does: sync, sweep, deliver."""
        self.world.at(moment)
        tick(self.service)

    def links_to(self, person: str, kind: str) -> list[str]:
        """The links in the ``kind`` messages ``person`` received, read from the outbox."""
        return [
            self.base + path
            for message in self.world.messages(kind)
            if message["recipient"]["id"] == person
            for path in re.findall(LINK, message["text"])
        ]

    def query(self, sql: str, *args: object) -> list[dict[str, Any]]:
        return self.service.store.query(sql, args)

    def visit_id(self, uid: str = "visit-1") -> str:
        [row] = self.query("SELECT id FROM visits WHERE uid = ?", uid)
        return str(row["id"])


@pytest.fixture(name="served")
def served_fixture(world: World) -> Iterator[Callable[..., Served]]:
    """Start the real pages server for ``world`` (calendar ``events``), stopped after."""
    servers: list[WebServer] = []

    def start(*events: str) -> Served:
        enable_web(world)
        world.write_calendar(*events)
        service = world.service()
        server = WebServer(service.web_context())
        server.start()
        servers.append(server)
        tick(service)
        return Served(world, service, server)

    yield start
    for server in servers:
        assert server.stop(5), "the pages server did not stop"
