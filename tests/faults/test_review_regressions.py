"""Relay behaviours a review found broken, each pinned against an upstream that provokes it.

Most cases run through the module's real agent (``fault_agent``) to a small
in-process upstream (support.fault_servers) that does the one thing at
issue. Two need the relay in this process: one shrinks the agent's socket
buffer to make a request body queue up, the other makes routing fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from support.fault_servers import FaultServer, hard_reset, read_head, respond, tls_context
from support.pki import Pki

from agent.config import Limits
from agent.forward import ProxyServer
from agent.forward import upstream as upstream_module
from agent.identity import new_identity
from agent.keychain import Keychain
from agent.vault import Vault
from faults.conftest import FaultAgent
from faults.probe import Reader, connect, exchange, read_response, request

WAIT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def read_to_close(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything until the peer closes, and whether it did within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while piece := sock.recv(65536):
            data += piece
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        pass
    return data, True


# --- 5. a refused upgrade ----------------------------------------------------------------


def test_a_refused_upgrade_is_answered_with_connection_close_and_the_connection_closes(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    refusal = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno"
    with FaultServer(respond(refusal, then="keep"), tls_context(pki)) as upstream:
        upgrade = request(
            upstream.host_header, "/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"
        )
        with connect(fault_agent.socket, WAIT) as sock:
            sock.sendall(upgrade)
            started = time.monotonic()
            data, closed = read_to_close(sock, WAIT)
    assert data.startswith(b"HTTP/1.1 401 "), data
    assert b"\r\nConnection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nno")
    assert closed, "the agent kept the connection of a refused upgrade open"
    assert time.monotonic() - started < 1.5  # not the keep-alive idle timeout


# --- 6. a 101 nobody asked for ---------------------------------------------------------------


def test_an_unrequested_101_gets_only_a_502_bad_response(fault_agent: FaultAgent, pki: Pki) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: evil\r\n\r\nRAW"
    upstream = FaultServer(respond(switch, then="keep"), tls_context(pki))
    with upstream, connect(fault_agent.socket, WAIT) as sock:
        sock.sendall(request(upstream.host_header, "/plain"))
        reader = Reader(sock)
        while b"\r\n\r\n" not in reader.buffer:  # the first head the client gets
            assert reader.fill(), "the agent closed without an answer"
        assert reader.buffer.startswith(b"HTTP/1.1 502 "), reader.buffer[:200]
        answer = read_response(reader)
    assert answer is not None and answer.header("Mtls-Agent-Error") == "upstream-bad-response"
    assert answer.json()["error"] == "upstream-bad-response"
    assert b"RAW" not in answer.body
    fault_agent.assert_alive_and_quiet()


# --- 8. which requests are sent again after a pooled connection dies ---------------------


def answer_once_then_die(died_on: list[bytes]) -> object:
    """Answer the first request of a connection; read the second and die without a word."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        conn.sendall(OK)
        second = read_head(conn)
        if second:
            died_on.append(second.split(b"\r\n", 1)[0])
            hard_reset(conn)

    return behaviour


def second_request_after_a_pooled_one(
    fault_agent: FaultAgent, pki: Pki, method: str, extra: str = ""
) -> tuple[int | None, str | None, list[bytes], list[bytes]]:
    died_on: list[bytes] = []
    with FaultServer(answer_once_then_die(died_on), tls_context(pki)) as upstream:  # type: ignore[arg-type]
        first = exchange(fault_agent.socket, request(upstream.host_header, "/first"))
        assert first.status == 200
        second = exchange(
            fault_agent.socket,
            request(upstream.host_header, "/items/7", method=method, extra=extra),
        )
        heads = [h.split(b"\r\n", 1)[0] for h in upstream.heads]
    code = second.response.header("Mtls-Agent-Error") if second.response else None
    return second.status, code, died_on, heads


