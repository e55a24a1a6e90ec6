"""Private D-Bus buses: a real Secret Service (gnome-keyring) and a logind played by the test.

``PrivateBus`` is a ``dbus-daemon`` of the test's own, on a socket in a
``mkdtemp`` folder, with no service activation (nothing starts behind the
test's back) and a policy that lets the test own any name. Pass its
``address`` to the agent as ``DBUS_SESSION_BUS_ADDRESS`` (the keyring) or
``DBUS_SYSTEM_BUS_ADDRESS`` (logind).

``GnomeKeyring`` runs the real ``gnome-keyring-daemon`` (secrets component
only) on such a bus, with a HOME and XDG_DATA_HOME of its own: ``--unlock``
reads a password on standard input and creates and unlocks the login
keyring, as a desktop login does, so nothing ever prompts. ``secret-tool``
(libsecret, a client independent of the agent's Python ``keyring``) looks
items up.

``FakeLogind`` owns ``org.freedesktop.login1`` on a private bus and does
what the agent needs of logind: it hands out sleep inhibitor locks (a pipe's
write end, so the test sees when the agent lets go of one), answers which
user a session belongs to, and emits ``PrepareForSleep`` and ``Lock``.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeepney import (
    DBusAddress,
    HeaderFields,
    MessageType,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, Proxy, open_dbus_connection

from support.tools import require_tool

START_TIMEOUT = 15.0
POLL = 0.02

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_name(address: str, name: str, timeout: float = START_TIMEOUT) -> None:
    """Return once ``name`` has an owner on the bus at ``address``."""
    with open_dbus_connection(address) as conn:
        bus = Proxy(message_bus, conn, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not bus.NameHasOwner(name)[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never appeared on {address}")
            time.sleep(POLL)


class PrivateBus:
    """A private ``dbus-daemon``; ``address`` once started."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mt-bus-"))
        self.address = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> PrivateBus:
        exe = require_tool("dbus-daemon")
        config = self.dir / "bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=self.dir / "bus"))
        self._proc = subprocess.Popen(
            [exe, f"--config-file={config}", "--nofork", "--print-address=1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        line = self._proc.stdout.readline().strip() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("dbus-daemon did not print its address")
        self.address = line
        return self

    def stop(self) -> None:
        _stop(self._proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class GnomeKeyring:
    """The real gnome-keyring-daemon's Secret Service on ``bus``, its login keyring unlocked."""

    PASSWORD = "login keyring password"

    def __init__(self, bus: PrivateBus) -> None:
        self.bus = bus
        self.home = bus.dir / "home"
        self.env = {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": bus.address,
            "HOME": str(self.home),
            "XDG_DATA_HOME": str(self.home / "data"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_RUNTIME_DIR": str(self.home / "run"),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GnomeKeyring:
        exe = require_tool("gnome-keyring-daemon")
        for folder in ("data", "config", "run"):
            (self.home / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [exe, "--foreground", "--unlock", "--components=secrets"],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(self.PASSWORD.encode())
        self._proc.stdin.close()
        wait_for_name(self.bus.address, "org.freedesktop.secrets")
        return self

    def lookup(self, **attributes: str) -> str | None:
        """The secret of the item with these attributes, read with ``secret-tool``; or None."""
        exe = require_tool("secret-tool")
        args = [part for item in attributes.items() for part in item]
        proc = subprocess.run(
            [exe, "lookup", *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        return proc.stdout if proc.returncode == 0 else None

    def lock(self) -> None:
        """Lock the default collection, as a screen lock or a timeout would."""
        import secretstorage

        with open_dbus_connection(self.bus.address) as conn:
            collection = secretstorage.get_default_collection(conn)
            collection.lock()
            assert collection.is_locked()

    def stop(self) -> None:
        _stop(self._proc)


# --- logind ------------------------------------------------------------------

LOGIND = "org.freedesktop.login1"
MANAGER = DBusAddress("/org/freedesktop/login1", interface="org.freedesktop.login1.Manager")


@dataclass
class Call:
    """A method call the agent made: which one, and for Inhibit the read end of the lock."""

    member: str
    path: str
    inhibitor: int | None = None


class FakeLogind:
    """``org.freedesktop.login1`` on ``bus``, answering in a thread (see the module doc)."""

    def __init__(self, bus: PrivateBus, sessions: dict[str, int]) -> None:
        """``sessions``: session id ("c1") to the uid it belongs to."""
        self.bus = bus
        self.sessions = sessions
        self.calls: queue.Queue[Call] = queue.Queue()
        self._conn: DBusConnection | None = None
        self._send = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-logind", daemon=True)

    @staticmethod
    def session_path(session: str) -> str:
        return f"/org/freedesktop/login1/session/{session}"

    def start(self) -> FakeLogind:
        self._conn = open_dbus_connection(self.bus.address, enable_fds=True)
        reply = Proxy(message_bus, self._conn, timeout=10).RequestName(LOGIND, 4)
        assert reply == (1,), f"cannot own {LOGIND}: {reply}"
        self._thread.start()
        return self

    def next_call(self, member: str, timeout: float = START_TIMEOUT) -> Call:
        """The next call to ``member`` the agent makes (others before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the agent never called {member}")
            try:
                call = self.calls.get(timeout=left)
            except queue.Empty:
                continue
            if call.member == member:
                return call
            if call.inhibitor is not None:
                os.close(call.inhibitor)

    def emit_prepare_for_sleep(self, going: bool) -> None:
        self._emit(new_signal(MANAGER, "PrepareForSleep", "b", (going,)))

    def emit_session_lock(self, session: str) -> None:
        address = DBusAddress(
            self.session_path(session), interface="org.freedesktop.login1.Session"
        )
        self._emit(new_signal(address, "Lock"))

    def _emit(self, message: Any) -> None:
        assert self._conn is not None
        with self._send:
            self._conn.send(message)

    def _serve(self) -> None:
        assert self._conn is not None
        while not self._stopped.is_set():
            try:
                message = self._conn.receive(timeout=0.1)
            except TimeoutError:
                continue
            except OSError:
                return
            if message.header.message_type is not MessageType.method_call:
                continue
            fields = message.header.fields
            member = fields.get(HeaderFields.member)
            path = fields.get(HeaderFields.path, "")
            if member == "Inhibit" and path == MANAGER.object_path:
                read_end, write_end = os.pipe()
                with self._send:
                    self._conn.send(new_method_return(message, "h", (write_end,)))
                os.close(write_end)  # the agent has its own copy now
                self.calls.put(Call(member, path, inhibitor=read_end))
                continue
            with self._send:
                self._conn.send(self._answer(message, path))
            self.calls.put(Call(member, path))

    def _answer(self, call: Any, path: str) -> Any:
        """The reply to a session's ``Get(..., "User")``; an error for anything else."""
        member = call.header.fields.get(HeaderFields.member)
        session = path.rpartition("/")[2]
        if member == "Get" and call.body[1] == "User" and session in self.sessions:
            uid = self.sessions[session]
            return new_method_return(
                call, "v", (("(uo)", (uid, f"/org/freedesktop/login1/user/_{uid}")),)
            )
        return new_error(call, "org.freedesktop.DBus.Error.UnknownObject", "s", (path,))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        if self._conn is not None:
            self._conn.close()
        while not self.calls.empty():
            call = self.calls.get_nowait()
            if call.inhibitor is not None:
                os.close(call.inhibitor)


def released(fd: int, timeout: float = START_TIMEOUT) -> bool:
    """Whether the other end of the pipe ``fd`` closes within ``timeout`` (a lock let go)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 1) == b""
