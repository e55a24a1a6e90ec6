"""agent.identity: host patterns, pins, PKCS#12 input, metadata and TLS contexts.

The PKI is built here with cryptography (root CA -> intermediate CA -> client
leaf, plus a server certificate and an unrelated RSA certificate); the
openssl CLI makes the legacy PKCS#12 file and cross-checks pins and
fingerprints, because those are what users will compare against.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import IdentityError
from agent.identity import (
    HostPattern,
    Identity,
    build_ssl_context,
    check_key_matches,
    check_pin,
    load_pem_certificates,
    load_pkcs12,
    new_identity,
    order_chain,
    spki_pin,
)

P12_PASSWORD = b"correct horse"
PKCS7_DATA = bytes.fromhex("06092a864886f70d010701")  # the OID, DER-encoded
PKCS7_SIGNED = bytes.fromhex("06092a864886f70d010702")
NOW = datetime.datetime.now(datetime.UTC)


# --- the test PKI ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    inter: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    server: x509.Certificate
    other_key: rsa.RSAPrivateKey
    other: x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return pem(self.root)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def issue(
    common_name: str,
    key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    san: x509.GeneralName | None = None,
) -> x509.Certificate:
    """A certificate for ``key``; self-signed when ``issuer`` is None."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer or (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key, inter_key, leaf_key, server_key = p256(), p256(), p256(), p256()
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = issue("Test Root CA", root_key, None, ca=True)
    inter = issue("Test Issuing CA", inter_key, (root, root_key), ca=True)
    leaf = issue("alice", leaf_key, (inter, inter_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    server = issue(
        "upstream",
        server_key,
        (root, root_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    )
    other = issue("unrelated", other_key, None)
    return Pki(root, inter, leaf_key, leaf, server_key, server, other_key, other)


def openssl(*args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def p12_files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The leaf, its key and its intermediate, bagged in a shuffled order.

    ``modern`` comes from cryptography (AES-256-CBC, PBKDF2); ``legacy`` from
    ``openssl pkcs12 -export -legacy`` (RC2-40 and 3DES, SHA-1 MAC).
    """
    folder = tmp_path_factory.mktemp("p12")
    key_file, certs_file = folder / "key.pem", folder / "certs.pem"
    key_file.write_bytes(
        pki.leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certs_file.write_bytes(pem(pki.inter, pki.other, pki.leaf))
    legacy = folder / "legacy.p12"
    openssl(
        "pkcs12", "-export", "-legacy", "-inkey", str(key_file), "-in", str(certs_file),
        "-passout", f"pass:{P12_PASSWORD.decode()}", "-out", str(legacy),
    )  # fmt: skip
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(P12_PASSWORD)
    )
    modern = pkcs12.serialize_key_and_certificates(
        b"alice", pki.leaf_key, None, [pki.inter, pki.other, pki.leaf], encryption
    )
    return {"modern": modern, "legacy": legacy.read_bytes()}


@pytest.fixture()
def scratch(tmp_path: Path) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture()
def alice(pki: Pki) -> Identity:
    return new_identity(
        "alice", pki.leaf_key, [pki.leaf, pki.inter], ["127.0.0.1"], ca_pem=pki.root_pem
    )


# --- host patterns -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "canonical"),
    [
        ("api.example.com", "api.example.com", None, "api.example.com"),
        ("API.Example.COM.", "api.example.com", None, "api.example.com"),
        ("*.example.com", "*.example.com", None, "*.example.com"),
        ("api.example.com:8443", "api.example.com", 8443, "api.example.com:8443"),
        ("api.example.com:08443", "api.example.com", 8443, "api.example.com:8443"),
        ("*.Example.com.:443", "*.example.com", 443, "*.example.com:443"),
        ("localhost", "localhost", None, "localhost"),
        ("build_01.corp.internal", "build_01.corp.internal", None, "build_01.corp.internal"),
        ("127.0.0.1", "127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1:65535", "127.0.0.1", 65535, "127.0.0.1:65535"),
        ("[::1]:8443", "::1", 8443, "[::1]:8443"),
        ("::1", "::1", None, "[::1]"),
        ("[2001:DB8:0::1]", "2001:db8::1", None, "[2001:db8::1]"),
        ("bücher.example", "xn--bcher-kva.example", None, "xn--bcher-kva.example"),
        ("*.BÜCHER.example:1", "*.xn--bcher-kva.example", 1, "*.xn--bcher-kva.example:1"),
    ],
)
def test_host_pattern_parses_to_canonical_form_that_round_trips(
    text: str, host: str, port: int | None, canonical: str
) -> None:
    pattern = HostPattern.parse(text)
    assert (pattern.host, pattern.port, str(pattern)) == (host, port, canonical)
    assert HostPattern.parse(str(pattern)) == pattern


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("api .example.com", "white space"),
        (" api.example.com", "white space"),
        ("api.example.com:0", "1 to 65535"),
        ("api.example.com:65536", "1 to 65535"),
        ("api.example.com:https", "1 to 65535"),
        ("api.example.com:", "1 to 65535"),
        ("api.example.com:٨٠", "1 to 65535"),
        ("a*.example.com", "wildcard"),
        ("*a.example.com", "wildcard"),
        ("api.*.example.com", "wildcard"),
        ("*.*.example.com", "wildcard"),
        ("*", "wildcard"),
        ("*.com", "too broad"),
        ("*.com.", "too broad"),
        ("alice@api.example.com", "user info"),
        ("https://api.example.com", "URL"),
        ("api.example.com/v1", "URL"),
        ("api.example.com?x=1", "URL"),
        ("api..example.com", "not a valid host name"),
        ("-api.example.com", "not a valid host name"),
        ("api$.example.com", "not a valid host name"),
        ("a" * 64 + ".example.com", "not a valid host name"),
        ("é" * 70 + ".example", "internationalised"),
        (".", "no host"),
        (":8443", "no host"),
        ("1.2.3", "neither an IP address nor a host name"),
        ("256.1.1.1", "neither an IP address nor a host name"),
        ("*.0.0.1", "neither an IP address nor a host name"),
        ("[::1", "malformed"),
        ("[::1]8443", "malformed"),
        ("[::1]:0", "1 to 65535"),
        ("[api.example.com]", "IPv6"),
        ("fe80::1%eth0", "zone"),
    ],
)
def test_host_pattern_refuses_with_a_clear_sentence(text: str, says: str) -> None:
    with pytest.raises(IdentityError, match=says):
        HostPattern.parse(text)


@pytest.mark.parametrize(
    ("pattern", "host", "port", "expected"),
    [
        ("api.example.com", "api.example.com", 443, True),
        ("api.example.com", "api.example.com", 8443, True),
        ("api.example.com", "www.example.com", 443, False),
        ("api.example.com:8443", "api.example.com", 8443, True),
        ("api.example.com:8443", "api.example.com", 443, False),
        ("*.example.com", "api.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "a.b.example.com", 443, False),
        ("*.example.com", ".example.com", 443, False),
        ("*.example.com", "api.example.com.evil.net", 443, False),
        ("*.example.com", "apiexample.com", 443, False),
        ("*.example.com:443", "api.example.com", 443, True),
        ("*.example.com:443", "api.example.com", 8443, False),
        ("127.0.0.1", "127.0.0.1", 8080, True),
        ("127.0.0.1", "127.0.0.2", 8080, False),
        ("[::1]:8443", "::1", 8443, True),
    ],
)
def test_wildcards_match_exactly_one_label_and_ports_are_honoured(
    pattern: str, host: str, port: int, expected: bool
) -> None:
    assert HostPattern.parse(pattern).matches(host, port) is expected


def test_most_specific_pattern_wins_exact_then_labels_then_port() -> None:
    texts = ["*.example.com", "api.example.com:8443", "*.example.com:8443", "api.example.com"]
    patterns = [HostPattern.parse(text) for text in texts]
    assert all(pattern.matches("api.example.com", 8443) for pattern in patterns)
    ranked = sorted(patterns, key=lambda pattern: pattern.specificity, reverse=True)
    assert [str(pattern) for pattern in ranked] == [
        "api.example.com:8443",
        "api.example.com",
        "*.example.com:8443",
        "*.example.com",
    ]
    deeper, shallower = HostPattern.parse("*.api.example.com"), HostPattern.parse("*.example.com")
    assert deeper.specificity > shallower.specificity
    assert deeper.wildcard and not HostPattern.parse("api.example.com").wildcard


# --- pins --------------------------------------------------------------------

DIGEST = base64.b64encode(bytes(range(32))).decode()


#: A digest whose base64 begins with "/", a letter of base64 as well as the separator.
SLASHED = base64.b64encode(b"\xff" + bytes(31)).decode()


@pytest.mark.parametrize("text", [f"sha256//{DIGEST}", f"sha256/{DIGEST}"])
def test_pins_accept_curls_spelling_and_the_short_one(text: str) -> None:
    assert check_pin(text) == f"sha256//{DIGEST}"


@pytest.mark.parametrize("text", [f"sha256//{SLASHED}", f"sha256/{SLASHED}"])
def test_a_digest_that_begins_with_a_slash_reads_in_both_spellings(text: str) -> None:
    assert SLASHED.startswith("/")
    assert check_pin(text) == f"sha256//{SLASHED}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        DIGEST,
        f"sha1//{DIGEST}",
        f"SHA256//{DIGEST}",
        f"sha256:{DIGEST}",
        f"sha256///{DIGEST}",
        f"sha256// {DIGEST}",
        "sha256//" + base64.b64encode(bytes(31)).decode(),
        "sha256//" + base64.b64encode(bytes(33)).decode(),
        "sha256//" + DIGEST.rstrip("="),
        "sha256//not+base64!",
        "sha256//",
    ],
)
def test_bad_pins_are_refused(text: str) -> None:
    with pytest.raises(IdentityError, match="SHA-256 public key pin"):
        check_pin(text)


def test_spki_pin_equals_the_openssl_pipeline_curl_documents(pki: Pki) -> None:
    for cert in (pki.leaf, pki.other):  # EC and RSA (whose SPKI carries NULL parameters)
        public_pem = openssl("x509", "-pubkey", "-noout", data=pem(cert))
        public_der = openssl("pkey", "-pubin", "-outform", "der", data=public_pem)
        digest = openssl("dgst", "-sha256", "-binary", data=public_der)
        assert spki_pin(der(cert)) == "sha256//" + base64.b64encode(digest).decode()


@pytest.mark.parametrize("data", [b"", b"\x30\x03\x02\x01", b"not a certificate", b"\x30\x80"])
def test_spki_pin_refuses_what_is_not_a_der_certificate(data: bytes) -> None:
    with pytest.raises(IdentityError, match="not valid DER"):
        spki_pin(data)


# --- PKCS#12 and PEM ---------------------------------------------------------


def test_openssl_legacy_file_really_is_legacy(p12_files: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "legacy.p12"
    path.write_bytes(p12_files["legacy"])
    info = openssl(
        "pkcs12", "-info", "-noout", "-legacy", "-in", str(path),
        "-passin", f"pass:{P12_PASSWORD.decode()}",
    )  # fmt: skip
    assert b"RC2" in info


@pytest.mark.parametrize("kind", ["modern", "legacy"])
def test_pkcs12_gives_key_and_chain_leaf_first_whatever_the_bag_order(
    kind: str, pki: Pki, p12_files: dict[str, bytes]
) -> None:
    key, chain = load_pkcs12(p12_files[kind], P12_PASSWORD)
    check_key_matches(key, chain[0])
    assert chain == [pki.leaf, pki.inter]  # the unrelated certificate is dropped


@pytest.mark.parametrize("kind", ["modern", "legacy"])
@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda data: (data, b"wrong"), "the PKCS#12 password is wrong"),
        (lambda data: (data, None), "the PKCS#12 password is wrong"),
        (lambda data: (data[: len(data) // 2], P12_PASSWORD), "not a readable PKCS#12 file"),
        (lambda data: (data[:-1], P12_PASSWORD), "not a readable PKCS#12 file"),
        (lambda data: (b"\x31" + data[1:], P12_PASSWORD), "not a readable PKCS#12 file"),
        (lambda data: (data.replace(PKCS7_DATA, PKCS7_SIGNED, 1), P12_PASSWORD), "not a readable"),
        (lambda data: (b"\x30\x82" + os.urandom(300), P12_PASSWORD), "not a readable PKCS#12"),
        (lambda data: (b"PK\x03\x04 a zip file", P12_PASSWORD), "not a readable PKCS#12 file"),
        (lambda data: (b"", P12_PASSWORD), "not a readable PKCS#12 file"),
    ],
)
def test_wrong_password_and_damaged_file_get_different_sentences(
    kind: str,
    damage: Callable[[bytes], tuple[bytes, bytes | None]],
    says: str,
    p12_files: dict[str, bytes],
) -> None:
    data, password = damage(p12_files[kind])
    with pytest.raises(IdentityError, match=says):
        load_pkcs12(data, password)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda data: data, "password is wrong"),
        (lambda data: data[:-1], "truncated or corrupt"),
        (lambda data: b"\x04\x02" + data, "truncated or corrupt"),
    ],
)
def test_wrong_password_and_damage_are_told_apart_whatever_cryptography_says(
    damage: Callable[[bytes], bytes],
    says: str,
    p12_files: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file's own framing decides, should cryptography reword its errors."""

    def reworded(data: bytes, password: bytes | None) -> None:
        raise ValueError("PKCS#12 failure")

    monkeypatch.setattr(pkcs12, "load_pkcs12", reworded)
    with pytest.raises(IdentityError, match=says):
        load_pkcs12(damage(p12_files["legacy"]), b"wrong")


def test_a_wrong_password_on_a_truncated_file_blames_the_file(
    p12_files: dict[str, bytes],
) -> None:
    with pytest.raises(IdentityError, match="truncated or corrupt"):
        load_pkcs12(p12_files["legacy"][:200], b"wrong")


@pytest.mark.parametrize(
    ("parts", "says"),
    [
        (lambda pki: (None, None, [pki.leaf]), "holds no private key"),
        (lambda pki: (pki.leaf_key, None, None), "holds no certificate"),
        (lambda pki: (pki.leaf_key, None, [pki.other]), "matches none of the certificates"),
    ],
)
def test_incomplete_pkcs12_files_say_what_is_missing(
    parts: Callable[[Pki], tuple[Any, Any, Any]], says: str, pki: Pki
) -> None:
    encryption = serialization.BestAvailableEncryption(P12_PASSWORD)
    data = pkcs12.serialize_key_and_certificates(b"x", *parts(pki), encryption)
    with pytest.raises(IdentityError, match=says):
        load_pkcs12(data, P12_PASSWORD)


def test_chain_order_follows_signatures_not_bag_order(pki: Pki) -> None:
    for bag in itertools.permutations([pki.root, pki.inter, pki.leaf, pki.other]):
        assert order_chain(pki.leaf_key, bag) == [pki.leaf, pki.inter, pki.root]


def test_key_and_certificate_mismatch_is_refused(pki: Pki) -> None:
    check_key_matches(pki.leaf_key, pki.leaf)
    with pytest.raises(IdentityError, match="does not match the certificate"):
        check_key_matches(pki.other_key, pki.leaf)


def test_pem_bundles_load_and_garbage_does_not(pki: Pki) -> None:
    bundle = b"# comment \xc3\xa9\n" + pem(pki.leaf, pki.inter)
    assert load_pem_certificates(bundle) == [pki.leaf, pki.inter]
    for garbage in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"):
        with pytest.raises(IdentityError, match="no readable PEM certificate"):
            load_pem_certificates(garbage)


# --- identities --------------------------------------------------------------


def test_new_identity_normalises_and_stamps(pki: Pki) -> None:
    identity = new_identity(
        "alice",
        pki.leaf_key,
        [pki.leaf, pki.inter],
        ["API.example.com", "api.example.com", "*.example.com:8443"],
        pins=[f"sha256/{DIGEST}", f"sha256//{DIGEST}"],
        min_tls="1.3",
        source={"kind": "est", "url": "https://est.example.com/.well-known/est"},
    )
    assert [str(host) for host in identity.hosts] == ["api.example.com", "*.example.com:8443"]
    assert identity.pins == (f"sha256//{DIGEST}",)
    assert identity.source["kind"] == "est"
    created = datetime.datetime.fromisoformat(identity.created)
    assert abs(created - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=1)
    assert identity.ca_pem is None and identity.min_tls == "1.3"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"key": "other"}, "does not match the certificate"),
        ({"chain": []}, "needs a certificate chain"),
        ({"hosts": []}, "at least one host pattern"),
        ({"hosts": ["a*.example.com"]}, "wildcard"),
        ({"pins": ["sha256//short"]}, "pin"),
        ({"min_tls": "1.1"}, "1.2 or 1.3"),
        ({"ca_pem": b"not pem"}, "CA bundle"),
        ({"source": {"url": "x"}}, "'kind'"),
        ({"source": {"kind": "est", "when": NOW}}, "JSON object"),
        ({"name": ""}, "needs a name"),
    ],
)
def test_new_identity_refuses_bad_parts(change: dict[str, Any], says: str, pki: Pki) -> None:
    parts: dict[str, Any] = {
        "name": "alice",
        "key": pki.leaf_key,
        "chain": [pki.leaf],
        "hosts": ["api.example.com"],
    }
    parts.update(change)
    if parts["key"] == "other":
        parts["key"] = pki.other_key
    with pytest.raises(IdentityError, match=says):
        new_identity(**parts)


