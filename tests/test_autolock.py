"""The agent locks itself: after idle time, after max time unlocked, on suspend and session lock.

Timers run with second-scale settings against the real agent; activity is
real requests on the proxy socket (an unbound host: the agent answers 403
itself, which counts as a request as much as a forwarded one). logind is
played by the test on a private bus the agent is pointed at with
``DBUS_SYSTEM_BUS_ADDRESS``; the sleep inhibitor it hands out is a pipe, so
the test sees the agent let go of it, which must happen only once locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.clients import curl
from support.dbus import FakeLogind, PrivateBus, released
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki

from agent.forward import ProxyServer
from agent.vault import Vault

PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12
WAIT = 10.0
ME = os.getuid()
SOMEONE_ELSE = ME + 1


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


def status(env: AgentEnv) -> dict:
    return json.loads(env.agentctl("status", "--json").stdout)


def unlock(env: AgentEnv, *args: str) -> None:
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE), *args)


def request(env: AgentEnv) -> None:
    result = curl(env.proxy_socket, "http://nobody.invalid/")
    assert result.status == 403, result


def wait_locked(env: AgentEnv, timeout: float = WAIT) -> tuple[dict, float]:
    """The first status that says locked, and when it came (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        info = status(env)
        if info["state"] == "locked":
            return info, time.monotonic()
        assert time.monotonic() < deadline, f"still unlocked after {timeout}s: {info}"
        time.sleep(0.05)


def agent_with(env: AgentEnv, config: str) -> AgentProcess:
    env.write_config(config)
    return start_agent(env)


# --- timers ---------------------------------------------------------------------


def test_idle_lock_waits_for_requests_to_stop(agent_env: AgentEnv, vault: Vault) -> None:
    with agent_with(agent_env, 'lock_after_idle = "1s"\n'):
        unlock(agent_env)
        busy_until = time.monotonic() + 2.5  # well past the idle time, but never idle
        while time.monotonic() < busy_until:
            request(agent_env)
            assert status(agent_env)["state"] == "unlocked"
            time.sleep(0.2)
        before_last = time.monotonic()
        request(agent_env)
        info, locked_at = wait_locked(agent_env)
    assert info["autolock"]["last_lock"] == "idle"
    assert locked_at - before_last >= 1.0
    assert "locked (no request for lock_after_idle)" in render(info)


def test_idle_lock_waits_for_a_long_upload_to_end(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx
) -> None:
    """A transfer longer than lock_after_idle is use, not idleness: the lock
    would cut it. Its clock starts when the answer has gone back."""
    password = write_secret_file(agent_env.root, P12_PASSWORD, "p12")
    agent_env.agentctl(
        "import", "work", pki.client_p12("modern"), "--host=localhost",
        "--ca", pki.root_pem, "--p12-password-file", password,
    )  # fmt: skip
    body = b"slow upload\n" * 12
    with agent_with(agent_env, 'lock_after_idle = "1s"\n'):
        unlock(agent_env)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(WAIT)
            conn.connect(str(agent_env.proxy_socket))
            conn.sendall(
                f"PUT /upload/idle-lock.txt HTTP/1.1\r\nHost: {nginx.host_header}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            busy_until = time.monotonic() + 2.5  # well past the idle time
            sent = 0
            while time.monotonic() < busy_until:
                conn.sendall(body[sent : sent + 4])
                sent += 4
                assert status(agent_env)["state"] == "unlocked"
                time.sleep(0.1)
            conn.sendall(body[sent:])
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        answered = time.monotonic()
        info, locked_at = wait_locked(agent_env)
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert nginx.uploaded("idle-lock.txt").read_bytes() == body
    assert info["autolock"]["last_lock"] == "idle"
    assert locked_at - answered >= 0.9  # from the end of the transfer, within a poll


def test_busy_counts_only_what_is_still_under_way() -> None:
    """A connection still closing after its exchange ended, or after its tunnel
    was closed, must not keep the agent unlocked."""

    def client(
        done: bool | None = None, tunnel: bool = False, closing: bool = False
    ) -> SimpleNamespace:
        active = None if done is None else SimpleNamespace(done=done)
        transport = SimpleNamespace(is_closing=lambda: closing)
        return SimpleNamespace(
            active=active, tunnel=object() if tunnel else None, transport=transport
        )

    def busy(*clients: SimpleNamespace) -> bool:
        return ProxyServer.busy(SimpleNamespace(clients=list(clients)))  # type: ignore[arg-type]

    assert not busy()
    assert not busy(client(), client(done=True), client(tunnel=True, closing=True))
    assert busy(client(), client(done=False))
    assert busy(client(tunnel=True))


def test_max_unlocked_locks_however_busy(agent_env: AgentEnv, vault: Vault) -> None:
    with agent_with(agent_env, 'max_unlocked = "1.5s"\nlock_after_idle = "1h"\n'):
        unlocked = time.monotonic()  # the agent's unlock time comes after this
        unlock(agent_env)
        info = status(agent_env)
        assert info["autolock"]["max_unlocked"] == 1.5
        assert 0 < info["autolock"]["locks_in"] <= 1.5
        while status(agent_env)["state"] == "unlocked":
            request(agent_env)
            assert time.monotonic() - unlocked < WAIT
        info = status(agent_env)
    assert info["autolock"]["last_lock"] == "max-unlocked"
    assert time.monotonic() - unlocked >= 1.5


def test_unlock_timeout_replaces_max_unlocked_for_that_unlock_only(
    agent_env: AgentEnv, vault: Vault
) -> None:
    with agent_with(agent_env, 'max_unlocked = "1h"\n'):
        unlocked = time.monotonic()
        unlock(agent_env, "--timeout", "1s")
        assert status(agent_env)["autolock"]["max_unlocked"] == 1.0
        info, locked_at = wait_locked(agent_env)
        assert info["autolock"]["last_lock"] == "max-unlocked"
        assert locked_at - unlocked >= 1.0

        unlock(agent_env)  # the next unlock is back to the config's limit
        info = status(agent_env)
        assert info["state"] == "unlocked"
        assert info["autolock"]["max_unlocked"] == 3600.0
        assert 3590 < info["autolock"]["locks_in"] <= 3600


def test_unlock_timeout_must_be_a_duration(agent_env: AgentEnv) -> None:
    r = agent_env.agentctl("unlock", "--timeout", "soon", check=False)
    assert r.returncode == 2
    assert "--timeout: must be a duration" in r.stderr


def test_a_manual_lock_is_reported_as_such(agent_env: AgentEnv, vault: Vault) -> None:
    with agent_with(agent_env, "lock_on_suspend = false\nlock_on_session_lock = false\n"):
        assert status(agent_env)["autolock"]["last_lock"] is None
        unlock(agent_env)
        agent_env.agentctl("lock")
        info = status(agent_env)
    assert info["autolock"] == {
        "lock_after_idle": None,
        "max_unlocked": None,
        "lock_on_suspend": False,
        "lock_on_session_lock": False,
        "locks_in": None,
        "last_lock": "request",
    }
    assert "autolock:    never (only agentctl lock)" in render(info)


def render(info: dict) -> str:
    from cli.render import status_text

    return status_text(info)


# --- logind ------------------------------------------------------------------------


@pytest.fixture
def logind(agent_env: AgentEnv) -> Iterator[FakeLogind]:
    bus = PrivateBus().start()
    fake = FakeLogind(bus, sessions={"c1": ME, "c2": SOMEONE_ELSE})
    try:
        fake.start()
        agent_env.env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        yield fake
    finally:
        fake.stop()
        bus.stop()


def inhibitor(logind: FakeLogind) -> int:
    """The read end of the next sleep inhibitor lock the agent takes."""
    fd = logind.next_call("Inhibit").inhibitor
    assert fd is not None
    return fd


def test_suspend_locks_before_the_sleep_inhibitor_is_released(
    agent_env: AgentEnv, vault: Vault, logind: FakeLogind
) -> None:
    with start_agent(agent_env):
        held = inhibitor(logind)  # taken once subscribed
        unlock(agent_env)
        assert status(agent_env)["autolock"]["lock_on_suspend"] is True

        logind.emit_prepare_for_sleep(True)
        assert released(held)  # logind may now let the machine sleep...
        os.close(held)
        info = status(agent_env)  # ...and by then the agent was locked
        assert (info["state"], info["autolock"]["last_lock"]) == ("locked", "suspend")

        logind.emit_prepare_for_sleep(False)  # resumed: a new lock for the next sleep
        again = inhibitor(logind)
        assert not released(again, timeout=0)
        os.close(again)


def test_only_this_users_session_lock_locks_the_agent(
    agent_env: AgentEnv, vault: Vault, logind: FakeLogind
) -> None:
    with start_agent(agent_env):
        os.close(inhibitor(logind))
        unlock(agent_env)

        logind.emit_session_lock("c2")  # another user's session
        logind.emit_prepare_for_sleep(False)  # handled after it: a new inhibitor call
        os.close(inhibitor(logind))
        assert status(agent_env)["state"] == "unlocked"

        logind.emit_session_lock("c1")
        assert logind.next_call("Get").path == FakeLogind.session_path("c1")
        info, _ = wait_locked(agent_env)
        assert info["autolock"]["last_lock"] == "session-lock"


def test_lock_on_suspend_can_be_turned_off(
    agent_env: AgentEnv, vault: Vault, logind: FakeLogind
) -> None:
    with agent_with(agent_env, "lock_on_suspend = false\n"):
        deadline = time.monotonic() + WAIT
        while not status(agent_env)["autolock"]["lock_on_session_lock"]:  # subscribed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        unlock(agent_env)
        logind.emit_prepare_for_sleep(True)  # not subscribed: never seen
        logind.emit_session_lock("c1")  # seen, after the one above would have been
        info, _ = wait_locked(agent_env)
        assert info["autolock"]["last_lock"] == "session-lock"
        assert info["autolock"]["lock_on_suspend"] is False
    assert all(call.member != "Inhibit" for call in list(logind.calls.queue))


def test_lock_on_session_lock_can_be_turned_off(
    agent_env: AgentEnv, vault: Vault, logind: FakeLogind
) -> None:
    with agent_with(agent_env, "lock_on_session_lock = false\n"):
        held = inhibitor(logind)  # subscribed to suspends
        unlock(agent_env)
        assert status(agent_env)["autolock"]["lock_on_session_lock"] is False
        logind.emit_session_lock("c1")  # this user's session, but not subscribed: never seen
        logind.emit_prepare_for_sleep(True)  # seen, after the one above would have been
        assert released(held)
        os.close(held)
        info = status(agent_env)
        assert (info["state"], info["autolock"]["last_lock"]) == ("locked", "suspend")
    assert all(call.member != "Get" for call in list(logind.calls.queue))
