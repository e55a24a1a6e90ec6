"""Hostile clients on the proxy socket: each is refused, nothing reaches nginx.

Every case is sent as raw bytes to the real agent, while a good client
(``steady``) keeps asking nginx through the same agent: its latency during
the case must stay normal. Afterwards nginx's access log must hold the good
client's requests and nothing else, so no malformed or smuggled request got
through; the agent must still run and must have logged no traceback.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from support.nginx import Nginx

from faults.conftest import FaultAgent
from faults.probe import (
    Outcome,
    Reader,
    SteadyClient,
    assert_served_normally,
    audited,
    connect,
    exchange,
    read_response,
    record,
    request,
)

#: FAST_LIMITS in conftest.
HEAD_TIMEOUT = 1.0
BODY_IDLE_TIMEOUT = 1.0
KEEPALIVE_IDLE = 2.0
#: A refusal is immediate; this bounds it generously for a loaded CI machine.
AT_ONCE = 0.5
#: Slack over a timeout before the close counts as late.
SLACK = 0.75

Builder = Callable[[str], bytes | list[bytes]]


@dataclass(frozen=True)
class Case:
    id: str
    build: Builder  # the bytes, from nginx's Host (localhost:PORT)
    status: int
    says: str = ""  # part of the error's message


def _h(host: str, path: str = "/echo/hostile") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode()


def _port(host: str) -> str:
    return host.rsplit(":", 1)[1]


CASES = [
    Case("garbage-bytes", lambda h: b"\x00\xff\x13garbage\x7f\r\n\r\n", 400),
    Case("tls-client-hello", lambda h: bytes.fromhex("160301020001") + b"\x03\x03" * 40, 400),
    Case(
        "http2-preface",
        lambda h: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        400,
        "HTTP/2 is not spoken on the proxy socket: send HTTP/1.1.",
    ),
    Case("http09-request", lambda h: b"GET /echo/hostile\r\n\r\n", 400),
    Case("http3-version", lambda h: f"GET / HTTP/3.0\r\nHost: {h}\r\n\r\n".encode(), 400),
    Case("lower-case-method", lambda h: f"get / HTTP/1.1\r\nHost: {h}\r\n\r\n".encode(), 400),
    Case("connect-method", lambda h: f"CONNECT {h} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode(), 400),
    Case("request-line-9kib", lambda h: _h(h, "/echo/" + "a" * 9 * 1024) + b"\r\n", 414),
    Case("request-line-1mib-no-end", lambda h: b"GET /" + b"a" * (1 << 20), 414),
    Case("header-value-70kib", lambda h: _h(h) + b"X-Big: " + b"b" * 70 * 1024 + b"\r\n\r\n", 431),
    Case("header-value-4mib-no-end", lambda h: _h(h) + b"X-Big: " + b"b" * (4 << 20), 431),
    Case(
        "header-block-66kib",
        lambda h: (
            _h(h) + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(66)) + b"\r\n"
        ),
        431,
    ),
    Case(
        "header-fields-101",
        lambda h: _h(h) + b"".join(b"X-F%d: v\r\n" % i for i in range(100)) + b"\r\n",
        431,
    ),
    Case(
        "content-length-twice-differing",
        lambda h: _h(h) + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        400,
    ),
    Case("content-length-not-a-number", lambda h: _h(h) + b"Content-Length: 1a\r\n\r\nx", 400),
    Case("content-length-negative", lambda h: _h(h) + b"Content-Length: -1\r\n\r\n", 400),
    Case("content-length-list", lambda h: _h(h) + b"Content-Length: 1, 1\r\n\r\nx", 400),
    Case(
        "content-length-overflow",
        lambda h: _h(h) + b"Content-Length: 1" + b"0" * 30 + b"\r\n\r\n",
        400,
    ),
    Case(
        "cl-te-smuggle",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            f"GET /echo/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()
        ),
        400,
    ),
    Case(
        "te-cl-smuggle",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n"
            f"GET /echo/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n0\r\n\r\n".encode()
        ),
        400,
    ),
    Case(
        "te-gzip-chunked",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".encode()
        ),
        400,
    ),
    Case(
        "te-twice",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
        ),
        400,
    ),
    Case(
        "te-identity",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Transfer-Encoding: identity\r\n\r\nabc".encode()
        ),
        400,
    ),
    Case(
        "te-space-before-colon",
        lambda h: (
            f"POST /echo/hostile HTTP/1.1\r\nHost: {h}\r\n"
            f"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n".encode()
        ),
        400,
    ),
    Case("obs-fold", lambda h: _h(h) + b"X-Folded: a\r\n b\r\n\r\n", 400),
    Case("two-hosts", lambda h: _h(h) + f"Host: {h}\r\n\r\n".encode(), 400),
    Case("host-with-space", lambda h: f"GET / HTTP/1.1\r\nHost: {h} evil\r\n\r\n".encode(), 400),
    Case(
        "host-with-bare-cr",
        lambda h: f"GET / HTTP/1.1\r\nHost: {h}\rX-Injected: 1\r\n\r\n".encode(),
        400,
    ),
    Case("host-with-nul", lambda h: f"GET / HTTP/1.1\r\nHost: {h}\x00evil\r\n\r\n".encode(), 400),
    Case("host-with-path", lambda h: f"GET / HTTP/1.1\r\nHost: {h}/evil\r\n\r\n".encode(), 400),
    Case(
        "host-with-encoded-crlf",
        lambda h: f"GET / HTTP/1.1\r\nHost: {h}%0d%0aX: 1\r\n\r\n".encode(),
        400,
    ),
    Case("host-userinfo", lambda h: f"GET / HTTP/1.1\r\nHost: user@{h}\r\n\r\n".encode(), 400),
    Case(
        "absolute-uri-userinfo",
        lambda h: f"GET http://user:pw@{h}/echo HTTP/1.1\r\nHost: {h}\r\n\r\n".encode(),
        400,
    ),
    Case(
        "absolute-uri-other-scheme",
        lambda h: f"GET ftp://{h}/echo HTTP/1.1\r\nHost: {h}\r\n\r\n".encode(),
        400,
    ),
    Case(
        "ipv6-unclosed", lambda h: f"GET / HTTP/1.1\r\nHost: [::1:{_port(h)}\r\n\r\n".encode(), 400
    ),
    Case(
        "ipv6-invalid", lambda h: f"GET / HTTP/1.1\r\nHost: [::g]:{_port(h)}\r\n\r\n".encode(), 400
    ),
    Case(
        "ipv6-trailing-junk",
        lambda h: f"GET / HTTP/1.1\r\nHost: [::1]x:{_port(h)}\r\n\r\n".encode(),
        400,
    ),
    Case(
        "ipv6-zone-id",
        lambda h: f"GET / HTTP/1.1\r\nHost: [fe80::1%25lo]:{_port(h)}\r\n\r\n".encode(),
        400,
    ),
    Case("ipv6-unbracketed", lambda h: b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400),
    Case("missing-host", lambda h: b"GET /echo/hostile HTTP/1.1\r\n\r\n", 400),
    Case("empty-host", lambda h: b"GET /echo/hostile HTTP/1.1\r\nHost: \r\n\r\n", 400),
    Case("port-zero", lambda h: b"GET / HTTP/1.1\r\nHost: localhost:0\r\n\r\n", 400),
    Case("port-too-big", lambda h: b"GET / HTTP/1.1\r\nHost: localhost:65536\r\n\r\n", 400),
    Case("port-not-a-number", lambda h: b"GET / HTTP/1.1\r\nHost: localhost:https\r\n\r\n", 400),
    Case("port-empty", lambda h: b"GET / HTTP/1.1\r\nHost: localhost:\r\n\r\n", 400),
]


def _nginx_saw_only(nginx: Nginx, mark: int, steady: SteadyClient, expected: tuple[str, ...] = ()):
    """nginx logged nothing since ``mark`` but the good client's requests (and ``expected``)."""
    entries = nginx.access_log(mark)
    others = [e["request"] for e in entries if e["request"] != steady.request_line]
    assert others == list(expected), f"nginx saw requests it must not have: {others}"


