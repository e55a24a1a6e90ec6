"""The unlocked state in memory: which identities are loaded, and locking.

Metadata is read from the vault at start and on reload, so routing knows
which host has which identity even while locked (and can say "locked"
rather than "no identity"). Unlocking costs one KDF and one cheap open per
identity; the vault key is kept while unlocked so that identities imported
later load on reload without a second passphrase prompt. What the keychain
holds per identity is an ``ssl.SSLContext``, never the key bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import AgentError, IdentityExpired, Locked, NoIdentityForHost, PeerDenied
from agent.identity import Identity, build_ssl_context
from agent.peer import Caller
from agent.policy import choose, shown
from agent.routing import Router
from agent.vault import Vault, VaultKey

log = logging.getLogger(__name__)

#: Routes kept for reuse (``Keychain.route``); a caller walking through more
#: hosts than this only costs each one a lookup in the router again.
ROUTES_KEPT = 4096


def read_identities(vault: Vault) -> tuple[dict[str, Identity], dict[str, str]]:
    """Every stored identity's metadata by name, and why any could not be read.

    Works while locked: only certificates and settings are read, no key.
    """
    identities: dict[str, Identity] = {}
    broken: dict[str, str] = {}
    for name in vault.names():
        try:
            identities[name] = Identity.from_metadata(name, vault.read_metadata(name))
        except AgentError as exc:
            broken[name] = exc.message
    return identities, broken


@dataclass(eq=False, slots=True)
class LoadedIdentity:
    """An identity ready to present: its metadata and its TLS context.

    Compared by object identity, so a renewed identity (a new object) gets
    its own upstream connections while requests on the old one finish.
    """

    identity: Identity
    context: ssl.SSLContext
    pins: frozenset[str] = field(default_factory=frozenset)
    #: Set once the identity is unloaded: its connections are not pooled again.
    retired: bool = False


@dataclass(frozen=True, slots=True)
class UnlockReport:
    loaded: list[str]
    broken: dict[str, str]


class Keychain:
    """Loaded identities, the lock state, and routing of hosts to identities."""

    def __init__(self, vault: Vault, scratch_dir: Path) -> None:
        self._vault = vault
        self._scratch = scratch_dir
        self._key: VaultKey | None = None
        self._identities: dict[str, Identity] = {}
        self._loaded: dict[str, LoadedIdentity] = {}
        self._router = Router(())
        #: (host, port) → (identity, its expiry) for routes that need no caller
        #: rule; emptied on every lock, unlock and reload (see ``route``).
        self._routes: dict[tuple[str, int], tuple[LoadedIdentity, float]] = {}
        #: Names of the identities with caller rules: the only ones routing consults rules for.
        self._ruled: frozenset[str] = frozenset()
        self._expiry: dict[str, float] = {}
        self.broken: dict[str, str] = {}
        self.unlocked_at: float | None = None
        #: This unlock's own limit (``agentctl unlock --timeout``), None: the config's.
        self.unlock_timeout: float | None = None
        self._unload_listeners: list[Callable[[list[LoadedIdentity], bool], None]] = []
        self._change_listeners: list[Callable[[], None]] = []
        self._refresh_lock = asyncio.Lock()
        self._generation = 0

    # --- state ---

    @property
    def locked(self) -> bool:
        return self._key is None

    @property
    def identities(self) -> list[Identity]:
        return list(self._identities.values())

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def on_unload(self, listener: Callable[[list[LoadedIdentity], bool], None]) -> None:
        """Be told which loaded identities are dropped, and whether by a lock.

        After a lock nothing may go on using them; after a reload or renewal
        swap, requests already under way may finish on the old identity.
        """
        self._unload_listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Be called after every lock, unlock and reload (status, auto-lock timers)."""
        self._change_listeners.append(listener)

    # --- lock and unlock ---

    async def unlock(self, passphrase: str, timeout: float | None = None) -> UnlockReport:
        """Open the vault key and load every identity, off the event loop.

        Every unlock restarts the unlocked time; ``timeout`` (0: no limit)
        replaces the configured ``max_unlocked`` until the next lock.
        """
        async with self._refresh_lock:
            generation = self._generation  # a lock during the KDF must win
            key = await asyncio.to_thread(self._vault.unlock_key, passphrase)
            await self._refresh(key, generation)
            if self._key is key:
                self.unlocked_at = time.monotonic()
                self.unlock_timeout = timeout
            self._changed()
            return UnlockReport(sorted(self._loaded), dict(self.broken))

    def lock(self) -> None:
        """Forget the vault key and every context; pooled connections close."""
        self._generation += 1
        dropped = list(self._loaded.values())
        self._key = None
        self._loaded = {}
        self._routes = {}
        self.broken = {name: r for name, r in self.broken.items() if name not in self._identities}
        self.unlocked_at = None
        self.unlock_timeout = None
        self._notify(dropped, locking=True)
        self._changed()

    async def reload(self) -> None:
        """Re-read the vault: load new identities when unlocked, drop gone ones."""
        async with self._refresh_lock:
            await self._refresh(self._key, self._generation)
        self._changed()

    async def _refresh(self, key: VaultKey | None, generation: int) -> None:
        keep = dict(self._loaded) if key is self._key else {}
        identities, loaded, broken = await asyncio.to_thread(self._read, key, keep)
        if generation != self._generation:
            return  # locked while we were reading: stay locked
        dropped = [li for name, li in self._loaded.items() if loaded.get(name) is not li]
        if key is not None and self._key is None:
            self.unlocked_at = time.monotonic()
        self._key = key
        self._identities = identities
        self._loaded = loaded
        self.broken = broken
        self._router = Router(identities.values())
        self._ruled = frozenset(name for name, i in identities.items() if i.callers)
        self._expiry = {name: i.not_after.timestamp() for name, i in identities.items()}
        self._routes = {}
        self._notify(dropped, locking=False)

    def _read(
        self, key: VaultKey | None, keep: dict[str, LoadedIdentity]
    ) -> tuple[dict[str, Identity], dict[str, LoadedIdentity], dict[str, str]]:
        """Metadata of every identity, and a context for each when a key is given.

        An identity whose metadata or sealed key cannot be read is named in
        the broken map and does not stop the others.
        """
        identities, broken = read_identities(self._vault)
        loaded: dict[str, LoadedIdentity] = {}
        if key is not None:
            for name, identity in identities.items():
                previous = keep.get(name)
                if previous is not None and previous.identity == identity:
                    loaded[name] = previous
                    continue
                try:
                    loaded[name] = self._load(identity, key)
                except (AgentError, ValueError, ssl.SSLError) as exc:
                    broken[name] = getattr(exc, "message", str(exc))
        return identities, loaded, broken

    def _load(self, identity: Identity, key: VaultKey) -> LoadedIdentity:
        private_key = self._vault.open_key(identity.name, key)
        context = build_ssl_context(identity, private_key, self._scratch)
        return LoadedIdentity(identity, context, frozenset(identity.pins))

    def client_context(self, identity: Identity, trust_pem: bytes | None) -> ssl.SSLContext:
        """A context presenting ``identity`` to a server that ``trust_pem`` (else
        the system store) verifies: EST renewal authenticates with the current
        identity. Needs the agent unlocked; like every context, it holds the
        key, and the key bytes stay here. Blocking: run it off the event loop.
        """
        key = self._key
        if key is None:
            raise Locked()
        private_key = self._vault.open_key(identity.name, key)
        towards_server = dataclasses.replace(identity, ca_pem=trust_pem, pins=())
        return build_ssl_context(towards_server, private_key, self._scratch)

    def _changed(self) -> None:
        for listener in self._change_listeners:
            listener()

    def _notify(self, dropped: list[LoadedIdentity], *, locking: bool) -> None:
        for loaded in dropped:
            loaded.retired = True
        if dropped:
            for listener in self._unload_listeners:
                listener(dropped, locking)

    # --- routing (the data plane's hot path) ---

    def route(self, host: str, port: int, caller: Caller | None = None) -> LoadedIdentity:
        """The loaded identity ``caller`` gets for ``host:port``, or the reason there is none.

        Caller rules are consulted only when the most specific identity has
        some, so identities without rules cost nothing more. Rules admit no
        caller that is not given (None): they fail closed. A route without
        rules is kept until the next change of state, and used while its
        identity has not expired.
        """
        kept = self._routes.get((host, port))
        if kept is not None and time.time() < kept[1]:
            return kept[0]
        candidates = self._router.candidates(host, port)
        if not candidates:
            raise NoIdentityForHost(
                f"No identity is bound to {shown(host, port)}; import one with "
                f"'agentctl import NAME FILE.p12 --host {host}'."
            )
        identity = candidates[0]
        ruled = bool(self._ruled) and identity.name in self._ruled
        if ruled:
            try:
                identity = choose(candidates, host, port, caller)
            except PeerDenied as exc:
                log.debug("peer-denied: %r for %s:%d: %s", caller, host, port, exc.reason)
                raise
        if self._key is None:
            raise Locked()
        expiry = self._expiry[identity.name]
        if time.time() >= expiry:
            raise IdentityExpired(
                f"The identity '{identity.name}' for {host} expired at "
                f"{identity.not_after.isoformat()}; {_renewal_hint(identity)}."
            )
        loaded = self._loaded.get(identity.name)
        if loaded is None:
            reason = self.broken.get(identity.name, "it is not loaded")
            raise NoIdentityForHost(
                f"The identity '{identity.name}' for {host} could not be loaded: {reason}"
            )
        if not ruled:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes = {}
            self._routes[(host, port)] = (loaded, expiry)
        return loaded


def _renewal_hint(identity: Identity) -> str:
    """How the user gets a valid certificate again, by where this one came from."""
    name = identity.name
    kind = identity.source.get("kind")
    if kind == "est":
        return (
            f"try 'agentctl renew {name}'; an EST server that refuses an expired certificate"
            f" needs a new enrollment ('agentctl remove {name}', then 'agentctl enroll {name}"
            " --est URL ...')"
        )
    if kind == "pkcs12-url":
        return f"fetch a new one with 'agentctl enroll {name} --p12-url URL ... --replace'"
    return f"import a new one with 'agentctl import {name} FILE.p12 --host ... --replace'"
