"""Signing in to the board, and out again.

Two ways in, as ``[web] sign_in`` allows: Microsoft 365 (:mod:`signin_microsoft`) and a
one-time link sent by e-mail, for organisations without it. Either way only staff whose
directory role is in ``board_roles`` get a session (:mod:`sessions`).

The e-mail link:

- The form always answers with the same page, at once, whether or not the address belongs
  to someone who may sign in, so it cannot be used to find out who works here: the
  address is looked up and the link queued on a thread of its own (:mod:`signin_mail`).
- The link goes out as a notification row (``routing.enqueue``, kind ``admin``: a message
  about visitwatch itself, not about a visit), so the dispatcher delivers it with its
  retries, fallbacks and failure reports like any other message; nothing here talks to a
  mail server. It goes to the person's own e-mail channels when there are any, else to the
  channels that carry admin notices (the outbox or console of a small set-up).
- It is signed under :attr:`Purpose.SIGN_IN` with a random nonce and works for
  :data:`LINK_TTL`, once: opening it shows a "Sign in" button (mail scanners that fetch
  links must not use it up), and pressing it records the nonce as used.
"""

from __future__ import annotations

from datetime import datetime

import structlog
from flask import Blueprint, abort, current_app, redirect, render_template, request
from werkzeug.wrappers import Response

from visitwatch.daemon.config import StaffMember
from visitwatch.daemon.web import sessions, signin_microsoft
from visitwatch.daemon.web.app import context_of
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.csrf import csrf_ok, csrf_token
from visitwatch.daemon.web.links import LinkError, Purpose
from visitwatch.daemon.web.signin_mail import LINK_TTL, mailer

log = structlog.get_logger(__name__)

blueprint = Blueprint("signin", __name__)
blueprint.register_blueprint(signin_microsoft.blueprint)

# The sign-in forms' CSRF binding: nobody is signed in yet, but another site still cannot
# make a browser send the form.
FORM_BINDING = "signin-form"


def _context() -> WebContext:
    return context_of(current_app)


@blueprint.get("/signin")
def form() -> str | Response:
    context = _context()
    if sessions.current(context, request) is not None:
        return redirect("/board", 303)
    return render_template(
        "signin.html",
        methods=context.config.web.sign_in,
        roles=context.config.web.board_roles,
        csrf=csrf_token(context.signer, FORM_BINDING),
    )


@blueprint.post("/signin/email")
def send_link() -> str:
    context = _context()
    if "email" not in context.config.web.sign_in:
        abort(404)
    if not csrf_ok(context.signer, FORM_BINDING, request.form.get("csrf")):
        abort(400, "This form had expired. Go back, reload the page and try again.")
    # The same page at once whoever asks: the address is looked up, and a link queued,
    # on the mailer's thread, so not even the time taken tells who may sign in.
    mailer(current_app, context).ask(request.form.get("email", ""))
    return render_template("signin_sent.html", minutes=int(LINK_TTL.total_seconds() // 60))


def _link_grant(context: WebContext, token: str) -> tuple[StaffMember, str, datetime]:
    """The person a sign-in link is for, its nonce and expiry; a plain 4xx for anything
    else (altered, expired, used, or for someone who may no longer sign in)."""
    try:
        grant = context.signer.read(Purpose.SIGN_IN, token, context.clock.now())
    except LinkError as err:
        abort(400, f"This sign-in link cannot be used: {err.reason}. Ask for a new one.")
    if not grant.extra:
        abort(400, "This sign-in link is not valid. Ask for a new one.")
    if sessions.UsedNonces(context.store).used(grant.extra):
        abort(410, "This sign-in link has already been used. Ask for a new one.")
    member = context.watcher.staff.current.get(grant.person)
    if member is None or not sessions.may_open_board(context, member):
        abort(403, "This account may not open the board. Ask your visitwatch admin.")
    return member, grant.extra, grant.expires


@blueprint.get("/signin/link/<token>")
def open_link(token: str) -> str:
    context = _context()
    member, _, _ = _link_grant(context, token)
    return render_template(
        "signin_link.html",
        name=member.name,
        token=token,
        csrf=csrf_token(context.signer, f"signin-link:{token}"),
    )


@blueprint.post("/signin/link/<token>")
def use_link(token: str) -> Response:
    context = _context()
    if not csrf_ok(context.signer, f"signin-link:{token}", request.form.get("csrf")):
        abort(400, "This form had expired. Open the link from your e-mail again.")
    member, nonce, expires = _link_grant(context, token)
    if not sessions.UsedNonces(context.store).use(
        Purpose.SIGN_IN, nonce, context.clock.now(), expires
    ):
        abort(410, "This sign-in link has already been used. Ask for a new one.")
    log.info("signed_in", method="email")
    return sessions.welcome(context, member)


@blueprint.post("/signout")
def sign_out() -> Response:
    context = _context()
    session = sessions.current(context, request)
    if session is not None:
        if not sessions.form_ok(context, session, request.form.get("csrf")):
            abort(400, "This form had expired. Reload the board and sign out again.")
        sessions.end(context, session)
    response = redirect("/signin", 303)
    sessions.forget(context, response)
    return response
