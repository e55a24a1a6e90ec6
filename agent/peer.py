"""Who is on the other end of a Unix socket: the kernel's word, not the caller's.

Linux answers ``SO_PEERCRED`` (pid, uid, gid as of ``connect()``); macOS
answers ``getpeereid`` for uid/gid and ``LOCAL_PEERPID`` for the pid. Any
failure to learn the peer yields ``None`` and the caller refuses: an agent
that cannot tell who is asking fails closed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
import sys
from dataclasses import dataclass

_SOL_LOCAL = 0  # macOS <sys/un.h>
_LOCAL_PEERPID = 0x002


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def _linux(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _getpeereid(fd: int) -> tuple[int, int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0:
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
