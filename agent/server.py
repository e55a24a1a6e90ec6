"""Start-up and the sockets: the ``mtls-agent`` command.

Hardening comes first, before any secret can exist in this process: no core
dumps, no ptrace by the same uid, a private umask (as ``ssh-agent`` does).
Then the runtime folder is checked, a lock file keeps a second agent from
stealing the sockets, and both sockets are served until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import fcntl
import gc
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from contextlib import suppress
from pathlib import Path

from aiohttp import web

from agent import __version__
from agent.config import Config, load_config
from agent.control import ControlState, make_app
from agent.errors import AgentError
from agent.forward import ProxyServer
from agent.keychain import Keychain
from agent.paths import SOCK_ENV, Paths, default_paths
from agent.vault import Vault

log = logging.getLogger("mtls-agent")

_PR_SET_DUMPABLE = 4
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class StartupError(AgentError):
    """The agent cannot start safely; the message says what to do."""


def harden() -> None:
    """Make this process hard to read from outside, before any secret exists."""
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise StartupError("cannot make the agent non-dumpable (prctl failed).")


def tune_process() -> None:
    """Capacity and allocator settings for thousands of clients and big bodies."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:  # glibc: stop mmap/munmap churn for relay buffers
            mallopt(_M_MMAP_THRESHOLD, 4 << 20)
            mallopt(_M_TRIM_THRESHOLD, 16 << 20)


def prepare_runtime_dir(path: Path) -> None:
    """Create the runtime folder 0700, and refuse one that others control."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{path} is not a folder; remove it and start again.")
    if info.st_uid != os.getuid():
        raise StartupError(
            f"{path} belongs to uid {info.st_uid}, not to you; remove it, or set "
            "XDG_RUNTIME_DIR to a folder of your own."
        )
    if info.st_mode & 0o022:
        raise StartupError(
            f"{path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run 'chmod 700 {path}' and start again."
        )


def take_instance_lock(paths: Paths) -> int:
    """Hold the runtime folder's lock file, or refuse: one agent per folder."""
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"another mtls-agent (pid {holder}) already serves {paths.runtime_dir}; "
            "stop it first ('agentctl stop', or kill that pid)."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def bind_unix(path: Path, backlog: int) -> socket.socket:
    """A listening Unix socket at ``path``, 0600 (a stale one is replaced)."""
    with suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Agent:
    """The running agent: keychain, proxy server and control server."""

    def __init__(self, paths: Paths, config: Config) -> None:
        self.paths = paths
        self.config = config
        self.keychain = Keychain(Vault(paths.vault_dir), paths.runtime_dir)
        allowed = frozenset({os.getuid(), *config.proxy_allow_uids})
        self.proxy = ProxyServer(self.keychain, config.limits, allowed)
        self._stopping = asyncio.Event()

    async def run(self, proxy_sock: socket.socket, control_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        await self.keychain.reload()
        proxy = await loop.create_unix_server(self.proxy, sock=proxy_sock)
        state = ControlState(self.keychain, self.proxy, self.paths, time.monotonic())
        app = make_app(state, self.config.limits.control_body_bytes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, control_sock).start()
        count = len(self.keychain.identities)
        log.info(
            "mtls-agent %s ready (locked; %d identities): proxy %s, control %s",
            __version__, count, self.paths.proxy_socket, self.paths.control_socket,
        )
        gc.freeze()  # start-up objects never die: keep them out of every collection
        try:
            await self._stopping.wait()
        finally:
            log.info("stopping")
            proxy.close()
            self.proxy.close()
            self.keychain.lock()
            await runner.cleanup()
            await proxy.wait_closed()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mtls-agent",
        description="Keep mTLS client identities unlocked in memory and forward local "
        "plain HTTP from a Unix socket to their hosts over mutual TLS.",
    )
    parser.add_argument("--config", type=Path, help="config file (default: platformdirs')")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"mtls-agent {__version__}")
    return parser.parse_args(argv)


def _event_loop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:  # the standard loop works, only slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the agent in the foreground until SIGTERM or SIGINT."""
    try:
        harden()
    except StartupError as exc:
        print(f"mtls-agent: {exc.message}", file=sys.stderr)
        return 1
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="mtls-agent: %(levelname)s: %(message)s"
    )
    paths = default_paths()
    lock_fd = -1
    try:
        config = load_config(args.config or paths.config_file)
        tune_process()
        prepare_runtime_dir(paths.runtime_dir)
        lock_fd = take_instance_lock(paths)
        backlog = config.limits.listen_backlog
        proxy_sock = bind_unix(paths.proxy_socket, backlog)
        control_sock = bind_unix(paths.control_socket, backlog)
    except AgentError as exc:
        print(f"mtls-agent: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mtls-agent: cannot start: {exc}", file=sys.stderr)
        return 2
    print(f"{SOCK_ENV}={paths.proxy_socket}; export {SOCK_ENV};", flush=True)
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(Agent(paths, config).run(proxy_sock, control_sock))
    finally:
        for path in (paths.proxy_socket, paths.control_socket):
            with suppress(FileNotFoundError):
                path.unlink()
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
