"""Who is on the other end of a Unix socket: the kernel's word, not the caller's.

Linux answers ``SO_PEERCRED`` (pid, uid, gid as of ``connect()``); macOS
answers ``getpeereid`` for uid/gid and ``LOCAL_PEERPID`` for the pid. Any
failure to learn the peer yields ``None`` and the caller refuses: an agent
that cannot tell who is asking fails closed.

A ``Caller`` adds the program behind the pid, attested only when a caller
rule asks for it (reading ``/proc`` and hashing a binary per request would
cost more than the relay itself). A pid names a process only while that
process lives, so the attestation reads the process's start time before and
after looking at its executable and refuses when they differ or when the
process started after the connection was accepted; where Linux offers it
(``SO_PEERPIDFD``, 6.5+), a pidfd taken from the socket proves that the
connecting process is still the one behind the pid. The executable is read
through ``/proc/PID/exe`` itself, so a binary replaced on disk after it was
started is not mistaken for the one running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import platform
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import AttestationError

_SOL_LOCAL = 0  # macOS <sys/un.h>
_LOCAL_PEERPID = 0x002
_PROC_PIDPATHINFO_MAXSIZE = 4096  # macOS <libproc.h>
_PROC_PIDTBSDINFO = 3
#: ``SO_PEERPIDFD`` where its number is the generic one; elsewhere not used.
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", None) or (
    77 if platform.machine() in ("x86_64", "aarch64", "riscv64") else None
)
_HASH_CACHE_SIZE = 256
_READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Executable:
    """A process's program as attested: its path and the SHA-256 of its bytes."""

    path: str
    sha256: str


# --- the peer's credentials ------------------------------------------------------


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@functools.cache
def _libproc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("proc") or "libproc.dylib", use_errno=True)


