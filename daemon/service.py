"""The running daemon: connectors, scheduler, signals and the systemd watchdog.

APScheduler only wakes things up. Three kinds of job, each on its own executor so that a
slow calendar or a hanging mail server can never delay the sweep that raises alerts:

- ``sync:<source>`` every poll interval, on a small thread pool;
- ``sweep`` every sweep interval, alone on its own thread;
- ``dispatch`` every sweep interval, and at once whenever a sweep wrote notifications.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from visitwatch.connectors.base import (
    CalendarSource,
    Channel,
    ConnectorContext,
    ConnectorError,
    VisitwatchError,
)
from visitwatch.daemon import __version__
from visitwatch.daemon.clock import Clock, SystemClock
from visitwatch.daemon.config import Config, ConnectorConfig, StaffMember
from visitwatch.daemon.dispatch import Dispatcher, DispatchReport
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.health import HealthMonitor
from visitwatch.daemon.store import DaemonLock, Store, ts
from visitwatch.daemon.sync import Syncer, SyncReport
from visitwatch.policies import Policy

log = structlog.get_logger(__name__)


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
        )
        self.channel_configs: Mapping[str, ConnectorConfig] = {c.name: c for c in config.channels}
        self.channels: dict[str, Channel] = {
            c.name: c.cls(c.name, c.settings, self.context) for c in config.channels
        }
        self.sources: dict[str, CalendarSource] = {}
        self.source_errors: dict[str, str] = {}
        for source_config in config.sources:
            try:
                self.sources[source_config.name] = source_config.cls(
                    source_config.name, source_config.settings, self.context
                )
            except Exception as err:
                # One broken source must not stop the others from being watched.
                text = str(err) if isinstance(err, VisitwatchError) else repr(err)
                self.source_errors[source_config.name] = text
                log.error("source_unusable", source=source_config.name, error=text)
        self.watcher = Watcher(self.store, config, self.clock)
        self.syncer = Syncer(self.store, config, self.policy, self.watcher, self.clock)
        self.dispatcher = Dispatcher(self.store, self.channels, self.channel_configs, self.clock)
        self.health = HealthMonitor(self.store, config, self.watcher, self.clock)
        self._directories: dict[str, Any] = {}
        self._not_in_directory: dict[str, datetime] = {}
        self.syncer.learn = self.learn_people
        self.lock = DaemonLock(config.daemon.database)
        self._stop = threading.Event()
        self._scheduler: BackgroundScheduler | None = None

    # ------------------------------------------------------------------ people

    def learn_people(self, source: CalendarSource, ids: set[str]) -> None:
        """Fill the staff directory from the source's Microsoft 365 tenant, if it offers one.

        Config values always win; people and managers only Graph knows are added. Ids Graph
        does not know (a family's address on an invitation) are not asked about again for a
        day.
        """
        if not source.settings.get("directory") or not hasattr(source, "client"):
            return
        from visitwatch.connectors.graph_directory import GraphDirectory

        now = self.clock.now()
        recently_missing = {
            i for i, when in self._not_in_directory.items() if now - when < timedelta(days=1)
        }
        ids -= recently_missing
        if not ids:
            return
        directory = self._directories.get(source.name)
        if directory is None:
            directory = GraphDirectory(source.client, self.config.daemon.state_dir, self.clock.now)
            self._directories[source.name] = directory
        try:
            people = directory.lookup(ids)
            managers = {p.manager_id for p in people.values() if p.manager_id}
            people.update(directory.lookup(managers - set(people)))
        except Exception:  # the directory is a convenience; visits are watched without it
            log.exception("directory_lookup_failed", source=source.name)
            return
        for missing in ids - set(people):
            self._not_in_directory[missing] = now
        merged = self.watcher.directory.filled_from(
            StaffMember(p.id.lower(), p.name, p.email, p.mobile, "worker",
                        (p.manager_id or "").lower())
            for p in people.values()
        )  # fmt: skip
        self.watcher.directory = self.syncer.directory = merged
        log.info("directory_updated", source=source.name, people=len(people))

    # ------------------------------------------------------------------ one pass

    def sync(self, name: str) -> SyncReport:
        return self.syncer.sync(self.sources[name])

    def sync_all(self) -> list[SyncReport]:
        reports = [self.sync(name) for name in self.sources]
        reports += [
            SyncReport(name, ok=False, error=error) for name, error in self.source_errors.items()
        ]
        return reports

    def sweep(self) -> int:
        changed = self.watcher.sweep()
        try:
            self.health.check()
        except Exception:  # a health check must never stop the sweep that raises alerts
            log.exception("health_check_failed")
        _sd_notify("WATCHDOG=1")  # the sweep is alive; systemd restarts us if this stops
        return changed

    def dispatch(self) -> DispatchReport:
        report = self.dispatcher.dispatch()
        self.write_back()
        return report

    def write_back(self) -> int:
        """Mirror state changes onto calendar entries, for sources that can and are asked to.

        Driven by the audit table (a change is written there in the same transaction as the
        change itself), so a restart resumes where it stopped. Best effort: this is a
        courtesy for office staff watching Outlook, never a substitute for an alert.
        """
        writers = {
            name: source
            for name, source in self.sources.items()
            if source.settings.get("write_back") and hasattr(source, "write_back")
        }
        if not writers:
            return 0
        last = int(self.store.get_meta("write_back_audit_id") or 0)
        rows = self.store.query(
            "SELECT a.id, a.to_state, v.source, v.uid, v.recurrence_id FROM audit a"
            " JOIN visits v ON v.id = a.visit_id WHERE a.id > ? AND a.to_state IN"
            " ('overdue', 'escalated', 'resolved', 'acknowledged') ORDER BY a.id LIMIT 200",
            (last,),
        )
        done = 0
        for row in rows:
            source = writers.get(row["source"])
            if source is not None:
                try:
                    source.write_back(row["uid"], row["recurrence_id"], row["to_state"])
                    done += 1
                except ConnectorError as err:
                    log.warning("write_back_failed", source=row["source"], error=str(err))
            last = row["id"]
        self.store.set_meta("write_back_audit_id", str(last))
        return done

    def run_once(self) -> tuple[list[SyncReport], int, DispatchReport]:
        """One sync of every source, one sweep, one delivery pass (``visitwatch sync``)."""
        self.acquire_lock()
        try:
            reports = self.sync_all()
            changed = self.sweep()
            return reports, changed, self.dispatch()
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
        try:
            if install_signal_handlers:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
            self.start_scheduler()
            log.info(
                "daemon_started",
                version=__version__,
                sources=len(self.sources),
                channels=len(self.channels),
                database=str(self.config.daemon.database),
            )
            _sd_notify("READY=1")
            self._stop.wait()
            log.info("daemon_stopping")
            _sd_notify("STOPPING=1")
            self.stop_scheduler()
        finally:
            self.close()
            self.lock.release()
        log.info("daemon_stopped")

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self.stop()

    def start_scheduler(self) -> BackgroundScheduler:
        daemon = self.config.daemon
        scheduler = BackgroundScheduler(
            executors={
                "sync": ThreadPoolExecutor(max_workers=4),
                "sweep": ThreadPoolExecutor(max_workers=1),
                "dispatch": ThreadPoolExecutor(max_workers=1),
            },
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        now = self.clock.now()
        sweep_seconds = daemon.sweep_interval.total_seconds()
        for index, name in enumerate(self.sources):
            scheduler.add_job(
                self._guarded,
                "interval",
                args=("sync", self.sync, name),
                id=f"sync:{name}",
                seconds=daemon.poll_interval.total_seconds(),
                executor="sync",
                # A missed poll is simply done late; the next one is never skipped twice.
                misfire_grace_time=int(daemon.poll_interval.total_seconds()),
                next_run_time=now + timedelta(milliseconds=100 * index),
            )
        scheduler.add_job(
            self._guarded,
            "interval",
            args=("sweep", self._sweep_and_wake),
            id="sweep",
            seconds=sweep_seconds,
            executor="sweep",
            misfire_grace_time=max(1, int(sweep_seconds)),
            next_run_time=now + timedelta(seconds=1),
        )
        scheduler.add_job(
            self._guarded,
            "interval",
            args=("dispatch", self.dispatch),
            id="dispatch",
            seconds=sweep_seconds,
            executor="dispatch",
            misfire_grace_time=max(1, int(sweep_seconds)),
            next_run_time=now,
        )
        scheduler.start()
        self._scheduler = scheduler
        return scheduler

    def _sweep_and_wake(self) -> None:
        self.sweep()
        pending = self.store.one(
            "SELECT 1 FROM notifications WHERE status = 'pending' AND next_attempt_at <= ? LIMIT 1",
            (ts(self.clock.now()),),
        )
        if pending and self._scheduler is not None:
            self._scheduler.modify_job("dispatch", next_run_time=self.clock.now())

    @staticmethod
    def _guarded(job: str, func: Any, *args: Any) -> None:
        # A failing job is logged and retried at its next interval; it never stops the daemon.
        try:
            func(*args)
        except ConnectorError as err:
            log.warning("job_failed", job=job, error=str(err))
        except Exception:
            log.exception("job_crashed", job=job)

    def stop_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)  # in-flight sync, sweep and sends finish
            self._scheduler = None

    def close(self) -> None:
        for connector in [*self.sources.values(), *self.channels.values()]:
            try:
                connector.close()
            except Exception:
                log.exception("close_failed", connector=connector.name)
        self.store.close()


def _sd_notify(state: str) -> None:
    """Tell systemd (Type=notify, WatchdogSec=) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("sd_notify_failed", error=str(err))
