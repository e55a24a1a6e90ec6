"""An identity: a client certificate chain, the hosts it is for, and how to use it.

Everything here is pure and local: parsing host patterns, pins, PEM and
PKCS#12 input, describing an identity for disk and for `agentctl list`, and
turning an identity plus its private key into an ``ssl.SSLContext``. The
private key itself is never part of an ``Identity``: the vault seals it and
the keychain holds it only inside the context built here.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import ipaddress
import json
import os
import re
import secrets
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from agent.errors import IdentityError
from agent.policy import NO_RULES, CallerRules

#: The private key types a TLS client certificate can use.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
#: Their public halves: what a CSR or a certificate carries.
PublicKey = (
    rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)

METADATA_FORMAT = "mtls-agent-identity"
METADATA_VERSION = 1
#: Written instead of 1 when an identity has caller rules, so that an agent too
#: old to know them refuses the identity rather than serve it to every caller.
CALLERS_METADATA_VERSION = 2
#: The metadata of a key sealed for an EST enrollment whose certificate has not
#: arrived yet (agent.enroll); it is not an identity and is never routed.
PENDING_FORMAT = "mtls-agent-pending-enrollment"

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# --- host patterns ---------------------------------------------------------

# One DNS label after IDNA encoding. Underscores are allowed because internal
# names carry them and TLS libraries match them; hyphens not at the ends.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A host (or ``*.`` wildcard over one label) and an optional port.

    ``host`` is always canonical: lowercase ASCII (IDNA), no trailing dot,
    IPv6 without brackets, so that matching is plain string comparison.
    """

    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse what a user typed after ``--host``; refuse anything ambiguous."""
        if not text:
            raise IdentityError("a host pattern cannot be empty")
        if any(ch.isspace() for ch in text):
            raise IdentityError(f"host pattern {text!r} contains white space")
        if "@" in text:
            raise IdentityError(
                f"host pattern {text!r} contains user info ('@'); give only the host"
            )
        if any(ch in text for ch in "/?#"):
            raise IdentityError(
                f"host pattern {text!r} looks like a URL; give only the host and an"
                " optional port, like api.example.com:8443"
            )
        host_text, port = _split_port(text)
        if host_text.startswith("[") or ":" in host_text:
            return cls(_ipv6(text, host_text.removeprefix("[").removesuffix("]")), port)
        return cls(_host_name(text, host_text), port)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def matches(self, host: str, port: int) -> bool:
        """Whether a request for ``host:port`` may get this identity.

        ``host`` must already be canonical (lowercase, no trailing dot, IPv6
        without brackets). A wildcard covers exactly one extra leftmost
        label, as in TLS certificates: ``*.example.com`` matches
        ``api.example.com`` but neither ``example.com`` nor ``a.b.example.com``.
        """
        if self.port is not None and self.port != port:
            return False
        if not self.wildcard:
            return host == self.host
        first, dot, rest = host.partition(".")
        return bool(first and dot) and rest == self.host[2:]

    @property
    def specificity(self) -> tuple[int, int, int]:
        """Sort key among patterns that match one host: higher wins.

        Exact beats wildcard, more labels beat fewer, a port beats none.
        """
        labels = 1 if ":" in self.host else self.host.count(".") + 1
        return (0 if self.wildcard else 1, labels, 0 if self.port is None else 1)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def _split_port(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]``; a bracket-free IPv6 literal has no port."""
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise IdentityError(f"host pattern {text!r} has a malformed [IPv6] address")
        return host + "]", (_port(text, rest[1:]) if rest else None)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(text, port)
    return text, None


def _port(text: str, port: str) -> int:
    if _PORT.fullmatch(port) and 1 <= int(port) <= 65535:
        return int(port)
    raise IdentityError(f"the port in host pattern {text!r} must be a number from 1 to 65535")