def _linux(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    if uid < 0 or gid < 0:  # (uid_t)-1: the kernel holds no credentials for this socket
        raise OSError("the socket has no peer credentials")
    return Peer(pid, uid, gid)


def _getpeereid(fd: int) -> tuple[int, int]:
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if _libc().getpeereid(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    return uid.value, gid.value


def _macos(sock: socket.socket) -> Peer:
    uid, gid = _getpeereid(sock.fileno())
    raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, struct.calcsize("i"))
    (pid,) = struct.unpack("i", raw)
    return Peer(pid, uid, gid)


def peer_of(sock: socket.socket) -> Peer | None:
    """The connected peer's pid, uid and gid, or None when it can't be known."""
    try:
        if sys.platform.startswith("linux"):
            return _linux(sock)
        if sys.platform == "darwin":
            return _macos(sock)
    except (OSError, struct.error):
        return None
    return None


# --- a process's start time: what tells a pid's two lives apart ------------------


def _linux_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: clock ticks from boot to the process's start.

    The command name (field 2) is in parentheses and may hold spaces and
    parentheses itself, so the fields are counted from the last ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        raise AttestationError(f"process {pid} has exited") from None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        raise AttestationError(f"/proc/{pid}/stat could not be read") from None


def _linux_boot_ticks() -> int:
    """Now, in the unit and from the origin of ``/proc/PID/stat``'s start time."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


class _BsdInfo(ctypes.Structure):
    """``struct proc_bsdinfo`` (macOS <sys/proc_info.h>)."""

    _fields_ = [
        ("pbi_flags", ctypes.c_uint32),
        ("pbi_status", ctypes.c_uint32),
        ("pbi_xstatus", ctypes.c_uint32),
        ("pbi_pid", ctypes.c_uint32),
        ("pbi_ppid", ctypes.c_uint32),
        ("pbi_uid", ctypes.c_uint32),
        ("pbi_gid", ctypes.c_uint32),
        ("pbi_ruid", ctypes.c_uint32),
        ("pbi_rgid", ctypes.c_uint32),
        ("pbi_svuid", ctypes.c_uint32),
        ("pbi_svgid", ctypes.c_uint32),
        ("rfu_1", ctypes.c_uint32),
        ("pbi_comm", ctypes.c_char * 16),
        ("pbi_name", ctypes.c_char * 32),
        ("pbi_nfiles", ctypes.c_uint32),
        ("pbi_pgid", ctypes.c_uint32),
        ("pbi_pjobc", ctypes.c_uint32),
        ("e_tdev", ctypes.c_uint32),
        ("e_tpgid", ctypes.c_uint32),
        ("pbi_nice", ctypes.c_int32),
        ("pbi_start_tvsec", ctypes.c_uint64),
        ("pbi_start_tvusec", ctypes.c_uint64),
    ]


def _macos_start_time(pid: int) -> int:
    """The process's start, in microseconds since the epoch (``proc_pidinfo``)."""
    info = _BsdInfo()
    size = ctypes.sizeof(info)
    got = _libproc().proc_pidinfo(pid, _PROC_PIDTBSDINFO, 0, ctypes.byref(info), size)
    if got != size or info.pbi_pid != pid:
        raise AttestationError(f"process {pid} has exited")
    return info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec


def _macos_exe_path(pid: int) -> str:
    buf = ctypes.create_string_buffer(_PROC_PIDPATHINFO_MAXSIZE)
    length = _libproc().proc_pidpath(pid, buf, _PROC_PIDPATHINFO_MAXSIZE)
    if length <= 0:
        raise AttestationError(f"the executable of process {pid} could not be read")
    return os.fsdecode(buf.raw[:length])


# --- executables -----------------------------------------------------------------

_hashes: OrderedDict[tuple[int, ...], str] = OrderedDict()


def file_sha256(fd: int) -> str:
    """The hex SHA-256 of an open file, cached by what identifies its content.

    The key is the file's device, inode, size, mtime and ctime: a binary
    rewritten in place changes its ctime even when its mtime is set back,
    so a stale hash is never served. Upgrades replace binaries by rename,
    which changes the inode.
    """
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _hashes.get(key)
    if cached is not None:
        _hashes.move_to_end(key)
        return cached
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _READ_SIZE, offset):
        digest.update(block)
        offset += len(block)
    _hashes[key] = value = digest.hexdigest()
    if len(_hashes) > _HASH_CACHE_SIZE:
        _hashes.popitem(last=False)
    return value


def exe_path(pid: int) -> str | None:
    """The path of a process's executable as the kernel reports it, or None.

    One ``readlink`` on Linux: cheap enough for every connection, which is
    what lets each audit line name the caller's program. Not an attestation.
    """
    try:
        if sys.platform.startswith("linux"):
            return os.readlink(f"/proc/{pid}/exe")
        if sys.platform == "darwin":
            return _macos_exe_path(pid)
    except (OSError, AttestationError):
        return None
    return None


def _open_linux_exe(pid: int) -> tuple[str, int]:
    try:
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AttestationError(
            f"the executable of process {pid} could not be read ({exc.strerror})"
        ) from None
    try:
        return os.readlink(f"/proc/{pid}/exe"), fd
    except OSError as exc:
        os.close(fd)
        raise AttestationError(
            f"the executable of process {pid} could not be read ({exc.strerror})"
        ) from None


def _open_macos_exe(pid: int) -> tuple[str, int]:
    path = _macos_exe_path(pid)
    try:
        return path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AttestationError(f"{path} could not be read ({exc.strerror})") from None


def _peer_pidfd(sock: Any) -> int | None:
    """A pidfd for the process that connected, or None where Linux has none.

    Raises AttestationError when the kernel says that process is gone.
    """
    if _SO_PEERPIDFD is None or sock is None:
        return None
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except ProcessLookupError:
        raise AttestationError("the connecting process has exited") from None
    except OSError:
        return None  # ENOPROTOOPT: a kernel before 6.5


