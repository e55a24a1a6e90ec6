"""Listening sockets handed over by a service manager (socket activation).

systemd passes them as file descriptors 3, 4, ... with ``LISTEN_FDS``,
``LISTEN_PID`` and ``LISTEN_FDNAMES`` (sd_listen_fds(3)); launchd hands them
out through ``launch_activate_socket(3)``, by the names of the plist's
``Sockets`` entries. Either way the agent then accepts on sockets it did not
bind, so the first client (the one whose connection started the agent) is
already waiting in the backlog, and the manager keeps the socket files.

The sockets are named ``proxy`` and ``control``. A systemd socket unit can
give only one name to all of its sockets (``FileDescriptorName=`` is per
unit), so a socket whose name is not one of these is recognised by the path
it is bound to instead. Anything else is refused: the agent must never serve
the control plane on a socket it cannot place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

PROXY = "proxy"
CONTROL = "control"
NAMES = (PROXY, CONTROL)

#: sd_listen_fds(3): the first passed descriptor.
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class Inherited:
    """The sockets a service manager passed, by name (possibly only some of them)."""

    manager: str
    sockets: dict[str, socket.socket]


def _check_listening(sock: socket.socket, what: str) -> socket.socket:
    """``sock`` if it is a listening Unix stream socket, else a clear refusal.

    Peer credentials, on which every access decision rests, exist only for
    Unix sockets; an Accept=yes unit would pass connected sockets instead.
    """
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise AgentError(f"{what} is not a Unix stream socket; the agent serves only those.")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise AgentError(
            f"{what} is not listening (a socket unit with Accept=yes?); "
            "the agent needs the listening sockets themselves."
        )
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def _place(
    found: dict[str, socket.socket], name: str, sock: socket.socket, expected: Mapping[str, Path]
) -> None:
    """File ``sock`` under its role: by its name, else by the path it is bound to."""
    role = name if name in NAMES else None
    if role is None:
        bound = sock.getsockname()
        role = next((r for r, path in expected.items() if bound == str(path)), None)
        if role is None:
            raise AgentError(
                f"the service manager passed a socket named {name!r} bound to {bound!r}; the "
                f"agent serves only {expected[PROXY]} and {expected[CONTROL]} (or sockets "
                f"named {PROXY!r} and {CONTROL!r})."
            )
    if role in found:
        raise AgentError(f"the service manager passed two {role} sockets.")
    found[role] = sock


def systemd_sockets(
    expected: Mapping[str, Path], environ: MutableMapping[str, str] = os.environ
) -> dict[str, socket.socket] | None:
    """The sockets systemd passed to this process, or None when it passed none.

    The ``LISTEN_*`` variables are removed (as ``sd_listen_fds(1)`` does), so
    that nothing this process starts later mistakes them for its own.
    """
    pid, count, names = (environ.get(var) for var in _LISTEN_VARS)
    for var in _LISTEN_VARS:
        environ.pop(var, None)
    if pid is None or count is None or pid != str(os.getpid()):
        return None  # not for us: meant for a process that exec'd into this one
    try:
        n = int(count)
    except ValueError:
        raise AgentError(f"LISTEN_FDS={count!r} is not a number.") from None
    labels = names.split(":") if names else []
    found: dict[str, socket.socket] = {}
    for i in range(n):
        fd = LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) else "unknown"
        sock = _check_listening(socket.socket(fileno=fd), f"passed socket {fd} ({name})")
        _place(found, name, sock, expected)
    return found or None


# --- launchd -----------------------------------------------------------------

#: int launch_activate_socket(const char *name, int **fds, size_t *cnt);
LaunchActivateSocket = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
    ctypes.POINTER(ctypes.c_size_t),
)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _launch_activate_socket() -> Callable[..., int]:
    function = ctypes.CDLL("/usr/lib/libSystem.B.dylib").launch_activate_socket
    function.argtypes = LaunchActivateSocket._argtypes_
    function.restype = ctypes.c_int
    return function


def launchd_fds(name: str, function: Callable[..., int]) -> list[int] | None:
    """The descriptors launchd holds for the plist's socket ``name``.

    None when this process was not started by launchd (``ESRCH``) or the
    plist has no such socket (``ENOENT``): the agent then binds it itself.
    The array launchd allocates is freed here; the descriptors are the
    caller's.
    """
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = function(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if err in (errno.ESRCH, errno.ENOENT):
        return None
    if err:
        raise AgentError(f"launchd did not hand over the {name} socket: {os.strerror(err)}.")
    try:
        return [fds[i] for i in range(count.value)]
    finally:
        _libc().free(fds)


def launchd_sockets(
    expected: Mapping[str, Path], function: Callable[..., int] | None = None
) -> dict[str, socket.socket] | None:
    """The sockets launchd activated for this process, or None outside launchd."""
    activate = function or _launch_activate_socket()
    found: dict[str, socket.socket] = {}
    for name in NAMES:
        fds = launchd_fds(name, activate)
        if fds is None:
            continue
        socks = [socket.socket(fileno=fd) for fd in fds]
        if len(socks) != 1:
            for sock in socks:
                sock.close()
            raise AgentError(f"launchd passed {len(socks)} sockets for {name!r}; expected one.")
        _place(found, name, _check_listening(socks[0], f"launchd's {name} socket"), expected)
    return found or None


def inherited_sockets(expected: Mapping[str, Path]) -> Inherited | None:
    """The sockets this platform's service manager passed, or None (bind them yourself)."""
    if sys.platform == "darwin":
        sockets = launchd_sockets(expected)
        return Inherited("launchd", sockets) if sockets else None
    sockets = systemd_sockets(expected)
    return Inherited("systemd", sockets) if sockets else None
