"""Head-size limits hold whatever way the bytes are split into reads.

The relay adds up a head's field sizes only when they could exceed the
limit. A head that spans reads must always be added up: llhttp holds a
field cut by the end of a read without reporting it, so the bytes seen
before the last read undercount the head. These tests feed the relay's
protocol objects directly, cutting the head inside a field, which a socket
cannot be made to do reliably.
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace
from typing import Any

import uvloop

from agent.config import Limits
from agent.forward import ProxyServer
from agent.forward.upstream import UpstreamConnection
from agent.keychain import LoadedIdentity

LIMIT = 1000
# 17 + 607 + 607 bytes of fields: over the limit only once the last field is counted
HEAD = (
    b"Host: localhost\r\n"
    + b"X-A: " + b"a" * 600 + b"\r\n"
    + b"X-B: " + b"b" * 600 + b"\r\n\r\n"
)  # fmt: skip
CUT = HEAD.index(b"X-B: ") + 300


class Transport:
    """Records what the relay writes; the socket only answers SO_PEERCRED."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.written = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        self.written += b"".join(parts)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    abort = close


class OneIdentity:
    """A keychain that routes every host to one loaded identity."""

    def __init__(self) -> None:
        self.loaded = LoadedIdentity(SimpleNamespace(name="split"), None)  # type: ignore[arg-type]
        self.locked = False

    def on_unload(self, listener: Any) -> None:
        pass

    def route(self, host: str, port: int, caller: Any = None) -> LoadedIdentity:
        return self.loaded


def answer_code(written: bytes) -> tuple[int, str | None]:
    head, _, body = written.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"] if status >= 400 else None


async def relay_with(limits: Limits) -> tuple[ProxyServer, Any, Transport, UpstreamConnection]:
    keychain = OneIdentity()
    server = ProxyServer(keychain, limits, frozenset({os.getuid()}))  # type: ignore[arg-type]
    ours, _theirs = socket.socketpair()
    client = server()
    client_transport = Transport(ours)
    client.connection_made(client_transport)
    upstream = UpstreamConnection((keychain.loaded, "localhost", 443))
    upstream.connection_made(Transport())  # type: ignore[arg-type]
    server.pool.put(upstream)
    return server, client, client_transport, upstream


def test_a_request_head_cut_inside_a_field_is_counted_whole() -> None:
    async def run() -> tuple[int, str | None]:
        server, client, transport, _ = await relay_with(Limits(header_bytes=LIMIT))
        request = b"GET / HTTP/1.1\r\n" + HEAD
        client.data_received(request[: len(b"GET / HTTP/1.1\r\n") + CUT])
        client.data_received(request[len(b"GET / HTTP/1.1\r\n") + CUT :])
        server.close()
        return answer_code(transport.written)

    assert uvloop.run(run()) == (431, "bad-request")


def test_a_response_head_cut_inside_a_field_is_counted_whole() -> None:
    async def run() -> tuple[int, str | None]:
        server, client, transport, upstream = await relay_with(Limits(upstream_head_bytes=LIMIT))
        client.data_received(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = b"HTTP/1.1 200 OK\r\n" + HEAD.replace(
            b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"
        )
        cut = len(b"HTTP/1.1 200 OK\r\n") + CUT
        upstream.data_received(response[:cut])
        upstream.data_received(response[cut:])
        server.close()
        return answer_code(transport.written)

    assert uvloop.run(run()) == (502, "upstream-bad-response")


def test_a_head_under_the_limit_in_pieces_still_goes_through() -> None:
    async def run() -> tuple[int, str | None]:
        server, client, transport, upstream = await relay_with(
            Limits(header_bytes=2 * LIMIT, upstream_head_bytes=2 * LIMIT)
        )
        request = b"GET / HTTP/1.1\r\n" + HEAD
        client.data_received(request[:100])
        client.data_received(request[100:])
        assert upstream.transport.written.startswith(b"GET / HTTP/1.1\r\n")  # type: ignore[union-attr]
        response = b"HTTP/1.1 200 OK\r\n" + HEAD.replace(
            b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"
        )
        upstream.data_received(response[:100])
        upstream.data_received(response[100:])
        server.close()
        return answer_code(transport.written)

    assert uvloop.run(run()) == (200, None)