def _ipv6(text: str, literal: str) -> str:
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError:
        raise IdentityError(f"host pattern {text!r} is not a valid IPv6 address") from None
    if address.scope_id:
        raise IdentityError(f"host pattern {text!r} has an IPv6 zone, which cannot be matched")
    return address.compressed


def _host_name(text: str, host: str) -> str:
    """Canonicalise a DNS name or IPv4 literal, with at most a leading ``*.``."""
    name = host.lower().removesuffix(".")
    if not name:
        raise IdentityError(f"host pattern {text!r} has no host")
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    wildcard = name.startswith("*.")
    rest = name[2:] if wildcard else name
    if "*" in rest:
        raise IdentityError(
            f"in host pattern {text!r} a wildcard may only be the whole leftmost label,"
            " like *.example.com"
        )
    if not rest.isascii():
        try:
            rest = rest.encode("idna").decode("ascii")
        except UnicodeError:
            raise IdentityError(
                f"host pattern {text!r} is not a valid internationalised host name"
            ) from None
    labels = rest.split(".")
    if len(rest) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise IdentityError(f"host pattern {text!r} is not a valid host name")
    if labels[-1].isdigit():
        raise IdentityError(f"host pattern {text!r} is neither an IP address nor a host name")
    if wildcard and len(labels) < 2:
        raise IdentityError(
            f"host pattern {text!r} is too broad: a wildcard must stand over at least"
            " two labels, like *.example.com"
        )
    return f"*.{rest}" if wildcard else rest


# --- pins ------------------------------------------------------------------


def check_pin(text: str) -> str:
    """Canonicalise an SPKI pin to curl's ``sha256//BASE64`` spelling.

    curl's ``--pinnedpubkey`` writes two slashes; people also write one.
    Both are accepted so that a pin can be pasted from either habit. "/" is
    a base64 letter, so ``sha256//X…`` may also be the short spelling of a
    digest that starts with "/": the length of a SHA-256 in base64 (44)
    tells the two apart.
    """
    prefix, sep, encoded = text.partition("/")
    readings = [encoded.removeprefix("/"), encoded] if encoded.startswith("/") else [encoded]
    for reading in readings if prefix == "sha256" and sep else ():
        try:
            digest = base64.b64decode(reading, validate=True)
        except ValueError:
            continue
        if len(digest) == 32:
            return _format_pin(digest)
    raise IdentityError(
        f"pin {text!r} is not a SHA-256 public key pin like sha256//BASE64"
        " (44 base64 characters)"
    )


def spki_pin(cert_der: bytes) -> str:
    """The pin of a DER certificate, over its SubjectPublicKeyInfo as encoded.

    The bytes are taken from the certificate as they are, not re-encoded
    from a parsed key: that is what curl and OpenSSL hash, it works for key
    types cryptography cannot load, and it costs microseconds per upstream
    connection.
    """
    return _format_pin(hashlib.sha256(_spki_der(cert_der)).digest())


def _format_pin(digest: bytes) -> str:
    return "sha256//" + base64.b64encode(digest).decode("ascii")


class _DerError(ValueError):
    """The bytes are not the DER structure expected."""


def _der_header(data: bytes, pos: int) -> tuple[int, int, int | None]:
    """Read one tag and length at ``pos``: (tag, content start, end or None).

    ``None`` is BER's indefinite length, which only the PKCS#12 framing
    check tolerates (old Java and Windows exports use it).
    """
    if pos + 2 > len(data) or data[pos] & 0x1F == 0x1F:
        raise _DerError("truncated or unsupported tag")
    tag, first, pos = data[pos], data[pos + 1], pos + 2
    if first == 0x80:
        return tag, pos, None
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count > 4 or pos + count > len(data):
            raise _DerError("bad length")
        length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
    if pos + length > len(data):
        raise _DerError("content runs past the end")
    return tag, pos, pos + length


def _der_child(data: bytes, pos: int) -> tuple[int, int, int]:
    tag, start, end = _der_header(data, pos)
    if end is None:
        raise _DerError("indefinite length in DER")
    return tag, start, end


