"""A test EST server (RFC 7030) with a real CA, that records every request.

It issues client certificates from the test PKI's intermediate CA (so the
test nginx, which trusts the root, accepts them) and publishes root and
intermediate at ``/cacerts``. Its answers are base64 with CRLF line breaks
and certificates in a deliberately unordered bag (the intermediate first),
as RFC 8951 servers may send them.

    server = EstServer(pki).start()
    server.url            # https://localhost:PORT/.well-known/est
    server.requests       # every request: method, path, headers, body, client certificate

What a test can set before or between requests:

- ``authorization``: the exact ``Authorization`` value simpleenroll demands
  (else 401 with a Basic challenge);
- ``pending``: how many (re)enroll requests to answer ``202`` with
  ``Retry-After: retry_after`` before issuing;
- ``answer``: ``"issue"`` (default), ``"malformed"`` (not PKCS#7),
  ``"no-leaf"`` (only the CA certificates), ``"foreign-key"`` (a leaf for
  another public key), ``"other-subject"`` (our key, another subject),
  ``"unavailable"`` (503 to every request, recorded all the same);
- ``lifetimes``: the lifetimes of the next certificates issued, in order
  (the last one repeats), and ``backdate``, how far in the past each starts;
- ``on_enroll``: called with the CSR (DER) when a (re)enroll request
  arrives, before it is answered (to look at the vault at that moment).

``simplereenroll`` requires a client certificate chaining to the test root
whose subject is the CSR's (RFC 7030 4.2.2), else 401 or 400.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.https_server import HttpsServer
from support.pki import Pki

Answer = Literal["issue", "malformed", "no-leaf", "foreign-key", "other-subject", "unavailable"]


@dataclass(frozen=True)
class Request:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    #: The client certificate presented in the TLS handshake, if any.
    client_cert: x509.Certificate | None


def _b64_lines(der: bytes) -> bytes:
    """Base64 in 64-character lines with CRLF, as many EST servers write it."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + 64] + b"\r\n" for i in range(0, len(text), 64))


def _certs_only(certs: list[x509.Certificate]) -> bytes:
    return _b64_lines(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


@dataclass
class EstServer:
    """The test EST server (see the module docstring)."""

    pki: Pki
    authorization: str | None = None
    pending: int = 0
    retry_after: str = "1"
    answer: Answer = "issue"
    lifetimes: list[dt.timedelta] = field(default_factory=lambda: [dt.timedelta(days=30)])
    backdate: dt.timedelta = dt.timedelta(seconds=1)
    on_enroll: Callable[[bytes], None] | None = None
    requests: list[Request] = field(default_factory=list)
    issued: list[x509.Certificate] = field(default_factory=list)
    _https: HttpsServer | None = field(default=None, repr=False)

    # --- life cycle ---

    def start(self) -> EstServer:
        if self._https is None:
            self._https = HttpsServer(
                self._app,
                self.pki.server.cert_path,
                self.pki.server.key_path,
                client_ca=self.pki.root_pem,
            )
        self._https.start()
        return self

    def stop(self) -> None:
        """Go down: connections are refused until ``start`` again (same port)."""
        if self._https is not None:
            self._https.stop()

    @property
    def url(self) -> str:
        assert self._https is not None, "start the server first"
        return f"{self._https.base_url}/.well-known/est"

    @property
    def cacerts(self) -> list[x509.Certificate]:
        return [self.pki.root.cert, self.pki.intermediate.cert]

    def bodies(self) -> list[bytes]:
        return [r.body for r in self.requests]

    def enroll_requests(self, operation: str = "simpleenroll") -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/" + operation)]

    # --- the application ---

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        for prefix in ("/.well-known/est", "/.well-known/est/{label}"):
            app.router.add_get(prefix + "/cacerts", self._get_cacerts)
            app.router.add_post(prefix + "/simpleenroll", self._simpleenroll)
            app.router.add_post(prefix + "/simplereenroll", self._simplereenroll)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        body = await request.read()
        self.requests.append(
            Request(request.method, request.path, dict(request.headers), body, _peer(request))
        )
        if self.answer == "unavailable":
            return web.Response(status=503, text="down for maintenance\n")
        return await handler(request)

    async def _get_cacerts(self, _: web.Request) -> web.Response:
        return self._pkcs7(list(reversed(self.cacerts)))

    async def _simpleenroll(self, request: web.Request) -> web.Response:
        if self.authorization is not None and (
            request.headers.get("Authorization") != self.authorization
        ):
            return web.Response(
                status=401,
                text="authentication required\n",
                headers={"WWW-Authenticate": 'Basic realm="est"'},
            )
        return await self._enroll(request, renewing=None)

    async def _simplereenroll(self, request: web.Request) -> web.Response:
        current = _peer(request)
        if current is None:
            return web.Response(status=401, text="a client certificate is required\n")
        return await self._enroll(request, renewing=current)

    async def _enroll(
        self, request: web.Request, renewing: x509.Certificate | None
    ) -> web.Response:
        try:
            der = base64.b64decode(b"".join((await request.read()).split()), validate=True)
            csr = x509.load_der_x509_csr(der)
            if not csr.is_signature_valid:
                raise ValueError("bad signature")
        except ValueError:
            return web.Response(status=400, text="not a PKCS#10 request\n")
        if renewing is not None and renewing.subject != csr.subject:
            return web.Response(status=400, text="the subject must stay the same\n")
        if self.on_enroll is not None:
            self.on_enroll(der)
        if self.pending > 0:
            self.pending -= 1
            return web.Response(status=202, headers={"Retry-After": self.retry_after})
        if self.answer == "malformed":
            return web.Response(body=b"MIIBnotpkcs7AAAA\r\n", content_type="application/pkcs7-mime")
        if self.answer == "no-leaf":
            return self._pkcs7(self.cacerts)
        public_key = csr.public_key()
        subject = csr.subject
        if self.answer == "foreign-key":
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif self.answer == "other-subject":
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "somebody else")])
        leaf = self.issue(subject, public_key, _sans(csr))
        return self._pkcs7([self.pki.intermediate.cert, leaf])

    def _pkcs7(self, certs: list[x509.Certificate]) -> web.Response:
        return web.Response(
            body=_certs_only(certs),
            headers={
                "Content-Type": "application/pkcs7-mime; smime-type=certs-only",
                "Content-Transfer-Encoding": "base64",
            },
        )

    # --- the CA ---

    def issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        sans: list[x509.GeneralName],
    ) -> x509.Certificate:
        """A client certificate from the intermediate, with the next lifetime."""
        lifetime = self.lifetimes[min(len(self.issued), len(self.lifetimes) - 1)]
        now = dt.datetime.now(dt.UTC)
        ca = self.pki.intermediate
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.backdate)
            .not_valid_after(now - self.backdate + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca.key, hashes.SHA256())
        self.issued.append(cert)
        return cert


def _peer(request: web.Request) -> x509.Certificate | None:
    """The client certificate of the request's TLS connection (verified by the handshake)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return x509.load_der_x509_certificate(der) if der else None


def _sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []
