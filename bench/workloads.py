"""The workloads, each measured the same way for every peer.

A peer here is anything a client can send a request through: a forwarder's
Unix socket, the floor (plain HTTP from the origin itself), or curl doing
its own mTLS ("direct"). ``Route`` names how a client reaches the origin
through it; each function returns one round's figures as a flat dict, and
raises ``BenchError`` when the peer answered wrongly (a failed figure is
reported, never averaged in).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    BenchError,
    RssSampler,
    children_cpu_seconds,
    cpu_between,
    cpu_sample,
    find_tool,
    machine_busy_seconds,
    rss_kib,
)

#: A bound on every client command: a wedged peer fails the figure, not the run.
COMMAND_TIMEOUT = 600.0
#: Memory and throughput are in decimal megabytes, as the targets are.
MB = 1e6
#: How long making the idle connections may take, all together.
CONNECT_TIMEOUT = 30.0

# h2load's summary lines
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)

CURL_LOOP = """\
n=$1; shift; i=0
while [ "$i" -lt "$n" ]; do "$@" || exit 1; i=$((i+1)); done
"""


@dataclass(frozen=True)
class Route:
    """How a client reaches the origin through one peer."""

    name: str
    #: The Unix socket clients connect to; None for curl doing its own mTLS.
    socket: Path | None
    #: The URL prefix a client asks for (``http://localhost:PORT`` through a
    #: socket, ``https://localhost:PORT`` direct).
    base_url: str
    #: Processes whose CPU and memory are the peer's cost (empty: none).
    pids: tuple[int, ...] = ()
    #: Extra curl arguments (the client certificate, for direct).
    curl_args: tuple[str, ...] = ()

    def curl(self, path: str, *extra: str) -> list[str]:
        exe = find_tool("curl")
        if exe is None:
            raise BenchError("curl is not installed")
        via = ("--unix-socket", str(self.socket)) if self.socket else ()
        return [exe, "-fsS", *via, *self.curl_args, *extra, self.base_url + path]


def _run(cmd: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, **kwargs
        )  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer within {COMMAND_TIMEOUT:g} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchError(f"{what}: exit {proc.returncode}: {' / '.join(detail)}")
    return proc


# --- A: the script pattern --------------------------------------------------------


def script_pattern(route: Route, requests: int, warmup: int = 5) -> dict[str, float]:
    """``requests`` sequential curl processes, one GET /small each, from a shell loop.

    Mean wall time per request, the peer's CPU per new client connection,
    and the client side's CPU (sh + curl) per request.
    """
    one = route.curl("/small", "-o", os.devnull)
    _run(["sh", "-c", CURL_LOOP, "sh", str(warmup), *one], f"A {route.name} warm-up")
    cpu0, client0 = cpu_sample(route.pids), children_cpu_seconds()
    started = time.perf_counter()
    _run(["sh", "-c", CURL_LOOP, "sh", str(requests), *one], f"A {route.name}")
    wall = time.perf_counter() - started
    cpu = cpu_between(cpu0, cpu_sample(route.pids))
    client = children_cpu_seconds() - client0
    return {
        "ms_per_request": wall / requests * 1e3,
        "peer_cpu_us_per_connection": cpu / requests * 1e6 if route.pids else math.nan,
        "client_cpu_us_per_request": client / requests * 1e6,
    }


# --- B: the service pattern --------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """One h2load run: its summary and the latencies of its successful requests."""

    seconds: float
    rate: float
    succeeded: int
    failed: int
    latencies_us: list[int]
    loadgen_cpu: float
    wall: float


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


def _duration(seconds: float) -> str:
    """h2load's spelling of a duration (it takes no fractions of a second)."""
    return f"{round(seconds * 1000)}ms"


def h2load(
    socket_path: Path,
    url: str,
    *,
    clients: int,
    duration: float,
    log: Path | None,
    warmup: float = 0.0,
) -> LoadResult:
    """A closed loop of ``clients`` keep-alive HTTP/1.1 connections for ``duration`` s.

    One h2load thread: the other core is left to the peer and the origin.
    """
    exe = find_tool("h2load")
    if exe is None:
        raise BenchError("h2load is not installed (Debian: nghttp2-client)")
    cmd = [
        exe,
        "--h1",
        "-t1",
        f"-c{clients}",
        "-D",
        _duration(duration),
        "-B",
        f"unix:{socket_path}",
    ]
    if warmup:
        cmd += [f"--warm-up-time={_duration(warmup)}"]
    if log is not None:
        with contextlib.suppress(FileNotFoundError):
            log.unlink()  # h2load appends
        cmd += ["--log-file", str(log)]
    before = children_cpu_seconds()
    started = time.perf_counter()
    proc = _run([*cmd, url], f"h2load {url} via {socket_path.name}")
    wall = time.perf_counter() - started
    loadgen_cpu = children_cpu_seconds() - before
    finished = _FINISHED.search(proc.stdout)
    counts = _REQUESTS.search(proc.stdout)
    if not finished or not counts:
        raise BenchError(f"h2load printed no summary: {proc.stdout[-500:]}")
    succeeded = int(counts[2])
    failed = sum(int(counts[i]) for i in (3, 4, 5))
    latencies: list[int] = []
    if log is not None:
        with open(log) as f:
            for line in f:
                fields = line.split("\t")
                if len(fields) >= 3 and fields[1] == "200":
                    latencies.append(int(fields[2]))
        latencies.sort()
    seconds = float(finished[1]) * (1e-3 if finished[2] == "ms" else 1.0)
    rate = float(finished[3])
    return LoadResult(seconds, rate, succeeded, failed, latencies, loadgen_cpu, wall)