def _spki_der(cert_der: bytes) -> bytes:
    """Slice the SubjectPublicKeyInfo out of a certificate (RFC 5280 4.1)."""
    try:
        _, pos, _ = _der_child(cert_der, 0)  # Certificate
        _, pos, _ = _der_child(cert_der, pos)  # tbsCertificate
        tag, _, end = _der_child(cert_der, pos)
        if tag == 0xA0:  # [0] version, absent in v1 certificates
            pos = end
        for _ in range(5):  # serial, signature, issuer, validity, subject
            _, _, pos = _der_child(cert_der, pos)
        tag, _, end = _der_child(cert_der, pos)
    except _DerError:
        tag = 0
    if tag != 0x30:
        raise IdentityError("the certificate is not valid DER")
    return cert_der[pos:end]


# --- certificates, keys and PKCS#12 ---------------------------------------


def _public_der(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_fits(key: PrivateKey | PublicKey, cert: x509.Certificate) -> bool:
    public = key.public_key() if isinstance(key, PrivateKey) else key
    try:
        return _public_der(public) == _public_der(cert.public_key())
    except (UnsupportedAlgorithm, ValueError):
        return False


def check_key_matches(key: PrivateKey | PublicKey, cert: x509.Certificate) -> None:
    """Refuse a key that is not the certificate's: TLS would fail much later."""
    if not _key_fits(key, cert):
        raise IdentityError("the private key does not match the certificate")


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates of a PEM bundle; text around the blocks is ignored."""
    try:
        return x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion):
        raise IdentityError(
            "no readable PEM certificate found (expected -----BEGIN CERTIFICATE-----)"
        ) from None


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert`` (names and signature; no dates, no trust)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def order_chain(
    key: PrivateKey | PublicKey, certs: Iterable[x509.Certificate]
) -> list[x509.Certificate]:
    """Order a bag of certificates as a chain: leaf first, then its issuers.

    PKCS#12 and PKCS#7 (EST) give certificates in no defined order. The
    leaf is the certificate of ``key`` (the one valid longest if a renewal
    kept the key); each next one is the certificate that signed the previous.
    Certificates that are not part of that chain are dropped. ``key`` may be
    the public half alone: a resumed EST enrollment has only its CSR at hand.
    """
    rest = list(dict.fromkeys(certs))
    own = [cert for cert in rest if _key_fits(key, cert)]
    if not own:
        raise IdentityError("the private key matches none of the certificates")
    chain = [max(own, key=lambda cert: cert.not_valid_after_utc)]
    rest.remove(chain[0])
    while chain[-1].issuer != chain[-1].subject:
        issuer = next((cert for cert in rest if issued_by(chain[-1], cert)), None)
        if issuer is None:
            break
        chain.append(issuer)
        rest.remove(issuer)
    return chain


def _looks_like_pfx(data: bytes) -> bool:
    """Whether ``data`` is framed as a PFX: one SEQUENCE, filling the data,
    that starts with version 3. A truncated or foreign file fails this."""
    try:
        tag, start, end = _der_header(data, 0)
        if tag != 0x30 or end not in (None, len(data)):
            return False
        tag, start, end = _der_child(data, start)
    except _DerError:
        return False
    return tag == 0x02 and data[start:end] == b"\x03"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_pkcs12(data: bytes, password: bytes | None) -> tuple[PrivateKey, list[x509.Certificate]]:
    """The key and ordered chain (leaf first) of a PKCS#12 file.

    Legacy (RC2-40/3DES) and modern (AES/PBKDF2) files both load.
    cryptography raises the same ``ValueError`` for a wrong password and a
    damaged file; the two are told apart by checking the outer structure
    ourselves (a readable PFX that will not open means the password failed
    its MAC) and by cryptography's parse-stage wording.
    """
    if password is not None and (b"\0" in password or not _is_utf8(password)):
        # cryptography panics on a NUL and raises TypeError on other bytes
        raise IdentityError("the PKCS#12 password must be UTF-8 text without NUL bytes")
    try:
        bundle = pkcs12.load_pkcs12(data, password)
    except ValueError as exc:
        if not _looks_like_pfx(data) or "deserialize" in str(exc):
            raise IdentityError("not a readable PKCS#12 file (truncated or corrupt)") from None
        raise IdentityError("the PKCS#12 password is wrong") from None
    except UnsupportedAlgorithm:
        raise IdentityError("the PKCS#12 file uses an unsupported algorithm") from None
    key = bundle.key
    if key is None:
        raise IdentityError("the PKCS#12 file holds no private key")
    if not isinstance(key, PrivateKey):
        raise IdentityError(
            f"the PKCS#12 private key ({type(key).__name__}) cannot be used for TLS;"
            " use RSA, ECDSA, Ed25519 or Ed448"
        )
    certs = [c.certificate for c in (bundle.cert, *bundle.additional_certs) if c is not None]
    if not certs:
        raise IdentityError("the PKCS#12 file holds no certificate")
    return key, order_chain(key, certs)


# --- identities ------------------------------------------------------------


def _default_source() -> Mapping[str, Any]:
    return {"kind": "import"}


@dataclass(frozen=True)
class Identity:
    """Everything about an identity except its private key.

    Construction checks the invariants every consumer relies on (a leaf, a
    host, canonical pins, a known TLS version, a JSON-safe source), so an
    ``Identity`` that exists is usable. Derived certificate facts are
    ``cached_property``s: they live in the instance ``__dict__``, which a
    frozen dataclass without slots leaves writable for exactly this.
    """

    name: str
    chain: tuple[x509.Certificate, ...]
    hosts: tuple[HostPattern, ...]
    ca_pem: bytes | None = None
    pins: tuple[str, ...] = ()
    min_tls: str = "1.2"
    source: Mapping[str, Any] = field(default_factory=_default_source, hash=False)
    created: str = ""
    #: Which local processes may use it (agent.policy); none: any the socket admits.
    callers: CallerRules = NO_RULES

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise IdentityError("an identity needs a name")
        chain, hosts = tuple(self.chain), tuple(self.hosts)
        if not chain or not all(isinstance(c, x509.Certificate) for c in chain):
            raise IdentityError(f"identity {self.name!r} needs a certificate chain, leaf first")
        if not hosts or not all(isinstance(h, HostPattern) for h in hosts):
            raise IdentityError(f"identity {self.name!r} needs at least one host pattern")
        if self.min_tls not in _TLS_VERSIONS:
            raise IdentityError(
                f"identity {self.name!r}: the minimum TLS version must be 1.2 or 1.3,"
                f" not {self.min_tls!r}"
            )
        if not isinstance(self.created, str):
            raise IdentityError(f"identity {self.name!r}: 'created' must be an ISO-8601 string")
        if not isinstance(self.callers, CallerRules):
            raise IdentityError(f"identity {self.name!r}: 'callers' must be CallerRules")
        # Frozen: normalise through object.__setattr__, once, before anyone sees it.
        assign = functools.partial(object.__setattr__, self)
        assign("chain", chain)
        assign("hosts", hosts)
        assign("pins", tuple(dict.fromkeys(check_pin(pin) for pin in self.pins)))
        assign("ca_pem", None if self.ca_pem is None else _canonical_ca(self.name, self.ca_pem))
        assign("source", _frozen_source(self.name, self.source))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @functools.cached_property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()

    @functools.cached_property
    def issuer(self) -> str:
        return self.leaf.issuer.rfc4514_string()

    @functools.cached_property
    def serial(self) -> str:
        """Uppercase hex with an even number of digits, as openssl prints it."""
        digits = f"{self.leaf.serial_number:X}"
        return digits.zfill(len(digits) + len(digits) % 2)

    @functools.cached_property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @functools.cached_property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf, spelt like ``openssl x509 -fingerprint``."""
        return self.leaf.fingerprint(hashes.SHA256()).hex(":").upper()

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) > self.not_after

    def to_metadata(self) -> dict[str, Any]:
        """The JSON-safe form the vault stores beside the sealed key."""
        metadata = {
            "format": METADATA_FORMAT,
            "version": CALLERS_METADATA_VERSION if self.callers else METADATA_VERSION,
            "chain": [_pem(cert) for cert in self.chain],
            "hosts": [str(host) for host in self.hosts],
            "ca_pem": None if self.ca_pem is None else self.ca_pem.decode("ascii"),
            "pins": list(self.pins),
            "min_tls": self.min_tls,
            "source": copy.deepcopy(dict(self.source)),
            "created": self.created,
        }
        if self.callers:
            metadata["callers"] = self.callers.to_metadata()
        return metadata

    @classmethod
    def from_metadata(cls, name: str, data: Any) -> Identity:
        """Rebuild an identity from disk; refuse anything malformed.

        Unknown keys are ignored so that a later writer may add optional
        fields without a version bump; unknown versions are refused. A field
        that restricts use (caller rules) comes with a version instead, so a
        reader that does not know it refuses the identity, never ignores it.
        """
        if isinstance(data, dict) and data.get("format") == PENDING_FORMAT:
            raise IdentityError(
                f"identity {name!r} is waiting for its EST enrollment to finish (no"
                f" certificate yet); run the same 'agentctl enroll {name} --est ...' again"
                f" to resume it, or 'agentctl remove {name}'"
            )
        if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
            raise IdentityError(f"identity {name!r}: not mtls-agent identity metadata")
        versions = (METADATA_VERSION, CALLERS_METADATA_VERSION)
        if type(data.get("version")) is not int or data["version"] not in versions:
            raise IdentityError(
                f"identity {name!r}: metadata version {data.get('version')!r} is not"
                f" supported (this agent reads versions {' and '.join(map(str, versions))})"
            )
        callers = NO_RULES
        if data["version"] == CALLERS_METADATA_VERSION:
            callers = CallerRules.from_metadata(name, _field(name, data, "callers", dict))
        elif "callers" in data:  # rules under a version that says there are none: refuse
            raise IdentityError(
                f"identity {name!r}: caller rules need metadata version"
                f" {CALLERS_METADATA_VERSION}, not {data['version']}"
            )
        ca_pem = _field(name, data, "ca_pem", (str, type(None)))
        return cls(
            name=name,
            chain=tuple(_one_certificate(name, pem) for pem in _str_list(name, data, "chain")),
            hosts=tuple(HostPattern.parse(host) for host in _str_list(name, data, "hosts")),
            ca_pem=None if ca_pem is None else ca_pem.encode("utf-8", "replace"),
            pins=tuple(_str_list(name, data, "pins")),
            min_tls=_field(name, data, "min_tls", str),
            source=_field(name, data, "source", dict),
            created=_field(name, data, "created", str),
            callers=callers,
        )

    def summary(self) -> dict[str, Any]:
        """What ``agentctl list --json`` shows: facts, never key material."""
        return {
            "name": self.name,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "hosts": [str(host) for host in self.hosts],
            "fingerprint_sha256": self.fingerprint,
            "pins": list(self.pins),
            "min_tls": self.min_tls,
            "source": self.source["kind"],
            "ca": "system" if self.ca_pem is None else "custom",
            **({"callers": self.callers.to_metadata()} if self.callers else {}),
        }


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _canonical_ca(name: str, ca_pem: bytes) -> bytes:
    """Re-encode a CA bundle as bare PEM blocks.

    Bundles often carry UTF-8 comments, which ``ssl``'s ``cadata`` refuses;
    the certificates alone are what trust needs.
    """
    if not isinstance(ca_pem, bytes):
        raise IdentityError(f"identity {name!r}: the CA bundle must be PEM bytes")
    try:
        certs = load_pem_certificates(ca_pem)
    except IdentityError:
        raise IdentityError(
            f"identity {name!r}: the CA bundle holds no readable PEM certificate"
        ) from None
    return "".join(_pem(cert) for cert in certs).encode("ascii")


