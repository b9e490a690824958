"""Watching visits: the sweep, the escalation ladder, and what people do about it.

Every state change here happens in one transaction together with its audit row and the
notification rows it causes (principle 2: a crash can lose neither). A change is claimed
with a conditional UPDATE on the row's ``version``, so a change made concurrently (a check-in
from the CLI while the daemon sweeps) is never overwritten: the loser re-reads next sweep.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import Recipient, VisitwatchError
from visitwatch.daemon import lifecycle, messages
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config, ConnectorConfig
from visitwatch.daemon.lifecycle import TERMINAL, VisitClock
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.policies.model import EscalationStep

log = structlog.get_logger(__name__)

ALERT_KINDS = ("reminder", "overrun", "escalation", "help")


class ActionError(VisitwatchError):
    """A check-in or acknowledgement that cannot be done (unknown visit, already resolved)."""


@dataclass(frozen=True)
class Addressee:
    recipient: Recipient
    relation: str  # worker, manager, role:director, staff, or "<relation> (fallback)"


class Watcher:
    def __init__(self, store: Store, config: Config, clock: Clock) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.directory = config.directory
        self.ladder: tuple[EscalationStep, ...] = (
            config.policy.escalation or lifecycle.default_ladder(config.policy.grace)
        )
        self.tz = config.daemon.timezone

    # ------------------------------------------------------------------ sweep

    def sweep(self, limit: int = 500) -> int:
        """Advance every visit whose next action is due. Returns how many changed."""
        now = self.clock.now()
        rows = self.store.query(
            "SELECT * FROM visits WHERE next_action_at IS NOT NULL AND next_action_at <= ?"
            " ORDER BY next_action_at LIMIT ?",
            (ts(now), limit),
        )
        changed = 0
        for row in rows:
            try:
                changed += self._advance(row, now)
            except Exception:
                # One bad row must not stall every other visit: look again in a minute.
                log.exception("sweep_failed", visit_id=row["id"])
                with self.store.transaction() as conn:
                    conn.execute(
                        "UPDATE visits SET next_action_at = ? WHERE id = ?",
                        (ts(now + timedelta(minutes=1)), row["id"]),
                    )
        self.store.set_meta("last_sweep_at", ts(now) or "")
        return changed

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
            acknowledged=row["acknowledged_at"] is not None,
            help_requested_at=from_ts(row["help_requested_at"]),
            prestart_notice_due=prestart_due,
        )

    def _advance(self, row: dict[str, Any], now: datetime) -> int:
        stored = self.clock_of(row)
        plan = lifecycle.plan(stored, self.ladder, now)
        with self.store.transaction() as conn:
            claimed = conn.execute(
                "UPDATE visits SET state = ?, step = ?, repeats = ?, next_action_at = ?,"
                " prestart_notice_sent = prestart_notice_sent OR ?, version = version + 1,"
                " updated = ? WHERE id = ? AND version = ?",
                (
                    plan.state,
                    plan.step,
                    plan.repeats,
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
            fresh = {**row, "state": plan.state, "step": plan.step, "repeats": plan.repeats}
            for alert in plan.alerts:
                token = f"{row['deadline']}:{alert.step_index}:{alert.repeat}:{int(alert.help)}"
                skip_worker = alert.help  # the worker asked for help; do not remind them
                addressees = [
                    a
                    for a in self.addressees(alert.step.to, fresh)
                    if not (skip_worker and a.relation == "worker")
                ]
                self.notify(conn, fresh, alert.kind, addressees, now, token)
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
        return Recipient(member.id, member.name, member.email, member.mobile)

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
    ) -> int:
        """Write one notification row per recipient and channel (sent later by the dispatcher)."""
        view = self.view(row)
        written = 0
        for addressee in addressees:
            relation = addressee.relation
            if kind in ALERT_KINDS:
                subject, text = messages.alert(view, kind, now, relation)
            elif kind == "compliance":
                subject, text = messages.compliance(view, now, relation, token == "prestart")
            else:
                subject, text = messages.resolution(view, kind, now, by)
            for channel in self.channels_for(kind, addressee.recipient):
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

    def channels_for(self, kind: str, recipient: Recipient) -> list[ConnectorConfig]:
        chosen = []
        for channel in self.config.channels:
            if channel.kinds is not None and kind not in channel.kinds:
                continue
            needs = getattr(channel.cls, "address_field", None)
            if needs and not getattr(recipient, needs, ""):
                continue  # e.g. e-mail for someone with no address; other channels still go
            chosen.append(channel)
        return chosen

    def alerted(self, conn: sqlite3.Connection, visit_id: str) -> list[Addressee]:
        """Everyone (but the worker) who was told this visit needed attention."""
        rows = conn.execute(
            "SELECT recipient_id, recipient_name, recipient_email, recipient_mobile,"
            " recipient_relation FROM notifications WHERE visit_id = ? AND kind IN"
            " ('overrun', 'escalation', 'help') AND fallback_of IS NULL"
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

    def _change(
        self, row: dict[str, Any], now: datetime, cause: str, actor: str, fields: dict[str, Any]
    ) -> sqlite3.Connection:
        """Claim ``row`` and apply ``fields`` inside the caller's open transaction."""
        conn = self.store.db.conn
        assignments = ", ".join(f'"{k}" = ?' for k in fields)
        claimed = conn.execute(
            f"UPDATE visits SET {assignments}, version = version + 1, updated = ?"
            " WHERE id = ? AND version = ?",
            (*fields.values(), ts(now), row["id"], row["version"]),
        ).rowcount
        if not claimed:
            raise ActionError(f"visit {row['id']} changed at the same moment; try again")
        self.store.audit(
            conn, row["id"], now, cause, actor, row["state"], fields.get("state", row["state"])
        )
        return conn

    def check_in(
        self, ref: str, by: str = "", via: str = "cli", extend: timedelta | None = None
    ) -> dict[str, Any]:
        """Check in (or extend); ``by`` defaults to the visit's worker."""
        row = self.find_visit(ref)
        by = by or row["worker_label"] or "worker"
        now = self.clock.now()
        if row["state"] in TERMINAL:
            raise ActionError(f"visit {row['id']} is already {row['state']}; nothing to check in")
        with self.store.transaction():
            if extend is not None:
                if extend <= timedelta(0):
                    raise ActionError("--extend needs a positive duration such as 30m")
                until = max(from_ts(row["deadline"]), now) + extend
                conn = self._change(
                    row,
                    now,
                    f"extended by {extend}",
                    by,
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
                        "help_requested_at": None,
                        "next_action_at": ts(now),
                    },
                )
                self._record_checkin(conn, row["id"], now, "extend", by, via, minutes=extend)
                fresh = {**row, "deadline": ts(until)}
                self.notify(
                    conn,
                    fresh,
                    "extended",
                    self.alerted(conn, row["id"]),
                    now,
                    f"extend:{ts(until)}",
                    by,
                )
            else:
                self._resolve(
                    row,
                    now,
                    by,
                    via,
                    "checkin",
                    "checked in",
                    f"checked in by {by} via {via}",
                    {"checked_in_at": ts(now), "checked_in_by": by},
                )
        log.info("checked_in", visit_id=row["id"], via=via, extended=bool(extend))
        return self.find_visit(row["id"])

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
        self.notify(conn, row, "all_clear", self.alerted(conn, row["id"]), now, "resolved", how)

    def acknowledge(
        self, ref: str, by: str, safe: bool = False, via: str = "cli"
    ) -> dict[str, Any]:
        row = self.find_visit(ref)
        now = self.clock.now()
        if row["state"] in TERMINAL:
            raise ActionError(f"visit {row['id']} is already {row['state']}")
        with self.store.transaction():
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
            else:
                conn = self._change(
                    row,
                    now,
                    "acknowledged",
                    by,
                    {
                        "state": lifecycle.ACKNOWLEDGED,
                        "acknowledged_at": ts(now),
                        "acknowledged_by": by,
                        "next_action_at": ts(now),
                    },
                )
                self._record_checkin(conn, row["id"], now, "ack", by, via)
        log.info("acknowledged", visit_id=row["id"], safe=safe)
        return self.find_visit(row["id"])

    def request_help(self, ref: str, by: str = "", via: str = "cli") -> dict[str, Any]:
        """Alert the whole ladder now; ``by`` defaults to the visit's worker."""
        row = self.find_visit(ref)
        by = by or row["worker_label"] or "worker"
        now = self.clock.now()
        if row["state"] in TERMINAL:
            raise ActionError(f"visit {row['id']} is already {row['state']}")
        with self.store.transaction():
            # Every rung fires again at once, as "help", from the bottom of the ladder.
            conn = self._change(
                row,
                now,
                "help requested",
                by,
                {
                    "state": lifecycle.ESCALATED,
                    "help_requested_at": ts(now),
                    "step": 0,
                    "repeats": 0,
                    "acknowledged_at": None,
                    "acknowledged_by": None,
                    "next_action_at": ts(now),
                },
            )
            self._record_checkin(conn, row["id"], now, "help", by, via)
        log.warning("help_requested", visit_id=row["id"], via=via)
        self.sweep()
        return self.find_visit(row["id"])

    def end_monitoring(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        now: datetime,
        reason: str,
        state: str = lifecycle.CANCELLED,
    ) -> None:
        """Cancelled or removed from the calendar: stop, and tell anyone who was alerted."""
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
