"""``agentctl start`` and ``stop``: the agent in the background, the ``ssh-agent`` way.

For where no service manager runs. ``start`` runs ``mtls-agent`` detached
(a session of its own, so a closed terminal or a Ctrl-C leaves it be; its
output appended to ``agent.log`` in the log folder), waits until both
sockets answer, and prints sh lines for ``eval "$(agentctl start)"``.
``stop`` sends SIGTERM and waits until the agent has let go of its lock file
(which it holds until its last moment) and, unless a service manager owns
them, of its sockets.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from agent.errors import AgentError
from agent.paths import SOCK_ENV, Paths, client_sockets, default_paths
from cli.control_client import ControlClient
from cli.service import AGENT_LOG, agent_command, running_agent

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
_POLL = 0.02

#: Variables a service manager set for *its* child: never for an agent we start.
_MANAGER_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


def _say(line: str) -> None:
    print(line, flush=True)


def _note(line: str) -> None:
    print(f"agentctl: {line}", file=sys.stderr, flush=True)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _export_lines(proxy: Path, pid: object) -> str:
    quoted = shlex.quote(str(proxy))
    return f"{SOCK_ENV}={quoted}; export {SOCK_ENV};\necho mtls-agent pid {pid};"


def _open_log(paths: Paths) -> tuple[int, int]:
    """The agent's log file (appended to, 0600) and where this start begins in it."""
    paths.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = paths.log_dir / AGENT_LOG
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return fd, os.fstat(fd).st_size


def _log_tail(paths: Paths, offset: int) -> str:
    try:
        with open(paths.log_dir / AGENT_LOG, "rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _wait(until: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def cmd_start(args: argparse.Namespace) -> int:
    """Start the agent detached; print the sh lines that point clients at it."""
    paths = default_paths()
    running = running_agent(paths.control_socket)
    if running is not None:
        _note(f"an agent is already running (pid {running.get('pid')})")
        _say(_export_lines(paths.proxy_socket, running.get("pid")))
        return 0
    env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
    log_fd, offset = _open_log(paths)
    try:
        proc = subprocess.Popen(
            agent_command(),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=env,
            cwd="/",
            start_new_session=True,  # no terminal: a Ctrl-C or a closed shell leaves it be
        )
    except OSError as exc:
        raise AgentError(f"cannot start the agent: {exc}.") from None
    finally:
        os.close(log_fd)
    control = ControlClient(paths.control_socket)

    def up() -> bool:
        if proc.poll() is not None:
            return True
        if not (_accepts(paths.proxy_socket) and _accepts(paths.control_socket)):
            return False
        try:
            return control.get("/v1/status", timeout=2.0).get("pid") == proc.pid
        except AgentError:
            return False

    if not _wait(up, START_TIMEOUT) or proc.poll() is not None:
        if proc.poll() is None:
            proc.terminate()
        said = _log_tail(paths, offset)
        raise AgentError(
            f"the agent did not start (exit status {proc.poll()})"
            + (f": {said.rstrip('.')}" if said else "")
            + f"; its log is {paths.log_dir / AGENT_LOG}."
        )
    _say(_export_lines(paths.proxy_socket, proc.pid))
    return 0


def _lock_free(lock_file: Path) -> bool:
    """Whether no agent holds the runtime folder's lock (it does until its last moment)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone, or a zombie waiting for a parent that will never reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the agent and wait until it has let go of its sockets and lock."""
    proxy, control_path = client_sockets()
    status = ControlClient(control_path).get("/v1/status")
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        raise AgentError(f"the agent on {control_path} did not say its pid.")
    manager = status.get("service_manager")
    lock_file = control_path.parent / default_paths().lock_file.name
    with suppress(ProcessLookupError):  # it ended between its answer and the signal
        os.kill(pid, signal.SIGTERM)
    gone = [] if manager else [proxy, control_path]

    def stopped() -> bool:
        return _lock_free(lock_file) and _exited(pid) and not any(p.exists() for p in gone)

    if not _wait(stopped, STOP_TIMEOUT):
        raise AgentError(f"the agent (pid {pid}) did not stop within {STOP_TIMEOUT:g} seconds.")
    _say(f"stopped mtls-agent (pid {pid})")
    if manager:
        _note(f"{manager} starts it again when a program connects to {proxy}")
    return 0
