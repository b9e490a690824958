"""The e-mailed sign-in link, queued off the request's thread.

The form answers with the same page, at once, whoever asks (:func:`signin.send_link`):
the address is looked up and the link queued here, on the mailer's own thread, so neither
the page nor the time it takes tells whether the address belongs to someone who may sign
in. A request the mailer cannot take (a flood filled its queue) is dropped with a warning:
the person asks again, and nothing about a visit depends on it.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from datetime import datetime, timedelta
from urllib.parse import quote

import structlog
from flask import Flask

from visitwatch.core.notification import NotificationKind
from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.recipients import Addressee, recipient_of
from visitwatch.daemon.routing import address_field, enqueue
from visitwatch.daemon.web import sessions
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.links import Purpose

log = structlog.get_logger(__name__)

# How long an e-mailed sign-in link works.
LINK_TTL = timedelta(minutes=15)
# At most one link per person this often, however often the form is sent.
RESEND_AFTER = timedelta(minutes=1)
# Requests waiting for the mailer; past this a flood's extra requests are dropped.
QUEUE_SIZE = 100
EXTENSION = "visitwatch.signin_mailer"


class SignInMailer:
    """One thread that turns sign-in requests (addresses as typed) into queued links."""

    def __init__(self, context: WebContext) -> None:
        self.context = context
        self._requests: queue.Queue[str] = queue.Queue(QUEUE_SIZE)
        self._last_sent: dict[str, datetime] = {}  # person -> when (only this thread)
        self._thread = threading.Thread(target=self._run, name="signin-mailer", daemon=True)
        self._thread.start()

    def ask(self, address: str) -> None:
        """Take a request from the form; returns at once."""
        try:
            self._requests.put_nowait(address)
        except queue.Full:
            log.warning("sign_in_request_dropped", reason="too many at once")

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every request taken so far is handled (tests); False on timeout."""
        give_up = time.monotonic() + timeout
        with self._requests.all_tasks_done:
            while self._requests.unfinished_tasks:
                left = give_up - time.monotonic()
                if left <= 0:
                    return False
                self._requests.all_tasks_done.wait(left)
        return True

    def _run(self) -> None:
        self.context.store.yield_writes()  # a page's write: the loops' go first
        while True:
            address = self._requests.get()
            try:
                self._handle(address)
            except Exception:  # one bad request must not stop the next person's link
                log.exception("sign_in_request_failed")
            finally:
                self._requests.task_done()

    def _handle(self, address: str) -> None:
        member = staff_by_address(self.context, address)
        if member is None or not sessions.may_open_board(self.context, member):
            log.info("sign_in_link_not_sent", reason="not a board user")
            return
        now = self.context.clock.now()
        last = self._last_sent.get(member.id)
        if last is not None and 0 <= (now - last).total_seconds() < RESEND_AFTER.total_seconds():
            log.info("sign_in_link_not_sent", reason="one was sent less than a minute ago")
            return
        self._last_sent = {p: t for p, t in self._last_sent.items() if now - t < RESEND_AFTER}
        self._last_sent[member.id] = now
        send_sign_in_link(self.context, member, now)


def mailer(app: Flask, context: WebContext) -> SignInMailer:
    """The app's mailer, started on first use."""
    found = app.extensions.get(EXTENSION)
    if found is None:
        with _STARTING:
            found = app.extensions.get(EXTENSION)
            if found is None:
                found = app.extensions[EXTENSION] = SignInMailer(context)
    assert isinstance(found, SignInMailer)
    return found


_STARTING = threading.Lock()


def staff_by_address(context: WebContext, address: str) -> StaffMember | None:
    """The staff member with this id or e-mail address (never a display name)."""
    address = address.strip().lower()
    if not address:
        return None
    directory = context.watcher.staff.current
    found = directory.get(address)
    if found is not None:
        return found
    return next((m for m in directory.members.values() if m.email.lower() == address), None)


def send_sign_in_link(context: WebContext, member: StaffMember, now: datetime) -> None:
    """Queue a one-time sign-in link to ``member`` and wake the delivery loop."""
    nonce = secrets.token_urlsafe(16)
    expires = now + LINK_TTL
    token = context.signer.sign(Purpose.SIGN_IN, "", member.id, expires, extra=nonce)
    base = context.config.daemon.public_base_url.rstrip("/")
    link = f"{base}/signin/link/{quote(token)}"
    tz = context.config.daemon.timezone
    subject = "Your visitwatch board sign-in link"
    text = "\n".join(
        [
            "Open this link to sign in to the visitwatch board:",
            f"  {link}",
            "",
            f"It works once, until {fmt_local(expires, tz)}.",
            "If you did not ask to sign in, ignore this message: the link is no use to "
            "anyone without access to your mailbox.",
        ]
    )
    addressee = Addressee(recipient_of(member), "sign-in")
    router = context.watcher.router
    kind = NotificationKind.ADMIN
    # The person's own mailbox first; a set-up with no e-mail channel uses whatever
    # carries admin notices (an outbox, the console).
    carrying = router.channels_for(kind, addressee.recipient)
    channels = (
        [c for c in carrying if address_field(c) == "email"]
        or [
            c
            for c in router.channels_for(kind, addressee.recipient, any_kind=True)
            if address_field(c) == "email"
        ]
        or carrying
    )
    if not channels:
        log.warning("sign_in_link_unreachable", reason="no channel reaches this person")
        return
    with context.store.transaction() as conn:
        for channel in channels:
            enqueue(
                conn, None, kind, addressee, channel.name, subject, text, now, f"signin|{nonce}"
            )
    context.wake()
    log.info("sign_in_link_queued", channels=len(channels))
