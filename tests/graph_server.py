"""A Microsoft Graph-shaped HTTPS server on loopback, for tests that use the real HTTP stack.

:class:`FakeGraph` answers the handful of Entra and Graph endpoints visitwatch uses, over TLS
with a certificate made here, so msal, requests and :class:`GraphClient` run unmodified::

    with FakeGraph() as graph:
        graph.events["asha@contoso.org"] = [graph_event("e1", "Home visit", start, end)]
        graph.mailboxes.add("visitwatch@contoso.org")
        monkeypatch.setenv("VW_GRAPH_SECRET", graph.client_secret)
        table = graph.config_table("VW_GRAPH_SECRET", sender="visitwatch@contoso.org")
        ...  # build a source or channel from `table`, use it
        assert graph.sent[0]["message"]["subject"] == "..."

What it serves (``{tenant}`` must be :attr:`FakeGraph.tenant`; ``{m}`` is a mailbox):

==========================================================  =================================
``GET  /{tenant}/v2.0/.well-known/openid-configuration``    msal's tenant discovery
``POST /{tenant}/oauth2/v2.0/token``                        client credentials (secret or
                                                            certificate assertion)
``GET  /v1.0/users/{m}/calendarView``                       ``events[m]`` in the window,
                                                            paged with ``@odata.nextLink``
``GET  /v1.0/users/{m}/calendarView/delta``                 delta rounds, see below
``GET|PATCH /v1.0/users/{m}/events/{id}``                   one event; PATCH is recorded in
                                                            :attr:`FakeGraph.patches`
``POST /v1.0/users/{m}/sendMail``                           recorded in :attr:`FakeGraph.sent`
``GET  /v1.0/users/{id}`` and ``/v1.0/users/{id}/manager``  from ``people`` and ``managers``,
                                                            by id or UPN only
``GET  /v1.0/users?$filter=mail eq '...'``                  ``people`` by mail
``POST /v1.0/$batch``                                       inner requests go to the above
``POST|GET /v1.0/subscriptions``, ``PATCH|DELETE .../{id}`` change notifications, with the
                                                            validation handshake; see
                                                            ``tests/graph_webhooks.py``
==========================================================  =================================

Every ``/v1.0`` request needs ``Authorization: Bearer <a token this server issued>``; anything
else gets 401 ``InvalidAuthenticationToken``. Every request (including each inner ``$batch``
request) is appended to :attr:`FakeGraph.requests`. Failures are injected with
:attr:`FakeGraph.fail_next`, hung requests (read, never answered) with
:attr:`FakeGraph.hang_next`; :class:`SilentServer` accepts TCP and never says a word. All
times are served in UTC whatever ``Prefer: outlook.timezone`` says; ``$filter`` and
``$orderby`` are recorded but ignored (events are always in start order).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import re
import shutil
import socket
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

TENANT = "9a1f6c2e-3b4d-4e5f-8a7b-0c1d2e3f4a5b"
CLIENT_ID = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"
CLIENT_SECRET = "fake-graph-client-secret"  # the fake's own, checked by its token endpoint
DEFAULT_ROLES = ("Calendars.Read", "Mail.Send")
DEFAULT_PAGE_SIZE = 10  # Graph's own default page size for calendarView

# Which application permission each endpoint needs when ``enforce_roles`` is on.
_NEEDS: dict[str, tuple[str, ...]] = {
    "calendar.read": ("Calendars.Read", "Calendars.ReadWrite"),
    "calendar.write": ("Calendars.ReadWrite",),
    "mail.send": ("Mail.Send",),
    "user.read": ("User.Read.All", "Directory.Read.All"),
}

_MAIL_FILTER = re.compile(r"mail eq '((?:[^']|'')*)'", re.IGNORECASE)

# The default body of an injected failure, by status: what Graph itself would say.
_FAILURE_CODES = {
    400: ("BadRequest", "Injected bad request."),
    401: ("InvalidAuthenticationToken", "Access token has expired or is not yet valid."),
    403: ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    404: ("ErrorItemNotFound", "The specified object was not found in the store."),
    410: ("SyncStateNotFound", "The sync state generation is not found."),
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    500: ("InternalServerError", "An internal server error occurred."),
    503: ("ServiceUnavailable", "Service is temporarily unavailable."),
    504: ("GatewayTimeout", "The gateway did not receive a response in time."),
}


# --------------------------------------------------------------------------- helpers


def graph_timestamp(moment: datetime) -> str:
    """``2026-11-23T13:00:00.0000000Z``: how Graph writes ``lastModifiedDateTime``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def graph_time(moment: datetime) -> dict[str, str]:
    """An event's ``start`` / ``end``: ``{"dateTime": "...0000000", "timeZone": "UTC"}``."""
    return {
        "dateTime": moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0",
        "timeZone": "UTC",
    }


