"""The agent as a user service: ``agentctl service install|uninstall|status``.

``agentctl service install`` puts this platform's service files in place
(systemd user units on Linux, a LaunchAgent on macOS) with the absolute path
of *this* installation's ``mtls-agent``, reloads the service manager and
enables socket activation, printing each step; ``uninstall`` undoes it and
``status`` says what is installed and running. The files come from the
``systemd/`` and ``launchd/`` folders of the source tree (or of the
installed distribution's ``share/mtls-agent``), so what is installed is
exactly what the tests verify.

Where no service manager runs (a container, an ssh session without a user
manager) it says so and points at ``agentctl start`` (``cli.background``).
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import platformdirs

from agent.errors import AgentError, AgentNotRunning
from agent.paths import Paths, client_sockets, default_paths
from cli.control_client import ControlClient

SERVICE_UNIT = "mtls-agent.service"
SOCKET_UNIT = "mtls-agent.socket"
LAUNCHD_LABEL = "org.mtls-agent.agent"
AGENT_LOG = "agent.log"

_COMMAND_TIMEOUT = 30.0

_START_HINT = "run the agent without one: eval \"$(agentctl start)\""


def _say(line: str = "") -> None:
    print(line, flush=True)


# --- what to run, and the files that run it -----------------------------------


def agent_command() -> list[str]:
    """The absolute command of this installation's agent.

    The ``mtls-agent`` console script beside this ``agentctl`` (or beside
    the interpreter running it), else this interpreter with ``-m agent``:
    never whichever ``mtls-agent`` comes first on PATH.
    """
    for folder in (Path(os.path.abspath(sys.argv[0])).parent, Path(sys.executable).parent):
        script = folder / "mtls-agent"
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [os.path.abspath(sys.executable), "-m", "agent"]


def _template(folder: str, name: str) -> str:
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "mtls-agent"):
        path = base / folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise AgentError(f"this installation lacks {folder}/{name}; reinstall mtls-agent.")


def _systemd_quote(arg: str) -> str:
    """One ExecStart argument: specifiers (%) and variables ($) escaped, quoted if needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", arg):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def systemd_units(command: list[str]) -> dict[str, str]:
    """The unit files to install, by name: the service's ExecStart is ``command``."""
    service = _template("systemd", SERVICE_UNIT)
    exec_start = "ExecStart=" + " ".join(_systemd_quote(arg) for arg in command)
    service, n = re.subn(r"(?m)^ExecStart=.*$", lambda _: exec_start, service)
    if n != 1:
        raise AgentError(f"systemd/{SERVICE_UNIT} must have exactly one ExecStart= line.")
    return {SERVICE_UNIT: service, SOCKET_UNIT: _template("systemd", SOCKET_UNIT)}


def launchd_plist(command: list[str], paths: Paths) -> dict[str, Any]:
    """The LaunchAgent for ``command``, with this user's absolute paths."""
    plist: dict[str, Any] = plistlib.loads(
        _template("launchd", f"{LAUNCHD_LABEL}.plist").encode("utf-8")
    )
    plist["ProgramArguments"] = list(command)
    plist["StandardOutPath"] = plist["StandardErrorPath"] = str(paths.log_dir / AGENT_LOG)
    plist["Sockets"]["proxy"]["SockPathName"] = str(paths.proxy_socket)
    plist["Sockets"]["control"]["SockPathName"] = str(paths.control_socket)
    return plist


# --- service managers --------------------------------------------------------


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"cannot run '{shlex.join(cmd)}': {exc}.") from None


def _checked(cmd: list[str]) -> None:
    proc = _run(cmd)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise AgentError(
            f"'{shlex.join(cmd)}' failed (exit {proc.returncode})"
            + (f": {said[-1]}" if said else "")
        )


class Manager(ABC):
    """One platform's service manager, as ``agentctl service`` drives it."""

    name = ""

    @abstractmethod
    def unavailable(self) -> str | None:
        """Why the service manager cannot be used here, or None when it can."""

    @abstractmethod
    def files(self) -> dict[Path, str]:
        """The files ``install`` writes, with their text."""

    @abstractmethod
    def install_commands(self) -> list[list[str]]:
        """What ``install`` runs once the files are written."""

    @abstractmethod
    def uninstall_commands(self, available: bool) -> tuple[list[list[str]], list[list[str]]]:
        """What ``uninstall`` runs before removing the files, and after."""

    @abstractmethod
    def state_lines(self, available: bool) -> list[str]:
        """``service status``: what the manager says about the installed files."""

    @abstractmethod
    def ready_line(self, paths: Paths) -> str:
        """The last line of a successful install."""


