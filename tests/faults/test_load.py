"""Load: 4,096 idle clients, two hundred busy ones, and memory that stays put.

The clients are asyncio streams in this process speaking raw HTTP/1.1 on
the agent's Unix socket; the upstream is the real nginx. Each test prints
its figures (``-s`` shows them) and records them in the fault table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.nginx import Nginx, raise_nofile_limit
from support.pki import Pki

from faults.conftest import FaultAgent, start_fault_agent
from faults.probe import percentile, record

IDLE_CLIENTS = 4096  # DESIGN: "at least 4,096 concurrent clients"
WAVE = 64
BURST = 1000
CONCURRENT = 200
PER_CLIENT = 50
WARM_UP_PER_CLIENT = 10
RSS_BOUND_MIB = 16.0

#: Defaults but for a keep-alive long enough to hold the idle clients through the test.
LOAD_LIMITS = """\
[limits]
keepalive_idle = "120s"
"""


@pytest.fixture(scope="module")
def load_agent(pki: Pki) -> Iterator[FaultAgent]:
    raise_nofile_limit()
    fa = start_fault_agent(pki, LOAD_LIMITS)
    try:
        yield fa
    finally:
        fa.agent.stop()
        fa.env.cleanup()


class Client:
    """One keep-alive connection that sends a GET and reads the answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def get(self, request: bytes) -> tuple[int, float]:
        start = time.monotonic()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status, time.monotonic() - start

    def close(self) -> None:
        self.writer.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_4096_idle_keepalive_clients_do_not_slow_new_requests(
    load_agent: FaultAgent, nginx: Nginx
) -> None:
    req = f"GET /echo/idle HTTP/1.1\r\nHost: {nginx.host_header}\r\n\r\n".encode()
    idle: list[Client] = []
    try:
        for _ in range(IDLE_CLIENTS // WAVE):  # they arrive in waves, each asks once
            wave = await asyncio.gather(*(Client.open(load_agent.socket) for _ in range(WAVE)))
            idle += wave
            firsts = await asyncio.gather(*(c.get(req) for c in wave))
            assert {status for status, _ in firsts} == {200}

        fresh_latencies = []
        for _ in range(50):  # new callers, one after another, while the others sit idle
            client = await Client.open(load_agent.socket)
            status, latency = await client.get(req)
            client.close()
            assert status == 200
            fresh_latencies.append(latency)

        # the idle ones were kept, not dropped to make room
        seconds = await asyncio.gather(*(c.get(req) for c in idle))
        assert {status for status, _ in seconds} == {200}
    finally:
        for c in idle:
            c.close()
    worst = max(fresh_latencies)
    p50 = percentile(fresh_latencies, 50)
    print(
        f"\n{IDLE_CLIENTS} idle clients held; new requests p50 {p50 * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms"
    )
    record(
        f"load: {IDLE_CLIENTS} idle keep-alive clients + 50 new requests",
        f"all served; new p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms",
        worst,
    )
    assert worst < 1.0


async def _run_clients(
    path: Path, request: bytes, clients: int, per_client: int
) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    failures: list[str] = []

    async def one() -> None:
        try:
            client = await Client.open(path)
        except OSError as exc:
            failures.append(f"connect: {exc}")
            return
        try:
            for _ in range(per_client):
                status, latency = await client.get(request)
                if status != 200:
                    failures.append(f"status {status}")
                latencies.append(latency)
        except (OSError, asyncio.IncompleteReadError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies, failures


async def test_two_hundred_concurrent_clients_see_no_failure_and_memory_stays_bounded(
    load_agent: FaultAgent, nginx: Nginx
) -> None:
    req = f"GET /echo/load HTTP/1.1\r\nHost: {nginx.host_header}\r\n\r\n".encode()
    path = load_agent.socket
    _, warm_failures = await _run_clients(path, req, CONCURRENT, WARM_UP_PER_CLIENT)
    assert warm_failures == []
    before = _rss_kib(load_agent.agent.pid)
    start = time.monotonic()
    latencies, failures = await _run_clients(path, req, CONCURRENT, PER_CLIENT)
    elapsed = time.monotonic() - start
    after = _rss_kib(load_agent.agent.pid)

    total = CONCURRENT * PER_CLIENT
    growth_mib = (after - before) / 1024
    p99 = percentile(latencies, 99)
    print(
        f"\n{CONCURRENT} clients x {PER_CLIENT} requests: {len(failures)} failures, "
        f"{total / elapsed:.0f} req/s, p99 {p99 * 1000:.1f} ms; agent RSS "
        f"{before / 1024:.1f} -> {after / 1024:.1f} MiB ({growth_mib:+.1f} MiB)"
    )
    record(
        f"load: {CONCURRENT} concurrent clients x {PER_CLIENT} requests",
        f"{len(failures)} failures, {total / elapsed:.0f} req/s, p99 {p99 * 1000:.1f} ms, "
        f"RSS {growth_mib:+.1f} MiB over {total} requests after warm-up",
        elapsed,
    )
    assert failures == []
    assert len(latencies) == total
    assert growth_mib <= RSS_BOUND_MIB
    assert load_agent.agent.alive()


async def test_a_burst_of_a_thousand_connects_is_queued_not_refused(load_agent: FaultAgent) -> None:
    """DESIGN.md promises a listen backlog of at least 1,024 on the proxy socket.

    A Unix socket whose backlog is full refuses a non-blocking connect
    (EAGAIN): curl then fails, and asyncio even mistakes it for a connected
    socket whose first read fails with EINVAL. A thousand callers starting at
    once must all be queued and answered.
    """
    req = b"GET / HTTP/1.1\r\nHost: unbound.example\r\n\r\n"  # answered by the agent itself
    clients = await asyncio.gather(
        *(Client.open(load_agent.socket) for _ in range(BURST)), return_exceptions=True
    )
    opened = [c for c in clients if isinstance(c, Client)]
    answers = await asyncio.gather(*(c.get(req) for c in opened), return_exceptions=True)
    for c in opened:
        c.close()
    failures = [repr(a) for a in [*clients, *answers] if isinstance(a, BaseException)]
    record(
        f"load: burst of {BURST} simultaneous connects",
        f"{BURST - len(failures)} answered, {len(failures)} failed",
        None,
    )
    assert failures == [], f"{len(failures)} of {BURST} failed, e.g. {failures[:3]}"
    assert {status for status, _ in answers} == {403}  # type: ignore[misc]
