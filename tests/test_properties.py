"""The lifecycle's promises, checked by a stateful property test over the real daemon parts.

A hypothesis ``RuleBasedStateMachine`` drives the real store, sync (an ICS file on disk),
sweep and dispatch of a :class:`Service`, with an injected clock that starts half an hour
before the UK clocks go forward (2027-03-28 01:00 UTC), and scripted channels that accept,
fail for a while, fail for good, or hang. Its rules add, edit, move, cancel and delete
calendar entries (with "Return by:" lines, a second worker, and the "Safe" and "Help"
categories), move time by seconds to hours, check in, extend, acknowledge (with and without
``--safe``), ask for help, break and mend channels, restart the process over the same
database, and sweep and deliver. After every step these promises must hold, read from the
database and from what the channels really accepted:

Terms. The *grace* is the ``after`` of the first ladder rung addressed to the manager. A
visit's *ladder epoch* begins when it is first seen, and again whenever its deadline moves
to a moment still in the future (an extension, or a calendar edit) or a finished visit
re-opens: notifications belong to the epoch in which they were written. A notification
*reaches* someone when its row is ``sent`` or ``pending``. *Alert kinds* are reminder,
overrun, escalation and help.

- I0 (the record follows the calendar): an active visit's deadline is its entry's
  "Return by" time (else its end), or a later extension.
- I1: every visit still active at a sweep that ran at or after its deadline + grace has
  an overrun (or escalation, or help) notification to its manager written in the current
  ladder epoch that reaches them, or an admin notice that the manager could not be reached,
  or (if that alert failed) an admin notice about the failure or its channel.
- I2: every notification is ``sent`` (and then the channel really accepted it), or
  ``pending`` with a ``next_attempt_at``, or ``failed`` with, by the next sweep, a delivered
  fallback copy or an admin notice about it or its channel (an admin notice that failed:
  another copy of it that reaches an admin). A notification still pending
  ``delivery_deadline`` after it was written has, by the next delivery pass, an admin notice
  about its channel's outage. None blocks another: once a delivery pass is over, no
  notification due on a channel that works is still waiting.
- I3: after a visit is resolved no alert for it is written or delivered, only the all-clear
  and admin notices, save a help request the worker made before checking in themself
  (a SAFE soon after HELP may be made under duress: the help still goes out, then the
  all-clear); after it is cancelled or removed in the calendar none is written (one
  raised before still goes out, then the "ended" notice). Everyone who received an overrun,
  escalation or help alert for it gets the all-clear (or "ended" notice) written after
  their last alert.
- I4: within one ladder epoch each non-repeating rung (reminder, overrun) reaches each
  person on each channel at most once, and the repeating top rung at most once per moment;
  after a sweep at or after the current deadline, the worker has been reminded in this epoch
  (or asked for help themselves, or an admin was told they cannot be reached).
- I5: a check-in, acknowledgement or "confirmed safe" is never recorded for a visit before
  its start (the start the visit has once the step that recorded it is over).
- I6 (channel health): for each channel the admins get one outage notice per episode and
  one "delivering again" notice closing it, alternating, across restarts too. An alert that
  failed in its channel's outage gets no notice of its own (no flood), and is not lost: it
  reached its person another way (a fallback copy, or the same alert on another channel,
  sent or still being tried), or a notice by the next sweep names it (``#id``).

``make test`` runs a bounded number of examples; ``VISITWATCH_SOAK=1`` (``make soak``) runs
thousands.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import STAFF_MANAGERS, STAFF_WORKERS, ics_calendar, ics_event
from tests.scripted import HANG, MODES, OK, PERMANENT, TEMPORARY, ScriptedChannel
from visitwatch.connectors import registry
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon import dispatch as dispatch_module
from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.entries import visit_id
from visitwatch.daemon.lifecycle import TERMINAL
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import from_ts, ts
from visitwatch.daemon.visits import ActionError

# Half an hour before Europe/London moves from GMT to BST (01:00 UTC on 28 March 2027).
START = datetime(2027, 3, 28, 0, 30, tzinfo=UTC)
LONDON = ZoneInfo("Europe/London")
SOURCE = "team"
ALERT_KINDS = ("reminder", "overrun", "escalation", "help")
MAX_ENTRIES = 4

# Workers, their line managers, and what the directory knows about them. Dev Patel and his
# manager have no e-mail address, so an e-mail-only ladder cannot reach them.
# The shared staff (conftest.py) with Dev Patel's team between the workers and managers.
STAFF = (
    STAFF_WORKERS
    + """
[[staff]]
id = "dev.patel"
name = "Dev Patel"
mobile = "07700 900555"
manager = "lee.ward"

