"""A hardened agent, proven on the real thing: peer credentials, pins, start-up, unlocks.

Another user is a real second OS user (created with useradd when missing,
only as root) running real curl through setpriv against sockets the test
opens for it. The agent's own state is read where the kernel keeps it
(``/proc/PID``). Pins and TLS versions are checked against real nginx and a
TLS 1.2-only server; failed unlocks against the real control socket.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import resource
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.agent import AgentEnv, AgentProcess, console_script, start_agent, write_secret_file
from support.clients import direct_connection_id
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import in_ci, require_tool, traversable_by_others

from agent.control import UnlockThrottle
from agent.paths import default_paths
from agent.vault import Vault
from cli.control_client import ControlClient, ControlError

PASSPHRASE = "hardening tests passphrase"
CHEAP_KDF_N = 2**12
SECOND_USER = "mtls-agent-peer"
WRONG_PIN = "sha256//" + "A" * 43 + "="


# --- a second OS user ---------------------------------------------------------------------


def _need_root(what: str) -> None:
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(f"CI=true but not root: cannot {what}", pytrace=False)
    pytest.skip(f"needs root to {what}")


@pytest.fixture(scope="session")
def second_user() -> pwd.struct_passwd:
    """A second OS user, made once (idempotently, across xdist workers) when missing."""
    _need_root("create and switch to a second OS user")
    require_tool("setpriv")
    with open("/tmp/mtls-agent-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(SECOND_USER)
        except KeyError:
            useradd = require_tool("useradd")
            subprocess.run(
                [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 SECOND_USER],
                check=True, capture_output=True,
            )  # fmt: skip
            return pwd.getpwnam(SECOND_USER)


def as_user(user: pwd.struct_passwd, *command: str) -> list[str]:
    return [require_tool("setpriv"), f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
            "--clear-groups", "--", *command]  # fmt: skip


def open_to_others(env: AgentEnv) -> None:
    """Let any user reach the proxy and control sockets (never writable: the agent refuses)."""
    for folder in (env.root, env.xdg_runtime_dir, env.runtime_dir):
        os.chmod(folder, 0o711)
    for sock in (env.proxy_socket, env.control_socket):
        os.chmod(sock, 0o666)


@dataclass
class Answer:
    status: int
    error: str | None
    subject: str | None
    body: str


def fetch(
    socket_path: Path, url: str, *, prefix: tuple[str, ...] = (), curl: str | None = None
) -> Answer:
    """GET ``url`` through the agent with real curl, optionally run as another user."""
    exe = curl or require_tool("curl")
    out = subprocess.run(
        [*prefix, exe, "-sS", "-i", "--unix-socket", str(socket_path), url],
        capture_output=True, timeout=30, check=False,
    ).stdout.decode("latin-1")  # fmt: skip
    head, _, body = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    lower = {k.lower(): v for k, v in headers.items()}
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    return Answer(status, lower.get("mtls-agent-error"), lower.get("x-client-s-dn"), body)


# --- an agent with identities -----------------------------------------------------------


@pytest.fixture
def vault(agent_env: AgentEnv) -> Vault:
    v = Vault(agent_env.vault_dir)
    v.create(PASSPHRASE, kdf_n=CHEAP_KDF_N)
    return v


def import_identity(
    env: AgentEnv, pki: Pki, name: str, *extra: str, hosts: tuple[str, ...] = ("localhost",),
    p12: Path | None = None,
) -> None:  # fmt: skip
    password = write_secret_file(env.root, P12_PASSWORD, f"{name}-p12-password")
    env.agentctl(
        "import", name, p12 or pki.client_p12(), *(f"--host={h}" for h in hosts),
        "--ca", pki.root_pem, "--p12-password-file", password, *extra,
    )  # fmt: skip


def unlock(env: AgentEnv) -> None:
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test starts; all stopped afterwards."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def serving(
    agent_env: AgentEnv, vault: Vault, pki: Pki, agents: list[AgentProcess]
) -> AgentProcess:
    """An unlocked agent with the identity 'work' for localhost, no caller rules."""
    import_identity(agent_env, pki, "work")
    agents.append(start_agent(agent_env))
    unlock(agent_env)
    return agents[-1]


# --- 1. peer credentials on both sockets --------------------------------------------------


def test_another_user_is_refused_on_the_proxy_socket_and_nginx_sees_no_connection(
    agent_env: AgentEnv, serving: AgentProcess, second_user: pwd.struct_passwd, pki: Pki,
    nginx: Nginx,
) -> None:  # fmt: skip
    open_to_others(agent_env)
    url = f"http://{nginx.host_header}/echo"
    assert fetch(agent_env.proxy_socket, url).status == 200  # the owner is served
    before = direct_connection_id(pki, nginx)
    answer = fetch(agent_env.proxy_socket, url, prefix=tuple(as_user(second_user)))
    after = direct_connection_id(pki, nginx)
    assert (answer.status, answer.error) == (403, "peer-denied")
    assert after == before + 1, "the agent opened an upstream connection for a refused peer"


def test_another_user_listed_in_proxy_allow_uids_is_let_in(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx,
    second_user: pwd.struct_passwd, agents: list[AgentProcess],
) -> None:  # fmt: skip
    agent_env.write_config(f"[proxy]\nallow_uids = [{second_user.pw_uid}]\n")
    import_identity(agent_env, pki, "work")
    agents.append(start_agent(agent_env))
    unlock(agent_env)
    open_to_others(agent_env)
    answer = fetch(
        agent_env.proxy_socket, f"http://{nginx.host_header}/echo",
        prefix=tuple(as_user(second_user)),
    )  # fmt: skip
    assert answer.status == 200
    assert answer.subject == "CN=mtls-agent test client,O=mtls-agent tests"


def test_the_control_socket_refuses_another_user_even_one_the_proxy_lets_in(
    agent_env: AgentEnv, vault: Vault, second_user: pwd.struct_passwd,
    agents: list[AgentProcess],
) -> None:  # fmt: skip
    agent_env.write_config(f"[proxy]\nallow_uids = [{second_user.pw_uid}]\n")
    agents.append(start_agent(agent_env))
    open_to_others(agent_env)
    for path in ("/v1/status", "/v1/lock"):
        method = ["-X", "POST"] if path == "/v1/lock" else []
        out = subprocess.run(
            as_user(second_user, require_tool("curl"), "-sS", "-i", "--unix-socket",
                    str(agent_env.control_socket), *method, f"http://agent{path}"),
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout  # fmt: skip
        assert out.startswith("HTTP/1.1 403"), out
        assert '"error": "peer-denied"' in out
    assert ControlClient(agent_env.control_socket).get("/v1/status")["state"] == "locked"


def test_an_identity_ruled_for_another_user_is_that_users_alone(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx,
    second_user: pwd.struct_passwd, agents: list[AgentProcess],
) -> None:  # fmt: skip
    """Needs the relay to route with the caller (keychain.route(host, port, caller))."""
    theirs = pki.issue_client("mtls-agent second user", name="second-user")
    agent_env.write_config(f"[proxy]\nallow_uids = [{second_user.pw_uid}]\n")
    import_identity(agent_env, pki, "mine", "--allow-uid", str(os.getuid()))
    import_identity(
        agent_env, pki, "theirs", "--allow-uid", str(second_user.pw_uid),
        p12=pki.client_p12(leaf=theirs),
    )  # fmt: skip
    agents.append(start_agent(agent_env))
    unlock(agent_env)
    open_to_others(agent_env)
    url = f"http://{nginx.host_header}/echo"
    mine = fetch(agent_env.proxy_socket, url)
    other = fetch(agent_env.proxy_socket, url, prefix=tuple(as_user(second_user)))
    assert (mine.status, mine.subject) == (200, "CN=mtls-agent test client,O=mtls-agent tests")
    assert (other.status, other.subject) == (200, "CN=mtls-agent second user,O=mtls-agent tests")


# --- 3. pins and TLS versions ---------------------------------------------------------------


def test_a_pin_mismatch_stops_after_the_handshake_before_any_byte_of_the_request(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx, agents: list[AgentProcess]
) -> None:
    right = f"sha256//{pki.server.spki_sha256}"
    import_identity(agent_env, pki, "pinned-wrong", "--pin", WRONG_PIN, hosts=("localhost",))
    import_identity(agent_env, pki, "pinned-right", "--pin", right, hosts=("127.0.0.1",))
    agents.append(start_agent(agent_env))
    unlock(agent_env)

    mark = nginx.mark()  # before the first direct request: nginx logs after answering
    before = direct_connection_id(pki, nginx)
    refused = fetch(agent_env.proxy_socket, f"http://{nginx.host_header}/echo")
    assert (refused.status, refused.error) == (502, "pin-mismatch")
    after = direct_connection_id(pki, nginx)
    assert after == before + 2, "the agent should have made exactly one (TLS-only) connection"
    entries = nginx.access_log(mark, wait_for=2)
    # only the two direct checks' requests: the agent's connection carried none
    assert sorted(e["connection"] for e in entries) == [before, after]

    served = fetch(agent_env.proxy_socket, f"http://127.0.0.1:{nginx.port}/echo")
    assert served.status == 200


@pytest.fixture
def tls12_only_server(pki: Pki) -> Iterator[int]:
    """A real mTLS server that speaks TLS 1.2 at most and answers 200 to each request."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.root_pem))
    context.verify_mode = ssl.CERT_REQUIRED
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(pki.server.cert_path), str(pki.server.key_path))
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        piece = tls.recv(65536)
                        if not piece:
                            break
                        data += piece
                    tls.sendall(
                        f"HTTP/1.1 200 OK\r\nX-Tls: {tls.version()}\r\nContent-Length: 3\r\n"
                        "Connection: close\r\n\r\nok\n".encode()
                    )
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_min_tls_is_enforced_per_identity_and_tls13_is_used_when_offered(
    agent_env: AgentEnv, vault: Vault, pki: Pki, nginx: Nginx, tls12_only_server: int,
    agents: list[AgentProcess],
) -> None:  # fmt: skip
    port = tls12_only_server
    import_identity(agent_env, pki, "strict", "--min-tls", "1.3",
                    hosts=(f"localhost:{port}", f"localhost:{nginx.port}"))  # fmt: skip
    import_identity(agent_env, pki, "lenient", hosts=(f"127.0.0.1:{port}",))
    agents.append(start_agent(agent_env))
    unlock(agent_env)

    refused = fetch(agent_env.proxy_socket, f"http://localhost:{port}/")
    assert (refused.status, refused.error) == (502, "upstream-unreachable")
    out = subprocess.run(
        [require_tool("curl"), "-sS", "-i", "--unix-socket", str(agent_env.proxy_socket),
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    assert out.startswith("HTTP/1.1 200") and "X-Tls: TLSv1.2" in out
    strict = subprocess.run(
        [require_tool("curl"), "-sS", "-i", "--unix-socket", str(agent_env.proxy_socket),
         f"http://{nginx.host_header}/echo"],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    assert strict.startswith("HTTP/1.1 200") and "X-Ssl-Protocol: TLSv1.3" in strict


# --- 4. hardening at start-up ------------------------------------------------------------------


def _proc_owner(pid: int, name: str) -> int:
    return os.stat(f"/proc/{pid}/{name}").st_uid


def test_the_running_agent_is_not_dumpable_dumps_no_core_and_has_a_private_umask(
    agent_env: AgentEnv, agents: list[AgentProcess], request: pytest.FixtureRequest
) -> None:
    """With PR_SET_DUMPABLE 0 the kernel gives the process's /proc files to root, which is
    what keeps ptrace and /proc/PID/mem away from the agent's own uid. As root the
    agent runs as the second user, so that the change of owner shows."""
    prefix: list[str] = []
    uid = os.getuid()
    if os.geteuid() == 0:
        user: pwd.struct_passwd = request.getfixturevalue("second_user")
        for path in [agent_env.root, *agent_env.root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix, uid = as_user(user), user.pw_uid
    # the checkout (and its venv) may sit in a folder only root can enter
    with traversable_by_others(Path(__file__).resolve().parent.parent, Path(sys.prefix)):
        _check_not_dumpable(agent_env, agents, prefix, uid)


def _check_not_dumpable(
    agent_env: AgentEnv, agents: list[AgentProcess], prefix: list[str], uid: int
) -> None:
    agent = start_agent(agent_env, command=[*prefix, *console_script("mtls-agent", "agent")])
    agents.append(agent)
    plain = subprocess.Popen([*prefix, "sleep", "30"])
    try:
        # setpriv's change of uid makes it non-dumpable too, until it execs sleep
        deadline = time.monotonic() + 10
        while Path(f"/proc/{plain.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert _proc_owner(plain.pid, "mem") == uid  # an ordinary process of that user
        assert _proc_owner(plain.pid, "status") == uid
        assert _proc_owner(agent.pid, "mem") == 0, "the agent is dumpable"
        assert _proc_owner(agent.pid, "status") == 0
    finally:
        plain.kill()
        plain.wait()
    limits = Path(f"/proc/{agent.pid}/limits").read_text()
    [core] = [line.split() for line in limits.splitlines() if line.startswith("Max core file")]
    assert core[4:6] == ["0", "0"]
    status = Path(f"/proc/{agent.pid}/status").read_text()
    assert "\nUmask:\t0077\n" in status


def test_the_agent_raises_its_open_file_limit_to_the_hard_limit(
    agent_env: AgentEnv, agents: list[AgentProcess]
) -> None:
    """A session's usual soft limit of 1024 would cap the agent near 500 clients
    (each takes a client and an upstream descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        message = f"the hard limit on open files is {hard}: nothing to raise the soft one to"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        agent = start_agent(agent_env)  # inherits the soft limit of 1024
        agents.append(agent)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{agent.pid}/limits").read_text()
    [files] = [line.split() for line in limits.splitlines() if line.startswith("Max open files")]
    assert int(files[3]) > 1024
    if hard != resource.RLIM_INFINITY:
        assert files[3:5] == [str(hard), str(hard)]


def refused_start(env: AgentEnv, *args: str) -> str:
    """Run the agent, which must refuse to start: its stderr."""
    proc = subprocess.run(
        [*console_script("mtls-agent", "agent"), *args], env=env.env, cwd=env.root,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert not env.proxy_socket.exists() or not _accepts(env.proxy_socket)
    return proc.stderr


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def test_the_agent_refuses_a_runtime_folder_others_can_write(agent_env: AgentEnv) -> None:
    agent_env.runtime_dir.mkdir(mode=0o700)
    os.chmod(agent_env.runtime_dir, 0o777)
    said = refused_start(agent_env)
    assert str(agent_env.runtime_dir) in said
    assert f"chmod 700 {agent_env.runtime_dir}" in said


def test_an_xdg_runtime_dir_that_is_not_0700_is_still_where_the_sockets_go(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    """Made with a plain mkdir (0755), it is still the user's choice: the
    sockets must not move silently to some other folder. The agent's own
    folder inside is 0700."""
    os.chmod(agent_env.xdg_runtime_dir, 0o755)
    del agent_env.env["MTLS_AGENT_SOCK"]  # found from XDG_RUNTIME_DIR alone
    agents.append(start_agent(agent_env))
    assert stat.S_IMODE(agent_env.runtime_dir.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(agent_env.proxy_socket.stat().st_mode)
    said = agent_env.agentctl("env").stdout
    assert f"MTLS_AGENT_SOCK={agent_env.proxy_socket}" in said
    assert "state:       locked" in agent_env.agentctl("status").stdout


@pytest.mark.parametrize("kind", ["symlink", "file", "relative", "other-user"])
def test_an_xdg_runtime_dir_that_is_not_this_users_folder_is_not_used(
    kind: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """An XDG_RUNTIME_DIR inherited through su, or a link another user could
    redirect, never holds the sockets: platformdirs' own fallback does."""
    root = Path(tempfile.mkdtemp(prefix="mt-xdg-"))
    try:
        mine = root / "mine"
        mine.mkdir(mode=0o700)
        named = {
            "symlink": root / "link",
            "file": root / "file",
            "relative": Path("run"),
            "other-user": root / "theirs",
        }[kind]
        if kind == "symlink":
            named.symlink_to(mine)
        elif kind == "file":
            named.write_text("")
        elif kind == "other-user":
            user: pwd.struct_passwd = request.getfixturevalue("second_user")
            named.mkdir(mode=0o700)
            os.chown(named, user.pw_uid, user.pw_gid)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(named))
        monkeypatch.setenv("TMPDIR", str(mine))  # where the fallback goes, whatever /run holds
        runtime = default_paths().runtime_dir
        assert not str(runtime).startswith(str(named)), runtime
        assert runtime.name == "mtls-agent"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_xdg_runtime_dir_others_can_write_is_refused_not_replaced(
    agent_env: AgentEnv,
) -> None:
    os.chmod(agent_env.xdg_runtime_dir, 0o777)
    said = refused_start(agent_env)
    assert f"{agent_env.xdg_runtime_dir} can be written by other users (mode 777)" in said


def test_the_agent_refuses_a_runtime_folder_of_another_user(
    agent_env: AgentEnv, second_user: pwd.struct_passwd
) -> None:
    agent_env.runtime_dir.mkdir(mode=0o700)
    os.chown(agent_env.runtime_dir, second_user.pw_uid, second_user.pw_gid)
    said = refused_start(agent_env)
    assert f"{agent_env.runtime_dir} belongs to uid {second_user.pw_uid}" in said
    assert "XDG_RUNTIME_DIR" in said


@pytest.mark.parametrize("where", ["vault-folder", "identity-file", "data-folder"])
def test_the_agent_refuses_a_vault_others_can_write(
    agent_env: AgentEnv, vault: Vault, pki: Pki, where: str
) -> None:
    import_identity(agent_env, pki, "work")
    path, mode, fix = {
        "vault-folder": (agent_env.vault_dir, 0o770, "chmod 700"),
        "identity-file": (agent_env.vault_dir / "identities" / "work.json", 0o666, "chmod 600"),
        "data-folder": (agent_env.vault_dir.parent, 0o757, "chmod 700"),
    }[where]
    os.chmod(path, mode)
    said = refused_start(agent_env)
    assert f"{path} can be written by other users (mode {mode:o})" in said
    assert f"{fix} {path}" in said


def test_the_agent_refuses_a_vault_of_another_user(
    agent_env: AgentEnv, vault: Vault, second_user: pwd.struct_passwd
) -> None:
    os.chown(agent_env.vault_dir / "vault.json", second_user.pw_uid, second_user.pw_gid)
    said = refused_start(agent_env)
    assert f"{agent_env.vault_dir / 'vault.json'} belongs to uid {second_user.pw_uid}" in said
    assert f"chown -R {os.getuid()} {agent_env.vault_dir}" in said


def test_the_agent_refuses_a_config_file_others_can_write(agent_env: AgentEnv) -> None:
    config = agent_env.write_config("[proxy]\nallow_uids = []\n")
    os.chmod(config, 0o622)
    said = refused_start(agent_env)
    assert f"{config} can be written by other users" in said
    assert f"chmod 600 {config}" in said


def test_a_config_file_named_on_the_command_line_must_exist(agent_env: AgentEnv) -> None:
    missing = agent_env.root / "confg.toml"  # a typo: the settings would be silently lost
    said = refused_start(agent_env, "--config", str(missing))
    assert f"{missing}: no such file (named with --config)" in said


def test_a_second_agent_refuses_and_the_first_keeps_its_sockets(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    first = start_agent(agent_env)
    agents.append(first)
    inode = agent_env.proxy_socket.stat().st_ino
    said = _second_agent(agent_env)
    assert f"another mtls-agent (pid {first.pid}) already serves" in said
    assert agent_env.proxy_socket.stat().st_ino == inode
    assert ControlClient(agent_env.control_socket).get("/v1/status")["pid"] == first.pid


def _second_agent(env: AgentEnv) -> str:
    proc = subprocess.run(
        console_script("mtls-agent", "agent"), env=env.env, cwd=env.root,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    return proc.stderr


# --- 5. failed unlocks ------------------------------------------------------------------------


def test_the_delay_after_failed_unlocks_doubles_from_a_tenth_of_a_second_to_ten() -> None:
    throttle = UnlockThrottle()
    delays = [throttle.delay(n) for n in range(1, 21)]
    assert delays[:8] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert set(delays[7:]) == {10.0}
    assert throttle.delay(10_000) == 10.0


FAST_DELAYS = '[limits]\nfailed_unlock_delay = "20ms"\nfailed_unlock_delay_max = "80ms"\n'


def _fast_delays() -> list[float]:
    throttle = UnlockThrottle(0.02, 0.08)
    return [throttle.delay(n) for n in range(1, 21)]


def _wrong(control: ControlClient, n: int) -> None:
    with pytest.raises(ControlError) as refused:
        control.post("/v1/unlock", {"passphrase": f"wrong guess {n}"}, timeout=60)
    assert refused.value.code == "bad-passphrase"


def test_twenty_wrong_passphrases_take_at_least_the_summed_delays(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    agent_env.write_config(FAST_DELAYS)
    agents.append(start_agent(agent_env))
    control = ControlClient(agent_env.control_socket)
    start = time.monotonic()
    for n in range(20):
        _wrong(control, n)
    elapsed = time.monotonic() - start
    assert elapsed >= sum(_fast_delays()), (elapsed, sum(_fast_delays()))
    unlock(agent_env)  # the right one still works, at once
    assert control.get("/v1/status")["state"] == "unlocked"


def test_the_default_delays_apply_to_a_real_agent(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    agents.append(start_agent(agent_env))
    control = ControlClient(agent_env.control_socket)
    start = time.monotonic()
    for n in range(3):
        _wrong(control, n)
    assert time.monotonic() - start >= 0.1 + 0.2 + 0.4


def test_wrong_passphrases_sent_at_once_from_many_clients_still_wait_their_turn(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    agent_env.write_config(FAST_DELAYS)
    agents.append(start_agent(agent_env))
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: _wrong(ControlClient(agent_env.control_socket), n), range(8)))
    elapsed = time.monotonic() - start
    assert elapsed >= sum(_fast_delays()[:8]), elapsed
    unlock(agent_env)


def test_the_runtime_and_vault_checks_leave_a_good_setup_alone(
    agent_env: AgentEnv, vault: Vault, agents: list[AgentProcess]
) -> None:
    agent_env.write_config("[proxy]\nallow_uids = []\n")
    agents.append(start_agent(agent_env))
    for path in (agent_env.runtime_dir, agent_env.vault_dir, agent_env.audit_log.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(agent_env.audit_log.stat().st_mode) == 0o600
