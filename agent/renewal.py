"""Renewing EST identities in the background, before they expire.

When: at two thirds of the certificate's lifetime, moved by a random jitter
of up to a thirtieth of the lifetime either way, so that a fleet enrolled
together does not ask the CA all at once. Times are wall-clock times,
compared at least every ``check_interval``: one long sleep would miss a
suspend (the monotonic clock stops) and a clock jump, and certificates
expire by the wall clock. After a wake or a jump past the due time, the
renewal runs at the next check.

How: ``agent.enroll.renew_est`` with a fresh key, authenticated by the
current identity over mTLS (so only while unlocked: a locked agent waits
for the next unlock), then a keychain reload swaps the new identity in.
Requests already running finish on the old one; new ones get the new one.

Failures: each is logged, shown in ``agentctl status``, and retried after a
delay that doubles from ``retry_initial`` up to ``retry_max`` (never a
tight loop); the old identity keeps serving until it expires. A request
the server answered with 202 is asked again with the same key and CSR.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.enroll import est_server_trust, renew_est, renewal_key_type
from agent.errors import AgentError, EnrollmentError, EnrollmentPending, IdentityError, Locked
from agent.est import generate_key
from agent.identity import Identity, PrivateKey
from agent.keychain import Keychain
from agent.vault import Vault

log = logging.getLogger(__name__)

#: Renew at this fraction of the lifetime...
RENEW_AT = 2 / 3
#: ...plus or minus up to this fraction of it, drawn once per certificate.
JITTER = 1 / 30
#: How long one attempt waits out 202 answers before it counts as a failure.
PENDING_WAIT = 60.0


def renewable(identity: Identity) -> bool:
    """Whether the agent renews ``identity`` itself (it came from EST)."""
    return identity.source.get("kind") == "est"


def renewal_due(identity: Identity, jitter: float = 0.0) -> float:
    """The wall-clock time (epoch seconds) at which ``identity`` should renew."""
    start = identity.not_before.timestamp()
    lifetime = identity.not_after.timestamp() - start
    return start + lifetime * (RENEW_AT + jitter)


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


@dataclass
class RenewalState:
    """Where one identity's renewal stands; made anew for each certificate."""

    name: str
    serial: str
    not_after: float
    due: float
    next_attempt: float
    failures: int = 0
    last_attempt: float | None = None
    last_error: str | None = None
    retry_delay: float | None = None
    last_renewed: float | None = None
    renewing: bool = False
    waiting_for_unlock: bool = False

    @property
    def state(self) -> str:
        if self.renewing:
            return "renewing"
        if self.waiting_for_unlock:
            return "waiting-for-unlock"
        return "failing" if self.failures else "scheduled"

    def report(self) -> dict[str, Any]:
        """The JSON the control API shows (``agentctl status``/``list``)."""
        return {
            "state": self.state,
            "serial": self.serial,
            "next_renewal": _iso(self.next_attempt),
            "due": _iso(self.due),
            "not_after": _iso(self.not_after),
            "failures": self.failures,
            "last_attempt": _iso(self.last_attempt),
            "last_error": self.last_error,
            "retry_delay_seconds": self.retry_delay,
            "last_renewed": _iso(self.last_renewed),
        }