[[staff]]
id = "lee.ward"
name = "Lee Ward"
role = "manager"
manager = "sam.webster@example.org"
"""
    + STAFF_MANAGERS
)
WORKERS = {"": "asha.khan@example.org", "Ben Okafor": "ben.okafor@example.org",
           "Dev Patel": "dev.patel"}  # fmt: skip
MANAGER_OF = {
    "asha.khan@example.org": "maria.jones@example.org",
    "ben.okafor@example.org": "maria.jones@example.org",
    "dev.patel": "lee.ward",
}

# Channel set-ups: e-mail beside a text-message channel that reaches everyone; e-mail for
# alerts with texts only for admin notices (so some people cannot be reached); and both
# with the outbox file as their fallback.
CHANNEL_SETUPS = {
    "mail+sms": """
        [[channels]]
        name = "mail"
        type = "scripted_email"
        fallback = "sms"

        [[channels]]
        name = "sms"
        type = "scripted"
    """,
    "mail-only+admin-sms": """
        [[channels]]
        name = "mail"
        type = "scripted_email"

        [[channels]]
        name = "sms"
        type = "scripted"
        kinds = ["admin"]
    """,
    "mail+sms+outbox": """
        [[channels]]
        name = "mail"
        type = "scripted_email"
        fallback = "outbox"

        [[channels]]
        name = "sms"
        type = "scripted"
        fallback = "outbox"

        [[channels]]
        name = "outbox"
        type = "outbox"
        path = "outbox.jsonl"
    """,
}
SCRIPTED = ("mail", "sms")


class _NoJitter:
    """Stands in for ``random`` in the dispatcher: every retry waits its nominal delay."""

    @staticmethod
    def uniform(low: float, high: float) -> float:
        return (low + high) / 2


@dataclass
class Entry:
    """One calendar entry as the office wrote it."""

    uid: str
    start: datetime
    minutes: int  # duration
    return_after: int | None  # "Return by:" this many minutes after the start, or none
    worker: str  # "" for the calendar's owner, else a "Worker:" line
    category: str = ""  # "", "Safe" or "Help"
    cancelled: bool = False
    modified: datetime = START

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)

    @property
    def expected_return(self) -> datetime:
        if self.return_after is None:
            return self.end
        return self.start + timedelta(minutes=self.return_after)

    def ics(self) -> str:
        lines = ["Risk assessment: complete"]
        if self.return_after is not None:
            lines.append(f"Return by: {self.expected_return.astimezone(LONDON):%H:%M}")
        if self.worker:
            lines.append(f"Worker: {self.worker}")
        categories = ("Home Visit", self.category) if self.category else ("Home Visit",)
        return ics_event(
            self.uid,
            f"Home visit - family {self.uid[-1]}",
            self.start,
            self.end,
            description="\n".join(lines),
            location="14 Brook Street, Preston PR1 3XX",
            categories=categories,
            status="CANCELLED" if self.cancelled else "",
            last_modified=self.modified,
        )


@dataclass
class Seen:
    """What the test last saw of one visit, to tell ladder epochs apart."""

    deadline: str | None
    state: str
    start: str
    epoch_after: int = 0  # notifications with a larger id belong to the current epoch
    epoch_at: str = ""  # when the current epoch began


@dataclass
class Ledger:
    """Obligations found at one moment and checked at every step after it."""

    overdue: dict[str, str] = field(default_factory=dict)  # visit -> epoch owed an overrun
    reminded: dict[str, str] = field(default_factory=dict)  # visit -> epoch owed a reminder
    failed: set[int] = field(default_factory=set)  # failed rows a sweep has seen
    late: set[int] = field(default_factory=set)  # rows pending past the delivery deadline


def _minutes(low: int, high: int, step: int = 5) -> st.SearchStrategy[int]:
    return st.integers(low // step, high // step).map(lambda n: n * step)


class VisitLifecycle(RuleBasedStateMachine):
    """Calendar, clock, people and channels acting on one real visitwatch."""

    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        # Thousands of short runs, each committing often: RAM is faster than disk for that.
        shm = Path("/dev/shm")
        where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.folder = Path(tempfile.mkdtemp(prefix="visitwatch-props-", dir=where))
        self.clock = FrozenClock(START)
        self.calendar: dict[str, Entry] = {}
        self.ever: list[str] = []
        self.service: Service | None = None
        self.seen: dict[str, Seen] = {}
        self.ledger = Ledger()
        self.max_id = 0
        self.checked_checkins = 0
        self.last_dispatch: datetime | None = None
        self.setup = ""
        self._saved_registry = {k: registry.CHANNELS.get(k) for k in ("scripted", "scripted_email")}
        self._saved_scripts = ScriptedChannel.scripts
        # Retry jitter is random and lanes draw it in any order: fix it at its midpoint so
        # a shrunk history replays exactly.
        self._saved_random = dispatch_module.random
        dispatch_module.random = _NoJitter()  # type: ignore[assignment]
        registry.CHANNELS["scripted"] = "tests.scripted:ScriptedChannel"
        registry.CHANNELS["scripted_email"] = "tests.scripted:ScriptedEmailChannel"
        ScriptedChannel.scripts = {}

    # ------------------------------------------------------------------ world

    @initialize(setup=st.sampled_from(sorted(CHANNEL_SETUPS)))
    def build(self, setup: str) -> None:
        self.setup = setup
        config = (
            textwrap.dedent("""
                [daemon]
                database = "visitwatch.db"
                timezone = "Europe/London"

                [[sources]]
                name = "team"
                type = "ics"
                path = "calendar.ics"
                owner = "asha.khan@example.org"
            """)
            + STAFF
            + textwrap.dedent(CHANNEL_SETUPS[setup])
            + '\n[policy]\npreset = "pan-lancashire"\n'
        )
        (self.folder / "visitwatch.toml").write_text(config, encoding="utf-8")
        self.write_calendar()
        self.service = self.new_service()
        self.service.sync_all()

    def new_service(self) -> Service:
        return Service(load_config(self.folder / "visitwatch.toml"), clock=self.clock)

    def write_calendar(self) -> None:
        events = [e.ics() for e in self.calendar.values()]
        (self.folder / "calendar.ics").write_text(ics_calendar(*events), encoding="utf-8")

    def sync(self) -> None:
        self.write_calendar()
        assert self.service is not None
        self.service.sync_all()

    def teardown(self) -> None:
        for script in ScriptedChannel.scripts.values():
            script.release.set()  # never leave a lane hanging
        if self.service is not None:
            self.service.dispatcher.close(2.0)
            self.service.close()
        ScriptedChannel.scripts = self._saved_scripts
        dispatch_module.random = self._saved_random
        for key, value in self._saved_registry.items():
            if value is None:
                registry.CHANNELS.pop(key, None)
            else:
                registry.CHANNELS[key] = value
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def now(self) -> datetime:
        return self.clock.now()

    def script(self, name: str) -> Any:
        return ScriptedChannel.scripts.get(name)

    def hung(self) -> bool:
        return any(s.mode == HANG for s in ScriptedChannel.scripts.values())

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        assert self.service is not None
        return self.service.store.query(sql, params)

    def vid(self, uid: str) -> str:
        return visit_id(SOURCE, uid, "")

    # ------------------------------------------------------------------ calendar

    @rule(
        target=entries,
        starts_in=_minutes(-180, 240),
        minutes=_minutes(5, 120),
        return_after=st.none() | _minutes(0, 180),
        worker=st.sampled_from(sorted(WORKERS)),
    )
    def add_entry(self, starts_in: int, minutes: int, return_after: int | None, worker: str) -> Any:
        if len([e for e in self.calendar.values()]) >= MAX_ENTRIES:
            return multiple()
        uid = f"visit-{len(self.ever)}"
        base = self.now.replace(second=0, microsecond=0)
        self.calendar[uid] = Entry(
            uid,
            base + timedelta(minutes=starts_in),
            minutes,
            return_after,
            worker,
            modified=self.now,
        )
        self.ever.append(uid)
        self.sync()
        return uid

    @rule(
        uid=entries,
        shift=_minutes(-120, 180),
        minutes=st.none() | _minutes(5, 120),
        return_after=st.none() | st.just(-1) | _minutes(0, 180),
    )
    def edit_entry(
        self, uid: str, shift: int, minutes: int | None, return_after: int | None
    ) -> None:
        """Move the entry, change its length, or change or drop its "Return by:" line."""
        entry = self.calendar.get(uid)
        if entry is None:
            return
        entry.start += timedelta(minutes=shift)
        if minutes is not None:
            entry.minutes = minutes
        if return_after == -1:
            entry.return_after = None
        elif return_after is not None:
            entry.return_after = return_after
        entry.modified = self.now
        self.sync()

    @rule(uid=entries, category=st.sampled_from(["", "Safe", "Help"]))
    def set_category(self, uid: str, category: str) -> None:
        entry = self.calendar.get(uid)
        if entry is None:
            return
        entry.category = category
        entry.modified = self.now
        self.sync()

    @rule(uid=entries)
    def cancel_entry(self, uid: str) -> None:
        entry = self.calendar.get(uid)
        if entry is None:
            return
        entry.cancelled = True
        entry.modified = self.now
        self.sync()

    @rule(uid=entries)
    def delete_entry(self, uid: str) -> None:
        if self.calendar.pop(uid, None) is not None:
            self.sync()

    # ------------------------------------------------------------------ time

    @rule(
        seconds=st.one_of(
            st.integers(1, 59),
            st.integers(1, 59).map(lambda m: 60 * m),
            st.integers(1, 3).map(lambda h: 3600 * h),
        )
    )
    def advance(self, seconds: int) -> None:
        self.clock.advance(timedelta(seconds=seconds))

    @rule(minutes=st.integers(1, 90), ticks=st.integers(1, 6))
    def daemon_runs(self, minutes: int, ticks: int) -> None:
        """Time passes with the daemon awake: a sweep and a delivery pass every so often."""
        for _tick in range(ticks):
            self.clock.advance(timedelta(minutes=minutes) / ticks)
            self.sweep()
            self.dispatch()

    # ------------------------------------------------------------------ people

    def act(self, action: Any) -> None:
        with contextlib.suppress(ActionError):  # terminal, or not started: refused is fine
            action()

    @rule(uid=entries)
    def check_in(self, uid: str) -> None:
        assert self.service is not None
        self.act(lambda: self.service.watcher.actions.check_in(self.vid(uid)))

    @rule(uid=entries, minutes=_minutes(5, 90))
    def extend(self, uid: str, minutes: int) -> None:
        assert self.service is not None
        self.act(
            lambda: self.service.watcher.actions.check_in(
                self.vid(uid), extend=timedelta(minutes=minutes)
            )
        )

    @rule(
        uid=entries,
        safe=st.booleans(),
        by=st.sampled_from(["Maria Jones", "Sam Webster", "Lee Ward", "a duty officer"]),
    )
    def acknowledge(self, uid: str, safe: bool, by: str) -> None:
        assert self.service is not None
        self.act(lambda: self.service.watcher.actions.acknowledge(self.vid(uid), by=by, safe=safe))

    @rule(uid=entries)
    def ask_for_help(self, uid: str) -> None:
        assert self.service is not None
        self.act(lambda: self.service.watcher.actions.request_help(self.vid(uid)))

    # ------------------------------------------------------------------ channels, process

    @rule(channel=st.sampled_from(SCRIPTED), mode=st.sampled_from(MODES))
    def channel_mode(self, channel: str, mode: str) -> None:
        script = ScriptedChannel.scripts.get(channel)
        if script is not None:
            script.set(mode)
            self.settle()  # a released hung send records its failure now, not mid-step later

    def settle(self) -> None:
        """Wait (briefly) until every lane not stuck in a hung channel has finished its work."""
        assert self.service is not None
        lanes = getattr(self.service.dispatcher, "_lanes", {})
        give_up = time.monotonic() + 3.0
        while time.monotonic() < give_up:
            busy = [
                name
                for name, lane in list(lanes.items())
                if not (self.script(name) and self.script(name).mode == HANG)
                and (lane.busy_since is not None or not lane._queue.empty())
            ]
            if not busy:
                return
            time.sleep(0.005)

    @rule()
    def restart(self) -> None:
        """The process dies and starts again over the same database and config."""
        assert self.service is not None
        hung = [s for s in ScriptedChannel.scripts.values() if s.mode == HANG]
        for script in hung:
            script.release.set()  # the dead process's connections close
        self.service.dispatcher.close(2.0)
        self.service.close()
        for script in hung:
            if script.mode == HANG:
                script.release.clear()
        self.service = self.new_service()

    @rule()
    def sweep(self) -> None:
        assert self.service is not None
        failed = {
            r["id"] for r in self.query("SELECT id FROM notifications WHERE status = 'failed'")
        }
        self.service.sweep()
        # A row that failed in its channel's outage while a copy of it was still being
        # tried elsewhere was rightly not named by this sweep: it is owed a naming only by
        # the sweep after that copy fails too (found by `make soak`: the copy, on a hung
        # channel, failed between two sweeps).
        notes = self.query("SELECT * FROM notifications")
        self.ledger.failed |= {
            n["id"] for n in notes if n["id"] in failed and not self.copy_in_flight(n, notes)
        }
        at = self.now
        grace = self.grace()
        for row in self.query("SELECT * FROM visits"):
            if row["state"] in TERMINAL or row["deadline"] is None:
                continue
            seen = self.observe(row)
            if at >= from_ts(row["deadline"]) + grace:
                self.ledger.overdue.setdefault(row["id"], seen.epoch_at)
            if at >= from_ts(row["deadline"]):
                self.ledger.reminded.setdefault(row["id"], seen.epoch_at)

    @rule()
    def dispatch(self) -> None:
        assert self.service is not None
        accepts_wait = "wait" in inspect.signature(self.service.dispatch).parameters
        if self.hung() and not accepts_wait:
            return  # today's dispatch would block on the hung channel: skip it
        give_up = time.monotonic() + 1.5
        while True:
            if accepts_wait:
                self.service.dispatch(wait=0.2 if self.hung() else 1.5)
            else:
                self.service.dispatch()
            blocked = self.blocked()
            if not blocked or time.monotonic() > give_up:
                break
            time.sleep(0.01)
        self.settle()
        assert not blocked, f"I2: due notifications wait on working channels: {blocked}"
        self.last_dispatch = self.now
        deadline = (
            self.service.dispatcher.delivery_deadline
            if hasattr(self.service.dispatcher, "delivery_deadline")
            else timedelta(minutes=2)
        )
        for row in self.query(
            "SELECT id FROM notifications WHERE status = 'pending' AND created <= ?",
            (ts(self.now - deadline),),
        ):
            self.ledger.late.add(row["id"])

    def blocked(self) -> list[tuple[int, str, str]]:
        working = {"outbox"} | {n for n, s in ScriptedChannel.scripts.items() if s.mode == OK}
        rows = self.query(
            "SELECT id, channel, kind FROM notifications WHERE status = 'pending'"
            " AND next_attempt_at <= ?",
            (ts(self.now),),
        )
        return [(r["id"], r["channel"], r["kind"]) for r in rows if r["channel"] in working]

    # ------------------------------------------------------------------ bookkeeping

    def grace(self) -> timedelta:
        assert self.service is not None
        for step in self.service.watcher.ladder:
            if "manager" in step.to:
                return step.after
        raise AssertionError("the ladder has no rung for the manager")

    def observe(self, row: dict[str, Any]) -> Seen:
        """Track ladder epochs: a deadline moved into the future, or a re-opened visit."""
        seen = self.seen.get(row["id"])
        if seen is None:
            seen = Seen(row["deadline"], row["state"], row["start"], 0, "")
            self.seen[row["id"]] = seen
            return seen
        moved = (
            row["deadline"] != seen.deadline
            and row["deadline"] is not None
            and (from_ts(row["deadline"]) > self.now)
        )
        reopened = seen.state in TERMINAL and row["state"] not in TERMINAL
        if moved or reopened:
            seen.epoch_after = self.max_id
            seen.epoch_at = ts(self.now) or ""
            self.ledger.overdue.pop(row["id"], None)
            self.ledger.reminded.pop(row["id"], None)
        seen.deadline, seen.state, seen.start = row["deadline"], row["state"], row["start"]
        return seen

    # ------------------------------------------------------------------ the promises

    @invariant()
    def promises(self) -> None:
        if self.service is None:
            return
        visits = {r["id"]: r for r in self.query("SELECT * FROM visits")}
        for row in visits.values():
            self.observe(row)
        notes = self.query("SELECT * FROM notifications ORDER BY id")
        by_visit: dict[str, list[dict[str, Any]]] = {}
        for n in notes:
            by_visit.setdefault(n["visit_id"] or "", []).append(n)
        problems: list[str] = []
        problems += self.i0_record_follows_calendar(visits)
        problems += self.i1_overdue_reaches_manager(visits, by_visit, notes)
        problems += self.i2_nothing_forgotten(notes)
        problems += self.i3_nothing_after_the_end(visits, by_visit)
        problems += self.i4_each_rung_once(visits, by_visit, notes)
        problems += self.i5_no_checkin_before_start(visits)
        problems += self.i6_one_notice_per_outage(notes)
        self.max_id = max((n["id"] for n in notes), default=0)
        assert not problems, "\n".join(problems)

    def i0_record_follows_calendar(self, visits: dict[str, dict[str, Any]]) -> list[str]:
        problems = []
        for uid, entry in self.calendar.items():
            row = visits.get(self.vid(uid))
            if row is None or row["state"] in TERMINAL or entry.cancelled:
                continue
            window = self.service.syncer.window(self.now) if self.service else None
            if window and not (window.start <= entry.start and entry.end <= window.end):
                continue  # outside the calendar window: edits there are not read
            wanted = entry.expected_return
            if row["extended_until"]:
                wanted = max(wanted, from_ts(row["extended_until"]))
            if from_ts(row["deadline"]) != wanted:
                problems.append(
                    f"I0: visit {row['id']} ({uid}) has deadline {row['deadline']}, "
                    f"the calendar says {ts(wanted)}"
                )
        return problems

    def reaches_or_reported(self, n: dict[str, Any], notes: list[dict[str, Any]]) -> bool:
        """Sent or pending, or failed with (by the next sweep) a delivered fallback or a notice."""
        if n["status"] in ("sent", "pending"):
            return True
        if n["id"] not in self.ledger.failed:
            return True  # failed since the last sweep, whose health check reports it
        return self.failure_reported(n, notes)

    def failure_reported(self, n: dict[str, Any], notes: list[dict[str, Any]]) -> bool:
        if n["outage"] and n["kind"] != "admin":
            return self.reached_or_named(n, notes)
        if n["key"].startswith("admin|undelivered:"):
            # The report of a failure that fails itself ends the chain (else reports of
            # reports would never end): it is logged, and `check` lists unreachable admins.
            return True
        for other in notes:
            if other["fallback_of"] == n["id"] and other["status"] == "sent":
                return True
            if other["kind"] != "admin":
                continue
            key = other["key"]
            if key.startswith(f"admin|undelivered:{n['id']}|") or key.startswith(
                f"admin|outage:{n['channel']}:"
            ):
                return True
            if (
                n["kind"] == "admin"
                and other["id"] != n["id"]
                and other["subject"] == n["subject"]
                and other["created"] == n["created"]
                and other["status"] in ("sent", "pending")
            ):
                return True
        return False

    def i1_overdue_reaches_manager(
        self,
        visits: dict[str, dict[str, Any]],
        by_visit: dict[str, list[dict[str, Any]]],
        notes: list[dict[str, Any]],
    ) -> list[str]:
        problems = []
        for vid in list(self.ledger.overdue):
            row = visits[vid]
            if row["state"] in TERMINAL:
                continue
            seen = self.seen[vid]
            manager = MANAGER_OF.get(row["worker_id"], "")
            told = any(
                n["id"] > seen.epoch_after
                and n["kind"] in ("overrun", "escalation", "help")
                and (n["recipient_id"] == manager or n["recipient_relation"].startswith("manager"))
                and self.reaches_or_reported(n, notes)
                for n in by_visit.get(vid, [])
            )
            unreachable = any(
                n["kind"] == "admin"
                and n["key"].startswith(f"admin|unreachable|{vid}|")
                and f"|{manager}|" in n["key"]
                for n in by_visit.get(vid, [])
            )
            if not (told or unreachable):
                problems.append(
                    f"I1: visit {vid} ({row['state']}, deadline {row['deadline']}, worker "
                    f"{row['worker_id']}) is past deadline + grace and its manager {manager} "
                    "has not been alerted in this ladder epoch, nor an admin told"
                )
        return problems

    def i2_nothing_forgotten(self, notes: list[dict[str, Any]]) -> list[str]:
        problems = []
        accepted: dict[str, set[int]] = {
            name: {m.id for m in script.accepted}
            for name, script in ScriptedChannel.scripts.items()
        }
        outbox = self.folder / "outbox.jsonl"
        if outbox.exists():
            accepted["outbox"] = {r["id"] for r in read_outbox(outbox)}
        for n in notes:
            status = n["status"]
            if status == "sent":
                if n["channel"] in accepted and n["id"] not in accepted[n["channel"]]:
                    problems.append(
                        f"I2: notification {n['id']} is marked sent, but channel "
                        f"{n['channel']} never accepted it"
                    )
            elif status == "pending":
                if not n["next_attempt_at"]:
                    problems.append(f"I2: notification {n['id']} is pending with no next attempt")
                if n["id"] in self.ledger.late and not any(
                    o["kind"] == "admin" and o["key"].startswith(f"admin|outage:{n['channel']}:")
                    for o in notes
                ):
                    problems.append(
                        f"I2: notification {n['id']} ({n['kind']} on {n['channel']}) has waited "
                        "past the delivery deadline and no admin was told of the outage"
                    )
            elif status == "failed":
                if n["id"] in self.ledger.failed and not self.failure_reported(n, notes):
                    problems.append(
                        f"I2: notification {n['id']} ({n['kind']} to {n['recipient_id']} on "
                        f"{n['channel']}) failed and no admin was told "
                        f"(error: {n['last_error']})"
                    )
            elif status == "superseded":
                # Withdrawn unsent: only an alert whose visit was resolved (worker safe) after
                # it was written; the visit may since have been re-opened by a calendar edit.
                resolved = self.query(
                    "SELECT 1 FROM audit WHERE visit_id = ? AND to_state = 'resolved' AND at >= ?",
                    (n["visit_id"], n["created"]),
                )
                if n["kind"] == "admin" or not resolved:
                    problems.append(
                        f"I2: notification {n['id']} ({n['kind']}) was withdrawn unsent, but "
                        "its visit is not resolved"
                    )
            else:
                problems.append(f"I2: notification {n['id']} has unknown status {status!r}")
        return problems

    def i3_nothing_after_the_end(
        self, visits: dict[str, dict[str, Any]], by_visit: dict[str, list[dict[str, Any]]]
    ) -> list[str]:
        problems = []
        for vid, row in visits.items():
            if row["state"] not in ("resolved", "cancelled") or not row["ended_at"]:
                continue
            ended = row["ended_at"]
            closing = "all_clear" if row["state"] == "resolved" else "ended"
            rows = by_visit.get(vid, [])
            for n in rows:
                # A help request or alert already raised when the calendar cancels a visit
                # still goes out (then the "ended" notice); after a resolution it must not.
                sent_late = row["state"] == "resolved" and (n["sent_at"] or "") > ended
                # The worker's own check-in keeps a help request they made before it: those
                # asked to help hear of it, then the all clear (a SAFE may be under duress).
                # (Its fallback copies too: a copy is never new, written_late checks that.)
                raised_before = n["created"] <= ended or n["fallback_of"] is not None
                if n["kind"] == "help" and row["checked_in_at"] and raised_before:
                    sent_late = False
                written_late = n["created"] > ended and n["fallback_of"] is None
                if n["kind"] in ALERT_KINDS and (written_late or sent_late):
                    problems.append(
                        f"I3: {n['kind']} #{n['id']} to {n['recipient_id']} written at "
                        f"{n['created']} / sent at {n['sent_at']} after visit {vid} was "
                        f"{row['state']} at {ended}"
                    )
                elif (
                    n["created"] > ended
                    and n["fallback_of"] is None  # a copy of what was raised before is not new
                    and n["kind"] not in ("all_clear", "ended", "admin")
                ):
                    problems.append(
                        f"I3: {n['kind']} #{n['id']} written after visit {vid} was {row['state']}"
                    )
            last_alert: dict[str, int] = {}
            for n in rows:
                original = n["fallback_of"] is None
                # An alert withdrawn unsent when the visit was resolved told nobody anything.
                told = n["status"] != "superseded"
                if original and told and n["kind"] in ("overrun", "escalation", "help"):
                    last_alert[n["recipient_id"]] = n["id"]
            last_closing: dict[str, int] = {}
            for n in rows:
                if n["kind"] in ("all_clear", "ended"):
                    last_closing[n["recipient_id"]] = n["id"]
            missing = {who for who, alert in last_alert.items() if last_closing.get(who, 0) < alert}
            if missing:
                problems.append(
                    f"I3: visit {vid} was {row['state']} at {ended} but {sorted(missing)} "
                    f"got no {closing} after their last alert"
                )
        return problems

    def i4_each_rung_once(
        self,
        visits: dict[str, dict[str, Any]],
        by_visit: dict[str, list[dict[str, Any]]],
        notes: list[dict[str, Any]],
    ) -> list[str]:
        problems = []
        for vid in visits:
            seen = self.seen.get(vid)
            if seen is None:
                continue
            counts: dict[tuple[str, ...], list[int]] = {}
            for n in by_visit.get(vid, []):
                if n["id"] <= seen.epoch_after or n["fallback_of"] is not None:
                    continue
                if n["kind"] in ("reminder", "overrun"):
                    key: tuple[str, ...] = (n["kind"], n["recipient_id"], n["channel"])
                elif n["kind"] == "escalation":
                    key = (n["kind"], n["recipient_id"], n["channel"], n["created"])
                else:
                    continue
                counts.setdefault(key, []).append(n["id"])
            for key, ids in counts.items():
                if len(ids) > 1:
                    problems.append(
                        f"I4: visit {vid}: rung {key[0]} reached {key[1]} on {key[2]} "
                        f"{len(ids)} times in one ladder epoch (rows {ids})"
                    )
        for vid in list(self.ledger.reminded):
            row = visits[vid]
            if row["state"] in TERMINAL:
                continue
            seen = self.seen[vid]
            rows = [n for n in by_visit.get(vid, []) if n["id"] > seen.epoch_after]
            reminded = any(
                n["kind"] in ("reminder", "help")
                and n["recipient_id"] == row["worker_id"]
                and self.reaches_or_reported(n, notes)
                for n in rows
            )
            helped = bool(row["help_requested_at"])
            unreachable = any(
                n["kind"] == "admin" and n["key"].startswith(f"admin|unreachable|{vid}|reminder|")
                for n in rows
            )
            if not (reminded or helped or unreachable):
                problems.append(
                    f"I4: visit {vid} ({row['state']}) passed its deadline {row['deadline']} "
                    f"at a sweep, but worker {row['worker_id']} was not reminded in this "
                    "ladder epoch"
                )
        return problems

    def copy_in_flight(self, n: dict[str, Any], notes: list[dict[str, Any]]) -> bool:
        """A row failed in an outage, with a copy to the same person still pending."""
        if not n["outage"] or n["kind"] == "admin":
            return False
        person = self.person_key(n)
        return any(
            o["id"] != n["id"] and o["key"].startswith(person) and o["status"] == "pending"
            for o in notes
        )

    @staticmethod
    def person_key(n: dict[str, Any]) -> str:
        """The key's part naming one notice to one person, whatever its channel or copy."""
        person = n["key"]
        while person.endswith("|fallback"):
            person = person.removesuffix("|fallback")
        return person.rpartition("|")[0] + "|"

    def reached_or_named(self, n: dict[str, Any], notes: list[dict[str, Any]]) -> bool:
        """A row failed in its channel's outage: a copy went (or goes) another way, or an
        admin notice names it. A failed fallback copy answers for itself."""
        person = self.person_key(n)
        for other in notes:
            if other["fallback_of"] == n["id"]:
                return True
            if (
                other["id"] != n["id"]
                and other["key"].startswith(person)
                and other["status"] in ("sent", "pending", "superseded")
            ):
                return True
            if other["key"].startswith("admin|outage-unreached:") and (
                f"#{n['id']} " in other["text"]
            ):
                return True
        return False

    def i6_one_notice_per_outage(self, notes: list[dict[str, Any]]) -> list[str]:
        problems = []
        episodes: dict[str, list[tuple[str, str]]] = {}
        for n in notes:
            if n["kind"] != "admin":
                continue
            what, _, rest = n["key"].removeprefix("admin|").split("|")[0].partition(":")
            if what in ("outage", "recovered"):
                channel, _, episode = rest.partition(":")
                seen = episodes.setdefault(channel, [])
                if (what, episode) not in seen:
                    seen.append((what, episode))
            elif what == "undelivered":
                about = next((o for o in notes if o["id"] == int(rest)), None)
                if about and about["outage"] and about["kind"] != "admin":
                    problems.append(
                        f"I6: notification {rest} failed in an outage of {about['channel']} "
                        "and was also reported alone"
                    )
        for channel, seen in episodes.items():
            for i, (what, episode) in enumerate(seen):
                wanted = "outage" if i % 2 == 0 else "recovered"
                if what != wanted or (wanted == "recovered" and episode != seen[i - 1][1]):
                    problems.append(
                        f"I6: channel {channel}: outage and recovered notices do not "
                        f"alternate one per episode: {seen}"
                    )
                    break
        return problems

    def i5_no_checkin_before_start(self, visits: dict[str, dict[str, Any]]) -> list[str]:
        problems = []
        rows = self.query(
            "SELECT * FROM checkins WHERE id > ? ORDER BY id", (self.checked_checkins,)
        )
        for c in rows:
            self.checked_checkins = c["id"]
            if c["action"] not in ("checkin", "ack", "confirmed_safe"):
                continue
            start = visits[c["visit_id"]]["start"]
            if c["at"] < start:
                problems.append(
                    f"I5: {c['action']} by {c['actor']} via {c['via']} at {c['at']} applied "
                    f"to visit {c['visit_id']}, which starts at {start}"
                )
        return problems


