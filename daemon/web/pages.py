"""The one-tap pages reached from signed links: the worker's visit and the manager's alert.

``/v/<token>`` (a check-in link, sent to the worker) shows the visit and offers "I'm safe",
extensions, "Safe at home" and "I need help". ``/a/<token>`` (an acknowledge link, sent to
whoever an alert reached) shows what a manager needs to act and offers "I'm on it" and
"Confirmed safe". Every action is a POST carrying a CSRF token bound to the link, acts
through the same :class:`Actions` as the CLI (who from the token, ``via = web``), wakes the
daemon, and redirects (303) to a page saying what happened and who was told.

A link that is forged, altered, for the other page or expired gets a plain 403/410 page; a
visit that is over shows how it ended and changes nothing, however often the link is used.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from visitwatch.core.phone import readable
from visitwatch.daemon.actions import EXTEND_CHOICES
from visitwatch.daemon.store import from_ts, ts
from visitwatch.daemon.visits import ActionError, Visit
from visitwatch.daemon.web import short_links
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.csrf import csrf_ok, csrf_token
from visitwatch.daemon.web.links import Grant, LinkError, Purpose
from visitwatch.daemon.web.pages_done import outcome
from visitwatch.daemon.web.pages_view import (
    alert_kind,
    departure,
    help_list,
    local,
    maps_link,
    person_name,
    state_words,
    subject_of,
    tel_link,
)

log = structlog.get_logger(__name__)

blueprint = Blueprint("pages", __name__)
# Mobiles are stored in E.164; pages show them as people write them ("07700 900123").
blueprint.add_app_template_filter(readable, "phone")

EXTEND_MINUTES = EXTEND_CHOICES
WORKER_ACTIONS = ("checkin", "home", "left", "extend", "help")
MANAGER_ACTIONS = ("ack", "safe")
# The checkins row each button leaves.
RECORDED_AS = {
    "checkin": "checkin",
    "home": "safe_home",
    "left": "left",
    "extend": "extend",
    "help": "help",
    "ack": "ack",
    "safe": "confirmed_safe",
}
WRONG_PAGE = {
    Purpose.CHECKIN: "This is a manager's alert link; it opens the alert page, not a visit's "
    "check-in page.",
    Purpose.ACK: "This is a worker's check-in link; it cannot acknowledge an alert.",
}


class Refusal(Exception):
    """A plain page with a 4xx status and a short explanation; nothing was changed."""

    def __init__(self, status: int, heading: str, text: str) -> None:
        super().__init__(heading)
        self.status, self.heading, self.text = status, heading, text


@blueprint.errorhandler(Refusal)
def refused(err: Refusal) -> tuple[str, int]:
    return render_template(
        "message.html", title=err.heading, heading=err.heading, text=err.text
    ), err.status


@blueprint.after_request
def private_page(response: Response) -> Response:
    # The link is a credential: never cached, never sent on as a Referer (to the maps site).
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _context() -> WebContext:
    from visitwatch.daemon.web.app import context_of

    return context_of(current_app)


def _reopened_since(context: WebContext, visit_id: str, issued: str) -> bool:
    """Whether the visit was re-opened (moved and watched afresh) after the link was made."""
    if len(issued) != len("2026-01-01T00:00:00.000000Z"):
        return False  # a link from before links said when they were made
    # At the same instant counts as after: a link is never made in the pass that re-opens.
    return (
        context.store.one(
            "SELECT 1 FROM audit WHERE visit_id = ? AND at >= ? AND cause LIKE 're-opened%'",
            (visit_id, issued),
        )
        is not None
    )


def _open(purpose: Purpose, token: str) -> tuple[WebContext, Grant, Visit]:
    """The grant in ``token`` and its visit as stored now, or a :class:`Refusal`."""
    context = _context()
    now = context.clock.now()
    try:
        grant = context.signer.read(purpose, token, now)
    except LinkError as err:
        if err.expired:
            raise Refusal(
                410,
                "This link has expired",
                "Links stop working a while after the visit's return time. If the visit "
                "still needs attention, phone the worker or their manager now.",
            ) from None
        other = Purpose.ACK if purpose is Purpose.CHECKIN else Purpose.CHECKIN
        try:
            context.signer.read(other, token, now)
        except LinkError:
            raise Refusal(
                403,
                "This link does not work",
                f"{err.reason[0].upper()}{err.reason[1:]}. Open the link from your message "
                "again, or copy all of it; nothing was changed.",
            ) from None
        raise Refusal(403, "This link is for another page", WRONG_PAGE[purpose]) from None
    try:
        visit = context.watcher.visits.get(grant.visit_id)
    except ActionError as err:
        raise Refusal(409, "This visit cannot be read", str(err)) from None
    if visit is None:
        raise Refusal(
            404,
            "Visit not found",
            "visitwatch has no record of this visit any more. If someone may need help, "
            "phone them.",
        )
    if _reopened_since(context, visit.id, grant.extra):
        raise Refusal(
            410,
            "This link is from an earlier booking",
            "This visit was moved and is being watched again as a new booking since this "
            "link was sent. Use the link in your latest message about it.",
        )
    if purpose is Purpose.ACK and context.watcher.staff.current.get(grant.person) is None:
        raise Refusal(
            403,
            "This link is for someone else",
            "This link was sent to someone who is no longer in visitwatch's staff directory.",
        )
    if purpose is Purpose.CHECKIN and grant.person != context.watcher.recipients.worker(visit).id:
        raise Refusal(
            403,
            "This link is for someone else",
            "This check-in link was sent to someone who is not this visit's worker now "
            "(the calendar entry may have changed). Use the link in your latest message.",
        )
    return context, grant, visit


def _check_csrf(context: WebContext, token: str) -> None:
    if not csrf_ok(context.signer, token, request.form.get("csrf")):
        raise Refusal(
            400,
            "Please try again",
            "This form was too old or incomplete, so nothing was changed. Go back, reload "
            "the page and tap the button again.",
        )


def _act(context: WebContext, token: str, page: str, action: str, grant: Grant) -> BaseResponse:
    """Run one button's action; 303 to its result page (or to the page, if it is over)."""
    actions = context.watcher.actions
    name = person_name(context, grant.person)
    now = context.clock.now()
    try:
        if action in ("checkin", "home"):
            kind = "safe_home" if action == "home" else "checkin"
            actions.check_in(grant.visit_id, by=name, via="web", action=kind)
        elif action == "extend":
            actions.check_in(grant.visit_id, by=name, via="web", extend=_extension())
        elif action == "left":
            actions.note_departure(grant.visit_id, by=name, via="web")
        elif action == "help":
            actions.request_help(grant.visit_id, by=name, via="web")
        elif action in MANAGER_ACTIONS:
            actions.acknowledge(
                grant.visit_id, by=name, safe=action == "safe", via="web", person=grant.person
            )
    except ActionError as err:
        visit_now = context.watcher.visits.get(grant.visit_id)
        if visit_now is not None and visit_now.state.terminal:
            return redirect(url_for(page, token=token), 303)  # resolved meanwhile: a replay
        raise Refusal(409, "That could not be done", str(err)) from None
    context.wake()
    log.info("page_action", visit_id=grant.visit_id, action=action, via="web")
    return redirect(url_for(f"{page}_done", token=token, did=action, at=ts(now)), 303)


