"""What logind says on the system bus: the machine is about to sleep, a session locks.

Locking on suspend is only worth something if it happens *before* the
machine sleeps (a suspended laptop keeps its memory powered). So, as screen
lockers do, the watcher holds a "delay" inhibitor lock on sleep while it
runs: logind then waits (up to its ``InhibitDelayMaxSec``) after sending
``PrepareForSleep(true)`` until the lock's descriptor is closed, which the
watcher does only once the agent is locked; it takes a new one on resume.
Session ``Lock`` signals lock the agent when the session is one of this
user's (an unreadable session fails closed: it locks).

logind hands inhibitor locks out as file descriptors, and jeepney passes
descriptors on its blocking connections only, so the watcher is a thread of
its own that calls back into the agent and waits for the lock to be done.

The bus is the system bus, or ``DBUS_SYSTEM_BUS_ADDRESS`` where it is set:
the standard variable every D-Bus library honours, which is also how the
tests point the agent at a private bus with a logind of their own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, suppress
from typing import Any

from jeepney import DBusAddress, HeaderFields, MatchRule, MessageType, Properties, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection

log = logging.getLogger(__name__)

LOGIND = "org.freedesktop.login1"
MANAGER_PATH = "/org/freedesktop/login1"
MANAGER_INTERFACE = "org.freedesktop.login1.Manager"
SESSION_INTERFACE = "org.freedesktop.login1.Session"

SUSPEND = "suspend"
SESSION_LOCK = "session-lock"

#: Seconds to wait for a reply from the bus or logind.
CALL_TIMEOUT = 5.0

_MANAGER = DBusAddress(MANAGER_PATH, bus_name=LOGIND, interface=MANAGER_INTERFACE)


def _error_text(reply: Any) -> str:
    if reply.body and isinstance(reply.body[0], str):
        return reply.body[0]
    return str(reply.header.fields.get(HeaderFields.error_name, "an error"))


def _signal_rule(interface: str, member: str, path: str | None, sender: str | None) -> MatchRule:
    fields: dict[str, Any] = {"type": "signal", "interface": interface, "member": member}
    if path is not None:
        fields["path"] = path
    if sender is not None:
        fields["sender"] = sender
    return MatchRule(**fields)


class LogindWatcher:
    """Calls ``lock(reason)`` on suspend and on this user's session locks.

    ``lock`` is called in the watcher's thread and must return once the
    agent is locked: only then is the machine let go to sleep.
    """

    def __init__(
        self,
        lock: Callable[[str], None],
        *,
        suspend: bool,
        session_lock: bool,
    ) -> None:
        self._lock = lock
        self._suspend = suspend
        self._session_lock = session_lock
        self._uid = os.getuid()
        self._conn: DBusConnection | None = None
        self._guard = threading.Lock()
        self._stopped = False
        #: True while subscribed: what ``agentctl status`` reports as in force.
        self.watching = False
        self._thread = threading.Thread(target=self._run, name="logind", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watch: its connection closes, and with it any inhibitor lock."""
        with self._guard:
            self._stopped = True
            if self._conn is not None:
                with suppress(OSError):
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=CALL_TIMEOUT)

    # --- the watcher's thread ---

    def _run(self) -> None:
        try:
            conn = open_dbus_connection("SYSTEM", enable_fds=True, auth_timeout=CALL_TIMEOUT)
        except Exception as exc:  # no system bus (a container), refused auth, bad address
            log.info(
                "logind is not reachable (%s): suspend and session lock will not lock the agent",
                exc,
            )
            return
        with self._guard:
            if self._stopped:
                conn.close()
                return
            self._conn = conn
        try:
            with conn:
                self._watch(conn)
        except Exception as exc:
            if not self._stopped:
                log.warning(
                    "stopped watching logind (%s): suspend and session lock no longer lock it",
                    exc,
                )

    def _watch(self, conn: DBusConnection) -> None:
        signals: deque[Any] = deque()
        bus = Proxy(message_bus, conn, timeout=CALL_TIMEOUT)
        wanted = []
        if self._suspend:
            wanted.append((MANAGER_INTERFACE, "PrepareForSleep", MANAGER_PATH))
        if self._session_lock:
            wanted.append((SESSION_INTERFACE, "Lock", None))
        with ExitStack() as stack:
            for interface, member, path in wanted:
                # The bus resolves the sender's well-known name; locally a message
                # carries logind's unique name, so the local filter leaves it out.
                stack.enter_context(
                    conn.filter(_signal_rule(interface, member, path, None), queue=signals)
                )
                bus.AddMatch(_signal_rule(interface, member, path, LOGIND))
            inhibitor = self._inhibit(conn) if self._suspend else None
            stack.callback(lambda: inhibitor is not None and inhibitor.close())
            self.watching = True
            stack.callback(setattr, self, "watching", False)
            while True:
                message = conn.recv_until_filtered(signals)
                member = message.header.fields.get(HeaderFields.member)
                if member == "PrepareForSleep":
                    going_to_sleep = bool(message.body and message.body[0])
                    if going_to_sleep:
                        self._lock(SUSPEND)
                    if inhibitor is not None:
                        inhibitor.close()
                        inhibitor = None
                    if not going_to_sleep:  # resumed: hold sleep up again next time
                        inhibitor = self._inhibit(conn)
                elif member == "Lock":
                    path = message.header.fields.get(HeaderFields.path, "")
                    if self._is_ours(conn, path):
                        self._lock(SESSION_LOCK)

    def _inhibit(self, conn: DBusConnection) -> Any:
        """A delay inhibitor lock on sleep (a file descriptor), or None if refused."""
        request = new_method_call(
            _MANAGER,
            "Inhibit",
            "ssss",
            ("sleep", "mtls-agent", "Lock the credential agent before the system sleeps", "delay"),
        )
        try:
            reply = conn.send_and_get_reply(request, timeout=CALL_TIMEOUT)
        except TimeoutError:
            reply = None
        if reply is None or reply.header.message_type is MessageType.error:
            log.warning(
                "logind refused a delay lock on sleep (%s): the agent still locks on suspend, "
                "but the machine may sleep before it has",
                "no answer" if reply is None else _error_text(reply),
            )
            return None
        return reply.body[0]

    def _is_ours(self, conn: DBusConnection, session_path: str) -> bool:
        """Whether the session at ``session_path`` is this user's; unknown counts as ours."""
        request = Properties(
            DBusAddress(session_path, bus_name=LOGIND, interface=SESSION_INTERFACE)
        ).get("User")
        try:
            reply = conn.send_and_get_reply(request, timeout=CALL_TIMEOUT)
        except TimeoutError:
            return True
        if reply.header.message_type is MessageType.error:
            return True
        _signature, (uid, _user_path) = reply.body[0]
        return uid == self._uid
