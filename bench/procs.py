"""Processes under measurement: starting, stopping, and reading their cost from /proc.

CPU is read as utime + stime of ``/proc/PID/stat`` (every thread of the
process included), so a figure covers exactly the processes named, however
the machine's other processes behave. Memory is the resident set
(``VmRSS``) read from ``/proc/PID/status``; a sampler thread records its
peak while a transfer runs, which works for every peer alike (resetting
``VmHWM`` needs write access to ``clear_refs``, which a non-dumpable agent
only grants to root).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 10.0
POLL = 0.02

#: Searched after PATH: Debian keeps nginx and haproxy in sbin.
EXTRA_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class BenchError(RuntimeError):
    """A peer failed to start or answered wrongly: the run cannot give a fair figure."""


def find_tool(name: str) -> str | None:
    """The absolute path of the program ``name`` (PATH, then the sbin folders), or None."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_TOOL_DIRS])
    found = shutil.which(name, path=search)
    return os.path.abspath(found) if found else None


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 1,000 idle clients need the descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    ready: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None
) -> None:
    """Poll ``ready`` until true; fail after ``timeout`` or as soon as ``alive`` says no."""
    deadline = time.monotonic() + timeout
    while not ready():
        if alive is not None and not alive():
            raise BenchError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:g} s")
        time.sleep(POLL)


def unix_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


def tcp_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- /proc ------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces


@dataclass(frozen=True)
class CpuSample:
    """CPU used so far by some processes, read two ways (see ``cpu_between``)."""

    #: utime + stime of /proc/PID/stat: every thread that ever ran, in 10 ms steps.
    coarse: float
    #: The scheduler's run time of the live threads (/proc/PID/task/TID/schedstat), in ns.
    precise: float
    tids: frozenset[int]


def cpu_sample(pids: Iterable[int]) -> CpuSample:
    """Read the CPU used by ``pids`` so far (a gone pid counts 0)."""
    ticks, precise_ns, tids = 0, 0, set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    precise_ns += int(
                        Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]
                    )
                    tids.add(int(tid))
    return CpuSample(ticks / CLOCK_TICKS, precise_ns / 1e9, frozenset(tids))


def cpu_between(before: CpuSample, after: CpuSample) -> float:
    """Seconds of CPU between two samples.

    The scheduler's nanoseconds when no thread's time can have gone missing
    (no thread ended in between, and the coarse count agrees within its
    step); else the coarse count, which keeps ended threads (stunnel's
    per-connection threads) but moves in 10 ms steps.
    """
    coarse = after.coarse - before.coarse
    precise = after.precise - before.precise
    if before.tids <= after.tids and abs(coarse - precise) <= 2 / CLOCK_TICKS:
        return precise
    return coarse


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (nginx's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
    return sorted(found)


def rss_kib(pids: Iterable[int], field: str = "VmRSS") -> int:
    """The summed ``field`` (VmRSS, VmHWM) of ``pids`` in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
                    break
    return total


class RssSampler:
    """The peak summed VmRSS of some pids while a ``with`` block runs (every 10 ms)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.01) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.before = rss_kib(self.pids)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_kib(self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pids))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of this process's waited-for children so far (curl loops, h2load)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- long-running services ----------------------------------------------------


class Service:
    """A long-running program (a forwarder, the origin), its logs in ``folder``."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        log = open(self.folder / f"{self.name}.log", "ab")  # noqa: SIM115 (closed in stop)
        try:
            self.proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the bench reaches us, not them
            )
        finally:
            log.close()

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``ready``; a failure names the process and shows the end of its log."""
        try:
            wait_until(ready, timeout, self.name, self.alive)
        except BenchError as exc:
            raise BenchError(f"{exc}; its log ends:\n{self.log_tail(10)}") from None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = (self.folder / f"{self.name}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def cpu_pids(self) -> list[int]:
        """The processes whose CPU is the peer's cost (nginx overrides: its workers)."""
        return [self.pid]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its workers too (same new session)
            proc.wait()
