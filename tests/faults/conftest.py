"""Fixtures of the fault suite: one real agent per module, set up once.

Setting an agent up (vault, import, start, unlock) costs a few seconds of
subprocesses, so each module shares one, configured with short timeouts
(``FAST_LIMITS``) so that waiting out a timeout costs a second, not a
minute; the size limits stay at their defaults. Cases run against that one
agent, which is the point: it must survive every one of them and keep
serving the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki

from faults.probe import SteadyClient

PASSPHRASE = "fault suite passphrase"

#: Timeouts short enough to wait out in a test; sizes keep their defaults.
FAST_LIMITS = """\
[limits]
head_timeout = "1s"
keepalive_idle = "2s"
connect_timeout = "1s"
response_timeout = "1s"
body_idle_timeout = "1s"
"""


@dataclass
class FaultAgent:
    """A running, unlocked agent with the test client identity for ``hosts``."""

    env: AgentEnv
    agent: AgentProcess
    pki: Pki

    @property
    def socket(self):  # type: ignore[no-untyped-def]
        return self.env.proxy_socket

    def stderr_mark(self) -> int:
        return len(self.agent.stderr_text())

    def stderr_since(self, mark: int) -> str:
        return self.agent.stderr_text()[mark:]

    def assert_alive_and_quiet(self, mark: int = 0) -> None:
        """The agent still runs and has logged no traceback (an exception escaped)."""
        assert self.agent.alive(), f"the agent died:\n{self.agent.stderr_text()}"
        text = self.stderr_since(mark)
        assert "Traceback" not in text and "Exception in callback" not in text, text


def init_and_import(env: AgentEnv, pki: Pki, name: str = "work", *hosts: str) -> None:
    """A new vault holding the test client identity for ``hosts`` (default localhost)."""
    env.agentctl("init", "--passphrase-file", env.passphrase_file(PASSPHRASE))
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12")
    env.agentctl(
        "import", name, pki.client_p12("modern"),
        *[f"--host={h}" for h in (hosts or ("localhost",))],
        "--ca", pki.root_pem, "--p12-password-file", password,
    )  # fmt: skip


def unlock(env: AgentEnv) -> None:
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))


def start_fault_agent(pki: Pki, config: str = FAST_LIMITS, *hosts: str) -> FaultAgent:
    env = AgentEnv()
    try:
        env.write_config(config)
        init_and_import(env, pki, "work", *hosts)
        agent = start_agent(env)
    except BaseException:
        env.cleanup()
        raise
    try:
        unlock(env)
    except BaseException:
        agent.stop()
        env.cleanup()
        raise
    return FaultAgent(env, agent, pki)


@pytest.fixture(scope="module")
def fault_agent(pki: Pki) -> Iterator[FaultAgent]:
    """The module's agent: FAST_LIMITS, identity for localhost and [::1]."""
    fa = start_fault_agent(pki, FAST_LIMITS, "localhost", "[::1]")
    try:
        yield fa
    finally:
        alive = fa.agent.alive()
        stderr = fa.agent.stderr_text()
        fa.agent.stop()
        fa.env.cleanup()
        assert alive, f"the agent died during the module:\n{stderr}"


@pytest.fixture(scope="module")
def steady(fault_agent: FaultAgent, nginx: Nginx) -> Iterator[SteadyClient]:
    """The good neighbour: asks nginx through the module's agent all along."""
    client = SteadyClient(fault_agent.socket, nginx.host_header).start()
    try:
        yield client
    finally:
        client.stop()
