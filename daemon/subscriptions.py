"""Outlook changes in seconds: change subscriptions kept alive, and reads they trigger.

Polling stays the safety net (principle 5): nothing here stops, delays or replaces a poll.
A subscription only makes a change visible sooner.

- :class:`Subscriptions` keeps one subscription per calendar each change feed names
  (``connectors/change_feed.py``), on a loop thread of its own: creates the missing ones,
  renews each when less than a third of its life is left, re-creates one the other side
  lost, deletes them all on stop. Their client-state secrets are kept 0600 in the state
  directory (so a restart after a crash renews rather than duplicates) and never logged.
  A source whose subscriptions keep failing is retried with a growing pause; after
  :data:`FAILURES_BEFORE_NOTICE` failures in a row an admin is told once per episode.
- :class:`~visitwatch.daemon.source_reads.SourceReads` runs the reads notifications ask
  for (``request_sync``, safe from any thread, never blocking), so the web thread that
  received the notification never runs a sync.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from visitwatch.connectors.change_feed import ChangeFeed, Endpoints, SubscriptionGone
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.loops import Loop
from visitwatch.daemon.source_reads import SourceReads

__all__ = ["SourceReads", "Subscriptions", "endpoints", "subscriptions_for"]

log = structlog.get_logger(__name__)

FAILURES_BEFORE_NOTICE = 3
FIRST_RETRY = timedelta(minutes=1)
LONGEST_RETRY = timedelta(minutes=30)
# Asked for a little less than the limit: the other side's clock may run ahead of ours.
LIFETIME_MARGIN = timedelta(minutes=5)
STATE_FILE = "graph-subscriptions.json"
NOTIFY_PATH = "/graph/notify"
LIFECYCLE_PATH = "/graph/lifecycle"

# (key, subject, text), as Service._admin_notice takes them; called once per episode.
TellAdmins = Callable[[str, str, str], None]


@dataclass
class Subscription:
    """One live subscription, as kept in the state file."""

    source: str
    resource: str
    id: str
    expires: datetime
    client_state: str  # the secret every notification must echo
    renew_now: bool = False  # the other side asked for it (reauthorizationRequired)


@dataclass
class _Trouble:
    """How a source's subscriptions have been failing."""

    failures: int = 0
    retry_at: datetime | None = None
    since: datetime | None = None
    last_error: str = ""
    told: bool = False


def subscriptions_for(
    config: Config,
    feeds: Mapping[str, ChangeFeed],
    clock: Clock,
    request_sync: Callable[[str], object],
    tell_admins: TellAdmins | None = None,
) -> Subscriptions | None:
    """The manager, when change notifications can work: ``[web]`` serves the endpoints,
    ``public_base_url`` is HTTPS (Graph posts nowhere else) and a source has a change feed.
    None otherwise: the polls alone read the calendars, as they always do."""
    base_url = config.daemon.public_base_url
    if not feeds or not config.web.enabled or not base_url:
        return None
    if not base_url.lower().startswith("https://"):
        log.warning("subscriptions_need_https", sources=len(feeds))
        return None
    return Subscriptions(feeds, base_url, config.daemon.state_dir, clock, request_sync, tell_admins)


def endpoints(public_base_url: str) -> Endpoints:
    base = public_base_url.rstrip("/")
    return Endpoints(base + NOTIFY_PATH, base + LIFECYCLE_PATH)


