"""Hostile input on the control socket: a 4xx, and the agent unlocks and serves after.

The control socket is aiohttp's server. Bytes that are not HTTP at all are
refused by aiohttp's own parser (a plain-text 400 and a close) before any of
the agent's code runs; everything that parses as HTTP gets the agent's JSON
error body. The cases run while the agent is locked; afterwards the real
``agentctl unlock`` must work and the proxy must serve nginx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.nginx import Nginx

from faults.conftest import FaultAgent, unlock
from faults.probe import exchange, record, request

BIG = 50 << 20  # 50 MiB: far over control_body_bytes (64 KiB)


def _post(body: bytes, path: str = "/v1/unlock", content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _chunked_post(total: int) -> list[bytes]:
    piece = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
    return (
        [b"POST /v1/unlock HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n"]
        + [piece] * (total // 0x100000)
        + [b"0\r\n\r\n"]
    )


@dataclass(frozen=True)
class ControlCase:
    id: str
    data: bytes | list[bytes]
    status: int
    code: str | None  # the JSON error code, or None for aiohttp's own refusal of non-HTTP


CASES = [
    ControlCase("garbage-bytes", b"\x00\xff\x13garbage\r\n\r\n", 400, None),
    ControlCase("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),
    ControlCase(
        "header-line-70kib",
        b"GET /v1/status HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        400,
        None,
    ),
    ControlCase(
        "content-length-and-chunked",
        b"POST /v1/lock HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        None,
    ),
    ControlCase(
        "body-50mib",
        [_post(b"").replace(b"Length: 0", b"Length: %d" % BIG)] + [b"{" * (1 << 20)] * (BIG >> 20),
        413,
        "too-large",
    ),
    ControlCase("body-50mib-chunked", _chunked_post(BIG), 413, "too-large"),
    ControlCase("body-not-json", _post(b"\x00garbage{"), 400, "bad-request"),
    ControlCase("body-invalid-utf8", _post(b'{"passphrase": "\xff\xfe"}'), 400, "bad-request"),
    ControlCase("body-nested-30000-deep", _post(b"[" * 30000 + b"]" * 30000), 400, "bad-request"),
    ControlCase("body-integer-5000-digits", _post(b"9" * 5000), 400, "bad-request"),
    ControlCase("body-array", _post(b'["passphrase"]'), 400, "bad-request"),
    ControlCase("body-null", _post(b"null"), 400, "bad-request"),
    ControlCase("passphrase-number", _post(b'{"passphrase": 5}'), 400, "bad-request"),
    ControlCase("passphrase-list", _post(b'{"passphrase": ["a"]}'), 400, "bad-request"),
    ControlCase("passphrase-object", _post(b'{"passphrase": {"a": 1}}'), 400, "bad-request"),
    ControlCase("passphrase-null", _post(b'{"passphrase": null}'), 400, "bad-request"),
    ControlCase("passphrase-empty", _post(b'{"passphrase": ""}'), 400, "bad-request"),
    ControlCase(
        "passphrase-lone-surrogate", _post(b'{"passphrase": "\\ud800"}'), 400, "bad-request"
    ),
    ControlCase("unknown-path", _post(b"{}", "/v1/nothing"), 404, "bad-request"),
    ControlCase("wrong-method", b"GET /v1/unlock HTTP/1.1\r\nHost: a\r\n\r\n", 405, "bad-request"),
]


@pytest.fixture(scope="module")
def locked_agent(fault_agent: FaultAgent) -> Iterator[FaultAgent]:
    fault_agent.env.agentctl("lock")
    yield fault_agent


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_control_request_gets_a_4xx(locked_agent: FaultAgent, case: ControlCase) -> None:
    outcome = exchange(locked_agent.env.control_socket, case.data, timeout=30)
    response = outcome.response
    if response is not None:
        kind = "JSON " + json.loads(response.body)["error"] if case.code else "aiohttp's plain 400"
        record(f"control: {case.id}", f"{response.status} {kind}", outcome.seconds)
    assert response is not None, "the agent closed without answering"
    assert response.status == case.status, (response.status, response.body[:300])
    if case.code is None:
        assert outcome.closed  # aiohttp ends a connection it could not parse
    else:
        assert (response.header("Content-Type") or "").startswith("application/json")
        body = json.loads(response.body)
        assert body["error"] == case.code and body["message"], body
    assert outcome.seconds < 5
    assert locked_agent.agent.alive()


def test_the_agent_unlocks_and_serves_after_hostile_control_input(
    locked_agent: FaultAgent, nginx: Nginx
) -> None:
    for case in CASES:
        exchange(locked_agent.env.control_socket, case.data, timeout=30)
    status = json.loads(locked_agent.env.agentctl("status", "--json").stdout)
    assert status["state"] == "locked"
    unlock(locked_agent.env)
    outcome = exchange(locked_agent.socket, request(nginx.host_header, "/echo/after-control"))
    assert outcome.status == 200
    assert outcome.response.header("X-Client-Verify") == "SUCCESS"  # type: ignore[union-attr]
    assert locked_agent.agent.alive()