def _frozen_source(name: str, source: Any) -> Mapping[str, Any]:
    """A read-only deep copy, proven JSON-safe, with a string ``kind``."""
    try:
        plain = json.loads(json.dumps(dict(source), allow_nan=False))
    except (TypeError, ValueError):
        raise IdentityError(f"identity {name!r}: the source must be a JSON object") from None
    if not isinstance(plain.get("kind"), str):
        raise IdentityError(f"identity {name!r}: the source needs a 'kind' string")
    return MappingProxyType(plain)


def _field(name: str, data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data or not isinstance(data[key], kind):
        raise IdentityError(f"identity {name!r}: metadata field {key!r} is missing or malformed")
    return data[key]


def _str_list(name: str, data: dict[str, Any], key: str) -> list[str]:
    value = _field(name, data, key, list)
    if not all(isinstance(item, str) for item in value):
        raise IdentityError(f"identity {name!r}: metadata field {key!r} must list strings")
    return value


def _one_certificate(name: str, pem: str) -> x509.Certificate:
    certs = load_pem_certificates(pem.encode("utf-8", "replace"))
    if len(certs) != 1:
        raise IdentityError(f"identity {name!r}: each chain entry must be one PEM certificate")
    return certs[0]


def new_identity(
    name: str,
    key: PrivateKey,
    chain: Sequence[x509.Certificate],
    hosts: Iterable[str],
    *,
    ca_pem: bytes | None = None,
    pins: Iterable[str] = (),
    min_tls: str = "1.2",
    source: Mapping[str, Any] | None = None,
    callers: CallerRules = NO_RULES,
) -> Identity:
    """A new identity from its parts, checked as a whole; stamped with now."""
    if isinstance(hosts, str):
        raise TypeError("hosts must be a list of patterns, not one string")
    if not chain:
        raise IdentityError(f"identity {name!r} needs a certificate chain, leaf first")
    check_key_matches(key, chain[0])
    return Identity(
        name=name,
        chain=tuple(chain),
        hosts=tuple(dict.fromkeys(HostPattern.parse(host) for host in hosts)),
        ca_pem=ca_pem,
        pins=tuple(pins),
        min_tls=min_tls,
        source=_default_source() if source is None else source,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        callers=callers,
    )


# --- the TLS context -------------------------------------------------------

_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)


