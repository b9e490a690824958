"""What the one-tap pages do beyond :class:`Actions`: a going-home worker's departure, and
telling everyone alerted who has taken an alert on.

Both write in one transaction each, through the same record the CLI writes (``checkins``,
the audit, notification rows for the dispatcher); neither changes the visit's state.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from visitwatch.core.notification import NotificationKind
from visitwatch.daemon.actions import record_checkin
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.recipients import alerted
from visitwatch.daemon.routing import enqueue
from visitwatch.daemon.store import ts
from visitwatch.daemon.visits import ActionError, Visit
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.pages_view import Told, kind_label, relation_words, subject_of

log = structlog.get_logger(__name__)

# No notification kind says "someone is handling it" yet (wanted: NotificationKind.
# ACKNOWLEDGED with its own wording in messages.py). EXTENDED is the nearest existing
# update notice: it goes to those alerted, is no alert itself, and is withdrawn unsent if
# the worker is confirmed safe first, which is right for this notice too.
ACK_NOTICE_KIND = NotificationKind.EXTENDED


def record_departure(context: WebContext, visit_id: str, by: str) -> datetime:
    """ "Visit finished, heading home": recorded for the managers, and nothing resolved.

    The worker is still on the road, so the watch goes on until "Safe at home" (or the
    deadline passes and the ladder starts as usual). A manager's alert page shows when they
    left, so anyone looking for them searches the route, not the family's home.
    """
    store = context.store
    now = context.clock.now()
    with store.transaction() as conn:
        visit = context.watcher.visits.current(visit_id)
        if visit.state.terminal:
            raise ActionError(f"visit {visit.id} is already {visit.state}")
        if now < visit.start:
            raise ActionError(
                "this visit has not started yet, so you cannot have left it. "
                f"It starts {fmt_local(visit.start, context.config.daemon.timezone)}."
            )
        record_checkin(conn, visit.id, now, "left", by, "web")
        store.audit(
            conn, visit.id, now, "left the visit, heading home", by, visit.state, visit.state
        )
    log.info("left_visit_recorded", visit_id=visit_id, via="web")
    return now


def tell_others_of_ack(
    context: WebContext, visit: Visit, person: str, by: str, now: datetime
) -> list[Told]:
    """Queue "``by`` is handling it" for everyone alerted but ``person``; who was told.

    :meth:`Actions.acknowledge` records the acknowledgement but tells nobody; without this
    the director keeps phoning a worker the manager is already with.
    """
    router = context.watcher.router
    worker = context.watcher.recipients.worker(visit).name
    at = fmt_local(now, context.config.daemon.timezone)
    subject = f"Being handled: {by} is dealing with the alert about {worker}"
    text = "\n".join(
        [
            f"{by} acknowledged the alert about {worker}'s {kind_label(visit)} at {at} and "
            "is handling it.",
            "Nobody has confirmed the worker is safe yet; you will get the all clear when "
            f"they are. To help or to hear more, contact {by}.",
            "",
            f"Visit:    {subject_of(visit)}",
            f"Visit id: {visit.id}",
        ]
    )
    told: list[Told] = []
    with context.store.transaction() as conn:
        for addressee in alerted(conn, visit.id):
            if addressee.recipient.id == person:
                continue
            channels = router.channels_for(ACK_NOTICE_KIND, addressee.recipient)
            for channel in channels:
                enqueue(
                    conn, visit.id, ACK_NOTICE_KIND, addressee, channel.name, subject, text,
                    now, f"{visit.id}|{ACK_NOTICE_KIND}|ack:{ts(now)}",
                )  # fmt: skip
            if channels:
                told.append(Told(addressee.recipient.name, relation_words(addressee.relation)))
    log.info("ack_notice_queued", visit_id=visit.id, recipients=len(told))
    return told
