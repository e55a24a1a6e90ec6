"""A test registration service: a PKCS#12 blob behind a bearer token.

What device-management and registration portals do today: ``GET`` a URL
with ``Authorization: Bearer TOKEN`` and receive the identity as PKCS#12.
The server records every request, so a test can prove what reached it
(above all, whether the token did), and counts TLS handshakes, so a test
can also prove that a client connected and still sent nothing.

    server = RegistrationServer(pki, blob, token="t0ken").start()
    server.url("/p12/device-7?once=abc")   # https://localhost:PORT/p12/device-7?once=abc
    server.requests, server.handshakes

``blob`` may be changed between requests (a truncated file, say). The
server presents ``cert`` (default: the test PKI's localhost certificate,
signed by the root).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from support.https_server import HttpsServer
from support.pki import CertKey, Pki


@dataclass(frozen=True)
class Request:
    method: str
    path_qs: str
    #: The Authorization header as received, or None when none arrived.
    authorization: str | None


@dataclass
class RegistrationServer:
    """The test registration service (see the module docstring)."""

    pki: Pki
    blob: bytes
    token: str
    cert: CertKey | None = None
    requests: list[Request] = field(default_factory=list)
    _https: HttpsServer | None = field(default=None, repr=False)

    def start(self) -> RegistrationServer:
        cert = self.cert or self.pki.server
        self._https = HttpsServer(self._app, cert.chain_path or cert.cert_path, cert.key_path)
        self._https.start()
        return self

    def stop(self) -> None:
        if self._https is not None:
            self._https.stop()

    @property
    def handshakes(self) -> int:
        return self._https.handshakes if self._https else 0

    def url(self, path: str) -> str:
        assert self._https is not None, "start the server first"
        return self._https.base_url + path

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/p12/{device}", self._get)
        return app

    async def _get(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        self.requests.append(Request(request.method, request.path_qs, authorization))
        if authorization != f"Bearer {self.token}":
            return web.Response(
                status=401, text="unknown token\n", headers={"WWW-Authenticate": "Bearer"}
            )
        return web.Response(body=self.blob, content_type="application/x-pkcs12")
