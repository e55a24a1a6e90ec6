"""The vault passphrase in the OS keyring, so that the agent unlocks itself at start.

``agentctl unlock --remember`` stores it with ``keyring`` (the macOS
Keychain, the Secret Service on Linux) and ``agentctl forget`` removes it.
Only a backend that keeps secrets encrypted under the user's login is
accepted: keyring's own bar for a recommended backend (priority 1 or more),
never its "fail" or "null" placeholders, never a file backend. Where no such
backend exists we say so and store nothing, rather than fall back to a file.

Beside the vault a small marker (``keyring.json``, no secret in it) records
that a passphrase was stored and in which backend. The agent reads the
keyring only when the marker is there: a user who never asked for this never
has the agent touch D-Bus or a keychain at start, and the agent asks the
very backend the passphrase went to, whatever its own environment would
pick. The item is keyed by the vault's folder, so two vaults (or two test
homes) never share a passphrase.

Every keyring failure (no D-Bus session, a locked collection, a dismissed
prompt) becomes one ``KeyringError`` sentence; at start the agent then runs
locked, it does not stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, KeyringError

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

SERVICE = "mtls-agent"
MARKER_NAME = "keyring.json"
#: A keyring that has not answered by then (an unanswerable unlock prompt) is given up on.
RECALL_TIMEOUT = 10.0

#: Backends that write the secret to a file: refused whatever their priority.
_FILE_BACKENDS = ("keyrings.alt.file",)

_NAMES = {
    "keyring.backends.SecretService": "the Secret Service",
    "keyring.backends.libsecret": "the Secret Service (libsecret)",
    "keyring.backends.macOS": "the macOS Keychain",
    "keyring.backends.Windows": "the Windows Credential Locker",
    "keyring.backends.kwallet": "KWallet",
}


@dataclass(frozen=True)
class Remembered:
    """What the marker records: where the passphrase of which vault went."""

    backend: str
    username: str


def marker_path(vault_dir: Path) -> Path:
    return vault_dir.parent / MARKER_NAME


def describe(backend_name: str) -> str:
    """A backend's name as a user knows it ("the Secret Service")."""
    module = backend_name.rpartition(".")[0]
    return _NAMES.get(module, backend_name)


def _qualified(backend: KeyringBackend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _keyring_failure(action: str, exc: BaseException) -> KeyringError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return KeyringError(f"cannot {action} the OS keyring: {detail.rstrip('.!')}.")


def secure_backend() -> str:
    """The name of the backend ``keyring`` would store in, if it keeps secrets safe.

    Raises ``KeyringError`` with a sentence when the only backend is a
    placeholder (fail, null), a file, or anything below keyring's
    "recommended" priority.
    """
    try:
        import keyring
        from keyring.backends.chainer import ChainerBackend

        chosen = keyring.get_keyring()
        if isinstance(chosen, ChainerBackend):  # stores go to the first of the chain
            chosen = next(iter(chosen.backends), chosen)
        name = _qualified(chosen)
        priority = chosen.priority
    except Exception as exc:  # keyring's backends are plug-ins: any failure means "none"
        raise _keyring_failure("use", exc) from None
    if name.startswith(_FILE_BACKENDS) or not priority >= 1:
        raise KeyringError(
            f"no secure OS keyring is available here (keyring would use {name}, which does "
            "not keep secrets safe), so the passphrase was not stored; on Linux, run a "
            "Secret Service such as gnome-keyring in your session"
        )
    return name


def _load(name: str) -> KeyringBackend:
    from keyring.core import load_keyring

    return load_keyring(name)


def _write_marker(path: Path, remembered: Remembered) -> None:
    """Write the marker atomically, 0600 in a 0700 folder."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"backend": remembered.backend, "username": remembered.username}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(vault_dir: Path) -> Remembered | None:
    """What was remembered for this vault, or None."""
    path = marker_path(vault_dir)
    try:
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KeyringError(f"{path} is unreadable ({exc}); remove it and remember again.") from None
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("backend"), str)
        and isinstance(doc.get("username"), str)
    ):
        raise KeyringError(f"{path} is not what 'agentctl unlock --remember' writes; remove it.")
    return Remembered(doc["backend"], doc["username"])


def store(vault_dir: Path, passphrase: str, backend: str) -> None:
    """Keep ``passphrase`` in ``backend`` (from ``secure_backend``) for this vault."""
    remembered = Remembered(backend, str(vault_dir))
    try:
        _load(backend).set_password(SERVICE, remembered.username, passphrase)
    except Exception as exc:
        raise _keyring_failure("store the passphrase in", exc) from None
    _write_marker(marker_path(vault_dir), remembered)


def recall(vault_dir: Path) -> str | None:
    """The remembered passphrase, None when none was remembered; ``KeyringError`` else."""
    remembered = read_marker(vault_dir)
    if remembered is None:
        return None
    try:
        passphrase = _load(remembered.backend).get_password(SERVICE, remembered.username)
    except Exception as exc:
        raise _keyring_failure("read the passphrase from", exc) from None
    if passphrase is None:
        raise KeyringError(
            f"{describe(remembered.backend)} no longer holds the vault passphrase; "
            "run 'agentctl unlock --remember' again, or 'agentctl forget'."
        )
    return passphrase


async def recall_in_background(vault_dir: Path, timeout: float = RECALL_TIMEOUT) -> str | None:
    """``recall`` off the event loop, given up after ``timeout`` seconds.

    A daemon thread rather than the loop's executor: a keyring stuck on a
    prompt nobody can answer must not keep the agent from stopping later.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str | None] = loop.create_future()

    def settle(result: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            outcome: tuple[str | None, BaseException | None] = (recall(vault_dir), None)
        except AgentError as exc:
            outcome = (None, exc)
        with suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="keyring", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise KeyringError(f"the OS keyring did not answer within {timeout:g} seconds.") from None


def forget(vault_dir: Path) -> str | None:
    """Remove the remembered passphrase; the backend it was in, or None if there was none.

    The marker goes only once the keyring item is gone, so that a keyring
    out of reach never leaves a stored passphrase that nothing points to.
    """
    remembered = read_marker(vault_dir)
    if remembered is None:
        return None
    try:
        from keyring.errors import PasswordDeleteError

        backend = _load(remembered.backend)
        with suppress(PasswordDeleteError):  # already gone: only the marker is left
            backend.delete_password(SERVICE, remembered.username)
    except Exception as exc:
        raise _keyring_failure("remove the passphrase from", exc) from None
    marker_path(vault_dir).unlink(missing_ok=True)
    return remembered.backend
