"""Texts from workers: ``SAFE``, ``OK``, ``EXTEND 30``, ``HOME``, ``HELP``, acted on their
current visit. Web-free: the inbound endpoints (``daemon/web/inbound.py``) call it, and so
may the CLI or a test.

- **Who**: the sender's number in E.164 must be exactly one person's mobile in the staff
  directory. An unknown or shared number acts on nothing and is told so (a ``HELP`` from
  it still reaches the admins: a text asking for help never goes unheard).
- **What**: :func:`~visitwatch.daemon.sms_commands.parse` reads the command.
- **Which visit**: the worker's visits not over that have started or start within
  :data:`SOON`; several: the most urgent (the board's order: escalated, overdue,
  acknowledged, due, out, booked), then the earliest deadline.
- **How**: through the same :class:`Actions` as the pages and the CLI, ``via = "sms"`` and
  ``by`` the worker's name, so the record says who and how. An ``ActionError`` becomes
  the reply (it is written for people).
- **Once**: providers retry webhooks. Each message id is claimed in ``meta`` in the same
  transaction as the action and the reply row, so a retry changes nothing and gets the
  same reply back; claims older than :data:`KEEP_SEEN` are pruned.

The reply is a ``reply`` notification row to the sender: queued for the dispatcher (Notify),
or recorded as sent when it is the webhook's own answer (Twilio's TwiML). It takes one SMS
segment where it fits, two at most, in GSM-7.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from visitwatch.core import sms
from visitwatch.core.notification import NotificationKind, Recipient
from visitwatch.core.phone import e164_or_none
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.actions import EXTEND_CHOICES
from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.recipients import Addressee, managers_of, recipient_of
from visitwatch.daemon.routing import enqueue
from visitwatch.daemon.sms_commands import Command, Parsed, parse
from visitwatch.daemon.store import from_ts, ts
from visitwatch.daemon.visits import ActionError, Visit

log = structlog.get_logger(__name__)

# The extensions a text may ask for: those the worker's page offers (15 to 60 minutes).
# More is given as the most, and said so.
EXTEND_MIN, EXTEND_MAX, EXTEND_DEFAULT = min(EXTEND_CHOICES), max(EXTEND_CHOICES), 30
# A booked visit this close to its start counts as current (the worker may text from the
# doorstep); later ones never do, so a HELP today cannot raise tomorrow's visit.
SOON = timedelta(hours=1)
# A SAFE after the visit closed is told when and by whom if it closed this recently.
RECENT = timedelta(hours=12)
# Message ids are remembered this long. Retries need hours (Notify retries a callback for
# hours, Twilio less), but Twilio's signature carries no time: a captured signed post could
# be replayed once its id is forgotten, so ids are kept as long as the record keeps names
# by default ([retention] personal_data_after, 90 days). A reply is at most one text.
KEEP_SEEN = timedelta(days=90)
STRANGER_HELP_QUIET = timedelta(minutes=10)
SEEN_PREFIX = "sms_in|"

# Most urgent first: the board's groups (daemon/web/board.py GROUPS).
URGENCY = (
    VisitState.ESCALATED,
    VisitState.OVERDUE,
    VisitState.ACKNOWLEDGED,
    VisitState.DUE,
    VisitState.IN_PROGRESS,
    VisitState.BOOKED,
)
CURRENT_STATES = tuple(str(s) for s in URGENCY)
VIA_WORDS = {"sms": "by text", "web": "on the web page", "cli": "at the command line"}
DANGER = "If you are in danger call 999."
UNREGISTERED = f"This number is not registered with visitwatch. {DANGER}"
SHARED = (
    "This number is registered to more than one person in visitwatch, so it cannot act on "
    f"a visit. {DANGER}"
)
COMMANDS = (
    "visitwatch: text SAFE when your visit is over, EXTEND 30 for 30 more minutes, HOME "
    "when safe at home, HELP for help. Nothing was changed."
)
NO_VISIT = f"visitwatch: no visit of yours is being watched now, so nothing was changed. {DANGER}"


@dataclass(frozen=True)
class Inbound:
    """One text as a provider delivered it."""

    provider: str  # "twilio" or "notify"
    message_id: str  # the provider's id: MessageSid, Notify's id
    sender: str  # as the provider gave it
    body: str
    channel: str  # the configured channel the text came in on (and a reply goes out on)


@dataclass(frozen=True)
class Answer:
    text: str  # the reply, already GSM-7 and fitted
    duplicate: bool = False  # a retry of a text already acted on: nothing was done again
    visit_id: str | None = None


def normalise_sender(number: str) -> str | None:
    """E.164, reading Notify's ``447700900123`` (no plus) as international."""
    number = number.strip()
    if number.isdigit() and not number.startswith("0"):
        return e164_or_none("+" + number)
    return e164_or_none(number)