def test_hosts_given_as_one_string_is_a_programming_error(pki: Pki) -> None:
    with pytest.raises(TypeError):
        new_identity("alice", pki.leaf_key, [pki.leaf], "api.example.com")


def test_identity_facts_match_what_openssl_prints(alice: Identity, pki: Pki) -> None:
    printed = openssl("x509", "-noout", "-serial", "-fingerprint", "-sha256", data=pem(pki.leaf))
    serial_line, fingerprint_line = printed.decode().splitlines()[:2]
    assert alice.serial == serial_line.partition("=")[2]
    assert alice.fingerprint == fingerprint_line.partition("=")[2]
    assert alice.subject == "CN=alice" and alice.issuer == "CN=Test Issuing CA"
    assert alice.leaf == pki.leaf
    assert alice.not_after == pki.leaf.not_valid_after_utc
    assert alice.not_before.tzinfo is not None
    assert not alice.expired()
    assert alice.expired(alice.not_after + datetime.timedelta(seconds=1))
    assert alice.fingerprint is alice.fingerprint  # computed once


def test_identity_is_immutable(alice: Identity) -> None:
    with pytest.raises(AttributeError):
        alice.name = "mallory"  # type: ignore[misc]
    with pytest.raises(TypeError):
        alice.source["kind"] = "est"  # type: ignore[index]


