"""agentctl as a user runs it: the real CLI in a subprocess, in a throw-away home.

Most tests need no agent (init, import, list, remove, env, and the errors of
status/unlock when nothing runs). The rest start the real ``mtls-agent`` in the
same environment and drive unlock, status, lock and reload through the CLI.
Vaults a test does not create through ``agentctl init`` are made in-process
with a cheap KDF, so the suite stays fast.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.pki import CLIENT_CN, P12_PASSWORD, Pki, new_key
from support.tools import locked_by_another_process

from agent.remember import marker_path
from agent.vault import Vault

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12


@pytest.fixture
def agent_env(agent_env: AgentEnv) -> AgentEnv:
    """The shared environment, with this checkout importable by ``python -m cli``
    even when the project is not installed (the console script, when present, wins)."""
    path = agent_env.env.get("PYTHONPATH")
    agent_env.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), path]))
    return agent_env


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    """An empty vault with PASSPHRASE, made in-process with a cheap KDF."""
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


@pytest.fixture
def agent(agent_env: AgentEnv, vault: Vault) -> Iterator[AgentProcess]:
    """The real agent, started after the vault exists; SIGTERMed afterwards."""
    process = start_agent(agent_env)
    try:
        yield process
    finally:
        process.stop()


def import_p12(
    env: AgentEnv,
    pki: Pki,
    name: str = "work",
    *hosts: str,
    p12: Path | None = None,
    password: str = P12_PASSWORD,
    check: bool = True,
):  # type: ignore[no-untyped-def]
    secret = write_secret_file(env.root, password, f"{name}-p12-password")
    host_args = [f"--host={h}" for h in (hosts or ("api.example.com",))]
    return env.agentctl(
        "import", name, p12 or pki.client_p12("modern"), *host_args,
        "--p12-password-file", secret, check=check,
    )  # fmt: skip


def vault_snapshot(env: AgentEnv) -> dict[str, bytes]:
    root = env.vault_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def list_json(env: AgentEnv) -> list[dict]:
    return json.loads(env.agentctl("list", "--json").stdout)


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("agentctl: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def run_on_a_terminal(env: AgentEnv, args: list[str], answers: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    """Run ``python -m cli ARGS`` on a new pseudo-terminal; answer each prompt.

    ``answers`` pairs the text a prompt ends with and what to type. Returns
    the exit status and everything the terminal showed.
    """
    argv = [sys.executable, "-m", "cli", *args]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal and stdio
        try:
            os.chdir(env.root)
            os.execve(argv[0], argv, env.env)
        finally:
            os._exit(127)
    shown = b""
    pending = list(answers)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if pending and shown.rstrip().endswith(pending[0][0].rstrip().encode()):
                os.write(fd, pending.pop(0)[1].encode() + b"\n")
                shown += b"\n"
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


# --- init ---------------------------------------------------------------------


def test_init_creates_a_vault_from_a_passphrase_file(agent_env: AgentEnv) -> None:
    r = agent_env.agentctl("init", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
    assert "created a vault" in r.stdout
    Vault(agent_env.vault_dir).unlock_key(PASSPHRASE)  # opens: the file's text is the passphrase
    assert PASSPHRASE not in r.stdout + r.stderr


def test_init_reads_the_passphrase_from_stdin_less_one_trailing_newline(
    agent_env: AgentEnv,
) -> None:
    agent_env.agentctl("init", "--passphrase-file", "-", input=PASSPHRASE + "\r\n")
    Vault(agent_env.vault_dir).unlock_key(PASSPHRASE)


def test_init_refuses_when_a_vault_exists_and_leaves_it_untouched(
    agent_env: AgentEnv, vault: Vault
) -> None:
    before = vault_snapshot(agent_env)
    r = agent_env.agentctl(
        "init", "--passphrase-file", agent_env.passphrase_file("other"), check=False
    )
    assert r.returncode == 1
    assert "already exists" in one_error_line(r.stderr)
    assert vault_snapshot(agent_env) == before


@pytest.mark.parametrize("content", ["", "\n"])
def test_init_refuses_an_empty_passphrase_file(agent_env: AgentEnv, content: str) -> None:
    path = write_secret_file(agent_env.root, content, "empty")
    r = agent_env.agentctl("init", "--passphrase-file", path, check=False)
    assert r.returncode == 1
    assert "empty" in one_error_line(r.stderr)
    assert not Vault(agent_env.vault_dir).exists()


def test_init_without_a_terminal_says_so_instead_of_hanging(agent_env: AgentEnv) -> None:
    r = agent_env.agentctl("init", check=False)  # stdin is /dev/null
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "no terminal to ask for the passphrase" in line
    assert "--passphrase-file" in line
    assert not Vault(agent_env.vault_dir).exists()


def test_init_on_a_terminal_asks_twice_and_a_mismatch_creates_nothing(
    agent_env: AgentEnv,
) -> None:
    code, shown = run_on_a_terminal(
        agent_env,
        ["init"],
        [("New vault passphrase:", "first secret"), ("Repeat the passphrase:", "second secret")],
    )
    assert code == 1, shown
    assert "do not match" in shown
    assert "first secret" not in shown and "second secret" not in shown  # never echoed
    assert not Vault(agent_env.vault_dir).exists()


def test_init_on_a_terminal_creates_the_vault_when_both_answers_match(
    agent_env: AgentEnv,
) -> None:
    code, shown = run_on_a_terminal(
        agent_env,
        ["init"],
        [("New vault passphrase:", PASSPHRASE), ("Repeat the passphrase:", PASSPHRASE)],
    )
    assert code == 0, shown
    assert PASSPHRASE not in shown
    Vault(agent_env.vault_dir).unlock_key(PASSPHRASE)


def test_a_passphrase_file_of_dash_on_a_terminal_is_refused_rather_than_echoed(
    agent_env: AgentEnv,
) -> None:
    code, shown = run_on_a_terminal(agent_env, ["init", "--passphrase-file", "-"], [])
    assert code == 1, shown
    assert "standard input is a terminal" in shown
    assert not Vault(agent_env.vault_dir).exists()


# --- import, list, remove (no agent) ------------------------------------------


def test_import_of_a_modern_pkcs12_prints_one_line_and_list_shows_it(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    r = import_p12(agent_env, pki, "work", "api.example.com", "*.internal.example:8443")
    assert r.stdout.splitlines() == [
        f"imported work: CN={CLIENT_CN},O=mtls-agent tests, expires "
        f"{pki.client.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC, "
        "hosts api.example.com, *.internal.example:8443"
    ], r.stdout
    assert r.stderr == ""  # no agent running: nothing to say about it
    assert vault.names() == ["work"]

    [row] = list_json(agent_env)
    assert row["name"] == "work"
    assert row["loaded"] is False
    assert row["hosts"] == ["api.example.com", "*.internal.example:8443"]
    assert row["subject"] == f"CN={CLIENT_CN},O=mtls-agent tests"
    assert "intermediate" in row["issuer"]
    assert row["fingerprint_sha256"].count(":") == 31
    assert row["not_after"].startswith(f"{pki.client.cert.not_valid_after_utc:%Y-%m-%d}")

    text = agent_env.agentctl("list").stdout
    assert text.startswith("work\n")
    for field in ("subject:", "issuer:", "expires:", "hosts:", "sha256:", "loaded:      no"):
        assert field in text


def test_import_takes_ca_pins_and_min_tls(agent_env: AgentEnv, vault: Vault, pki: Pki) -> None:
    pin = "sha256//" + base64.b64encode(b"\x01" * 32).decode()
    secret = write_secret_file(agent_env.root, P12_PASSWORD, "pw")
    agent_env.agentctl(
        "import", "api", pki.client_p12("modern"), "--host", "api.example.com",
        "--ca", pki.root_pem, "--pin", pin, "--min-tls", "1.3", "--p12-password-file", secret,
    )  # fmt: skip
    [row] = list_json(agent_env)
    assert row["ca"] == "custom"
    assert row["min_tls"] == "1.3"
    assert len(row["pins"]) == 1


def mismatched_p12(folder: Path, pki: Pki) -> Path:
    """A modern PKCS#12 whose private key belongs to none of its certificates."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .build(P12_PASSWORD.encode())
    )
    data = pkcs12.serialize_key_and_certificates(
        b"x", new_key(), None, [pki.client.cert], encryption
    )
    path = folder / "mismatch.p12"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("wrong-password", "password is wrong"),
        ("truncated", "truncated or corrupt"),
        ("key-mismatch", "matches none of the certificates"),
    ],
)
def test_a_bad_pkcs12_fails_in_one_sentence_and_leaves_the_vault_byte_identical(
    agent_env: AgentEnv, vault: Vault, pki: Pki, damage: str, expected: str
) -> None:
    import_p12(agent_env, pki, "existing", "existing.example.com")
    before = vault_snapshot(agent_env)
    p12 = pki.client_p12("modern")
    if damage == "truncated":
        cut = agent_env.root / "cut.p12"
        cut.write_bytes(p12.read_bytes()[:200])
        r = import_p12(agent_env, pki, "new", p12=cut, check=False)
    elif damage == "key-mismatch":
        r = import_p12(agent_env, pki, "new", p12=mismatched_p12(agent_env.root, pki), check=False)
    else:
        r = import_p12(agent_env, pki, "new", password="not the password", check=False)
    assert r.returncode == 1
    assert r.stdout == ""
    line = one_error_line(r.stderr)
    assert expected in line, line
    assert line.endswith(".")
    assert P12_PASSWORD not in line
    assert vault_snapshot(agent_env) == before


