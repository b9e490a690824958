"""Watching visits: the sweep, the escalation ladder, and what people do about it.

Every state change here happens in one transaction together with its audit row and the
notification rows it causes (principle 2: a crash can lose neither). A change is claimed
with a conditional UPDATE on the row's ``version``, so a change made concurrently (a check-in
from the CLI while the daemon sweeps) is never overwritten. Rows are read inside the write
transaction that changes them; should a claim still lose, the action re-reads the row and
tries again, so a conflict never reaches the user and no calendar edit is dropped.

Every alert reaches someone: an addressee no channel can reach is named in an admin notice
(:func:`admin_addressees`), and only if the admins cannot be reached either is it logged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.notification import Message, Recipient
from visitwatch.daemon import lifecycle, messages
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config, ConnectorConfig, Directory, StaffMember
from visitwatch.daemon.lifecycle import TERMINAL, VisitClock
from visitwatch.daemon.store import Store, from_ts, record_unwritable, ts
from visitwatch.policies.model import EscalationStep

log = structlog.get_logger(__name__)

ALERT_KINDS = ("reminder", "overrun", "escalation", "help")
# Visits advanced per transaction: one commit (one fsync) per batch, not per visit, and the
# write lock is released between batches so a check-in never waits long.
SWEEP_BATCH = 500
# A claim lost to a concurrent writer is retried this many times before the user hears of it.
CONFLICT_RETRIES = 5
_ADDRESS_LABELS = {"email": "e-mail address", "mobile": "mobile number"}

T = TypeVar("T")


# Pending notifications of these kinds are not sent once their visit is resolved.
SUPERSEDED_BY_RESOLUTION = (*ALERT_KINDS, "compliance", "extended", "removed")


class ActionError(VisitwatchError):
    """A check-in or acknowledgement that cannot be done (unknown visit, already resolved)."""


class VersionConflict(Exception):
    """The visit changed between reading and claiming it; re-read it and try again."""


@dataclass(frozen=True)
class Addressee:
    recipient: Recipient
    relation: str  # worker, manager, role:director, staff, or "<relation> (fallback)"


def _recipient_of(member: StaffMember) -> Recipient:
    return Recipient(member.id, member.name, member.email, member.mobile)


def admin_addressees(directory: Directory) -> list[Addressee]:
    """Who hears of problems with visitwatch: the "admin" role, else directors, else managers."""
    for role in ("admin", "director", "manager"):
        people = directory.with_role(role)
        if people:
            return [Addressee(_recipient_of(p), f"role:{role}") for p in people]
    return []


class Watcher:
    def __init__(
        self,
        store: Store,
        config: Config,
        clock: Clock,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.directory = config.directory
        self.ladder: tuple[EscalationStep, ...] = (
            config.policy.escalation or lifecycle.default_ladder(config.policy.grace)
        )
        self.ack_timeout = config.policy.ack_timeout
        self.tz = config.daemon.timezone
        # Called after a committed write that may make something due sooner than the sweep
        # expected (a new or edited visit, a check-in, an ack, a help request).
        self.wake: Callable[[], None] = wake or (lambda: None)
        self._failing: set[str] = set()  # visits whose last sweep raised (logged once)

    # ------------------------------------------------------------------ sweep

    def sweep(self, batch: int = SWEEP_BATCH) -> int:
        """Advance every visit whose next action is due, in batches. Returns how many changed."""
        now = self.clock.now()
        changed = 0
        after: tuple[str, str] = ("", "")  # (next_action_at, id) of the last visit seen
        while True:
            with self.store.transaction() as conn:
                # Read inside the write transaction: nothing can change these rows under us.
                rows = self.store.query(
                    "SELECT * FROM visits WHERE next_action_at IS NOT NULL"
                    " AND next_action_at <= ? AND (next_action_at > ?"
                    " OR (next_action_at = ? AND id > ?))"
                    " ORDER BY next_action_at, id LIMIT ?",
                    (ts(now), after[0], after[0], after[1], batch),
                )
                for row in rows:
                    changed += self._advance_safely(conn, row, now)
                if len(rows) < batch:
                    # In the last batch's transaction: one commit (one fsync) per sweep.
                    self.store.set_meta("last_sweep_at", ts(now) or "")
                    break
            after = (rows[-1]["next_action_at"], rows[-1]["id"])
        return changed

    def reconsider_all(self) -> int:
        """Make every watched visit due now (after a wall-clock step): the sweep recomputes
        each one's next action from its stored deadline, instead of trusting times computed
        on a clock that was wrong."""
        now = ts(self.clock.now())
        with self.store.transaction() as conn:
            changed = conn.execute(
                "UPDATE visits SET next_action_at = ? WHERE next_action_at > ?", (now, now)
            ).rowcount
        self.wake()
        return changed

    def next_due(self) -> datetime | None:
        """When the sweep next has something to do (through the visits_next_action index)."""
        row = self.store.one(
            "SELECT MIN(next_action_at) AS due FROM visits WHERE next_action_at IS NOT NULL"
        )
        return from_ts(row["due"]) if row else None

    def _advance_safely(self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime) -> int:
        try:
            changed = self._advance(row, now)  # a savepoint: a failure rolls back this visit
        except sqlite3.Error as err:
            if record_unwritable(err):
                raise  # not this visit's fault: the whole sweep goes from memory
            return self._advance_failed(conn, row, now, err)
        except Exception as err:
            return self._advance_failed(conn, row, now, err)
        if row["id"] in self._failing:
            self._failing.discard(row["id"])
            log.info("sweep_recovered", visit_id=row["id"])
        return changed

    def _advance_failed(
        self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime, err: Exception
    ) -> int:
        # One bad row must not stall every other visit: look again in a minute.
        conn.execute(
            "UPDATE visits SET next_action_at = ? WHERE id = ?",
            (ts(now + timedelta(minutes=1)), row["id"]),
        )
        if row["id"] not in self._failing:
            self._failing.add(row["id"])
            log.error("sweep_failed", visit_id=row["id"], exc_info=err)
            self._sweep_failure_notice(conn, row, now, err)
        return 0

    def clock_of(self, row: dict[str, Any]) -> VisitClock:
        prestart_due = None
        if not row["prestart_notice_sent"] and self._has_errors(row):
            prestart_due = from_ts(row["start"]) - self.config.policy.notice_before_start
        return VisitClock(
            state=row["state"],
            start=from_ts(row["start"]),
            deadline=from_ts(row["deadline"]),
            step=row["step"],
            repeats=row["repeats"],
            acknowledged_at=from_ts(row["acknowledged_at"]),
            help_requested_at=from_ts(row["help_requested_at"]),
            prestart_notice_due=prestart_due,
            ack_realerts=row["ack_realerts"],
        )

    def _advance(self, row: dict[str, Any], now: datetime) -> int:
        stored = self.clock_of(row)
        plan = lifecycle.plan(stored, self.ladder, now, self.ack_timeout)
        with self.store.transaction() as conn:
            claimed = conn.execute(
                "UPDATE visits SET state = ?, step = ?, repeats = ?, ack_realerts = ?,"
                " next_action_at = ?, prestart_notice_sent = prestart_notice_sent OR ?,"
                " version = version + 1, updated = ? WHERE id = ? AND version = ?",
                (
                    plan.state,
                    plan.step,
                    plan.repeats,
                    plan.ack_realerts,
                    ts(plan.next_action_at),
                    int(plan.prestart_notice),
                    ts(now),
                    row["id"],
                    row["version"],
                ),
            ).rowcount
            if not claimed:
                return 0  # changed under us; the next sweep sees the new version
            if plan.state != row["state"]:
                self.store.audit(
                    conn,
                    row["id"],
                    now,
                    "deadline passed" if plan.alerts else "time",
                    "visitwatch",
                    row["state"],
                    plan.state,
                )
            elif plan.ack_realerts > stored.ack_realerts:
                minutes = int(self.ack_timeout.total_seconds() // 60)
                self.store.audit(
                    conn,
                    row["id"],
                    now,
                    f"acknowledged and still unresolved after {minutes} min: re-alerted",
                    "visitwatch",
                    row["state"],
                    plan.state,
                )
            fresh = {**row, "state": plan.state, "step": plan.step, "repeats": plan.repeats}
            for alert, token, addressees in self._alert_targets(row, fresh, plan):
                rung = f"{row['deadline']}:{alert.step_index}"
                self.notify(conn, fresh, alert.kind, addressees, now, token, rung=rung)
                log.info(
                    "alert_raised",
                    visit_id=row["id"],
                    kind=alert.kind,
                    step=alert.step_index,
                    repeat=alert.repeat,
                    recipients=len(addressees),
                )
            if plan.prestart_notice:
                self._compliance_notice(conn, fresh, now, "prestart")
        return 1 if plan.differs_from(stored) else 0

    def _alert_targets(
        self, row: dict[str, Any], fresh: dict[str, Any], plan: lifecycle.Plan
    ) -> list[tuple[lifecycle.Alert, str, list[Addressee]]]:
        """Each alert of ``plan`` with its idempotency token and the people it goes to."""
        found = []
        for alert in plan.alerts:
            token = f"{row['deadline']}:{alert.step_index}:{alert.repeat}:{int(alert.help)}"
            if alert.ack_round:
                token += f":ack{alert.ack_round}"
            skip_worker = alert.help  # the worker asked for help; do not remind them
            targets = self.addressees(alert.step.to, fresh)
            if row["acknowledged_at"]:
                # An ack covers what was raised; what comes after goes to the acker too.
                targets += self.acknowledger(fresh)
            chosen: dict[str, Addressee] = {}
            for target in targets:
                if not (skip_worker and target.relation == "worker"):
                    chosen.setdefault(target.recipient.id, target)
            found.append((alert, token, list(chosen.values())))
        return found

    def unrecorded_alerts(self, now: datetime) -> list[tuple[str, Message]]:
        """The alerts due now, built in memory without writing anything.

        For when the record cannot be written (a full disk): the sweep cannot claim visits
        or queue notifications, but the alerts they would raise must still go out. Each
        comes with the notification key it would have had (minus the channel), so that
        when the record catches up nothing is sent twice.
        """
        rows = self.store.query(
            "SELECT * FROM visits WHERE next_action_at IS NOT NULL AND next_action_at <= ?",
            (ts(now),),
        )
        found = []
        for row in rows:
            try:
                plan = lifecycle.plan(self.clock_of(row), self.ladder, now, self.ack_timeout)
                fresh = {**row, "state": plan.state, "step": plan.step, "repeats": plan.repeats}
                view = self.view(fresh)
                for alert, token, addressees in self._alert_targets(row, fresh, plan):
                    for addressee in addressees:
                        subject, text = messages.alert(view, alert.kind, now, addressee.relation)
                        key = f"{row['id']}|{alert.kind}|{token}|{addressee.recipient.id}"
                        found.append(
                            (
                                key,
                                Message(
                                    0,
                                    alert.kind,
                                    row["id"],
                                    addressee.recipient,
                                    "",
                                    subject,
                                    text,
                                    now,
                                ),
                            )
                        )
            except Exception:  # one bad row must not hide the others' alerts
                log.exception("unrecorded_alert_failed", visit_id=row["id"])
        return found

    # ------------------------------------------------------------------ people

    def addressees(self, targets: Iterable[str], row: dict[str, Any]) -> list[Addressee]:
        found: dict[str, Addressee] = {}

        def add(recipient: Recipient, relation: str) -> None:
            found.setdefault(recipient.id, Addressee(recipient, relation))

        for target in targets:
            if target == "worker":
                add(self.worker_recipient(row), "worker")
            elif target == "manager":
                managers = self._managers_of(row)
                for member, relation in managers:
                    add(self._recipient(member), relation)
            elif target.startswith("role:"):
                for member in self.directory.with_role(target.removeprefix("role:")):
                    add(self._recipient(member), target)
            else:
                member = self.directory.get(target)
                if member:
                    add(self._recipient(member), "staff")
        return list(found.values())

    def _managers_of(self, row: dict[str, Any]) -> list[tuple[Any, str]]:
        worker = self.directory.get(row["worker_id"])
        manager = self.directory.get(worker.manager) if worker and worker.manager else None
        if manager:
            return [(manager, "manager")]
        # Nobody on record manages this worker: an overrun must still reach someone.
        for role in ("director", "admin", "manager"):
            people = self.directory.with_role(role)
            if people:
                return [(p, f"manager (fallback: role {role})") for p in people]
        return []

    @staticmethod
    def _recipient(member: Any) -> Recipient:
        return _recipient_of(member)

    def acknowledger(self, row: dict[str, Any]) -> list[Addressee]:
        """Whoever acknowledged, if the name given with ``--by`` is someone in the directory."""
        member = self.directory.find(row["acknowledged_by"] or "")
        if member is None:
            log.info("acknowledger_not_in_directory", visit_id=row["id"])
            return []
        return [Addressee(self._recipient(member), "acknowledged")]

    def worker_recipient(self, row: dict[str, Any]) -> Recipient:
        member = self.directory.get(row["worker_id"])
        if member:
            mobile = member.mobile or row["worker_mobile"]
            return Recipient(member.id, member.name, member.email, mobile)
        email = row["worker_id"] if "@" in row["worker_id"] else ""
        return Recipient(
            row["worker_id"] or "unknown-worker",
            row["worker_label"] or "Unknown worker",
            email,
            row["worker_mobile"],
        )

    def view(self, row: dict[str, Any]) -> messages.VisitView:
        worker = self.worker_recipient(row)
        return messages.VisitView(row, worker.name, worker.mobile, self.tz, self.config.policy)

    # ------------------------------------------------------------------ notifications

    def notify(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        kind: str,
        addressees: Iterable[Addressee],
        now: datetime,
        token: str,
        by: str = "",
        rung: str = "",
    ) -> int:
        """Write one notification row per recipient and channel (sent later by the dispatcher).

        An alert to someone no channel can reach becomes an admin notice naming them (once per
        visit, rung and person; ``rung`` defaults to ``token``).
        """
        view = self.view(row)
        written = 0
        for addressee in addressees:
            channels = self.channels_for(kind, addressee.recipient)
            if not channels:
                if kind in ALERT_KINDS:
                    self._unreachable(conn, row, kind, addressee, now, rung or token)
                continue
            relation = addressee.relation
            if kind in ALERT_KINDS:
                subject, text = messages.alert(view, kind, now, relation)
            elif kind == "compliance":
                subject, text = messages.compliance(view, now, relation, token == "prestart")
            else:
                subject, text = messages.resolution(view, kind, now, by)
            for channel in channels:
                written += enqueue(
                    conn,
                    row["id"],
                    kind,
                    addressee,
                    channel.name,
                    subject,
                    text,
                    now,
                    f"{row['id']}|{kind}|{token}",
                )
        return written

    def channels_for(
        self, kind: str, recipient: Recipient, *, any_kind: bool = False
    ) -> list[ConnectorConfig]:
        """The channels that take ``kind`` for ``recipient`` (``any_kind``: ignore ``kinds``)."""
        chosen = []
        for channel in self.config.channels:
            if not any_kind and channel.kinds is not None and kind not in channel.kinds:
                continue
            needs = getattr(channel.cls, "address_field", None)
            if needs and not getattr(recipient, needs, ""):
                continue  # e.g. e-mail for someone with no address; other channels still go
            chosen.append(channel)
        return chosen

    def why_unreachable(self, kind: str, recipient: Recipient) -> str:
        """Why no channel takes a ``kind`` notification for ``recipient``, in a few words."""
        carrying = [c for c in self.config.channels if c.kinds is None or kind in c.kinds]
        if not carrying:
            return f"no channel is configured to carry {kind} notifications"
        reasons = []
        for channel in carrying:
            needs = getattr(channel.cls, "address_field", None) or "address"
            label = _ADDRESS_LABELS.get(needs, needs)
            reasons.append(f"no {label} on record, which channel {channel.name!r} needs")
        return "; ".join(reasons)

    def _unreachable(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        kind: str,
        addressee: Addressee,
        now: datetime,
        rung: str,
    ) -> None:
        """Nobody is silently skipped: tell the admins who could not be reached, and why."""
        person = addressee.recipient
        why = self.why_unreachable(kind, person)
        subject = f"visitwatch: a {kind} alert could not reach {person.name}"
        text = (
            f"A {kind} alert for visit {row['id']} could not be sent to {person.name} "
            f"({addressee.relation}): {why}.\n\n"
            f"{person.name} has not been told by visitwatch. If the visit still needs "
            "attention, reach them another way now. Then add the missing detail to the "
            "staff directory ([[staff]] in the config, or Microsoft 365) or configure a "
            "channel that can reach them; `visitwatch check` lists everyone the ladder "
            "cannot reach."
        )
        key = f"admin|unreachable|{row['id']}|{kind}|{rung}|{person.id}"
        reached = False
        for admin in admin_addressees(self.directory):
            for channel in self.channels_for("admin", admin.recipient):
                reached = True
                enqueue(conn, row["id"], "admin", admin, channel.name, subject, text, now, key)
        log.warning(
            "recipient_unreachable", visit_id=row["id"], kind=kind, relation=addressee.relation
        )
        if not reached:
            # The admins cannot be reached either; the service's last resort takes it from here.
            log.error("admin_unreachable", visit_id=row["id"], kind=kind)

    def _sweep_failure_notice(
        self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime, err: Exception
    ) -> None:
        """A visit the sweep cannot process is a visit nobody is watching: an admin must know."""
        subject = "visitwatch: a visit cannot be watched"
        text = (
            f"The sweep could not process visit {row['id']} ({type(err).__name__}: {err}). "
            "visitwatch tries again every minute, but until it succeeds this visit's "
            "reminders and alerts may not go out. Check on the worker another way, and see "
            "the daemon's log (event sweep_failed)."
        )
        key = f"admin|sweep_failed|{row['id']}|{row['deadline']}"
        for admin in admin_addressees(self.directory):
            for channel in self.channels_for("admin", admin.recipient):
                enqueue(conn, row["id"], "admin", admin, channel.name, subject, text, now, key)

    def alerted(self, conn: sqlite3.Connection, visit_id: str) -> list[Addressee]:
        """Everyone (but the worker) who was told this visit needed attention."""
        rows = conn.execute(
            "SELECT recipient_id, recipient_name, recipient_email, recipient_mobile,"
            " recipient_relation FROM notifications WHERE visit_id = ? AND (kind IN"
            " ('overrun', 'escalation', 'help') OR (kind = 'reminder'"
            " AND recipient_relation != 'worker')) AND fallback_of IS NULL"
            " AND status != 'superseded'"
            " GROUP BY recipient_id ORDER BY MIN(id)",
            (visit_id,),
        ).fetchall()
        return [Addressee(Recipient(r[0], r[1], r[2], r[3]), r[4]) for r in rows]

    def _has_errors(self, row: dict[str, Any]) -> bool:
        return any(f.get("severity") == "error" for f in json.loads(row["findings"] or "[]"))

    def _compliance_notice(
        self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime, token: str
    ) -> None:
        targets = (
            ["worker", "manager"] if self.config.policy.notify_manager_of_findings else ["worker"]
        )
        self.notify(conn, row, "compliance", self.addressees(targets, row), now, token)
        log.info("compliance_notice", visit_id=row["id"], when=token)

    # ------------------------------------------------------------------ actions

    def find_visit(self, ref: str) -> dict[str, Any]:
        """A visit by id or unique id prefix, or ``#N`` for the visit of alert number N."""
        ref = ref.strip().lower()
        if ref.startswith("#"):
            number = ref[1:]
            note = self.store.one(
                "SELECT visit_id FROM notifications WHERE id = ?",
                (int(number) if number.isdigit() else -1,),
            )
            if not note or not note["visit_id"]:
                raise ActionError(f"no alert {ref}; `visitwatch status` lists the visits")
            ref = note["visit_id"]
        if len(ref) < 4:
            raise ActionError(f"give at least 4 characters of the visit id, not {ref!r}")
        rows = self.store.query(
            "SELECT * FROM visits WHERE substr(id, 1, ?) = ? LIMIT 2", (len(ref), ref)
        )
        if not rows:
            raise ActionError(f"no visit {ref!r}; `visitwatch status` lists them")
        if len(rows) > 1:
            raise ActionError(f"{ref!r} matches more than one visit; give more of the id")
        return rows[0]

    def current(self, visit_id: str) -> dict[str, Any]:
        """The visit as stored now (read inside the write transaction that will change it)."""
        row = self.store.one("SELECT * FROM visits WHERE id = ?", (visit_id,))
        if row is None:
            raise ActionError(f"no visit {visit_id!r}; `visitwatch status` lists them")
        return row

    def retrying(self, visit_id: str, action: Callable[[dict[str, Any]], T]) -> T:
        """Run ``action`` on the freshly read visit in one transaction; retry lost claims.

        A conflict is ours to resolve, never the user's: the row is read again and the action
        redone from what is stored now. Only a visit that keeps changing gives up, clearly.
        """
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                with self.store.transaction():
                    return action(self.current(visit_id))
            except VersionConflict:
                log.info("visit_changed_retrying", visit_id=visit_id, attempt=attempt)
        raise ActionError(
            f"visit {visit_id} kept changing while this was being recorded "
            f"({CONFLICT_RETRIES} tries), so nothing was changed. Run the command again; "
            "if this keeps happening, look at the daemon's log."
        )

    def _change(
        self, row: dict[str, Any], now: datetime, cause: str, actor: str, fields: dict[str, Any]
    ) -> sqlite3.Connection:
        """Claim ``row`` and apply ``fields`` inside the caller's open transaction.

        Raises :class:`VersionConflict` if the row is no longer the version read.
        """
        conn = self.store.db.conn
        fields = self._repeats_after_move(row, now, fields)
        assignments = ", ".join(f'"{k}" = ?' for k in fields)
        claimed = conn.execute(
            f"UPDATE visits SET {assignments}, version = version + 1, updated = ?"
            " WHERE id = ? AND version = ?",
            (*fields.values(), ts(now), row["id"], row["version"]),
        ).rowcount
        if not claimed:
            raise VersionConflict(row["id"])
        self.store.audit(
            conn, row["id"], now, cause, actor, row["state"], fields.get("state", row["state"])
        )
        return conn

    def _repeats_after_move(
        self, row: dict[str, Any], now: datetime, fields: dict[str, Any]
    ) -> dict[str, Any]:
        """A deadline moved under a repeating top rung, without restarting the ladder (a
        calendar edit to a time already past): count its repeats from the new deadline.

        Otherwise a deadline moved earlier makes the next repeat due at once, right after
        the alert that just went out (the ladder's rungs fire once per deadline, I4).
        """
        last = self.ladder[-1] if self.ladder else None
        moved = "deadline" in fields and fields["deadline"] != row["deadline"]
        if not moved or "step" in fields or last is None or last.repeat is None:
            return fields
        if row["step"] < len(self.ladder):
            return fields
        base = from_ts(fields["deadline"]) + last.after
        helped = from_ts(row["help_requested_at"])
        if helped is not None:
            base = min(base, helped)  # as lifecycle.step_due_at: help pulls rungs forward
        # The repeats due by now under the new deadline count as sent: the last alert just
        # went out. (Keeping a larger count from the old deadline would read as a clock
        # that went back, and resend at once.)
        return {**fields, "repeats": max(int((now - base) / last.repeat), 0)}

    def _wake(self) -> None:
        """Wake the sweep after a commit; inside someone else's transaction, they wake it."""
        if not self.store.db.conn.in_transaction:
            self.wake()

    def _require_started(self, row: dict[str, Any], now: datetime, doing: str) -> None:
        """A check-in or acknowledgement only ever applies to a visit that has begun (I5)."""
        start = from_ts(row["start"])
        if start is not None and now < start:
            raise ActionError(
                f"cannot {doing} visit {row['id']} yet: it starts at "
                f"{messages.fmt_local(start, self.tz)}, and a {doing.split()[0]} only counts "
                "once the visit has started. To say it will run longer, use "
                f"`visitwatch checkin {row['id']} --extend 30m`, or edit the calendar entry."
            )

    def check_in(
        self, ref: str, by: str = "", via: str = "cli", extend: timedelta | None = None
    ) -> dict[str, Any]:
        """Check in (or extend); ``by`` defaults to the visit's worker.

        A check-in before the visit starts is refused; an extension is not (it only moves the
        deadline later, and the visit stays watched).
        """
        visit_id = self.find_visit(ref)["id"]
        if extend is not None and extend <= timedelta(0):
            raise ActionError("--extend needs a positive duration such as 30m")
        now = self.clock.now()

        def act(row: dict[str, Any]) -> None:
            actor = by or row["worker_label"] or "worker"
            if row["state"] in TERMINAL:
                raise ActionError(
                    f"visit {row['id']} is already {row['state']}; nothing to check in"
                )
            if extend is None:
                self._require_started(row, now, "check in")
                self._resolve(
                    row,
                    now,
                    actor,
                    via,
                    "checkin",
                    "checked in",
                    f"checked in by {actor} via {via}",
                    {"checked_in_at": ts(now), "checked_in_by": actor},
                )
                return
            until = max(from_ts(row["deadline"]), now) + extend
            conn = self._change(
                row,
                now,
                f"extended by {extend}",
                actor,
                {
                    "state": lifecycle.IN_PROGRESS
                    if now >= from_ts(row["start"])
                    else row["state"],
                    "extended_until": ts(until),
                    "deadline": ts(until),
                    "step": 0,
                    "repeats": 0,
                    "acknowledged_at": None,
                    "acknowledged_by": None,
                    "ack_realerts": 0,
                    "help_requested_at": None,
                    "next_action_at": ts(now),
                },
            )
            self._record_checkin(conn, row["id"], now, "extend", actor, via, minutes=extend)
            fresh = {**row, "deadline": ts(until)}
            self.notify(
                conn,
                fresh,
                "extended",
                self.alerted(conn, row["id"]),
                now,
                f"extend:{ts(until)}",
                actor,
            )

        self.retrying(visit_id, act)
        self._wake()
        log.info("checked_in", visit_id=visit_id, via=via, extended=bool(extend))
        return self.current(visit_id)

    def _resolve(
        self,
        row: dict[str, Any],
        now: datetime,
        by: str,
        via: str,
        action: str,
        cause: str,
        how: str,
        fields: dict[str, Any],
    ) -> None:
        """End the visit as safe, record who and how, and tell everyone who was alerted."""
        conn = self._change(row, now, cause, by, {
            "state": lifecycle.RESOLVED, "ended_at": ts(now), "next_action_at": None, **fields,
        })  # fmt: skip
        self._record_checkin(conn, row["id"], now, action, by, via)
        # Alerts still waiting to go out would now be false alarms: the worker is safe.
        conn.execute(
            "UPDATE notifications SET status = 'superseded', next_attempt_at = NULL,"
            " last_error = ? WHERE visit_id = ? AND status = 'pending' AND kind IN"
            f" ({', '.join(repr(k) for k in SUPERSEDED_BY_RESOLUTION)})",
            (f"not sent: the visit was resolved first ({how})", row["id"]),
        )
        # One all clear per resolution: a visit re-opened and resolved again gets another.
        token = f"resolved:{ts(now)}"
        self.notify(conn, row, "all_clear", self.alerted(conn, row["id"]), now, token, how)

    def acknowledge(
        self, ref: str, by: str, safe: bool = False, via: str = "cli"
    ) -> dict[str, Any]:
        """Record who is handling an overdue visit (or, with ``safe``, that the worker is safe).

        An acknowledgement covers the alerts raised so far: later rungs still go out, to the
        acknowledger too, and after ``ack_timeout`` unresolved it re-alerts (lifecycle.plan).
        Acknowledging again restarts that timeout.
        """
        by = by.strip()
        if not by:
            raise ActionError('say who is acknowledging: --by "Your Name"')
        visit_id = self.find_visit(ref)["id"]
        now = self.clock.now()

        def act(row: dict[str, Any]) -> None:
            if row["state"] in TERMINAL:
                raise ActionError(f"visit {row['id']} is already {row['state']}")
            self._require_started(row, now, "acknowledge")
            if safe:
                self._resolve(
                    row,
                    now,
                    by,
                    via,
                    "confirmed_safe",
                    "acknowledged and confirmed safe",
                    f"confirmed safe by {by}",
                    {
                        "acknowledged_at": row["acknowledged_at"] or ts(now),
                        "acknowledged_by": row["acknowledged_by"] or by,
                    },
                )
                return
            conn = self._change(
                row,
                now,
                "acknowledged",
                by,
                {
                    "state": lifecycle.ACKNOWLEDGED,
                    "acknowledged_at": ts(now),
                    "acknowledged_by": by,
                    "ack_realerts": 0,
                    "next_action_at": ts(now),
                },
            )
            self._record_checkin(conn, row["id"], now, "ack", by, via)

        self.retrying(visit_id, act)
        self._wake()
        log.info("acknowledged", visit_id=visit_id, safe=safe)
        return self.current(visit_id)

    def request_help(self, ref: str, by: str = "", via: str = "cli") -> dict[str, Any]:
        """Alert the whole ladder now; ``by`` defaults to the visit's worker.

        Unlike a check-in, a help request is taken even before the visit starts: it can only
        raise alerts, never silence one.
        """
        visit_id = self.find_visit(ref)["id"]
        now = self.clock.now()

        def act(row: dict[str, Any]) -> None:
            actor = by or row["worker_label"] or "worker"
            if row["state"] in TERMINAL:
                raise ActionError(f"visit {row['id']} is already {row['state']}")
            # Every rung fires again at once, as "help", from the bottom of the ladder.
            conn = self._change(
                row,
                now,
                "help requested",
                actor,
                {
                    "state": lifecycle.ESCALATED,
                    "help_requested_at": ts(now),
                    "step": 0,
                    "repeats": 0,
                    "acknowledged_at": None,
                    "acknowledged_by": None,
                    "ack_realerts": 0,
                    "next_action_at": ts(now),
                },
            )
            self._record_checkin(conn, row["id"], now, "help", actor, via)

        self.retrying(visit_id, act)
        log.warning("help_requested", visit_id=visit_id, via=via)
        # Raise the help alerts now, in this process (the CLI's, or the daemon's sync), rather
        # than wait for the daemon's next sweep; should that fail, the sweep still does it.
        with self.store.transaction() as conn:
            self._advance_safely(conn, self.current(visit_id), now)
        self._wake()
        return self.current(visit_id)

    def end_monitoring(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        now: datetime,
        reason: str,
        state: str = lifecycle.CANCELLED,
    ) -> None:
        """Cancelled or removed from the calendar: stop, and tell anyone who was alerted.

        ``row`` may be stale (read before the caller's transaction): the visit is read again
        here, inside it, so the change cannot be lost to a concurrent sweep.
        """
        row = self.current(row["id"])
        if row["state"] in TERMINAL:
            return
        self._change(
            row,
            now,
            reason,
            "calendar",
            {
                "state": state,
                "ended_at": ts(now),
                "next_action_at": None,
            },
        )
        self.notify(conn, row, "ended", self.alerted(conn, row["id"]), now, "ended", reason)

    @staticmethod
    def _record_checkin(
        conn: sqlite3.Connection,
        visit_id: str,
        now: datetime,
        action: str,
        by: str,
        via: str,
        **detail: Any,
    ) -> None:
        conn.execute(
            "INSERT INTO checkins (visit_id, at, action, actor, via, detail) VALUES (?,?,?,?,?,?)",
            (visit_id, ts(now), action, by, via, json.dumps(detail, default=str)),
        )


def enqueue(
    conn: sqlite3.Connection,
    visit_id: str | None,
    kind: str,
    addressee: Addressee,
    channel: str,
    subject: str,
    text: str,
    now: datetime,
    key_base: str,
) -> int:
    """Insert one notification unless the same one exists (idempotency key)."""
    r = addressee.recipient
    return conn.execute(
        "INSERT OR IGNORE INTO notifications (key, visit_id, kind, recipient_id, recipient_name,"
        " recipient_email, recipient_mobile, recipient_relation, channel, subject, text, created,"
        " next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            f"{key_base}|{r.id}|{channel}",
            visit_id,
            kind,
            r.id,
            r.name,
            r.email,
            r.mobile,
            addressee.relation,
            channel,
            subject,
            text,
            ts(now),
            ts(now),
        ),
    ).rowcount