def test_metadata_round_trips_through_json(pki: Pki) -> None:
    bundle = b"# Issuer: CN=Test Root CA \xc3\xa9\n" + pki.root_pem
    identity = new_identity(
        "alice",
        pki.leaf_key,
        [pki.leaf, pki.inter],
        ["*.example.com", "[::1]:8443"],
        ca_pem=bundle,
        pins=[spki_pin(der(pki.server))],
        source={"kind": "est", "url": "https://est.example.com", "labels": ["a", 1]},
    )
    metadata = json.loads(json.dumps(identity.to_metadata()))
    assert metadata["format"] == "mtls-agent-identity" and metadata["version"] == 1
    assert metadata["ca_pem"] == pki.root_pem.decode()  # the comment is gone
    assert metadata["hosts"] == ["*.example.com", "[::1]:8443"]
    restored = Identity.from_metadata("alice", metadata)
    assert restored == identity
    assert restored.chain == (pki.leaf, pki.inter)


def test_summary_is_json_safe_and_shows_no_key_material(alice: Identity) -> None:
    summary = json.loads(json.dumps(alice.summary()))
    assert summary == {
        "name": "alice",
        "subject": "CN=alice",
        "issuer": "CN=Test Issuing CA",
        "serial": alice.serial,
        "not_before": alice.not_before.isoformat(),
        "not_after": alice.not_after.isoformat(),
        "hosts": ["127.0.0.1"],
        "fingerprint_sha256": alice.fingerprint,
        "pins": [],
        "min_tls": "1.2",
        "source": "import",
        "ca": "custom",
    }


