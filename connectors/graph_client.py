"""One Microsoft Graph client per tenant, shared by the calendar source and the mail channel.

App-only (daemon) access: tokens come from :mod:`graph_auth`, Graph's error answers are
worded in :mod:`graph_errors`. Every request goes through :meth:`GraphClient.request`,
which is where Graph's failure modes are handled once:

- 429 / 503 / 504: wait for ``Retry-After`` (or an exponential backoff) with jitter, retry;
- 401: drop the cached token, get a new one, retry once;
- 403 ``ErrorAccessDenied``: permanent, with what to check (consent, RBAC for Applications);
- 404: permanent, naming the mailbox;
- 410 / ``syncStateNotFound``: :class:`GraphError` with ``code``, so delta callers restart;
- no answer within ``timeout``: a temporary :class:`GraphError` at once, not retried here (the
  caller's own schedule tries again), so a silent Graph costs a caller one ``timeout``, not
  five in a row.

Every HTTP request, msal's tenant discovery and token requests included, gets ``timeout``
from the session itself: msal ignores its own ``timeout`` argument when given a session.
No lock is held while a request is in flight: the calendar source, the mail channel and
the directory share this client from different threads, and a hung Entra or Graph must not
make one of them wait for another's call.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests
import structlog

from visitwatch.connectors.base import Connector
from visitwatch.connectors.graph_auth import EntraTokens
from visitwatch.connectors.graph_errors import GraphError, graph_error
from visitwatch.core.options import ConfigProblem, Option

log = structlog.get_logger(__name__)

BATCH_LIMIT = 20  # Graph's maximum number of requests in one $batch
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 120.0

# Options every Graph connector takes (the source and the mail channel add their own).
GRAPH_OPTIONS: dict[str, Option] = {
    "tenant_id": Option("str", required=True, nonempty=True, help="the directory (tenant) id from Entra"),
    "client_id": Option("str", required=True, nonempty=True, help="the app registration's client id"),
    "client_secret": Option("secret", help='{ env = "..." }: or use a certificate instead'),
    "certificate": Option("path", help="PEM (private key + certificate) or PFX file"),
    "certificate_password": Option("secret", help="passphrase of the PFX or encrypted PEM"),
    "secret_expires": Option("date", help="YYYY-MM-DD: admins are warned before"),
    "authority_host": Option("str", default="https://login.microsoftonline.com",
                             help="national clouds use their own, e.g. login.microsoftonline.us"),
    "graph_url": Option("str", default="https://graph.microsoft.com/v1.0"),
    "ca_file": Option("path", help="CA bundle to trust (a TLS-inspecting proxy)"),
    "timeout": Option("duration", positive=True, default="30s"),
}  # fmt: skip


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP date (RFC 9110), else None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _GraphSession(requests.Session):
    """A session with a default timeout, whose own ``verify`` wins over the environment.

    requests has no session-wide timeout, and msal calls ``session.get`` / ``session.post``
    without one: without this default a silent token endpoint blocks its caller for ever.
    requests also lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override ``session.verify``
    (psf/requests#3829), which would silently ignore a configured ``ca_file``.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: MutableMapping[str, str] | None,
        stream: bool | None,
        verify: bool | str | None,
        cert: str | tuple[str, str] | None,
    ) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True and verify in (None, True):
            settings["verify"] = self.verify
        return settings


