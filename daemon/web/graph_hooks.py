"""Where Microsoft Graph posts Outlook change notifications: ``/graph/notify`` and
``/graph/lifecycle``.

- **Validation**: when a subscription is created, Graph POSTs to each endpoint with
  ``?validationToken=...`` and needs the token back, ``200 text/plain``, within 10 s.
- **Notifications**: a ``{"value": [...]}`` collection; each item names its subscription
  and echoes that subscription's ``clientState`` secret. A believed one asks for its
  source to be read (:class:`~visitwatch.daemon.subscriptions.Subscriptions`): a set and
  an event, never a sync on this thread, so Graph has its 202 well within its 3 s.
- Anything not believed (an unknown subscription, a wrong secret, a body that is not a
  collection) still gets 202 and changes nothing; the log says why, never the secret or
  whose calendar.

The endpoints answer only while subscriptions are active (``extras["subscriptions"]``
set by the service); otherwise 404, so nobody can use them to echo text.
"""

from __future__ import annotations

import structlog
from flask import Blueprint, Response, abort, current_app, request

from visitwatch.connectors.graph_subscriptions import parse_notices
from visitwatch.daemon.subscriptions import Subscriptions
from visitwatch.daemon.web.app import context_of

log = structlog.get_logger(__name__)

blueprint = Blueprint("graph_hooks", __name__)

EXTRA = "subscriptions"  # the WebContext.extras key the service fills
MAX_TOKEN = 1024  # Graph's validation tokens are a few hundred characters


@blueprint.post("/graph/notify")
def notify() -> Response:
    return _receive(lifecycle=False)


@blueprint.post("/graph/lifecycle")
def lifecycle() -> Response:
    return _receive(lifecycle=True)


def _receive(*, lifecycle: bool) -> Response:
    subscriptions = context_of(current_app).extras.get(EXTRA)
    if not isinstance(subscriptions, Subscriptions):
        abort(404)
    token = request.args.get("validationToken")
    if token is not None:
        if len(token) > MAX_TOKEN:
            abort(400)
        answer = Response(token, 200, mimetype="text/plain")
        answer.headers["X-Content-Type-Options"] = "nosniff"
        return answer
    believed = ignored = 0
    for notice in parse_notices(request.get_json(force=True, silent=True)):
        if lifecycle:
            ok = subscriptions.lifecycle(
                notice.subscription_id, notice.client_state, notice.lifecycle
            )
        else:
            ok = subscriptions.changed(notice.subscription_id, notice.client_state)
        believed, ignored = believed + ok, ignored + (not ok)
    if ignored or not believed:
        log.info(
            "graph_notification_ignored",
            endpoint="lifecycle" if lifecycle else "notify",
            believed=believed,
            ignored=ignored,
            reason="unknown subscription or wrong clientState" if ignored else "no items",
        )
    return Response(status=202)
