"""Signing in to Entra as the app: credentials, access tokens, and what a refusal means.

msal's client-credentials flow with a client secret or a certificate; tokens come from
msal's cache. msal's application is built on first use, because msal asks the authority for
its OpenID configuration in the constructor, and an unreachable Entra at start-up must not
stop the daemon (the other sources and channels keep working; a Graph connector reports its
error when used). No lock is held while Entra is asked.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import msal
import requests

from visitwatch.connectors.graph_errors import GraphError
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import Secret

_TOKEN_HINTS = {
    "AADSTS7000215": "the client secret is wrong: copy the secret's Value, not its ID",
    "AADSTS7000222": "the client secret has expired: create a new one in Entra and update it",
    "AADSTS700016": "no app with this client id in the tenant: check client_id and tenant_id",
    "AADSTS90002": "the tenant was not found: check tenant_id",
    "AADSTS700027": "the certificate is not registered on the app, or has expired",
    "AADSTS65001": "admin consent has not been granted for the app's permissions",
}
_PERMANENT_REFUSALS = ("invalid_client", "unauthorized_client", "invalid_request", "invalid_scope")


def scope_for(graph_url: str) -> list[str]:
    """The token scope of the Graph at ``graph_url``: its host, for national clouds too.

    ``https://graph.microsoft.us/v1.0`` (US Government) asks for
    ``https://graph.microsoft.us/.default``; a token for the global cloud is refused there.
    """
    parts = urlsplit(graph_url.strip())
    return [f"{parts.scheme or 'https'}://{parts.netloc}/.default"]


def token_roles(token: str) -> set[str] | None:
    """The ``roles`` claim of our own access token, or None when it is not a readable JWT.

    Read only to explain a missing permission in ``check``, never to decide access: the
    signature is not verified (Graph verifies it on every request), and Microsoft may make
    tokens opaque, hence None rather than an error.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    roles = claims.get("roles") or []
    if not isinstance(roles, list):
        return None
    return {str(r) for r in roles}


def _certificate_problem(path: Path, detail: str) -> ConnectorError:
    return ConnectorError(f"certificate {path}: {detail}", permanent=True)


def load_certificate(path: Path, password: Secret | None) -> dict[str, Any]:
    """msal's ``client_credential`` for a PEM (key + certificate) or PFX file.

    The key and certificate are opened here, so a wrong passphrase is reported as a
    certificate problem (msal would report it later as if Entra did not know the tenant).
    The certificate goes to msal as ``public_certificate``, from which msal (>= 1.35)
    names it by its SHA-256 thumbprint instead of the deprecated SHA-1 one.
    """
    from cryptography.hazmat.primitives.serialization import pkcs12

    passphrase = password.reveal().encode() if password else None
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _certificate_problem(path, f"cannot be read ({err.strerror})") from err
    credential: dict[str, Any]
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
        credential = {
            "private_key_pfx_path": str(path),
            "public_certificate": True,  # msal reads the certificate from the PFX (SHA-256)
        }
    else:
        credential = _pem_credential(path, data, passphrase)
    if password is not None and passphrase:
        credential["passphrase"] = password.reveal()
    return credential


def _pem_credential(path: Path, data: bytes, passphrase: bytes | None) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

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
    return {
        "private_key": data.decode(),
        "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


class EntraTokens:
    """Access tokens for one app registration, through ``session`` (which has the timeout)."""

    def __init__(
        self, settings: Mapping[str, Any], session: requests.Session, timeout: float
    ) -> None:
        self.settings = settings
        self.session = session
        self.timeout = timeout
        self.host = str(settings["authority_host"])
        self.scopes = scope_for(str(settings["graph_url"]))
        secret: Secret | None = settings.get("client_secret")
        # Exactly one of secret and certificate: the option schema saw to it.
        self._credential: Any = (
            secret.reveal() if secret is not None
            else load_certificate(settings["certificate"], settings.get("certificate_password"))
        )  # fmt: skip
        self._lock = threading.Lock()  # guards self._app only; never held while Entra is asked
        self._app: msal.ConfidentialClientApplication | None = None

    def token(self) -> str:
        """An access token from msal's cache, or from Entra (each request waits ``timeout``)."""
        app = self._application()
        try:
            # msal's token cache has its own lock; concurrent misses each ask Entra.
            result = app.acquire_token_for_client(scopes=self.scopes)
        except requests.Timeout as err:
            raise GraphError(
                f"the Entra token endpoint ({self.host}) did not answer within {self.timeout:g}s"
            ) from err
        except requests.RequestException as err:
            raise GraphError(
                f"cannot reach the Entra token endpoint ({self.host}): {type(err).__name__}"
            ) from err
        except ValueError as err:  # an answer that is not JSON: a proxy's error page
            raise GraphError(
                f"the Entra token endpoint ({self.host}) gave an unreadable answer"
            ) from err
        if "access_token" in result:
            return str(result["access_token"])
        raise _refusal(result)

    def forget(self) -> None:
        """Forget cached tokens: the next token() asks Entra again."""
        with self._lock:
            app = self._app
        if app is not None:
            app.remove_tokens_for_client()  # the cache only: instance discovery is off

    def _application(self) -> msal.ConfidentialClientApplication:
        """msal's application, built on first use (outside the lock: it asks Entra)."""
        with self._lock:
            app = self._app
        if app is not None:
            return app
        try:
            built = self._new_app()
        except requests.Timeout as err:
            raise GraphError(
                f"Entra ({self.host}) did not answer within {self.timeout:g}s"
            ) from err
        except requests.RequestException as err:
            raise GraphError(f"cannot reach Entra ({self.host}): {type(err).__name__}") from err
        except ValueError as err:
            # msal's tenant discovery refused the authority: a configuration mistake.
            raise GraphError(
                f"Entra does not know the tenant {self.settings['tenant_id']!r} at "
                f"{self.host}: check tenant_id ({err})",
                permanent=True,
            ) from err
        with self._lock:
            if self._app is None:  # another thread may have built one meanwhile: keep one
                self._app = built
            return self._app

    def _new_app(self) -> msal.ConfidentialClientApplication:
        authority = f"{self.host.rstrip('/')}/{self.settings['tenant_id']}"
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


def _refusal(result: Mapping[str, Any]) -> GraphError:
    """Entra's refusal as an error saying what to check."""
    description = str(result.get("error_description", "")).split("\r\n")[0]
    code = next((c for c in _TOKEN_HINTS if c in description), "")
    hint = _TOKEN_HINTS.get(
        code,
        "check tenant_id, client_id, the secret or certificate, and that admin consent was granted",
    )
    return GraphError(
        f"Entra refused a token ({result.get('error', 'error')}): {description}. {hint}",
        code=code or str(result.get("error", "")),
        permanent=result.get("error") in _PERMANENT_REFUSALS,
    )
