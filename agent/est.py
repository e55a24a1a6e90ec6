"""An EST client (RFC 7030) that tolerates what RFC 8951 says servers send.

The better way to get an identity: the key is made here, only a PKCS#10
certificate request travels, and the server answers with certificates.
This module speaks the protocol and checks the answer; it stores nothing
(``agent.enroll`` does). What it covers:

- ``/cacerts``: the CA certificates, a PKCS#7 certs-only bag;
- ``/simpleenroll`` (a first certificate, authenticated by HTTP Basic or a
  bearer token) and ``/simplereenroll`` (a renewal, authenticated by the
  current certificate over mTLS), with ``202 Accepted`` + ``Retry-After``
  answered by asking again with the same request, within a time bound;
- RFC 8951: bodies are base64 whatever ``Content-Transfer-Encoding`` says,
  with any white space; plain DER and PEM armour are accepted as well;
- the answer's certificates come in no order: the leaf is found by our
  public key, and must be for the subject we asked, valid now, and issued
  under a CA the server publishes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import ipaddress
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from agent.errors import EnrollmentError, EnrollmentPending, IdentityError
from agent.identity import PrivateKey, PublicKey, issued_by, order_chain
from agent.webclient import Answer, display_url, request

DEFAULT_KEY_TYPE = "ec-p256"
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
#: Used when a 202 answer names no Retry-After (RFC 7030 says it must).
DEFAULT_RETRY_AFTER = 10.0
#: How far in the future a new certificate's notBefore may be (clock skew).
CLOCK_SKEW = timedelta(minutes=5)

_LABEL = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_SAN_KINDS = ("DNS", "IP", "URI", "EMAIL")

Progress = Callable[[str], None]


# --- keys and requests ---------------------------------------------------------


def generate_key(key_type: str) -> PrivateKey:
    """A fresh private key of one of ``KEY_TYPES``; it never leaves this process."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise EnrollmentError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def key_type_of(key: PublicKey) -> str:
    """The ``KEY_TYPES`` name of a certificate's key, else the default.

    A renewal keeps the kind of key the identity had.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp384r1": "ec-p384"}.get(key.curve.name, DEFAULT_KEY_TYPE)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 3072:
        return "rsa-3072"
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa-2048"
    return DEFAULT_KEY_TYPE


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 distinguished name as a user types it (``CN=host,O=Example``)."""
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        name = None
    if name is None or not len(name):
        raise EnrollmentError(
            f"the subject {text!r} is not a distinguished name like CN=host.example.com,O=Example"
        )
    return name


def parse_san(text: str) -> x509.GeneralName:
    """``DNS:name``, ``IP:address``, ``URI:uri`` or ``EMAIL:address``."""
    kind, sep, value = text.partition(":")
    kind = kind.upper()
    if not sep or not value or kind not in _SAN_KINDS:
        raise EnrollmentError(
            f"the subject alternative name {text!r} must look like DNS:host.example.com,"
            " IP:192.0.2.1, URI:spiffe://example.org/app or EMAIL:me@example.com"
        )
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    if kind == "EMAIL":
        return x509.RFC822Name(value)
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        raise EnrollmentError(f"{value!r} in {text!r} is not an IP address") from None


