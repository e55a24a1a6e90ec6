"""A throw-away test PKI, written as PEM files into a folder.

    root CA ──┬── intermediate CA ── client leaf(s)   (EC P-256, clientAuth)
              └── server "localhost" (DNS:localhost, IP:127.0.0.1, IP:::1)
    other root CA ── other server "localhost"          (an untrusted upstream)

The client leaf is signed by the *intermediate* while nginx trusts only the
root: a client is accepted only when it sends the intermediate in its
handshake, which is what an identity's chain is for.

Files (all PEM) in ``Pki.dir``: ``root.pem``, ``intermediate.pem``,
``server.pem`` + ``server.key``, ``other-root.pem``, ``other-server.pem`` +
``other-server.key``, and per client leaf ``NAME.pem`` (leaf alone),
``NAME-chain.pem`` (leaf then intermediate, what ``curl --cert`` takes) and
``NAME.key`` (PKCS#8, unencrypted).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.tools import require_tool

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CLIENT_CN = "mtls-agent test client"
ORG = "mtls-agent tests"
#: The password of the PKCS#12 files ``Pki.client_p12`` writes unless told otherwise.
P12_PASSWORD = "p12-test-password"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str, org: str = ORG) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def new_key(kind: Literal["ec", "rsa"] = "ec") -> PrivateKey:
    """A fresh private key: EC P-256 (fast) or RSA 2048."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    """The certificates as concatenated PEM, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def spki_sha256(cert: x509.Certificate) -> str:
    """Base64 SHA-256 of the DER SubjectPublicKeyInfo: a pin (curl: ``sha256//`` + it)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(
    cn: str,
    issuer: CertKey | None = None,
    path_length: int | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=3650),
) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate: self-signed when ``issuer`` is None, else signed by it."""
    key = new_key("ec")
    now = _now()
    subject = _name(cn)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + lifetime)
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
        .add_extension(_ski(key), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256()), key


