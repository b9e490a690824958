"""The external heartbeat: when the host or the daemon dies, someone outside is told.

``[daemon] heartbeat_url`` names a check at an outside monitor. The daemon pings it:

- ``start`` once as it starts;
- ``success`` while the sweep and the delivery loop both make progress (the same judgement
  as systemd's watchdog, ``watchdog.py``) after each new pass of both, at most once per
  ``heartbeat_every``;
- ``fail`` with a short reason (no personal data) at once when the daemon judges itself
  unhealthy: a loop stuck, the record unwritable, no channel able to deliver.

When the pings stop (the host is down, the process is gone) the monitor alerts on its own.

Two styles: Healthchecks (``<url>/start``, ``<url>``, ``<url>/fail``, the reason as the
POST body; healthchecks.io or self-hosted) and Uptime Kuma's push monitor (``<url>?status=
up|down&msg=...``). The URL holds the check's secret, so only its scheme and host are ever
logged or shown.

Every ping runs on a thread of its own with a short timeout: a hung monitor can never delay
an alert. A monitor that cannot be reached is logged once per episode and kept in the
record's meta (``heartbeat_failing_since``, ``heartbeat_error``, ``heartbeat_last_ok``) for
``visitwatch status`` and ``doctor``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import structlog

from visitwatch import __version__
from visitwatch.core.options import Secret
from visitwatch.daemon import channel_health
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.episode import Episode
from visitwatch.daemon.store import Store, ts

log = structlog.get_logger(__name__)

START, SUCCESS, FAIL = "start", "success", "fail"
TIMEOUT = 10.0  # seconds per ping: the monitor only needs to hear from us now and then
MAX_REASON = 200
# Meta keys the daemon keeps the heartbeat's state in (status and doctor read them).
META_FAILING_SINCE = "heartbeat_failing_since"
META_ERROR = "heartbeat_error"
META_LAST_OK = "heartbeat_last_ok"


class HeartbeatFailed(Exception):
    """The monitor did not take a ping (no answer, an error status, a refusal)."""


class Progressing(Protocol):
    """A loop: when it last finished a pass (monotonic seconds)."""

    heartbeat: float


@dataclass(frozen=True)
class Judgement:
    """How the daemon is: ``reason`` is None when healthy; ``progress`` marks the loops' passes."""

    reason: str | None
    progress: tuple[float, ...]


def url_text(url: str | Secret) -> str:
    return url.reveal() if isinstance(url, Secret) else url


def style_of(url: str, style: str) -> str:
    """``healthchecks`` or ``uptime-kuma``; ``auto`` tells them by Uptime Kuma's push path."""
    if style != "auto":
        return style
    return "uptime-kuma" if "/api/push/" in urlsplit(url).path else "healthchecks"


def shown(url: str) -> str:
    """What may be logged or printed of the URL: scheme and host (the path is the secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


def ping_request(url: str, style: str, kind: str, reason: str = "") -> urllib.request.Request:
    """The HTTP request that tells the monitor ``kind`` (start, success or fail)."""
    parts = urlsplit(url)
    headers = {"User-Agent": f"visitwatch/{__version__}"}
    if style_of(url, style) == "uptime-kuma":
        status = "down" if kind == FAIL else "up"
        msg = reason or ("started" if kind == START else "OK")
        query = urlencode({"status": status, "msg": msg[:MAX_REASON], "ping": ""})
        return urllib.request.Request(urlunsplit(parts._replace(query=query)), headers=headers)
    suffix = {START: "/start", SUCCESS: "", FAIL: "/fail"}[kind]
    target = urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))
    headers["Content-Type"] = "text/plain; charset=utf-8"
    body = reason[:MAX_REASON].encode()
    return urllib.request.Request(target, data=body, headers=headers, method="POST")


def send_ping(request: urllib.request.Request, url: str, timeout: float = TIMEOUT) -> None:
    """Send one ping; :class:`HeartbeatFailed` with an error that never quotes the URL."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read(2048)
    except urllib.error.HTTPError as err:
        raise HeartbeatFailed(f"{shown(url)} answered HTTP {err.code}") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise HeartbeatFailed(f"{shown(url)}: {redacted(str(reason), url)}") from None
    # Uptime Kuma answers 200 with {"ok": false, "msg": ...} for an unknown or paused push.
    try:
        answer_json = json.loads(body) if body.startswith(b"{") else {}
    except ValueError:
        answer_json = {}
    if isinstance(answer_json, Mapping) and answer_json.get("ok") is False:
        msg = redacted(str(answer_json.get("msg", "refused")), url)[:MAX_REASON]
        raise HeartbeatFailed(f"{shown(url)} refused the ping: {msg}")


def redacted(text: str, url: str) -> str:
    """``text`` with the URL's secret path and query taken out, should an error quote them."""
    parts = urlsplit(url)
    for secret in (url, parts.path, parts.query):
        if len(secret) > 1:
            text = text.replace(secret, "...")
    return text


