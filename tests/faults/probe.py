"""Raw-socket clients for the fault suite: what a hostile or a good caller sees.

No HTTP library is used on purpose: a library would refuse to send, or would
normalise, the malformed bytes these tests are about, and would hide whether
an answer was cut short. ``exchange`` sends bytes and reads the first answer
(or the agent closing); ``SteadyClient`` is the well-behaved neighbour whose
latency must not suffer while the hostile cases run; ``record`` feeds the
table of cases, outcomes and times (written where ``MTLS_FAULT_TABLE`` says).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The good client's bound: its p99 during a hostile case stays under
#: max(BOUND_FACTOR x its baseline p99, BOUND_FLOOR). The floor absorbs the
#: noise of a 2-core machine running other test workers; a wedged or blocked
#: agent costs a whole timeout (a second or more) and trips it.
BOUND_FACTOR = 10.0
BOUND_FLOOR = 0.25
STEADY_INTERVAL = 0.01
TABLE_ENV = "MTLS_FAULT_TABLE"


@dataclass
class Response:
    """One HTTP answer as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    #: The body's framing was satisfied (Content-Length reached, last chunk seen,
    #: or, for a body delimited by close, a clean close).
    complete: bool

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict:
        return json.loads(self.body)


class Reader:
    """Buffered reads from a blocking socket; EOF and resets read as b""."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False
        self.reset = False

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            piece = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            piece = b""
        if not piece:
            self.eof = True
            return False
        self.buffer += piece
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self.fill():
                return None
        data, _, self.buffer = self.buffer.partition(marker)
        return data

    def exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not self.fill():
                return None
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def read_response(reader: Reader, *, head_request: bool = False) -> Response | None:
    """The next final answer (1xx skipped), or None when the peer closed before one."""
    while True:
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])
        ]
        if not 100 <= status < 200:
            break
    response = Response(status, headers, b"", True)
    length = response.header("Content-Length")
    chunked = (response.header("Transfer-Encoding") or "").lower() == "chunked"
    if head_request or status in (204, 304):
        return response
    if chunked:
        parts = []
        while True:
            size_line = reader.until(b"\r\n")
            if size_line is None:
                response.complete = False
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:  # trailer lines, then the blank line that ends the body
                while (line := reader.until(b"\r\n")) not in (None, b""):
                    pass
                response.complete = line is not None
                break
            data = reader.exactly(size + 2)
            if data is None:
                parts.append(reader.buffer)
                response.complete = False
                break
            parts.append(data[:-2])
        response.body = b"".join(parts)
    elif length is not None:
        data = reader.exactly(int(length))
        if data is None:
            response.body, response.complete = reader.rest(), False
        else:
            response.body = data
    else:
        response.body = reader.rest()
        response.complete = not reader.reset
    return response


@dataclass
class Outcome:
    """What a client saw: the answer (or none), whether the agent then closed, and when."""

    response: Response | None
    closed: bool
    seconds: float

    @property
    def status(self) -> int | None:
        return self.response.status if self.response else None

    def describe(self) -> str:
        if self.response is None:
            return "closed the connection without an answer"
        r = self.response
        code = r.header("Mtls-Agent-Error")
        text = f"{r.status} {code}" if code else f"{r.status} (upstream's answer)"
        if not r.complete:
            text += ", body cut short and connection aborted"
        elif self.closed:
            text += ", then closed"
        return text


def connect(path: Path | str, timeout: float = 15.0) -> socket.socket:
    """A connection to a Unix socket, waiting for room in its backlog as a blocking
    client does (with a timeout set first, Python would fail at once on a full one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.fspath(path))
    sock.settimeout(timeout)
    return sock


def exchange(
    path: Path | str,
    data: bytes | list[bytes],
    *,
    timeout: float = 15.0,
    pause: float = 0.0,
    head_request: bool = False,
    linger: float = 0.2,
) -> Outcome:
    """Send ``data`` (pieces ``pause`` seconds apart) on a new connection; read one answer.

    Then see whether the agent closes: an answer with ``Connection: close``
    (or cut short) is read to its close; after any other, ``linger`` seconds
    tell whether the agent keeps the connection. The time is from
    the first byte sent to the answer (or to the close when there is none).
    """
    pieces = [data] if isinstance(data, bytes) else data
    with connect(path, timeout) as sock:
        reader = Reader(sock)
        start = time.monotonic()
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # the agent gave up on us: read what it said
        response = read_response(reader, head_request=head_request)
        seconds = time.monotonic() - start
        closed = reader.eof
        if response is not None and not closed:
            wants_close = (response.header("Connection") or "").lower() == "close"
            if wants_close or not response.complete:
                reader.rest()
                closed = True
            elif linger:
                sock.settimeout(linger)
                with contextlib.suppress(TimeoutError):
                    reader.fill()
                closed = reader.eof
    return Outcome(response, closed, seconds)


