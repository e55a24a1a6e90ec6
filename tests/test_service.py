"""The agent as a real user service: unit files, socket activation, launchd, start and stop.

Socket activation is driven by systemd's own ``systemd-socket-activate``
(which binds the sockets, waits for the first connection and then execs the
agent with ``LISTEN_FDS``), and readiness is read from a ``NOTIFY_SOCKET``
this test listens on; the unit files are checked by ``systemd-analyze
verify`` as ``agentctl service install --dry-run`` prints them. No systemd
user manager runs on CI, so ``service install`` itself can only be seen
refusing there; ``uninstall`` runs for real against units enabled offline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import plistlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.agent import AgentEnv, agentctl, console_script, write_secret_file
from support.clients import curl
from support.nginx import Nginx
from support.pki import P12_PASSWORD, Pki
from support.tools import require_tool

from agent.activation import (
    CONTROL,
    PROXY,
    LaunchActivateSocket,
    launchd_sockets,
    systemd_sockets,
)
from agent.errors import AgentError
from agent.paths import Paths
from agent.vault import Vault
from cli.service import agent_command, launchd_plist

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE = "correct horse battery staple"
CHEAP_KDF_N = 2**12
WAIT = 15.0

#: What the agent started by systemd-socket-activate needs of its environment
#: (the tool passes only the variables named with -E).
AGENT_VARS = ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
              "PYTHONUNBUFFERED", "PATH")  # fmt: skip


def make_vault(env: AgentEnv) -> None:
    Vault(env.vault_dir).create(PASSPHRASE, kdf_n=CHEAP_KDF_N)


def import_identity(env: AgentEnv, pki: Pki, host: str = "localhost") -> None:
    secret = write_secret_file(env.root, P12_PASSWORD, "p12-password")
    env.agentctl(
        "import", "work", pki.client_p12("modern"), f"--host={host}", "--ca", pki.root_pem,
        "--p12-password-file", secret,
    )  # fmt: skip


def unlock(env: AgentEnv) -> None:
    env.agentctl("unlock", "--passphrase-file", env.passphrase_file(PASSPHRASE))


def status(env: AgentEnv) -> dict:
    return json.loads(env.agentctl("status", "--json").stdout)


def process_running(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie has exited: on a machine whose init
    does not reap orphans, a detached agent that ended stays one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def unit_keys(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → every value it is given (systemd allows repeats)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def dry_run_files(env: AgentEnv) -> dict[Path, str]:
    """The files ``agentctl service install --dry-run`` says it would write, with their text."""
    r = env.agentctl("service", "install", "--dry-run", check=False)
    files: dict[Path, list[str]] = {}
    current: list[str] | None = None
    for line in r.stdout.splitlines():
        header = re.fullmatch(r"would write (.+):", line)
        if header:
            current = files.setdefault(Path(header.group(1)), [])
        elif current is not None and (line.startswith("    ") or not line):
            current.append(line[4:])
        else:
            current = None
    assert files, r.stdout + r.stderr
    return {path: "\n".join(lines).strip("\n") + "\n" for path, lines in files.items()}


def verify_units(env: AgentEnv, folder: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("systemd-analyze")
    return subprocess.run(
        [exe, "--user", "verify", str(folder / "mtls-agent.service"),
         str(folder / "mtls-agent.socket")],
        env={**env.env, "SYSTEMD_LOG_COLOR": "0"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- the unit files ----------------------------------------------------------


def test_installed_units_pass_systemd_analyze_verify_without_a_warning(
    agent_env: AgentEnv,
) -> None:
    require_tool("systemctl")
    files = dry_run_files(agent_env)
    folder = agent_env.root / "units"
    folder.mkdir()
    for path, text in files.items():
        (folder / path.name).write_text(text)
    assert sorted(p.name for p in files) == ["mtls-agent.service", "mtls-agent.socket"]
    service = unit_keys((folder / "mtls-agent.service").read_text())
    assert service["Service.ExecStart"] == [agent_command()[0]]
    assert os.access(agent_command()[0], os.X_OK)

    r = verify_units(agent_env, folder)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")

    # The check has teeth: the template's own ExecStart (%h/.local/bin) names
    # nothing in this test's HOME, and verify says so.
    (folder / "mtls-agent.service").write_text((REPO / "systemd/mtls-agent.service").read_text())
    r = verify_units(agent_env, folder)
    assert r.returncode != 0 and "is not executable" in r.stderr, r.stderr


def test_units_hold_the_activation_and_hardening_settings() -> None:
    service = unit_keys((REPO / "systemd/mtls-agent.service").read_text())
    sock = unit_keys((REPO / "systemd/mtls-agent.socket").read_text())
    expected_service = {
        "Service.Type": ["notify"],
        "Service.Restart": ["on-failure"],
        "Service.NoNewPrivileges": ["yes"],
        "Service.LockPersonality": ["yes"],
        "Service.RestrictRealtime": ["yes"],
        "Service.RestrictSUIDSGID": ["yes"],
        "Service.SystemCallArchitectures": ["native"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "Service.UMask": ["0077"],
        "Service.LimitCORE": ["0"],
        "Unit.Requires": ["mtls-agent.socket"],
    }
    assert {k: service.get(k) for k in expected_service} == expected_service
    assert sock["Socket.ListenStream"] == [
        "%t/mtls-agent/agent.sock",
        "%t/mtls-agent/control.sock",
    ]
    assert sock["Socket.SocketMode"] == ["0600"]
    assert sock["Socket.DirectoryMode"] == ["0700"]
    assert len(sock["Socket.FileDescriptorName"]) == 1
    assert "Socket.Accept" not in sock  # the agent accepts on the listening sockets itself


# --- socket activation, for real -----------------------------------------------


class NotifyListener:
    """A NOTIFY_SOCKET of the test's own: each datagram as a dict of its KEY=VALUE lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)
        return True

    def next(self, timeout: float = WAIT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until(self, key: str) -> list[dict[str, str]]:
        """Every message up to and including the first that sets ``key``."""
        seen = [self.next()]
        while key not in seen[-1]:
            seen.append(self.next())
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(agent_env: AgentEnv) -> Iterator[NotifyListener]:
    listener = NotifyListener(agent_env.root / "notify")
    yield listener
    listener.close()


def socket_activate(
    env: AgentEnv, notify: NotifyListener, listen: list[Path], fdnames: str, *options: str
) -> subprocess.Popen[bytes]:
    """``systemd-socket-activate`` holding ``listen``, to exec the agent on the first connection."""
    exe = require_tool("systemd-socket-activate")
    env.runtime_dir.mkdir(mode=0o700, exist_ok=True)
    setenv = [f"--setenv={name}" for name in AGENT_VARS if name in env.env]
    cmd = [
        exe, *options, *(f"--listen={path}" for path in listen), f"--fdname={fdnames}", *setenv,
        f"--setenv=NOTIFY_SOCKET={notify.path}", *console_script("mtls-agent", "agent"),
    ]  # fmt: skip
    out = open(env.root / "activate.stderr", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, env=env.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    out.close()
    deadline = time.monotonic() + WAIT
    while not all(p.exists() for p in listen):  # the tool has bound them: clients may connect
        assert proc.poll() is None, (env.root / "activate.stderr").read_text()
        assert time.monotonic() < deadline, "systemd-socket-activate never listened"
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize(
    "fdnames",
    [
        pytest.param("proxy:control", id="named-sockets"),
        pytest.param("mtls-agent:mtls-agent", id="one-name-per-unit-as-systemd-gives"),
    ],
)
def test_socket_activation_starts_the_agent_on_the_first_connection_and_forwards(
    agent_env: AgentEnv, pki: Pki, nginx: Nginx, notify: NotifyListener, fdnames: str
) -> None:
    make_vault(agent_env)
    import_identity(agent_env, pki)
    proc = socket_activate(
        agent_env, notify, [agent_env.proxy_socket, agent_env.control_socket], fdnames
    )
    try:
        assert not notify.pending()  # nothing runs before a client comes
        unlock(agent_env)  # the first connection: the agent starts and answers it
        ready = notify.until("READY")
        assert ready[0] == {"READY": "1", "STATUS": "locked (1 identity)"}
        assert notify.next() == {"STATUS": "unlocked (1 identity)"}

        result = curl(agent_env.proxy_socket, f"http://{nginx.host_header}/echo/activated")
        assert result.status == 200, result
        assert result.header("X-Client-Verify") == "SUCCESS"
        info = status(agent_env)
        assert info["pid"] == proc.pid  # the tool exec'd the agent in its place
        assert info["service_manager"] == "systemd"
        assert info["requests_served"] == 1

        agent_env.agentctl("lock")
        assert notify.next() == {"STATUS": "locked (1 identity)"}
        assert stop(proc) == 0
        assert notify.until("STOPPING")[-1] == {"STOPPING": "1", "STATUS": "stopping"}
        # The manager's socket files stay: they are what starts the agent next time.
        assert agent_env.proxy_socket.exists() and agent_env.control_socket.exists()
    finally:
        stop(proc)


def test_a_passed_socket_the_agent_cannot_place_is_refused(
    agent_env: AgentEnv, notify: NotifyListener
) -> None:
    stray = agent_env.root / "stray.sock"
    proc = socket_activate(agent_env, notify, [agent_env.proxy_socket, stray], "proxy:stray")
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(agent_env.proxy_socket))
        assert proc.wait(WAIT) == 2
        said = (agent_env.root / "activate.stderr").read_text()
        assert f"named 'stray' bound to '{stray}'" in said, said
        assert not notify.pending()  # never ready
    finally:
        stop(proc)


def test_connected_sockets_as_accept_yes_passes_them_are_refused(
    agent_env: AgentEnv, notify: NotifyListener
) -> None:
    proc = socket_activate(agent_env, notify, [agent_env.proxy_socket], "proxy", "--accept")
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(WAIT)
            client.connect(str(agent_env.proxy_socket))
            assert client.recv(1) == b""  # the agent spawned for it refused and exited
        said = (agent_env.root / "activate.stderr").read_text()
        assert "is not listening (a socket unit with Accept=yes?)" in said, said
    finally:
        stop(proc)


def test_listen_variables_meant_for_another_process_are_ignored_and_cleared() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd_sockets({}, environ) is None
    assert environ == {}  # nothing the agent starts may take them for its own


# --- launchd ---------------------------------------------------------------------


def test_the_launch_agent_plist_parses_and_install_fills_in_existing_paths(
    agent_env: AgentEnv,
) -> None:
    with open(REPO / "launchd/org.mtls-agent.agent.plist", "rb") as f:
        template = plistlib.load(f)
    assert template["Label"] == "org.mtls-agent.agent"
    assert template["RunAtLoad"] is True
    assert template["KeepAlive"] == {"SuccessfulExit": False}
    assert set(template["Sockets"]) == {PROXY, CONTROL}
    for entry in template["Sockets"].values():
        assert entry["SockPathMode"] == 0o600
        assert Path(entry["SockPathName"]).is_absolute()

    paths = Paths(
        config_file=agent_env.config_file,
        vault_dir=agent_env.vault_dir,
        runtime_dir=agent_env.runtime_dir,
        log_dir=agent_env.xdg_state_home / "mtls-agent" / "log",
    )
    plist = plistlib.loads(plistlib.dumps(launchd_plist(agent_command(), paths)))
    program = Path(plist["ProgramArguments"][0])
    assert program.is_absolute() and program.is_file() and os.access(program, os.X_OK)
    assert plist["Sockets"][PROXY]["SockPathName"] == str(agent_env.proxy_socket)
    assert plist["Sockets"][CONTROL]["SockPathName"] == str(agent_env.control_socket)
    assert Path(plist["StandardOutPath"]).parent == paths.log_dir
    assert plist["StandardErrorPath"] == plist["StandardOutPath"]
    assert {k: plist[k] for k in ("Label", "RunAtLoad", "KeepAlive")} == {
        k: template[k] for k in ("Label", "RunAtLoad", "KeepAlive")
    }


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def fake_launch_activate_socket(answers: dict[str, list[int] | int]) -> Callable[..., int]:
    """A C-callable stand-in for launch_activate_socket(3): for each name, the
    descriptors (in an array from malloc, as launchd gives them) or an errno."""

    def activate(name: bytes, fds_out, count_out) -> int:  # type: ignore[no-untyped-def]
        answer = answers.get(name.decode(), errno.ENOENT)
        if isinstance(answer, int):
            return answer
        array = ctypes.cast(
            _libc.malloc(ctypes.sizeof(ctypes.c_int) * len(answer)), ctypes.POINTER(ctypes.c_int)
        )
        for i, fd in enumerate(answer):
            array[i] = fd
        fds_out[0] = array
        count_out[0] = len(answer)
        return 0

    return LaunchActivateSocket(activate)


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_launchd_sockets_are_taken_by_name_through_launch_activate_socket(
    tmp_path: Path,
) -> None:
    expected = {PROXY: tmp_path / "agent.sock", CONTROL: tmp_path / "control.sock"}
    originals = {name: listening(path) for name, path in expected.items()}
    try:
        answers: dict[str, list[int] | int] = {
            name: [os.dup(sock.fileno())] for name, sock in originals.items()
        }
        taken = launchd_sockets(expected, fake_launch_activate_socket(answers))
        assert taken is not None and set(taken) == {PROXY, CONTROL}
        for name, sock in taken.items():
            assert sock.getsockname() == str(expected[name])
            assert not sock.get_inheritable() and not sock.getblocking()
            sock.close()

        # Not started by launchd (ESRCH), or no such socket in the plist (ENOENT):
        # the agent binds its sockets itself.
        assert launchd_sockets(expected, fake_launch_activate_socket({})) is None
        not_managed = dict.fromkeys(expected, errno.ESRCH)
        assert launchd_sockets(expected, fake_launch_activate_socket(not_managed)) is None

        with pytest.raises(AgentError, match="did not hand over the proxy socket"):
            launchd_sockets(expected, fake_launch_activate_socket({PROXY: errno.EPERM}))
        two = [os.dup(originals[PROXY].fileno()), os.dup(originals[PROXY].fileno())]
        with pytest.raises(AgentError, match="2 sockets for 'proxy'"):
            launchd_sockets(expected, fake_launch_activate_socket({PROXY: two}))
    finally:
        for sock in originals.values():
            sock.close()


# --- agentctl service -------------------------------------------------------------


def test_service_install_without_a_service_manager_says_so_and_suggests_start(
    agent_env: AgentEnv,
) -> None:
    require_tool("systemctl")
    r = agent_env.agentctl("service", "install", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no systemd user manager runs for you here" in r.stderr
    assert 'eval "$(agentctl start)"' in r.stderr
    assert not (agent_env.xdg_config_home / "systemd").exists()

    shown = agent_env.agentctl("service", "status").stdout
    assert "service manager: none (no systemd user manager runs for you here)" in shown
    assert "installed:   no" in shown
    assert "agent:       not running" in shown
    assert 'eval "$(agentctl start)"' in shown


def test_service_install_dry_run_prints_each_step_and_writes_nothing(
    agent_env: AgentEnv,
) -> None:
    require_tool("systemctl")
    r = agent_env.agentctl("service", "install", "--dry-run", check=False)
    unit_dir = agent_env.xdg_config_home / "systemd" / "user"
    steps = [line for line in r.stdout.splitlines() if line.startswith("would ")]
    assert steps == [
        f"would write {unit_dir / 'mtls-agent.service'}:",
        f"would write {unit_dir / 'mtls-agent.socket'}:",
        f"would run: {require_tool('systemctl')} --user daemon-reload",
        f"would run: {require_tool('systemctl')} --user enable --now mtls-agent.socket",
    ]
    assert f"    ExecStart={agent_command()[0]}" in r.stdout.splitlines()
    assert not unit_dir.exists()


def test_service_uninstall_disables_and_removes_the_units(agent_env: AgentEnv) -> None:
    systemctl = require_tool("systemctl")
    unit_dir = agent_env.xdg_config_home / "systemd" / "user"
    unit_dir.mkdir(parents=True)
    for path, text in dry_run_files(agent_env).items():
        path.write_text(text)
    subprocess.run(
        [systemctl, "--user", "enable", "mtls-agent.socket"],
        env=agent_env.env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    wanted = unit_dir / "sockets.target.wants" / "mtls-agent.socket"
    assert wanted.is_symlink()
    shown = agent_env.agentctl("service", "status").stdout
    assert f"installed:   {unit_dir / 'mtls-agent.service'}\n" in shown
    assert "socket unit: enabled" in shown

    r = agent_env.agentctl("service", "uninstall")
    assert f"ran: {systemctl} --user disable mtls-agent.socket" in r.stdout
    assert f"removed {unit_dir / 'mtls-agent.service'}" in r.stdout
    assert not wanted.exists() and not wanted.is_symlink()
    assert not (unit_dir / "mtls-agent.service").exists()
    assert not (unit_dir / "mtls-agent.socket").exists()
    again = agent_env.agentctl("service", "uninstall")
    assert "nothing to remove" in again.stdout


# --- agentctl start / stop -----------------------------------------------------------


def test_start_prints_sh_lines_for_eval_and_stop_leaves_no_process_or_socket(
    agent_env: AgentEnv,
) -> None:
    make_vault(agent_env)
    started = agent_env.agentctl("start")
    try:
        # eval "$(agentctl start)" in a real sh, with no MTLS_AGENT_SOCK of its own
        env = {k: v for k, v in agent_env.env.items() if k != "MTLS_AGENT_SOCK"}
        shell = subprocess.run(
            ["sh", "-c", 'eval "$1"; printf "%s" "$MTLS_AGENT_SOCK"', "sh", started.stdout],
            env=env, capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert shell.stdout.endswith(str(agent_env.proxy_socket))
        pid = status(agent_env)["pid"]
        assert f"mtls-agent pid {pid}" in shell.stdout
        assert process_running(pid)
        assert os.getsid(pid) == pid  # its own session: no terminal to lose

        again = agent_env.agentctl("start")
        assert f"an agent is already running (pid {pid})" in again.stderr
        assert again.stdout == started.stdout

        stopped = agent_env.agentctl("stop")
        assert stopped.stdout == f"stopped mtls-agent (pid {pid})\n"
        assert not process_running(pid)
        assert not agent_env.proxy_socket.exists()
        assert not agent_env.control_socket.exists()
        log = (agent_env.xdg_state_home / "mtls-agent" / "log" / "agent.log").read_text()
        assert "stopping" in log
    finally:
        agentctl(agent_env, "stop", check=False)


def test_start_of_a_misconfigured_agent_names_the_key_and_line_and_leaves_nothing(
    agent_env: AgentEnv,
) -> None:
    agent_env.write_config('max_unlocked = "8h"\nlock_after_idle = "soon"\n')
    r = agent_env.agentctl("start", check=False)
    assert r.returncode == 1
    assert r.stdout == ""  # nothing for eval to pick up
    assert "line 2" in r.stderr and "'lock_after_idle'" in r.stderr, r.stderr
    assert "exit status 2" in r.stderr
    assert not agent_env.proxy_socket.exists()
    assert not agent_env.control_socket.exists()


def test_stop_without_an_agent_says_none_is_running(agent_env: AgentEnv) -> None:
    r = agent_env.agentctl("stop", check=False)
    assert r.returncode == 1
    assert "no agent is running" in r.stderr
