"""Signed links: one tap from a message to the page that acts on it.

A link carries only an opaque token: Fernet (the ``cryptography`` library's authenticated
encryption, which msal already brings) under a key derived for one purpose, so a check-in
link cannot acknowledge and neither can open a board session. Inside, unreadable without
the key, are one visit, one person and when the link stops working (``link_ttl`` after the
visit's deadline): a URL seen in a proxy log or over a shoulder shows no name or address,
and nothing in it can be changed without the key.

The key is ``[web] signing_key`` when given (env/file/credential, like every secret), else
a random key generated on first start in the state directory, owner-only (0600). Rotating
it: move the key file to ``web-signing.key.old`` (or give the old key as
``VISITWATCH_OLD_SIGNING_KEY``) and restart; links signed with the old key keep working until
the old file is deleted, and every new link uses the new key.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import Secret
from visitwatch.core.private_files import make_dirs

KEY_FILE = "web-signing.key"
OLD_KEY_FILE = "web-signing.key.old"
OLD_KEY_ENV = "VISITWATCH_OLD_SIGNING_KEY"


class Purpose(StrEnum):
    """What a token lets its bearer do; each is signed under its own salt."""

    CHECKIN = "checkin"  # the worker: safe, extend, safe at home, help
    ACK = "ack"  # a manager or director: I'm on it, confirmed safe
    SIGN_IN = "sign-in"  # a one-time board sign-in link sent by e-mail
    SESSION = "session"  # a signed board session cookie


class LinkError(VisitwatchError):
    """A token that is forged, altered, expired or for something else. ``reason`` is safe
    to show; the page never says more than that."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


@dataclass(frozen=True)
class Grant:
    """What a valid token says."""

    purpose: Purpose
    visit_id: str
    person: str  # the staff id (or, for a worker not in the directory, their label)
    expires: datetime
    extra: str = ""  # a nonce, for one-time sign-in links


class Signer:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one signing key")
        # Every key opens a token; the last (the newest) makes them. itsdangerous (CSRF)
        # takes the same order.
        self.keys = keys
        self._fernets = {
            purpose: MultiFernet([Fernet(_derive(key, purpose)) for key in reversed(keys)])
            for purpose in Purpose
        }

    def sign(
        self, purpose: Purpose, visit_id: str, person: str, expires: datetime, extra: str = ""
    ) -> str:
        payload: dict[str, Any] = {"v": visit_id, "p": person, "e": int(expires.timestamp())}
        if extra:
            payload["x"] = extra
        data = json.dumps(payload, separators=(",", ":")).encode()
        return self._fernets[purpose].encrypt(data).decode().rstrip("=")

    def read(self, purpose: Purpose, token: str, now: datetime) -> Grant:
        """The grant in ``token``; a :class:`LinkError` for anything else."""
        try:
            padded = token.strip() + "=" * (-len(token.strip()) % 4)
            payload = json.loads(self._fernets[purpose].decrypt(padded.encode()))
        except (InvalidToken, ValueError, UnicodeError):
            raise LinkError("this link is not valid: it may be incomplete or altered") from None
        try:
            expires = datetime.fromtimestamp(int(payload["e"]), UTC)
            grant = Grant(
                purpose, str(payload["v"]), str(payload["p"]), expires, payload.get("x", "")
            )
        except (KeyError, TypeError, ValueError):
            raise LinkError("this link is not valid") from None
        if now >= grant.expires:
            raise LinkError("this link has expired", expired=True)
        return grant


def _derive(secret: str, purpose: Purpose) -> bytes:
    """A Fernet key for one purpose from one configured secret (HKDF-SHA256)."""
    raw = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"visitwatch-link-{purpose}".encode()
    ).derive(secret.encode())
    return base64.urlsafe_b64encode(raw)


class Links:
    """Builds the links messages carry: ``public_base_url`` plus a signed token."""

    def __init__(self, signer: Signer, base_url: str, ttl: timedelta) -> None:
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl

    # Each link says when it was made (``Grant.extra``): a visit re-opened since (moved to a
    # later day and watched afresh) is a new booking, which an old link must not act on.
    def checkin(self, visit_id: str, person: str, deadline: datetime, issued: datetime) -> str:
        token = self.signer.sign(
            Purpose.CHECKIN, visit_id, person, deadline + self.ttl, extra=issued_text(issued)
        )
        return f"{self.base_url}/v/{quote(token)}"

    def ack(self, visit_id: str, person: str, deadline: datetime, issued: datetime) -> str:
        token = self.signer.sign(
            Purpose.ACK, visit_id, person, deadline + self.ttl, extra=issued_text(issued)
        )
        return f"{self.base_url}/a/{quote(token)}"


def issued_text(moment: datetime) -> str:
    """When a link was made, in the record's time format (so it compares with the audit)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_keys(configured: Secret | None, state_dir: Path) -> list[str]:
    """The verification keys, oldest first; the last one signs. Generates the key file on
    first start when no key is configured."""
    keys = []
    old = os.environ.get(OLD_KEY_ENV, "").strip()
    old_file = state_dir / OLD_KEY_FILE
    if old_file.exists():
        keys.append(old_file.read_text(encoding="utf-8").strip())
    if old:
        keys.append(old)
    if configured is not None:
        keys.append(configured.reveal())
        return [k for k in keys if k]
    path = state_dir / KEY_FILE
    if not path.exists():
        make_dirs(state_dir)  # 0750 whatever the umask
        # Created owner-only from the first byte, whatever the umask.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
    os.chmod(path, 0o600)
    keys.append(path.read_text(encoding="utf-8").strip())
    return [k for k in keys if k]