def fit_reply(text: str) -> str:
    """One segment where it fits, else two, always GSM-7."""
    one = sms.fit(text, limit=1)
    return one if sms.septets(sms.to_gsm(text.strip())) <= sms.SINGLE else sms.fit(text)


class Replies:
    """Acts on texts from workers; see the module's note."""

    def __init__(self, watcher: Watcher, wake: Callable[[], None] = lambda: None) -> None:
        self.watcher = watcher
        self.store = watcher.store
        self.clock = watcher.clock
        self.tz = watcher.tz
        self.wake = wake

    def answer(self, inbound: Inbound, *, queue_reply: bool) -> Answer:
        """Act on ``inbound`` once; the reply, recorded as a ``reply`` row to the sender.

        ``queue_reply``: the dispatcher sends it (on ``inbound.channel``); otherwise the
        caller answers with it in the webhook's response and it is recorded as sent.
        """
        now = self.clock.now()
        seen_key = f"{SEEN_PREFIX}{inbound.provider}|{inbound.message_id}"
        with self.store.transaction() as conn:
            if inbound.message_id:
                seen = self.store.get_meta(seen_key)
                if seen is not None:
                    log.info("inbound_sms_repeated", provider=inbound.provider)
                    return Answer(seen.partition("|")[2], duplicate=True)
            conn.execute(
                "DELETE FROM meta WHERE key >= ? AND key < ? AND value < ?",
                (SEEN_PREFIX, SEEN_PREFIX[:-1] + chr(ord("|") + 1), ts(now - KEEP_SEEN)),
            )
            text, to, visit_id = self._act(conn, inbound, now)
            text = fit_reply(text)
            if inbound.message_id:
                self.store.set_meta(seen_key, f"{ts(now)}|{text}")
            self._record_reply(conn, inbound, to, visit_id, text, now, queue_reply)
        self.wake()
        return Answer(text, visit_id=visit_id)

    # ------------------------------------------------------------------ who and what

    def _act(
        self, conn: sqlite3.Connection, inbound: Inbound, now: datetime
    ) -> tuple[str, Recipient, str | None]:
        """(reply, who it goes to, the visit acted on) inside the caller's transaction."""
        number = normalise_sender(inbound.sender)
        people = self.watcher.staff.current.by_mobile(number) if number else []
        parsed = parse(inbound.body)
        if len(people) != 1:
            reason = "not registered" if not people else "shared by several staff"
            log.debug("inbound_sms_sender", number=inbound.sender, reason=reason)
            self.store.audit(
                conn, None, now, "inbound_sms_unknown_sender", "visitwatch",
                provider=inbound.provider, reason=reason, command=str(parsed.command),
            )  # fmt: skip
            stranger = Recipient("unregistered-sender", "Unregistered sender", "", number or "")
            reply = UNREGISTERED if not people else SHARED
            if parsed.command is Command.HELP:
                self._stranger_help(conn, inbound, number or inbound.sender, people, now)
                reply = reply.replace(
                    DANGER, f"The admins have been told you texted HELP. {DANGER}"
                )
            return reply, stranger, None
        worker = people[0]
        to = recipient_of(worker)
        log.info("inbound_sms", provider=inbound.provider, command=str(parsed.command))
        if parsed.command is Command.OPT_OUT:
            return self._opted_out(conn, inbound, worker, now), to, None
        visit = self.current_visit(worker, now)
        if visit is None:
            if parsed.command is Command.HELP:
                return self._help_without_visit(conn, inbound, worker, now), to, None
            if parsed.command is Command.UNKNOWN:
                return COMMANDS, to, None
            self._note(conn, None, now, worker, parsed, "no visit being watched")
            return self._closed_or_none(worker, now), to, None
        if parsed.command is Command.UNKNOWN:
            self._note(conn, visit.id, now, worker, parsed, "not a command")
            return COMMANDS, to, visit.id
        try:
            text = self._do(parsed, visit, worker, now)
        except ActionError as err:
            self._note(conn, visit.id, now, worker, parsed, "refused")
            after = self.watcher.visits.get(visit.id)
            text = self._closed(after) if after and after.state.terminal else str(err)
        return text, to, visit.id

    def current_visit(self, worker: StaffMember, now: datetime) -> Visit | None:
        """The worker's most urgent visit under way (or starting within :data:`SOON`)."""
        marks = ", ".join("?" for _ in CURRENT_STATES)
        rows = self.store.query(
            f"SELECT * FROM visits WHERE worker_id = ? AND state IN ({marks}) AND start <= ?",
            (worker.id, *CURRENT_STATES, ts(now + SOON)),
        )
        # A row that cannot be read is left to the sweep, which reports it.
        visits = [v for v in map(Visit.read, rows) if isinstance(v, Visit)]
        if not visits:
            return None
        return min(visits, key=lambda v: (URGENCY.index(v.state), v.deadline, v.start, v.id))

    def _do(self, parsed: Parsed, visit: Visit, worker: StaffMember, now: datetime) -> str:
        """Run the command on ``visit``; the reply. Raises :class:`ActionError`."""
        actions, name = self.watcher.actions, worker.name
        if parsed.command is Command.HELP:
            actions.request_help(visit.id, by=name, via="sms")
            return self._help_reply(visit, now)
        if parsed.command is Command.EXTEND:
            asked = EXTEND_DEFAULT if parsed.minutes is None else parsed.minutes
            if asked < EXTEND_MIN:
                return (
                    f"EXTEND takes {EXTEND_MIN} to {EXTEND_MAX} minutes, e.g. EXTEND 30. "
                    "Nothing was changed."
                )
            minutes = min(asked, EXTEND_MAX)
            changed = actions.check_in(
                visit.id, by=name, via="sms", extend=timedelta(minutes=minutes)
            )
            most = f" ({EXTEND_MAX} minutes is the most at once)" if asked > EXTEND_MAX else ""
            return (
                f"Extended by {minutes} minutes{most}: you are now expected back by "
                f"{self._clock(changed.deadline)}. Text SAFE when you are done."
            )
        if now < visit.start:  # SAFE or HOME: a check-in counts once the visit has started
            return (
                f"Your {self._clock(visit.start)} visit has not started yet, so nothing was "
                "changed. Text SAFE when it is over, or EXTEND 30 if it will run longer."
            )
        if parsed.command is Command.SAFE and visit.going_home_after:
            return self._left(visit, name, now)
        home = parsed.command is Command.HOME
        actions.check_in(visit.id, by=name, via="sms", action="safe_home" if home else "checkin")
        told = self._told(visit.id, now, NotificationKind.ALL_CLEAR)
        done = (
            f"Safe at home recorded at {self._clock(now)}: thank you."
            if home
            else f"Checked in at {self._clock(now)}: thank you."
        )
        sent = f" All clear sent to {', '.join(told)}." if told else ""
        return f"{done} Your {self._clock(visit.start)} visit is closed.{sent}"

    def _left(self, visit: Visit, name: str, now: datetime) -> str:
        """SAFE on a visit with a journey home: as the page's "heading home" (still watched)."""
        left = self.store.one(
            "SELECT MAX(at) AS at FROM checkins WHERE visit_id = ? AND action = 'left'",
            (visit.id,),
        )
        if left and left["at"]:
            since = self._clock(from_ts(left["at"]))
        else:
            self.watcher.actions.note_departure(visit.id, by=name, via="sms")
            since = self._clock(now)
        return (
            f"Recorded that you left your visit at {since}. You are still watched until you "
            f"text HOME (back by {self._clock(visit.deadline)}, or text EXTEND 30)."
        )

    def _help_reply(self, visit: Visit, now: datetime) -> str:
        told = self._told(visit.id, now, NotificationKind.HELP)
        if told:
            return f"Help is on its way: {', '.join(told)} alerted now. {DANGER}"
        earlier = visit.help_requested_at
        if earlier is not None and self._told(visit.id, earlier, NotificationKind.HELP):
            already = ", ".join(self._told(visit.id, earlier, NotificationKind.HELP))
            return f"Help was asked for at {self._clock(earlier)}: {already} alerted. {DANGER}"
        return (
            "visitwatch could not reach anyone on the alert list; the admins have been told. "
            f"Phone your manager now. {DANGER}"
        )

    # ------------------------------------------------------------------ no visit to act on

    def _closed_or_none(self, worker: StaffMember, now: datetime) -> str:
        row = self.store.one(
            "SELECT * FROM visits WHERE worker_id = ? AND ended_at >= ?"
            " ORDER BY ended_at DESC LIMIT 1",
            (worker.id, ts(now - RECENT)),
        )
        return self._closed(Visit.from_row(row)) if row else NO_VISIT

    def _closed(self, visit: Visit) -> str:
        """Your visit was already closed: when, and by whom."""
        start, ended = self._clock(visit.start), self._clock(visit.ended_at)
        if visit.state is VisitState.RESOLVED:
            row = self.store.one(
                "SELECT actor, via FROM checkins WHERE visit_id = ? AND action IN"
                " ('checkin', 'safe_home', 'confirmed_safe') ORDER BY id DESC LIMIT 1",
                (visit.id,),
            )
            how = (
                f" by {row['actor']} {VIA_WORDS.get(row['via'], 'via ' + row['via'])}"
                if row
                else ""
            )
            return f"Your {start} visit was already closed at {ended}{how}. Nothing was changed."
        return f"Your {start} visit is no longer watched ({visit.state} at {ended}). Nothing was changed."

    def _opted_out(
        self, conn: sqlite3.Connection, inbound: Inbound, worker: StaffMember, now: datetime
    ) -> str:
        """STOP, END...: the provider now blocks texts to this worker; the admins hear at once."""
        word = inbound.body.strip().upper()[:20]
        subject = f"visitwatch: {worker.name} has stopped texts from visitwatch"
        text = (
            f"{worker.name} texted {word} to visitwatch's {inbound.provider} number at "
            f'{self._clock(now)}. The provider takes that word as "stop texting me": every '
            "later text to them from that number is blocked, their reminders included, "
            "until they text START to it. Ask them to text START now, and remind staff "
            "to answer with SAFE, EXTEND, HOME or HELP only."
        )
        key = f"admin|opted-out|{inbound.provider}|{inbound.message_id or ts(now)}"
        self.watcher.router.to_admins(conn, None, subject, text, now, key)
        self.store.audit(
            conn, None, now, "texts stopped by the worker", worker.name,
            via="sms", provider=inbound.provider,
        )  # fmt: skip
        log.warning("inbound_sms_opted_out", provider=inbound.provider)
        return (
            f"You texted {word}: texts from visitwatch, your reminders included, have "
            "stopped. Text START to get them again. To end a visit text SAFE."
        )

    def _help_without_visit(
        self, conn: sqlite3.Connection, inbound: Inbound, worker: StaffMember, now: datetime
    ) -> str:
        """HELP with nothing watched: the manager (HELP) and the admins are told at once."""
        key = f"sms-help|{inbound.provider}|{inbound.message_id or ts(now)}"
        subject = f"visitwatch: {worker.name} texted HELP"
        text = (
            f"{worker.name} texted HELP to visitwatch at {self._clock(now)} from their "
            f"registered mobile {worker.mobile}, and no visit of theirs is being watched, so "
            "visitwatch does not know where they are. Phone them now; if you cannot reach "
            "them and they may be in danger, call 999."
        )
        router = self.watcher.router
        managers = [Addressee(recipient_of(m), r) for m, r in managers_of(
            self.watcher.staff.current, worker.id) if m.id != worker.id]  # fmt: skip
        told = []
        for manager in managers:
            for channel in router.channels_for(NotificationKind.HELP, manager.recipient):
                enqueue(conn, None, NotificationKind.HELP, manager, channel.name,
                        subject, text, now, key)  # fmt: skip
                if manager.recipient.name not in told:
                    told.append(manager.recipient.name)
        _written, admins = router.to_admins(conn, None, subject, text, now, f"admin|{key}")
        self.store.audit(
            conn, None, now, "help texted with no visit watched", worker.name,
            via="sms", provider=inbound.provider, told=told, admins=admins,
        )  # fmt: skip
        log.warning("help_texted_without_visit", provider=inbound.provider)
        if admins:
            told.append("the visitwatch admins")
        if not told:
            return f"visitwatch could not reach your manager or an admin. Phone them now. {DANGER}"
        return (
            f"No visit of yours is being watched, so {' and '.join(told)} have been told you "
            f"need help. {DANGER}"
        )

    def _stranger_help(
        self,
        conn: sqlite3.Connection,
        inbound: Inbound,
        number: str,
        people: list[StaffMember],
        now: datetime,
    ) -> None:
        """HELP from a number that is not one person's: the admins hear, with the number."""
        whose = (
            f"the mobile shared by {', '.join(p.name for p in people)} in the staff directory"
            if people
            else "a number not in the staff directory"
        )
        text = (
            f"A text saying HELP reached visitwatch at {self._clock(now)} from {number}, "
            f"{whose}, so it was not acted on. Phone that number now; if it may be a colleague "
            "in danger, call 999. Then make each worker's mobile theirs alone in the directory."
        )
        # One notice per number per STRANGER_HELP_QUIET: the first already says to phone
        # it; a number texting HELP again and again (or a prank) is not a flood.
        window = int(now.timestamp() // STRANGER_HELP_QUIET.total_seconds())
        key = f"admin|sms-help|{number}|{window}"
        self.watcher.router.to_admins(conn, None, "visitwatch: HELP texted from " + number,
                                      text, now, key)  # fmt: skip

    # ------------------------------------------------------------------ the record

    def _note(
        self,
        conn: sqlite3.Connection,
        visit_id: str | None,
        now: datetime,
        worker: StaffMember,
        parsed: Parsed,
        outcome: str,
    ) -> None:
        """An audit line for a text that changed nothing (what changed is audited already)."""
        self.store.audit(
            conn, visit_id, now, f"text not acted on: {outcome}", worker.name,
            via="sms", command=str(parsed.command),
        )  # fmt: skip

    def _record_reply(
        self,
        conn: sqlite3.Connection,
        inbound: Inbound,
        to: Recipient,
        visit_id: str | None,
        text: str,
        now: datetime,
        queued: bool,
    ) -> None:
        if not to.mobile:
            return  # a sender with no readable number: nothing to send to (Twilio's answer aside)
        key = f"reply|{inbound.provider}|{inbound.message_id or ts(now)}"
        addressee = Addressee(to, "worker" if visit_id else "sender")
        # The text itself is the message's short form (what an SMS channel sends).
        enqueue(conn, visit_id, NotificationKind.REPLY, addressee, inbound.channel,
                "visitwatch", text, now, key, short=text)  # fmt: skip
        row_key = f"{key}|{to.id}|{inbound.channel}"
        if not queued:  # already on its way in the webhook's answer
            conn.execute(
                "UPDATE notifications SET status = 'sent', sent_at = ?, next_attempt_at = NULL"
                " WHERE key = ?",
                (ts(now), row_key),
            )

    # ------------------------------------------------------------------ words

    def _clock(self, moment: datetime | None) -> str:
        return f"{moment.astimezone(self.tz):%H:%M}" if moment else "an unknown time"

    def _told(self, visit_id: str, since: datetime, kind: NotificationKind) -> list[str]:
        rows = self.store.query(
            "SELECT recipient_name FROM notifications WHERE visit_id = ? AND kind = ?"
            " AND created >= ? AND fallback_of IS NULL GROUP BY recipient_id ORDER BY MIN(id)",
            (visit_id, str(kind), ts(since)),
        )
        return [r["recipient_name"] for r in rows]
