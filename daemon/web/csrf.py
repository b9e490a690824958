"""CSRF tokens for every form: signed, bound to what the page was opened with (a link's
token, or a board session), and short-lived. A POST without the matching token changes
nothing and gets a plain 400 page."""

from __future__ import annotations

from itsdangerous import BadData, URLSafeTimedSerializer

from visitwatch.daemon.web.links import Signer

# A form left open longer than this must be reloaded before it acts.
MAX_AGE_SECONDS = 4 * 3600


def _serializer(signer: Signer) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(signer.keys, salt="visitwatch-csrf")


def csrf_token(signer: Signer, bound_to: str) -> str:
    return str(_serializer(signer).dumps(bound_to))


def csrf_ok(signer: Signer, bound_to: str, token: str | None) -> bool:
    if not token:
        return False
    try:
        return bool(_serializer(signer).loads(token, max_age=MAX_AGE_SECONDS) == bound_to)
    except BadData:
        return False
