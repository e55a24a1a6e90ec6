"""A re-armable deadline that costs nothing per byte relayed.

Pushing a deadline back only stores a number; the loop's timer is re-armed
when it fires early. Body relays push their idle deadline on every chunk, so
cancelling and creating a timer handle each time would be the costlier way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_callback", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def set(self, delay: float) -> None:
        """Fire ``delay`` seconds from now (replacing any earlier deadline)."""
        self._when = self._loop.time() + delay
        if self._handle is None:
            self._handle = self._loop.call_at(self._when, self._fire)
        elif self._handle.when() > self._when:  # moved earlier: re-arm now
            self._handle.cancel()
            self._handle = self._loop.call_at(self._when, self._fire)

    def cancel(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if self._when is None:
            return
        if self._loop.time() < self._when:
            self._handle = self._loop.call_at(self._when, self._fire)
            return
        self._when = None
        self._callback()