class Heartbeat:
    """Pings the monitor from a thread of its own, judging the daemon every ``tick`` seconds."""

    def __init__(
        self,
        url: str,
        style: str,
        every: float,
        judge: Callable[[], Judgement],
        store: Store | None,
        clock: Clock,
        timeout: float = TIMEOUT,
    ) -> None:
        self.url = url
        self.style = style
        self.every = every
        self.judge = judge
        self.store = store
        self.clock = clock
        self.timeout = min(timeout, max(every, 1.0))
        self.tick = min(every, 5.0)
        self._stop = threading.Event()
        self._failing = Episode(log, "heartbeat_failing", "heartbeat_delivering_again")
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._last_kind = ""
        self._last_reason = ""
        self._last_sent = 0.0
        self._last_progress: tuple[float, ...] = ()

    def start(self) -> None:
        log.info("heartbeat_started", monitor=shown(self.url), style=style_of(self.url, self.style))
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop pinging (nothing is sent: the monitor alerts if the daemon stays down)."""
        self._stop.set()
        self._thread.join(timeout)  # a ping still in flight ends with its timeout, unwaited

    def _run(self) -> None:
        self._ping(START, "")
        while not self._stop.wait(self.tick):
            try:
                self.beat()
            except Exception:  # the heartbeat must never take anything else down
                log.exception("heartbeat_crashed")

    def beat(self) -> None:
        """Judge the daemon and ping when health changed, or when it is time for another."""
        judged = self.judge()
        due = time.monotonic() - self._last_sent >= self.every
        if judged.reason is not None:
            if self._last_kind != FAIL or due:  # a new reason waits: it may count seconds
                self._ping(FAIL, judged.reason)
            return
        # A success ping only after both loops finished a pass since the last one.
        progressed = all(
            new > old for new, old in zip(judged.progress, self._last_progress, strict=False)
        )
        if self._last_kind == FAIL or (due and progressed):
            self._ping(SUCCESS, "")
            self._last_progress = judged.progress

    def _ping(self, kind: str, reason: str) -> None:
        self._last_kind, self._last_reason = kind, reason
        self._last_sent = time.monotonic()
        try:
            send_ping(ping_request(self.url, self.style, kind, reason), self.url, self.timeout)
        except HeartbeatFailed as err:
            if self._failing.begin(monitor=shown(self.url), error=str(err)):
                self._remember({META_FAILING_SINCE: ts(self.clock.now()) or ""})
            self._remember({META_ERROR: str(err)})
            return
        self._failing.end()
        self._remember({META_LAST_OK: ts(self.clock.now()) or "", META_FAILING_SINCE: ""})

    def _remember(self, values: Mapping[str, str]) -> None:
        if self.store is None:
            return
        try:
            with self.store.transaction():
                for key, value in values.items():
                    self.store.set_meta(key, value)
        except sqlite3.Error as err:  # the record's trouble is judged and reported elsewhere
            log.debug("heartbeat_state_unrecorded", error=str(err))


def daemon_judge(
    config: Config,
    store: Store,
    loops: Mapping[str, Progressing],
    record_down: Callable[[], bool],
    stall_limit: float,
) -> Callable[[], Judgement]:
    """How the running daemon is: what the watchdog judges, plus the record and channels."""
    names = [c.name for c in config.channels]

    def judge() -> Judgement:
        now = time.monotonic()
        progress = tuple(loops[name].heartbeat for name in ("sweep", "dispatch"))
        for name, last in zip(("sweep", "dispatch"), progress, strict=True):
            if now - last > stall_limit:
                return Judgement(
                    f"the {name} loop has made no progress for {round(now - last)} s", progress
                )
        if record_down():
            return Judgement("the record (database) cannot be written", progress)
        try:
            states = channel_health.states(store, names)
        except sqlite3.Error:
            return Judgement("the record (database) cannot be read", progress)
        if states and not any(s.up for s in states):
            return Judgement(f"no channel can deliver ({', '.join(names)} failing)", progress)
        return Judgement(None, progress)

    return judge


def heartbeat_for(
    config: Config,
    store: Store,
    clock: Clock,
    loops: Mapping[str, Progressing],
    record_down: Callable[[], bool],
    stall_limit: float,
) -> Heartbeat | None:
    """The started heartbeat of a running daemon, or None when no heartbeat_url is set."""
    daemon = config.daemon
    if daemon.heartbeat_url is None:
        return None
    heartbeat = Heartbeat(
        url_text(daemon.heartbeat_url),
        daemon.heartbeat_style,
        daemon.heartbeat_every.total_seconds(),
        daemon_judge(config, store, loops, record_down, stall_limit),
        store,
        clock,
    )
    heartbeat.start()
    return heartbeat
