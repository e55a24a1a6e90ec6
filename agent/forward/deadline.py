"""A re-armable deadline that costs one clock read when it is moved.

A client connection moves its deadline several times per request (head,
response, body, keep-alive). Cancelling and creating a loop timer each time
would cost more than the rest of the request's bookkeeping, so ``set`` only
stores a time. The loop's timer is never armed further ahead than
``horizon``, the shortest delay the owner ever sets: then no ``set`` can ask
for an earlier time than the armed one, and a timer that fires before the
deadline just re-arms itself. An idle connection thus wakes once per horizon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_callback", "_handle", "_horizon", "_loop", "_when")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], horizon: float
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._horizon = horizon
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def set(self, delay: float) -> None:
        """Fire ``delay`` seconds from now (replacing any earlier deadline)."""
        when = self._loop.time() + delay
        self._when = when
        if self._handle is None:
            self._arm(when)
        elif delay < self._horizon and self._handle.when() > when:
            self._handle.cancel()
            self._arm(when)

    def cancel(self) -> None:
        """No deadline; the armed timer, if any, fires once and does nothing."""
        self._when = None

    def close(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        self._handle = self._loop.call_at(min(when, self._loop.time() + self._horizon), self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:
            self._arm(when)
            return
        self._when = None
        self._callback()
