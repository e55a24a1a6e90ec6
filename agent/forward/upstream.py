"""Upstream mTLS connections: connecting, pinning, pooling, error mapping.

A connection is made once per (identity, host, port) and reused for as long
as the upstream keeps it alive, so the TLS handshake is paid once rather than
per request. Failures of the layer below (socket, DNS, ssl) become the
agent's own errors in exactly one place, ``connect_error``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from agent.config import Limits
from agent.errors import (
    PinMismatch,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    UpstreamUntrusted,
)
from agent.identity import spki_pin
from agent.keychain import LoadedIdentity

if TYPE_CHECKING:
    from agent.forward.http import Origin


class UpstreamUser(Protocol):
    """What an upstream connection reports to the exchange it serves."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


PoolKey = tuple[LoadedIdentity, str, int]

#: Seconds a burst may keep more than ``pool_max_idle`` connections idle: closing
#: them as each exchange ends would make the next wave of a busy client pay a
#: TLS handshake per request (a fifth of all requests at 200 concurrent callers).
TRIM_DELAY = 1.0


class UpstreamConnection(asyncio.Protocol):
    """One TLS connection to an upstream; serves one exchange at a time."""

    __slots__ = ("closed", "idle_since", "key", "reused", "transport", "user")

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.user: UpstreamUser | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.user is not None:
            self.user.upstream_data(data)
        else:  # bytes nobody asked for: the connection can't be trusted again
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        user, self.user = self.user, None
        if user is not None:
            user.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(False)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


#: OpenSSL's verify codes for a chain that ends at no trusted CA (as opposed
#: to an expired or misnamed certificate): the fix is the identity's CA.
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})


def connect_error(exc: BaseException, where: str, limits: Limits) -> ProxyError:
    """The wire error for a failure to reach ``where`` (host:port)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(
            f"{where} did not complete the connection and TLS handshake within "
            f"{limits.connect_timeout:g} s."
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "verification failed"
        hint = ""
        if exc.verify_code in _UNKNOWN_ISSUER:
            hint = (
                " If it is the right server, give the identity the CA that signed it"
                " (import --ca, enroll --upstream-ca)."
            )
        return UpstreamUntrusted(f"The certificate of {where} is not trusted: {reason}.{hint}")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return UpstreamUnreachable(f"The TLS handshake with {where} failed: {reason}.")
    if isinstance(exc, socket.gaierror):
        return UpstreamUnreachable(f"The host of {where} could not be resolved.")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamUnreachable(f"{where} refused the connection.")
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        return UpstreamUnreachable(f"{where} could not be reached: {reason}.")
    return UpstreamUnreachable(f"{where} could not be reached.")


class Pool:
    """Idle upstream connections by (identity, host, port), newest reused first."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.TimerHandle | None = None
        self.opened = 0

    def take(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.reused = True
                return conn
        return None

    async def connect(self, loaded: LoadedIdentity, origin: Origin) -> UpstreamConnection:
        """A new connection: TCP, the TLS handshake with the client chain, pins."""
        loop = asyncio.get_running_loop()
        key = (loaded, origin.host, origin.port)
        where = origin.where
        try:
            async with asyncio.timeout(self._limits.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(key),
                    origin.host,
                    origin.port,
                    ssl=loaded.context,
                    server_hostname=origin.host,
                    # the outer timeout decides; this only keeps ssl from racing it
                    ssl_handshake_timeout=self._limits.connect_timeout + 1,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise connect_error(exc, where, self._limits) from None
        if loaded.pins:
            der = conn.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if spki_pin(der) not in loaded.pins:
                conn.abort()
                raise PinMismatch(
                    f"The public key of {where} matches none of the pins of identity "
                    f"'{loaded.identity.name}'; no request was sent."
                )
        self.opened += 1
        return conn

    def put(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose last exchange ended cleanly, if still wanted.

        Beyond ``pool_max_idle`` it is kept too, for ``TRIM_DELAY``: a burst
        reuses it, and what stays idle after the burst is closed then.
        """
        if conn.closed or conn.key[0].retired:
            conn.close()
            return
        conn.user = None
        conn.idle_since = time.monotonic()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if len(idle) > self._limits.pool_max_idle and self._trimmer is None:
            self._trimmer = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim)
        if self._sweeper is None:
            self._schedule_sweep()

    def retire(self, dropped: Iterable[LoadedIdentity]) -> None:
        """Close the idle connections of identities that were unloaded."""
        dropped = set(dropped)
        for key in [k for k in self._idle if k[0] in dropped]:
            for conn in self._idle.pop(key):
                conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for timer in (self._sweeper, self._trimmer):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._trimmer = None

    def _trim(self) -> None:
        """Close idle connections beyond ``pool_max_idle`` that sat out a whole
        ``TRIM_DELAY`` (see ``put``); the oldest are first in each list."""
        self._trimmer = None
        loop = asyncio.get_running_loop()
        cutoff = time.monotonic() - TRIM_DELAY
        keep = self._limits.pool_max_idle
        again = False
        for idle in self._idle.values():
            excess = len(idle) - keep
            stale = 0
            while stale < excess and idle[stale].idle_since <= cutoff:
                idle[stale].close()
                stale += 1
            del idle[:stale]
            again = again or len(idle) > keep
        if again:
            self._trimmer = loop.call_later(TRIM_DELAY, self._trim)

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self._limits.pool_idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the upstream likely keeps them."""
        self._sweeper = None
        cutoff = time.monotonic() - self._limits.pool_idle_timeout
        for key, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.closed or conn.idle_since <= cutoff:
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._schedule_sweep()
