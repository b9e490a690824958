"""Board sessions: who is signed in, for how long, and nothing a browser can change.

A session is a cookie holding a token signed under :attr:`Purpose.SESSION` (itsdangerous,
the same keys as the links): the person's staff id, when it stops working (``[web]
session_ttl`` after sign-in) and a random session id. It is bound to the person, not to
the sign-in: on every request the person is looked up in the current staff directory and
must still hold a board role, so someone removed from the directory, or moved to another
role, is signed out at their next click. Signing out records the session id as used
(:class:`UsedNonces`), so a copy of the cookie stops working too.

The cookie is HttpOnly, SameSite=Lax, and Secure whenever ``public_base_url`` is https.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime

from flask import Request, redirect
from werkzeug.wrappers import Response

from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.store import Store, ts
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.csrf import csrf_ok, csrf_token
from visitwatch.daemon.web.links import LinkError, Purpose

COOKIE = "visitwatch_board"


@dataclass(frozen=True)
class Session:
    """A signed-in person, as the current directory knows them."""

    person: StaffMember
    session_id: str
    expires: datetime

    @property
    def csrf_binding(self) -> str:
        return f"board:{self.session_id}"


class UsedNonces:
    """Nonces that must not work again: a one-time sign-in link once used, a session once
    signed out. Kept until the token they belong to has expired anyway."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def use(self, purpose: Purpose, nonce: str, now: datetime, expires: datetime) -> bool:
        """Record ``nonce`` as used; False when it already was (a replay)."""
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM web_used_nonces WHERE expires < ?", (ts(now),))
            try:
                conn.execute(
                    "INSERT INTO web_used_nonces (nonce, purpose, used_at, expires)"
                    " VALUES (?, ?, ?, ?)",
                    (nonce, str(purpose), ts(now), ts(expires)),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def used(self, nonce: str) -> bool:
        return self.store.one("SELECT 1 FROM web_used_nonces WHERE nonce = ?", (nonce,)) is not None


def may_open_board(context: WebContext, member: StaffMember | None) -> bool:
    return member is not None and member.role in context.config.web.board_roles


def start(context: WebContext, response: Response, member: StaffMember) -> None:
    """Sign ``member`` in: set the session cookie on ``response``."""
    ttl = context.config.web.session_ttl
    expires = context.clock.now() + ttl
    token = context.signer.sign(
        Purpose.SESSION, "", member.id, expires, extra=secrets.token_urlsafe(16)
    )
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(ttl.total_seconds()),
        httponly=True,
        samesite="Lax",
        secure=context.config.daemon.public_base_url.startswith("https://"),
        path="/",
    )


def welcome(context: WebContext, member: StaffMember) -> Response:
    """The answer to a successful sign-in: the board, with the session cookie set."""
    response = redirect("/board", 303)
    start(context, response, member)
    return response


def forget(context: WebContext, response: Response) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(
        COOKIE,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=context.config.daemon.public_base_url.startswith("https://"),
    )


def current(context: WebContext, request: Request) -> Session | None:
    """The signed-in person, or None: no cookie, an altered or expired one, a signed-out
    session, or a person who is no longer in the directory with a board role."""
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        grant = context.signer.read(Purpose.SESSION, token, context.clock.now())
    except LinkError:
        return None
    if not grant.extra or UsedNonces(context.store).used(grant.extra):
        return None
    member = context.watcher.staff.current.get(grant.person)
    if member is None or not may_open_board(context, member):
        return None
    return Session(member, grant.extra, grant.expires)


def end(context: WebContext, session: Session) -> None:
    """Sign out: this session's cookie never works again, wherever it was copied."""
    UsedNonces(context.store).use(
        Purpose.SESSION, session.session_id, context.clock.now(), session.expires
    )


def form_token(context: WebContext, session: Session) -> str:
    return csrf_token(context.signer, session.csrf_binding)


def form_ok(context: WebContext, session: Session, token: str | None) -> bool:
    return csrf_ok(context.signer, session.csrf_binding, token)
