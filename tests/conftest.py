"""Shared fixtures: thin wrappers over tests/support/.

Session fixtures are per pytest-xdist worker (each worker is its own
process), so every worker builds its own PKI and runs its own nginx on its
own port; nothing is shared between workers but the machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent
from support.nginx import Nginx
from support.pki import Pki, build_pki
from support.tools import require_tool

#: Lines of nginx's error log shown with a failed test.
ERROR_LOG_TAIL = 40


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI (root, intermediate, client leaf, servers), built once per worker."""
    return build_pki(tmp_path_factory.mktemp("pki"))


def _run_nginx(pki: Pki, *, untrusted: bool) -> Iterator[Nginx]:
    require_tool("nginx")
    server = Nginx.for_pki(pki, untrusted=untrusted)
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        died = not server.alive()
        logs = server.logs_text()
        server.cleanup()
        if died:
            pytest.fail(f"nginx died during the session:\n{logs}", pytrace=False)


@pytest.fixture(scope="session")
def nginx(pki: Pki) -> Iterator[Nginx]:
    """A real nginx demanding a client certificate chaining to ``pki.root``; one per worker.

    Shared by a worker's tests: mark the access log (``nginx.mark()``) before acting
    and read only what follows, and give created files unique names.
    """
    yield from _run_nginx(pki, untrusted=False)


@pytest.fixture(scope="session")
def nginx_untrusted(pki: Pki) -> Iterator[Nginx]:
    """Like ``nginx``, but its server certificate comes from ``pki.other_root``."""
    yield from _run_nginx(pki, untrusted=True)


@pytest.fixture
def agent_env() -> Iterator[AgentEnv]:
    """A fresh user environment (XDG folders, HOME, MTLS_AGENT_SOCK); removed afterwards."""
    env = AgentEnv()
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def running_agent(agent_env: AgentEnv) -> Iterator[AgentProcess]:
    """``mtls-agent`` running in ``agent_env`` with both sockets up; stopped afterwards."""
    agent = start_agent(agent_env)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On a failure, show what the real peers said: nginx's error log, the agent's stderr.

    nginx logs at info level, so a refused client certificate shows its reason
    (e.g. "client SSL certificate verify error: (10:certificate has expired)").
    """
    report = yield
    if report.failed and report.when in ("setup", "call"):
        values = getattr(item, "funcargs", {})
        for name, value in values.items():
            if isinstance(value, Nginx):
                tail = value.error_log().splitlines()[-ERROR_LOG_TAIL:]
                report.sections.append((f"{name}: nginx error log (tail)", "\n".join(tail)))
            elif isinstance(value, AgentProcess):
                report.sections.append((f"{name}: mtls-agent stderr", value.stderr_text()))
    return report
