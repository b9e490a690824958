"""The pages' server: waitress, on threads of its own inside the daemon process.

Why it cannot stall the sweep or delivery: waitress reads and writes sockets on one thread
of its own (asyncore), so a slow or silent client costs a file descriptor, not a thread,
and is dropped after ``channel_timeout``; requests run on ``[web] threads`` worker threads,
each with its own database connection and the record's usual short transactions. The
sweep and the delivery loop share nothing with them but the database.

Bounds: a body over ``[web] max_body`` is refused (413) before it is read, headers are
capped, at most ``CONNECTION_LIMIT`` connections are served at once, and each client may
make ``[web] rate_limit`` requests a minute (a token bucket per address; beyond it a plain
429 page). Behind a reverse proxy (``[web] proxy``; by default any peer when the daemon
listens on loopback), the client is the address the proxy puts in ``X-Forwarded-For``.
A client connecting directly may hold at most ``PER_CLIENT_CONNECTIONS`` connections
open, so one slow client cannot take every connection; behind a proxy every client comes
from the proxy's address, and the proxy caps each client (README).
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog
from flask import Flask, current_app, render_template, request
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server

from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon.web.app import create_app
from visitwatch.daemon.web.context import WebContext

log = structlog.get_logger(__name__)

CONNECTION_LIMIT = 200  # open connections; past it waitress stops accepting for a moment
# Open connections one directly connected client may hold (a browser opens about six); the
# next is closed at once. A proxy's own address is not capped: it carries every client.
PER_CLIENT_CONNECTIONS = 20
CHANNEL_TIMEOUT = 30  # seconds a connection may sit idle or half-sent before it is closed
MAX_HEADER_BYTES = 16_384
MAX_CLIENTS = 10_000  # rate-limit buckets kept; the least recently seen are dropped first
LIMITER = "visitwatch-rate-limit"


class PagesUnavailable(VisitwatchError):
    """The pages cannot be served (the address is in use, or not this machine's)."""


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, bursts up to as many.

    The table is bounded: past ``max_clients`` the least recently seen client is forgotten
    (its next request starts with a full bucket), so a flood of addresses costs memory
    bounded by ``max_clients``, never more.
    """

    def __init__(
        self,
        per_minute: int,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens a second
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """0 when ``client`` may go ahead now (a token is taken), else seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.pop(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def build_app(context: WebContext) -> Flask:
    """The app as the daemon serves it: :func:`create_app`, the loops' writes first, and
    the per-client rate limit."""
    app = create_app(context)
    app.extensions[LIMITER] = RateLimiter(context.config.web.rate_limit)

    def loops_write_first() -> None:
        # The sweep and the delivery lanes write before any page (store.WriteGate).
        context.store.yield_writes()

    app.before_request(loops_write_first)
    app.before_request(_rate_limited)
    return app


# Graph posts change notifications from a few addresses of its own, in bursts; they only
# ask for a read (in memory, coalesced per source), so they are never rate limited: a
# notification refused would only be seen at the next poll.
# Texts from workers (/sms/) come from Twilio's and Notify's few shared addresses, all the
# workers' replies from the same ones: a limit per address would refuse a HELP because
# others texted at the same time. Each post is believed only with its signature or token
# (checked before any other work), and refusals reach the audit at most once a minute
# (web/inbound.py), so an unlimited forger costs a hash per request and nothing stored.
UNLIMITED_PREFIXES = ("/graph/", "/sms/")


def _rate_limited() -> tuple[str, int, dict[str, str]] | None:
    if request.path.startswith(UNLIMITED_PREFIXES):
        return None
    limiter: RateLimiter = current_app.extensions[LIMITER]
    wait = limiter.wait(request.remote_addr or "")
    if not wait:
        return None
    page = render_template(
        "message.html",
        title="Too many requests",
        heading="Too many requests",
        text="Too many requests from this device in the last minute. Wait a moment and try "
        "again. If a colleague may be in danger, phone them or their manager now.",
    )
    return page, 429, {"Retry-After": str(math.ceil(wait))}


def bind(listen: str, port: int) -> socket.socket:
    """A listening socket on ``listen:port``; :class:`PagesUnavailable` naming it if not."""
    where = f"[{listen}]:{port}" if ":" in listen else f"{listen}:{port}"
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    try:
        return socket.create_server((listen, port), family=family, backlog=128)
    except OSError as err:
        reason = err.strerror or str(err)
        hint = (
            "another program (or another visitwatch) is listening there; stop it or set [web] port"
            if err.errno in (98, 48)  # EADDRINUSE on Linux, macOS
            else "check [web] listen"
        )
        raise PagesUnavailable(f"cannot serve the pages on {where}: {reason}; {hint}") from err


class CappedChannel(HTTPChannel):
    """A connection, closed at once when its peer already holds ``cap`` open ones."""

    cap = PER_CLIENT_CONNECTIONS
    uncapped: str | None = None  # the proxy's address ("*": every peer is the proxy)
    _refused = [0.0, 0]  # when the last warning was logged, refusals since (per server)

    def __init__(self, server: BaseWSGIServer, sock: socket.socket, addr: object,
                 adj: object, map: dict[int, wasyncore.dispatcher] | None = None) -> None:  # fmt: skip
        super().__init__(server, sock, addr, adj, map=map)
        peer = self.addr[0] if isinstance(self.addr, tuple) else None
        if peer is None or self.uncapped in ("*", peer):
            return
        open_here = sum(
            1 for channel in list((map or {}).values())
            if isinstance(channel, HTTPChannel) and channel.addr and channel.addr[0] == peer
        )  # fmt: skip
        if open_here > self.cap:
            self._refuse(peer)

    def _refuse(self, peer: str) -> None:
        self.close()
        now = time.monotonic()
        self._refused[1] += 1
        if now - self._refused[0] >= 60:
            # The address is the client's: personal data, at debug only.
            log.warning("web_client_over_connection_cap", cap=self.cap, refused=self._refused[1])
            log.debug("web_client_over_connection_cap_address", client=peer)
            self._refused[0], self._refused[1] = now, 0


class WebServer:
    """Serves :func:`build_app` on ``[web] listen:port`` until :meth:`stop`."""

    def __init__(self, context: WebContext, app: Flask | None = None) -> None:
        self.context = context
        self.app = app or build_app(context)
        self._server: BaseWSGIServer | None = None
        self._map: dict[int, wasyncore.dispatcher] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served (the configured one, or the one picked for port 0)."""
        assert self._server is not None, "not started"
        return int(self._server.socket.getsockname()[1])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind and serve on a thread of its own; :class:`PagesUnavailable` if it cannot bind."""
        web = self.context.config.web
        sock = bind(web.listen, web.port)  # first: a clear error before any thread starts
        proxy = {}
        trusted = web.trusted_proxy()
        if trusted is not None:
            # The peer is the reverse proxy (on loopback, "auto": only this machine can
            # connect): the client is who it says in X-Forwarded-For (the last address).
            proxy = {
                "trusted_proxy": trusted,
                "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-proto"},
            }
        self._server = create_server(
            self.app,
            map=self._map,
            sockets=[sock],
            threads=web.threads,
            connection_limit=CONNECTION_LIMIT,
            channel_timeout=CHANNEL_TIMEOUT,
            cleanup_interval=min(10, CHANNEL_TIMEOUT),
            max_request_header_size=MAX_HEADER_BYTES,
            max_request_body_size=web.max_body,
            expose_tracebacks=False,
            ident="visitwatch",
            **proxy,
        )
        self._server.channel_class = type(
            "Channel", (CappedChannel,), {"uncapped": trusted, "_refused": [0.0, 0]}
        )
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)
        self._thread.start()
        log.info("web_started", listen=web.listen, port=self.port, threads=web.threads)

    def _serve(self) -> None:
        server = self._server
        assert server is not None
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=self._map, count=1)
        except Exception:
            log.exception("web_server_crashed")
        finally:
            server.close()  # no new connections
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
            wasyncore.close_all(self._map)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop serving within ``timeout`` seconds; True when the server thread has ended.

        Requests in flight get up to 2 s to finish; each acts in one transaction, so one cut
        short changed nothing or everything it meant to.
        """
        if self._thread is None:
            return True
        self._stopping.set()
        if self._server is not None:
            # Wake the socket loop now (if already closed, it ends at its next wake).
            with contextlib.suppress(OSError):
                self._server.pull_trigger()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        log.info("web_stopped", clean=stopped)
        return stopped


class PagesKeeper:
    """Starts the server with the daemon; if the address is taken, keeps trying.

    The daemon never refuses to watch visits because its pages cannot be served: alerts
    do not depend on them, and a daemon that exits over a busy port stops every alert.
    Instead the admins hear at once that the pages (and the links in messages) are down,
    naming the address, and again when they are back; meanwhile staff can still check in
    with the CLI or the Outlook "Safe" category.
    """

    def __init__(
        self,
        server: WebServer,
        tell_admins: Callable[[str, str, str], None],  # (key, subject, text)
        retry: float = 30.0,
    ) -> None:
        self.server = server
        self._tell_admins = tell_admins
        self._retry = retry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._try_start(first=True):
            return
        self._thread = threading.Thread(target=self._keep_trying, name="web-retry", daemon=True)
        self._thread.start()

    def _try_start(self, first: bool = False) -> bool:
        try:
            self.server.start()
        except PagesUnavailable as err:
            if first:
                log.error("web_unavailable", error=str(err))
                self._tell_admins(
                    "web-down",
                    "visitwatch: the check-in pages are down",
                    f"visitwatch is watching visits and sending alerts, but {err}. Until "
                    "this is fixed the links in messages do not open: staff can check in "
                    'with `visitwatch checkin` or the Outlook "Safe" category, managers '
                    f"with `visitwatch ack`. visitwatch tries again every {round(self._retry)} "
                    "seconds and says when the pages are back.",
                )
            return False
        if not first:
            log.warning("web_available_again")
            self._tell_admins(
                "web-up",
                "visitwatch: the check-in pages are back",
                "The check-in and acknowledge pages are served again; links in messages work.",
            )
        return True

    def _keep_trying(self) -> None:
        while not self._stop.wait(self._retry):
            if self._try_start():
                return

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self.server.stop(timeout)