BOUNDED = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LONG = settings(
    max_examples=int(os.environ.get("VISITWATCH_SOAK_EXAMPLES", "2000")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_lifecycle_promises_hold_whatever_happens() -> None:
    """I0-I5 hold after every step of random calendars, clocks, people and channel faults."""
    run_state_machine_as_test(VisitLifecycle, settings=BOUNDED)


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
def test_lifecycle_promises_hold_over_thousands_of_runs() -> None:
    """The same promises over thousands of longer runs (``make soak``)."""
    run_state_machine_as_test(VisitLifecycle, settings=LONG)


# Histories the machine found and shrank, replayed step by step so each stays a plain,
# deterministic test of its own.


def replay(setup: str, *steps: Any) -> None:
    machine = VisitLifecycle()
    try:
        machine.build(setup)
        machine.promises()
        for step in steps:
            step(machine)
            machine.promises()
    finally:
        machine.teardown()


def test_an_escalation_and_its_first_repeat_are_not_sent_together() -> None:
    """I4: a sweep that first sees a visit an hour overdue sends the top rung once."""
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=-65, minutes=5, return_after=None, worker=""),
        lambda m: m.sweep(),
    )


def test_help_alerts_are_not_delivered_after_the_visit_is_confirmed_safe() -> None:
    """I3: help asked for, then confirmed safe before delivery: only the all-clear goes out."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=0, minutes=5, return_after=None, worker=""),
        lambda m: m.ask_for_help(uid),
        lambda m: m.acknowledge(uid, safe=True, by="Maria Jones"),
        lambda m: m.advance(1),
        lambda m: m.dispatch(),
    )


def test_an_admin_notice_rejected_by_its_channel_is_reported() -> None:
    """I2: e-mail rejects an alert, then texts reject the admin notice about it: told anyway."""
    replay(
        "mail-only+admin-sms",
        lambda m: m.add_entry(starts_in=-5, minutes=5, return_after=None, worker=""),
        lambda m: m.sweep(),
        lambda m: m.channel_mode("mail", PERMANENT),
        lambda m: m.dispatch(),
        lambda m: m.sweep(),
        lambda m: m.channel_mode("sms", PERMANENT),
        lambda m: m.dispatch(),
        lambda m: m.sweep(),
    )


def test_an_outage_notice_rejected_by_the_only_other_channel_is_reported() -> None:
    """I2: an outage notice sent only to a channel that rejects it is not lost silently."""
    uid = "visit-0"
    replay(
        "mail-only+admin-sms",
        lambda m: m.add_entry(starts_in=0, minutes=5, return_after=None, worker=""),
        lambda m: m.ask_for_help(uid),
        lambda m: m.advance(120),
        lambda m: m.channel_mode("sms", PERMANENT),
        lambda m: m.dispatch(),
        lambda m: m.sweep(),
    )


def test_a_visit_reopened_and_checked_in_again_owes_no_second_all_clear() -> None:
    """I3: re-opened by a calendar move, resolved again: everyone alerted had their all-clear."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=-30, minutes=5, return_after=None, worker=""),
        lambda m: m.ask_for_help(uid),
        lambda m: m.check_in(uid),
        lambda m: m.advance(3600),
        lambda m: m.edit_entry(uid, shift=130, minutes=5, return_after=None),
        lambda m: m.daemon_runs(30, 3),
        lambda m: m.check_in(uid),
        lambda m: m.dispatch(),
    )


