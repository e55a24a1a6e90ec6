"""An upstream that asks for the client certificate only for some paths gets it.

DESIGN.md: "Servers that ask for the client certificate only for some paths
(TLS 1.3 post-handshake authentication) get it." nginx cannot ask after the
handshake, so the upstream here is a Python TLS server: it completes the
handshake without asking for a certificate, and for ``/secure`` only sends a
CertificateRequest, waits for the agent's answer, and says whose
certificate it got. The request goes through the real agent.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl

from support.fault_servers import FaultServer, tls_context
from support.pki import Pki

from faults.conftest import FaultAgent
from faults.probe import exchange, request

#: Longest the upstream waits for the agent's certificate after asking.
ANSWER_WITHIN = 5.0


def post_handshake_context(pki: Pki) -> ssl.SSLContext:
    context = tls_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.post_handshake_auth = True  # with a verify mode: ask only when told to
    return context


def await_certificate(conn: ssl.SSLSocket) -> dict | None:
    """Send the CertificateRequest, then read records until the client answered it.

    The client's Certificate, CertificateVerify and Finished come without
    application data, so reads end in SSLWantReadError; each one processes
    what arrived, and the socket is polled until the certificate is in.
    """
    conn.verify_client_post_handshake()
    conn.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()  # sends the CertificateRequest
    while not conn.getpeercert():
        readable, _, _ = select.select([conn], [], [], ANSWER_WITHIN)
        if not readable:
            return None
        try:
            conn.recv(1)
        except ssl.SSLWantReadError:
            continue
    conn.setblocking(True)
    return conn.getpeercert()


def ask_for_secure_paths_only(conn: socket.socket, head: bytes) -> None:
    tls: ssl.SSLSocket = conn  # type: ignore[assignment]
    before = tls.getpeercert()
    peer = await_certificate(tls) if head.startswith(b"GET /secure ") else before
    subject = "none"
    if peer:
        subject = dict(pair[0] for pair in peer["subject"])["commonName"]
    body = f"before={'yes' if before else 'no'} now={subject}".encode()
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_the_client_certificate_is_given_when_asked_after_the_handshake(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    with FaultServer(ask_for_secure_paths_only, post_handshake_context(pki)) as upstream:
        public = exchange(fault_agent.socket, request(upstream.host_header, "/public"))
        secure = exchange(fault_agent.socket, request(upstream.host_header, "/secure"))
    leaf = pki.client.cn
    assert public.response is not None and secure.response is not None
    assert (public.status, public.response.body) == (200, b"before=no now=none")
    assert (secure.status, secure.response.body) == (200, f"before=no now={leaf}".encode())
    assert upstream.peers == [], "the certificate was asked for during the handshake"
