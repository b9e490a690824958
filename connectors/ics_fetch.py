"""Reading an iCalendar feed's bytes: a local file, or HTTP(S) with a conditional GET.

:class:`FeedReader` follows redirects, keeps to a timeout and a size limit while the body
streams in, and reuses the last good body when the server answers 304 Not Modified. Every
error it raises is a :class:`ConnectorError` that shows the address only as
:func:`redact_url` or the secret's origin shows it: calendar URLs often carry their
secret in the path or the query.

The validators and the body's hash are also kept in a small 0600 JSON file in the state
folder (never the body: it holds families' addresses), so the first poll after a restart
is still a conditional GET; its 304 says "what you processed last time", and the caller,
which keeps the hash of what it processed, skips the read.
"""

from __future__ import annotations

import hashlib
import json
import re
import time as monotonic_time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import structlog
import urllib3

from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import Secret
from visitwatch.core.private_files import write_atomically

log = structlog.get_logger(__name__)

_PERMANENT_STATUSES = frozenset({401, 403, 404, 410})
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")

# The validators (ETag, Last-Modified) a server sent with a fresh body.
Validators = tuple[str | None, str | None]


@dataclass(frozen=True)
class FeedBody:
    """What one read gave: the bytes (None for a 304 after a restart) and their SHA-256."""

    body: bytes | None
    fingerprint: str
    # For a fresh HTTP body: the validators to remember once it has parsed.
    validators: Validators | None = None


def fingerprint_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def describe_url(url: str | Secret) -> tuple[str, str]:
    """The URL to fetch and a description of it that is safe to show."""
    if isinstance(url, Secret):
        return url.reveal().strip(), f"the address from {url.origin}"
    return url.strip(), redact_url(url.strip())