def make_leaf(
    issuer: CertKey,
    cn: str,
    *,
    usage: Literal["client", "server"],
    key: PrivateKey | None = None,
    key_type: Literal["ec", "rsa"] = "ec",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=365),
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    serial: int | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """An end-entity certificate signed by ``issuer``.

    ``not_before`` defaults to one minute ago (room for clock skew) and
    ``not_after`` to ``now + lifetime``: a ``lifetime`` of a few seconds makes a
    certificate that expires during a test.
    """
    key = key or new_key(key_type)
    now = _now()
    not_before = not_before or now - dt.timedelta(minutes=1)
    not_after = not_after or now + lifetime
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if usage == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(_ski(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


@dataclass(frozen=True)
class CertKey:
    """A certificate, its key, the intermediates that go with it, and their files."""

    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path
    #: Intermediates after the leaf, never the root (what a TLS peer sends).
    intermediates: tuple[x509.Certificate, ...] = ()
    #: Leaf then intermediates, PEM; equals cert_path when there are none.
    chain_path: Path | None = None

    @property
    def chain(self) -> list[x509.Certificate]:
        """Leaf first, then its intermediates."""
        return [self.cert, *self.intermediates]

    @property
    def serial_hex(self) -> str:
        """The serial as nginx's ``$ssl_client_serial`` prints it: upper-case hex of
        its bytes (OpenSSL's ``i2a_ASN1_INTEGER``), so an even number of digits."""
        digits = format(self.cert.serial_number, "X")
        return digits.zfill(len(digits) + len(digits) % 2)

    @property
    def cn(self) -> str:
        return str(self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    @property
    def spki_sha256(self) -> str:
        """The leaf's pin: base64 SHA-256 of its SubjectPublicKeyInfo."""
        return spki_sha256(self.cert)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "cert"


def write_cert_key(
    folder: Path,
    name: str,
    cert: x509.Certificate,
    key: PrivateKey,
    intermediates: tuple[x509.Certificate, ...] = (),
) -> CertKey:
    """Write ``NAME.pem``, ``NAME.key`` (0600) and ``NAME-chain.pem``; return their CertKey."""
    cert_path = folder / f"{name}.pem"
    key_path = folder / f"{name}.key"
    cert_path.write_bytes(cert_pem(cert))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem(key))
    chain_path = cert_path
    if intermediates:
        chain_path = folder / f"{name}-chain.pem"
        chain_path.write_bytes(cert_pem(cert, *intermediates))
    return CertKey(cert, key, cert_path, key_path, tuple(intermediates), chain_path)


# --- PKCS#12 ------------------------------------------------------------------


def p12_modern(
    key: PrivateKey,
    chain: list[x509.Certificate],
    password: str | bytes,
    name: str = CLIENT_CN,
) -> bytes:
    """A PKCS#12 blob as current tools write it: PBES2 (PBKDF2-SHA256, AES-256-CBC), SHA-256 MAC.

    ``chain`` is the leaf first, then the intermediates (which are included).
    """
    pw = password.encode() if isinstance(password, str) else password
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(pw)
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode(), key, chain[0], list(chain[1:]) or None, encryption
    )


def p12_legacy(
    key: PrivateKey,
    chain: list[x509.Certificate],
    password: str,
    name: str = CLIENT_CN,
) -> bytes:
    """A PKCS#12 blob as old tools write it (RC2-40 certificates, 3DES key, SHA-1 MAC).

    Made by the real ``openssl pkcs12 -export -legacy``; the intermediates are included.
    """
    openssl = require_tool("openssl")
    with tempfile.TemporaryDirectory(prefix="mt-p12-") as tmp:
        folder = Path(tmp)
        (folder / "key.pem").write_bytes(key_pem(key))
        (folder / "leaf.pem").write_bytes(cert_pem(chain[0]))
        cmd = [
            openssl, "pkcs12", "-export", "-legacy",
            "-inkey", str(folder / "key.pem"),
            "-in", str(folder / "leaf.pem"),
            "-name", name,
            "-passout", "env:MT_P12_PASSWORD",
        ]  # fmt: skip
        if chain[1:]:
            (folder / "extra.pem").write_bytes(cert_pem(*chain[1:]))
            cmd += ["-certfile", str(folder / "extra.pem")]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            env={**os.environ, "MT_P12_PASSWORD": password},
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl pkcs12 -export -legacy failed: {proc.stderr.decode()}")
    return proc.stdout


# --- the PKI ------------------------------------------------------------------


@dataclass
class Pki:
    """The test PKI: CAs, the default client and server certificates, and their files."""

    dir: Path
    root: CertKey
    intermediate: CertKey
    #: The default client leaf, CN "mtls-agent test client", signed by the intermediate.
    client: CertKey
    #: Server certificate for DNS:localhost, IP:127.0.0.1 and IP:::1, signed by the root.
    server: CertKey
    #: An unrelated CA and a localhost server certificate from it: an untrusted upstream.
    other_root: CertKey
    other_server: CertKey
    _counter: int = field(default=0, repr=False)

    @property
    def root_pem(self) -> Path:
        """The bundle that trusts this PKI (nginx's client CA, curl's ``--cacert``)."""
        return self.root.cert_path

    def issue_client(
        self,
        cn: str = CLIENT_CN,
        *,
        name: str | None = None,
        issuer: Literal["intermediate", "root"] = "intermediate",
        key_type: Literal["ec", "rsa"] = "ec",
        lifetime: dt.timedelta = dt.timedelta(days=365),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertKey:
        """A new client leaf (fresh key, random serial) written into ``dir``.

        Pass ``lifetime=timedelta(seconds=5)`` for one that expires during a test, or
        ``not_after`` in the past for one already expired. Signed by the intermediate
        unless ``issuer="root"``; the files are named after ``name`` (else the CN).
        """
        self._counter += 1
        stem = _slug(name or f"{cn}-{self._counter}")
        ca = self.intermediate if issuer == "intermediate" else self.root
        cert, key = make_leaf(
            ca,
            cn,
            usage="client",
            key_type=key_type,
            lifetime=lifetime,
            not_before=not_before,
            not_after=not_after,
        )
        intermediates = (self.intermediate.cert,) if issuer == "intermediate" else ()
        return write_cert_key(self.dir, stem, cert, key, intermediates)

    def client_p12(
        self,
        kind: Literal["modern", "legacy"] = "modern",
        *,
        leaf: CertKey | None = None,
        password: str = P12_PASSWORD,
        path: Path | None = None,
    ) -> Path:
        """Write ``leaf`` (default: the client) with its intermediate as a PKCS#12 file."""
        leaf = leaf or self.client
        make = p12_modern if kind == "modern" else p12_legacy
        data = make(leaf.key, leaf.chain, password, name=leaf.cn)
        path = path or self.dir / f"{leaf.cert_path.stem}-{kind}.p12"
        path.touch(mode=0o600)
        path.write_bytes(data)
        return path


def build_pki(folder: Path) -> Pki:
    """Make the whole test PKI in ``folder`` (created if needed). Takes milliseconds."""
    folder.mkdir(parents=True, exist_ok=True)

    root_cert, root_key = make_ca("mtls-agent test root CA", path_length=1)
    root = write_cert_key(folder, "root", root_cert, root_key)
    inter_cert, inter_key = make_ca("mtls-agent test intermediate CA", root, path_length=0)
    intermediate = write_cert_key(folder, "intermediate", inter_cert, inter_key)

    client_cert, client_key = make_leaf(intermediate, CLIENT_CN, usage="client")
    client = write_cert_key(folder, "client", client_cert, client_key, (inter_cert,))

    server_cert, server_key = make_leaf(
        root,
        "localhost",
        usage="server",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "::1"),
    )
    server = write_cert_key(folder, "server", server_cert, server_key)

    other_cert, other_key = make_ca("mtls-agent OTHER root CA", path_length=1)
    other_root = write_cert_key(folder, "other-root", other_cert, other_key)
    other_srv_cert, other_srv_key = make_leaf(
        other_root,
        "localhost",
        usage="server",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "::1"),
    )
    other_server = write_cert_key(folder, "other-server", other_srv_cert, other_srv_key)

    return Pki(
        dir=folder,
        root=root,
        intermediate=intermediate,
        client=client,
        server=server,
        other_root=other_root,
        other_server=other_server,
    )
