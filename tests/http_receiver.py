"""A real HTTP receiver on loopback (http.server) that records what was POSTed to it.

Used by the channels that POST to a URL (webhook, Teams): each request is kept with its
headers and body, and the receiver answers with the status the test sets.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Receiver:
    """What a webhook receiver got, and how it answers the next request."""

    port: int = 0
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # set: the receiver waits for it before answering
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # the status each request got

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/visitwatch"

    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        return [r for r, status in zip(self.requests, self.answers, strict=True) if status < 300]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if receiver.hold is not None:
                receiver.hold.wait(10)
            receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            receiver.answers.append(receiver.status)
            self.send_response(receiver.status)
            for name, value in receiver.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    """An HTTP receiver on 127.0.0.1, answering 204 unless told otherwise."""
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.shutdown()
        server.server_close()
