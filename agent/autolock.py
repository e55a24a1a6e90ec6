"""When the agent locks itself: idle, too long unlocked, suspend, session lock.

- ``lock_after_idle``: no request under way and none answered for that
  long. A download, upload or tunnel in progress is use, however long it
  takes: the lock would cut it. The proxy's ``requests_served`` counter and
  ``busy()`` are polled (a tenth of the setting, between 50 ms and a
  minute), so the data plane pays nothing per request and the lock comes at
  most one poll interval late.
- ``max_unlocked``: that long after an unlock, busy or not. ``agentctl unlock
  --timeout`` sets it for one unlock.
- On Linux, logind's suspend and session-lock signals (``lock_on_suspend``,
  ``lock_on_session_lock``), watched by ``agent.logind``.

Locking is ``Keychain.lock()``: every context is dropped and pooled upstream
connections close. The reason of the last lock is kept for ``agentctl
status``, so a user who finds the agent locked can see why.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import Config
from agent.keychain import Keychain

if TYPE_CHECKING:  # Linux only (jeepney): imported when started
    from agent.logind import LogindWatcher

log = logging.getLogger(__name__)

IDLE = "idle"
MAX_UNLOCKED = "max-unlocked"
SUSPEND = "suspend"
SESSION_LOCK = "session-lock"
REQUEST = "request"

_POLL_MIN = 0.05
_POLL_MAX = 60.0
#: How long the logind thread waits for a lock it asked for.
_LOCK_FROM_THREAD_TIMEOUT = 5.0

_LOG_LINES = {
    IDLE: "locked: no request for %s",
    MAX_UNLOCKED: "locked: %s since the unlock",
    SUSPEND: "locked: the system is going to sleep",
    SESSION_LOCK: "locked: the session was locked",
}


class Traffic(Protocol):
    """What the idle lock watches of the proxy."""

    requests_served: int

    def busy(self) -> bool:
        """Whether a request or tunnel is under way."""
        ...


def _seconds(value: float) -> str:
    return f"{value:g}s"


class AutoLock:
    """Locks the keychain on its own; see the module docstring for when."""

    def __init__(
        self,
        keychain: Keychain,
        config: Config,
        traffic: Traffic,
        on_lock: Callable[[str], None] | None = None,
    ) -> None:
        self._keychain = keychain
        self._on_lock = on_lock
        self._config = config
        self._idle = config.lock_after_idle
        self._poll = min(max(self._idle / 10, _POLL_MIN), _POLL_MAX)
        self._traffic = traffic
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: LogindWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locking = False
        self._was_locked = keychain.locked
        self._last_active = time.monotonic()  # the keychain's clock for unlocked_at
        #: Why the agent last locked (a code above); None while unlocked or never locked.
        self.reason: str | None = None
        keychain.on_change(self._changed)

    @property
    def max_unlocked(self) -> float:
        """The limit for the current unlock: its own ``--timeout``, else the config's."""
        own = self._keychain.unlock_timeout
        return self._config.max_unlocked if own is None else own

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="autolock")
        config = self._config
        if sys.platform.startswith("linux") and (
            config.lock_on_suspend or config.lock_on_session_lock
        ):
            from agent.logind import LogindWatcher

            self._watcher = LogindWatcher(
                self._lock_from_thread,
                suspend=config.lock_on_suspend,
                session_lock=config.lock_on_session_lock,
            )
            self._watcher.start()

    async def stop(self) -> None:
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.stop)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def lock(self, reason: str) -> None:
        """Lock now for ``reason``, unless already locked."""
        if self._keychain.locked:
            return
        limit = {IDLE: self._idle, MAX_UNLOCKED: self.max_unlocked}.get(reason)
        self._locking = True
        try:
            self._keychain.lock()
        finally:
            self._locking = False
        self.reason = reason
        if limit is None:
            log.info(_LOG_LINES[reason])
        else:
            log.info(_LOG_LINES[reason], _seconds(limit))
        if self._on_lock is not None:
            self._on_lock(reason)

    def _lock_from_thread(self, reason: str) -> None:
        """``lock`` for the logind thread: done on the loop, returns once it is done."""
        assert self._loop is not None

        async def lock() -> None:
            self.lock(reason)

        future = asyncio.run_coroutine_threadsafe(lock(), self._loop)
        future.result(timeout=_LOCK_FROM_THREAD_TIMEOUT)

    def _changed(self) -> None:
        """The keychain locked, unlocked or reloaded: re-plan, and track why it locked."""
        locked = self._keychain.locked
        if locked and not self._was_locked and not self._locking:
            self.reason = REQUEST
        elif not locked:
            self.reason = None
        self._was_locked = locked
        self._wake.set()

    def _deadline(self, now: float) -> float | None:
        """When the agent will lock if nothing happens, or None (locked, or no limit)."""
        unlocked_at = self._keychain.unlocked_at
        if self._keychain.locked or unlocked_at is None:
            return None
        deadlines = []
        if self._idle:
            deadlines.append(max(self._last_active, unlocked_at) + self._idle)
        if self.max_unlocked:
            deadlines.append(unlocked_at + self.max_unlocked)
        return min(deadlines) if deadlines else None

    async def _run(self) -> None:
        traffic = self._traffic
        seen = traffic.requests_served
        while True:
            self._wake.clear()
            now = time.monotonic()
            count = traffic.requests_served
            if count != seen or traffic.busy():
                seen, self._last_active = count, now
            wait: float | None = None
            unlocked_at = self._keychain.unlocked_at
            if not self._keychain.locked and unlocked_at is not None:
                limit = self.max_unlocked
                if self._idle and now - max(self._last_active, unlocked_at) >= self._idle:
                    self.lock(IDLE)
                    continue
                if limit and now - unlocked_at >= limit:
                    self.lock(MAX_UNLOCKED)
                    continue
                deadline = self._deadline(now)
                if deadline is not None:
                    wait = deadline - now
                    if self._idle:
                        wait = min(wait, self._poll)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def describe(self) -> dict[str, Any]:
        """For ``agentctl status``: the settings in force, the next lock, the last reason."""
        now = time.monotonic()
        deadline = self._deadline(now)
        watching = self._watcher is not None and self._watcher.watching
        return {
            "lock_after_idle": self._idle or None,
            "max_unlocked": self.max_unlocked or None,
            "lock_on_suspend": watching and self._config.lock_on_suspend,
            "lock_on_session_lock": watching and self._config.lock_on_session_lock,
            "locks_in": None if deadline is None else round(max(deadline - now, 0.0), 3),
            "last_lock": self.reason,
        }
