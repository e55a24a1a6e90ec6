"""Drive the real product as a user does: its console scripts, in subprocesses.

``AgentEnv`` is one user's world in a ``mkdtemp`` folder (short paths: a Unix
socket path holds at most 107 bytes): the XDG folders the agent's
platformdirs paths follow, a HOME, and ``MTLS_AGENT_SOCK``. ``agentctl`` runs
the CLI in it; ``start_agent`` runs the daemon in it and returns once both
sockets accept connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

APP = "mtls-agent"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
CLI_TIMEOUT = 60.0

#: Variables removed from the agent's environment: a developer's own agent and
#: session bus must never be touched by a test (a test that wants a Secret
#: Service starts its own dbus and gnome-keyring and sets the address).
_ISOLATED_VARS = ("MTLS_AGENT_SOCK", "DBUS_SESSION_BUS_ADDRESS", "NOTIFY_SOCKET", "LISTEN_FDS",
                  "LISTEN_PID", "LISTEN_FDNAMES")  # fmt: skip


def console_script(name: str, module: str) -> list[str]:
    """The command that runs console script ``name``: next to sys.executable (the venv's
    bin), else on PATH, else ``python -m module``."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-m", module]


def write_secret_file(folder: Path, text: str | bytes, name: str = "passphrase") -> Path:
    """Write ``text`` to a new 0600 file ``folder/name`` (a passphrase file); return its path."""
    path = Path(folder) / name
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


class AgentEnv:
    """A throw-away user environment for the agent and agentctl (see module doc)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mt-"))
        self.home = self.root / "home"
        self.xdg_config_home = self.root / "config"
        self.xdg_data_home = self.root / "data"
        self.xdg_state_home = self.root / "state"
        self.xdg_runtime_dir = self.root / "run"
        for folder in (
            self.home,
            self.xdg_config_home,
            self.xdg_data_home,
            self.xdg_state_home,
            self.xdg_runtime_dir,
        ):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # whatever the umask
        self.env: dict[str, str] = {k: v for k, v in os.environ.items() if k not in _ISOLATED_VARS}
        self.env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.xdg_config_home),
            XDG_DATA_HOME=str(self.xdg_data_home),
            XDG_STATE_HOME=str(self.xdg_state_home),
            XDG_RUNTIME_DIR=str(self.xdg_runtime_dir),
            MTLS_AGENT_SOCK=str(self.proxy_socket),
            PYTHONUNBUFFERED="1",
        )
        if len(os.fsencode(self.control_socket)) > 107:
            raise RuntimeError(f"socket path too long for AF_UNIX: {self.control_socket}")

    # --- where the agent keeps things (DESIGN.md, "Where things live") ----------

    @property
    def runtime_dir(self) -> Path:
        return self.xdg_runtime_dir / APP

    @property
    def proxy_socket(self) -> Path:
        return self.runtime_dir / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def vault_dir(self) -> Path:
        return self.xdg_data_home / APP / "vault"

    @property
    def config_file(self) -> Path:
        return self.xdg_config_home / APP / "config.toml"

    @property
    def audit_log(self) -> Path:
        return self.xdg_state_home / APP / "log" / "audit.jsonl"

    def write_config(self, text: str) -> Path:
        """Write config.toml (folder 0700, file 0600); return its path."""
        self.config_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return write_secret_file(self.config_file.parent, text, self.config_file.name)

    def passphrase_file(self, passphrase: str, name: str = "passphrase") -> Path:
        """A 0600 file holding ``passphrase`` (for ``--passphrase-file``)."""
        return write_secret_file(self.root, passphrase, name)

    def agentctl(
        self,
        *args: str | os.PathLike[str],
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = CLI_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``agentctl ARGS`` in this environment (see module function ``agentctl``)."""
        return agentctl(self, *args, input=input, check=check, timeout=timeout)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def agentctl(
    env: AgentEnv,
    *args: str | os.PathLike[str],
    input: str | bytes | None = None,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run the ``agentctl`` console script with ``env``'s environment; text output captured.

    ``input`` is its standard input (else none: /dev/null, so a prompt cannot hang).
    With ``check`` a non-zero exit fails the test, showing the command's output.
    """
    cmd = [*console_script("agentctl", "cli"), *map(os.fspath, args)]
    data = input.decode() if isinstance(input, bytes) else input
    proc = subprocess.run(
        cmd,
        env=env.env,
        cwd=env.root,
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True


class AgentProcess:
    """A running ``mtls-agent``; ``stop()`` ends it."""

    def __init__(self, env: AgentEnv, proc: subprocess.Popen[bytes], stdout: Path, stderr: Path):
        self.env = env
        self.proc = proc
        self.stdout_path = stdout
        self.stderr_path = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.stdout_path.read_text(errors="replace")
        return ""

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def peak_rss_kib(self) -> int:
        """The agent's peak resident memory so far (VmHWM, KiB); the agent must be running."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc status")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_agent(
    env: AgentEnv,
    *args: str | os.PathLike[str],
    command: list[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> AgentProcess:
    """Run ``mtls-agent ARGS`` in ``env``; return once both of its sockets accept a connection.

    Polls every 20 ms up to ``timeout``; fails the test with the agent's stderr if it
    exits first or never gets there. ``command`` replaces the console script (the
    tests of this helper use a stand-in).
    """
    cmd = [*(command or console_script("mtls-agent", "agent")), *map(os.fspath, args)]
    n = 0
    while (env.root / f"agent-{n}.stderr").exists():
        n += 1
    out_path = env.root / f"agent-{n}.stdout"
    err_path = env.root / f"agent-{n}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, env=env.env, cwd=env.root, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    agent = AgentProcess(env, proc, out_path, err_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"{' '.join(cmd)} exited {proc.returncode} before its sockets were up\n"
                f"--- stderr\n{agent.stderr_text()}",
                pytrace=False,
            )
        if _accepts(env.proxy_socket) and _accepts(env.control_socket):
            return agent
        if time.monotonic() > deadline:
            agent.stop()
            pytest.fail(
                f"{' '.join(cmd)}: sockets not accepting after {timeout}s\n"
                f"--- stderr\n{agent.stderr_text()}",
                pytrace=False,
            )
        time.sleep(POLL_INTERVAL)