def service_pattern(
    route: Route,
    origin_pids: tuple[int, ...],
    scratch: Path,
    *,
    clients: int,
    duration: float,
    warmup: float,
) -> dict[str, float]:
    """``clients`` keep-alive connections in a closed loop on /small, after a warm-up run.

    The warm-up is its own h2load run, so the CPU window of the measured run
    holds nothing but it. The load generator's and the origin's CPU are
    reported so that a saturated one shows.
    """
    assert route.socket is not None
    url = route.base_url + "/small"
    h2load(route.socket, url, clients=clients, duration=warmup, log=None)
    cpu0, origin0, busy0 = cpu_sample(route.pids), cpu_sample(origin_pids), machine_busy_seconds()
    result = h2load(
        route.socket, url, clients=clients, duration=duration, log=scratch / "h2load.log"
    )
    cpu = cpu_between(cpu0, cpu_sample(route.pids))
    origin_cpu = cpu_between(origin0, cpu_sample(origin_pids))
    others = machine_busy_seconds() - busy0 - cpu - origin_cpu - result.loadgen_cpu
    if result.failed or not result.succeeded:
        raise BenchError(
            f"B {route.name}: {result.failed} requests failed, {result.succeeded} succeeded"
        )
    return {
        "req_per_s": result.rate,
        "p50_ms": percentile(result.latencies_us, 0.50) / 1e3,
        "p99_ms": percentile(result.latencies_us, 0.99) / 1e3,
        "peer_cpu_us_per_request": cpu / result.succeeded * 1e6,
        "peer_cpu_percent": cpu / result.wall * 100,
        "loadgen_cpu_percent": result.loadgen_cpu / result.wall * 100,
        "origin_cpu_percent": origin_cpu / result.wall * 100,
        # anything else the machine ran meanwhile: high means the figures are noisy
        "others_cpu_percent": max(0.0, others) / result.wall * 100,
    }


# --- C: streaming ------------------------------------------------------------------


def streaming(route: Route, size: int, upload_file: Path) -> dict[str, float]:
    """GET /big and POST /upload of ``size`` bytes: MB/s and the peer's memory.

    Memory is the peer's resident set sampled every 10 ms during each
    transfer, against its resting size just before.
    """
    figures: dict[str, float] = {}
    for direction in ("get", "post"):
        if direction == "get":
            cmd = route.curl("/big", "-o", os.devnull, "-w", "%{http_code} %{size_download}")
        else:
            cmd = route.curl(
                "/upload",
                "-T",
                str(upload_file),
                "-X",
                "POST",
                "-w",
                "\n%{http_code} %{size_upload}",
            )
        with RssSampler(route.pids) as rss:
            started = time.perf_counter()
            proc = _run(cmd, f"C {direction.upper()} {route.name}")
            wall = time.perf_counter() - started
        lines = proc.stdout.strip().splitlines()
        status, moved = lines[-1].split()
        if status != "200" or int(moved) != size:
            raise BenchError(f"C {direction.upper()} {route.name}: status {status}, {moved} bytes")
        if direction == "post" and lines[0] != f"received {size}":
            raise BenchError(f"C POST {route.name}: the origin got {lines[0]!r}")
        figures[f"{direction}_mb_per_s"] = size / wall / 1e6
        if route.pids:
            figures[f"{direction}_rss_rest_mb"] = rss.before * 1024 / MB
            figures[f"{direction}_rss_peak_mb"] = rss.peak * 1024 / MB
            figures[f"{direction}_rss_growth_mb"] = (rss.peak - rss.before) * 1024 / MB
    return figures


# --- D: idle connections -----------------------------------------------------------


def idle_connections(route: Route, count: int, settle: float = 0.5) -> dict[str, float]:
    """Hold ``count`` idle client connections; memory per connection, and a request
    served on a fresh connection meanwhile. Every held connection must still be open."""
    assert route.socket is not None
    one = route.curl("/small", "-o", os.devnull)
    _run(one, f"D idle {route.name} before")
    rest = rss_kib(route.pids)
    held: list[socket.socket] = []
    retries = 0
    try:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        for _ in range(count):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.setblocking(False)
            while True:  # a full listen backlog answers EAGAIN: wait for the peer to accept
                try:
                    s.connect(str(route.socket))
                    break
                except BlockingIOError:
                    retries += 1
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"D idle {route.name}: {len(held)} of {count} connections made "
                            f"in {CONNECT_TIMEOUT:g} s"
                        ) from None
                    time.sleep(0.001)
        time.sleep(settle)  # let the peer accept them all (and stunnel dial its upstreams)
        started = time.perf_counter()
        _run(one, f"D idle {route.name} with {count} held")
        request_ms = (time.perf_counter() - started) * 1e3
        time.sleep(settle)
        loaded = rss_kib(route.pids)
        still_open = 0
        for s in held:
            try:
                still_open += s.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
    finally:
        for s in held:
            s.close()
    if still_open != count:
        raise BenchError(
            f"D idle {route.name}: only {still_open} of {count} connections stayed open"
        )
    return {
        "idle_kib_per_connection": (loaded - rest) / count,
        "idle_rss_mb": loaded * 1024 / MB,
        "request_ms_while_held": request_ms,
        "connect_retries": retries,
    }


def write_sparse(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that occupies no disk (the POST body)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path
