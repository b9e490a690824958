"""The Flask application: server-rendered pages, no JavaScript needed, no build step.

Blueprints, one per concern: :mod:`pages` (the worker's and the manager's one-tap pages,
reached by signed links), :mod:`board` (today's visits, behind sign-in), :mod:`ops`
(``/healthz`` and ``/metrics``), :mod:`graph_hooks` (Outlook change notifications) and
:mod:`inbound` (text messages from workers, through Twilio and GOV.UK Notify). Every error a person can meet is a plain page with a 4xx
status, never a stack trace.
"""

from __future__ import annotations

from flask import Flask, render_template
from werkzeug.exceptions import HTTPException

from visitwatch.daemon.web.context import WebContext

EXTENSION = "visitwatch"


def create_app(context: WebContext) -> Flask:
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=context.config.web.max_body,
        SECRET_KEY=context.signer.keys[-1],
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=context.config.daemon.public_base_url.startswith("https://"),
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.extensions[EXTENSION] = context

    from visitwatch.daemon.web import board, graph_hooks, inbound, ops, pages

    app.register_blueprint(pages.blueprint)
    app.register_blueprint(graph_hooks.blueprint)
    app.register_blueprint(inbound.blueprint)
    app.register_blueprint(board.blueprint)
    app.register_blueprint(ops.blueprint)

    @app.errorhandler(HTTPException)
    def plain_error(err: HTTPException) -> tuple[str, int, dict[str, str]]:
        # The error's own headers (Retry-After, Allow) are kept; the page is ours.
        headers = {
            k: v
            for k, v in err.get_headers()
            if k.lower() not in ("content-type", "content-length")
        }
        page = render_template("message.html", title=err.name, heading=err.name,
                               text=err.description or "")  # fmt: skip
        return page, err.code or 500, headers

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> tuple[str, int]:
        app.logger.exception("web_page_failed")
        return (
            render_template(
                "message.html",
                title="Something went wrong",
                heading="Something went wrong",
                text="Nothing was changed. If a visit needs attention, phone the worker "
                "or their manager now; then tell your visitwatch admin.",
            ),
            500,
        )

    return app


def context_of(app: Flask) -> WebContext:
    context = app.extensions[EXTENSION]
    assert isinstance(context, WebContext)
    return context
