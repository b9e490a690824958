"""Short links for text messages: ``{public_base_url}/s/<code>`` stands for a signed link.

A signed link is about 250 characters, most of a two-segment text. A text carries instead a
random code (12 characters of ``secrets.token_urlsafe``: 72 bits, beyond guessing at the
pages' rate limit) that redirects to the signed page, where the token is checked exactly
as if it had been tapped directly: purpose, visit, person, expiry. The table keeps only
the code's SHA-256, so a copy of the database alone cannot be turned into working short
links; the signed target is kept to redirect to, and expires with it.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from datetime import datetime
from urllib.parse import urlsplit

from visitwatch.daemon.store import Store, ts

CODE_BYTES = 9  # 12 URL-safe characters


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def shorten(conn: sqlite3.Connection, link: str, expires: datetime, now: datetime) -> str:
    """A short link standing for ``link`` until ``expires``, written in the caller's
    transaction (next to the notification that carries it)."""
    parts = urlsplit(link)
    code = secrets.token_urlsafe(CODE_BYTES)
    conn.execute(
        "INSERT INTO short_links (code_hash, target, created, expires) VALUES (?,?,?,?)",
        (_hash(code), parts.path, ts(now), ts(expires)),
    )
    conn.execute("DELETE FROM short_links WHERE expires < ?", (ts(now),))
    return f"{parts.scheme}://{parts.netloc}/s/{code}"


def target(store: Store, code: str, now: datetime) -> str | None:
    """The page a code stands for (a path on this server), or None: unknown or expired."""
    if not code or len(code) > 64:
        return None
    row = store.one(
        "SELECT target FROM short_links WHERE code_hash = ? AND expires >= ?",
        (_hash(code), ts(now)),
    )
    return str(row["target"]) if row else None