class Systemd(Manager):
    name = "systemd"

    def __init__(self) -> None:
        self.systemctl = shutil.which("systemctl")
        self.unit_dir = Path(platformdirs.user_config_dir()) / "systemd" / "user"

    def unavailable(self) -> str | None:
        if self.systemctl is None:
            return "systemd is not installed here"
        state = _run([self.systemctl, "--user", "is-system-running"]).stdout.strip()
        if state in ("", "offline", "unknown"):
            return "no systemd user manager runs for you here"
        return None

    def files(self) -> dict[Path, str]:
        return {self.unit_dir / n: text for n, text in systemd_units(agent_command()).items()}

    def _systemctl(self, *args: str) -> list[str]:
        return [self.systemctl or "systemctl", "--user", *args]

    def install_commands(self) -> list[list[str]]:
        return [self._systemctl("daemon-reload"), self._systemctl("enable", "--now", SOCKET_UNIT)]

    def uninstall_commands(self, available: bool) -> tuple[list[list[str]], list[list[str]]]:
        if not available:  # offline, systemctl still removes the enablement links
            return [self._systemctl("disable", SOCKET_UNIT)], []
        return (
            [self._systemctl("disable", "--now", SOCKET_UNIT, SERVICE_UNIT)],
            [self._systemctl("daemon-reload")],
        )

    def state_lines(self, available: bool) -> list[str]:
        if self.systemctl is None:
            return []
        enabled = _run(self._systemctl("is-enabled", SOCKET_UNIT)).stdout.strip() or "unknown"
        line = f"socket unit: {enabled}"
        if available:
            active = _run(self._systemctl("is-active", SOCKET_UNIT)).stdout.strip()
            line += f", {active or 'unknown'}"
        return [line]

    def ready_line(self, paths: Paths) -> str:
        return (
            f"done: systemd listens on {paths.proxy_socket} and starts the agent when a "
            "program first connects"
        )


class Launchd(Manager):
    name = "launchd"

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.domain = f"gui/{os.getuid()}"
        self.plist = Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"

    def unavailable(self) -> str | None:
        if shutil.which("launchctl") is None:
            return "launchctl is not installed here"
        if _run(["launchctl", "print", self.domain]).returncode != 0:
            return "no launchd session of yours runs here (logged in over ssh?)"
        return None

    def files(self) -> dict[Path, str]:
        plist = launchd_plist(agent_command(), self.paths)
        return {self.plist: plistlib.dumps(plist).decode("utf-8")}

    def _loaded(self) -> bool:
        return _run(["launchctl", "print", f"{self.domain}/{LAUNCHD_LABEL}"]).returncode == 0

    def install_commands(self) -> list[list[str]]:
        bootout = [["launchctl", "bootout", f"{self.domain}/{LAUNCHD_LABEL}"]]
        bootstrap = [["launchctl", "bootstrap", self.domain, str(self.plist)]]
        return (bootout if self._loaded() else []) + bootstrap

    def uninstall_commands(self, available: bool) -> tuple[list[list[str]], list[list[str]]]:
        if not (available and self._loaded()):
            return [], []
        return [["launchctl", "bootout", f"{self.domain}/{LAUNCHD_LABEL}"]], []

    def state_lines(self, available: bool) -> list[str]:
        if not available:
            return []
        return [f"launch agent: {'loaded' if self._loaded() else 'not loaded'}"]

    def ready_line(self, paths: Paths) -> str:
        return f"done: launchd listens on {paths.proxy_socket} and has started the agent"


def platform_manager(paths: Paths) -> Manager | None:
    if sys.platform.startswith("linux"):
        return Systemd()
    if sys.platform == "darwin":
        return Launchd(paths)
    return None


# --- agentctl service ---------------------------------------------------------


def running_agent(control: Path) -> dict[str, Any] | None:
    try:
        return ControlClient(control).get("/v1/status")
    except AgentNotRunning:
        return None


