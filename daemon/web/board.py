"""The board: today's visits by state, for managers and directors, behind sign-in.

Every group a manager scans for, most urgent first. A visit is in one group only, by its
state: a visit under way that the policy found wanting stays where its state puts it and
carries a "non-compliant" mark, while a visit not yet started with such findings is in
"Non-compliant" (there is still time to put it right). "Today" is the organisation's day;
a visit still under way from an earlier day stays on the board until it is over.

The page refreshes itself every 30 seconds (a small script the reader can pause, WCAG 2.2.1; without JavaScript, a "Refresh now" link). Its
actions are those of the manager's page, "I'm on it" and "Confirmed safe", acting through
the same :class:`Actions` as the CLI, recorded as the signed-in person ``via = web``.
Subjects and addresses of private entries are never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

import structlog
from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    stream_with_context,
)
from werkzeug.wrappers import Response

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.notification import NotificationKind
from visitwatch.core.phone import readable
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon import export
from visitwatch.daemon.recipients import alerted
from visitwatch.daemon.store import ts
from visitwatch.daemon.visits import ActionError, UnreadableVisit, Visit
from visitwatch.daemon.web import sessions, signin
from visitwatch.daemon.web.app import context_of
from visitwatch.daemon.web.context import WebContext
from visitwatch.daemon.web.pages_view import told_since

log = structlog.get_logger(__name__)

blueprint = Blueprint("board", __name__)
blueprint.register_blueprint(signin.blueprint)

REFRESH_SECONDS = 30
PRIVATE = "(private entry)"


@dataclass(frozen=True)
class GroupSpec:
    key: str
    title: str
    hint: str


# Most urgent first.
GROUPS = (
    GroupSpec("escalated", "Escalated", "Past the manager: directors alerted, or help asked for"),
    GroupSpec("overdue", "Overdue", "Not checked in after the grace period; manager alerted"),
    GroupSpec("acknowledged", "Someone is on it", "Acknowledged, not yet confirmed safe"),
    GroupSpec("due", "Due", "Past the expected return; the worker has been reminded"),
    GroupSpec("out", "Out now", "On a visit, before the expected return"),
    GroupSpec("noncompliant", "Non-compliant", "Not started, missing what the policy requires"),
    GroupSpec("booked", "Later today", "Booked, nothing missing"),
    GroupSpec("done", "Done", "Checked in, confirmed safe, cancelled or expired"),
)
_BY_STATE = {
    VisitState.ESCALATED: "escalated",
    VisitState.OVERDUE: "overdue",
    VisitState.ACKNOWLEDGED: "acknowledged",
    VisitState.DUE: "due",
    VisitState.IN_PROGRESS: "out",
    VisitState.RESOLVED: "done",
    VisitState.CANCELLED: "done",
    VisitState.EXPIRED: "done",
}
_UNDER_WAY = tuple(str(s) for s in VisitState if s.under_way)


@dataclass(frozen=True)
class BoardRow:
    """One visit as the board shows it."""

    visit_id: str
    state: VisitState
    worker: str
    mobile: str
    subject: str
    address: str
    window: str
    deadline: str
    overdue_minutes: int
    acknowledged: str  # "Maria Jones at 14:20", or ""
    help_requested: bool
    findings: tuple[str, ...]  # the policy's error findings
    can_act: bool


@dataclass
class Group:
    spec: GroupSpec
    rows: list[BoardRow] = field(default_factory=list)


def group_key(visit: Visit) -> str:
    if visit.state is VisitState.BOOKED:
        return "noncompliant" if visit.has_errors else "booked"
    return _BY_STATE[visit.state]


def todays_visits(context: WebContext, now: datetime) -> list[Visit | UnreadableVisit]:
    """Visits overlapping the organisation's today, and any still under way."""
    tz = context.config.daemon.timezone
    day = now.astimezone(tz).date()
    start = datetime.combine(day, time(0), tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tz)
    marks = ", ".join("?" for _ in _UNDER_WAY)
    rows = context.store.query(
        f'SELECT * FROM visits WHERE (start < ? AND "end" >= ?) OR state IN ({marks})'
        " ORDER BY start, id",
        (ts(end), ts(start), *_UNDER_WAY),
    )
    return [Visit.read(row) for row in rows]


