"""Where the agent keeps things: platformdirs' folders for the app name.

Everything moves with the XDG variables on Linux, which is what lets tests
and several users run agents side by side. The proxy socket may also be named
by ``MTLS_AGENT_SOCK`` (like ``SSH_AUTH_SOCK``); a client then finds the
control socket beside it.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from agent import APP_NAME
from agent.errors import AgentError

SOCK_ENV = "MTLS_AGENT_SOCK"
PROXY_SOCKET_NAME = "agent.sock"
CONTROL_SOCKET_NAME = "control.sock"


@dataclass(frozen=True)
class Paths:
    """The agent's files and folders for one user."""

    config_file: Path
    vault_dir: Path
    runtime_dir: Path
    log_dir: Path

    @property
    def proxy_socket(self) -> Path:
        return self.runtime_dir / PROXY_SOCKET_NAME

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / CONTROL_SOCKET_NAME

    @property
    def lock_file(self) -> Path:
        """Held by the running agent so that a second one refuses to start."""
        return self.runtime_dir / "agent.lock"

    @property
    def audit_log(self) -> Path:
        return self.log_dir / "audit.jsonl"


def make_private_dirs(folder: Path) -> None:
    """mkdir -p, with 0700 on each folder made (as XDG asks), whatever the umask."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=0o700, exist_ok=True)
        os.chmod(made, 0o700)


def _runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/mtls-agent`` whenever the variable names a folder of this user.

    Recent platformdirs also requires that folder to be 0700 and quietly
    moves elsewhere when it is not, so the agent would listen where its user
    never looks. The agent's own folder inside is made 0700 and checked at
    start (``server.prepare_runtime_dir``, which also refuses a parent others
    can write), which is what keeps the sockets private. A variable that is
    unset, relative (XDG says to ignore it), or names something that is not
    this user's own folder (inherited through ``su``, or a symlink) is left
    to platformdirs' fallback: ``/run/user/$UID`` when it is the user's own
    and private, else ``runtime-$UID`` in the temporary folder.
    """
    named = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(named) and _own_folder(named):
        return Path(named) / APP_NAME
    with warnings.catch_warnings():  # platformdirs warns about its fallback
        warnings.simplefilter("ignore")
        try:
            return Path(platformdirs.user_runtime_dir(APP_NAME))
        except OSError as exc:  # its fallback in the temporary folder belongs to another user
            raise AgentError(
                f"no private runtime folder ({exc}); set XDG_RUNTIME_DIR to a folder of your own."
            ) from None


def _own_folder(path: str) -> bool:
    """A real folder (not a link to one) that belongs to this user."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def default_paths() -> Paths:
    """The platformdirs folders for the current environment."""
    return Paths(
        config_file=Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml",
        vault_dir=Path(platformdirs.user_data_dir(APP_NAME)) / "vault",
        runtime_dir=_runtime_dir(),
        log_dir=Path(platformdirs.user_log_dir(APP_NAME)),
    )


def client_sockets() -> tuple[Path, Path]:
    """The proxy and control sockets a client should use.

    ``MTLS_AGENT_SOCK`` wins when set, so that ``eval "$(agentctl start)"``
    and systemd's ``%t`` paths work without any other setting.
    """
    named = os.environ.get(SOCK_ENV)
    if named:
        proxy = Path(named)
        return proxy, proxy.with_name(CONTROL_SOCKET_NAME)
    paths = default_paths()
    return paths.proxy_socket, paths.control_socket
