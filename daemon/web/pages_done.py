"""The result page after a button: exactly what happened, and who was told, from the record.

Who was told is read from the notification rows the action queued (at or after the moment
it was taken), not from what the page expected to happen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from visitwatch.core.notification import NotificationKind
from visitwatch.daemon.visits import Visit
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.pages_view import Told, clock_time, local, told_since


@dataclass(frozen=True)
class Outcome:
    heading: str
    what: str  # what happened, in one or two sentences
    told_intro: str  # "All clear sent to:"
    told: list[Told]
    nobody: str  # said instead of the list when nobody was told
    good: bool = True  # a calm, green notice (False: help, in the stop colour)


def outcome(context: WebContext, visit: Visit, did: str, at: datetime) -> Outcome:
    when = clock_time(context, at)
    store = context.store

    def told(kind: str) -> list[Told]:
        return told_since(store, visit.id, at, (kind,))

    no_alert = "Nobody else needed telling: no alert had gone out about this visit."
    if did in ("checkin", "home"):
        what = (
            f"Your safe arrival at home was recorded at {when}. The visit is closed."
            if did == "home"
            else f"You checked in safe at {when}. The visit is closed."
        )
        heading = "Safe at home: thank you" if did == "home" else "Checked in: thank you"
        return Outcome(
            heading, what, "All clear sent to:", told(NotificationKind.ALL_CLEAR), no_alert
        )
    if did == "extend":
        what = (
            f"You are now expected back by {local(context, visit.deadline)}. You will be "
            "reminded then; check in as soon as you are done."
        )
        return Outcome(
            "Visit extended",
            what,
            "Told of the new time:",
            told(NotificationKind.EXTENDED),
            no_alert,
        )
    if did == "left":
        if context.clock.now() < visit.deadline:
            by_when = f"by {local(context, visit.deadline)}, or extend if the journey takes longer"
        else:
            by_when = "your return time has passed, so extend now if you are not home yet"
        what = (
            f"Recorded that you left the visit at {when}. You are still being watched: tap "
            f"\u201cSafe at home\u201d when you get in ({by_when})."
        )
        return Outcome(
            "Heading home",
            what,
            "",
            [],
            "Nobody has been alerted; your managers can see it on the alert page.",
        )
    if did == "help":
        people = told(NotificationKind.HELP)
        intro = "Being alerted now:"
        if not people:
            # Asked again: the help alerts already sent are not sent twice (one per rung
            # and deadline); say who already has them rather than "nobody".
            people = told_since(store, visit.id, visit.first_seen, (NotificationKind.HELP,))
            intro = "Already alerted for help (each person once):"
        what = (
            f"Your request for help was sent at {when}, with the visit's address. If you are "
            "in immediate danger, call 999."
        )
        nobody = (
            "visitwatch could not reach anyone on the alert list. Phone your manager now, or "
            "999 if you are in danger. The admins have been told."
        )
        return Outcome("Help is on its way", what, intro, people, nobody, good=False)
    if did == "ack":
        minutes = int(context.config.policy.ack_timeout.total_seconds() // 60)
        what = (
            f"Recorded at {when} that you are handling this alert; the repeats have stopped. "
            f"If the worker is not confirmed safe within {minutes} minutes, you and the next "
            "person up will be alerted again. When you know they are safe, tap "
            "\u201cConfirmed safe\u201d."
        )
        return Outcome(
            "You are handling this alert", what, "Told that you are on it:",
            told(NotificationKind.ACKNOWLEDGED), "Nobody else had been alerted, so nobody else was told.",
        )  # fmt: skip
    what = f"You confirmed the worker safe at {when}. The visit is closed."
    return Outcome(
        "Confirmed safe", what, "All clear sent to:", told(NotificationKind.ALL_CLEAR), no_alert
    )
