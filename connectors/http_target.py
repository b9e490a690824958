"""A URL a channel POSTs to (the webhook's receiver, a Teams workflow), the one way.

What both need and must not get wrong twice: the URL may itself be a secret (a Teams
Workflows URL carries its signature ``sig=``), so it is shown only as scheme, host and
port; personal data goes over https, plain http only to this machine; every POST has a
timeout and follows no redirect; ``check`` connects without posting anything.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import requests

from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, Secret

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# Busy or down, not refusing: worth another try.
RETRIED = frozenset({408, 429})


def reveal(url: str | Secret) -> str:
    """The URL's text, whether written inline or read as a secret."""
    return (url.reveal() if isinstance(url, Secret) else url).strip()


def plain_http_problem(url: str | Secret, key: str = "url") -> ConfigProblem | None:
    """A problem when ``url`` is http:// to anywhere but this machine."""
    parts = urlsplit(reveal(url))
    if parts.scheme.lower() == "http" and parts.hostname not in LOOPBACK:
        return ConfigProblem(
            key,
            "alerts carry names and places: send them over https://",
            "http:// is accepted for a receiver on this machine only",
        )
    return None


def retryable(status: int) -> bool:
    """An HTTP answer a later try may turn into a success (5xx, 408, 429)."""
    return status >= 500 or status in RETRIED


@dataclass(frozen=True)
class HttpTarget:
    """Where a channel POSTs: ``label`` names it in messages ("webhook")."""

    label: str
    url: str
    timeout: float  # to connect, and for each read of the answer
    verify: bool | str = True  # or the path of a CA bundle
    tls_hint: str = "set ca_file to the CA that signed it"

    @classmethod
    def from_settings(cls, label: str, settings: Mapping[str, Any], **extra: Any) -> HttpTarget:
        ca_file = settings.get("ca_file")
        return cls(
            label=label,
            url=reveal(settings["url"]),
            timeout=settings["timeout"].total_seconds(),
            verify=str(ca_file) if ca_file is not None else True,
            **extra,
        )

    @property
    def where(self) -> str:
        """Scheme, host and port: safe to log (the path or query may be a secret)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    def post(self, body: bytes, headers: Mapping[str, str]) -> requests.Response:
        """POST once; no answer at all is a temporary :class:`ConnectorError`."""
        try:
            return requests.post(
                self.url,
                data=body,
                headers=dict(headers),
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
            )
        except requests.RequestException as err:
            raise ConnectorError(self._unreached(err), permanent=False) from err

    def deliver(
        self,
        told: Any,
        event: str,
        body: bytes,
        headers: Mapping[str, str],
        refusal: Callable[[int], ConnectorError],
    ) -> None:
        """POST ``body``; return on 2xx, else log and raise (``refusal(status)`` for answers).

        ``told`` is the delivery's logger; ``event`` prefixes its lines ("webhook"): the
        answer's text is logged at debug only (a receiver may echo the message back).
        """
        try:
            response = self.post(body, headers)
        except ConnectorError as err:
            _failed(told, event, err, err.__cause__)
        status = response.status_code
        if 200 <= status < 300:
            told.info(f"{event}.sent", status=status)
            return
        told.debug(f"{event}.refused", status=status, answer=response.text[:500])
        _failed(told, event, refusal(status), None)

    def connect(self) -> str:
        """Open a connection and close it: nothing is posted. Raises when unreachable."""
        parts = urlsplit(self.url)
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        try:
            socket.create_connection(address, timeout=self.timeout).close()
        except OSError as err:
            raise ConnectorError(
                f"cannot reach {self.label} {self.where}: {err.strerror or err}",
                permanent=False,
            ) from err
        return f"{self.label} {self.where} accepts connections"

    def _unreached(self, err: requests.RequestException) -> str:
        if isinstance(err, requests.Timeout):
            return f"{self.label} {self.where} did not answer within {self.timeout:g}s"
        if isinstance(err, requests.exceptions.SSLError):
            return f"{self.label} {self.where}: TLS failed; {self.tls_hint}"
        return f"cannot reach {self.label} {self.where} ({type(err).__name__})"


def _failed(told: Any, event: str, error: ConnectorError, cause: BaseException | None) -> NoReturn:
    told.warning(f"{event}.send_failed", permanent=error.permanent, error=str(error))
    raise error from cause