def build_ssl_context(identity: Identity, key: PrivateKey, scratch_dir: Path) -> ssl.SSLContext:
    """A client context that presents ``identity`` and verifies the upstream.

    The context ends up holding the only usable copy of the key. Python's
    ``ssl`` loads keys only from files, so the key goes through a file, but
    only encrypted under a one-time password that never leaves memory.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = _TLS_VERSIONS[identity.min_tls]
    # Servers that want the certificate only on some paths ask after the
    # handshake (TLS 1.3 post-handshake authentication).
    context.post_handshake_auth = True
    context.set_alpn_protocols(["http/1.1"])
    try:
        if identity.ca_pem is None:
            _load_system_trust(context)
        else:
            context.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    except ssl.SSLError as exc:
        raise IdentityError(
            f"identity {identity.name!r}: the trusted CA certificates could not be loaded ({exc})"
        ) from None
    _load_client_chain(context, identity, key, scratch_dir)
    return context


def _load_system_trust(context: ssl.SSLContext) -> None:
    """Trust the system store, cheaply when that changes nothing.

    ``load_default_certs`` parses the whole bundle file up front (16 ms for
    144 certificates with OpenSSL 3.0: 1,000 identities would take 16 s to
    unlock), then adds the hashed folder, which OpenSSL reads lazily per
    handshake. When that folder already holds every certificate of the
    bundle (as ``update-ca-certificates`` leaves it on Debian and its kin),
    loading the folder alone trusts exactly the same set. Fails closed: the
    folder alone is never more than the default, so a wrong answer can only
    refuse an upstream, never trust one.
    """
    paths = ssl.get_default_verify_paths()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    if paths.capath and _folder_covers_bundle(paths.cafile, paths.capath):
        context.load_verify_locations(capath=paths.capath)
    else:
        context.load_default_certs()


def _folder_covers_bundle(cafile: str | None, capath: str) -> bool:
    try:
        stamp = (os.stat(cafile).st_mtime_ns if cafile else 0, os.stat(capath).st_mtime_ns)
    except OSError:
        return False
    return _folder_covers_bundle_at(cafile, capath, stamp)


@functools.lru_cache(maxsize=4)
def _folder_covers_bundle_at(cafile: str | None, capath: str, _stamp: tuple[int, int]) -> bool:
    """Compare the two by content, once per change of either (``_stamp``)."""
    in_folder: set[bytes] = set()
    try:
        with os.scandir(capath) as entries:
            for entry in entries:
                if _HASHED_NAME.fullmatch(entry.name):
                    in_folder |= _pem_certificates_der(Path(entry.path).read_bytes())
        in_bundle = _pem_certificates_der(Path(cafile).read_bytes()) if cafile else set()
    except (OSError, ValueError):
        return False
    return bool(in_folder) and in_bundle <= in_folder


def _pem_certificates_der(data: bytes) -> set[bytes]:
    """The DER of each PEM certificate block, decoded but not parsed: a
    comparison needs no parsing, and OpenSSL judges the certificates later.
    TRUSTED CERTIFICATE blocks carry trust settings, so they void it."""
    if b"TRUSTED CERTIFICATE" in data:
        raise ValueError("OpenSSL trust settings")
    return {base64.b64decode(body) for body in _PEM_CERTIFICATE.findall(data)}


def _load_client_chain(
    context: ssl.SSLContext, identity: Identity, key: PrivateKey, scratch_dir: Path
) -> None:
    # The one-time password is 32 random bytes, so the KDF of the standard
    # recipe (PBKDF2, 2,048 rounds) adds no strength; it costs about 0.7 ms a
    # key (encrypting plus OpenSSL decrypting), half of the build, which is
    # cheap enough. cryptography offers no rounds knob for PKCS#8 to lower it.
    password = secrets.token_bytes(32)
    encrypted_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    pem = "".join(_pem(cert) for cert in identity.chain).encode("ascii") + encrypted_key
    try:
        fd = _memfd()
        if fd is not None:
            try:
                _write_all(fd, pem)
                context.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
            finally:
                os.close(fd)
        else:
            _load_via_scratch_file(context, pem, password, scratch_dir)
    except ssl.SSLError as exc:
        raise IdentityError(
            f"identity {identity.name!r}: the certificate chain and key could not be loaded ({exc})"
        ) from None


def _memfd() -> int | None:
    """An anonymous in-memory file readable by path, or None off Linux."""
    create = getattr(os, "memfd_create", None)
    if create is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        fd: int = create("mtls-agent-key", os.MFD_CLOEXEC)
    except OSError:  # ENOSYS on old kernels, EPERM under some seccomp filters
        return None
    return fd


def _load_via_scratch_file(
    context: ssl.SSLContext, pem: bytes, password: bytes, scratch_dir: Path
) -> None:
    """Load through a fresh 0600 file in the private folder, removed at once."""
    path = scratch_dir / f".key-{secrets.token_hex(16)}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(fd, pem)
        finally:
            os.close(fd)
        context.load_cert_chain(path, password=password)
    finally:
        path.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
