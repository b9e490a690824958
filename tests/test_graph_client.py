"""Signing in to Entra with a certificate, as security teams prefer, over real TLS on loopback.

FakeGraph does not check signatures, so these tests do: the client assertion msal sent must
be signed by the configured key, and name the certificate by its SHA-1 thumbprint.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.graph_server import FakeGraph
from visitwatch.connectors import graph_client
from visitwatch.connectors.base import ConnectorError
from visitwatch.connectors.graph_client import GRAPH_OPTIONS, GraphClient
from visitwatch.connectors.options import validate_options


@pytest.fixture
def graph(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGraph]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    graph_client._clients.clear()
    with FakeGraph() as fake:
        yield fake


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


def client_for(graph: FakeGraph, tmp_path: Path, **extra: object) -> GraphClient:
    table = {k: v for k, v in graph.config_table("UNUSED").items() if k != "client_secret"}
    settings, problems = validate_options({**table, **extra}, GRAPH_OPTIONS, "sources[0]",
                                          tmp_path)  # fmt: skip
    assert problems == []
    return GraphClient(settings, sleep=lambda _: None)


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
    thumbprint = cert.fingerprint(hashes.SHA1())
    named = header.get("x5t") or ""
    named_s256 = header.get("x5t#S256") or ""
    assert b64url_decode(named) == thumbprint or (
        b64url_decode(named_s256) == cert.fingerprint(hashes.SHA256())
    )
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
