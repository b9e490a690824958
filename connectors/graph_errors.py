"""Microsoft Graph's error answers, turned into one :class:`GraphError` with what to check.

A plain request's answer and an inner ``$batch`` answer carry the same error body
(``{"error": {"code", "message"}}``), so both are judged here by :func:`graph_error`, and a
caller names the same fault in the same words whichever way the request went.
"""

from __future__ import annotations

from typing import Any

from visitwatch.core.errors import ConnectorError

# Error codes of a delta token Graph no longer honours, case-folded: Graph spells them
# "SyncStateNotFound" for Outlook and "syncStateNotFound" for directory resources.
EXPIRED_DELTA_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})


class GraphError(ConnectorError):
    """A Graph request failed; ``status`` and ``code`` come from Graph's answer."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", permanent: bool = False
    ) -> None:
        super().__init__(message, permanent=permanent)
        self.status = status
        self.code = code


def graph_error(status: int, body: Any, mailbox: str = "") -> GraphError:
    """The error for an answer with HTTP ``status`` and JSON ``body`` (None: unreadable)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code, detail = str(error.get("code", "")), str(error.get("message", ""))[:300]
    where = f"mailbox {mailbox}: " if mailbox else ""
    if status == 403 or code == "ErrorAccessDenied":
        return GraphError(
            f"{where}access denied ({code or status}): {detail}. Check that the app has the "
            "application permission (Calendars.Read, Mail.Send) with admin consent, and "
            "that an application access policy or RBAC for Applications scope includes "
            "this mailbox", status=status, code=code, permanent=True,
        )  # fmt: skip
    if status == 404:
        return GraphError(
            f"{where}not found ({code or 404}): {detail}. Check the mailbox address and "
            "calendar name", status=status, code=code, permanent=True,
        )  # fmt: skip
    if status == 410 or code.casefold() in EXPIRED_DELTA_CODES:
        return GraphError(
            f"{where}delta state expired ({code or 410})",
            status=status,
            code=code or "SyncStateNotFound",
            permanent=False,
        )
    permanent = 400 <= status < 500 and status not in (408, 409, 429)
    return GraphError(
        f"{where}Graph answered {status} {code}: {detail}".strip(),
        status=status,
        code=code,
        permanent=permanent,
    )


def is_expired_delta(err: GraphError) -> bool:
    """Whether Graph has forgotten a delta round (read everything, start a new round)."""
    return err.status == 410 or err.code.casefold() in EXPIRED_DELTA_CODES
