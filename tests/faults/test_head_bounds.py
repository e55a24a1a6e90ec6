"""The relay's bounds on heads and trailers, fed to its protocol objects directly.

The relay adds up a head's field sizes only when they could exceed the
limit. A head that spans reads must always be added up: llhttp holds a
field cut by the end of a read without reporting it, so the bytes seen
before the last read undercount the head; and a head in one read must be
added up when its fields, counted as the limit counts them, could exceed
it. Feeding ``ClientConnection`` and ``UpstreamConnection`` directly cuts
the bytes exactly where a case needs them, which a socket cannot be made
to do reliably. Trailers, Host names and the wait after ``100 Continue``
are bounded here too.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvloop

from agent.audit import AuditLog
from agent.config import Limits
from agent.forward import ProxyServer
from agent.forward.upstream import UpstreamConnection
from agent.keychain import LoadedIdentity
from faults.head_harness import HeadHarness

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
        self.closed = asyncio.Event()

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
        self.closed.set()

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


async def relay_with(
    limits: Limits, audit: AuditLog | None = None, host: str = "localhost"
) -> tuple[ProxyServer, Any, Transport, UpstreamConnection]:
    """A relay with one pooled upstream connection for ``host``:443."""
    keychain = OneIdentity()
    server = ProxyServer(keychain, limits, frozenset({os.getuid()}), audit)  # type: ignore[arg-type]
    ours, _theirs = socket.socketpair()
    client = server()
    client_transport = Transport(ours)
    client.connection_made(client_transport)
    upstream = UpstreamConnection((keychain.loaded, host, 443))
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


def test_a_head_in_one_read_is_added_up_as_the_limit_counts_it() -> None:
    """100 fields "X-nn:value" in one 64 KiB read count 100 bytes more than
    they take on the wire (each ": " and CRLF counts 4): over the limit."""
    limit = 64 * 1024
    start = b"GET / HTTP/1.1\r\nHost:localhost\r\n"
    value = b"v" * ((limit - len(start) - 2) // 99 - len(b"X-00:\r\n"))
    fields = b"".join(b"X-%02d:%s\r\n" % (i, value) for i in range(99))
    request = start + fields + b"\r\n"
    assert len(request) <= limit

    async def run() -> tuple[int, str | None]:
        server, client, transport, _ = await relay_with(Limits())
        client.data_received(request)
        server.close()
        return answer_code(transport.written)

    counted = len(b"Host") + len(b"localhost") + 4 + 99 * (4 + len(value) + 4)
    assert counted > limit
    assert uvloop.run(run()) == (431, "bad-request")


def test_a_host_longer_than_any_dns_name_is_refused() -> None:
    """A name over 253 characters is no DNS name; parsed Host values are kept,
    so a long one must not even be parsed into the cache."""

    async def run(host: bytes) -> tuple[bytes, bytes]:
        server, client, transport, upstream = await relay_with(Limits(), host=host.decode())
        client.data_received(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        server.close()
        return transport.written, upstream.transport.written  # type: ignore[union-attr]

    longest = b".".join([b"a" * 63] * 3 + [b"b" * 61])
    assert len(longest) == 253
    answered, sent_upstream = uvloop.run(run(longest))
    assert answered == b"" and b"\r\nHost: " + longest + b"\r\n" in sent_upstream
    for host in (longest + b".x", b".".join([b"a" * 63] * 900)):
        answered, sent_upstream = uvloop.run(run(host))
        assert answer_code(answered) == (400, "bad-request") and sent_upstream == b""


def test_a_head_refused_for_its_fields_is_audited_with_its_target() -> None:
    folder = Path(tempfile.mkdtemp(prefix="mt-bounds-"))

    async def run() -> dict[str, Any]:
        audit = AuditLog(folder / "audit.jsonl", max_bytes=1 << 20, keep=1)
        server, client, transport, _ = await relay_with(Limits(), audit)
        client.data_received(
            b"POST /upload?secret=1 HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        )
        server.close()
        audit.close()
        assert answer_code(transport.written) == (400, "bad-request")
        return json.loads((folder / "audit.jsonl").read_text().splitlines()[-1])

    line = uvloop.run(run())
    assert (line["status"], line["error"]) == (400, "bad-request")
    assert (line["host"], line["port"], line["path"]) == ("api.example.com", 443, "/upload")


def test_request_trailers_past_the_head_limits_are_refused() -> None:
    async def run() -> tuple[tuple[int, str | None], bytes]:
        server, client, transport, upstream = await relay_with(Limits(header_fields=10))
        client.data_received(
            b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n"
        )
        client.data_received(b"".join(b"T-%d: x\r\n" % i for i in range(11)) + b"\r\n")
        server.close()
        return answer_code(transport.written), upstream.transport.written  # type: ignore[union-attr]

    answer, sent_upstream = uvloop.run(run())
    assert answer == (431, "bad-request")
    assert b"T-0" not in sent_upstream  # the body's end and its trailers never went up


def test_upstream_trailers_past_the_head_limit_cut_the_answer() -> None:
    async def run() -> tuple[bytes, bool]:
        server, client, transport, upstream = await relay_with(Limits(upstream_head_bytes=1000))
        client.data_received(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        upstream.data_received(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        )
        upstream.data_received(b"".join(b"T-%d: %s\r\n" % (i, b"x" * 100) for i in range(20)))
        written, cut = transport.written, transport.closing
        server.close()
        return written, cut

    written, cut = uvloop.run(run())
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and b"T-0" not in written
    assert cut and not written.endswith(b"0\r\n\r\n")  # never a whole-looking answer


def test_after_100_continue_a_client_that_sends_no_body_is_closed_not_served_a_504() -> None:
    async def run() -> tuple[bytes, bytes]:
        limits = Limits(response_timeout=0.2, body_idle_timeout=0.2, head_timeout=0.2)
        server, client, transport, upstream = await relay_with(limits)
        client.data_received(
            b"PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        upstream.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.wait_for(transport.closed.wait(), 5)
        server.close()
        return transport.written, upstream.transport.written  # type: ignore[union-attr]

    written, _ = uvloop.run(run())
    assert written == b"HTTP/1.1 100 Continue\r\n\r\n"  # and no 504 blaming the upstream


# --- the request line ----------------------------------------------------------------


def test_the_request_line_limit_counts_the_whole_line() -> None:
    """``limits.request_line`` bounds "METHOD target HTTP/1.1", as nginx's
    buffers do, not the target alone; exactly the limit is still taken."""
    harness = HeadHarness()
    try:
        for method in (b"GET", b"UNSUBSCRIBE"):
            rest = len(method) + 1 + len(b" HTTP/1.1")
            at_limit = b"/" + b"a" * (Limits().request_line - rest - 1)
            for target, status in ((at_limit, 403), (at_limit + b"a", 414)):
                line = method + b" " + target + b" HTTP/1.1"
                answer = harness.run(line + b"\r\nHost: nowhere.example\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 %d " % status), (method, len(line))
    finally:
        harness.close()