def test_a_visit_reopened_then_helped_gets_a_second_all_clear() -> None:
    """I3: resolved, re-opened by a calendar move, help asked, resolved: the all-clear again."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=0, minutes=5, return_after=None, worker=""),
        lambda m: m.ask_for_help(uid),
        lambda m: m.check_in(uid),
        lambda m: m.edit_entry(uid, shift=60, minutes=None, return_after=None),
        lambda m: m.ask_for_help(uid),
        lambda m: m.edit_entry(uid, shift=-60, minutes=None, return_after=None),
        lambda m: m.check_in(uid),
    )


def test_a_channel_failing_past_the_deadline_is_an_outage_even_after_its_fallback() -> None:
    """I2 (found by `make soak`): e-mail keeps failing a help alert; its text fallback goes
    out after three failures, and when the delivery deadline passes the admins are still
    told that e-mail is down."""
    replay(
        "mail+sms",
        lambda m: m.add_entry(minutes=5, return_after=None, starts_in=0, worker=""),
        lambda m: m.channel_mode("mail", TEMPORARY),
        lambda m: m.set_category(category="Help", uid="visit-0"),
        lambda m: m.daemon_runs(minutes=2, ticks=4),
    )


def _outage_notices(machine: VisitLifecycle, channel: str) -> dict[str, set[str]]:
    """The distinct outage and recovered notices (by key) the admins got about ``channel``."""
    found: dict[str, set[str]] = {"outage": set(), "recovered": set()}
    for n in machine.query("SELECT key FROM notifications WHERE kind = 'admin'"):
        for what, keys in found.items():
            if n["key"].startswith(f"admin|{what}:{channel}:"):
                keys.add(n["key"].split("|")[1])
    return found


def test_a_channel_refusing_for_good_across_a_restart_is_one_outage() -> None:
    """I6: e-mail refuses every alert for good, the process restarts mid-outage, e-mail is
    mended: one outage notice, one recovered notice, every alert reached by text."""

    def one_each(machine: VisitLifecycle) -> None:
        notices = _outage_notices(machine, "mail")
        assert len(notices["outage"]) == 1 and len(notices["recovered"]) == 1, notices

    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=-30, minutes=5, return_after=None, worker=""),
        lambda m: m.add_entry(starts_in=-20, minutes=5, return_after=None, worker="Ben Okafor"),
        lambda m: m.channel_mode("mail", PERMANENT),
        lambda m: m.daemon_runs(minutes=20, ticks=2),
        lambda m: m.restart(),
        lambda m: m.daemon_runs(minutes=30, ticks=3),
        lambda m: m.channel_mode("mail", OK),
        lambda m: m.daemon_runs(minutes=30, ticks=3),
        one_each,
    )


def test_help_then_the_workers_own_check_in_still_reaches_those_asked_to_help() -> None:
    """I3 (found while keeping help after a worker's SAFE): a Help category, an
    acknowledgement, the worker's check-in, then e-mail refuses: the help alert's text
    fallback still goes out after the check-in (it was raised before it), then the
    all-clear."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=0, minutes=5, return_after=None, worker=""),
        lambda m: m.set_category(uid, "Help"),
        lambda m: m.acknowledge(uid, safe=False, by="Maria Jones"),
        lambda m: m.edit_entry(uid, shift=0, minutes=None, return_after=None),
        lambda m: m.check_in(uid),
        lambda m: m.advance(1),
        lambda m: m.channel_mode("mail", PERMANENT),
        lambda m: m.dispatch(),
    )


