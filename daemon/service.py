"""The running daemon: connectors, loops, signals and the systemd watchdog.

Nothing here decides what is due: the database does (principle 1). These threads only
wake things up, each on its own so that a slow calendar or a hanging mail server can
never delay the sweep that raises alerts:

- the **sweep** loop wakes at the next visit deadline (or when a write makes one due
  sooner), and at least every ``sweep_interval``;
- the **dispatch** loop hands due notifications to the channels' lanes (one thread per
  channel, see ``lanes.py``) whenever the sweep wrote some, a lane finished, or a
  retry falls due;
- the **write-back** loop mirrors states onto calendar entries (best effort);
- calendar **polls** run every ``poll_interval`` under APScheduler, each on a daemon
  thread of its own;
- the **pages** (``[web]``) are served by waitress on threads of its own, started after
  the loops and stopped first (``web/server.py``); ``self.activity`` feeds ``/healthz``.

Every wait is measured on the monotonic clock and every deadline compared on the wall
clock when the loop wakes, so a wall-clock step (NTP after a VM resume) delays nothing by
more than ``sweep_interval``; the polls, which APScheduler times by the wall clock, are
re-armed when a step is noticed (``loops.py``, ``polls.py``). ``watchdog.py`` tells systemd
how we are; ``write_back.py`` holds the write-back pass.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from visitwatch import __version__
from visitwatch.connectors.base import CalendarSource, Channel, Connector
from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import ConnectorContext
from visitwatch.daemon.clock import Clock, SystemClock
from visitwatch.daemon.config import Config, ConnectorConfig
from visitwatch.daemon.dispatch import Dispatcher, DispatchReport
from visitwatch.daemon.episode import Episode
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.health import HealthMonitor
from visitwatch.daemon.heartbeat import Heartbeat, heartbeat_for
from visitwatch.daemon.loops import SWEEP_GAP, ClockSteps, Loop, seconds_until
from visitwatch.daemon.people import PeopleLearner
from visitwatch.daemon.polls import Polls, polls_in_flight
from visitwatch.daemon.retention import retention_loop
from visitwatch.daemon.source_reads import SourceReads
from visitwatch.daemon.store import DaemonLock, Store, record_unwritable, ts
from visitwatch.daemon.subscriptions import subscriptions_for
from visitwatch.daemon.sync import Syncer, SyncReport
from visitwatch.daemon.watchdog import DeliveryWatchdog, sd_notify
from visitwatch.daemon.web.context import Activity, WebContext
from visitwatch.daemon.web.links import Links, Signer, load_keys
from visitwatch.daemon.write_back import write_back_pass
from visitwatch.policies import Policy

if TYPE_CHECKING:  # the web server (flask, waitress) is imported only when [web] is on
    from visitwatch.daemon.web.server import PagesKeeper

log = structlog.get_logger(__name__)

C = TypeVar("C", bound=Connector)

# Seconds between the sweep loop's health checks (sources failing, alerts undelivered).
HEALTH_EVERY = 1.0


class AlreadyRunning(VisitwatchError):
    pass


class Service:
    """Everything the daemon and the CLI commands share, built from one config."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.store = Store(config.daemon.database)
        self.policy = Policy(config.policy)
        config_dir = config.path.resolve().parent if config.path else config.daemon.state_dir
        self.context = ConnectorContext(
            timezone=config.daemon.timezone,
            state_dir=config.daemon.state_dir,
            config_dir=config_dir,
            user_agent=f"visitwatch/{__version__}",
            public_base_url=config.daemon.public_base_url or "",
        )
        self.channel_configs: Mapping[str, ConnectorConfig] = {c.name: c for c in config.channels}
        self.channels: dict[str, Channel] = {
            # mypy cannot take an abstract class for type[C] (python/mypy#4717).
            c.name: _built(c, Channel, self.context)  # type: ignore[type-abstract]
            for c in config.channels
        }
        self.sources: dict[str, CalendarSource] = {}
        self.source_errors: dict[str, str] = {}
        for source_config in config.sources:
            try:
                self.sources[source_config.name] = _built(
                    source_config,
                    CalendarSource,  # type: ignore[type-abstract]
                    self.context,
                )
            except Exception as err:
                # One broken source must not stop the others from being watched.
                text = str(err) if isinstance(err, VisitwatchError) else repr(err)
                self.source_errors[source_config.name] = text
                log.error("source_unusable", source=source_config.name, error=text)
        # Signed check-in and acknowledge links, when the pages are served ([web]).
        self.signer: Signer | None = None
        links = None
        if config.web.enabled:
            self.signer = Signer(load_keys(config.web.signing_key, config.daemon.state_dir))
            links = Links(self.signer, config.daemon.public_base_url, config.web.link_ttl)
        self.watcher = Watcher(self.store, config, self.clock, links=links)
        self.syncer = Syncer(self.store, config, self.policy, self.watcher, self.clock)
        self.health = HealthMonitor(self.store, config, self.watcher, self.clock)
        self.health.source_errors = self.source_errors  # sources that could not be built
        self.dispatcher = Dispatcher(
            self.store,
            self.channels,
            self.channel_configs,
            self.clock,
            delivery_deadline=config.daemon.delivery_deadline,
            send_timeout=config.daemon.send_timeout,
            notify_admins=self.health.notify,
        )
        self.people = PeopleLearner(self.watcher.staff, self.clock)
        self.syncer.learn = self.people.learn
        # Outlook change notifications, when they can work ([web], https, a Graph source):
        # a notification asks for a read; polls and those reads never overlap.
        self.reads = SourceReads(self.sync, self.sources)
        feeds = {n: f for n, s in self.sources.items() if (f := s.change_feed()) is not None}
        self.subscriptions = subscriptions_for(
            config, feeds, self.clock, self.reads.request_sync, self._admin_notice
        )
        self.lock = DaemonLock(config.daemon.database)
        self._stop = threading.Event()
        self._health_checked = -HEALTH_EVERY  # monotonic: the loop's last health check
        self._polls: Polls | None = None
        self._loops: dict[str, Loop] = {}
        self._clock_steps = ClockSteps()
        self._watchdog = DeliveryWatchdog(
            lambda subject, text: self._tell_admins_from_memory(subject, text, local_ok=True)
        )
        # The database could not be written at the last sweep.
        self._record_down = Episode(log, "record_unwritable", "record_writable_again")
        # Delivery counts as stuck (no watchdog ping, an admin notice) after this long.
        self.stall_limit = 2 * config.daemon.sweep_interval.total_seconds() + 30
        # What /healthz and /metrics know beyond the record (web/context.py).
        self.activity = Activity()
        self._pages: PagesKeeper | None = None
        self._heartbeat: Heartbeat | None = None  # the external monitor (heartbeat.py)

    # ------------------------------------------------------------------ one pass

    def sync(self, name: str) -> SyncReport:
        started = time.monotonic()
        report = self.syncer.sync(self.sources[name])
        self.activity.synced(name, time.monotonic() - started, report.ok)
        return report

    def sync_all(self) -> list[SyncReport]:
        reports = [self.sync(name) for name in self.sources]
        reports += [
            SyncReport(name, ok=False, error=error) for name, error in self.source_errors.items()
        ]
        return reports

    def sweep(self, health: bool = True) -> int:
        """Advance what is due and check health (unless ``health`` is false); how many
        visits changed or notices were written."""
        started = time.monotonic()
        try:
            changed = self.watcher.sweep()
        except sqlite3.Error as err:
            if not record_unwritable(err):
                raise
            self._sweep_from_memory(err)
            self._swept(started)
            return 0
        self._swept(started)
        self._record_down.end()
        if not health:
            return changed
        try:
            notices = self.health.check()
        except Exception:  # a health check must never stop the sweep that raises alerts
            log.exception("health_check_failed")
            notices = 0
        return changed + notices

    def _swept(self, started: float) -> None:
        self.activity.sweeps.observe(time.monotonic() - started)
        self.activity.last_sweep = self.clock.now()

    def _sweep_from_memory(self, err: sqlite3.Error) -> None:
        """The record cannot be written (a full disk): alerts still go out, from memory.

        They go through channels that need no local write (console, e-mail, Graph mail),
        each once; when the disk frees, the sweep writes them into the record and the
        dispatcher marks them sent instead of sending them again. An admin is told at
        once, and the log says it once per episode.
        """
        if self._record_down.begin(error=str(err)):
            self._tell_admins_from_memory(
                "visitwatch: the record cannot be written",
                f"visitwatch cannot write its database ({err}); the disk may be full. "
                "Alerts that fall due still go out through the channels that need no "
                "local file, but they are not being recorded. Free space where "
                f"{self.config.daemon.database} lives; the record catches up by itself.",
            )
        self.dispatcher.send_unrecorded(self.watcher.unrecorded_alerts(self.clock.now()))

    def dispatch(self, wait: float | None = None) -> DispatchReport:
        """Deliver what is due; ``wait`` as in :meth:`Dispatcher.dispatch`."""
        return self.dispatcher.dispatch(wait)

    def write_back(self) -> int:
        """Mirror state changes onto calendar entries (best effort, see ``write_back.py``)."""
        return write_back_pass(self.store, self.sources)

    def run_once(self) -> tuple[list[SyncReport], int, DispatchReport]:
        """One sync of every source, one sweep, one delivery pass (``visitwatch sync``)."""
        self.acquire_lock()
        try:
            reports = self.sync_all()
            changed = self.sweep()
            delivered = self.dispatch()
            self.write_back()
            return reports, changed, delivered
        finally:
            self.lock.release()

    # ------------------------------------------------------------------ daemon

    def acquire_lock(self) -> None:
        if not self.lock.acquire():
            raise AlreadyRunning(
                f"another visitwatch daemon (pid {self.lock.holder()}) is using "
                f"{self.config.daemon.database}; only one may run per database"
            )

    def run(self, install_signal_handlers: bool = True) -> None:
        self.acquire_lock()
        finished = False
        try:
            if install_signal_handlers:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
                # A CLI action (check-in, ack, help) asks the daemon to look now.
                signal.signal(signal.SIGUSR1, self._on_wake)
            self.start()
            log.info(
                "daemon_started",
                version=__version__,
                sources=len(self.sources),
                channels=len(self.channels),
                database=str(self.config.daemon.database),
            )
            sd_notify("READY=1")
            self._stop.wait()
            log.info("daemon_stopping")
            sd_notify("STOPPING=1")
            finished = self.stop_loops()
        finally:
            # A thread still inside a slow call keeps its database connection; the process
            # exits around it (SQLite's journal makes that as safe as a crash).
            self.close(store=finished)
            self.lock.release()
        log.info("daemon_stopped", clean=finished)

    def stop(self) -> None:
        self._stop.set()

    def _on_wake(self, _signum: int, _frame: Any) -> None:
        self.wake()

    def wake(self) -> None:
        """Sweep and deliver now: another process changed the record."""
        for name in ("sweep", "dispatch"):
            loop = self._loops.get(name)
            if loop is not None:
                loop.wake()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop()

    # ------------------------------------------------------------------ the loops

    def start(self) -> None:
        """Start the sweep, delivery and write-back loops and the calendar polls."""
        interval = self.config.daemon.sweep_interval.total_seconds()
        self._loops = {
            "sweep": Loop("sweep", self._sweep_step, interval, self._stop),
            "dispatch": Loop("dispatch", self._dispatch_step, interval, self._stop),
            "write_back": Loop("write_back", self._write_back_step, interval, self._stop),
            "retention": retention_loop(
                self.store, self.config, self.clock, self._stop, self._admin_notice
            ),
        }
        self.watcher.wake = self._loops["sweep"].wake
        self.dispatcher.on_progress = self._loops["dispatch"].wake
        self.activity.started = self.clock.now()
        for loop in self._loops.values():
            loop.start()
        self._heartbeat = heartbeat_for(
            self.config, self.store, self.clock, self._loops,
            lambda: self._record_down.on, self.stall_limit,
        )  # fmt: skip
        self.reads.start()
        self._polls = Polls(self.reads.read, self.sources, self.config.daemon.poll_interval)
        if self.config.web.enabled:  # a busy address is told to the admins, never fatal
            from visitwatch.daemon.web.server import PagesKeeper, WebServer

            self._pages = PagesKeeper(WebServer(self.web_context()), self._admin_notice)
            self._pages.start()
        if self.subscriptions is not None:  # after the pages: Graph checks the endpoints
            self.subscriptions.start()

    def web_context(self) -> WebContext:
        """What the pages share with the loops (``[web]`` must be enabled)."""
        assert self.signer is not None, "[web] is not enabled"
        return WebContext(
            self.config, self.store, self.watcher, self.clock, self.signer, wake=self.wake,
            extras={
                "activity": self.activity,
                "source_errors": self.source_errors,
                "subscriptions": self.subscriptions,
            },
        )  # fmt: skip

    def _admin_notice(self, key: str, subject: str, text: str) -> None:
        """Tell the admins now (from memory when the record cannot be written)."""
        try:
            with self.store.transaction() as conn:
                self.health.notify(
                    conn, f"{key}:{ts(self.clock.now())}", subject, text, self.clock.now()
                )
        except sqlite3.Error:
            self._tell_admins_from_memory(subject, text)
            return
        self.wake()

    def stop_loops(self, timeout: float = 5.0) -> bool:
        """Stop everything within ``timeout`` seconds; True when no work was left running.

        Work in flight is either finished or safely left: a notification is marked sent
        only after its channel accepted it, so an interrupted send is sent again on start.
        """
        self._stop.set()
        deadline = time.monotonic() + timeout
        pages_stopped = True
        if self.subscriptions is not None:
            self.subscriptions.stop(timeout=min(2.0, timeout / 3))
        self.reads.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._pages is not None:
            # First: no page acts on the record while the loops wind down.
            pages_stopped = self._pages.stop(min(3.0, timeout / 2))
            self._pages = None
        for loop in self._loops.values():
            loop.wake()
        if self._polls is not None:
            self._polls.shutdown()
            self._polls = None
        finished = pages_stopped and all(
            loop.join(max(0.0, deadline - time.monotonic())) for loop in self._loops.values()
        )
        # A lane inside a send that never returns is left behind; its row is still pending
        # and goes out again on the next start.
        finished &= self.dispatcher.close(min(2.0, max(0.0, deadline - time.monotonic())))
        # A poll inside a quick read (a file, a feed on the LAN) finishes within the time
        # left; one stuck in a slow read is left behind (its transaction rolls back).
        while (busy := polls_in_flight()) and time.monotonic() < deadline:
            time.sleep(0.01)
        if busy:
            log.warning("stopping_with_polls_in_flight", polls=busy)
        return finished and not busy

    def _sweep_step(self) -> float | None:
        self._clock_steps.check(self._on_clock_step)
        # The health check (a write transaction of its own) runs at most once a
        # HEALTH_EVERY, however often page actions wake the sweep.
        mono = time.monotonic()
        health = not 0 <= mono - self._health_checked < HEALTH_EVERY
        if health:
            self._health_checked = mono
        written = self.sweep(health)
        if written:
            self._loops["dispatch"].wake()
        self._watchdog.check(self._loops["dispatch"].heartbeat, self.stall_limit)
        delay = seconds_until(self.watcher.next_due(), self.clock.now())
        # Deadlines a moment apart share one pass (a burst costs one commit per batch, not
        # one per deadline); a write that makes something due wakes the loop at once.
        delay = None if delay is None else max(delay, SWEEP_GAP)
        if not health:  # the check this wake skipped runs when it is owed, not a tick later
            owed = max(self._health_checked + HEALTH_EVERY - time.monotonic(), SWEEP_GAP)
            delay = owed if delay is None else min(delay, owed)
        return delay

    def _dispatch_step(self) -> float | None:
        started = self.clock.now()
        self.dispatcher.dispatch(wait=0)
        self.activity.last_dispatch = self.clock.now()
        return seconds_until(self.dispatcher.next_due(after=started), self.clock.now())

    def _write_back_step(self) -> float | None:
        self.write_back()
        return None

    def _tell_admins_from_memory(self, subject: str, text: str, *, local_ok: bool = False) -> None:
        """An admin notice that cannot wait for the record (or for the delivery loop)."""
        self.dispatcher.send_unrecorded(
            [("", m) for m in self.health.admin_messages(subject, text)], local_ok=local_ok
        )

    def _on_clock_step(self) -> None:
        """After a wall-clock step, recompute every deadline's next action and run every poll
        now: times computed (by us, and by APScheduler for the polls) on the old clock are
        wrong by the size of the step."""
        self.watcher.reconsider_all()
        if self._polls is not None:
            self._polls.run_all_now()

    def close(self, store: bool = True) -> None:
        # A lane still inside a send keeps its database connection: closing it under a
        # running statement could crash the process, so the record is closed only once
        # every lane has finished (else the process exit closes it).
        lanes_done = self.dispatcher.close(2.0)
        for connector in [*self.sources.values(), *self.channels.values()]:
            try:
                connector.close()
            except Exception:
                log.exception("close_failed", connector=connector.name)
        if store and lanes_done:
            self.store.close()


def _built(config: ConnectorConfig, kind: type[C], context: ConnectorContext) -> C:
    """The connector ``config`` describes; the registry gave its class for a ``kind``."""
    connector = config.cls(config.name, config.settings, context)
    if not isinstance(connector, kind):  # a registry mistake, said plainly
        raise VisitwatchError(f"{config.name}: {config.type!r} is not a {kind.__name__}")
    return connector