def _still_running(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, only not ours to signal
    return True


@dataclass(frozen=True, slots=True)
class _Platform:
    """How one system answers: a process's start stamp, its program, and now."""

    start_time: Callable[[int], int]
    open_exe: Callable[[int], tuple[str, int]]
    #: The start stamp of a process that began just now (None: no bound is checked).
    now: Callable[[], int] | None


_LINUX = _Platform(_linux_start_time, _open_linux_exe, _linux_boot_ticks)
_MACOS = _Platform(_macos_start_time, _open_macos_exe, None)


def _platform() -> _Platform | None:
    if sys.platform.startswith("linux"):
        return _LINUX
    if sys.platform == "darwin":
        return _MACOS
    return None


def attest(pid: int, *, started_by: int | None = None, sock: Any = None) -> Executable:
    """The executable of process ``pid``, proven to belong to that process.

    ``started_by`` is the platform's start-time stamp at the moment the
    connection was accepted: a process that started later cannot be the
    peer, whatever its pid. ``sock`` is the connection, for its pidfd.
    Raises AttestationError, saying why, whenever any step is in doubt.
    """
    system = _platform()
    if system is None:
        raise AttestationError(f"executables cannot be attested on {sys.platform}")
    pidfd = _peer_pidfd(sock) if system is _LINUX else None
    try:
        before = system.start_time(pid)
        if started_by is not None and before > started_by:
            raise AttestationError(f"pid {pid} was reused: it started after the connection")
        path, fd = system.open_exe(pid)
        try:
            sha256 = file_sha256(fd)
        finally:
            os.close(fd)
        if system.start_time(pid) != before:
            raise AttestationError(f"pid {pid} was reused while its executable was read")
        if pidfd is not None and not _still_running(pidfd):
            raise AttestationError(f"process {pid} exited while its executable was read")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Executable(path, sha256)


class Caller:
    """A process connected to one of the agent's sockets.

    Its pid, uid and gid are the kernel's, taken at connect. ``exe`` is a
    cheap, unattested look at its program for the audit log; ``executable()``
    is the attested program that caller rules match on, worked out once per
    connection and only when asked.
    """

    __slots__ = (
        "_attested", "_connected_exe", "_failure", "_sock", "_started_by",
        "exe", "gid", "pid", "uid",
    )  # fmt: skip

    def __init__(self, peer: Peer, sock: Any = None) -> None:
        self.pid = peer.pid
        self.uid = peer.uid
        self.gid = peer.gid
        system = _platform()
        self._started_by: int | None = system.now() if system and system.now else None
        self._sock = sock
        self.exe: str | None = exe_path(peer.pid)
        # the program at connect: one that execs another later (keeping its pid
        # and start time) must not be taken for that other program
        self._connected_exe = self.exe
        self._attested: Executable | None = None
        self._failure: AttestationError | None = None

    def executable(self) -> Executable:
        """The attested executable; raises AttestationError (and keeps raising it)."""
        if self._attested is not None:
            return self._attested
        if self._failure is not None:
            raise self._failure
        try:
            sock = self._sock
            if sock is not None and peer_of(sock) != Peer(self.pid, self.uid, self.gid):
                # closed, and its descriptor maybe reused by another connection
                raise AttestationError(f"the connection of process {self.pid} has closed")
            attested = attest(self.pid, started_by=self._started_by, sock=sock)
            if self._connected_exe is None or attested.path != self._connected_exe:
                raise AttestationError(
                    f"process {self.pid} runs {attested.path}, not the program that "
                    f"connected ({self._connected_exe or 'unknown'})"
                )
            self._attested = attested
        except AttestationError as exc:
            self._failure = exc
            raise
        self._sock = None
        self.exe = self._attested.path
        return self._attested

    def __repr__(self) -> str:
        return f"Caller(pid={self.pid}, uid={self.uid}, gid={self.gid}, exe={self.exe!r})"


def caller_of(sock: Any) -> Caller | None:
    """The process connected on ``sock``, or None when the kernel cannot say."""
    peer = peer_of(sock)
    return None if peer is None else Caller(peer, sock)
