"""Calendar polls: each source read every ``poll_interval`` under APScheduler.

Each poll runs on a daemon thread of its own, so a slow calendar never delays the sweep
that raises alerts, nor another calendar, nor a stop. APScheduler times the polls by the
wall clock, so after a clock step they are all run at once (:meth:`Polls.run_all_now`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.schedulers.background import BackgroundScheduler

from visitwatch.core.errors import ConnectorError
from visitwatch.daemon.store import record_unwritable

log = structlog.get_logger(__name__)


class Polls:
    """Runs ``sync(name)`` for every source name every ``interval``, the first ones at once."""

    def __init__(self, sync: Callable[[str], object], names: Iterable[str], interval: timedelta):
        self._scheduler = BackgroundScheduler(
            executors={"default": DaemonThreadExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        now = datetime.now(UTC)
        for index, name in enumerate(names):
            self._scheduler.add_job(
                guarded,
                "interval",
                args=("sync", sync, name),
                id=f"poll:{name}",
                seconds=interval.total_seconds(),
                # A missed poll is simply done late; the next one is never skipped twice.
                misfire_grace_time=int(interval.total_seconds()),
                next_run_time=now + timedelta(milliseconds=100 * index),
            )
        self._scheduler.start()

    def run_all_now(self) -> None:
        """Run every poll now: times APScheduler computed on a stepped clock are wrong."""
        now = datetime.now(UTC)
        for job in self._scheduler.get_jobs():
            job.modify(next_run_time=now)
        self._scheduler.wakeup()

    def shutdown(self) -> None:
        # wait=False: waiting here would hold APScheduler's lock while a poll finishes.
        self._scheduler.shutdown(wait=False)


def polls_in_flight() -> int:
    """How many polls are still inside a read (their threads are named after their job)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("poll:"))


def guarded(job: str, func: Callable[..., object], *args: Any) -> None:
    """Run a job; a failing one is logged and retried at its next interval, never fatal."""
    try:
        func(*args)
    except ConnectorError as err:
        log.warning("job_failed", job=job, error=str(err))
    except sqlite3.Error as err:
        if not record_unwritable(err):
            log.exception("job_crashed", job=job)
        else:  # the sweep reports this once per episode; no traceback every poll
            log.warning("job_skipped", job=job, reason="the record cannot be written")
    except Exception:
        log.exception("job_crashed", job=job)


class DaemonThreadExecutor(BaseExecutor):
    """APScheduler executor running each job on a daemon thread of its own.

    A pool's threads are joined when the interpreter exits, so a poll stuck in a slow read
    would hold up a stop; a daemon thread is left behind instead (its transaction, if
    any, rolls back like a crash's). ``max_instances`` still keeps one run per job.
    """

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        def target() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as err:
                self._run_job_error(job.id, err, err.__traceback__)
            else:
                self._run_job_success(job.id, events)

        threading.Thread(target=target, name=f"{job.id}", daemon=True).start()
