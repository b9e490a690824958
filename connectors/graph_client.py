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
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msal
import requests
import structlog

from visitwatch.connectors.base import ConnectorError, Option, Secret

log = structlog.get_logger(__name__)

SCOPE = ["https://graph.microsoft.com/.default"]
BATCH_LIMIT = 20  # Graph's maximum number of requests in one $batch
MAX_ATTEMPTS = 5
MAX_WAIT_SECONDS = 120.0

# Options every Graph connector takes (the source and the mail channel add their own).
GRAPH_OPTIONS: dict[str, Option] = {
    "tenant_id": Option("str", required=True, help="the directory (tenant) id from Entra"),
    "client_id": Option("str", required=True, help="the app registration's client id"),
    "client_secret": Option("secret", help='{ env = "..." }: or use a certificate instead'),
    "certificate": Option("path", help="PEM (private key + certificate) or PFX file"),
    "certificate_password": Option("secret", help="passphrase of the PFX or encrypted PEM"),
    "secret_expires": Option("str", default="", help="YYYY-MM-DD: admins are warned before"),
    "authority_host": Option("str", default="https://login.microsoftonline.com",
                             help="national clouds use their own, e.g. login.microsoftonline.us"),
    "graph_url": Option("str", default="https://graph.microsoft.com/v1.0"),
    "ca_file": Option("path", help="CA bundle to trust (a TLS-inspecting proxy)"),
    "timeout": Option("duration", default="30s"),
}  # fmt: skip

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


def load_certificate(path: Path, password: Secret | None) -> dict[str, Any]:
    """msal's ``client_credential`` for a PEM (key + certificate) or PFX file."""
    if path.suffix.lower() in (".pfx", ".p12"):
        credential: dict[str, Any] = {"private_key_pfx_path": str(path)}
        if password:
            credential["passphrase"] = password.reveal()
        return credential
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as err:
        raise ConnectorError(
            f"cannot read the certificate {path}: {err}; it must hold the private key and the "
            "certificate in PEM form (or give a .pfx)", permanent=True,
        ) from err  # fmt: skip
    credential = {
        "private_key": pem.decode(),
        "thumbprint": cert.fingerprint(hashes.SHA1()).hex(),  # SHA-1: the thumbprint Entra shows
        "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
    if password:
        credential["passphrase"] = password.reveal()
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
            result = app.acquire_token_for_client(scopes=SCOPE)
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
                waited += self._wait(None, attempt)
                continue
            if response.status_code < 400:
                return response
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self._refresh()
                continue
            if response.status_code in (429, 503, 504) and attempt < MAX_ATTEMPTS:
                pause = self._wait(response.headers.get("Retry-After"), attempt)
                waited += pause
                if waited <= MAX_WAIT_SECONDS:
                    continue
            raise self.error(response, mailbox)
        raise GraphError("Graph kept failing; giving up for now")  # pragma: no cover

    def _wait(self, retry_after: str | None, attempt: int) -> float:
        try:
            base = float(retry_after) if retry_after is not None else 2.0**attempt
        except ValueError:
            base = 2.0**attempt
        pause = base * (1 + 0.2 * self._jitter())  # jitter: spread clients that were told the same
        log.info("graph_throttled", wait_seconds=round(pause, 1), attempt=attempt)
        self._sleep(pause)
        return pause

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
        if status == 410 or code in ("syncStateNotFound", "resyncRequired", "syncStateInvalid"):
            return GraphError(
                f"{where}delta state expired ({code or 410})",
                status=status,
                code=code or "syncStateNotFound",
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
        for attempt in range(1, MAX_ATTEMPTS + 1):
            throttled: list[dict[str, Any]] = []
            retry_after: list[float] = []
            for start in range(0, len(pending), BATCH_LIMIT):
                chunk = pending[start : start + BATCH_LIMIT]
                answer = self.request("POST", "$batch", json={"requests": chunk}).json()
                by_id = {r["id"]: r for r in chunk}
                for inner in answer.get("responses", []):
                    if inner.get("status") in (429, 503, 504) and attempt < MAX_ATTEMPTS:
                        throttled.append(by_id[inner["id"]])
                        header = (inner.get("headers") or {}).get("Retry-After")
                        retry_after.append(float(header) if header else 2.0**attempt)
                    else:
                        results[inner["id"]] = inner
            if not throttled:
                break
            self._wait(str(max(retry_after)), attempt)
            pending = throttled
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
