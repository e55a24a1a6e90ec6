"""agent.peer: the kernel's word on who is connected, and proof of its program.

On Linux every test uses real processes on real Unix sockets. The macOS
paths (getpeereid, LOCAL_PEERPID, proc_pidpath, proc_pidinfo) run on CI's
Linux with those ctypes calls replaced by functions that fill the same
buffers the same way, so their parsing and checks are still exercised.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.tools import in_ci

from agent import peer
from agent.errors import AttestationError
from agent.peer import Caller, Executable, Peer, attest, caller_of, exe_path, file_sha256, peer_of

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

#: A child that connects to the socket named in argv[1], then waits for a line on stdin.
CONNECT_AND_WAIT = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "print('connected', flush=True); sys.stdin.readline()"
)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def listening_socket() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="mt-peer-")
    path = os.path.join(folder, "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(8)
        yield server, path
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def connected_child(
    program: list[str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """A child process connected to a socket of ours: (the child, our end)."""
    with listening_socket() as (server, path):
        child = subprocess.Popen(
            [*(program or [sys.executable]), "-c", CONNECT_AND_WAIT, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "connected\n"
            conn, _ = server.accept()
            with conn:
                yield child, conn
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()


def end(child: subprocess.Popen[str]) -> None:
    """Let the child exit and reap it: its pid is free from then on."""
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(10) == 0


# --- the peer's credentials (Linux) ------------------------------------------------


@linux_only
def test_a_socketpair_peer_is_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_of(a) == Peer(os.getpid(), os.getuid(), os.getgid())


@linux_only
def test_the_peer_of_a_connection_is_the_connecting_child() -> None:
    with connected_child() as (child, conn):
        assert peer_of(conn) == Peer(child.pid, os.getuid(), os.getgid())


def test_an_unconnected_socket_has_no_peer_and_no_caller() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert peer_of(sock) is None
        assert caller_of(sock) is None


# --- attesting the program (Linux) ----------------------------------------------------


@linux_only
def test_a_connected_caller_is_attested_with_its_program_and_its_hash() -> None:
    with connected_child() as (child, conn):
        caller = caller_of(conn)
        assert caller is not None and caller.pid == child.pid
        python = os.path.realpath(sys.executable)
        assert caller.exe == python  # the cheap look, for the audit log
        assert caller.executable() == Executable(python, sha256_of(python))
        assert caller.executable() is caller.executable()  # once per connection


@linux_only
def test_a_copy_of_a_program_is_attested_at_its_own_path(tmp_path: Path) -> None:
    copy = tmp_path / "python-copy"
    shutil.copy2(os.path.realpath(sys.executable), copy)
    with connected_child([str(copy)]) as (_, conn):
        caller = caller_of(conn)
        assert caller is not None
        assert caller.executable() == Executable(str(copy), sha256_of(copy))


@linux_only
def test_a_caller_that_has_exited_cannot_be_attested() -> None:
    with connected_child() as (child, conn):
        caller = caller_of(conn)  # taken at connect, as the relay does
        assert caller is not None
        end(child)
        with pytest.raises(AttestationError, match="exited"):
            caller.executable()
        with pytest.raises(AttestationError):  # and it stays refused
            caller.executable()
        assert caller_of(conn) is not None  # the credentials remain; only the program is gone


def _need_root_for(what: str) -> None:
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(f"CI=true but not root: cannot {what}", pytrace=False)
    pytest.skip(f"needs root to {what}")


def _spawn_at_pid(pid: int, tries: int = 200) -> subprocess.Popen[bytes]:
    """A new process with exactly ``pid`` (root: /proc/sys/kernel/ns_last_pid).

    Other processes may fork in between (pytest-xdist workers), so it retries.
    """
    for _ in range(tries):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "30"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} could not be reused in {tries} tries")


def _wait_for_next_tick(ticks: int) -> None:
    """Until the start-time clock (ticks since boot) has moved past ``ticks``."""
    deadline = time.monotonic() + 5
    while peer._linux_boot_ticks() <= ticks:
        assert time.monotonic() < deadline
        time.sleep(0.002)


@linux_only
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "start-time-only"])
def test_a_pid_reused_by_another_process_is_refused(pidfd: bool) -> None:
    _need_root_for("make a pid be reused (ns_last_pid)")
    with connected_child() as (child, conn):
        caller = caller_of(conn)
        assert caller is not None
        stamp = caller._started_by
        assert stamp is not None
        end(child)
        _wait_for_next_tick(stamp)
        impostor = _spawn_at_pid(child.pid)
        try:
            assert exe_path(child.pid) is not None  # the pid names a live process again
            with pytest.raises(AttestationError, match=r"reused|exited"):
                if pidfd:
                    caller.executable()
                else:  # without SO_PEERPIDFD (Linux < 6.5) the start time alone must catch it
                    attest(child.pid, started_by=stamp, sock=None)
        finally:
            impostor.kill()
            impostor.wait()


@linux_only
def test_start_time_is_read_past_a_command_name_with_spaces_and_parentheses(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "a) b (c"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", odd)
    before = peer._linux_boot_ticks()
    proc = subprocess.Popen([str(odd), "30"])
    try:
        after = peer._linux_boot_ticks()
        assert b"(a) b (c)" in Path(f"/proc/{proc.pid}/stat").read_bytes()
        assert before <= peer._linux_start_time(proc.pid) <= after
    finally:
        proc.kill()
        proc.wait()


def test_the_hash_cache_sees_a_binary_rewritten_in_place_with_its_old_mtime(
    tmp_path: Path,
) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"first version\n")
    first = os.stat(program)
    fd = os.open(program, os.O_RDONLY)
    try:
        assert file_sha256(fd) == hashlib.sha256(b"first version\n").hexdigest()
    finally:
        os.close(fd)
    deadline = time.monotonic() + 5
    while os.stat(program).st_ctime_ns == first.st_ctime_ns:  # a coarse clock: next tick
        assert time.monotonic() < deadline
        os.utime(program, ns=(first.st_atime_ns, first.st_mtime_ns))
    with open(program, "r+b") as f:
        f.write(b"other version\n")
    os.utime(program, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert os.stat(program).st_mtime_ns == first.st_mtime_ns
    assert os.stat(program).st_size == first.st_size
    fd = os.open(program, os.O_RDONLY)
    try:
        assert file_sha256(fd) == hashlib.sha256(b"other version\n").hexdigest()
    finally:
        os.close(fd)


@linux_only
def test_exe_path_of_this_process_is_what_the_kernel_says() -> None:
    assert exe_path(os.getpid()) == os.readlink("/proc/self/exe")
    assert exe_path(2**22 + 12345) is None  # above any pid_max: no such process


# --- macOS, with the ctypes calls replaced --------------------------------------------


class FakeSocket:
    """Answers LOCAL_PEERPID like macOS; records what was asked."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.asked: list[tuple[int, int, int]] = []

    def fileno(self) -> int:
        return 7

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        return struct.pack("i", self.pid)