class Renewer:
    """The renewal scheduler of one agent (see the module docstring)."""

    def __init__(
        self,
        keychain: Keychain,
        vault: Vault,
        *,
        check_interval: float,
        retry_initial: float,
        retry_max: float,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_renewed: Callable[[Identity, Any], None] | None = None,
    ) -> None:
        """``on_renewed`` is told of each identity renewed and who asked for it
        (the caller of ``renew_now``, None for the agent's own schedule): the audit log."""
        self._keychain = keychain
        self._vault = vault
        self.check_interval = check_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_renewed = on_renewed
        self._states: dict[str, RenewalState] = {}
        #: A key made for a renewal that the server has not answered yet, by
        #: the serial it renews: asking again re-sends the same request.
        self._keys: dict[str, tuple[str, PrivateKey]] = {}
        self._running: dict[str, asyncio.Task[Identity]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- life cycle ---

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="renewal")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None

    def wake(self) -> None:
        """Check now (after an unlock, or when the vault changed)."""
        self._wake.set()

    # --- what the control API shows ---

    def report(self) -> dict[str, dict[str, Any]]:
        """Each EST identity's renewal state, by name."""
        return {name: state.report() for name, state in sorted(self._refresh().items())}

    # --- scheduling ---

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # a wake during the tick below makes the pause end at once
            try:
                await self.tick()
            except Exception:  # the scheduler must outlive any one bad identity
                log.exception("renewal check failed")
            await self._pause()

    async def _pause(self) -> None:
        """Sleep until the next attempt is due, but never longer than
        ``check_interval``: the wall clock may jump while we sleep."""
        now = self._clock()
        upcoming = [
            s.next_attempt
            for s in self._states.values()
            if not s.renewing and not s.waiting_for_unlock
        ]
        delay = min([self.check_interval, *(max(t - now, 0.0) for t in upcoming)])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _refresh(self) -> dict[str, RenewalState]:
        """States for the EST identities the keychain has, remade when a certificate changes."""
        current: dict[str, RenewalState] = {}
        for identity in self._keychain.identities:
            if not renewable(identity):
                continue
            state = self._states.get(identity.name)
            if state is None or state.serial != identity.serial:
                due = renewal_due(identity, self._rng.uniform(-JITTER, JITTER))
                renewed = None if state is None else state.last_renewed
                # A certificate already past its due time (a CA that backdates, a
                # clock far ahead) must not be renewed back to back.
                earliest = due if renewed is None else max(due, renewed + self.retry_initial)
                state = RenewalState(
                    identity.name,
                    identity.serial,
                    identity.not_after.timestamp(),
                    due,
                    earliest,
                    last_renewed=renewed,
                )
            current[identity.name] = state
        self._states = current
        self._keys = {n: k for n, k in self._keys.items() if n in current}
        return current

    async def tick(self) -> None:
        """Renew every identity whose time has come, and wait for those renewals."""
        now = self._clock()
        due = []
        for name, state in self._refresh().items():
            if state.renewing or now < state.next_attempt:
                continue
            state.waiting_for_unlock = self._keychain.locked
            if not state.waiting_for_unlock:
                due.append(self._attempt(name))
        if due:
            await asyncio.gather(*due, return_exceptions=True)

    async def renew_now(self, name: str, caller: Any = None) -> Identity:
        """Renew ``name`` at once (``agentctl renew``, whose process is ``caller``);
        joins a renewal in progress."""
        identity = self._identity(name)
        if not renewable(identity):
            raise EnrollmentError(
                f"identity '{name}' did not come from EST ({identity.source.get('kind')}),"
                " so the agent cannot renew it; enroll or import a new one with --replace"
            )
        if self._keychain.locked:
            raise Locked("The agent is locked; renewal needs 'agentctl unlock' first.")
        # Shielded: a client that hangs up must not cancel a renewal half-way.
        return await asyncio.shield(self._attempt(name, caller))

    def _identity(self, name: str) -> Identity:
        for identity in self._keychain.identities:
            if identity.name == name:
                return identity
        raise IdentityError(f"there is no identity named '{name}'")

    def _attempt(self, name: str, caller: Any = None) -> asyncio.Task[Identity]:
        task = self._running.get(name)
        if task is None:
            task = asyncio.create_task(self._renew(name, caller), name=f"renew {name}")
            self._running[name] = task
            task.add_done_callback(lambda _: self._running.pop(name, None))
        return task

    async def _renew(self, name: str, caller: Any) -> Identity:
        identity = self._identity(name)
        state = self._refresh()[name]
        state.renewing = True
        state.last_attempt = self._clock()
        try:
            renewed = await self._renew_with_key(identity)
        except Exception as exc:
            raise self._failed(state, exc, identity) from None
        finally:
            state.renewing = False
        self._keys.pop(name, None)
        state.last_renewed = self._clock()
        await self._keychain.reload()
        self._refresh()
        log.info(
            "renewed %s: serial %s, valid until %s",
            name,
            renewed.serial,
            renewed.not_after.isoformat(),
        )
        if self._on_renewed is not None:
            self._on_renewed(renewed, caller)
        return renewed

    async def _renew_with_key(self, identity: Identity) -> Identity:
        kept = self._keys.get(identity.name)
        if kept is not None and kept[0] == identity.serial:
            key = kept[1]
        else:
            key = await asyncio.to_thread(generate_key, renewal_key_type(identity))
            self._keys[identity.name] = (identity.serial, key)
        context = await asyncio.to_thread(
            self._keychain.client_context, identity, est_server_trust(identity)
        )
        return await renew_est(
            self._vault,
            identity,
            context,
            key,
            wait=PENDING_WAIT,
            progress=lambda line: log.info("renewal of %s: %s", identity.name, line),
        )

    def _failed(self, state: RenewalState, exc: Exception, identity: Identity) -> AgentError:
        """Record a failure, schedule the retry, and say what went wrong."""
        if isinstance(exc, AgentError):
            error = exc
        else:
            log.error("renewal of %s failed unexpectedly", state.name, exc_info=exc)
            error = EnrollmentError(f"the renewal failed unexpectedly ({type(exc).__name__})")
        if identity.not_after.timestamp() <= time.time():
            # a renewal authenticates with the current certificate: once it has
            # expired, EST servers refuse the handshake, often without a word
            error = EnrollmentError(
                f"{error.message.rstrip('.')}; its certificate expired at"
                f" {identity.not_after.isoformat()}, which EST servers refuse for a renewal:"
                f" remove it ('agentctl remove {identity.name}') and enroll it again"
            )
        state.failures += 1
        delay = min(self.retry_initial * 2 ** (state.failures - 1), self.retry_max)
        if isinstance(exc, EnrollmentPending):
            delay = max(delay, min(exc.retry_after, self.retry_max))
        else:
            self._keys.pop(state.name, None)  # refused: the next try gets a fresh key
        state.retry_delay = delay
        state.next_attempt = self._clock() + delay
        state.last_error = error.message
        log.warning(
            "renewal of %s failed (%d in a row): %s; next try in %.3g s",
            state.name,
            state.failures,
            error.message,
            delay,
        )
        return error
