"""Who the escalation ladder could address but no configured channel can reach.

A pure function of the config, for ``visitwatch check`` (one FAIL line per person) and for
the daemon's start-up warning (a count only: names stay out of logs). At run time the same
gap becomes an admin notice naming the person (escalation.py); this finds it before any
visit does.

A channel takes a notification of kind K for a recipient when it carries K (its ``kinds``
is unset or lists K) and the recipient has the address the channel needs (its class's
``address_field``, e.g. an e-mail address), as in :meth:`Router.channels_for`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from visitwatch.core.notification import NotificationKind, Recipient
from visitwatch.daemon.config import Config, ConnectorConfig, StaffMember
from visitwatch.daemon.lifecycle import default_ladder
from visitwatch.daemon.recipients import NO_MANAGER_ROLES, admin_addressees, first_with_role
from visitwatch.daemon.routing import ADDRESS_LABELS, address_field, reaches

# A help request alerts every rung of the ladder with kind "help".
HELP = NotificationKind.HELP
ADMIN = NotificationKind.ADMIN


@dataclass(frozen=True)
class Unreachable:
    """Someone the ladder (or an admin notice) may address, whom no channel can reach."""

    staff_id: str
    name: str
    relation: str  # how the ladder reaches them: "worker", "manager", "role:director", ...
    kinds: tuple[str, ...]  # the notification kinds no channel would take for them
    reason: str  # "no e-mail address on record; channels: email (smtp, needs e-mail address)"

    def __str__(self) -> str:
        kinds = ", ".join(self.kinds)
        return f"{self.name} ({self.relation}) cannot be sent {kinds} notifications: {self.reason}"


def unreachable(config: Config) -> list[Unreachable]:
    """Every person the ladder or the admin notices could address, on no channel; in
    directory order."""
    found = []
    for staff_id, (member, kinds_by_relation) in _addressed(config).items():
        recipient = Recipient(member.id, member.name, member.email, member.mobile)
        relations: list[str] = []
        reasons: dict[str, list[str]] = {}
        for relation, kinds in kinds_by_relation.items():
            for kind in kinds:
                if any(accepts(channel, kind, recipient) for channel in config.channels):
                    continue
                if relation not in relations:
                    relations.append(relation)
                missed = reasons.setdefault(_why(config.channels, kind), [])
                if kind not in missed:
                    missed.append(kind)
        if not reasons:
            continue
        if len(reasons) == 1:
            reason = next(iter(reasons))
        else:
            reason = "; ".join(f"{', '.join(ks)}: {why}" for why, ks in reasons.items())
        every_kind = tuple(kind for group in reasons.values() for kind in group)
        found.append(Unreachable(staff_id, member.name, ", ".join(relations), every_kind, reason))
    return found


def accepts(channel: ConnectorConfig, kind: str, recipient: Recipient) -> bool:
    """Whether ``channel`` takes a ``kind`` notification for ``recipient``."""
    if channel.kinds is not None and kind not in channel.kinds:
        return False
    return reaches(channel, recipient)


def _why(channels: Iterable[ConnectorConfig], kind: str) -> str:
    carrying = [c for c in channels if c.kinds is None or kind in c.kinds]
    if not carrying:
        return f"no channel is configured to carry {kind} notifications"
    needed = []
    described = []
    for channel in carrying:
        field_name = address_field(channel) or "address"
        label = ADDRESS_LABELS.get(field_name, field_name)
        if label not in needed:
            needed.append(label)
        described.append(f"{channel.name} ({channel.type}, needs {label})")
    return f"no {' or '.join(needed)} on record; channels: {', '.join(described)}"


# staff id -> (member, {relation: [kinds]})
_Wanted = dict[str, tuple[StaffMember, dict[str, list[str]]]]


def _addressed(config: Config) -> _Wanted:
    """Everyone the ladder, help requests and admin notices may address, with how and what."""
    directory = config.directory
    wanted: _Wanted = {}

    def add(member: StaffMember, relation: str, kinds: Iterable[str]) -> None:
        _, by_relation = wanted.setdefault(member.id, (member, {}))
        known = by_relation.setdefault(relation, [])
        known.extend(kind for kind in kinds if kind not in known)

    # Whose visits are watched: staff in the worker role and the owners of calendars.
    workers = [m for m in directory.members.values() if m.role == "worker"]
    for source in config.sources:
        owner = directory.get(source.owner)
        if owner is not None and owner not in workers:
            workers.append(owner)

    ladder = config.policy.escalation or default_ladder(config.policy.grace)
    for step in ladder:
        kinds = (step.kind, HELP)
        for target in step.to:
            if target == "worker":
                for worker in workers:
                    add(worker, "worker", kinds)
            elif target == "manager":
                for manager, relation in _managers(config, workers):
                    add(manager, relation, kinds)
            elif target.startswith("role:"):
                for member in directory.with_role(target.removeprefix("role:")):
                    add(member, target, kinds)
            else:
                named = directory.get(target)
                if named is not None:
                    add(named, "staff", kinds)

    for admin in admin_addressees(directory):
        admin_member = directory.get(admin.recipient.id)
        if admin_member is not None:
            add(admin_member, f"admin notices ({admin.relation})", (ADMIN,))

    order = list(directory.members)
    return dict(sorted(wanted.items(), key=lambda item: order.index(item[0])))


def _managers(config: Config, workers: list[StaffMember]) -> list[tuple[StaffMember, str]]:
    """The line managers of ``workers``; for a worker with none, whom the Watcher falls back
    to (directors, else admins, else managers)."""
    directory = config.directory
    found: list[tuple[StaffMember, str]] = []
    unmanaged = False
    for worker in workers:
        manager = directory.get(worker.manager) if worker.manager else None
        if manager is None:
            unmanaged = True
        elif (manager, "manager") not in found:
            found.append((manager, "manager"))
    if unmanaged:
        fallback = first_with_role(directory, NO_MANAGER_ROLES)
        if fallback is not None:
            role, people = fallback
            found += [(p, f"manager (fallback: role {role})") for p in people]
    return found
