"""Upstreams that misbehave on purpose, in this process, on 127.0.0.1.

A real upstream (nginx) is too well-behaved to show what the agent does when
a peer dies mid-body, never speaks TLS or floods it with headers. These small
servers do exactly one bad thing each, on a free port, in a thread:

- ``silent_tcp()``: accepts TCP (the kernel does) and never says a word;
- ``closed_port()``: a port nobody listens on;
- ``FaultServer(behaviour, tls=...)``: completes a real TLS handshake (asking
  for the client certificate, like an mTLS service), reads one request head,
  records it, and hands the connection to ``behaviour``.

Behaviours are plain functions ``(conn, head) -> None`` built by the helpers
below (``respond``, ``reset_after``, ``header_flood``, ``stall``, ...). Each
connection runs in its own daemon thread; ``close()`` ends them all.

Server certificates for the certificate faults (expired, wrong name) come
from ``server_cert``, signed by the test PKI's root so that only the named
fault, not an unknown issuer, is what the agent trips over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from support.pki import CertKey, Pki, make_leaf, write_cert_key

#: How long a misbehaving server keeps a connection it stalls on (it is
#: closed earlier by ``close()``); longer than any timeout the tests set.
HOLD_SECONDS = 30.0
HEAD_END = b"\r\n\r\n"

Behaviour = Callable[[socket.socket, bytes], None]


# --- helpers for behaviours ----------------------------------------------------


def read_head(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    """Bytes up to and including the blank line that ends a request head (b"" on EOF)."""
    data = b""
    while HEAD_END not in data:
        piece = conn.recv(65536)
        if not piece:
            return b""
        data += piece
        if len(data) > limit:
            break
    return data


def hard_reset(conn: socket.socket) -> None:
    """Close with a TCP RST and no TLS close_notify: the peer sees the connection die."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        # an SSLSocket's close() would try to send close_notify first: close the fd itself
        sock = socket.socket(fileno=conn.detach()) if isinstance(conn, ssl.SSLSocket) else conn
        sock.close()


def respond(data: bytes, *, then: Literal["close", "keep", "reset"] = "close") -> Behaviour:
    """Send ``data`` as the answer, then close cleanly, keep the connection, or reset it."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        conn.sendall(data)
        if then == "reset":
            time.sleep(0.05)  # let the bytes leave before the RST overtakes them
            hard_reset(conn)
        elif then == "keep":
            _hold(conn)

    return behaviour


def reset_after(data: bytes) -> Behaviour:
    """Send ``data`` (a head and part of a body), then die with a reset."""
    return respond(data, then="reset")


def header_flood(total: int, *, line: bytes = b"X-Flood: " + b"a" * 1000 + b"\r\n") -> Behaviour:
    """A status line, then ``total`` bytes of header lines, never the blank line."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < total:
                conn.sendall(line * 64)
                sent += len(line) * 64
            _hold(conn)

    return behaviour


def drip(data: bytes, interval: float) -> Behaviour:
    """Send ``data`` one byte every ``interval`` seconds (a slow-loris upstream)."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            time.sleep(interval)
        _hold(conn)

    return behaviour


def stall() -> Behaviour:
    """Read the request and never answer."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        _hold(conn)

    return behaviour


def _hold(conn: socket.socket) -> None:
    """Keep the connection open, doing nothing, until the peer goes or time is up."""
    conn.settimeout(HOLD_SECONDS)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


# --- servers -------------------------------------------------------------------


@contextlib.contextmanager
def silent_tcp() -> Iterator[int]:
    """A port that accepts TCP connections (in the kernel's backlog) and never speaks."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield server.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_cert(pki: Pki, kind: Literal["expired", "wrong-name", "good"]) -> CertKey:
    """A server certificate for 127.0.0.1/localhost from the PKI's root, with one fault."""
    now = dt.datetime.now(dt.UTC)
    names: dict[str, tuple[str, ...]] = {
        "dns_names": ("localhost",),
        "ip_addresses": ("127.0.0.1", "::1"),
    }
    when: dict[str, dt.datetime] = {}
    if kind == "expired":
        when = {"not_before": now - dt.timedelta(days=30), "not_after": now - dt.timedelta(days=1)}
    elif kind == "wrong-name":
        names = {"dns_names": ("wrong.example",), "ip_addresses": ()}
    cert, key = make_leaf(pki.root, f"fault server ({kind})", usage="server", **names, **when)
    return write_cert_key(pki.dir, f"fault-server-{kind}", cert, key)


def tls_context(pki: Pki, cert: CertKey | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert`` and asking for a client certificate from the PKI."""
    cert = cert or pki.server
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.root_pem))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_cert_chain(str(cert.chain_path or cert.cert_path), str(cert.key_path))
    return context


@dataclass
class FaultServer:
    """One misbehaving TLS (or plain TCP) upstream on 127.0.0.1; see the module doc."""

    behaviour: Behaviour
    tls: ssl.SSLContext | None = None
    host: str = "127.0.0.1"
    #: Every request head received, in order (what reached this upstream).
    heads: list[bytes] = field(default_factory=list)
    #: Client certificates' subjects seen in handshakes (when TLS).
    peers: list[str] = field(default_factory=list)
    #: Connections accepted so far.
    connections: int = 0
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _conns: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    port: int = 0

    @property
    def host_header(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> FaultServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = socket.create_server((self.host, 0), family=family, backlog=128)
        self.port = self._server.getsockname()[1]
        self._server.settimeout(0.1)
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(5)
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(HOLD_SECONDS)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._conns.append(conn)
                peer = conn.getpeercert()
                if peer:
                    self.peers.append(_subject_cn(peer))
            head = read_head(conn)
            if not head:
                return
            with self._lock:
                self.heads.append(head)
            self.behaviour(conn, head)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def _subject_cn(peer: dict) -> str:
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


@contextlib.contextmanager
def fault_server(behaviour: Behaviour, tls: ssl.SSLContext | None) -> Iterator[FaultServer]:
    """A started ``FaultServer``, closed afterwards."""
    server = FaultServer(behaviour, tls).start()
    try:
        yield server
    finally:
        server.close()


def echo_client_cn() -> Behaviour:
    """Answer 200 with the client certificate's CN as the body, and keep the connection."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        while head:
            peer = conn.getpeercert() if isinstance(conn, ssl.SSLSocket) else None
            body = (_subject_cn(peer) if peer else "").encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            head = read_head(conn)

    return behaviour