def _write(path: Path, text: str) -> None:
    """Write a service file atomically (0644: the service manager reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # whatever the umask
    os.replace(tmp, path)


def _no_manager(reason: str) -> AgentError:
    return AgentError(f"{reason}, so there is no service to install; {_START_HINT}.")


def service_install(manager: Manager, paths: Paths, dry_run: bool) -> int:
    reason = manager.unavailable()
    if reason is not None and not dry_run:
        raise _no_manager(reason)
    running = None if dry_run else running_agent(paths.control_socket)
    if running is not None and running.get("service_manager") is None:
        raise AgentError(
            f"an agent started without {manager.name} is running (pid {running.get('pid')}); "
            "stop it first with 'agentctl stop'."
        )
    for folder in (paths.runtime_dir, paths.log_dir):  # where the manager puts sockets and logs
        if not dry_run:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, text in manager.files().items():
        if dry_run:
            _say(f"would write {path}:")
            _say("\n".join(f"    {line}" if line else "" for line in text.splitlines()))
        else:
            _write(path, text)
            _say(f"wrote {path}")
    for cmd in manager.install_commands():
        if dry_run:
            _say(f"would run: {shlex.join(cmd)}")
        else:
            _checked(cmd)
            _say(f"ran: {shlex.join(cmd)}")
    if reason is not None:
        raise AgentError(f"{reason}, so install would refuse; {_START_HINT}.")
    if not dry_run:
        _say(manager.ready_line(paths))
    return 0


def service_uninstall(manager: Manager, paths: Paths) -> int:
    present = [path for path in manager.files() if path.exists()]
    if not present:
        _say(f"nothing to remove: no {manager.name} files of mtls-agent are installed")
        return 0
    before, after = manager.uninstall_commands(manager.unavailable() is None)
    for cmd in before:
        _checked(cmd)
        _say(f"ran: {shlex.join(cmd)}")
    for path in present:
        path.unlink(missing_ok=True)
        _say(f"removed {path}")
    for cmd in after:
        _checked(cmd)
        _say(f"ran: {shlex.join(cmd)}")
    return 0


def service_status(manager: Manager | None, paths: Paths) -> int:
    reason = "this platform has none that agentctl knows" if manager is None else (
        manager.unavailable()
    )
    if manager is None or reason is not None:
        _say(f"service manager: none ({reason})")
    else:
        _say(f"service manager: {manager.name}")
    if manager is not None:
        files = manager.files()
        installed = [path for path in files if path.exists()]
        for path in installed:
            current = path.read_text(encoding="utf-8") == files[path]
            _say(f"installed:   {path}" + ("" if current else " (differs from this version)"))
        if installed:
            for line in manager.state_lines(reason is None):
                _say(line)
        else:
            _say(f"installed:   no ({' '.join(str(p) for p in files)} absent)")
    running = running_agent(client_sockets()[1])
    if running is None:
        _say("agent:       not running")
        if manager is None or reason is not None:
            _say(f"hint:        {_START_HINT}")
    else:
        started_by = running.get("service_manager") or "agentctl start or by hand"
        _say(
            f"agent:       running, pid {running.get('pid')}, {running.get('state')}, "
            f"started by {started_by}"
        )
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    paths = default_paths()
    manager = platform_manager(paths)
    if args.action == "status":
        return service_status(manager, paths)
    if manager is None:
        raise _no_manager(f"agentctl knows no service manager on {sys.platform}")
    if args.action == "install":
        return service_install(manager, paths, args.dry_run)
    return service_uninstall(manager, paths)


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser(
        "install",
        help="install and enable the user service",
        description="Write the service files for this platform (systemd user units, or a "
        "LaunchAgent) with the absolute path of this installation's mtls-agent, reload the "
        "service manager and enable socket activation, printing each step.",
        allow_abbrev=False,
    )
    install.add_argument(
        "--dry-run",
        action="store_true",
        help="print the files and commands without writing or running anything",
    )
    actions.add_parser(
        "uninstall",
        help="disable and remove the user service",
        description="Stop and disable the user service and remove its files.",
        allow_abbrev=False,
    )
    actions.add_parser(
        "status",
        help="what is installed and running",
        description="Say which service manager runs here, whether the service files are "
        "installed (and current), and whether an agent is running.",
        allow_abbrev=False,
    )