def test_an_alert_whose_last_copy_fails_between_sweeps_is_named_by_the_next() -> None:
    """I2 (found by `make soak`): help to Sam fails on texts (in an outage) while its e-mail
    copy hangs, so the sweep rightly names nothing; the e-mail copy then fails too, and the
    next sweep names the alert to the admins."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.daemon_runs(minutes=1, ticks=4),
        lambda m: m.add_entry(starts_in=65, minutes=5, return_after=None, worker=""),
        lambda m: m.dispatch(),
        lambda m: m.channel_mode("sms", PERMANENT),
        lambda m: m.daemon_runs(minutes=5, ticks=2),
        lambda m: m.advance(1),
        lambda m: m.ask_for_help(uid),
        lambda m: m.channel_mode("mail", HANG),
        lambda m: m.dispatch(),
        lambda m: m.ask_for_help(uid),
        lambda m: m.advance(1500),
        lambda m: m.sweep(),
        *[lambda m: m.dispatch()] * 11,
        lambda m: m.channel_mode("mail", PERMANENT),
        lambda m: m.extend(uid, 5),
        lambda m: m.sweep(),
    )


def test_a_deadline_moved_earlier_after_an_acknowledgement_repeats_no_rung() -> None:
    """I4 (found by `make soak`): acknowledged, an hour overdue, then the entry moved five
    minutes earlier: the ladder does not send the director the same rung twice."""
    uid = "visit-0"
    replay(
        "mail+sms",
        lambda m: m.add_entry(starts_in=0, minutes=5, return_after=None, worker=""),
        lambda m: m.acknowledge(uid, safe=False, by="Maria Jones"),
        lambda m: m.advance(3600),
        lambda m: m.sweep(),
        lambda m: m.edit_entry(uid, shift=-5, minutes=None, return_after=None),
        lambda m: m.sweep(),
    )
