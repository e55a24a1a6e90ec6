"""A throw-away PKI for the benchmark, as every peer needs it on disk.

    root CA ──┬── intermediate CA ── client leaf (EC P-256, clientAuth)
              └── server "localhost" (DNS:localhost, IP:127.0.0.1)

The origin trusts only the root, so every client must send the intermediate
in its handshake: each peer is configured with the same chain and key. The
files are written in the forms the peers take: PEM chain + key (curl, nginx,
stunnel), chain and key in one file (HAProxy), PKCS#12 (``agentctl import``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

P12_PASSWORD = "bench-p12-password"
_LIFETIME = dt.timedelta(days=30)

PrivateKey = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-agent bench"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _builder(subject: str, issuer: x509.Name, key: PrivateKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _LIFETIME)
    )


@dataclass(frozen=True)
class Authority:
    """A CA certificate and its key, able to sign leaves."""

    cert: x509.Certificate
    key: PrivateKey

    def sign_client(
        self, cn: str, key: PrivateKey | None = None
    ) -> tuple[x509.Certificate, PrivateKey]:
        """A client leaf for ``cn`` (a fresh EC key unless one is given)."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(cn, self.cert.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def _ca(cn: str, issuer: Authority | None, path_length: int) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, issuer.cert.subject if issuer else _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return Authority(cert, key)


@dataclass(frozen=True)
class BenchPki:
    """The PKI's files (see the module doc) and the intermediate that signs identities."""

    folder: Path
    intermediate: Authority

    @property
    def root(self) -> Path:
        return self.folder / "root.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_chain(self) -> Path:
        """Leaf then intermediate (curl ``--cert``, nginx, stunnel)."""
        return self.folder / "client-chain.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def client_combined(self) -> Path:
        """Chain and key in one file (HAProxy's ``crt``)."""
        return self.folder / "client-combined.pem"

    @property
    def client_p12(self) -> Path:
        """The client identity as PKCS#12 (``agentctl import``), password ``P12_PASSWORD``."""
        return self.folder / "client.p12"

    @property
    def p12_password_file(self) -> Path:
        return self.folder / "p12-password"


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    if secret:
        path.touch(mode=0o600)
    path.write_bytes(data)


def build_pki(folder: Path) -> BenchPki:
    """Make the PKI's files in ``folder`` (milliseconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    root = _ca("bench root CA", None, path_length=1)
    intermediate = _ca("bench intermediate CA", root, path_length=0)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        _builder("localhost", root.cert.subject, server_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    client, client_key = intermediate.sign_client("bench client")

    pki = BenchPki(folder, intermediate)
    _write(pki.root, _cert_pem(root.cert))
    _write(pki.server_cert, _cert_pem(server))
    _write(pki.server_key, _key_pem(server_key), secret=True)
    _write(pki.client_chain, _cert_pem(client, intermediate.cert))
    _write(pki.client_key, _key_pem(client_key), secret=True)
    _write(pki.client_combined, _cert_pem(client, intermediate.cert) + _key_pem(client_key), True)
    p12 = pkcs12.serialize_key_and_certificates(
        b"bench client",
        client_key,
        client,
        [intermediate.cert],
        serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
    )
    _write(pki.client_p12, p12, secret=True)
    _write(pki.p12_password_file, P12_PASSWORD.encode(), secret=True)
    return pki