def _change_key(event: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(
        json.dumps({k: v for k, v in event.items() if k not in ("changeKey", "@odata.etag")},
                   sort_keys=True, default=str).encode()
    ).digest()  # fmt: skip
    return base64.b64encode(digest[:12]).decode()


def _person(address: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(address, Mapping):
        return dict(address)
    return {"emailAddress": {"name": address.split("@")[0], "address": address}}


def graph_event(
    id: str,
    subject: str,
    start_utc: datetime,
    end_utc: datetime,
    *,
    body: str | Mapping[str, Any] = "",
    location: str | Mapping[str, Any] = "",
    categories: Sequence[str] = ("Home Visit",),
    attendees: Sequence[str | Mapping[str, Any]] = (),
    organizer: str | Mapping[str, Any] = "organizer@contoso.org",
    last_modified: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A single event as Graph returns it (``start``/``end`` in UTC).

    ``body`` and ``location`` take plain text, ``attendees`` and ``organizer`` e-mail
    addresses (or the Graph dicts themselves). Any other keyword is a Graph property
    written as is and overriding the default, e.g. ``isCancelled=True``,
    ``sensitivity="private"``, ``isAllDay=True``, ``type="occurrence"``,
    ``seriesMasterId="..."``, ``originalStart="..."``.
    """
    modified = last_modified or start_utc - timedelta(days=3)
    body_json = (
        dict(body) if isinstance(body, Mapping) else {"contentType": "text", "content": body}
    )
    location_json = (
        dict(location)
        if isinstance(location, Mapping)
        else {"displayName": location, "locationType": "default", "uniqueIdType": "unknown"}
    )
    event: dict[str, Any] = {
        "id": id,
        "createdDateTime": graph_timestamp(modified - timedelta(days=1)),
        "lastModifiedDateTime": graph_timestamp(modified),
        "changeKey": "",
        "categories": list(categories),
        # Outlook's iCalUIds start with this prefix; the rest only has to be stable per id.
        "iCalUId": "040000008200E00074C5B7101A82E008" + hashlib.md5(id.encode()).hexdigest(),
        "subject": subject,
        "bodyPreview": str(body_json.get("content", ""))[:255],
        "body": body_json,
        "importance": "normal",
        "sensitivity": "normal",
        "isAllDay": False,
        "isCancelled": False,
        "isOrganizer": False,
        "showAs": "busy",
        "type": "singleInstance",
        "seriesMasterId": None,
        "recurrence": None,
        "webLink": f"https://outlook.office365.com/owa/?itemid={quote(id)}",
        "start": graph_time(start_utc),
        "end": graph_time(end_utc),
        "location": location_json,
        "locations": [location_json] if location_json.get("displayName") else [],
        "attendees": [
            {
                "type": "required",
                "status": {"response": "none", "time": "0001-01-01T00:00:00Z"},
                **_person(a),
            }
            for a in attendees
        ],
        "organizer": _person(organizer),
    }
    event.update(fields)
    event["changeKey"] = _change_key(event)
    event["@odata.etag"] = f'W/"{event["changeKey"]}"'
    return event


def graph_user(
    mail: str,
    name: str,
    *,
    mobile: str | None = None,
    business_phones: Sequence[str] = (),
    upn: str | None = None,
    object_id: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A user as Graph returns it; ``id`` is a GUID derived from ``mail`` unless given."""
    user: dict[str, Any] = {
        "id": object_id or str(uuid.uuid5(uuid.NAMESPACE_URL, mail.lower())),
        "displayName": name,
        "mail": mail,
        "userPrincipalName": upn or mail,
        "mobilePhone": mobile,
        "businessPhones": list(business_phones),
        "jobTitle": None,
        "officeLocation": None,
    }
    user.update(fields)
    return user


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT-shaped token (no signature check): for asserting on tokens."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def unsigned_token(claims: Mapping[str, Any]) -> str:
    """An access token shaped like Entra's (a JWT, RS256 in name, not signed) with ``claims``."""
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-graph"}
    return ".".join(
        _b64url(part)
        for part in (json.dumps(header).encode(), json.dumps(dict(claims)).encode(), b"not-signed")
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parse_moment(text: str) -> datetime:
    # Query strings carry "2026-11-23T12:00:00Z" or "+00:00" (a "+" may arrive as a space).
    moment = datetime.fromisoformat(text.strip().replace(" ", "+").replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _event_time(value: Mapping[str, str]) -> datetime:
    # The fake stores UTC times only; the fraction has 7 digits, which fromisoformat reads.
    moment = datetime.fromisoformat(value["dateTime"])
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _removed(event_id: str) -> dict[str, Any]:
    # Graph says "deleted" both for a deleted event and for one moved out of the window.
    return {
        "@odata.type": "#microsoft.graph.event",
        "id": event_id,
        "@removed": {"reason": "deleted"},
    }


def _fingerprint(event: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(event, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it.

    ``path`` is percent-decoded and without the query; ``query`` maps each parameter to its
    last value; ``body`` is parsed JSON, a form as a dict, text, or None. Inner ``$batch``
    requests are recorded too, with their ``batch_id``; top-level ones have None.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    batch_id: str | None = None

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass(frozen=True)
class Patch:
    """One PATCH of an event: the mailbox and event id as addressed, and the JSON body."""

    mailbox: str
    event_id: str
    body: dict[str, Any]


# A failure to inject: (status, headers) or (status, headers, body). Status 0 drops the
# connection without an answer (requests then raises ConnectionError).
Failure = tuple[int, dict[str, str]] | tuple[int, dict[str, str], Any]


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None  # a hung request: no answer until this is set


@dataclass
class _DeltaState:
    mailbox: str
    start: datetime
    end: datetime
    snapshot: dict[str, str]  # event id -> fingerprint, as of the round's start


@dataclass
class _DeltaPages:
    items: list[dict[str, Any]]
    final: _DeltaState
    page_size: int


def _graph_error(status: int, code: str, message: str, **headers: str) -> _Reply:
    return _Reply(
        status,
        {"error": {"code": code, "message": message, "innerError": {
            "request-id": str(uuid.uuid4()), "date": graph_timestamp(datetime.now(UTC))[:19]}}},
        dict(headers),
    )  # fmt: skip


def _oauth_error(status: int, error: str, code: int, description: str) -> _Reply:
    return _Reply(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} "
            f"Trace ID: {uuid.uuid4()} Correlation ID: {uuid.uuid4()} "
            f"Timestamp: {datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}",
            "error_codes": [code],
            "timestamp": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}",
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        },
    )


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class _Tls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _make_certificates(folder: Path) -> _Tls:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost.

    A separate CA (rather than one self-signed leaf) is what strict X.509 verification, as
    newer Pythons do by default, accepts.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FakeGraph test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = _Tls(folder / "fake-graph-ca.pem", folder / "fake-graph.pem", folder / "fake-graph.key")
    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive connections must not make stop() wait for them

    def __init__(self, fake: FakeGraph, tls: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.tls = tls

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, so a client that
        # stalls (or rejects the certificate) cannot block the accept loop.
        request.settimeout(10)
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            connection.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' sessions expect
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        reply = self.server.fake._http(self.command, self.path, dict(self.headers.items()), raw)
        if reply.hold is not None:
            reply.hold.wait()  # outside the fake's lock: other requests are still answered
            self.close_connection = True  # released: drop the connection, never answer
            return
        if reply.status == 0:
            self.close_connection = True  # an injected dropped connection: no answer at all
            return
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if payload and "Content-Type" not in reply.headers:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are in FakeGraph.requests; stderr noise helps nobody


# --------------------------------------------------------------------------- the server


class FakeGraph:
    """Entra's token endpoint and a slice of Graph v1.0 on ``https://127.0.0.1:<port>``.

    State that tests set up or inspect (plain attributes, safe to change between requests):

    ``events``
        ``{mailbox: [graph_event(...), ...]}``: each mailbox's calendar.
    ``people``
        ``{mail: graph_user(...)}``; ``/users/{x}`` finds a person by ``id`` or
        ``userPrincipalName`` only (case-insensitive), as Graph does; ``$filter=mail eq``
        finds them by ``mail``.
    ``managers``
        ``{person key: manager's person key}``; no entry means ``/manager`` answers 404.
    ``mailboxes``
        more mailboxes that exist (a sender with no calendar or directory entry): a mailbox
        not in ``events``, ``people`` or here gets 404 ``ErrorInvalidUser``.
    ``roles``
        the ``roles`` claim put into tokens issued from now on.
    ``sent``
        the JSON body of each accepted ``sendMail``, in order.
    ``patches``
        a :class:`Patch` for each accepted ``PATCH .../events/{id}``.
    ``requests``
        a :class:`RecordedRequest` for every request, failed ones included.
    ``fail_next``
        ``{(METHOD, path prefix): [Failure, ...]}``: the next request whose method matches
        and whose decoded path starts with the prefix (e.g. ``("POST",
        "/v1.0/users/visitwatch@contoso.org/sendMail")``, ``("POST", f"/{TENANT}/oauth2")``)
        gets the first failure in the list instead of its answer; the list is used up one
        per request. Inner ``$batch`` requests match too (path ``/v1.0`` + their url).
    ``hang_next``
        ``{(METHOD, path prefix): count}``: the next ``count`` top-level requests that match
        are read and recorded, then never answered (the connection stays open) until
        :meth:`release_hung` or :meth:`stop`, which drop them; :attr:`hung` lists them.
    """

    def __init__(
        self,
        *,
        tenant: str = TENANT,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        roles: Iterable[str] = DEFAULT_ROLES,
        enforce_roles: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
        folder: Path | None = None,
    ) -> None:
        """``enforce_roles`` makes each endpoint demand its application permission from the
        token's roles (``Calendars.Read``/``ReadWrite``, ``Calendars.ReadWrite`` for PATCH,
        ``Mail.Send``, ``User.Read.All``); off by default so the default roles reach
        everything. ``folder`` holds the certificates (a temporary folder otherwise)."""
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.roles: list[str] = list(roles)
        self.enforce_roles = enforce_roles
        self.page_size = page_size
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.people: dict[str, dict[str, Any]] = {}
        self.managers: dict[str, str] = {}
        self.mailboxes: set[str] = set()
        self.sent: list[dict[str, Any]] = []
        self.patches: list[Patch] = []
        self.requests: list[RecordedRequest] = []
        self.fail_next: dict[tuple[str, str], list[Failure]] = {}
        self.hang_next: dict[tuple[str, str], int] = {}
        self.hung: list[RecordedRequest] = []
        self._release = threading.Event()
        self.lock = threading.RLock()  # held while a request is answered
        self._tokens: dict[str, tuple[str, ...]] = {}  # issued token -> its roles
        self._delta_tokens: dict[str, _DeltaState] = {}
        self._delta_pages: dict[str, _DeltaPages] = {}
        self._own_folder = folder is None
        self.folder = folder or Path(tempfile.mkdtemp(prefix="fake-graph-"))
        self._tls = _make_certificates(self.folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._tls.cert_file, self._tls.key_file)
        self._server = _Server(self, context)
        self._thread: threading.Thread | None = None
        from tests.graph_webhooks import FakeSubscriptions

        self.subscriptions = FakeSubscriptions(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeGraph:
        """Serve in a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="fake-graph",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and remove the temporary certificate folder."""
        self.release_hung()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def authority_host(self) -> str:
        """For the ``authority_host`` setting: ``https://127.0.0.1:PORT``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def graph_url(self) -> str:
        """For the ``graph_url`` setting: ``https://127.0.0.1:PORT/v1.0``."""
        return f"{self.authority_host}/v1.0"

    @property
    def ca_file(self) -> Path:
        """The PEM file of the CA that signed the server's certificate (``ca_file``)."""
        return self._tls.ca_file

    def config_table(self, secret_env: str, **extra: Any) -> dict[str, Any]:
        """A connector config table pointing at this server.

        The client secret is read from the environment variable ``secret_env``: set it to
        :attr:`client_secret` (``monkeypatch.setenv``). ``extra`` adds or overrides keys.
        """
        return {
            "tenant_id": self.tenant,
            "client_id": self.client_id,
            "client_secret": {"env": secret_env},
            "authority_host": self.authority_host,
            "graph_url": self.graph_url,
            "ca_file": str(self.ca_file),
            "timeout": "10s",
            **extra,
        }

    # ------------------------------------------------------------------ test controls

    @property
    def issued_tokens(self) -> list[str]:
        """Access tokens issued so far and still accepted."""
        with self.lock:
            return list(self._tokens)

    def revoke_tokens(self) -> None:
        """Make every issued token invalid: the next Graph request gets 401."""
        with self.lock:
            self._tokens.clear()

    def release_hung(self) -> None:
        """Drop every hung request's connection, unanswered (the client sees it closed)."""
        with self.lock:
            released, self._release = self._release, threading.Event()
        released.set()

    def expire_delta_tokens(self) -> None:
        """Forget every delta and skip token: using one gets 410 ``SyncStateNotFound``."""
        with self.lock:
            self._delta_tokens.clear()
            self._delta_pages.clear()

    def add_event(self, mailbox: str, event: dict[str, Any]) -> None:
        """Put ``event`` into ``mailbox``'s calendar, replacing one with the same id."""
        with self.lock:
            events = self.events.setdefault(mailbox, [])
            events[:] = [e for e in events if e["id"] != event["id"]] + [event]

    def update_event(self, mailbox: str, event_id: str, **changes: Any) -> dict[str, Any]:
        """Change Graph properties of a stored event, as an edit in Outlook would.

        ``lastModifiedDateTime`` moves on and ``changeKey`` changes. Use :func:`graph_time`
        for ``start``/``end``. Returns the event.
        """
        with self.lock:
            event = self._event(mailbox, event_id)
            if event is None:
                raise KeyError(f"no event {event_id!r} in {mailbox!r}")
            self._touch(event, changes)
            return event

    def delete_event(self, mailbox: str, event_id: str) -> None:
        """Remove an event: delta rounds then report it ``@removed``."""
        with self.lock:
            self.events[mailbox] = [e for e in self.events.get(mailbox, []) if e["id"] != event_id]

    def add_person(
        self, mail: str, name: str, *, manager: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Add ``graph_user(mail, name, **fields)`` under the key ``mail``, with a manager."""
        with self.lock:
            user = self.people[mail] = graph_user(mail, name, **fields)
            if manager is not None:
                self.managers[mail] = manager
            return user

    def requests_to(self, method: str, path_prefix: str) -> list[RecordedRequest]:
        """Recorded requests with this method whose path starts with ``path_prefix``."""
        with self.lock:
            return [
                r
                for r in self.requests
                if r.method == method.upper() and r.path.startswith(path_prefix)
            ]

    # ------------------------------------------------------------------ dispatch

    def _http(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> _Reply:
        parts = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        body: Any = None
        if raw:
            text = raw.decode("utf-8", "replace")
            if "json" in content_type:
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
            elif "x-www-form-urlencoded" in content_type:
                body = {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}
            else:
                body = text
        with self.lock:
            return self._dispatch(method, unquote(parts.path), parts.path, query, headers, body)

    def _dispatch(
        self,
        method: str,
        path: str,
        raw_path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: Any,
        *,
        batch_id: str | None = None,
        roles: tuple[str, ...] | None = None,
    ) -> _Reply:
        recorded = RecordedRequest(method, path, query, headers, body, batch_id)
        self.requests.append(recorded)
        if batch_id is None and self._take_hang(method, path):
            self.hung.append(recorded)
            return _Reply(0, hold=self._release)
        failure = self._take_failure(method, path)
        if failure is not None:
            return failure
        # Segments are split before decoding, so an id holding "/" (encoded) stays whole.
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        if len(segments) >= 2 and segments[0] != "v1.0":
            tenant, rest = segments[0], segments[1:]
            if method == "GET" and rest == ["v2.0", ".well-known", "openid-configuration"]:
                return self._openid(tenant)
            if method == "POST" and rest == ["oauth2", "v2.0", "token"]:
                return self._token(tenant, body if isinstance(body, dict) else {})
            return _Reply(404, {"error": "not_found", "error_description": f"no {path}"})
        if batch_id is None:
            roles = self._authorised(headers)
            if roles is None:
                auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
                message = "Access token is empty." if not auth else "Invalid access token."
                return _graph_error(401, "InvalidAuthenticationToken", message)
        assert roles is not None
        return self._graph(method, segments[1:], query, headers, body, roles, batch_id)

    def _take_failure(self, method: str, path: str) -> _Reply | None:
        for (fail_method, prefix), queue in list(self.fail_next.items()):
            if fail_method.upper() != method or not path.startswith(prefix) or not queue:
                continue
            status, headers, *rest = queue.pop(0)
            if not queue:
                del self.fail_next[(fail_method, prefix)]
            if rest:
                return _Reply(status, rest[0], dict(headers))
            if "/oauth2/" in path:
                return _oauth_error(status, "temporarily_unavailable", 50000, "Injected failure.")
            # Graph's documented code for an error it does not classify.
            code, message = _FAILURE_CODES.get(
                status, ("generalException", "An unspecified error has occurred.")
            )
            return _graph_error(status, code, message, **headers) if status else _Reply(0)
        return None

    def _take_hang(self, method: str, path: str) -> bool:
        for (hang_method, prefix), count in list(self.hang_next.items()):
            if hang_method.upper() != method or not path.startswith(prefix) or count <= 0:
                continue
            if count == 1:
                del self.hang_next[(hang_method, prefix)]
            else:
                self.hang_next[(hang_method, prefix)] = count - 1
            return True
        return False

    def _authorised(self, headers: Mapping[str, str]) -> tuple[str, ...] | None:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._tokens.get(token.strip())

    # ------------------------------------------------------------------ Entra

    def _openid(self, tenant: str) -> _Reply:
        if tenant != self.tenant:
            return _oauth_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        base = f"{self.authority_host}/{tenant}"
        return _Reply(200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{self.authority_host}/{tenant}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        })  # fmt: skip

    def _token(self, tenant: str, form: Mapping[str, str]) -> _Reply:
        if tenant != self.tenant:
            return _oauth_error(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        if form.get("client_id") != self.client_id:
            return _oauth_error(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the "
                f"directory '{tenant}'.",
            )  # fmt: skip
        if "client_secret" in form:
            if form["client_secret"] != self.client_secret:
                return _oauth_error(
                    401, "invalid_client", 7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    f"is the client secret value, not the client secret ID, for a secret added "
                    f"to app '{self.client_id}'.",
                )  # fmt: skip
        elif "client_assertion" in form:
            # A certificate's signed assertion: its signature is not checked, its subject is.
            try:
                subject = jwt_claims(form["client_assertion"]).get("sub")
            except (ValueError, IndexError):
                subject = None
            if subject != self.client_id:
                return _oauth_error(
                    401, "invalid_client", 700027, "Client assertion failed signature validation."
                )
        else:
            return _oauth_error(
                400, "invalid_client", 7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )  # fmt: skip
        scope = urlsplit(str(form.get("scope", "")))
        if scope.hostname != "127.0.0.1" or scope.path != "/.default":
            # Tokens are for a Graph on loopback (this one, or a test's silent server), as
            # graph.microsoft.us is US Government's: a token for another cloud's Graph is
            # refused, as Entra refuses a resource it does not know.
            return _oauth_error(
                400, "invalid_resource", 500011,
                f"The resource principal named {form.get('scope')} was not found in the "
                f"tenant named {self.tenant}.",
            )  # fmt: skip
        now = int(datetime.now(UTC).timestamp())
        roles = tuple(self.roles)
        claims = {
            "aud": "https://graph.microsoft.com",
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now, "nbf": now, "exp": now + 3599,
            "app_displayname": "visitwatch", "appid": self.client_id, "idtyp": "app",
            "roles": list(roles), "tid": self.tenant, "uti": uuid.uuid4().hex,
        }  # fmt: skip
        token = unsigned_token(claims)
        self._tokens[token] = roles
        return _Reply(200, {
            "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
            "access_token": token,
        })  # fmt: skip

    # ------------------------------------------------------------------ Graph

    def _graph(
        self,
        method: str,
        segments: list[str],
        query: dict[str, str],
        headers: dict[str, str],
        body: Any,
        roles: tuple[str, ...],
        batch_id: str | None,
    ) -> _Reply:
        # "{m}" and "{id}" stand for any mailbox and event id in the patterns below.
        route = list(segments)
        if len(route) >= 2 and route[0] == "users":
            route[1] = "{m}"
        if len(route) > 3 and route[2] == "events":
            route = [*route[:3], "{id}"]
        match method, route:
            case "POST", ["$batch"] if batch_id is None:
                return self._batch(body, roles)
            case "GET", ["me", *_]:
                return _graph_error(
                    400,
                    "BadRequest",
                    "/me request is only valid with delegated authentication flow.",
                )
            case "GET", ["users", "{m}", "calendarView"]:
                return self._need(roles, "calendar.read") or self._calendar_view(
                    segments[1], query, headers
                )
            case "GET", ["users", "{m}", "calendarView", "delta"]:
                return self._need(roles, "calendar.read") or self._delta(
                    segments[1], query, headers
                )
            case "GET", ["users", "{m}", "events", "{id}"]:
                return self._need(roles, "calendar.read") or self._get_event(
                    segments[1], segments[3], query
                )
            case "PATCH", ["users", "{m}", "events", "{id}"]:
                return self._need(roles, "calendar.write") or self._patch_event(
                    segments[1], segments[3], body
                )
            case "POST", ["users", "{m}", "sendMail"]:
                return self._need(roles, "mail.send") or self._send_mail(segments[1], body)
            case "GET", ["users"]:
                return self._need(roles, "user.read") or self._users(query)
            case "GET", ["users", "{m}"]:
                return self._need(roles, "user.read") or self._user(segments[1], query)
            case "GET", ["users", "{m}", "manager"]:
                return self._need(roles, "user.read") or self._manager(segments[1], query)
            case "POST", ["subscriptions"]:
                return self._need(roles, "calendar.read") or self.subscriptions.create(body)
            case "GET", ["subscriptions"]:
                return self.subscriptions.listing()
            case "PATCH", ["subscriptions", subscription_id]:
                return self.subscriptions.renew(subscription_id, body)
            case "DELETE", ["subscriptions", subscription_id]:
                return self.subscriptions.delete(subscription_id)
        return _graph_error(
            400, "BadRequest", f"FakeGraph does not implement {method} /{'/'.join(segments)}"
        )

    def _need(self, roles: tuple[str, ...], what: str) -> _Reply | None:
        if not self.enforce_roles or any(r in roles for r in _NEEDS[what]):
            return None
        if what == "user.read":
            return _graph_error(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )
        return _graph_error(
            403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
        )

    def _mailbox(self, name: str) -> str | None:
        """The key ``name`` is known under (in ``events``, ``people`` or ``mailboxes``).

        Outlook resources (calendars, sendMail) are addressed by the mailbox's SMTP address
        as well as by id or UPN, so a mailbox is also found by ``mail``.
        """
        wanted = name.lower()
        for key in [*self.events, *self.mailboxes]:
            if key.lower() == wanted:
                return key
        key = self._person_key(name)
        if key is None:
            key = next(
                (k for k, u in self.people.items() if str(u.get("mail") or "").lower() == wanted),
                None,
            )
        if key is None:
            return None
        return self.people[key].get("mail") or key

    def _person_key(self, name: str) -> str | None:
        """The ``people`` key of the user ``/users/{name}`` names: by id or UPN only.

        Graph documents ``/users/{id | userPrincipalName}``: a guest's or renamed user's
        mail address does not find them there (use ``$filter=mail eq '...'``).
        """
        wanted = name.lower()
        for key, user in self.people.items():
            names = (user.get("id"), user.get("userPrincipalName"))
            if any(isinstance(n, str) and n.lower() == wanted for n in names):
                return key
        return None

    def _calendar(self, mailbox: str) -> list[dict[str, Any]]:
        wanted = mailbox.lower()
        return next((v for k, v in self.events.items() if k.lower() == wanted), [])

    def _event(self, mailbox: str, event_id: str) -> dict[str, Any] | None:
        return next((e for e in self._calendar(mailbox) if e["id"] == event_id), None)

    @staticmethod
    def _touch(event: dict[str, Any], changes: Mapping[str, Any]) -> None:
        previous = datetime.fromisoformat(event["lastModifiedDateTime"][:19]).replace(tzinfo=UTC)
        event.update(copy.deepcopy(dict(changes)))
        event["lastModifiedDateTime"] = graph_timestamp(
            max(datetime.now(UTC), previous + timedelta(seconds=1))
        )
        event["changeKey"] = _change_key(event)
        event["@odata.etag"] = f'W/"{event["changeKey"]}"'

    def _window(self, query: Mapping[str, str]) -> tuple[datetime, datetime] | _Reply:
        lower = {k.lower(): v for k, v in query.items()}
        try:
            return _parse_moment(lower["startdatetime"]), _parse_moment(lower["enddatetime"])
        except (KeyError, ValueError):
            return _graph_error(
                400, "ErrorInvalidParameter",
                "This request requires a time window specified by the query string parameters "
                "StartDateTime and EndDateTime.",
            )  # fmt: skip

    def _in_window(self, mailbox: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        events = [
            e for e in self._calendar(mailbox)
            if _event_time(e["start"]) < end and _event_time(e["end"]) > start
        ]  # fmt: skip
        return sorted(copy.deepcopy(events), key=lambda e: _event_time(e["start"]))

    def _page_size(self, query: Mapping[str, str], headers: Mapping[str, str]) -> int:
        prefer = ",".join(v for k, v in headers.items() if k.lower() == "prefer")
        for part in prefer.split(","):
            name, _, value = part.strip().partition("=")
            if name.strip().lower() == "odata.maxpagesize" and value.strip().isdigit():
                return max(1, int(value))
        top = query.get("$top", "")
        return max(1, int(top)) if top.isdigit() else self.page_size

    def _unknown_user(self, name: str) -> _Reply:
        return _graph_error(404, "ErrorInvalidUser", f"The requested user '{name}' is invalid.")

    def _calendar_view(
        self, mailbox: str, query: dict[str, str], headers: Mapping[str, str]
    ) -> _Reply:
        if self._mailbox(mailbox) is None:
            return self._unknown_user(mailbox)
        window = self._window(query)
        if isinstance(window, _Reply):
            return window
        events = self._in_window(mailbox, *window)
        if query.get("$select"):
            keep = {"id", "@odata.etag", *query["$select"].split(",")}
            events = [{k: v for k, v in e.items() if k in keep} for e in events]
        size = self._page_size(query, headers)
        skip = int(query.get("$skip", "0") or 0)
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#users('{quote(mailbox)}')/calendarView",
            "value": events[skip : skip + size],
        }
        if skip + size < len(events):
            following = {k: v for k, v in query.items() if k != "$skip"}
            following["$skip"] = str(skip + size)
            body["@odata.nextLink"] = (
                f"{self.graph_url}/users/{quote(mailbox, safe='@')}/calendarView?"
                + urlencode(following, safe="$:")
            )
        return _Reply(200, body)

    def _delta(self, mailbox: str, query: dict[str, str], headers: Mapping[str, str]) -> _Reply:
        if self._mailbox(mailbox) is None:
            return self._unknown_user(mailbox)
        size = self._page_size(query, headers)
        if "$skiptoken" in query:
            pages = self._delta_pages.pop(query["$skiptoken"], None)
            if pages is None:
                return _graph_error(410, "SyncStateNotFound", "The sync state is not found.")
            return self._delta_page(mailbox, pages)
        if "$deltatoken" in query:
            state = self._delta_tokens.get(query["$deltatoken"])
            if state is None:
                return _graph_error(410, "SyncStateNotFound", "The sync state is not found.")
            current = {e["id"]: e for e in self._in_window(state.mailbox, state.start, state.end)}
            changed = [e for i, e in current.items() if state.snapshot.get(i) != _fingerprint(e)]
            removed = [_removed(i) for i in state.snapshot if i not in current]
            final = _DeltaState(
                state.mailbox, state.start, state.end,
                {i: _fingerprint(e) for i, e in current.items()},
            )  # fmt: skip
            return self._delta_page(mailbox, _DeltaPages(changed + removed, final, size))
        window = self._window(query)
        if isinstance(window, _Reply):
            return window
        events = self._in_window(mailbox, *window)
        final = _DeltaState(mailbox, *window, {e["id"]: _fingerprint(e) for e in events})
        return self._delta_page(mailbox, _DeltaPages(events, final, size))

    def _delta_page(self, mailbox: str, pages: _DeltaPages) -> _Reply:
        link = f"{self.graph_url}/users/{quote(mailbox, safe='@')}/calendarView/delta?"
        body: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#Collection(event)",
            "value": pages.items[: pages.page_size],
        }
        rest = pages.items[pages.page_size :]
        if rest:
            token = uuid.uuid4().hex
            self._delta_pages[token] = _DeltaPages(rest, pages.final, pages.page_size)
            body["@odata.nextLink"] = link + "$skiptoken=" + token
        else:
            token = uuid.uuid4().hex
            self._delta_tokens[token] = pages.final
            body["@odata.deltaLink"] = link + "$deltatoken=" + token
        return _Reply(200, body)

    def _get_event(self, mailbox: str, event_id: str, query: Mapping[str, str]) -> _Reply:
        if self._mailbox(mailbox) is None:
            return self._unknown_user(mailbox)
        event = self._event(mailbox, event_id)
        if event is None:
            return _graph_error(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        if query.get("$select"):
            # Graph returns the selected properties, the id and the etag.
            keep = {"id", "@odata.etag", *query["$select"].split(",")}
            return _Reply(200, {k: copy.deepcopy(v) for k, v in event.items() if k in keep})
        return _Reply(200, copy.deepcopy(event))

    def _patch_event(self, mailbox: str, event_id: str, body: Any) -> _Reply:
        if self._mailbox(mailbox) is None:
            return self._unknown_user(mailbox)
        if not isinstance(body, dict):
            return _graph_error(400, "BadRequest", "Empty Payload. JSON content expected.")
        event = self._event(mailbox, event_id)
        if event is None:
            return _graph_error(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        self.patches.append(Patch(mailbox, event_id, copy.deepcopy(body)))
        self._touch(event, body)
        return _Reply(200, copy.deepcopy(event))

    def _send_mail(self, mailbox: str, body: Any) -> _Reply:
        if self._mailbox(mailbox) is None:
            return self._unknown_user(mailbox)
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return _graph_error(400, "ErrorInvalidRequest", "Empty Payload. JSON content expected.")
        recipients = [
            r for key in ("toRecipients", "ccRecipients", "bccRecipients")
            for r in message.get(key) or []
        ]  # fmt: skip
        addresses = [str((r.get("emailAddress") or {}).get("address", "")) for r in recipients]
        if not addresses or not all("@" in a for a in addresses):
            return _graph_error(
                400, "ErrorInvalidRecipients", "At least one recipient is not valid."
            )
        for header in message.get("internetMessageHeaders") or []:
            if not str(header.get("name", "")).lower().startswith("x-"):
                return _graph_error(
                    400, "InvalidInternetMessageHeader",
                    f"The internet message header name '{header.get('name')}' should start "
                    "with 'x-' or 'X-'.",
                )  # fmt: skip
        if message.get("importance", "normal") not in ("low", "normal", "high"):
            return _graph_error(400, "RequestBodyRead", "Requested value was not found.")
        self.sent.append(copy.deepcopy(body))
        return _Reply(202)

    def _select(self, user: Mapping[str, Any], query: Mapping[str, str]) -> dict[str, Any]:
        if not query.get("$select"):
            return dict(user)
        return {name: user.get(name) for name in query["$select"].split(",")}

    def _users(self, query: Mapping[str, str]) -> _Reply:
        """``GET /users?$filter=mail eq '...'``, the one filter this server understands."""
        found = _MAIL_FILTER.fullmatch(query.get("$filter", "").strip())
        if found is None:
            return _graph_error(400, "Request_UnsupportedQuery", "Unsupported Query.")
        wanted = found.group(1).replace("''", "'").lower()
        users = [u for u in self.people.values() if str(u.get("mail") or "").lower() == wanted]
        return _Reply(200, {
            "@odata.context": f"{self.graph_url}/$metadata#users",
            "value": [self._select(u, query) for u in users],
        })  # fmt: skip

    def _user(self, name: str, query: Mapping[str, str]) -> _Reply:
        key = self._person_key(name)
        if key is None:
            return _graph_error(
                404, "Request_ResourceNotFound",
                f"Resource '{name}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )  # fmt: skip
        body = {
            "@odata.context": f"{self.graph_url}/$metadata#users/$entity",
            **self._select(self.people[key], query),
        }
        return _Reply(200, body)

    def _manager(self, name: str, query: Mapping[str, str]) -> _Reply:
        key = self._person_key(name)
        manager_key = self.managers.get(key) if key is not None else None
        manager = manager_key if manager_key in self.people else None
        if key is None or manager is None:
            return _graph_error(
                404, "Request_ResourceNotFound",
                f"Resource '{'manager' if key else name}' does not exist or one of its queried "
                "reference-property objects are not present.",
            )  # fmt: skip
        body = {
            "@odata.context": f"{self.graph_url}/$metadata#directoryObjects/$entity",
            "@odata.type": "#microsoft.graph.user",
            **self._select(self.people[manager], query),
        }
        return _Reply(200, body)

    def _batch(self, body: Any, roles: tuple[str, ...]) -> _Reply:
        inner = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(inner, list) or not inner:
            return _graph_error(400, "BadRequest", "Invalid batch payload format.")
        if len(inner) > 20:
            return _graph_error(
                400, "BadRequest", "The number of requests in a batch exceeded the limit of 20."
            )
        responses = []
        for request in inner:
            url = str(request.get("url", ""))
            if url.startswith(self.graph_url):
                url = url[len(self.graph_url) :]  # an absolute nextLink/deltaLink
            parts = urlsplit("/" + url.lstrip("/"))
            raw_path = "/v1.0" + parts.path
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            reply = self._dispatch(
                str(request.get("method", "GET")).upper(),
                unquote(raw_path),
                raw_path,
                query,
                dict(request.get("headers") or {}),
                request.get("body"),
                batch_id=str(request.get("id")),
                roles=roles,
            )
            if reply.status == 0:  # a dropped connection cannot happen inside a batch
                reply = _graph_error(504, "GatewayTimeout", "The inner request timed out.")
            answer: dict[str, Any] = {
                "id": str(request.get("id")),
                "status": reply.status,
                "headers": dict(reply.headers),
            }
            if reply.body is not None:
                answer["headers"].setdefault("Content-Type", "application/json")
                answer["body"] = reply.body
            responses.append(answer)
        return _Reply(200, {"responses": responses})


def iter_sent_headers(sent: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The ``internetMessageHeaders`` of one recorded ``sendMail`` body, as pairs."""
    for header in sent["message"].get("internetMessageHeaders") or []:
        yield header["name"], header["value"]


class SilentServer:
    """A loopback TCP server that accepts connections and never sends or reads a byte.

    What a firewall that black-holes traffic, or a wedged proxy, looks like to a client: the
    TCP handshake succeeds, then nothing (not even a TLS ServerHello). Use :attr:`url` as an
    ``authority_host`` or ``graph_url``. Leaving the ``with`` block closes every connection.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._connections: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._listener.getsockname()[1]}"

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        return len(self._connections)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._connections.append(connection)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        for connection in self._connections:
            connection.close()
        self._listener.close()


def toml_table(header: str, table: dict[str, Any]) -> str:
    """``table`` (e.g. :meth:`FakeGraph.config_table` plus a name) as a TOML ``[[header]]``."""
    lines = [f"[[{header}]]"]
    for key, value in table.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