def board_row(context: WebContext, visit: Visit, now: datetime) -> BoardRow:
    view = context.watcher.router.view(visit)
    tz = context.config.daemon.timezone
    today = now.astimezone(tz).date()

    def clock(moment: datetime | None) -> str:
        if moment is None:
            return "not given"
        local = moment.astimezone(tz)
        return f"{local:%H:%M}" if local.date() == today else f"{local:%a %d %b %H:%M}"

    late = 0
    if not visit.state.terminal and visit.deadline is not None and now > visit.deadline:
        late = int((now - visit.deadline).total_seconds() // 60)
    acknowledged = ""
    if visit.acknowledged_by:
        acknowledged = f"{visit.acknowledged_by} at {clock(visit.acknowledged_at)}"
    return BoardRow(
        visit_id=visit.id,
        state=visit.state,
        worker=view.worker_name,
        mobile=readable(view.worker_mobile),
        subject=view.subject,
        address=PRIVATE if visit.private else (visit.address or "not recorded"),
        window=f"{clock(visit.start)}–{clock(visit.end)}",
        deadline=clock(visit.deadline),
        overdue_minutes=late,
        acknowledged=acknowledged,
        help_requested=visit.help_requested_at is not None and not visit.state.terminal,
        findings=tuple(f.message for f in visit.findings if f.severity == "error"),
        can_act=visit.state.under_way and now >= visit.start,
    )


def build_board(context: WebContext, now: datetime) -> tuple[list[Group], list[str]]:
    """The groups in order, and the ids of visits the record cannot read."""
    groups = {spec.key: Group(spec) for spec in GROUPS}
    unreadable = []
    for visit in todays_visits(context, now):
        if isinstance(visit, UnreadableVisit):
            unreadable.append(visit.id)
            continue
        groups[group_key(visit)].rows.append(board_row(context, visit, now))
    return list(groups.values()), unreadable


def _signed_in() -> tuple[WebContext, sessions.Session | None]:
    context = context_of(current_app)
    return context, sessions.current(context, request)


@blueprint.get("/board")
def board() -> str | Response:
    context, session = _signed_in()
    if session is None:
        response = redirect("/signin", 303)
        if request.cookies.get(sessions.COOKIE):
            sessions.forget(context, response)  # expired, altered or no longer allowed
        return response
    now = context.clock.now()
    groups, unreadable = build_board(context, now)
    tz = context.config.daemon.timezone
    return render_template(
        "board.html",
        groups=groups,
        unreadable=unreadable,
        person=session.person,
        csrf=sessions.form_token(context, session),
        refresh=REFRESH_SECONDS,
        updated=f"{now.astimezone(tz):%H:%M:%S}",
        today=f"{now.astimezone(tz):%A %d %B}",
    )


@blueprint.post("/board/act")
def act() -> tuple[str, int] | Response:
    context, session = _signed_in()
    if session is None:
        return redirect("/signin", 303)
    if not sessions.form_ok(context, session, request.form.get("csrf")):
        abort(400, "This form had expired, so nothing was changed. Reload the board.")
    visit_id = request.form.get("visit", "")
    action = request.form.get("action", "")
    if action not in ("ack", "safe"):
        abort(400, "Unknown action; nothing was changed.")
    visit = context.watcher.visits.get(visit_id) if visit_id else None
    if visit is None:
        abort(404, "No such visit; nothing was changed.")
    by = session.person.name
    view = context.watcher.router.view(visit)
    now = context.clock.now()
    try:
        context.watcher.actions.acknowledge(
            visit.id, by=by, safe=action == "safe", via="web", person=session.person.id
        )
    except ActionError as err:
        return render_template("board_result.html", ok=False, heading="Nothing changed",
                               lines=[str(err)]), 409  # fmt: skip
    context.wake()
    log.info("board_action", visit_id=visit.id, action=action)
    if action == "safe":
        told = [a.recipient.name for a in alerted(context.store.db.conn, visit.id)]
        heading = f"{view.worker_name} is confirmed safe"
        lines = [
            f"Recorded as confirmed safe by {by}. The visit is closed.",
            "The all clear goes to: " + ", ".join(told)
            if told
            else "Nobody had been alerted, so no all clear was needed.",
        ]
    else:
        minutes = int(context.watcher.ack_timeout.total_seconds() // 60)
        # As on the manager's page: everyone else alerted hears who has taken it on.
        told = [
            str(t)
            for t in told_since(context.store, visit.id, now, (NotificationKind.ACKNOWLEDGED,))
        ]
        heading = f"You are handling {view.worker_name}'s visit"
        lines = [
            f"Recorded: {by} is on it. Repeats of the alerts sent so far stop.",
            "Told that you are handling it: " + ", ".join(told)
            if told
            else "Nobody else had been alerted, so nobody else was told.",
            f"If {view.worker_name} is not confirmed safe within {minutes} minutes, you and "
            "the next people on the ladder are alerted again.",
            "When the worker is safe, press “Confirmed safe” on the board.",
        ]
    return render_template("board_result.html", ok=True, heading=heading, lines=lines), 200


@blueprint.route("/board/export", methods=["GET", "POST"])
def export_record() -> str | tuple[str, int] | Response:
    """The Lone Working Record as CSV: managers their team's, directors and admins all."""
    context, session = _signed_in()
    if session is None:
        return redirect("/signin", 303)
    try:
        team = export.board_team(session.person)
    except export.ExportRefused as err:
        abort(403, f"{err}; ask your manager.")
    tz = context.config.daemon.timezone
    today = context.clock.now().astimezone(tz).date()
    page = {
        "csrf": sessions.form_token(context, session),
        "whose": "Your team's visits (everyone you manage)." if team else "Everyone's visits.",
        "first": request.form.get("from") or today.replace(day=1).isoformat(),
        "last": request.form.get("to") or today.isoformat(),
    }
    if request.method == "GET":
        return render_template("board_export.html", problem="", **page)
    if not sessions.form_ok(context, session, request.form.get("csrf")):
        abort(400, "This form had expired, so nothing was exported. Reload the page.")
    directory = context.watcher.staff.current
    try:
        first, last = date.fromisoformat(page["first"]), date.fromisoformat(page["last"])
        chosen = export.scope(first, last, tz, directory, team or None)
    except (ValueError, VisitwatchError) as err:
        return render_template("board_export.html", problem=str(err), **page), 400
    export.audit_export(context.store, chosen, session.person.name, "web", "csv")
    log.info("record_exported", via="web", first=str(first), last=str(last))
    records = export.RecordExport(context.store, directory, tz).records(chosen)
    name = f"lone-working-record-{first}-to-{last}.csv"
    return Response(
        stream_with_context(export.csv_lines(records, tz)),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"',
                 "Cache-Control": "no-store"},
    )  # fmt: skip
