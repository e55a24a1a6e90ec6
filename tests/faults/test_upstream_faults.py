"""Upstreams that fail: each gives the code of DESIGN.md's table within its timeout.

The misbehaving upstreams are small in-process servers (support.fault_servers)
that complete a real TLS handshake, read the request, and then do one bad
thing. A body cut short upstream must reach the client cut short too: the
agent aborts the connection rather than ending the answer as if complete.
Meanwhile the good client keeps being served through the same agent.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from support.fault_servers import (
    Behaviour,
    FaultServer,
    closed_port,
    drip,
    header_flood,
    reset_after,
    respond,
    server_cert,
    silent_tcp,
    stall,
    tls_context,
)
from support.nginx import Nginx
from support.pki import Pki
from support.tools import require_tool

from faults.conftest import FaultAgent
from faults.probe import (
    Outcome,
    Reader,
    SteadyClient,
    assert_served_normally,
    audited,
    connect,
    exchange,
    record,
    request,
)

#: FAST_LIMITS in conftest: connect, response and body-idle timeouts are 1 s.
TIMEOUT = 1.0
SLACK = 0.75
AT_ONCE = 0.5

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"


def _length_body(total: int, sent: int) -> bytes:
    return OK_HEAD + b"Content-Length: %d\r\n\r\n" % total + b"b" * sent


def _chunked_body(chunks: int) -> bytes:
    return (
        OK_HEAD
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"1000\r\n"
        + b"c" * 4096 * 1
        + (b"\r\n1000\r\n" + b"c" * 4096) * (chunks - 1)
        + b"\r\n"
    )


@dataclass(frozen=True)
class Fault:
    id: str
    behaviour: Callable[[], Behaviour]
    cert: str  # "good", "expired", "wrong-name", "other-root"
    status: int
    code: str | None  # the agent's error code, or None for the upstream's own answer
    complete: bool = True  # whether the body must arrive whole
    cut_as: str = "upstream-cut"  # the audit line's error when the body is cut short
    within: float = AT_ONCE
    at_least: float = 0.0


FAULTS = [
    Fault("cert-expired", stall, "expired", 502, "upstream-untrusted"),
    Fault("cert-wrong-name", stall, "wrong-name", 502, "upstream-untrusted"),
    Fault("cert-unknown-issuer", stall, "other-root", 502, "upstream-untrusted"),
    Fault(
        "no-answer",
        stall,
        "good",
        504,
        "upstream-timeout",
        within=TIMEOUT + SLACK,
        at_least=TIMEOUT * 0.9,
    ),
    Fault(
        "head-dripped-slowly",
        lambda: drip(OK_HEAD + b"Content-Length: 0\r\n\r\n", 0.1),
        "good",
        504,
        "upstream-timeout",
        within=TIMEOUT + SLACK,
        at_least=TIMEOUT * 0.9,
    ),
    Fault(
        "interim-then-nothing",
        lambda: respond(b"HTTP/1.1 102 Processing\r\n\r\n", then="keep"),
        "good",
        504,
        "upstream-timeout",
        within=TIMEOUT + SLACK,
        at_least=TIMEOUT * 0.9,
    ),
    Fault(
        "non-http-bytes",
        lambda: respond(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02", then="keep"),
        "good",
        502,
        "upstream-bad-response",
    ),
    Fault("header-flood-4mib", lambda: header_flood(4 << 20), "good", 502, "upstream-bad-response"),
    Fault(
        "header-line-4mib",
        lambda: header_flood(4 << 20, line=b"X" * 65536),
        "good",
        502,
        "upstream-bad-response",
    ),
    Fault(
        "header-block-65kib-whole",
        lambda: respond(
            OK_HEAD
            + b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 1000) for i in range(65))
            + b"Content-Length: 0\r\n\r\n"
        ),
        "good",
        502,
        "upstream-bad-response",
    ),
    Fault(
        "transfer-coding-gzip-then-chunked",  # relayed as plain chunks: gzip bytes as the body
        lambda: respond(
            OK_HEAD
            + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n",
            then="keep",
        ),
        "good",
        502,
        "upstream-bad-response",
    ),
    Fault(
        "transfer-coding-gzip-until-close",
        lambda: respond(OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00\x00"),
        "good",
        502,
        "upstream-bad-response",
    ),
    Fault(  # no body to misframe: the coding is the upstream's business
        "no-body-answer-with-another-transfer-coding",
        lambda: respond(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        "good",
        204,
        None,
    ),
    Fault("closes-before-answering", lambda: respond(b""), "good", 502, "upstream-unreachable"),
    Fault("resets-before-answering", lambda: reset_after(b""), "good", 502, "upstream-unreachable"),
    Fault(
        "reset-mid-body-content-length",
        lambda: reset_after(_length_body(1 << 20, 300_000)),
        "good",
        200,
        None,
        complete=False,
    ),
    Fault(
        "reset-mid-body-chunked",
        lambda: reset_after(_chunked_body(40)),
        "good",
        200,
        None,
        complete=False,
    ),
    Fault(
        "reset-mid-body-until-close",
        lambda: reset_after(OK_HEAD + b"\r\n" + b"u" * 200_000),
        "good",
        200,
        None,
        complete=False,
    ),
    Fault(
        "clean-close-mid-body-content-length",
        lambda: respond(_length_body(1 << 20, 300_000)),
        "good",
        200,
        None,
        complete=False,
    ),
    Fault(
        "clean-close-mid-body-chunked",
        lambda: respond(_chunked_body(40)),
        "good",
        200,
        None,
        complete=False,
    ),
    Fault(
        "body-stalls",
        lambda: respond(_length_body(1 << 20, 100_000), then="keep"),
        "good",
        200,
        None,
        complete=False,
        cut_as="upstream-timeout",
        within=TIMEOUT + SLACK,
    ),
    # controls: what is valid must pass, whole
    Fault(
        "head-60kib-and-body-in-one-write",
        lambda: respond(
            OK_HEAD
            + b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 1000) for i in range(60))
            + b"Content-Length: 200000\r\n\r\n"
            + b"w" * 200_000
        ),
        "good",
        200,
        None,
    ),
    Fault(
        "body-until-close-then-clean-close",
        lambda: respond(OK_HEAD + b"\r\n" + b"u" * 200_000),
        "good",
        200,
        None,
    ),
]


def _context(pki: Pki, kind: str):  # type: ignore[no-untyped-def]
    if kind == "good":
        return tls_context(pki)
    if kind == "other-root":
        return tls_context(pki, pki.other_server)
    return tls_context(pki, server_cert(pki, kind))  # type: ignore[arg-type]


@contextlib.contextmanager
def _upstream(pki: Pki, fault: Fault) -> Iterator[FaultServer]:
    server = FaultServer(fault.behaviour(), _context(pki, fault.cert)).start()
    try:
        yield server
    finally:
        server.close()


def _check(outcome: Outcome, status: int, code: str | None) -> None:
    response = outcome.response
    assert response is not None, "the agent closed without answering"
    assert response.status == status, (response.status, response.body[:300])
    assert response.header("Mtls-Agent-Error") == code
    if code is not None:
        body = response.json()
        assert body["error"] == code and body["message"].endswith("."), body


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_upstream_fault_gets_its_code_within_its_timeout(
    fault_agent: FaultAgent, steady: SteadyClient, pki: Pki, fault: Fault
) -> None:
    errors = fault_agent.stderr_mark()
    with _upstream(pki, fault) as upstream, steady.window() as window:
        outcome = exchange(fault_agent.socket, request(upstream.host_header, "/fault"))
    record(f"upstream: {fault.id}", outcome.describe(), outcome.seconds, window)

    _check(outcome, fault.status, fault.code)
    assert outcome.response.complete is fault.complete  # type: ignore[union-attr]
    line = audited(fault_agent.env.audit_log, lambda e: e["port"] == upstream.port)
    assert line["error"] == (fault.code if fault.complete else fault.cut_as), line
    assert line["status"] == fault.status
    if not fault.complete:
        assert outcome.closed, "a body cut short must end with the connection"
    assert fault.at_least <= outcome.seconds < fault.within
    assert_served_normally(window, steady)
    fault_agent.assert_alive_and_quiet(errors)


def test_a_cut_body_is_an_error_for_curl_too(fault_agent: FaultAgent, pki: Pki) -> None:
    """curl, a client users run, must see the truncation (exit 18: partial file)."""
    fault = Fault("cut", lambda: reset_after(_length_body(1 << 20, 300_000)), "good", 200, None)
    exe = require_tool("curl")
    with _upstream(pki, fault) as upstream:
        result = subprocess.run(
            [exe, "-sS", "-o", os.devnull, "-w", "%{http_code}", "--unix-socket",
             str(fault_agent.socket), f"http://{upstream.host_header}/cut"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.stdout == "200"
    assert result.returncode in (18, 56), (result.returncode, result.stderr)


def test_a_refused_port_gets_502_at_once(fault_agent: FaultAgent, steady: SteadyClient) -> None:
    port = closed_port()
    with steady.window() as window:
        outcome = exchange(fault_agent.socket, request(f"localhost:{port}", "/refused"))
    record("upstream: closed port", outcome.describe(), outcome.seconds, window)
    _check(outcome, 502, "upstream-unreachable")
    assert outcome.seconds < AT_ONCE
    assert not outcome.closed, "an agent error that ends a whole request keeps the connection"
    assert_served_normally(window, steady)


def test_a_peer_that_never_speaks_tls_gets_504_after_the_connect_timeout(
    fault_agent: FaultAgent, steady: SteadyClient
) -> None:
    with silent_tcp() as port, steady.window() as window:
        outcome = exchange(fault_agent.socket, request(f"localhost:{port}", "/silent"))
    record("upstream: accepts TCP, never speaks TLS", outcome.describe(), outcome.seconds, window)
    _check(outcome, 504, "upstream-timeout")
    assert TIMEOUT * 0.9 <= outcome.seconds < TIMEOUT + SLACK
    assert_served_normally(window, steady)


def test_a_second_answer_to_one_request_is_never_given_to_the_next(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    """An upstream that answers twice is out of step: its connection is not reused."""
    first = OK_HEAD + b"Content-Length: 5\r\n\r\nfirst"
    second = OK_HEAD + b"Content-Length: 6\r\n\r\nsecond"
    fault = Fault("twice", lambda: respond(first + second, then="keep"), "good", 200, None)
    with _upstream(pki, fault) as upstream:
        answers = [
            exchange(fault_agent.socket, request(upstream.host_header, f"/twice/{i}"))
            for i in range(2)
        ]
        connections = upstream.connections
    assert [a.response.body for a in answers] == [b"first", b"first"]  # type: ignore[union-attr]
    assert connections == 2


def test_early_hints_an_encoded_body_and_trailers_pass_through_untouched(
    fault_agent: FaultAgent, pki: Pki
) -> None:
    """A 103 reaches the client before the answer; a gzip body is neither
    decoded nor re-encoded; the upstream's trailer fields follow the last chunk."""
    gzipped = gzip.compress(b"compressed on purpose\n" * 20)
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + OK_HEAD
        + b"Content-Encoding: gzip\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(gzipped), gzipped)
        + b"0\r\nX-Checksum: sha256-abc\r\n\r\n"
    )
    fault = Fault("passthrough", lambda: respond(answer, then="keep"), "good", 200, None)
    with _upstream(pki, fault) as upstream, connect(fault_agent.socket) as sock:
        sock.sendall(request(upstream.host_header, "/passthrough"))
        reader = Reader(sock)
        early = reader.until(b"\r\n\r\n")
        final = reader.until(b"\r\n\r\n")
        body = b""
        while (size := int(reader.until(b"\r\n") or b"0", 16)) > 0:
            body += (reader.exactly(size + 2) or b"")[:-2]
        trailers = reader.until(b"\r\n\r\n")
    assert early == b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload"
    assert final is not None and final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Encoding: gzip\r\n" in final + b"\r\n"
    assert body == gzipped
    assert trailers == b"X-Checksum: sha256-abc"


def test_the_agent_serves_nginx_normally_after_every_fault(
    fault_agent: FaultAgent, nginx: Nginx
) -> None:
    mark = nginx.mark()
    outcome = exchange(fault_agent.socket, request(nginx.host_header, "/echo/after-faults"))
    assert outcome.status == 200
    assert [
        e["request"] for e in nginx.access_log(mark, wait_for=1) if "after-faults" in e["request"]
    ] == ["GET /echo/after-faults HTTP/1.1"]
    fault_agent.assert_alive_and_quiet()