def _assert_agent_error(outcome: Outcome, status: int, code: str = "bad-request") -> None:
    response = outcome.response
    assert response is not None, "the agent closed without answering"
    assert response.status == status, (response.status, response.body)
    assert response.header("Mtls-Agent-Error") == code
    body = response.json()
    assert body["error"] == code and body["message"].endswith("."), body
    assert response.header("Content-Type") == "application/json"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_gets_its_status_and_never_reaches_nginx(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx, case: Case
) -> None:
    mark, errors = nginx.mark(), fault_agent.stderr_mark()
    with steady.window() as window:
        outcome = exchange(fault_agent.socket, case.build(nginx.host_header))
    record(f"client: {case.id}", outcome.describe(), outcome.seconds, window)

    _assert_agent_error(outcome, case.status)
    assert case.says in outcome.response.json()["message"]  # type: ignore[union-attr]
    assert outcome.closed, "the agent must close a connection whose request it refused"
    assert outcome.seconds < AT_ONCE
    assert_served_normally(window, steady)
    _nginx_saw_only(nginx, mark, steady)
    fault_agent.assert_alive_and_quiet(errors)


def test_an_ipv6_literal_host_is_served(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx
) -> None:
    if not nginx.ipv6:
        pytest.skip("this machine has no ::1")
    mark = nginx.mark()
    outcome = exchange(fault_agent.socket, request(f"[::1]:{nginx.port}", "/echo/ipv6"))
    record("client: IPv6 literal Host [::1]:PORT", outcome.describe(), outcome.seconds)
    assert outcome.status == 200
    assert outcome.response.header("X-Host") == f"[::1]:{nginx.port}"  # type: ignore[union-attr]
    _nginx_saw_only(nginx, mark, steady, ("GET /echo/ipv6 HTTP/1.1",))


