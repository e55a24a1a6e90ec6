"""Tell systemd how the agent is doing: sd_notify over ``NOTIFY_SOCKET``.

The protocol is one datagram of ``KEY=VALUE`` lines to the socket named in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace), so
there is no need for libsystemd. With ``Type=notify`` systemd waits for
``READY=1`` before it calls the service started, which is what lets socket
activation hand a first client to an agent that can already answer it.
Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace: a leading NUL byte
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """A connection to systemd's notification socket, or nothing outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get(NOTIFY_ENV, "")
        self._sock: socket.socket | None = None
        self._stopping = False
        if not value.startswith(("/", "@")):
            return  # unset, or a transport (vsock) this agent does not speak
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(_address(value))
        except OSError as exc:
            sock.close()
            log.warning("cannot reach systemd's notification socket %s: %s", value, exc)
            return
        self._sock = sock

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> None:
        """Send ``KEY=VALUE`` lines (``ready="1"`` becomes ``READY=1``) in one datagram.

        A failure is logged and otherwise ignored: systemd going away must
        not take the agent down with it.
        """
        if self._sock is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.send(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status)

    def status(self, status: str) -> None:
        if not self._stopping:  # the last word while stopping is "stopping"
            self.send(status=status)

    def stopping(self) -> None:
        self._stopping = True
        self.send(stopping="1", status="stopping")
