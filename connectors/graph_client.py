"""One Microsoft Graph client per tenant, shared by the calendar source and the mail channel.

App-only (daemon) access: msal's client-credentials flow with a client secret or a
certificate, tokens from msal's cache. Every request goes through :meth:`GraphClient.request`,
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
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import msal
import requests
import structlog

from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, Option, Secret

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


def app_problems(settings: Mapping[str, Any]) -> list[ConfigProblem]:
    """An app registration signs in with a client secret or a certificate: exactly one."""
    if bool(settings.get("client_secret")) != bool(settings.get("certificate")):
        return []
    return [ConfigProblem("client_secret", "give exactly one of client_secret and certificate")]


# Error codes of a delta token Graph no longer honours, case-folded: Graph spells them
# "SyncStateNotFound" for Outlook and "syncStateNotFound" for directory resources.
EXPIRED_DELTA_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})

_TOKEN_HINTS = {
    "AADSTS7000215": "the client secret is wrong: copy the secret's Value, not its ID",
    "AADSTS7000222": "the client secret has expired: create a new one in Entra and update it",
    "AADSTS700016": "no app with this client id in the tenant: check client_id and tenant_id",
    "AADSTS90002": "the tenant was not found: check tenant_id",
    "AADSTS700027": "the certificate is not registered on the app, or has expired",
    "AADSTS65001": "admin consent has not been granted for the app's permissions",
}


class GraphError(ConnectorError):
    """A Graph request failed; ``status`` and ``code`` come from Graph's answer."""

    def __init__(
        self, message: str, *, status: int = 0, code: str = "", permanent: bool = False
    ) -> None:
        super().__init__(message, permanent=permanent)
        self.status = status
        self.code = code


def scope_for(graph_url: str) -> list[str]:
    """The token scope of the Graph at ``graph_url``: its host, for national clouds too.

    ``https://graph.microsoft.us/v1.0`` (US Government) asks for
    ``https://graph.microsoft.us/.default``; a token for the global cloud is refused there.
    """
    parts = urlsplit(graph_url.strip())
    return [f"{parts.scheme or 'https'}://{parts.netloc}/.default"]


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


def _certificate_problem(path: Path, detail: str) -> ConnectorError:
    return ConnectorError(f"certificate {path}: {detail}", permanent=True)