def test_import_asks_for_the_pkcs12_password_on_the_terminal(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    p12 = pki.client_p12("modern")
    code, shown = run_on_a_terminal(
        agent_env,
        ["import", "work", str(p12), "--host", "api.example.com"],
        [(f"PKCS#12 password for {p12}:", P12_PASSWORD)],
    )
    assert code == 0, shown
    assert "imported work: " in shown
    assert P12_PASSWORD not in shown
    assert vault.names() == ["work"]


def test_import_refuses_an_existing_name_unless_replace(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_p12(agent_env, pki, "work")
    r = import_p12(agent_env, pki, "work", check=False)
    assert r.returncode == 1
    assert "--replace" in one_error_line(r.stderr)
    secret = write_secret_file(agent_env.root, P12_PASSWORD, "pw")
    agent_env.agentctl(
        "import", "work", pki.client_p12("modern"), "--host", "other.example.com",
        "--p12-password-file", secret, "--replace",
    )  # fmt: skip
    assert list_json(agent_env)[0]["hosts"] == ["other.example.com"]


def test_import_needs_a_vault_and_a_host(agent_env: AgentEnv, pki: Pki) -> None:
    r = import_p12(agent_env, pki, check=False)
    assert r.returncode == 1
    assert "agentctl init" in one_error_line(r.stderr)
    r = agent_env.agentctl("import", "work", pki.client_p12("modern"), check=False)
    assert r.returncode == 2  # usage error: --host is required


def test_import_without_a_terminal_or_password_file_refuses(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    r = agent_env.agentctl(
        "import", "work", pki.client_p12("modern"), "--host", "a.example", check=False
    )
    assert r.returncode == 1
    assert "no terminal to ask for the PKCS#12 password" in one_error_line(r.stderr)


def test_list_names_an_unreadable_identity_with_its_reason(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_p12(agent_env, pki, "good")
    (agent_env.vault_dir / "identities" / "bad.json").write_text("{not json")
    rows = list_json(agent_env)
    assert [r["name"] for r in rows] == ["bad", "good"]
    assert set(rows[0]) == {"name", "broken"}
    assert "not valid JSON" in rows[0]["broken"]
    assert "bad (unreadable)" in agent_env.agentctl("list").stdout


def test_a_vault_writer_waits_vault_lock_timeout_then_says_vault_busy(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    agent_env.write_config('[limits]\nvault_lock_timeout = "0.3s"\n')
    with locked_by_another_process(vault.directory / ".lock"):
        started = time.monotonic()
        busy = import_p12(agent_env, pki, "work", check=False)
        waited = time.monotonic() - started
    assert busy.returncode == 1 and "vault busy" in busy.stderr, busy.stderr
    assert waited < 5  # the default would have waited 10 s
    assert vault.names() == []


def test_remove_deletes_the_identity_and_an_unknown_name_is_an_error(
    agent_env: AgentEnv, vault: Vault, pki: Pki
) -> None:
    import_p12(agent_env, pki, "work")
    assert agent_env.agentctl("remove", "work").stdout == "removed work\n"
    assert list_json(agent_env) == []
    r = agent_env.agentctl("remove", "work", check=False)
    assert r.returncode == 1
    assert "no identity named 'work'" in one_error_line(r.stderr)


def test_env_prints_the_export_line_for_the_proxy_socket(agent_env: AgentEnv) -> None:
    out = agent_env.agentctl("env").stdout
    assert out.endswith("\n") and out.count("\n") == 1
    words = shlex.split(out)
    assert words == ["export", f"MTLS_AGENT_SOCK={agent_env.proxy_socket}"]


def test_env_quotes_a_path_for_the_shell(agent_env: AgentEnv) -> None:
    odd = agent_env.root / "it's here" / "agent.sock"
    agent_env.env["MTLS_AGENT_SOCK"] = str(odd)
    out = agent_env.agentctl("env").stdout
    assert shlex.split(out) == ["export", f"MTLS_AGENT_SOCK={odd}"]


def test_status_and_unlock_without_an_agent_say_none_is_running(agent_env: AgentEnv) -> None:
    r = agent_env.agentctl("status", check=False)
    assert r.returncode == 1
    assert one_error_line(r.stderr) == (
        f"agentctl: no agent is running on {agent_env.control_socket}; start one with"
        " 'mtls-agent', or in the background with 'eval \"$(agentctl start)\"'."
    )
    r = agent_env.agentctl("status", "--json", check=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["state"] == "not-running"
    # unlock says so before asking for a passphrase (stdin is no terminal here)
    r = agent_env.agentctl("unlock", check=False)
    assert r.returncode == 1
    assert "no agent is running" in one_error_line(r.stderr)


def test_version_and_usage_errors(agent_env: AgentEnv) -> None:
    assert agent_env.agentctl("--version").stdout.startswith("agentctl (mtls-agent) ")
    assert agent_env.agentctl("frobnicate", check=False).returncode == 2


def test_a_passphrase_on_the_command_line_is_refused_and_not_echoed(agent_env: AgentEnv) -> None:
    for args in (["unlock", "--passphrase", "hunter2"], ["init", "--passphrase=hunter2"]):
        r = agent_env.agentctl(*args, check=False)
        assert r.returncode == 2
        assert "hunter2" not in r.stdout + r.stderr
        assert "--passphrase-file" in r.stderr


# --- with a running agent -----------------------------------------------------


def test_unlock_with_the_wrong_passphrase_fails(agent_env: AgentEnv, agent: AgentProcess) -> None:
    r = agent_env.agentctl(
        "unlock", "--passphrase-file", agent_env.passphrase_file("wrong"), check=False
    )
    assert r.returncode == 1
    assert one_error_line(r.stderr) == "agentctl: wrong passphrase."
    assert json.loads(agent_env.agentctl("status", "--json").stdout)["state"] == "locked"


def test_unlock_status_list_and_lock_against_the_running_agent(
    agent_env: AgentEnv, agent: AgentProcess, pki: Pki
) -> None:
    r = import_p12(agent_env, pki, "work")  # the agent reloads: it knows the identity, locked
    assert r.stderr == ""
    status = json.loads(agent_env.agentctl("status", "--json").stdout)
    assert (status["state"], status["identities"], status["loaded"]) == ("locked", 1, 0)
    assert list_json(agent_env)[0]["loaded"] is False

    r = agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
    assert r.stdout == "unlocked: 1 identity loaded\n"
    assert r.stderr == ""

    status = json.loads(agent_env.agentctl("status", "--json").stdout)
    assert status["state"] == "unlocked"
    assert (status["identities"], status["loaded"]) == (1, 1)
    assert status["sockets"] == {
        "proxy": str(agent_env.proxy_socket),
        "control": str(agent_env.control_socket),
    }
    assert status["broken"] == {}
    assert list_json(agent_env)[0]["loaded"] is True

    text = agent_env.agentctl("status").stdout
    assert "state:       unlocked" in text
    assert "1 loaded of 1" in text
    assert str(agent_env.proxy_socket) in text
    assert "loaded:      yes" in agent_env.agentctl("list").stdout

    assert agent_env.agentctl("lock").stdout == "locked\n"
    assert json.loads(agent_env.agentctl("status", "--json").stdout)["state"] == "locked"
    assert list_json(agent_env)[0]["loaded"] is False


def test_unlock_asks_for_the_passphrase_on_the_terminal(
    agent_env: AgentEnv, agent: AgentProcess
) -> None:
    code, shown = run_on_a_terminal(agent_env, ["unlock"], [("Vault passphrase:", PASSPHRASE)])
    assert code == 0, shown
    assert "unlocked: 0 identities loaded" in shown
    assert PASSPHRASE not in shown


def test_unlock_reads_the_passphrase_from_stdin(agent_env: AgentEnv, agent: AgentProcess) -> None:
    r = agent_env.agentctl("unlock", "--passphrase-file", "-", input=PASSPHRASE + "\n")
    assert r.stdout == "unlocked: 0 identities loaded\n"


# --- passphrase ---------------------------------------------------------------------


def test_passphrase_rewraps_the_vault_key_and_keeps_every_identity(
    agent_env: AgentEnv, agent: AgentProcess, pki: Pki
) -> None:
    import_p12(agent_env, pki, "work")
    sealed = (agent_env.vault_dir / "identities" / "work.json").read_bytes()
    r = agent_env.agentctl(
        "passphrase",
        "--passphrase-file", agent_env.passphrase_file(PASSPHRASE),
        "--new-passphrase-file", agent_env.passphrase_file("a brand new passphrase", "new"),
    )  # fmt: skip
    assert r.stdout == "changed the vault passphrase: the next unlock takes the new one\n"
    assert (agent_env.vault_dir / "identities" / "work.json").read_bytes() == sealed
    old = agent_env.agentctl(
        "unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE), check=False
    )
    assert old.returncode == 1 and "wrong passphrase" in old.stderr
    new = agent_env.agentctl(
        "unlock", "--passphrase-file", agent_env.passphrase_file("a brand new passphrase", "new")
    )
    assert new.stdout == "unlocked: 1 identity loaded\n"
    written = agent_env.audit_log.read_text()
    events = [json.loads(line)["event"] for line in written.splitlines()]
    assert events.count("passphrase") == 1 and "a brand new" not in written


def test_passphrase_with_the_wrong_current_one_changes_nothing(
    agent_env: AgentEnv, vault: Vault
) -> None:
    before = vault_snapshot(agent_env)
    r = agent_env.agentctl(
        "passphrase",
        "--passphrase-file", agent_env.passphrase_file("not it"),
        "--new-passphrase-file", agent_env.passphrase_file("new", "new"),
        check=False,
    )  # fmt: skip
    assert one_error_line(r.stderr) == "agentctl: wrong passphrase; the vault was left as it was."
    assert vault_snapshot(agent_env) == before
    both = agent_env.agentctl(
        "passphrase", "--passphrase-file", "-", "--new-passphrase-file", "-", check=False
    )
    assert both.returncode == 1 and "only one of" in both.stderr


def test_passphrase_stores_the_new_one_only_in_a_keyring_this_session_trusts(
    agent_env: AgentEnv, vault: Vault
) -> None:
    """A keyring.json naming a backend that keeps no secret safe (edited, or
    from another session) gets a warning, never the new passphrase."""
    marker = marker_path(agent_env.vault_dir)
    marker.write_text(json.dumps({"backend": "keyring.backends.fail.Keyring", "username": "v"}))
    agent_env.env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    r = agent_env.agentctl(
        "passphrase",
        "--passphrase-file", agent_env.passphrase_file(PASSPHRASE),
        "--new-passphrase-file", agent_env.passphrase_file("new one", "new"),
    )  # fmt: skip
    assert "changed the vault passphrase" in r.stdout
    assert "still holds the old passphrase" in one_error_line(r.stderr)
    Vault(agent_env.vault_dir).unlock_key("new one")


def test_passphrase_on_a_terminal_asks_the_current_one_then_the_new_one_twice(
    agent_env: AgentEnv, vault: Vault
) -> None:
    code, shown = run_on_a_terminal(
        agent_env,
        ["passphrase"],
        [
            ("Current vault passphrase:", PASSPHRASE),
            ("New vault passphrase:", "typed anew"),
            ("Repeat the passphrase:", "typed anew"),
        ],
    )
    assert code == 0, shown
    assert PASSPHRASE not in shown and "typed anew" not in shown  # never echoed
    Vault(agent_env.vault_dir).unlock_key("typed anew")


def test_import_and_remove_while_unlocked_load_and_unload_at_once(
    agent_env: AgentEnv, agent: AgentProcess, pki: Pki
) -> None:
    agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
    import_p12(agent_env, pki, "work")
    assert list_json(agent_env)[0]["loaded"] is True
    agent_env.agentctl("remove", "work")
    status = json.loads(agent_env.agentctl("status", "--json").stdout)
    assert (status["identities"], status["loaded"]) == (0, 0)


def test_unlock_names_an_identity_whose_key_will_not_open_and_still_succeeds(
    agent_env: AgentEnv, agent: AgentProcess, pki: Pki
) -> None:
    import_p12(agent_env, pki, "good", "good.example.com")
    other = pki.client_p12("modern", leaf=pki.issue_client("second"))
    import_p12(agent_env, pki, "spoilt", "spoilt.example.com", p12=other)
    path = agent_env.vault_dir / "identities" / "spoilt.json"
    doc = json.loads(path.read_text())
    ct = bytearray(base64.b64decode(doc["sealed_key"]["ct"]))
    ct[0] ^= 0xFF
    doc["sealed_key"]["ct"] = base64.b64encode(bytes(ct)).decode()
    path.write_text(json.dumps(doc))

    r = agent_env.agentctl("unlock", "--passphrase-file", agent_env.passphrase_file(PASSPHRASE))
    assert r.returncode == 0
    assert r.stdout == "unlocked: 1 identity loaded\n"
    line = one_error_line(r.stderr)
    assert "'spoilt'" in line and "does not open" in line
    assert "spoilt" in json.loads(agent_env.agentctl("status", "--json").stdout)["broken"]
    rows = {row["name"]: row for row in list_json(agent_env)}
    assert rows["good"]["loaded"] is True
    assert rows["spoilt"]["loaded"] is False and "does not open" in rows["spoilt"]["broken"]