def test_a_request_hidden_in_a_body_is_never_a_request_upstream(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx
) -> None:
    """A GET with a body that looks like a second request: one request reaches nginx."""
    h = nginx.host_header
    hidden = f"GET /echo/smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()
    data = (
        f"GET /echo/carrier HTTP/1.1\r\nHost: {h}\r\nContent-Length: {len(hidden)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + hidden
    mark = nginx.mark()
    outcome = exchange(fault_agent.socket, data)
    record("client: request hidden in a Content-Length body", outcome.describe(), outcome.seconds)
    assert outcome.status == 200 and outcome.closed
    nginx.access_log(mark, wait_for=1)
    _nginx_saw_only(nginx, mark, steady, ("GET /echo/carrier HTTP/1.1",))


# --- bodies that go wrong after the head went upstream ----------------------------


def _upload_never_completed(nginx: Nginx, mark: int, name: str) -> None:
    """nginx may have seen the head, but never accepted the cut body as a whole upload."""
    assert not nginx.uploaded(name).exists(), f"nginx stored {name} from a broken body"
    for entry in nginx.access_log(mark):
        if name in entry["request"]:
            assert entry["status"] >= 400, entry


@pytest.mark.parametrize(
    "body",
    [
        [b"10\r\n" + b"x" * 16 + b"\r\n", b"zz\r\n"],  # a chunk size that is not hex
        [b"5\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"],  # a chunk longer than it says
        [b"10\r\n" + b"x" * 16 + b"\r\n", b"0\r\nContent-Length: 5\r\n\r\n"],  # bad trailer
    ],
    ids=["bad-chunk-size", "chunk-overrun", "content-length-trailer"],
)
def test_a_broken_chunked_body_gets_400_and_the_upload_never_completes(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx, body: list[bytes], request_id: str
) -> None:
    name = f"broken-{request_id}.bin"
    head = (
        f"PUT /upload/{name} HTTP/1.1\r\nHost: {nginx.host_header}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    mark, errors = nginx.mark(), fault_agent.stderr_mark()
    with steady.window() as window:
        outcome = exchange(fault_agent.socket, [head, *body], pause=0.05)
    record(f"client: chunked body, {request_id}", outcome.describe(), outcome.seconds, window)
    _assert_agent_error(outcome, 400)
    assert outcome.closed
    assert outcome.seconds < AT_ONCE + 0.1
    assert_served_normally(window, steady)
    _upload_never_completed(nginx, mark, name)
    fault_agent.assert_alive_and_quiet(errors)


@pytest.fixture
def request_id(request: pytest.FixtureRequest) -> str:
    return request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name


def _abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("where", ["mid-head", "mid-body", "awaiting-answer"])
def test_a_client_that_vanishes_leaves_no_request_behind(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx, where: str
) -> None:
    name = f"vanish-{where}.bin"
    h = nginx.host_header
    mark, errors = nginx.mark(), fault_agent.stderr_mark()
    with steady.window() as window:
        sock = connect(fault_agent.socket)
        if where == "mid-head":
            sock.sendall(f"PUT /upload/{name} HTTP/1.1\r\nHost: {h}\r\nContent-Le".encode())
        elif where == "mid-body":
            head = f"PUT /upload/{name} HTTP/1.1\r\nHost: {h}\r\nContent-Length: {1 << 20}\r\n"
            sock.sendall(head.encode() + b"\r\n" + b"y" * (256 << 10))
        else:
            sock.sendall(request(h, "/echo/vanished"))
        time.sleep(0.1)
        _abort(sock)
    record(f"client: vanishes {where}", "nothing reached nginx whole", None, window)
    assert_served_normally(window, steady)
    _upload_never_completed(nginx, mark, name)
    if where == "mid-body":
        line = audited(fault_agent.env.audit_log, lambda e: e["path"] == f"/upload/{name}")
        assert (line["status"], line["error"]) == (0, "client-gone")
    fault_agent.assert_alive_and_quiet(errors)


def test_a_stalled_request_body_is_cut_off_within_the_body_idle_timeout(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx
) -> None:
    name = "stalled-body.bin"
    head = (
        f"PUT /upload/{name} HTTP/1.1\r\nHost: {nginx.host_header}\r\n"
        f"Content-Length: {1 << 20}\r\n\r\n"
    ).encode()
    mark, errors = nginx.mark(), fault_agent.stderr_mark()
    with steady.window() as window:
        outcome = exchange(fault_agent.socket, [head + b"z" * 1000])
    record("client: request body stalls", outcome.describe(), outcome.seconds, window)
    assert outcome.response is None
    assert outcome.closed
    assert BODY_IDLE_TIMEOUT * 0.9 <= outcome.seconds < BODY_IDLE_TIMEOUT + SLACK
    assert_served_normally(window, steady)
    _upload_never_completed(nginx, mark, name)
    line = audited(fault_agent.env.audit_log, lambda e: e["path"] == f"/upload/{name}")
    assert (line["status"], line["error"], line["bytes_in"]) == (0, "client-timeout", 1000)
    fault_agent.assert_alive_and_quiet(errors)


# --- slow clients ---------------------------------------------------------------------


def _dribble(socks: list[socket.socket], data: bytes, interval: float, limit: float) -> list[float]:
    """Send ``data`` one byte per ``interval`` on every socket; when each one was closed.

    A close shows as EOF or a reset on read, or a failed send; an answer
    (any byte from the agent) counts as a failure of the case.
    """
    start = time.monotonic()
    closed_at: dict[socket.socket, float] = {}
    answered: list[bytes] = []
    position = 0
    for s in socks:
        s.setblocking(False)
    while len(closed_at) < len(socks) and time.monotonic() - start < limit:
        open_socks = [s for s in socks if s not in closed_at]
        readable, _, _ = select.select(open_socks, [], [], interval)
        now = time.monotonic() - start
        for s in readable:
            try:
                data_in = s.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data_in = b""
            if data_in:
                answered.append(data_in)
            closed_at[s] = now
        if position < len(data):
            for s in open_socks:
                if s in closed_at:
                    continue
                try:
                    s.send(data[position : position + 1])
                except BlockingIOError:
                    pass  # its buffer is full for now: a slow client, as intended
                except (BrokenPipeError, ConnectionResetError):
                    closed_at[s] = time.monotonic() - start
            position += 1
    assert answered == [], f"slow clients were answered: {answered[:2]}"
    return [closed_at.get(s, float("inf")) for s in socks]


def test_slowloris_heads_are_closed_within_the_head_timeout(
    fault_agent: FaultAgent, steady: SteadyClient, nginx: Nginx
) -> None:
    head = request(nginx.host_header, "/echo/slowloris")
    socks = [connect(fault_agent.socket) for _ in range(200)]
    errors = fault_agent.stderr_mark()
    mark = nginx.mark()
    try:
        with steady.window() as window:
            closes = _dribble(socks, head, 0.05, HEAD_TIMEOUT + 3)
    finally:
        for s in socks:
            s.close()
    worst = max(closes)
    record("client: 200 slowloris heads (1 byte / 50 ms)", "closed, no answer", worst, window)
    assert worst < HEAD_TIMEOUT + SLACK, sorted(closes)[-5:]
    assert min(closes) > HEAD_TIMEOUT * 0.8
    assert_served_normally(window, steady)
    _nginx_saw_only(nginx, mark, steady)
    fault_agent.assert_alive_and_quiet(errors)


def test_a_silent_client_is_closed_after_the_keepalive_idle_timeout(
    fault_agent: FaultAgent, steady: SteadyClient
) -> None:
    """keepalive_idle is 2 s in FAST_LIMITS; the good client is never idle that long."""
    with connect(fault_agent.socket) as sock:
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        waited = time.monotonic() - start
    record("client: connects and says nothing", "closed, no answer", waited)
    assert KEEPALIVE_IDLE * 0.9 <= waited < KEEPALIVE_IDLE + SLACK
    fault_agent.assert_alive_and_quiet()


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    fault_agent: FaultAgent, nginx: Nginx
) -> None:
    """Like ``printf 'GET ...' | nc -N -U agent.sock``: the answer comes, then the close."""
    with connect(fault_agent.socket) as sock:
        sock.sendall(request(nginx.host_header, "/echo/half-closed"))
        sock.shutdown(socket.SHUT_WR)
        reader = Reader(sock)
        response = read_response(reader)
        assert response is not None and response.status == 200 and response.complete
        assert response.header("X-Client-Verify") == "SUCCESS"
        reader.rest()
        assert reader.eof
