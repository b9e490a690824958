"""Signing in to Entra with a certificate, as security teams prefer, over real TLS on loopback.

FakeGraph does not check signatures, so these tests do: the client assertion msal sent must
be signed by the configured key, and name the certificate by its SHA-256 thumbprint.
Also: the token scope of national clouds, and waits for Retry-After in both its forms.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.graph_server import FakeGraph
from visitwatch.connectors import graph_auth, graph_client
from visitwatch.connectors.graph_client import GRAPH_OPTIONS, GraphClient, GraphError
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import validate_options


@pytest.fixture
def graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    return start_fake_graph()


def make_certificate() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "visitwatch")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def client_for(
    graph: FakeGraph, tmp_path: Path, sleeps: list[float] | None = None, **extra: object
) -> GraphClient:
    table = {k: v for k, v in graph.config_table("UNUSED").items() if k != "client_secret"}
    settings, problems = validate_options({**table, **extra}, GRAPH_OPTIONS, "sources[0]",
                                          tmp_path)  # fmt: skip
    assert problems == []
    record = sleeps if sleeps is not None else []
    return GraphClient(settings, sleep=record.append, jitter=lambda: 0.0)


def secret_client(graph: FakeGraph, tmp_path: Path, sleeps: list[float]) -> GraphClient:
    return client_for(graph, tmp_path, sleeps, client_secret={"env": "VW_SECRET"})


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def assert_signed_by(graph: FakeGraph, cert: x509.Certificate) -> None:
    [token_request] = graph.requests_to("POST", f"/{graph.tenant}/oauth2/v2.0/token")
    assertion = token_request.body["client_assertion"]
    header_b64, claims_b64, signature_b64 = assertion.split(".")
    header = json.loads(b64url_decode(header_b64))
    # msal signs RS256 for a PEM key and PS256 for a PFX; either must verify with the key.
    scheme = (
        padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
        if header["alg"] == "PS256" else padding.PKCS1v15()
    )  # fmt: skip
    cert.public_key().verify(  # raises if the signature is not the configured key's
        b64url_decode(signature_b64), f"{header_b64}.{claims_b64}".encode(), scheme,
        hashes.SHA256(),
    )  # fmt: skip
    # SHA-256 names the certificate; the deprecated SHA-1 thumbprint is not sent.
    assert b64url_decode(header.get("x5t#S256") or "") == cert.fingerprint(hashes.SHA256())
    assert "x5t" not in header
    assert json.loads(b64url_decode(claims_b64))["sub"] == graph.client_id


def test_pem_certificate_signs_the_token_request(graph: FakeGraph, tmp_path: Path):
    """A PEM holding key and certificate: msal signs the assertion with it; Graph then answers."""
    key, cert = make_certificate()
    pem = tmp_path / "graph.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )  # fmt: skip
    graph.add_person("asha.khan@contoso.org", "Asha Khan")
    client = client_for(graph, tmp_path, certificate=str(pem))
    assert client.get("/users/asha.khan@contoso.org")["displayName"] == "Asha Khan"
    assert_signed_by(graph, cert)


def test_pfx_certificate_with_passphrase(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A .pfx and its passphrase from the environment work the same way."""
    key, cert = make_certificate()
    pfx = tmp_path / "graph.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"visitwatch", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass")
    ))  # fmt: skip
    monkeypatch.setenv("PFX_PASS", "pfx-pass")
    client = client_for(
        graph, tmp_path, certificate=str(pfx), certificate_password={"env": "PFX_PASS"}
    )
    assert client.token()
    assert_signed_by(graph, cert)


def test_unreadable_certificate_is_a_clear_permanent_error(tmp_path: Path):
    """A certificate file without a certificate says what it must contain."""
    bad = tmp_path / "graph.pem"
    bad.write_text("not a certificate")
    settings, _ = validate_options(
        {"tenant_id": "t", "client_id": "c", "certificate": str(bad)}, GRAPH_OPTIONS,
        "sources[0]", tmp_path,
    )  # fmt: skip
    with pytest.raises(ConnectorError) as caught:
        GraphClient(settings)
    assert caught.value.permanent and "PEM" in str(caught.value)


def pfx_file(tmp_path: Path, password: bytes) -> tuple[Path, x509.Certificate]:
    key, cert = make_certificate()
    pfx = tmp_path / "graph.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"visitwatch", key, cert, None, serialization.BestAvailableEncryption(password)
    ))  # fmt: skip
    return pfx, cert


