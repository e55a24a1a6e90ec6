"""Security behaviours a review found missing, each pinned where it can break.

In-process where the decision is one function's (attestation of a process
that exec'd, routing an identity matched twice, a lock racing an unlock);
end to end with the real ``mtls-agent``, ``agentctl``, curl and nginx where
the user sees it (a lock cutting a download, a refused runtime folder, a
control socket served by another user).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.agent import AgentEnv, AgentProcess, start_agent, write_secret_file
from support.clients import curl
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import in_ci, require_tool, sha256_file

from agent.errors import AttestationError
from agent.identity import new_identity
from agent.keychain import Keychain
from agent.peer import Caller, Peer, caller_of
from agent.policy import CallerRules, choose
from agent.routing import Router
from agent.server import StartupError, prepare_runtime_dir
from agent.vault import Vault

PASSPHRASE = "review security tests"
CHEAP_KDF_N = 2**12
WAIT = 10.0
NOBODY = 65534


def wait_until(done, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def import_identity(env: AgentEnv, pki: Pki, name: str, *flags: str, p12: Path | None = None):  # type: ignore[no-untyped-def]
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12-password")
    return env.agentctl(
        "import", name, p12 or pki.client_p12(), "--ca", pki.root_pem,
        "--p12-password-file", password, *flags,
    )  # fmt: skip


@dataclass
class RunningAgent:
    env: AgentEnv
    agent: AgentProcess

    def unlock(self) -> None:
        self.env.agentctl("unlock", "--passphrase-file", self.env.passphrase_file(PASSPHRASE))


def running_agent_with(pki: Pki, config: str, *imports: tuple[str, ...]) -> Iterator[RunningAgent]:
    """A started, unlocked agent whose vault holds ``imports`` (name, then flags)."""
    env = AgentEnv()
    try:
        if config:
            env.write_config(config)
        Vault(env.vault_dir).create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
        for name, *flags in imports:
            import_identity(env, pki, name, *flags)
        agent = start_agent(env)
        try:
            running = RunningAgent(env, agent)
            running.unlock()
            yield running
        finally:
            agent.stop()
    finally:
        env.cleanup()


# --- 1. a caller that execs another program after connecting ---------------------------

EXEC_CHILD = textwrap.dedent(
    """
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.recv(1)  # connected and seen: now become another program, same pid and start time
    os.execv(sys.argv[2], [sys.argv[2], "30"])
    """
)


def test_a_caller_that_execs_another_program_after_connecting_is_refused_its_rule() -> None:
    sleep = os.path.realpath(require_tool("sleep"))
    folder = tempfile.mkdtemp(prefix="mt-exec-")
    path = os.path.join(folder, "s")
    child = None
    try:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen()
            child = subprocess.Popen([sys.executable, "-c", EXEC_CHILD, path, sleep])
            conn, _ = listener.accept()
            with conn:
                caller = caller_of(conn)  # what the relay does when a client connects
                assert caller is not None and caller.pid == child.pid
                assert caller.exe == os.path.realpath(f"/proc/{child.pid}/exe") != sleep
                conn.send(b"g")
                wait_until(lambda: os.path.realpath(f"/proc/{child.pid}/exe") == sleep, "the exec")
                refusal = CallerRules(exes=(sleep,)).refusal(caller)
                assert refusal is not None and "not the program that connected" in refusal
                with pytest.raises(AttestationError, match="not the program that connected"):
                    caller.executable()
    finally:
        if child is not None:
            child.kill()
            child.wait()
        shutil.rmtree(folder, ignore_errors=True)


# One request the agent answers itself (no rule is consulted for it), then the
# process execs sh, which asks for the identity ruled to sh on the same connection.
EXEC_THEN_ASK = textwrap.dedent(
    """
    import os, socket, sys
    sock_path, first_host, second_host = sys.argv[1:4]
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendall(f"GET /echo HTTP/1.1\\r\\nHost: {first_host}\\r\\n\\r\\n".encode())
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\\r\\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    print(head.split(b"\\r\\n")[0].decode(), flush=True)
    fd = s.fileno()  # a single digit, as sh wants
    os.set_inheritable(fd, True)
    crlf = "\\\\r\\\\n"  # for printf
    request = f"GET /echo HTTP/1.1{crlf}Host: {second_host}{crlf}Connection: close{crlf}{crlf}"
    os.execv("/bin/sh", ["sh", "-c", f"printf '{request}' >&{fd}; cat <&{fd}"])
    """
)


@pytest.fixture(scope="module")
def ruled_agent(pki: Pki, nginx: Nginx) -> Iterator[RunningAgent]:
    """Identities with caller rules: 'shell' for 127.0.0.1 (sh only), 'twice' matched twice."""
    sh = os.path.realpath("/bin/sh")
    yield from running_agent_with(
        pki, "",
        ("shell", "--host", "127.0.0.1", "--allow-exe", sh),
        ("twice", "--host", "localhost", "--host", f"localhost:{nginx.port}",
         "--allow-uid", str(os.getuid())),
    )  # fmt: skip


def test_a_process_that_execs_an_allowed_program_after_connecting_is_denied_through_the_agent(
    ruled_agent: RunningAgent, nginx: Nginx
) -> None:
    require_tool("sh")
    proc = subprocess.run(
        [sys.executable, "-c", EXEC_THEN_ASK, str(ruled_agent.env.proxy_socket),
         "unbound.invalid", f"127.0.0.1:{nginx.port}"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    first, _, rest = out.partition("\n")
    assert first.startswith("HTTP/1.1 403"), out  # the agent's own no-identity answer
    assert rest.startswith("HTTP/1.1 403"), out
    assert "Mtls-Agent-Error: peer-denied" in rest, out


# --- 3. one identity matched by two of its own patterns ----------------------------------


def test_an_identity_matched_by_two_of_its_patterns_is_a_single_candidate(pki: Pki) -> None:
    leaf = pki.client
    rules = CallerRules(uids=(os.getuid(),))
    identity = new_identity(
        "work", leaf.key, leaf.chain, ["api.example.com", "*.example.com"], callers=rules
    )
    candidates = Router([identity]).candidates("api.example.com", 443)
    assert candidates == [identity]
    caller = Caller(Peer(os.getpid(), os.getuid(), os.getgid()))
    assert choose(candidates, "api.example.com", 443, caller) is identity


def test_an_identity_with_a_rule_matched_twice_serves_its_caller_through_the_agent(
    ruled_agent: RunningAgent, nginx: Nginx
) -> None:
    answer = curl(ruled_agent.env.proxy_socket, f"http://localhost:{nginx.port}/echo/twice")
    assert answer.status == 200, (answer.headers, answer.body)
    assert answer.header("X-Client-Verify") == "SUCCESS"


# --- 13. a lock during an unlock's KDF wins ------------------------------------------------


async def test_a_lock_that_arrives_during_the_unlock_kdf_leaves_the_agent_locked(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = Vault(tmp_path / "vault")
    vault.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    leaf = pki.client
    identity = new_identity(
        "work", leaf.key, leaf.chain, ["localhost"], ca_pem=pki.root_pem.read_bytes()
    )
    vault.store("work", identity.to_metadata(), leaf.key)
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    keychain = Keychain(vault, scratch)

    in_kdf, finish = threading.Event(), threading.Event()
    real_unlock_key = vault.unlock_key

    def slow_unlock_key(passphrase: str):  # type: ignore[no-untyped-def]
        key = real_unlock_key(passphrase)
        in_kdf.set()
        finish.wait(WAIT)
        return key

    monkeypatch.setattr(vault, "unlock_key", slow_unlock_key)
    unlocking = asyncio.create_task(keychain.unlock(PASSPHRASE))
    assert await asyncio.to_thread(in_kdf.wait, WAIT)
    keychain.lock()
    finish.set()
    report = await unlocking
    assert keychain.locked
    assert report.loaded == []
    assert not keychain.is_loaded("work")


# --- 2. a lock cuts what is under way; a renewal swap does not ---------------------------


class HoldingListener:
    """Accepts TCP connections, says it did, and never speaks (a handshake that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        self.accepted.set()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture(scope="module")
def streaming_agent(pki: Pki) -> Iterator[RunningAgent]:
    """Identity 'work' for localhost and 127.0.0.1; a connect timeout longer than the tests wait."""
    yield from running_agent_with(
        pki, '[limits]\nconnect_timeout = "8s"\n',
        ("work", "--host", "localhost", "--host", "127.0.0.1"),
    )  # fmt: skip


def start_download(
    agent: RunningAgent, nginx: Nginx, name: str, out: Path, rate: str
) -> subprocess.Popen[bytes]:
    """curl fetching nginx's /files/NAME through the agent at ``rate``, in the background."""
    exe = require_tool("curl")
    url = f"http://localhost:{nginx.port}/files/{name}"
    return subprocess.Popen(
        [exe, "-sS", "--unix-socket", str(agent.env.proxy_socket), "--limit-rate", rate,
         "-o", str(out), url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_lock_cuts_a_download_still_streaming_through_the_agent(
    streaming_agent: RunningAgent, nginx: Nginx
) -> None:
    streaming_agent.unlock()
    size = 32 << 20  # 32 s at the rate below: the cut must come long before
    nginx.make_file("lock-cut.bin", size)
    out = streaming_agent.env.root / "lock-cut.out"
    download = start_download(streaming_agent, nginx, "lock-cut.bin", out, "1M")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 0, "the download to start")
        streaming_agent.env.agentctl("lock")
        locked_at = time.monotonic()
        try:
            download.wait(WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"curl still downloading {WAIT:g} s after the lock: nothing was cut")
        took = time.monotonic() - locked_at
    finally:
        download.kill()
        download.wait()
    assert download.returncode != 0
    assert took < 5.0
    assert out.stat().st_size < size


def test_a_connection_being_set_up_when_the_lock_comes_is_answered_423(
    streaming_agent: RunningAgent,
) -> None:
    streaming_agent.unlock()
    listener = HoldingListener()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(streaming_agent.env.proxy_socket))
            sock.sendall(f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{listener.port}\r\n\r\n".encode())
            assert listener.accepted.wait(WAIT), "the agent never connected upstream"
            streaming_agent.env.agentctl("lock")
            locked_at = time.monotonic()
            data = b""
            while b"\r\n\r\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
            took = time.monotonic() - locked_at
    finally:
        listener.close()
    assert data.startswith(b"HTTP/1.1 423 "), data
    assert b"Mtls-Agent-Error: locked" in data
    assert took < 4.0  # not the 8 s connect timeout


def test_a_renewal_swap_lets_a_running_download_finish_whole(
    streaming_agent: RunningAgent, nginx: Nginx, pki: Pki
) -> None:
    streaming_agent.unlock()
    _, digest = nginx.make_file("swap.bin", 6 << 20)
    out = streaming_agent.env.root / "swap.out"
    renewed = pki.issue_client(name="renewed-swap")
    download = start_download(streaming_agent, nginx, "swap.bin", out, "2M")
    try:
        wait_until(lambda: out.exists() and out.stat().st_size > 0, "the download to start")
        import_identity(
            streaming_agent.env, pki, "work", "--host", "localhost", "--host", "127.0.0.1",
            "--replace", p12=pki.client_p12(leaf=renewed),
        )  # fmt: skip
        seen = curl(streaming_agent.env.proxy_socket, f"http://localhost:{nginx.port}/echo/swap")
        assert seen.header("X-Client-Serial") == renewed.serial_hex  # swapped already
        assert download.poll() is None, "the download ended before the swap: nothing was shown"
        download.wait(30)
    finally:
        download.kill()
        download.wait()
    assert download.returncode == 0, download.stderr.read() if download.stderr else ""  # type: ignore[union-attr]
    assert sha256_file(out) == digest


# --- 11. the runtime folder's parent ---------------------------------------------------------
#
# The agent's start-up check, called as the agent calls it: platformdirs (4.14 and later)
# already ignores an XDG_RUNTIME_DIR that is not 0700 and the user's, so the folder it
# hands the agent cannot be set to an unsafe one from the environment; this check is what
# stands when an older platformdirs (the project allows >= 4.2) or a fallback gives one.


def shared_parent(mode: int, owner: int | None = None) -> Path:
    parent = Path(tempfile.mkdtemp(prefix="mt-parent-")) / "shared"
    parent.mkdir()
    os.chmod(parent, mode)
    if owner is not None:
        os.chown(parent, owner, owner)
    return parent


def test_the_agent_refuses_a_runtime_parent_others_can_write_without_the_sticky_bit() -> None:
    parent = shared_parent(0o777)
    try:
        with pytest.raises(StartupError) as refused:
            prepare_runtime_dir(parent / "mtls-agent")
        assert f"{parent} can be written by other users (mode 777)" in refused.value.message
    finally:
        shutil.rmtree(parent.parent, ignore_errors=True)


def test_the_agent_refuses_a_runtime_parent_owned_by_another_user() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    parent = shared_parent(0o755, owner=NOBODY)
    try:
        with pytest.raises(StartupError) as refused:
            prepare_runtime_dir(parent / "mtls-agent")
        assert f"{parent} belongs to uid {NOBODY}" in refused.value.message
    finally:
        shutil.rmtree(parent.parent, ignore_errors=True)


def test_the_agent_accepts_a_sticky_runtime_parent_like_tmp() -> None:
    parent = shared_parent(0o1777)
    try:
        prepare_runtime_dir(parent / "mtls-agent")
        made = (parent / "mtls-agent").stat()
        assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o700
    finally:
        shutil.rmtree(parent.parent, ignore_errors=True)


# --- 12. agentctl talks only to an agent of its own uid --------------------------------------

FOREIGN_SERVER = textwrap.dedent(
    """
    import os, socket, sys
    path, record, ready = sys.argv[1:4]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    open(ready, "w").close()
    srv.settimeout(20)
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            break
        conn.settimeout(2)
        got = b""
        try:
            while b"\\r\\n\\r\\n" not in got or len(got) < 4096:
                piece = conn.recv(65536)
                if not piece:
                    break
                got += piece
                if b"\\r\\n\\r\\n" in got:
                    head, _, body = got.partition(b"\\r\\n\\r\\n")
                    n = head.lower().split(b"content-length:")
                    if len(n) < 2 or len(body) >= int(n[1].split(b"\\r\\n")[0]):
                        break
        except OSError:
            pass
        with open(record, "ab") as f:
            f.write(got)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                         b"Content-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}")
        except OSError:
            pass
        conn.close()
    """
)


def test_agentctl_refuses_a_control_socket_served_by_another_uid() -> None:
    if os.getuid() != 0:
        if in_ci():
            pytest.fail("CI=true: this test needs root to run a server as another user")
        pytest.skip("needs root to run a server as another user")
    setpriv = require_tool("setpriv")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.fail("no system python3 for the other user's server", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="mt-foreign-"))
    os.chown(folder, NOBODY, NOBODY)
    record, ready = folder / "record", folder / "ready"
    server = subprocess.Popen(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
         FOREIGN_SERVER, str(folder / "control.sock"), str(record), str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    env = AgentEnv()
    try:
        wait_until(lambda: ready.exists() or server.poll() is not None, "the foreign server")
        assert server.poll() is None, server.stderr.read()  # type: ignore[union-attr]
        env.env["MTLS_AGENT_SOCK"] = str(folder / "agent.sock")
        secret = "foreign-uid passphrase 7c1e"
        passphrase = env.passphrase_file(secret)
        unlocked = env.agentctl("unlock", "--passphrase-file", passphrase, check=False)
        status = env.agentctl("status", check=False)
    finally:
        server.kill()
        server.wait()
        env.cleanup()
    received = record.read_bytes() if record.exists() else b""
    shutil.rmtree(folder, ignore_errors=True)
    assert secret.encode() not in received
    assert received == b""
    for done in (unlocked, status):
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert f"belongs to uid {NOBODY}" in done.stderr