def load_certificate(path: Path, password: Secret | None) -> dict[str, Any]:
    """msal's ``client_credential`` for a PEM (key + certificate) or PFX file.

    The key and certificate are opened here, so a wrong passphrase is reported as a
    certificate problem (msal would report it later as if Entra did not know the tenant).
    The certificate goes to msal as ``public_certificate``, from which msal (>= 1.35)
    names it by its SHA-256 thumbprint instead of the deprecated SHA-1 one.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    passphrase = password.reveal().encode() if password else None
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _certificate_problem(path, f"cannot be read ({err.strerror})") from err
    if path.suffix.lower() in (".pfx", ".p12"):
        try:
            key, cert, _chain = pkcs12.load_key_and_certificates(data, passphrase)
        except ValueError as err:
            raise _certificate_problem(
                path,
                "the PFX cannot be opened: check certificate_password (wrong or missing "
                "passphrase) and that the file is a PKCS#12 (.pfx) file",
            ) from err
        if key is None or cert is None:
            raise _certificate_problem(
                path, "the PFX must hold both the private key and the certificate"
            )
        credential: dict[str, Any] = {
            "private_key_pfx_path": str(path),
            "public_certificate": True,  # msal reads the certificate from the PFX (SHA-256)
        }
        if passphrase:
            credential["passphrase"] = password.reveal() if password else ""
        return credential
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise _certificate_problem(
            path, f"no certificate found ({err}); it must hold the private key and the "
            "certificate in PEM form (or give a .pfx)",
        ) from err  # fmt: skip
    try:
        serialization.load_pem_private_key(data, passphrase)
    except TypeError as err:  # encrypted without a passphrase, or a passphrase for a plain key
        raise _certificate_problem(
            path, f"the private key and certificate_password do not match ({err})"
        ) from err
    except ValueError as err:
        raise _certificate_problem(
            path, "the private key cannot be read: check certificate_password (an encrypted "
            "key needs its passphrase) and that the file holds the key in PEM form",
        ) from err  # fmt: skip
    credential = {
        "private_key": data.decode(),
        "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
    if passphrase:
        credential["passphrase"] = password.reveal() if password else ""
    return credential


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

    def request(  # type: ignore[override]
        self, method: str | bytes, url: str | bytes, *args: Any, timeout: Any = None, **kwargs: Any
    ) -> requests.Response:
        return super().request(
            method, url, *args, timeout=self.timeout if timeout is None else timeout, **kwargs
        )

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[no-untyped-def]
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
        self._lock = threading.Lock()  # guards self._app only; never held during a request
        secret, certificate = settings.get("client_secret"), settings.get("certificate")
        if bool(secret) == bool(certificate):
            raise ConnectorError(
                "Microsoft Graph needs exactly one of client_secret and certificate",
                permanent=True,
            )
        self._credential: Any = (
            secret.reveal() if secret
            else load_certificate(certificate, settings.get("certificate_password"))
        )  # fmt: skip
        self.session = _GraphSession(self.timeout)
        self.session.headers["User-Agent"] = user_agent
        if settings.get("ca_file"):
            self.session.verify = str(settings["ca_file"])
        # Built on first use: msal asks the authority for its OpenID configuration in the
        # constructor, and an unreachable Entra at start-up must not stop the daemon (the
        # other sources and channels keep working; this one reports its error when used).
        self._app: msal.ConfidentialClientApplication | None = None

    def _new_app(self) -> msal.ConfidentialClientApplication:
        authority = f"{self.settings['authority_host'].rstrip('/')}/{self.settings['tenant_id']}"
        return msal.ConfidentialClientApplication(
            self.settings["client_id"],
            client_credential=self._credential,
            authority=authority,
            http_client=self.session,
            # Instance discovery asks login.microsoftonline.com about the authority; for a
            # national cloud (or a test server) the configured host is the authority.
            instance_discovery=False,
            # No timeout argument: msal ignores it with our session, which has its own.
        )

    # ------------------------------------------------------------------ tokens

    def token(self) -> str:
        """An access token from msal's cache, or from Entra (each request waits ``timeout``)."""
        host = self.settings["authority_host"]
        app = self._application()
        try:
            # msal's token cache has its own lock; concurrent misses each ask Entra.
            result = app.acquire_token_for_client(scopes=scope_for(self.base))
        except requests.Timeout as err:
            raise GraphError(
                f"the Entra token endpoint ({host}) did not answer within {self.timeout:g}s"
            ) from err
        except requests.RequestException as err:
            raise GraphError(
                f"cannot reach the Entra token endpoint ({host}): {type(err).__name__}"
            ) from err
        except ValueError as err:  # an answer that is not JSON: a proxy's error page
            raise GraphError(
                f"the Entra token endpoint ({host}) gave an unreadable answer"
            ) from err
        if "access_token" in result:
            return result["access_token"]
        description = str(result.get("error_description", "")).split("\r\n")[0]
        code = next((c for c in _TOKEN_HINTS if c in description), "")
        hint = _TOKEN_HINTS.get(
            code,
            "check tenant_id, client_id, the secret or certificate, "
            "and that admin consent was granted",
        )
        raise GraphError(
            f"Entra refused a token ({result.get('error', 'error')}): {description}. {hint}",
            code=code or str(result.get("error", "")),
            permanent=result.get("error") in ("invalid_client", "unauthorized_client",
                                              "invalid_request", "invalid_scope"),
        )  # fmt: skip

    def _application(self) -> msal.ConfidentialClientApplication:
        """msal's application, built on first use (outside the lock: it asks Entra)."""
        with self._lock:
            app = self._app
        if app is not None:
            return app
        host = self.settings["authority_host"]
        try:
            built = self._new_app()
        except requests.Timeout as err:
            raise GraphError(f"Entra ({host}) did not answer within {self.timeout:g}s") from err
        except requests.RequestException as err:
            raise GraphError(f"cannot reach Entra ({host}): {type(err).__name__}") from err
        except ValueError as err:
            # msal's tenant discovery refused the authority: a configuration mistake.
            raise GraphError(
                f"Entra does not know the tenant {self.settings['tenant_id']!r} at {host}: "
                f"check tenant_id ({err})",
                permanent=True,
            ) from err
        with self._lock:
            if self._app is None:  # another thread may have built one meanwhile: keep one
                self._app = built
            return self._app

    def _refresh(self) -> None:
        """Forget cached tokens: the next token() asks Entra again."""
        with self._lock:
            app = self._app
        if app is not None:
            app.remove_tokens_for_client()  # the cache only: instance discovery is off

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
                self._refresh()
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
        status = response.status_code
        try:
            body = response.json().get("error", {})
        except ValueError:
            body = {}
        code, detail = str(body.get("code", "")), str(body.get("message", ""))[:300]
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

    def get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.request("GET", path, **kwargs).json()

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
                answer = self.request("POST", "$batch", json={"requests": chunk}).json()
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