def request(host: str, path: str = "/echo", *, method: str = "GET", extra: str = "") -> bytes:
    """A well-formed request head (``extra`` holds more header lines, each ending in CRLF)."""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# --- the well-behaved neighbour -------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Window:
    """The good client's requests made while one hostile case ran."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


class SteadyClient:
    """A good client on one keep-alive connection, asking every few milliseconds.

    It runs in a thread for the whole module; ``window()`` collects what it saw
    during one case, and waits on exit until it has completed a few more
    requests, so a case that wedged the agent cannot pass unseen.
    """

    def __init__(self, socket_path: Path, host: str, path: str = "/echo/steady") -> None:
        self.socket_path = socket_path
        self.request = request(host, path)
        self.request_line = f"GET {path} HTTP/1.1"
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.completed = threading.Condition()
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline_p99 = 0.0

    def start(self, baseline_requests: int = 40) -> SteadyClient:
        self._thread.start()
        self.wait_for(baseline_requests)
        self.baseline_p99 = percentile(self.latencies, 99)
        return self

    @property
    def bound(self) -> float:
        return max(BOUND_FACTOR * self.baseline_p99, BOUND_FLOOR)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        with self.completed:
            target = self.count + n
            self.completed.wait_for(lambda: self.count >= target, timeout)

    @contextlib.contextmanager
    def window(self, settle: int = 3) -> Iterator[Window]:
        first_latency, first_failure = len(self.latencies), len(self.failures)
        result = Window()
        yield result
        self.wait_for(settle)
        result.latencies = self.latencies[first_latency:]
        result.failures = self.failures[first_failure:]

    def _run(self) -> None:
        sock: socket.socket | None = None
        reader: Reader | None = None
        while not self._stop.is_set():
            try:
                if sock is None:
                    sock = connect(self.socket_path, timeout=10)
                    reader = Reader(sock)
                start = time.monotonic()
                sock.sendall(self.request)
                response = read_response(reader)  # type: ignore[arg-type]
                elapsed = time.monotonic() - start
                if response is None or response.status != 200 or not response.complete:
                    raise OSError(f"bad answer: {response}")
                self.latencies.append(elapsed)
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
            with self.completed:
                self.count += 1
                self.completed.notify_all()
            time.sleep(STEADY_INTERVAL)
        if sock is not None:
            sock.close()


def assert_served_normally(window: Window, steady: SteadyClient) -> None:
    """The good client saw no failure and no slowdown while the case ran."""
    assert window.failures == [], window.failures
    assert window.latencies, "the good client completed no request during the case"
    assert window.p99 < steady.bound, (
        f"good client's p99 {window.p99 * 1000:.1f} ms during the case, bound "
        f"{steady.bound * 1000:.1f} ms (baseline p99 {steady.baseline_p99 * 1000:.1f} ms)"
    )


# --- the table of cases -----------------------------------------------------------


def record(case: str, did: str, seconds: float | None, window: Window | None = None) -> None:
    """One row of the fault table: appended as JSON to $MTLS_FAULT_TABLE when it is set.

    ``seconds`` is how long the case took to settle (None: not a timed case);
    ``window`` adds what the good client saw meanwhile.
    """
    target = os.environ.get(TABLE_ENV)
    if not target:
        return
    note = ""
    if window is not None and window.latencies:
        note = f"good client: p99 {window.p99 * 1000:.1f} ms, {len(window.failures)} failures"
    row = {"case": case, "did": did, "seconds": seconds and round(seconds, 3), "note": note}
    with open(target, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def audited(log: Path, found: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    """The first request line of the agent's audit log that ``found`` picks
    (the log's writer appends in batches, every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == "request" and found(entry):
                    return entry
        assert time.monotonic() < deadline, f"no such request line in {log}"
        time.sleep(0.02)
