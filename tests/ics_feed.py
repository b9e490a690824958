"""An .ics feed on loopback: the HTTP server the ICS tests read, and how they build a source.

:func:`serving` runs a real HTTP server (conditional GET, redirects, error pages, slow or
unterminated bodies) for as long as a ``with`` block lasts; the ``server`` fixture in
``conftest.py`` runs one for a test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from visitwatch.connectors.ics import IcsSource
from visitwatch.core.options import ConnectorContext, validate_options


@dataclass
class Feed:
    """What the loopback server serves, and what it saw."""

    body: bytes = b""
    status: int = 200
    etag: str | None = None
    last_modified: str | None = None
    content_type: str = "text/calendar; charset=utf-8"
    delay: float = 0.0
    send_length: bool = True  # False: no Content-Length, the body ends when the connection does
    requests: list[dict[str, Any]] = field(default_factory=list)
    file: Path | None = None  # set: serve this file as it is at each request (gone: 404)

    def current(self) -> tuple[int, bytes]:
        """The status and body a request gets now."""
        if self.file is None:
            return self.status, self.body
        if not self.file.exists():
            return 404, b""
        return self.status, self.file.read_bytes()

    @property
    def count(self) -> int:
        return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    feed: Feed  # set on a per-server subclass

    def do_GET(self) -> None:
        feed = self.feed
        feed.requests.append({"path": self.path, "headers": dict(self.headers)})
        if feed.delay:
            time.sleep(feed.delay)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/feed.ics")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, body = feed.current()
        if status != 200:
            self._send(status, b"<html><body>error</body></html>", "text/html")
            return
        if feed.etag and self.headers.get("If-None-Match") == feed.etag:
            self._send(304, b"", None)
            return
        if feed.last_modified and self.headers.get("If-Modified-Since") == feed.last_modified:
            self._send(304, b"", None)
            return
        self._send(200, body, feed.content_type)

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if self.feed.etag:
            self.send_header("ETag", self.feed.etag)
        if self.feed.last_modified:
            self.send_header("Last-Modified", self.feed.last_modified)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 304 and self.feed.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 304:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@dataclass
class Server:
    feed: Feed
    base: str

    def url(self, path: str = "/feed.ics") -> str:
        return self.base + path


@contextmanager
def serving(feed: Feed | None = None) -> Iterator[Server]:
    """A loopback HTTP server serving ``feed`` until the block ends."""
    feed = feed or Feed()
    handler = type("Handler", (_Handler,), {"feed": feed})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(feed, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def make_source(tmp_path: Path, table: dict[str, Any], zone: str = "Europe/London") -> IcsSource:
    settings, problems = validate_options(table, IcsSource.options, "sources[0]", tmp_path)
    assert not problems, problems
    context = ConnectorContext(timezone=ZoneInfo(zone), state_dir=tmp_path, config_dir=tmp_path)
    return IcsSource("home-visits", settings, context)


def calendar(*events: str, head: str = "") -> bytes:
    """A VCALENDAR around the given component blocks, with CRLF line ends."""
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN"]
    if head:
        lines += head.strip().splitlines()
    for block in events:
        lines += block.strip().splitlines()
    lines.append("END:VCALENDAR")
    return ("\r\n".join(line.strip() for line in lines) + "\r\n").encode()