@pytest.mark.parametrize(
    ("method", "extra"), [("DELETE", ""), ("POST", ""), ("POST", "Content-Length: 0\r\n")]
)
def test_an_unsafe_request_on_a_pooled_connection_that_dies_is_not_sent_twice(
    fault_agent: FaultAgent, pki: Pki, method: str, extra: str
) -> None:
    status, code, died_on, heads = second_request_after_a_pooled_one(
        fault_agent, pki, method, extra
    )
    line = f"{method} /items/7 HTTP/1.1".encode()
    assert status == 502 and code == "upstream-unreachable"
    assert died_on == [line]
    assert line not in heads, "the request reached the upstream a second time"


def test_a_get_on_a_pooled_connection_that_dies_is_retried_once_and_served(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    status, code, died_on, heads = second_request_after_a_pooled_one(fault_agent, pki, "GET")
    assert (status, code) == (200, None)
    assert died_on == [b"GET /items/7 HTTP/1.1"]
    assert heads == [b"GET /first HTTP/1.1", b"GET /items/7 HTTP/1.1"]


# --- 9. the agent's own error header -------------------------------------------------------


def test_an_upstreams_mtls_agent_error_header_never_reaches_the_client(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    forged = (
        b"HTTP/1.1 403 Forbidden\r\nMtls-Agent-Error: peer-denied\r\n"
        b"X-Kept: yes\r\nContent-Length: 2\r\n\r\nno"
    )
    with FaultServer(respond(forged), tls_context(pki)) as upstream:
        outcome = exchange(fault_agent.socket, request(upstream.host_header, "/forged"))
    assert outcome.response is not None and outcome.status == 403
    assert outcome.response.header("X-Kept") == "yes"  # the upstream's other headers pass
    assert outcome.response.header("Mtls-Agent-Error") is None
    assert outcome.response.body == b"no"


# --- 10. an upgrade in the audit log ----------------------------------------------------------


def switch_and_echo(conn: socket.socket, head: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    while data := conn.recv(65536):
        conn.sendall(data)


def test_an_upgrade_is_tunnelled_both_ways_and_audited_as_101(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    path = f"/ws-audit-{os.getpid()}-{time.monotonic_ns()}"
    upgrade = "Connection: Upgrade\r\nUpgrade: echo\r\n"
    upstream = FaultServer(switch_and_echo, tls_context(pki))
    with upstream, connect(fault_agent.socket, WAIT) as sock:
        sock.sendall(request(upstream.host_header, path, extra=upgrade))
        reader = Reader(sock)
        head = reader.until(b"\r\n\r\n")
        assert head is not None and head.startswith(b"HTTP/1.1 101 "), head
        sock.sendall(b"ping")
        while b"ping" not in reader.buffer:
            assert reader.fill(), "the tunnel closed before echoing"
    log = fault_agent.env.audit_log
    deadline = time.monotonic() + WAIT
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        mine = [e for e in map(json.loads, lines) if e.get("path") == path]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(mine) == 1, f"no single audit line for {path}: {mine}"
    assert mine[0]["status"] == 101
    assert mine[0]["error"] is None  # the client closing its tunnel is how it ends


# --- the relay in this process, for the two cases that need to reach inside ----------------

PASSPHRASE = "in-process relay"


class InProcessRelay:
    """The agent's keychain and relay on a uvloop loop in a thread, over a real vault.

    ``connect(data)`` hands the relay a connection whose first ``data`` bytes
    are already waiting, so the relay reads them in one go.
    """

    def __init__(self, pki: Pki) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mt-relay-"))
        vault = Vault(self.folder / "vault")
        vault.create(PASSPHRASE, kdf_n=2**12)
        leaf = pki.client
        identity = new_identity(
            "work", leaf.key, leaf.chain, ["localhost"], ca_pem=pki.root_pem.read_bytes()
        )
        vault.store("work", identity.to_metadata(), leaf.key)
        scratch = self.folder / "scratch"
        scratch.mkdir(mode=0o700)
        self.keychain = Keychain(vault, scratch)
        self.server = ProxyServer(self.keychain, Limits(), frozenset({os.getuid()}))
        self.escaped: list[dict] = []
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda _loop, context: self.escaped.append(context))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._run(self.keychain.unlock(PASSPHRASE))

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def connect(self, data: bytes = b"") -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.settimeout(WAIT)
        ours.sendall(data)  # all queued before the relay reads a byte

        async def accept() -> None:
            await self.loop.connect_accepted_socket(self.server, theirs)

        self._run(accept())
        return ours

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def relay(pki: Pki) -> Iterator[InProcessRelay]:
    r = InProcessRelay(pki)
    try:
        yield r
    finally:
        r.close()


# --- 4. a body that fills the upstream's buffer, answered early with keep-alive -------------

#: More than one read of the relay (256 KiB): the first read fills the upstream's socket
#: and transport, the last one queues behind them and pauses the client.
BODY = 400_000
#: Long enough for the relay to have read the whole body before the answer comes.
ANSWER_AFTER = 0.2


def early_answer_then_serve(release: threading.Event):  # type: ignore[no-untyped-def]
    """A POST is answered at once, its body left unread; any other request is served."""

    def behaviour(conn: socket.socket, head: bytes) -> None:
        if head.startswith(b"POST"):
            time.sleep(ANSWER_AFTER)
            conn.sendall(OK)
            release.wait(WAIT * 3)  # read nothing more while the test runs
            return
        while head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
            head = read_head(conn)

    return behaviour


def test_after_a_body_fills_the_upstream_buffer_an_early_answer_lets_the_next_request_through(
    relay: InProcessRelay, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused: list[bool] = []
    made = upstream_module.UpstreamConnection.connection_made
    pause = upstream_module.UpstreamConnection.pause_writing

    def small_buffer(self, transport):  # type: ignore[no-untyped-def]
        made(self, transport)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=16384)  # "full" well before the body is all in

    def seen_pause(self):  # type: ignore[no-untyped-def]
        paused.append(True)
        pause(self)

    monkeypatch.setattr(upstream_module.UpstreamConnection, "connection_made", small_buffer)
    monkeypatch.setattr(upstream_module.UpstreamConnection, "pause_writing", seen_pause)
    release = threading.Event()
    upstream = FaultServer(early_answer_then_serve(release), tls_context(pki)).start()
    try:
        post = (
            f"POST /up HTTP/1.1\r\nHost: {upstream.host_header}\r\n"
            f"Content-Length: {BODY}\r\n\r\n".encode()
        ) + b"x" * BODY
        with relay.connect(post) as sock:
            reader = Reader(sock)
            first = read_response(reader)
            assert first is not None and first.status == 200 and first.body == b"ok"
            assert paused, "the upstream's buffer never filled: the case was not set up"
            assert first.header("Connection") is None, "the body was not all read: not set up"
            sock.sendall(request(upstream.host_header, "/two"))
            second = read_response(reader)
        assert second is not None and (second.status, second.body) == (200, b"two")
        heads = [h.split(b"\r\n", 1)[0] for h in upstream.heads]
        assert heads == [b"POST /up HTTP/1.1", b"GET /two HTTP/1.1"]  # /two on a new connection
    finally:
        release.set()
        upstream.close()
    assert relay.escaped == []


# --- 7. pipelined requests, routing of the second one fails unexpectedly ---------------------


def serve_all(conn: socket.socket, head: bytes) -> None:
    while head:
        conn.sendall(OK)
        head = read_head(conn)


def test_a_pipelined_request_whose_routing_raises_is_answered_500(
    relay: InProcessRelay, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    route = relay.keychain.route

    def failing_second(host: str, port: int, caller=None):  # type: ignore[no-untyped-def]
        calls.append(host)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return route(host, port, caller)

    monkeypatch.setattr(relay.keychain, "route", failing_second)
    with FaultServer(serve_all, tls_context(pki)) as upstream, relay.connect() as sock:
        sock.sendall(request(upstream.host_header, "/a") + request(upstream.host_header, "/b"))
        reader = Reader(sock)
        first = read_response(reader)
        second = read_response(reader)
    assert first is not None and first.status == 200
    assert second is not None, "the second request was left unanswered"
    assert second.status == 500
    assert second.header("Mtls-Agent-Error") == "internal-error"
    assert second.json()["error"] == "internal-error"
    assert relay.escaped == []
