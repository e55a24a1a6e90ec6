"""atheris (libFuzzer) target: the relay's request side, coverage-guided.

The same harness as the hypothesis tests (``head_harness``): the real
``ProxyServer`` in this process, each input sent over a socketpair and
half-closed; any rule broken raises ``HeadFault`` and libFuzzer keeps the
input as a crash file. The suite runs a few thousand iterations as a smoke
test; a real run, from the repository root:

    PYTHONPATH=tests:. .venv/bin/python tests/faults/fuzz_request_head.py \\
        -max_total_time=300 -max_len=4096 /tmp/head-corpus

(``pip install atheris``: Linux wheels; the first argument-less folder is the
corpus, kept between runs.)
"""

from __future__ import annotations

import sys

import atheris
import httptools  # noqa: F401

# What the relay builds on is imported first, uninstrumented: only the relay's
# own modules, imported in the block, give coverage feedback (llhttp is C).
import agent.keychain

with atheris.instrument_imports():
    import agent.forward.http
    import agent.forward.relay  # noqa: F401

from faults.head_harness import HeadHarness

SEEDS = (
    b"GET /echo HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a.example:8443\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET http://user@[::1]:1/ HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n",
)

harness: HeadHarness | None = None


def test_one_input(data: bytes) -> None:
    assert harness is not None
    harness.check(data)


def main() -> None:
    global harness
    harness = HeadHarness()
    for seed in SEEDS:
        harness.check(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