def _extension() -> timedelta:
    minutes = request.form.get("minutes", "")
    if not minutes.isdigit() or int(minutes) not in EXTEND_MINUTES:
        raise Refusal(400, "Choose 15, 30 or 60 minutes", "Nothing was changed.")
    return timedelta(minutes=int(minutes))


def _done(context: WebContext, token: str, visit: Visit, for_worker: bool) -> str:
    did = request.args.get("did", "")
    if did not in (WORKER_ACTIONS if for_worker else MANAGER_ACTIONS):
        raise Refusal(404, "Nothing to show", "Open the link from your message again.")
    try:
        at = from_ts(request.args.get("at"))
    except ValueError:
        at = None
    # Only what the record shows was done: a result page typed by hand claims nothing.
    done = at and context.store.one(
        "SELECT 1 AS done FROM checkins WHERE visit_id = ? AND at >= ? AND action = ?",
        (visit.id, ts(at), RECORDED_AS[did]),
    )
    if not at or not done:
        raise Refusal(404, "Nothing to show", "Open the link from your message again.")
    now = context.clock.now()
    result = outcome(context, visit, did, at)
    back = url_for("pages.visit_page" if for_worker else "pages.alert_page", token=token)
    return render_template(
        "done.html",
        result=result,
        visit=visit,
        subject=subject_of(visit),
        state=state_words(context, visit, now, for_worker, already=False),
        back=back,
    )


