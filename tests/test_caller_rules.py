"""Caller rules end to end: agentctl keeps them, the agent gives each caller its identity.

The command-line tests stand on their own. The request tests drive real
curl and a copy of the curl binary through the agent to real nginx and
assert on the certificate nginx saw; they need the relay to route with the
caller (``Keychain.route(host, port, caller)``) and, for the log, to call
``AuditLog.request``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import require_tool

from agent.vault import Vault

PASSPHRASE = "caller rules tests"
CHEAP_KDF_N = 2**12
CLIENT_DN = "CN=mtls-agent test client,O=mtls-agent tests"
COPY_DN = "CN=mtls-agent copied curl,O=mtls-agent tests"


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


def import_identity(
    env: AgentEnv, pki: Pki, name: str, *flags: str, p12: Path | None = None,
    host: str = "localhost", check: bool = True,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12-password")
    return env.agentctl(
        "import", name, p12 or pki.client_p12(), "--host", host, "--ca", pki.root_pem,
        "--p12-password-file", password, *flags, check=check,
    )  # fmt: skip


def listed(env: AgentEnv) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(env.agentctl("list", "--json").stdout)}


# --- agentctl ----------------------------------------------------------------------------------


def test_import_stores_the_rules_and_list_shows_them(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    digest = "AB" * 32
    import_identity(
        agent_env, pki, "work", "--allow-uid", "1001", "--allow-uid", "1002", "--allow-gid", "50",
        "--allow-exe", "/usr/bin/curl", "--allow-exe-sha256", digest,
    )  # fmt: skip
    assert listed(agent_env)["work"]["callers"] == {
        "uids": [1001, 1002], "gids": [50], "exes": ["/usr/bin/curl"],
        "exe_sha256": [digest.lower()],
    }  # fmt: skip
    text = agent_env.agentctl("list").stdout
    assert (
        "  callers:     allow-uid 1001, 1002; allow-gid 50; allow-exe /usr/bin/curl; "
        f"allow-exe-sha256 {digest.lower()}"
    ) in text


def test_import_takes_user_and_group_names_and_resolves_links(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    user = pwd.getpwuid(os.getuid())
    link = agent_env.root / "curl-link"
    curl = os.path.realpath(require_tool("curl"))
    link.symlink_to(curl)
    done = import_identity(
        agent_env, pki, "work", "--allow-uid", user.pw_name, "--allow-exe", str(link)
    )
    assert f"{link} is a link to {curl}" in done.stderr
    callers = listed(agent_env)["work"]["callers"]
    assert (callers["uids"], callers["exes"]) == ([user.pw_uid], [curl])


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--allow-exe", "curl"], "must be an absolute path"),
        (["--allow-uid", "no-such-user-here"], "there is no user named"),
        (["--allow-gid", "no-such-group-here"], "there is no group named"),
        (["--allow-exe-sha256", "1234"], "64 characters"),
    ],
)
def test_import_refuses_rules_it_cannot_keep_and_stores_nothing(
    agent_env: AgentEnv, vault: Vault, pki: Pki, flags: list[str], says: str
) -> None:
    done = import_identity(agent_env, pki, "work", *flags, check=False)
    assert done.returncode == 1 and says in done.stderr
    assert "Traceback" not in done.stderr
    assert vault.names() == []


def test_two_identities_share_a_host_only_with_distinct_rules_on_both(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_identity(agent_env, pki, "first")
    refused = import_identity(agent_env, pki, "second", "--allow-uid", "2", check=False)
    assert refused.returncode == 1 and "only when both have caller rules" in refused.stderr
    agent_env.agentctl("policy", "first", "--allow-uid", "1")
    same = import_identity(agent_env, pki, "second", "--allow-uid", "1", check=False)
    assert same.returncode == 1 and "with the same caller rules" in same.stderr
    overlap = import_identity(agent_env, pki, "second", "--allow-exe", "/usr/bin/curl", check=False)
    assert overlap.returncode == 1 and "one process could pass both" in overlap.stderr
    import_identity(agent_env, pki, "second", "--allow-uid", "2")
    cleared = agent_env.agentctl("policy", "first", "--clear", check=False)
    assert cleared.returncode == 1 and "cannot change the rules of 'first'" in cleared.stderr
    assert set(listed(agent_env)) == {"first", "second"}


def test_policy_shows_replaces_and_clears_the_rules(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_identity(agent_env, pki, "work")
    shown = agent_env.agentctl("policy", "work").stdout
    assert "work: no caller rules" in shown
    changed = agent_env.agentctl("policy", "work", "--allow-uid", "7", "--allow-exe", "/bin/sh")
    assert "allow-uid 7" in changed.stdout
    replaced = json.loads(agent_env.agentctl("policy", "work", "--allow-gid", "9", "--json").stdout)
    assert replaced == {
        "name": "work", "callers": {"uids": [], "gids": [9], "exes": [], "exe_sha256": []},
    }  # fmt: skip
    both = agent_env.agentctl("policy", "work", "--clear", "--allow-uid", "1", check=False)
    assert both.returncode == 1 and "not both" in both.stderr
    agent_env.agentctl("policy", "work", "--clear")
    assert "callers" not in listed(agent_env)["work"]
    unknown = agent_env.agentctl("policy", "nobody", check=False)
    assert unknown.returncode == 1 and "no identity named 'nobody'" in unknown.stderr


# --- requests (the relay routes with the caller) ------------------------------------------


@dataclass
class Seen:
    status: int
    error: str | None
    subject: str | None
    body: bytes


def through(env: AgentEnv, curl: Path | str, url: str) -> Seen:
    """GET ``url`` through the agent with the curl binary at ``curl``."""
    out = subprocess.run(
        [str(curl), "-sS", "-i", "--unix-socket", str(env.proxy_socket), url],
        capture_output=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    return Seen(status, headers.get("mtls-agent-error"), headers.get("x-client-s-dn"), body)


@dataclass
class Curls:
    real: Path
    copy: Path  # the same bytes at another path
    changed: Path  # one more byte: another SHA-256, still a working curl

    @staticmethod
    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def curls(agent_env: AgentEnv) -> Curls:
    real = Path(os.path.realpath(require_tool("curl")))
    folder = agent_env.root / "bin"
    folder.mkdir()
    copy, changed = folder / "curl", folder / "curl-changed"
    shutil.copy2(real, copy)
    shutil.copy2(real, changed)
    with open(changed, "ab") as f:
        f.write(b"\0")
    assert subprocess.run([changed, "--version"], capture_output=True, check=False).returncode == 0
    return Curls(real, copy, changed)


@pytest.fixture
def agent(agent_env: AgentEnv, vault: Vault) -> Iterator[Any]:
    """Start (and later stop) the agent once the test has imported its identities."""
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        started.append(start_agent(agent_env))
        agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_an_allowed_executable_is_served_and_a_copy_elsewhere_is_refused(
    agent_env: AgentEnv, pki: Pki, nginx: Nginx, curls: Curls, agent: Any
) -> None:
    import_identity(agent_env, pki, "work", "--allow-exe", str(curls.real))
    agent()
    url = f"http://{nginx.host_header}/echo"
    before = nginx.mark()
    served = through(agent_env, curls.real, url)
    assert (served.status, served.subject) == (200, CLIENT_DN)
    nginx.access_log(before, wait_for=1)  # nginx logs after answering: let that line land
    mark = nginx.mark()
    refused = through(agent_env, curls.copy, url)
    assert (refused.status, refused.error) == (403, "peer-denied")
    assert nginx.access_log(mark) == []


def test_a_sha256_rule_admits_a_copy_only_once_its_hash_is_listed(
    agent_env: AgentEnv, pki: Pki, nginx: Nginx, curls: Curls, agent: Any
) -> None:
    import_identity(agent_env, pki, "work", "--allow-exe-sha256", Curls.sha256(curls.real))
    agent()
    url = f"http://{nginx.host_header}/echo"
    assert through(agent_env, curls.copy, url).status == 200  # same bytes, other path
    assert through(agent_env, curls.changed, url).error == "peer-denied"
    agent_env.agentctl("policy", "work", "--allow-exe-sha256", Curls.sha256(curls.changed))
    assert through(agent_env, curls.changed, url).status == 200
    assert through(agent_env, curls.real, url).error == "peer-denied"


def test_two_identities_on_one_host_give_each_caller_its_own_certificate(
    agent_env: AgentEnv, pki: Pki, nginx: Nginx, curls: Curls, agent: Any
) -> None:
    other = pki.issue_client("mtls-agent copied curl", name="copied-curl")
    import_identity(agent_env, pki, "for-curl", "--allow-exe", str(curls.real))
    import_identity(
        agent_env, pki, "for-copy", "--allow-exe", str(curls.copy), p12=pki.client_p12(leaf=other)
    )
    agent()
    url = f"http://{nginx.host_header}/echo"
    mark = nginx.mark()
    by_curl = through(agent_env, curls.real, url)
    by_copy = through(agent_env, curls.copy, url)
    assert (by_curl.status, by_curl.subject) == (200, CLIENT_DN)
    assert (by_copy.status, by_copy.subject) == (200, COPY_DN)
    seen = [e["client_s_dn"] for e in nginx.access_log(mark, wait_for=2)]
    assert seen == [CLIENT_DN, COPY_DN]


def test_a_refused_caller_learns_no_rule_but_the_audit_log_names_it(
    agent_env: AgentEnv, pki: Pki, nginx: Nginx, curls: Curls, agent: Any
) -> None:
    import_identity(agent_env, pki, "work", "--allow-exe", str(curls.real))
    agent()
    refused = through(agent_env, curls.copy, f"http://{nginx.host_header}/echo")
    assert refused.error == "peer-denied"
    body = refused.body.decode()
    for private in ("allow-exe", str(curls.real), str(curls.copy), "work"):
        assert private not in body
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in agent_env.audit_log.read_text().splitlines()]
        denied = [e for e in lines if e["event"] == "request" and e["error"] == "peer-denied"]
        if denied or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    [entry] = denied
    assert entry["exe"] == str(curls.copy) and entry["status"] == 403
    assert "allow-exe" in entry["reason"] and str(curls.copy) in entry["reason"]
