"""Who a notification goes to: the staff directory, ladder targets, fallbacks.

:class:`StaffDirectory` is the one holder of the directory. Sync, escalation and health all
read it through the same holder; when Microsoft 365 teaches it people, the whole directory
is replaced at once, so a reader sees either the old one or the new one, never a mixture.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from visitwatch.core.notification import NotificationKind, Recipient
from visitwatch.daemon.config import Directory, StaffMember
from visitwatch.daemon.visits import Visit

log = structlog.get_logger(__name__)

# Who hears of problems with visitwatch itself, in order: the first role with anyone in it.
ADMIN_ROLES = ("admin", "director", "manager")
# Who an overrun reaches when nobody on record manages the worker.
NO_MANAGER_ROLES = ("director", "admin", "manager")


@dataclass(frozen=True)
class Addressee:
    recipient: Recipient
    relation: str  # worker, manager, role:director, staff, or "<relation> (fallback)"


class StaffDirectory:
    """The current staff directory; replaced whole, never patched."""

    def __init__(self, directory: Directory) -> None:
        self._directory = directory
        self._lock = threading.Lock()

    @property
    def current(self) -> Directory:
        return self._directory

    def learn(self, people: Iterable[StaffMember]) -> Directory:
        """Fill gaps from another directory (the config's values always win); atomically."""
        people = list(people)
        with self._lock:
            self._directory = self._directory.filled_from(people)
            return self._directory


def recipient_of(member: StaffMember) -> Recipient:
    return Recipient(member.id, member.name, member.email, member.mobile)


def first_with_role(
    directory: Directory, roles: Sequence[str]
) -> tuple[str, list[StaffMember]] | None:
    """The first of ``roles`` anyone has, with the people who have it."""
    for role in roles:
        people = directory.with_role(role)
        if people:
            return role, people
    return None


def admin_addressees(directory: Directory) -> list[Addressee]:
    """Who hears of problems with visitwatch: the "admin" role, else directors, else managers."""
    found = first_with_role(directory, ADMIN_ROLES)
    if found is None:
        return []
    role, people = found
    return [Addressee(recipient_of(p), f"role:{role}") for p in people]


def managers_of(directory: Directory, worker_id: str) -> list[tuple[StaffMember, str]]:
    """The worker's line manager; with none on record, whoever the fallback roles name."""
    worker = directory.get(worker_id)
    manager = directory.get(worker.manager) if worker and worker.manager else None
    if manager:
        return [(manager, "manager")]
    # Nobody on record manages this worker: an overrun must still reach someone.
    found = first_with_role(directory, NO_MANAGER_ROLES)
    if found is None:
        return []
    role, people = found
    return [(p, f"manager (fallback: role {role})") for p in people]


class Recipients:
    """Resolves a ladder's targets ("worker", "manager", "role:x", a staff id) for a visit."""

    def __init__(self, staff: StaffDirectory) -> None:
        self.staff = staff

    @property
    def directory(self) -> Directory:
        return self.staff.current

    def addressees(self, targets: Iterable[str], visit: Visit) -> list[Addressee]:
        directory = self.directory
        found: dict[str, Addressee] = {}

        def add(recipient: Recipient, relation: str) -> None:
            found.setdefault(recipient.id, Addressee(recipient, relation))

        for target in targets:
            if target == "worker":
                add(self.worker(visit), "worker")
            elif target == "manager":
                for member, relation in managers_of(directory, visit.worker_id):
                    add(recipient_of(member), relation)
            elif target.startswith("role:"):
                for member in directory.with_role(target.removeprefix("role:")):
                    add(recipient_of(member), target)
            else:
                staff = directory.get(target)
                if staff:
                    add(recipient_of(staff), "staff")
        return list(found.values())

    def acknowledger(self, visit: Visit) -> list[Addressee]:
        """Whoever acknowledged, if the name given with ``--by`` is someone in the directory."""
        member = self.directory.find(visit.acknowledged_by or "")
        if member is None:
            log.info("acknowledger_not_in_directory", visit_id=visit.id)
            return []
        return [Addressee(recipient_of(member), "acknowledged")]

    def worker(self, visit: Visit) -> Recipient:
        member = self.directory.get(visit.worker_id)
        if member:
            mobile = member.mobile or visit.worker_mobile
            return Recipient(member.id, member.name, member.email, mobile)
        email = visit.worker_id if "@" in visit.worker_id else ""
        return Recipient(
            visit.worker_id or "unknown-worker",
            visit.worker_label or "Unknown worker",
            email,
            visit.worker_mobile,
        )


_ALERTED_KINDS = ", ".join(
    repr(str(k)) for k in NotificationKind if k.urgent
)  # overrun, escalation, help


def alerted(conn: sqlite3.Connection, visit_id: str) -> list[Addressee]:
    """Everyone (but the worker) who was told this visit needed attention."""
    rows = conn.execute(
        "SELECT recipient_id, recipient_name, recipient_email, recipient_mobile,"
        f" recipient_relation FROM notifications WHERE visit_id = ? AND (kind IN"
        f" ({_ALERTED_KINDS}) OR (kind = 'reminder'"
        " AND recipient_relation != 'worker')) AND fallback_of IS NULL"
        " AND status != 'superseded'"
        " GROUP BY recipient_id ORDER BY MIN(id)",
        (visit_id,),
    ).fetchall()
    return [Addressee(Recipient(r[0], r[1], r[2], r[3]), r[4]) for r in rows]