def build_csr(key: PrivateKey, subject: x509.Name, sans: Sequence[x509.GeneralName] = ()) -> bytes:
    """A PKCS#10 request (DER) for ``key``'s public half, signed by ``key``."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    digest = (
        hashes.SHA384()
        if isinstance(key, ec.EllipticCurvePrivateKey) and (key.curve.key_size >= 384)
        else hashes.SHA256()
    )
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """A CSR we made earlier (a pending enrollment's); refuses anything else."""
    try:
        csr = x509.load_der_x509_csr(der)
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise EnrollmentError("the stored certificate request is damaged")
    return csr


def renewal_request(key: PrivateKey, current: x509.Certificate) -> bytes:
    """The CSR for a renewal: RFC 7030 4.2.2 wants the subject and subject
    alternative names of the certificate being renewed, unchanged."""
    try:
        sans = list(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    return build_csr(key, current.subject, sans)


# --- encoding (RFC 8951) -------------------------------------------------------


def decode_body(body: bytes) -> bytes:
    """The DER inside an EST body: base64 with any white space, PEM, or plain DER."""
    text = body.strip()
    if text.startswith(b"-----BEGIN"):
        text = b"".join(line for line in text.splitlines() if not line.startswith(b"-----"))
    try:
        der = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if der.startswith(b"\x30"):
        return der
    if body.startswith(b"\x30"):
        return body
    raise EnrollmentError("the EST server's answer is neither base64 nor DER")


def parse_certs_only(body: bytes) -> list[x509.Certificate]:
    """The certificates of a PKCS#7 certs-only answer, in the order given."""
    der = decode_body(body)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion):
        raise EnrollmentError(
            "the EST server's answer is not a readable PKCS#7 certificate bag"
        ) from None
    if not certs:
        raise EnrollmentError("the EST server's answer holds no certificate")
    return certs


def encode_request(csr_der: bytes) -> bytes:
    return base64.encodebytes(csr_der)


# --- the server ----------------------------------------------------------------


def est_url(url: str, label: str | None = None) -> str:
    """The EST base URL: ``/.well-known/est`` added to a bare host, then the label."""
    if "?" in url or "#" in url:
        raise EnrollmentError("the EST URL must not carry a query or a fragment")
    base = url.rstrip("/")
    if not base.split("://", 1)[-1].partition("/")[2]:
        base += "/.well-known/est"
    if label:
        if not _LABEL.fullmatch(label):
            raise EnrollmentError(f"the EST label {label!r} must be one URL path segment")
        base += "/" + label
    return base


def basic_authorization(username: str, password: bytes) -> str:
    """An ``Authorization`` value for HTTP Basic (RFC 7617, UTF-8)."""
    if ":" in username:
        raise EnrollmentError("an HTTP Basic user name cannot contain ':'")
    return "Basic " + base64.b64encode(username.encode("utf-8") + b":" + password).decode()


def bearer_authorization(token: bytes) -> str:
    """An ``Authorization`` value carrying ``token``; refuses bytes a header cannot hold."""
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not text or not text.isprintable() or any(ch.isspace() for ch in text):
        raise EnrollmentError("the token must be one line of printable ASCII without spaces")
    return "Bearer " + text


@dataclass(frozen=True)
class EstServer:
    """One EST server (base URL, with its label) and how we reach it.

    ``context`` decides the trust and, for a renewal, presents the current
    identity. ``authorization`` is a header value; it is a secret, so it is
    never part of the repr.
    """

    url: str
    context: ssl.SSLContext
    authorization: str | None = None

    def __repr__(self) -> str:
        return f"EstServer({display_url(self.url)!r})"

    async def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates the server publishes."""
        answer = await request("GET", f"{self.url}/cacerts", self.context)
        if answer.status != 200:
            raise self._refusal(answer, "/cacerts")
        return parse_certs_only(answer.body)

    async def enroll(
        self,
        csr_der: bytes,
        *,
        renew: bool = False,
        wait: float = 0.0,
        progress: Progress | None = None,
    ) -> list[x509.Certificate]:
        """Send ``csr_der`` to simpleenroll (or simplereenroll) and return the
        certificates, asking again with the same request while the server
        answers 202, for up to ``wait`` seconds in all."""
        operation = "/simplereenroll" if renew else "/simpleenroll"
        headers = {
            "Content-Type": "application/pkcs10",
            "Content-Transfer-Encoding": "base64",
            "Accept": "application/pkcs7-mime",
        }
        if self.authorization is not None:
            headers["Authorization"] = self.authorization
        body = encode_request(csr_der)
        deadline = time.monotonic() + wait
        asked = 0
        while True:
            asked += 1
            answer = await request("POST", self.url + operation, self.context,
                                   headers=headers, body=body)  # fmt: skip
            if answer.status == 200:
                return parse_certs_only(answer.body)
            if answer.status != 202:
                raise self._refusal(answer, operation)
            delay = retry_after(answer)
            left = deadline - time.monotonic()
            if delay > left:
                raise EnrollmentPending(
                    f"the EST server has accepted the request but not issued the certificate"
                    f" yet (after {asked} tries; it asks to try again in {delay:g} s)",
                    delay,
                )
            if progress is not None:
                progress(
                    f"the EST server has accepted the request but not issued the certificate"
                    f" yet; asking again in {delay:g} s (try {asked}, waiting at most"
                    f" {max(left, 0):.0f} s more)"
                )
            await asyncio.sleep(delay)

    def _refusal(self, answer: Answer, operation: str) -> EnrollmentError:
        detail = answer.text_excerpt() if answer.content_type.startswith("text/") else ""
        said = f": {detail}" if detail else ""
        if answer.status == 401 and operation == "/simplereenroll":
            return EnrollmentError(
                f"the EST server refused the current certificate for renewal (HTTP 401{said})"
            )
        if answer.status == 401 and self.authorization is None:
            return EnrollmentError(
                f"the EST server asks for authentication (HTTP 401{said}); give --username"
                " and --password-file, or --token-file"
            )
        if answer.status == 401:
            return EnrollmentError(f"the EST server refused the credentials (HTTP 401{said})")
        if 300 <= answer.status < 400:
            where = answer.headers.get("Location", "elsewhere")
            return EnrollmentError(
                f"the EST server redirects {operation} to {display_url(where)}; give that"
                " URL instead (redirects are not followed)"
            )
        return EnrollmentError(
            f"the EST server answered {operation} with HTTP {answer.status}{said}"
        )


def retry_after(answer: Answer) -> float:
    """Seconds to wait from ``Retry-After``: a number, or an HTTP date."""
    value = answer.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return max(float(value), 1.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return DEFAULT_RETRY_AFTER
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 1.0)


# --- checking the answer ---------------------------------------------------------


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued_chain(
    public_key: PublicKey,
    subject: x509.Name,
    certs: Sequence[x509.Certificate],
    cacerts: Sequence[x509.Certificate],
    now: datetime | None = None,
) -> list[x509.Certificate]:
    """The chain (leaf first, no self-signed root) to store for ``public_key``.

    Refuses, each with its own sentence: no certificate for our key, a
    certificate for another subject, one not valid now, and one that does
    not chain to a CA the server publishes in ``/cacerts``.
    """
    try:
        chain = order_chain(public_key, [*certs, *cacerts])
    except IdentityError:
        if any(not _is_ca(cert) for cert in certs):
            raise EnrollmentError(
                "the certificate the EST server returned is for another public key than"
                " the one in our request"
            ) from None
        raise EnrollmentError(
            "the EST server's answer holds no certificate for our key (only CA certificates)"
        ) from None
    leaf = chain[0]
    if leaf.subject != subject:
        raise EnrollmentError(
            f"the EST server issued a certificate for {leaf.subject.rfc4514_string()!r},"
            f" not for the requested {subject.rfc4514_string()!r}"
        )
    now = now or datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        raise EnrollmentError("the EST server issued a certificate that has already expired")
    if leaf.not_valid_before_utc > now + CLOCK_SKEW:
        raise EnrollmentError(
            f"the EST server issued a certificate valid only from "
            f"{leaf.not_valid_before_utc.isoformat()}; check this machine's clock"
        )
    if not any(cert in cacerts or any(issued_by(cert, ca) for ca in cacerts) for cert in chain):
        raise EnrollmentError(
            "the certificate the EST server returned does not chain to any CA it"
            " publishes in /cacerts"
        )
    if len(chain) > 1 and chain[-1].subject == chain[-1].issuer:
        chain.pop()  # the root is the peer's business, not part of what we send
    return chain
