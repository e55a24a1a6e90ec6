"""Where the agent keeps things: platformdirs' folders for the app name.

Everything moves with the XDG variables on Linux, which is what lets tests
and several users run agents side by side. The proxy socket may also be named
by ``MTLS_AGENT_SOCK`` (like ``SSH_AUTH_SOCK``); a client then finds the
control socket beside it.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from agent import APP_NAME

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
    """``$XDG_RUNTIME_DIR/mtls-agent`` whenever the variable names a folder.

    Recent platformdirs quietly moves elsewhere when that folder is not
    0700, so the agent would listen somewhere its user never looks. The
    agent's own folder inside is made 0700 and checked at start
    (``server.prepare_runtime_dir``), which is what keeps the sockets private.
    Only when the variable is unset (or not an absolute path, which XDG says
    to ignore) is platformdirs' fallback used: ``/run/user/$UID`` when it is
    the user's own and private, else a folder in the temporary directory.
    """
    named = os.environ.get("XDG_RUNTIME_DIR", "")
    if sys.platform != "darwin" and os.path.isabs(named):
        return Path(named) / APP_NAME
    with warnings.catch_warnings():  # platformdirs warns about its fallback
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP_NAME))


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
