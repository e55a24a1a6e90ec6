"""unlock --remember and forget against a real Secret Service; refusal of insecure keyrings.

The Secret Service is the real gnome-keyring-daemon on a private session bus
(tests/support/dbus.py), its login keyring unlocked as a desktop login would;
``secret-tool`` (libsecret) checks what it holds, independently of the
Python ``keyring`` the agent uses. Each agent restart is a real process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.dbus import GnomeKeyring, PrivateBus
from support.pki import P12_PASSWORD, Pki

from agent.remember import SERVICE, marker_path
from agent.vault import Vault

PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12


@pytest.fixture
def keyring(agent_env: AgentEnv) -> Iterator[GnomeKeyring]:
    """gnome-keyring on a private session bus that the agent and agentctl are pointed at."""
    bus = PrivateBus().start()
    secrets = GnomeKeyring(bus)
    try:
        secrets.start()
        agent_env.env["DBUS_SESSION_BUS_ADDRESS"] = bus.address
        agent_env.env.pop("PYTHON_KEYRING_BACKEND", None)
        yield secrets
    finally:
        secrets.stop()
        bus.stop()


@pytest.fixture
def vault_with_identity(agent_env: AgentEnv, pki: Pki) -> Path:
    Vault(agent_env.vault_dir).create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    secret = write_secret_file(agent_env.root, P12_PASSWORD, "p12-password")
    agent_env.agentctl(
        "import", "work", pki.client_p12("modern"), "--host=api.example.com",
        "--p12-password-file", secret,
    )  # fmt: skip
    return agent_env.vault_dir


def status(env: AgentEnv) -> dict:
    return json.loads(env.agentctl("status", "--json").stdout)


def unlock_remember(env: AgentEnv, check: bool = True):  # type: ignore[no-untyped-def]
    return env.agentctl(
        "unlock", "--remember", "--passphrase-file", env.passphrase_file(PASSPHRASE), check=check
    )


def restart(env: AgentEnv, agent: AgentProcess) -> AgentProcess:
    assert agent.stop() == 0
    return start_agent(env)


def keyring_lines(agent: AgentProcess) -> list[str]:
    return [line for line in agent.stderr_text().splitlines() if "keyring" in line.lower()]


def test_a_remembered_passphrase_unlocks_the_agent_at_start_until_forgotten(
    agent_env: AgentEnv, keyring: GnomeKeyring, vault_with_identity: Path
) -> None:
    agent = start_agent(agent_env)
    try:
        r = unlock_remember(agent_env)
        assert "remembered the passphrase in the Secret Service" in r.stdout
        assert keyring.lookup(service=SERVICE, username=str(vault_with_identity)) == PASSPHRASE
        marker = marker_path(vault_with_identity).read_text()
        assert PASSPHRASE not in marker  # the marker says where, never what

        agent = restart(agent_env, agent)
        first = status(agent_env)  # unlocked before it served anything
        assert (first["state"], first["loaded"]) == ("unlocked", 1)
        assert "unlocked with the passphrase from the OS keyring" in agent.stderr_text()

        r = agent_env.agentctl("forget")
        assert "removed the passphrase from the Secret Service" in r.stdout
        assert keyring.lookup(service=SERVICE, username=str(vault_with_identity)) is None
        assert not marker_path(vault_with_identity).exists()

        agent = restart(agent_env, agent)
        assert status(agent_env)["state"] == "locked"
        assert keyring_lines(agent) == []  # nothing remembered: the keyring is not even asked
        assert PASSPHRASE not in agent.stdout_text() + agent.stderr_text()
        assert "no passphrase is remembered" in agent_env.agentctl("forget").stdout
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "backend",
    ["keyring.backends.fail.Keyring", "keyrings.alt.file.PlaintextKeyring"],
    ids=["fail-backend", "plaintext-file-backend"],
)
def test_remember_refuses_an_insecure_keyring_and_stores_nothing(
    agent_env: AgentEnv, vault_with_identity: Path, backend: str
) -> None:
    agent_env.env["PYTHON_KEYRING_BACKEND"] = backend
    passphrase_file = agent_env.passphrase_file(PASSPHRASE)
    with start_agent(agent_env):
        r = unlock_remember(agent_env, check=False)
        assert r.returncode == 1
        assert r.stderr.startswith("agentctl: no secure OS keyring is available here"), r.stderr
        assert backend in r.stderr and "was not stored" in r.stderr
        assert status(agent_env)["state"] == "locked"  # refused before anything was sent
    assert not marker_path(vault_with_identity).exists()
    for path in agent_env.root.rglob("*"):
        if path.is_file() and path != passphrase_file:
            assert PASSPHRASE.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("failure", ["collection-locked", "no-session-bus"])
def test_a_failing_keyring_leaves_the_agent_locked_with_one_sentence(
    agent_env: AgentEnv, keyring: GnomeKeyring, vault_with_identity: Path, failure: str
) -> None:
    with start_agent(agent_env):
        unlock_remember(agent_env)
    if failure == "collection-locked":
        keyring.lock()
    else:
        del agent_env.env["DBUS_SESSION_BUS_ADDRESS"]
    with start_agent(agent_env) as agent:
        assert status(agent_env)["state"] == "locked"
        [line] = keyring_lines(agent)
        warning = "mtls-agent: WARNING: cannot read the passphrase from the OS keyring"
        assert line.startswith(warning), line
        assert line.endswith("; the agent starts locked.")
        assert PASSPHRASE not in agent.stderr_text()


def test_a_passphrase_change_replaces_the_remembered_one(
    agent_env: AgentEnv, keyring: GnomeKeyring, vault_with_identity: Path
) -> None:
    """Else the agent would try the old passphrase at every start and stay locked."""
    agent = start_agent(agent_env)
    try:
        unlock_remember(agent_env)
        changed = agent_env.agentctl(
            "passphrase",
            "--passphrase-file", agent_env.passphrase_file(PASSPHRASE),
            "--new-passphrase-file", agent_env.passphrase_file("a new one", "new"),
        )  # fmt: skip
        assert "remembered the new passphrase in the Secret Service" in changed.stdout
        assert keyring.lookup(service=SERVICE, username=str(vault_with_identity)) == "a new one"
        agent = restart(agent_env, agent)
        assert status(agent_env)["state"] == "unlocked"
    finally:
        agent.stop()