class FeedReader:
    """The bytes of one feed, read from ``url`` or ``path`` (exactly one is given)."""

    def __init__(
        self,
        source: str,
        *,
        url: str | None,
        path: Path | None,
        where: str,
        timeout: float,
        max_bytes: int,
        user_agent: str,
        cache_file: Path | None = None,
    ) -> None:
        self.name = source
        self._url = url
        self._path = path
        self._where = where
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._user_agent = user_agent
        self._session: requests.Session | None = None
        # The last body that parsed, with the validators the server sent for it.
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._cached_body: bytes | None = None
        # The hash of the body the validators belong to (from the cache file after a restart).
        self._cached_hash: str | None = None
        self._cache_file = cache_file if url is not None else None
        self._load_cache()

    def read(self, conditional: bool = True) -> FeedBody:
        """The feed's bytes; ``conditional=False`` asks the server for the whole body."""
        if self._path is not None:
            body = self._read_file(self._path)
            return FeedBody(body, fingerprint_of(body))
        return self._read_http(conditional)

    def remember(self, body: bytes, validators: Validators) -> None:
        """Keep ``body`` (which parsed) for the next 304 answer, and its validators on disk."""
        self._cached_body = body
        self._cached_hash = fingerprint_of(body)
        self._etag, self._last_modified = validators
        self._save_cache()

    def _load_cache(self) -> None:
        if self._cache_file is None:
            return
        try:
            saved = json.loads(self._cache_file.read_text(encoding="utf-8"))
            etag, modified, digest = saved["etag"], saved["last_modified"], saved["sha256"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Only a lost 304: the next read is a full download.
            log.warning("ics.cache_unreadable", source=self.name, error=type(err).__name__)
            return
        if isinstance(digest, str) and (isinstance(etag, str) or isinstance(modified, str)):
            self._etag = etag if isinstance(etag, str) else None
            self._last_modified = modified if isinstance(modified, str) else None
            self._cached_hash = digest

    def _save_cache(self) -> None:
        if self._cache_file is None or not (self._etag or self._last_modified):
            return
        saved = {
            "etag": self._etag,
            "last_modified": self._last_modified,
            "sha256": self._cached_hash,
        }
        try:
            write_atomically(self._cache_file, json.dumps(saved).encode("utf-8"))
        except OSError as err:
            log.warning("ics.cache_unwritable", source=self.name, error=err.strerror or "")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _read_file(self, path: Path) -> bytes:
        try:
            with path.open("rb") as handle:
                body = handle.read(self._max_bytes + 1)
        except FileNotFoundError:
            raise ConnectorError(
                f"source {self.name!r}: calendar file {path} does not exist", permanent=True
            ) from None
        except OSError as err:
            raise ConnectorError(
                f"source {self.name!r}: cannot read calendar file {path}: {err.strerror}"
            ) from None
        if len(body) > self._max_bytes:
            raise self._too_large()
        return body

    def _too_large(self) -> ConnectorError:
        return ConnectorError(
            f"source {self.name!r}: the feed from {self._where} is larger than max_bytes "
            f"({self._max_bytes} bytes); nothing was read from it. Raise the source's "
            "max_bytes option if the calendar really is this large"
        )

    def _read_http(self, conditional: bool) -> FeedBody:
        assert self._url is not None
        if self._session is None:
            self._session = requests.Session()
        headers = {"User-Agent": self._user_agent}
        if conditional and self._cached_hash is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        try:
            response = self._session.get(
                self._url,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=True,
                stream=True,
            )
        except requests.Timeout:
            raise ConnectorError(
                f"source {self.name!r}: {self._where} did not answer within {self._timeout:g}s"
            ) from None
        except requests.RequestException as err:
            # requests' messages quote the full URL, query string included: never show them.
            raise ConnectorError(
                f"source {self.name!r}: cannot reach {self._where}: {_network_reason(err)}"
            ) from None
        with response:
            return self._answer(response)

    def _answer(self, response: requests.Response) -> FeedBody:
        status = response.status_code
        if status == 304:
            log.info("ics.not_modified", source=self.name, status=status)
            if self._cached_hash is None:
                raise ConnectorError(
                    f"source {self.name!r}: {self._where} answered 304 Not Modified "
                    "but no earlier copy is held"
                )
            return FeedBody(self._cached_body, self._cached_hash)
        if not 200 <= status < 300:
            reason = (response.reason or "").strip()[:60]
            raise ConnectorError(
                f"source {self.name!r}: {self._where} answered HTTP {status} {reason}".rstrip(),
                permanent=status in _PERMANENT_STATUSES,
            )
        body = self._download(response)
        log.info("ics.downloaded", source=self.name, status=status, size=len(body))
        validators = (response.headers.get("ETag"), response.headers.get("Last-Modified"))
        return FeedBody(body, fingerprint_of(body), validators)

    def _download(self, response: requests.Response) -> bytes:
        """The body, read in pieces and abandoned once it passes ``max_bytes``."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        deadline = monotonic_time.monotonic() + max(self._timeout, 1.0) * 4
        try:
            for chunk in _pieces(response):
                size += len(chunk)
                if size > self._max_bytes:
                    raise self._too_large()
                if monotonic_time.monotonic() > deadline:
                    raise ConnectorError(
                        f"source {self.name!r}: {self._where} sent the feed too slowly "
                        f"(not complete after {max(self._timeout, 1.0) * 4:g}s)"
                    )
                chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            raise ConnectorError(
                f"source {self.name!r}: the download from {self._where} broke off: "
                f"{_network_reason(err)}"
            ) from None
        return b"".join(chunks)


def redact_url(url: str) -> str:
    """An address safe to show: no credentials, query, fragment or secret-looking path parts.

    Google (``/calendar/ical/<id>/private-<token>/basic.ics``) and Outlook
    (``/owa/calendar/<id>/<token>/calendar.ics``) put the secret in the path, so any long
    or random-looking segment is replaced by ``…``.
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an address that cannot be read)"
    segments = [_redact_segment(segment) for segment in parts.path.split("/")]
    shown = f"{parts.scheme}://{host}{port}" + "/".join(segments)
    if parts.query or parts.fragment:
        shown += "?…"
    return shown


_SECRET_PREFIX = re.compile(r"^(private|secret|token|key)[-_]", re.I)
_KNOWN_SEGMENT = re.compile(r"^[a-z][a-z.]*(\.ics)?$", re.I)


def _redact_segment(segment: str) -> str:
    if not segment:
        return segment
    match = _SECRET_PREFIX.match(segment)
    if match:
        return match.group(0) + "…"
    if len(segment) < 16 and not any(ch.isdigit() for ch in segment):
        return segment
    if _KNOWN_SEGMENT.match(segment) and len(segment) < 24:
        return segment  # ordinary words: calendar.ics, reachcalendar.ics, basic.ics
    if len(segment) < 8:
        return segment
    return "…"


def _pieces(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each piece as soon as any bytes come, so the caller's
    deadline holds against a server that drips a byte at a time (``iter_content`` waits
    for whole 64 KiB pieces, each under its own read timeout)."""
    raw = response.raw
    if not hasattr(raw, "read1"):
        yield from response.iter_content(chunk_size=65536)
        return
    while True:
        piece = raw.read1(65536, decode_content=True)
        if not piece:
            return
        yield piece


def _network_reason(err: requests.RequestException | urllib3.exceptions.HTTPError) -> str:
    match = _ERRNO_TEXT.search(str(err))
    if match:
        return match.group(0).strip()
    if isinstance(err, requests.TooManyRedirects):
        return "too many redirects"
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS error"
    return type(err).__name__