class FakeLibc:
    def __init__(self, uid: int, gid: int, fails: bool = False) -> None:
        self.uid, self.gid, self.fails = uid, gid, fails
        self.fds: list[int] = []

    def getpeereid(self, fd: int, uid_ref: Any, gid_ref: Any) -> int:
        self.fds.append(fd)
        if self.fails:
            return -1
        uid_ref._obj.value = self.uid
        gid_ref._obj.value = self.gid
        return 0


class FakeLibproc:
    """proc_pidpath and proc_pidinfo(PROC_PIDTBSDINFO) for one process."""

    def __init__(self, pid: int, path: str, starts: list[tuple[int, int]]) -> None:
        self.pid = pid
        self.path = path
        self.starts = list(starts)  # one (seconds, microseconds) per call; the last repeats

    def proc_pidpath(self, pid: int, buf: Any, size: int) -> int:
        if pid != self.pid:
            return 0
        raw = os.fsencode(self.path)
        assert size == peer._PROC_PIDPATHINFO_MAXSIZE and len(raw) < size
        ctypes.memmove(buf, raw, len(raw))
        return len(raw)

    def proc_pidinfo(self, pid: int, flavor: int, arg: int, info_ref: Any, size: int) -> int:
        if pid != self.pid:
            return 0
        assert flavor == peer._PROC_PIDTBSDINFO and arg == 0
        info = info_ref._obj
        assert size == ctypes.sizeof(info)
        seconds, micros = self.starts[0] if len(self.starts) == 1 else self.starts.pop(0)
        info.pbi_pid = pid
        info.pbi_start_tvsec = seconds
        info.pbi_start_tvusec = micros
        return size


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch) -> Any:
    """agent.peer believing it runs on macOS; set ``.libc``/``.libproc`` to fakes."""
    state = SimpleNamespace(libc=None, libproc=None)
    monkeypatch.setattr(peer, "sys", SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(peer, "_libc", lambda: state.libc)
    monkeypatch.setattr(peer, "_libproc", lambda: state.libproc)
    return state


def test_proc_bsdinfo_has_the_layout_of_the_macos_sdk() -> None:
    # <sys/proc_info.h>: 136 bytes, the start time at offsets 120 and 128
    assert ctypes.sizeof(peer._BsdInfo) == 136
    assert peer._BsdInfo.pbi_start_tvsec.offset == 120
    assert peer._BsdInfo.pbi_start_tvusec.offset == 128


def test_macos_peer_comes_from_getpeereid_and_local_peerpid(macos: Any) -> None:
    macos.libc = FakeLibc(uid=501, gid=20)
    sock = FakeSocket(pid=4242)
    assert peer_of(sock) == Peer(4242, 501, 20)  # type: ignore[arg-type]
    assert macos.libc.fds == [7]
    assert sock.asked == [(0, 0x002, 4)]  # SOL_LOCAL, LOCAL_PEERPID, an int


def test_macos_peer_is_unknown_when_getpeereid_fails(macos: Any) -> None:
    macos.libc = FakeLibc(uid=501, gid=20, fails=True)
    assert peer_of(FakeSocket(pid=4242)) is None  # type: ignore[arg-type]


def test_macos_exe_path_comes_from_proc_pidpath(macos: Any) -> None:
    macos.libproc = FakeLibproc(4242, "/usr/bin/curl", [(1_700_000_000, 5)])
    assert exe_path(4242) == "/usr/bin/curl"
    assert exe_path(4243) is None


def test_macos_start_time_comes_from_proc_pidinfo(macos: Any) -> None:
    macos.libproc = FakeLibproc(4242, "/usr/bin/curl", [(1_700_000_000, 5)])
    assert peer._macos_start_time(4242) == 1_700_000_000_000_005
    with pytest.raises(AttestationError, match="exited"):
        peer._macos_start_time(4243)


def test_macos_attestation_reads_and_hashes_the_program(macos: Any) -> None:
    python = os.path.realpath(sys.executable)
    macos.libproc = FakeLibproc(4242, python, [(1_700_000_000, 5)])
    caller = Caller(Peer(4242, 501, 20))
    assert caller.exe == python
    assert caller.executable() == Executable(python, sha256_of(python))


def test_macos_attestation_refuses_a_start_time_that_changed_meanwhile(macos: Any) -> None:
    python = os.path.realpath(sys.executable)
    macos.libproc = FakeLibproc(4242, python, [(1_700_000_000, 5), (1_700_000_009, 0)])
    with pytest.raises(AttestationError, match="reused"):
        Caller(Peer(4242, 501, 20)).executable()


def test_macos_attestation_refuses_a_program_it_cannot_read(macos: Any, tmp_path: Path) -> None:
    macos.libproc = FakeLibproc(4242, str(tmp_path / "gone"), [(1_700_000_000, 5)])
    with pytest.raises(AttestationError, match="could not be read"):
        Caller(Peer(4242, 501, 20)).executable()


@linux_only
def test_a_caller_whose_connection_has_closed_is_not_attested_through_a_reused_descriptor() -> None:
    with connected_child() as (_, conn):
        # as uvloop's transports do: an object that names the descriptor by its number
        by_number = socket.socket(fileno=conn.fileno())
        caller = caller_of(by_number)
        assert caller is not None
        conn.close()
        a, b = socket.socketpair()  # takes the lowest free number: the one just freed
        try:
            assert by_number.fileno() in (a.fileno(), b.fileno())
            assert peer_of(by_number) == Peer(os.getpid(), os.getuid(), os.getgid())
            with pytest.raises(AttestationError, match="has closed"):
                caller.executable()
        finally:
            by_number.detach()
            a.close()
            b.close()
