"""Start-up and the sockets: the ``mtls-agent`` command.

Hardening comes first, before any secret can exist in this process: no core
dumps, no ptrace by the same uid, a private umask (as ``ssh-agent`` does).
Then the config file, the runtime folder, the vault and the log folder are
checked (none may belong to another user or be writable by others: whoever
could write them could rebind an identity to a host of theirs or let
themselves in), a lock file keeps a second agent from stealing the sockets,
the audit log is opened, and both sockets are served until SIGTERM or SIGINT.
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
from agent.activation import CONTROL, PROXY, inherited_sockets
from agent.audit import AuditLog, identity_fields
from agent.autolock import AutoLock
from agent.config import Config, load_config
from agent.control import ControlState, make_app
from agent.errors import AgentError, BadPassphrase
from agent.forward import ProxyServer
from agent.identity import Identity
from agent.keychain import Keychain
from agent.notify import Notifier
from agent.paths import SOCK_ENV, Paths, default_paths
from agent.peer import Caller, Peer
from agent.remember import recall_in_background
from agent.renewal import Renewer
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
    refuse_unsafe(path, "remove it, or set XDG_RUNTIME_DIR to a folder of your own")
    _refuse_swappable_parent(path.parent)


def _refuse_swappable_parent(parent: Path) -> None:
    """Refuse a parent in which another user could rename our folder away and
    put their own sockets in its place (a sticky folder such as /tmp is safe)."""
    info = parent.stat()
    if info.st_uid not in (os.getuid(), 0):
        raise StartupError(
            f"{parent} belongs to uid {info.st_uid}, not to you; set XDG_RUNTIME_DIR "
            "to a folder of your own."
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise StartupError(
            f"{parent} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run 'chmod 700 {parent}' or set XDG_RUNTIME_DIR to a folder of your own."
        )


def refuse_unsafe(path: Path, owner_fix: str) -> None:
    """Refuse ``path`` when another user owns it or others may write to it.

    ``owner_fix`` says what to do about a foreign owner; the fix for a loose
    mode is always a chmod.
    """
    info = path.stat()
    if info.st_uid != os.getuid():
        raise StartupError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); {owner_fix}."
        )
    if info.st_mode & 0o022:
        private = "700" if stat.S_ISDIR(info.st_mode) else "600"
        raise StartupError(
            f"{path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run 'chmod {private} {path}' and start again."
        )


def check_vault(vault_dir: Path) -> None:
    """Refuse a vault that another user controls, or could change.

    The identity files hold the host patterns and caller rules: whoever can
    write them can send a key's signatures to a host of theirs. A vault that
    does not exist yet is fine (``agentctl init`` makes it private).
    """
    fix = (
        "the agent will not use a vault another user controls; if it is yours, give it back"
        f" with 'chown -R {os.getuid()} {vault_dir}', else set XDG_DATA_HOME to a folder of"
        " your own"
    )
    if not vault_dir.exists():
        if vault_dir.parent.exists():
            refuse_unsafe(vault_dir.parent, fix)
        return
    for path in (vault_dir.parent, vault_dir, *sorted(vault_dir.rglob("*"))):
        refuse_unsafe(path, fix)


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

    def __init__(
        self,
        paths: Paths,
        config: Config,
        audit: AuditLog | None = None,
        manager: str | None = None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.audit = audit
        self.manager = manager
        self.notifier = Notifier()
        vault = Vault(paths.vault_dir, lock_timeout=config.limits.vault_lock_timeout)
        self.keychain = Keychain(vault, paths.runtime_dir)
        allowed = frozenset({os.getuid(), *config.proxy_allow_uids})
        self.proxy = ProxyServer(self.keychain, config.limits, allowed, audit)
        self.renewer = Renewer(
            self.keychain,
            vault,
            check_interval=config.renewal_check_interval,
            retry_initial=config.renewal_retry_initial,
            retry_max=config.renewal_retry_max,
            on_renewed=self._audit_renewal,
        )
        self.autolock = AutoLock(self.keychain, config, self.proxy, on_lock=self._audit_lock)
        self._stopping = asyncio.Event()

    def _audit_renewal(self, identity: Identity, caller: Caller | None) -> None:
        if self.audit is not None:
            self.audit.event("renew", caller, **identity_fields(identity))

    def _audit_lock(self, reason: str) -> None:
        if self.audit is not None:
            self.audit.event("lock", None, reason=reason)

    def _state_line(self) -> str:
        """``locked (3 identities)``: systemd's STATUS= and the start-up log line."""
        keychain = self.keychain
        if keychain.locked:
            state, count = "locked", len(keychain.identities)
        else:
            state = "unlocked"
            count = sum(1 for i in keychain.identities if keychain.is_loaded(i.name))
        return f"{state} ({count} {'identity' if count == 1 else 'identities'})"

    async def _unlock_from_keyring(self) -> None:
        """Unlock with the passphrase remembered in the OS keyring, if one was.

        Done before the sockets are served, so that the client whose
        connection started the agent finds it unlocked. A keyring that
        fails leaves the agent locked, with one sentence in the log.
        """
        try:
            passphrase = await recall_in_background(self.paths.vault_dir)
            if passphrase is None:
                return
            report = await self.keychain.unlock(passphrase)
        except BadPassphrase:
            log.warning(
                "the passphrase in the OS keyring does not open the vault; the agent starts "
                "locked (run 'agentctl unlock --remember' again)."
            )
            return
        except AgentError as exc:
            log.warning("%s; the agent starts locked.", exc.message.rstrip("."))
            return
        log.info("unlocked with the passphrase from the OS keyring")
        if self.audit is not None:
            self.audit.event(
                "unlock", None, source="keyring", loaded=report.loaded, broken=sorted(report.broken)
            )

    async def run(self, proxy_sock: socket.socket, control_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        await self.keychain.reload()
        await self._unlock_from_keyring()
        # uvloop listens again on a passed socket: give it our backlog, not its 100
        proxy = await loop.create_unix_server(
            self.proxy, sock=proxy_sock, backlog=self.config.limits.listen_backlog
        )
        state = ControlState(
            self.keychain,
            self.proxy,
            self.paths,
            time.monotonic(),
            renewer=self.renewer,
            audit=self.audit,
            autolock=self.autolock,
            manager=self.manager,
        )
        limits = self.config.limits
        app = make_app(
            state,
            limits.control_body_bytes,
            unlock_delay=limits.failed_unlock_delay,
            unlock_delay_max=limits.failed_unlock_delay_max,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, control_sock, backlog=limits.listen_backlog).start()
        count = len(self.keychain.identities)
        log.info(
            "mtls-agent %s ready, %s: proxy %s, control %s",
            __version__, self._state_line(), self.paths.proxy_socket, self.paths.control_socket,
        )
        self.keychain.on_change(lambda: self.notifier.status(self._state_line()))
        self.autolock.start()
        self.notifier.ready(self._state_line())
        me = Caller(Peer(os.getpid(), os.getuid(), os.getgid()))
        if self.audit is not None:
            self.audit.event("start", me, version=__version__, identities=count)
        gc.freeze()  # start-up objects never die: keep them out of every collection
        # a request makes a few dozen short-lived objects and no cycles worth
        # chasing often: collect the youngest generation 10x less often
        gc.set_threshold(7000, 10, 10)
        self.renewer.start()
        try:
            await self._stopping.wait()
        finally:
            log.info("stopping")
            self.notifier.stopping()
            await self.autolock.stop()
            await self.renewer.stop()
            proxy.close()
            self.proxy.close()
            self.keychain.lock()
            if self.audit is not None:
                self.audit.event("stop", me)
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
    except StartupError as exc:  # refused to start, like every unsafe start-up
        print(f"mtls-agent: {exc.message}", file=sys.stderr)
        return 2
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="mtls-agent: %(levelname)s: %(message)s"
    )
    lock_fd = -1
    audit: AuditLog | None = None
    try:
        paths = default_paths()
        config_file = args.config or paths.config_file
        if config_file.exists():
            refuse_unsafe(
                config_file,
                "the agent takes no settings from a file another user controls; use one of"
                " your own (--config PATH)",
            )
        config = load_config(config_file, required=args.config is not None)
        tune_process()
        prepare_runtime_dir(paths.runtime_dir)
        check_vault(paths.vault_dir)
        if paths.log_dir.exists():
            refuse_unsafe(paths.log_dir, "set XDG_STATE_HOME to a folder of your own")
        lock_fd = take_instance_lock(paths)
        audit = AuditLog(paths.audit_log, max_bytes=config.audit_max_bytes, keep=config.audit_keep)
        backlog = config.limits.listen_backlog
        expected = {PROXY: paths.proxy_socket, CONTROL: paths.control_socket}
        inherited = inherited_sockets(expected)
        passed = inherited.sockets if inherited is not None else {}
        for sock in passed.values():
            sock.listen(backlog)  # the manager's backlog may be smaller than ours
        proxy_sock = passed[PROXY] if PROXY in passed else bind_unix(paths.proxy_socket, backlog)
        control_sock = (
            passed[CONTROL] if CONTROL in passed else bind_unix(paths.control_socket, backlog)
        )
        # The manager's socket files stay: they are what starts the agent next time.
        bound = [path for name, path in expected.items() if name not in passed]
    except (AgentError, OSError) as exc:
        if audit is not None:
            audit.close()
        reason = exc.message if isinstance(exc, AgentError) else f"cannot start: {exc}"
        print(f"mtls-agent: {reason}", file=sys.stderr)
        return 2
    print(f"{SOCK_ENV}={paths.proxy_socket}; export {SOCK_ENV};", flush=True)
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            manager = inherited.manager if inherited is not None else None
            runner.run(Agent(paths, config, audit, manager).run(proxy_sock, control_sock))
    finally:
        audit.close()
        for path in bound:
            with suppress(FileNotFoundError):
                path.unlink()
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