class GraphClient:
    """Authenticated, retrying access to Graph for one app registration."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        user_agent: str = "visitwatch",
        *,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = dict(settings)
        self.base = str(settings["graph_url"]).rstrip("/")
        self.timeout = settings["timeout"].total_seconds()
        self._sleep = sleep
        self._jitter = jitter
        self.session = _GraphSession(self.timeout)
        self.session.headers["User-Agent"] = user_agent
        if settings.get("ca_file"):
            self.session.verify = str(settings["ca_file"])
        # Reads the secret or certificate now (a bad certificate is a clear error at start)
        # but asks Entra nothing until the first request.
        self.tokens = EntraTokens(settings, self.session, self.timeout)

    def token(self) -> str:
        """An access token from msal's cache, or from Entra (each request waits ``timeout``)."""
        return self.tokens.token()

    # ------------------------------------------------------------------ requests

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        mailbox: str = "",
    ) -> requests.Response:
        """Send one request, handling throttling, token expiry and Graph's error shapes."""
        refreshed = False
        waited = 0.0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            all_headers = {"Authorization": f"Bearer {self.token()}", **(headers or {})}
            try:
                response = self.session.request(
                    method,
                    self.url(path),
                    params=params,
                    json=json,
                    headers=all_headers,
                    timeout=self.timeout,
                )
            except requests.Timeout as err:
                # Trying again would make the caller wait several timeouts in a row (a
                # dispatcher would then miss its fallback deadline); its schedule retries.
                raise GraphError(
                    f"Graph did not answer within {self.timeout:g}s ({type(err).__name__})"
                ) from err
            except requests.RequestException as err:
                if attempt == MAX_ATTEMPTS:
                    raise GraphError(f"Graph did not answer ({type(err).__name__})") from err
                pause = self._pause(None, attempt)
                self._sleep_for(pause, attempt)
                waited += pause
                continue
            if response.status_code < 400:
                return response
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self.tokens.forget()
                continue
            if response.status_code in (429, 503, 504) and attempt < MAX_ATTEMPTS:
                pause = self._pause(response.headers.get("Retry-After"), attempt)
                if waited + pause <= MAX_WAIT_SECONDS:
                    self._sleep_for(pause, attempt)
                    waited += pause
                    continue
            raise self.error(response, mailbox)
        raise GraphError("Graph kept failing; giving up for now")  # pragma: no cover

    def _pause(self, retry_after: str | None, attempt: int) -> float:
        """How long to wait before attempt ``attempt + 1``: Retry-After (seconds or an HTTP
        date) or an exponential backoff, with jitter to spread clients told the same."""
        base = retry_after_seconds(retry_after)
        if base is None:
            base = 2.0**attempt
        return base * (1 + 0.2 * self._jitter())

    def _sleep_for(self, pause: float, attempt: int) -> None:
        log.info("graph_throttled", wait_seconds=round(pause, 1), attempt=attempt)
        self._sleep(pause)

    def error(self, response: requests.Response, mailbox: str = "") -> GraphError:
        try:
            body = response.json()
        except ValueError:
            body = None
        return graph_error(response.status_code, body, mailbox)

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return _json_object(self.request("GET", path, **kwargs))

    def pages(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        mailbox: str = "",
    ) -> Iterator[dict[str, Any]]:
        """Each page of a collection, following ``@odata.nextLink`` (its own query string)."""
        page = self.get(path, params=params, headers=headers, mailbox=mailbox)
        yield page
        while page.get("@odata.nextLink"):
            page = self.get(page["@odata.nextLink"], headers=headers, mailbox=mailbox)
            yield page

    def batch(self, requests_: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run requests through ``$batch``, 20 at a time; inner 429/503/504s are retried.

        Each request is ``{"id", "method", "url" (relative, e.g. "/users/x/calendarView?..."),
        optional "headers", "body"}``. Returns the inner responses by id
        (``{"status", "headers", "body"}``); their failures are the caller's to judge.
        """
        results: dict[str, dict[str, Any]] = {}
        pending = list(requests_)
        waited = 0.0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            throttled: list[dict[str, Any]] = []
            pauses: list[float] = []
            for start in range(0, len(pending), BATCH_LIMIT):
                chunk = pending[start : start + BATCH_LIMIT]
                answer = _json_object(self.request("POST", "$batch", json={"requests": chunk}))
                by_id = {r["id"]: r for r in chunk}
                for inner in answer.get("responses", []):
                    # Kept as the answer even when retried: a retry that is given up on
                    # leaves the caller the throttled answer to judge.
                    results[inner["id"]] = inner
                    if inner.get("status") in (429, 503, 504) and inner["id"] in by_id:
                        throttled.append(by_id[inner["id"]])
                        header = (inner.get("headers") or {}).get("Retry-After")
                        pauses.append(self._pause(header, attempt))
            if not throttled or attempt == MAX_ATTEMPTS:
                break
            # Wait for the longest Retry-After, unless that would pass the cap: then the
            # requests that asked for longer are given back as they are.
            retry = [
                r for r, p in zip(throttled, pauses, strict=True) if waited + p <= MAX_WAIT_SECONDS
            ]
            if not retry:
                break
            pause = max(p for p in pauses if waited + p <= MAX_WAIT_SECONDS)
            self._sleep_for(pause, attempt)
            waited += pause
            pending = retry
        return results

    def close(self) -> None:
        self.session.close()


class GraphConnector(Connector):
    """What every Graph connector shares: an app registration, its checks, its client."""

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        # An app registration signs in with a client secret or a certificate: exactly one.
        if bool(settings.get("client_secret")) != bool(settings.get("certificate")):
            return []
        return [ConfigProblem("client_secret", "give exactly one of client_secret and certificate")]

    @classmethod
    def credential_expiry(cls, settings: Mapping[str, Any]) -> date | None:
        return settings.get("secret_expires")

    def app_client(self) -> GraphClient:
        """The client of this app registration, shared with the other connectors using it.

        Building it does no network I/O (msal is created on first use), so an unreachable
        Entra at boot cannot stop the daemon.
        """
        return shared_client(
            {k: self.settings.get(k) for k in GRAPH_OPTIONS}, self.context.user_agent
        )


_clients: dict[str, GraphClient] = {}
_clients_lock = threading.Lock()


def shared_client(settings: Mapping[str, Any], user_agent: str) -> GraphClient:
    """One client per app registration and credential, shared by every connector using it."""
    secret = settings.get("client_secret")
    material = "|".join([
        str(settings.get(k)) for k in ("tenant_id", "client_id", "certificate", "graph_url",
                                       "authority_host")
    ] + [secret.reveal() if secret else ""])  # fmt: skip
    key = hashlib.sha256(material.encode()).hexdigest()
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = GraphClient(settings, user_agent)
        return client


def mailbox_path(mailbox: str) -> str:
    return f"/users/{quote(mailbox, safe='@')}"


def _json_object(response: requests.Response) -> dict[str, Any]:
    """A successful answer's JSON object. A body that is not one (an HTML page from a proxy
    or a captive portal, a truncated answer) is a temporary GraphError, never a decoding
    error escaping the connector."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("Content-Type", "no content type").split(";")[0]
        raise GraphError(
            f"Graph answered HTTP {response.status_code} with a body that is not a JSON "
            f"object ({kind}); a proxy in front of Graph may be answering instead",
            status=response.status_code,
        )
    return body