def _left_at(context: WebContext, visit: Visit) -> str:
    """When a going-home worker said they left the visit; "" if they have not."""
    left = departure(context.store, visit) if visit.going_home_after else None
    return local(context, left) if left else ""


# ------------------------------------------------------------------ the worker's page


@blueprint.get("/v/<token>")
def visit_page(token: str) -> str:
    context, _grant, visit = _open(Purpose.CHECKIN, token)
    now = context.clock.now()
    return render_template(
        "visit.html",
        token=token,
        visit=visit,
        subject=subject_of(visit),
        start=local(context, visit.start),
        deadline=local(context, visit.deadline),
        state=state_words(context, visit, now, for_worker=True),
        started=now >= visit.start,
        left_at=_left_at(context, visit),
        extend_minutes=EXTEND_MINUTES,
        csrf=csrf_token(context.signer, token),
    )


@blueprint.get("/v/<token>/help")
def confirm_help(token: str) -> str:
    context, _grant, visit = _open(Purpose.CHECKIN, token)
    if visit.state.terminal:
        return visit_page(token)
    return render_template(
        "confirm_help.html",
        token=token,
        visit=visit,
        people=help_list(context, visit),
        csrf=csrf_token(context.signer, token),
    )


def _button(purpose: Purpose, token: str, action: str) -> BaseResponse:
    """A button's POST: the link, the button, CSRF, then the action (a replay on a visit
    already over goes back to the page, which says what happened)."""
    allowed, page = (
        (WORKER_ACTIONS, "pages.visit_page")
        if purpose is Purpose.CHECKIN
        else (MANAGER_ACTIONS, "pages.alert_page")
    )
    context, grant, visit = _open(purpose, token)
    if action not in allowed:
        raise Refusal(404, "No such button", "Nothing was changed.")
    _check_csrf(context, token)
    if visit.state.terminal:
        return redirect(url_for(page, token=token), 303)
    return _act(context, token, page, action, grant)


@blueprint.post("/v/<token>/<action>")
def visit_action(token: str, action: str) -> BaseResponse:
    return _button(Purpose.CHECKIN, token, action)


@blueprint.get("/v/<token>/done")
def visit_page_done(token: str) -> str:
    context, _grant, visit = _open(Purpose.CHECKIN, token)
    return _done(context, token, visit, for_worker=True)


# ------------------------------------------------------------------ the manager's page


@blueprint.get("/a/<token>")
def alert_page(token: str) -> str:
    context, grant, visit = _open(Purpose.ACK, token)
    now = context.clock.now()
    worker = context.watcher.recipients.worker(visit)
    kind = alert_kind(context, visit)
    late = int((now - visit.deadline).total_seconds() // 60) if now > visit.deadline else 0
    return render_template(
        "alert.html",
        token=token,
        visit=visit,
        worker=worker,
        tel=tel_link(worker.mobile),
        maps=maps_link(visit.address),
        subject=subject_of(visit),
        start=local(context, visit.start),
        deadline=local(context, visit.deadline),
        late=late,
        state=state_words(context, visit, now, for_worker=False),
        instruction=context.config.policy.instructions.get(str(kind), ""),
        help_at=local(context, visit.help_requested_at) if visit.help_requested_at else "",
        left_at=_left_at(context, visit),
        acknowledged_at=local(context, visit.acknowledged_at),
        started=now >= visit.start,
        you=person_name(context, grant.person),
        csrf=csrf_token(context.signer, token),
    )


@blueprint.post("/a/<token>/<action>")
def alert_action(token: str, action: str) -> BaseResponse:
    return _button(Purpose.ACK, token, action)


@blueprint.get("/a/<token>/done")
def alert_page_done(token: str) -> str:
    context, _grant, visit = _open(Purpose.ACK, token)
    return _done(context, token, visit, for_worker=False)


# ------------------------------------------------------------------ short links (texts)


@blueprint.get("/s/<code>")
def short_link(code: str) -> BaseResponse:
    """A text's short link: to the signed page it stands for, which checks its token."""
    context = _context()
    where = short_links.target(context.store, code, context.clock.now())
    if where is None:
        raise Refusal(
            404,
            "This link does not work",
            "It is not a link visitwatch sent, or it has expired. If a visit still needs "
            "attention, phone the worker or their manager now.",
        )
    return redirect(where, 303)