def test_wrong_pfx_password_is_a_certificate_problem_naming_the_option(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A wrong PFX passphrase is reported as such, naming certificate_password, not the tenant."""
    pfx, _cert = pfx_file(tmp_path, b"right")
    monkeypatch.setenv("PFX_PASS", "Tr0ub4dor-guess")
    with pytest.raises(ConnectorError) as caught:
        client_for(
            graph, tmp_path, certificate=str(pfx), certificate_password={"env": "PFX_PASS"}
        ).token()
    text = str(caught.value)
    assert caught.value.permanent
    assert "certificate_password" in text and str(pfx) in text
    assert "tenant" not in text.lower() and "Tr0ub4dor-guess" not in text


@pytest.mark.parametrize(
    ("graph_url", "scope"),
    [
        ("https://graph.microsoft.com/v1.0", "https://graph.microsoft.com/.default"),
        ("https://graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),
        ("https://dod-graph.microsoft.us/beta/", "https://dod-graph.microsoft.us/.default"),
        ("https://microsoftgraph.chinacloudapi.cn/v1.0",
         "https://microsoftgraph.chinacloudapi.cn/.default"),
    ],
)  # fmt: skip
def test_token_scope_follows_the_graph_url(graph_url: str, scope: str):
    """National clouds: the token is asked for the Graph the requests go to."""
    assert graph_auth.scope_for(graph_url) == [scope]


def test_token_request_asks_for_the_configured_graph(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The token endpoint is asked for the configured Graph's scope (it refuses any other)."""
    monkeypatch.setenv("VW_SECRET", graph.client_secret)
    client = secret_client(graph, tmp_path, [])
    graph.add_person("asha.khan@contoso.org", "Asha Khan")
    assert client.get("/users/asha.khan@contoso.org")["displayName"] == "Asha Khan"
    [token_request] = graph.requests_to("POST", f"/{graph.tenant}/oauth2/v2.0/token")
    assert token_request.body["scope"] == f"{graph.authority_host}/.default"


def http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def test_http_date_retry_after_is_honoured(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Retry-After as an HTTP date (RFC 9110) is waited for, not an exception."""
    monkeypatch.setenv("VW_SECRET", graph.client_secret)
    sleeps: list[float] = []
    client = secret_client(graph, tmp_path, sleeps)
    graph.add_person("asha.khan@contoso.org", "Asha Khan")
    later = datetime.now(UTC) + timedelta(seconds=30)
    graph.fail_next[("GET", "/v1.0/users/asha.khan@contoso.org")] = [
        (503, {"Retry-After": http_date(later)})
    ]
    assert client.get("/users/asha.khan@contoso.org")["displayName"] == "Asha Khan"
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 31


def test_a_long_retry_after_is_not_waited_for(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Retry-After beyond the 120 s cap, in either form: a temporary error, no long sleep."""
    monkeypatch.setenv("VW_SECRET", graph.client_secret)
    sleeps: list[float] = []
    client = secret_client(graph, tmp_path, sleeps)
    far = http_date(datetime.now(UTC) + timedelta(hours=2))
    for header in ("3600", far):
        graph.fail_next[("GET", "/v1.0/users/x@contoso.org")] = [(429, {"Retry-After": header})]
        with pytest.raises(GraphError) as caught:
            client.get("/users/x@contoso.org")
        assert caught.value.status == 429 and not caught.value.permanent
    assert sum(sleeps) <= graph_client.MAX_WAIT_SECONDS


def test_throttled_batch_requests_wait_within_the_cap(
    graph: FakeGraph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Inside $batch: Retry-After (seconds or a date) is honoured up to the cap, then given up."""
    monkeypatch.setenv("VW_SECRET", graph.client_secret)
    sleeps: list[float] = []
    client = secret_client(graph, tmp_path, sleeps)
    graph.add_person("asha.khan@contoso.org", "Asha Khan")
    graph.add_person("ben.okafor@contoso.org", "Ben Okafor")
    soon = http_date(datetime.now(UTC) + timedelta(seconds=20))
    graph.fail_next[("GET", "/v1.0/users/asha.khan@contoso.org")] = [(429, {"Retry-After": soon})]
    graph.fail_next[("GET", "/v1.0/users/ben.okafor@contoso.org")] = [
        (429, {"Retry-After": "3600"})
    ] * 5
    answers = client.batch([
        {"id": "a", "method": "GET", "url": "/users/asha.khan@contoso.org"},
        {"id": "b", "method": "GET", "url": "/users/ben.okafor@contoso.org"},
    ])  # fmt: skip
    assert answers["a"]["status"] == 200
    assert answers["b"]["status"] == 429  # the caller judges it; nobody waited an hour
    assert sleeps and all(s <= graph_client.MAX_WAIT_SECONDS for s in sleeps)
    assert sum(sleeps) <= graph_client.MAX_WAIT_SECONDS