def _breakers(pki: Pki) -> list[tuple[Callable[[dict[str, Any]], Any], str]]:
    def setting(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda data: {**data, key: value}

    def dropping(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return lambda data: {k: v for k, v in data.items() if k != key}

    return [
        (lambda data: [data], "not mtls-agent identity metadata"),
        (lambda data: "garbage", "not mtls-agent identity metadata"),
        (setting("format", "something-else"), "not mtls-agent identity metadata"),
        (setting("version", 99), "version 99 is not supported"),
        (setting("version", "1"), "is not supported"),
        (setting("version", True), "is not supported"),
        (dropping("chain"), "'chain'"),
        (setting("chain", pem(pki.leaf).decode()), "'chain'"),
        (setting("chain", []), "needs a certificate chain"),
        (setting("chain", [1]), "must list strings"),
        (setting("chain", ["-----BEGIN CERTIFICATE-----\nAA==\n"]), "no readable PEM"),
        (setting("chain", [pem(pki.leaf, pki.inter).decode()]), "one PEM certificate"),
        (setting("hosts", []), "at least one host pattern"),
        (setting("hosts", ["*.com"]), "too broad"),
        (setting("hosts", "api.example.com"), "'hosts'"),
        (setting("pins", ["sha256//x"]), "pin"),
        (dropping("pins"), "'pins'"),
        (setting("min_tls", "1.0"), "1.2 or 1.3"),
        (setting("min_tls", 1.2), "'min_tls'"),
        (setting("ca_pem", "junk"), "CA bundle"),
        (setting("ca_pem", 5), "'ca_pem'"),
        (setting("source", "import"), "'source'"),
        (setting("source", {}), "'kind'"),
        (setting("created", None), "'created'"),
    ]


def test_from_metadata_refuses_anything_malformed(alice: Identity, pki: Pki) -> None:
    good = alice.to_metadata()
    for breaker, says in _breakers(pki):
        with pytest.raises(IdentityError, match=says):
            Identity.from_metadata("alice", breaker(good))


def test_from_metadata_ignores_fields_a_later_writer_may_add(alice: Identity) -> None:
    data = {**alice.to_metadata(), "comment": "added by a later version"}
    assert Identity.from_metadata("alice", data) == alice


# --- TLS contexts --------------------------------------------------------------

Conversation = Callable[[ssl.SSLSocket, dict[str, Any]], None]


def greet(tls: ssl.SSLSocket, outcome: dict[str, Any]) -> None:
    outcome["peer"] = tls.getpeercert(binary_form=True)
    tls.sendall(b"ok")


def server_context(pki: Pki, tmp_path: Path, *, post_handshake: bool = False) -> ssl.SSLContext:
    """An upstream that wants a client certificate and trusts only the root."""
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(
        pem(pki.server)
        + pki.server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file)
    context.load_verify_locations(cadata=pki.root_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    context.post_handshake_auth = post_handshake
    return context


@contextlib.contextmanager
def tls_server(
    context: ssl.SSLContext, conversation: Conversation = greet
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Serve one connection in a thread; ``outcome`` is complete on exit."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            connection.settimeout(10)
            with context.wrap_socket(connection, server_side=True) as tls:
                conversation(tls, outcome)
        except OSError as exc:  # ssl.SSLError included
            outcome["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcome
    finally:
        thread.join(10)
        listener.close()


def connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_context_presents_leaf_and_intermediate_to_a_server_trusting_only_the_root(
    alice: Identity, pki: Pki, scratch: Path, tmp_path: Path
) -> None:
    context = build_ssl_context(alice, pki.leaf_key, scratch)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert context.post_handshake_auth
    with (
        tls_server(server_context(pki, tmp_path)) as (port, outcome),
        connect(context, port) as tls,
    ):
        assert tls.recv(2) == b"ok"
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"
    assert "error" not in outcome
    assert outcome["peer"] == der(pki.leaf)


def test_without_the_intermediate_the_same_server_refuses(
    pki: Pki, scratch: Path, tmp_path: Path
) -> None:
    """The control for the test above: it is the intermediate that makes it pass."""
    leaf_only = new_identity("alice", pki.leaf_key, [pki.leaf], ["127.0.0.1"], ca_pem=pki.root_pem)
    context = build_ssl_context(leaf_only, pki.leaf_key, scratch)
    with (
        tls_server(server_context(pki, tmp_path)) as (port, outcome),
        contextlib.suppress(OSError),
        connect(context, port) as tls,
    ):
        tls.recv(2)
    assert "certificate verify failed" in str(outcome["error"])


def test_client_certificate_is_given_when_asked_after_the_handshake(
    alice: Identity, pki: Pki, scratch: Path, tmp_path: Path
) -> None:
    def ask_later(tls: ssl.SSLSocket, outcome: dict[str, Any]) -> None:
        outcome["before"] = tls.getpeercert(binary_form=True)
        tls.recv(3)
        tls.verify_client_post_handshake()
        tls.sendall(b"ok")
        tls.recv(4)  # reading past the client's answer processes its certificate
        outcome["peer"] = tls.getpeercert(binary_form=True)
        tls.sendall(b"ok")

    context = build_ssl_context(alice, pki.leaf_key, scratch)
    server = server_context(pki, tmp_path, post_handshake=True)
    with tls_server(server, ask_later) as (port, outcome), connect(context, port) as tls:
        tls.sendall(b"PHA")
        assert tls.recv(2) == b"ok"
        tls.sendall(b"done")
        assert tls.recv(2) == b"ok"
    assert outcome["before"] is None
    assert outcome["peer"] == der(pki.leaf)


def test_minimum_tls_13_refuses_a_tls_12_upstream(pki: Pki, scratch: Path, tmp_path: Path) -> None:
    chain = [pki.leaf, pki.inter]
    strict = new_identity(
        "alice", pki.leaf_key, chain, ["127.0.0.1"], ca_pem=pki.root_pem, min_tls="1.3"
    )
    server = server_context(pki, tmp_path)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    context = build_ssl_context(strict, pki.leaf_key, scratch)
    with tls_server(server) as (port, _), pytest.raises(ssl.SSLError):
        connect(context, port)


@pytest.fixture()
def key_file_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every buffer handed to ``os.write``: what the key file receives."""
    seen: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        seen.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    return seen


def assert_only_encrypted_key(written: bytes, pki: Pki) -> None:
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in written
    assert b" PRIVATE KEY-----" not in written.replace(b"ENCRYPTED PRIVATE KEY", b"")
    assert pem(pki.leaf, pki.inter) in written


def test_key_goes_encrypted_through_memfd_and_never_to_the_scratch_folder(
    alice: Identity,
    pki: Pki,
    scratch: Path,
    key_file_writes: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not hasattr(os, "memfd_create"):
        pytest.skip("memfd_create is Linux-only")
    created: list[str] = []
    real_memfd_create = os.memfd_create

    def spy(name: str, flags: int = 0) -> int:
        created.append(name)
        return real_memfd_create(name, flags)

    monkeypatch.setattr(os, "memfd_create", spy)
    build_ssl_context(alice, pki.leaf_key, scratch)
    assert len(created) == 1
    assert_only_encrypted_key(b"".join(key_file_writes), pki)
    assert list(scratch.iterdir()) == []


def test_without_memfd_a_private_scratch_file_is_used_and_removed(
    alice: Identity,
    pki: Pki,
    scratch: Path,
    tmp_path: Path,
    key_file_writes: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    context = build_ssl_context(alice, pki.leaf_key, scratch)
    [(_, flags, mode)] = [entry for entry in opened if entry[0].startswith(str(scratch))]
    assert flags & os.O_EXCL and flags & os.O_CREAT and mode == 0o600
    assert_only_encrypted_key(b"".join(key_file_writes), pki)
    assert list(scratch.iterdir()) == []
    with (
        tls_server(server_context(pki, tmp_path)) as (port, outcome),
        connect(context, port) as tls,
    ):
        assert tls.recv(2) == b"ok"
    assert outcome["peer"] == der(pki.leaf)


def test_scratch_file_is_removed_even_when_loading_fails(
    alice: Identity, pki: Pki, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with pytest.raises(IdentityError, match="could not be loaded"):
        build_ssl_context(alice, p256(), scratch)
    assert list(scratch.iterdir()) == []


# --- system trust --------------------------------------------------------------


def hashed_folder(folder: Path, *certs: x509.Certificate) -> Path:
    """A CA folder as `openssl rehash` leaves it (what distributions ship)."""
    folder.mkdir()
    for number, cert in enumerate(certs):
        (folder / f"ca{number}.pem").write_bytes(pem(cert))
    openssl("rehash", str(folder))
    return folder


def test_system_trust_uses_the_hashed_folder_alone_when_it_holds_the_bundle(
    pki: Pki, scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.root_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_folder(tmp_path / "certs", pki.root)))
    identity = new_identity("alice", pki.leaf_key, [pki.leaf, pki.inter], ["127.0.0.1"])
    context = build_ssl_context(identity, pki.leaf_key, scratch)
    assert context.cert_store_stats()["x509_ca"] == 0  # nothing parsed up front
    with (
        tls_server(server_context(pki, tmp_path)) as (port, outcome),
        connect(context, port) as tls,
    ):
        assert tls.recv(2) == b"ok"
    assert outcome["peer"] == der(pki.leaf)


def test_system_trust_loads_the_bundle_when_the_folder_lacks_some_of_it(
    pki: Pki, scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.root_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed_folder(tmp_path / "certs", pki.other)))
    identity = new_identity("alice", pki.leaf_key, [pki.leaf, pki.inter], ["127.0.0.1"])
    context = build_ssl_context(identity, pki.leaf_key, scratch)
    assert context.cert_store_stats()["x509_ca"] >= 1  # the bundle, parsed up front
    with (
        tls_server(server_context(pki, tmp_path)) as (port, outcome),
        connect(context, port) as tls,
    ):
        assert tls.recv(2) == b"ok"
    assert outcome["peer"] == der(pki.leaf)