class Subscriptions:
    """Keeps each change feed's calendars subscribed and believes only notifications that
    carry their subscription's secret."""

    def __init__(
        self,
        feeds: Mapping[str, ChangeFeed],
        public_base_url: str,
        state_dir: Path,
        clock: Clock,
        request_sync: Callable[[str], object],
        tell_admins: TellAdmins | None = None,
    ) -> None:
        self.feeds = dict(feeds)
        self.endpoints = endpoints(public_base_url)
        self.clock = clock
        self.request_sync = request_sync
        self.tell_admins = tell_admins
        self.path = state_dir / STATE_FILE
        self._lock = threading.Lock()  # guards _subs and the state file; never held over I/O
        self._subs: dict[str, Subscription] = self._load()
        self._resources: dict[str, list[str]] = {}
        self._trouble: dict[str, _Trouble] = {name: _Trouble() for name in self.feeds}
        self._stop = threading.Event()
        self._loop: Loop | None = None

    # ------------------------------------------------------------------ notifications

    def believe(self, subscription_id: str, client_state: str) -> Subscription | None:
        """The subscription a notification names, if it carries that subscription's secret."""
        with self._lock:
            sub = self._subs.get(subscription_id)
        if sub is None or not hmac.compare_digest(sub.client_state.encode(), client_state.encode()):
            return None
        return sub

    def changed(self, subscription_id: str, client_state: str) -> bool:
        """A change notification: read its source at once. False when not believed."""
        sub = self.believe(subscription_id, client_state)
        if sub is None:
            return False
        self.request_sync(sub.source)
        return True

    def lifecycle(self, subscription_id: str, client_state: str, event: str) -> bool:
        """A lifecycle event: renew, re-create or read at once. False when not believed."""
        sub = self.believe(subscription_id, client_state)
        if sub is None:
            return False
        if event == "reauthorizationRequired":
            sub.renew_now = True
            self.wake()
        elif event == "subscriptionRemoved":
            with self._lock:
                self._subs.pop(sub.id, None)
                self._save()
            self.request_sync(sub.source)  # changes made since it was removed went unheard
            self.wake()
        elif event == "missed":
            self.request_sync(sub.source)
        else:
            log.info("subscription_lifecycle_unknown", source=sub.source, lifecycle=event[:40])
        log.info("subscription_lifecycle", source=sub.source, lifecycle=event[:40])
        return True

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        """Subscribe now, then keep renewing on a loop thread of its own."""
        self._loop = Loop("subscriptions", self.step, LONGEST_RETRY.total_seconds(), self._stop)
        self._loop.start()

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.wake()

    def stop(self, timeout: float = 3.0) -> None:
        """Delete every subscription, within ``timeout`` seconds (those left expire alone,
        and are renewed or deleted by the next start: they stay in the state file)."""
        self._stop.set()
        self.wake()
        closing = threading.Thread(target=self._delete_all, name="subscriptions:stop", daemon=True)
        closing.start()
        closing.join(timeout)

    def step(self) -> float | None:
        """One pass over every feed; seconds until the next one is due."""
        now = self.clock.now()
        self._drop_unknown_sources()
        for source, feed in self.feeds.items():
            trouble = self._trouble[source]
            if self._stop.is_set() or (trouble.retry_at is not None and now < trouble.retry_at):
                continue
            try:
                self._keep(source, feed, now)
            except Exception as err:  # any failure: polls still read; tried again later
                self._failed(source, err, now)
            else:
                self._succeeded(source)
        due = [t.retry_at for t in self._trouble.values() if t.retry_at is not None]
        due += [self._renewal_due(s) for s in self.subscriptions()]
        return None if not due else max(0.0, (min(due) - self.clock.now()).total_seconds())

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per source: live subscriptions, failures in a row, the last error (for /healthz)."""
        live = self.subscriptions()
        return {
            name: {
                "subscriptions": sum(1 for s in live if s.source == name),
                "failures": t.failures,
                "error": t.last_error,
            }
            for name, t in self._trouble.items()
        }

    def _keep(self, source: str, feed: ChangeFeed, now: datetime) -> None:
        wanted = self._resources.get(source)
        if wanted is None:
            wanted = self._resources[source] = feed.resources()
        ours = {s.resource: s for s in self.subscriptions() if s.source == source}
        first_error: Exception | None = None
        for resource in wanted:
            try:
                sub = ours.get(resource)
                if sub is not None and (sub.renew_now or now >= self._renewal_due(sub)):
                    sub = self._renew(feed, sub, now)
                if sub is None:
                    self._create(source, feed, resource, now)
            except Exception as err:  # the next resource is still tried
                first_error = first_error or err
        for resource, stale in ours.items():
            if resource not in wanted:  # a calendar no longer configured
                try:
                    self._end(feed, stale)
                except Exception as err:
                    first_error = first_error or err
        if first_error is not None:
            raise first_error

    def _renewal_due(self, sub: Subscription) -> datetime:
        feed = self.feeds.get(sub.source)
        lifetime = feed.max_lifetime if feed is not None else timedelta(0)
        return sub.expires - lifetime / 3

    def _create(self, source: str, feed: ChangeFeed, resource: str, now: datetime) -> None:
        client_state = secrets.token_urlsafe(32)
        made = feed.subscribe(
            resource, self.endpoints, client_state, now + feed.max_lifetime - LIFETIME_MARGIN
        )
        with self._lock:
            self._subs[made.id] = Subscription(
                source, resource, made.id, made.expires, client_state
            )
            self._save()
        log.info("subscription_created", source=source, subscription=made.id)

    def _renew(self, feed: ChangeFeed, sub: Subscription, now: datetime) -> Subscription | None:
        """The renewed subscription, or None when the other side lost it (create anew)."""
        try:
            expires = feed.renew(sub.id, now + feed.max_lifetime - LIFETIME_MARGIN)
        except SubscriptionGone:
            with self._lock:
                self._subs.pop(sub.id, None)
                self._save()
            log.info("subscription_gone", source=sub.source, subscription=sub.id)
            return None
        with self._lock:
            sub.expires, sub.renew_now = expires, False
            self._save()
        log.info("subscription_renewed", source=sub.source, subscription=sub.id)
        return sub

    def _end(self, feed: ChangeFeed, sub: Subscription) -> None:
        feed.delete(sub.id)
        with self._lock:
            self._subs.pop(sub.id, None)
            self._save()
        log.info("subscription_deleted", source=sub.source, subscription=sub.id)

    def _drop_unknown_sources(self) -> None:
        """Subscriptions a previous run made for a source no longer configured: forgotten
        (they expire by themselves; notifications for them are not believed)."""
        with self._lock:
            stale = [i for i, s in self._subs.items() if s.source not in self.feeds]
            for subscription_id in stale:
                del self._subs[subscription_id]
            if stale:
                self._save()

    def _delete_all(self) -> None:
        for sub in self.subscriptions():
            feed = self.feeds.get(sub.source)
            if feed is None:
                continue
            try:
                self._end(feed, sub)
            except Exception as err:  # it expires by itself; the next start renews it
                log.warning("subscription_delete_failed", source=sub.source, error=str(err))

    # ------------------------------------------------------------------ failures

    def _failed(self, source: str, err: Exception, now: datetime) -> None:
        trouble = self._trouble[source]
        trouble.failures += 1
        trouble.since = trouble.since or now
        trouble.last_error = str(err)[:300] or type(err).__name__
        pause = min(FIRST_RETRY * 2 ** (trouble.failures - 1), LONGEST_RETRY)
        trouble.retry_at = now + pause
        self._resources.pop(source, None)  # calendars may have been renamed: ask again
        log.warning(
            "subscription_failed",
            source=source,
            failures=trouble.failures,
            retry_in=int(pause.total_seconds()),
            error=trouble.last_error,
        )
        if trouble.failures >= FAILURES_BEFORE_NOTICE and not trouble.told:
            trouble.told = True
            self._tell(source, trouble)

    def _succeeded(self, source: str) -> None:
        trouble = self._trouble[source]
        if trouble.failures:
            log.info("subscriptions_working_again", source=source, failures=trouble.failures)
        self._trouble[source] = _Trouble()

    def _tell(self, source: str, trouble: _Trouble) -> None:
        if self.tell_admins is None:
            return
        since = trouble.since.isoformat(timespec="minutes") if trouble.since else ""
        text = (
            f"visitwatch could not subscribe to Outlook change notifications for the calendar "
            f"source {source!r} ({trouble.failures} tries; last error: {trouble.last_error}). "
            "Nothing is missed: the calendars are still read at every poll, but changes such "
            "as a 'Safe' or 'Help' category are seen one poll later instead of within "
            f"seconds. Check that {self.endpoints.notify_url} is reachable from the internet "
            "over HTTPS (Microsoft Graph must reach it), and that the app may read these "
            "calendars. visitwatch keeps trying by itself."
        )
        try:
            self.tell_admins(
                f"subscriptions|{source}|{since}",
                f"visitwatch: Outlook changes for {source} are only seen at each poll",
                text,
            )
        except Exception:  # the notice is a courtesy; the polls are the safety net
            log.exception("subscription_notice_failed", source=source)

    # ------------------------------------------------------------------ the state file

    def _load(self) -> dict[str, Subscription]:
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
            subs = [
                Subscription(r["source"], r["resource"], r["id"],
                             datetime.fromisoformat(r["expires"]), r["client_state"],
                             bool(r.get("renew_now")))
                for r in rows
            ]  # fmt: skip
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: start afresh; the old ones expire by themselves.
            log.warning("subscription_state_unreadable", path=str(self.path))
            return {}
        return {s.id: s for s in subs}

    def _save(self) -> None:
        """Write the state file (0600: it holds the secrets), atomically. Under the lock."""
        rows = [{**asdict(s), "expires": s.expires.isoformat()} for s in self._subs.values()]
        temporary = self.path.with_suffix(".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(rows, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except OSError as err:  # a full disk: the subscriptions still work until a restart
            log.warning("subscription_state_unwritable", error=str(err))
