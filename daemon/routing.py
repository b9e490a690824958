"""From "tell these people this" to notification rows, one per recipient and channel.

Rows are written in the caller's transaction, next to the change that caused them, and
sent later by the dispatcher (principle 2). Each row carries an idempotency key, so the same
notice is never queued twice. Nobody is silently skipped: an alert to someone no channel can
reach becomes an admin notice naming them and why, and only if no admin can be reached
either is it logged (the service's last resort takes it from there).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.core.notification import NotificationKind, Recipient
from visitwatch.daemon import messages, texts
from visitwatch.daemon.config import Config, ConnectorConfig
from visitwatch.daemon.recipients import Addressee, Recipients, admin_addressees
from visitwatch.daemon.store import ts
from visitwatch.daemon.visits import Visit
from visitwatch.daemon.web import short_links
from visitwatch.daemon.web.links import Links

log = structlog.get_logger(__name__)

ADDRESS_LABELS = {"email": "e-mail address", "mobile": "mobile number"}


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
    short: str = "",
    link: str = "",
) -> int:
    """Insert one notification unless the same one exists (idempotency key)."""
    r = addressee.recipient
    return conn.execute(
        "INSERT OR IGNORE INTO notifications (key, visit_id, kind, recipient_id, recipient_name,"
        " recipient_email, recipient_mobile, recipient_relation, channel, subject, text, created,"
        " next_attempt_at, short, link) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            f"{key_base}|{r.id}|{channel}",
            visit_id,
            str(kind),
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
            short or texts.plain(subject),
            link,
        ),
    ).rowcount


def address_field(channel: ConnectorConfig) -> str | None:
    """The Recipient field ``channel`` delivers to ("email", "mobile"); None for any."""
    return channel.cls.address_field if issubclass(channel.cls, Channel) else None


def texts_people(channel: ConnectorConfig) -> bool:
    """Whether ``channel`` sends text messages (so its messages want a short link)."""
    return address_field(channel) == "mobile" or channel.broadcasts


def reaches(channel: ConnectorConfig, recipient: Recipient) -> bool:
    """Whether ``recipient`` has what ``channel`` needs to reach them."""
    needs = address_field(channel)
    return not needs or bool(getattr(recipient, needs, ""))


class Router:
    """Chooses channels for each person and writes the notification rows."""

    def __init__(self, config: Config, recipients: Recipients, links: Links | None = None) -> None:
        self.config = config
        self.recipients = recipients
        self.tz = config.daemon.timezone
        # Signed pages for each recipient; None when [web] is off (messages then name the
        # CLI commands only).
        self.links = links
        # Texts invite a reply (SAFE, HELP...) only when a channel hears replies.
        self.replies = any(
            issubclass(c.cls, Channel) and c.cls.takes_replies(c.settings) for c in config.channels
        )

    def view(
        self,
        visit: Visit,
        addressee: Addressee | None = None,
        kind: str = "",
        now: datetime | None = None,
    ) -> messages.VisitView:
        worker = self.recipients.worker(visit)
        link = self.link_for(visit, addressee, kind, now) if addressee and now else ""
        return messages.VisitView(
            visit, worker.name, worker.mobile, self.tz, self.config.policy, link
        )

    def link_for(self, visit: Visit, addressee: Addressee, kind: str, now: datetime) -> str:
        """The worker's check-in page, or an alerted person's acknowledge page."""
        if self.links is None or visit.deadline is None:
            return ""
        person = addressee.recipient.id
        if addressee.relation == "worker":
            if kind in (
                NotificationKind.REMINDER,
                NotificationKind.COMPLIANCE,
                NotificationKind.REMOVED,
            ):
                return self.links.checkin(visit.id, person, visit.deadline, now)
            return ""
        if NotificationKind(kind).is_alert or kind == NotificationKind.REMOVED:
            return self.links.ack(visit.id, person, visit.deadline, now)
        return ""

    def channels_for(
        self, kind: str, recipient: Recipient, *, any_kind: bool = False
    ) -> list[ConnectorConfig]:
        """The channels that take ``kind`` for ``recipient`` (``any_kind``: ignore ``kinds``)."""
        chosen = []
        for channel in self.config.channels:
            if channel.broadcasts:
                continue  # a place, not a person: posted once per event (notify)
            if not any_kind and channel.kinds is not None and kind not in channel.kinds:
                continue
            if not reaches(channel, recipient):
                continue  # e.g. e-mail for someone with no address; other channels still go
            chosen.append(channel)
        return chosen

    def why_unreachable(self, kind: str, recipient: Recipient) -> str:
        """Why no channel takes a ``kind`` notification for ``recipient``, in a few words."""
        carrying = [
            c
            for c in self.config.channels
            if (c.kinds is None or kind in c.kinds) and not c.broadcasts
        ]
        if not carrying:
            return f"no channel is configured to carry {kind} notifications"
        reasons = []
        for channel in carrying:
            needs = address_field(channel) or "address"
            label = ADDRESS_LABELS.get(needs, needs)
            reasons.append(f"no {label} on record, which channel {channel.name!r} needs")
        return "; ".join(reasons)

    def notify(
        self,
        conn: sqlite3.Connection,
        visit: Visit,
        kind: NotificationKind,
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
        written = 0
        told: list[Addressee] = []
        for addressee in addressees:
            channels = self.channels_for(kind, addressee.recipient)
            if not channels:
                if kind.is_alert:
                    self._unreachable(conn, visit, kind, addressee, now, rung or token)
                continue
            told.append(addressee)
            view = self.view(visit, addressee, kind, now)
            wants_short = any(texts_people(c) for c in channels)
            short_link = self._short_link(conn, visit, view.link, now) if wants_short else ""
            subject, text, short = self._wording(
                view, kind, addressee.relation, now, token, by, short_link
            )
            for channel in channels:
                written += enqueue(
                    conn, visit.id, kind, addressee, channel.name, subject, text, now,
                    f"{visit.id}|{kind}|{token}", short, view.link,
                )  # fmt: skip
        return written + self._broadcast(conn, visit, kind, told, now, token, by)

    def _wording(
        self,
        view: messages.VisitView,
        kind: NotificationKind,
        relation: str,
        now: datetime,
        token: str,
        by: str,
        short_link: str,
    ) -> tuple[str, str, str]:
        """Subject, text and the text message's words for one recipient."""
        if kind.is_alert:
            subject, text = messages.alert(view, kind, now, relation)
            return subject, text, texts.alert(view, kind, now, relation, short_link, self.replies)
        if kind == NotificationKind.COMPLIANCE:
            subject, text = messages.compliance(view, now, relation, token == "prestart")
            return subject, text, texts.compliance(view, relation, short_link)
        subject, text = messages.resolution(view, kind, now, by)
        return subject, text, texts.resolution(view, kind, by)

    def _short_link(self, conn: sqlite3.Connection, visit: Visit, link: str, now: datetime) -> str:
        if not link or self.links is None or visit.deadline is None:
            return ""
        return short_links.shorten(conn, link, visit.deadline + self.links.ttl, now)

    def _broadcast(
        self,
        conn: sqlite3.Connection,
        visit: Visit,
        kind: NotificationKind,
        told: list[Addressee],
        now: datetime,
        token: str,
        by: str,
    ) -> int:
        """One post per event to each place (a Teams channel, a webhook) listing who was told.

        Its link is the visit on the board, behind sign-in: anyone in a shared channel could
        tap it, so never a person's signed page.
        """
        places = [
            c for c in self.config.channels if c.broadcasts and (c.kinds is None or kind in c.kinds)
        ]
        others = [a for a in told if a.relation != "worker"]
        if not places or not others:
            return 0  # a worker's own reminder or notice is between visitwatch and them
        lead = others[0]
        view = self.view(visit)
        link = f"{self.links.base_url}/board#visit-{visit.id}" if self.links else ""
        subject, text, short = self._wording(view, kind, lead.relation, now, token, by, link)
        names = ", ".join(f"{a.recipient.name} ({a.relation})" for a in told)
        text = f"{text}\n\nTold: {names}."
        written = 0
        for place in places:
            stand_in = Addressee(Recipient(place.name, place.name), "channel")
            written += enqueue(
                conn, visit.id, kind, stand_in, place.name, subject, text, now,
                f"{visit.id}|{kind}|{token}", short, link,
            )  # fmt: skip
        return written

    def to_admins(
        self,
        conn: sqlite3.Connection,
        visit_id: str | None,
        subject: str,
        text: str,
        now: datetime,
        key: str,
        *,
        avoid_channel: str = "",
    ) -> tuple[int, bool]:
        """Queue an admin notice, once per ``key``; returns (rows written, anyone reached).

        It avoids ``avoid_channel`` (one in trouble) whenever another channel reaches the
        admin: first those that take admin notices, then any other that reaches them, and
        only then the troubled one after all.
        """
        written = 0
        reached = False
        admin = NotificationKind.ADMIN
        for addressee in admin_addressees(self.recipients.directory):
            recipient = addressee.recipient
            channels = self.channels_for(admin, recipient)
            channels = (
                [c for c in channels if c.name != avoid_channel]
                or [
                    c
                    for c in self.channels_for(admin, recipient, any_kind=True)
                    if c.name != avoid_channel
                ]
                or channels
            )
            for channel in channels:
                reached = True
                written += enqueue(
                    conn, visit_id, admin, addressee, channel.name, subject, text, now, key
                )
        if not reached:
            # Nobody to tell: the service's last resort (the console, from memory) takes it.
            log.error("admin_unreachable", notice=key.split("|")[1], visit_id=visit_id)
        return written, reached

    def _unreachable(
        self,
        conn: sqlite3.Connection,
        visit: Visit,
        kind: NotificationKind,
        addressee: Addressee,
        now: datetime,
        rung: str,
    ) -> None:
        """Nobody is silently skipped: tell the admins who could not be reached, and why."""
        person = addressee.recipient
        why = self.why_unreachable(kind, person)
        subject = f"visitwatch: a {kind} alert could not reach {person.name}"
        text = (
            f"A {kind} alert for visit {visit.id} could not be sent to {person.name} "
            f"({addressee.relation}): {why}.\n\n"
            f"{person.name} has not been told by visitwatch. If the visit still needs "
            "attention, reach them another way now. Then add the missing detail to the "
            "staff directory ([[staff]] in the config, or Microsoft 365) or configure a "
            "channel that can reach them; `visitwatch check` lists everyone the ladder "
            "cannot reach."
        )
        key = f"admin|unreachable|{visit.id}|{kind}|{rung}|{person.id}"
        self.to_admins(conn, visit.id, subject, text, now, key)
        log.warning(
            "recipient_unreachable", visit_id=visit.id, kind=str(kind), relation=addressee.relation
        )
