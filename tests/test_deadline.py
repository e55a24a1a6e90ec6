"""The relay's deadline: stored times, a loop timer armed at most a horizon ahead."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from agent.forward.deadline import Deadline


async def fired_after(deadline_moves, horizon: float, within: float) -> float | None:
    """Seconds until the callback ran (None: not within ``within``)."""
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    deadline = Deadline(loop, fired.set, horizon)
    start = loop.time()
    deadline_moves(deadline)
    try:
        async with asyncio.timeout(within):
            await fired.wait()
    except TimeoutError:
        return None
    finally:
        deadline.close()
    return loop.time() - start


def run(coro):
    return uvloop.run(coro)


def test_it_fires_at_its_time_though_the_horizon_is_shorter() -> None:
    took = run(fired_after(lambda d: d.set(0.3), horizon=0.05, within=2))
    assert took is not None and 0.29 <= took < 1.0


def test_a_later_time_replaces_an_earlier_one() -> None:
    def moves(d: Deadline) -> None:
        d.set(0.05)
        d.set(0.3)

    took = run(fired_after(moves, horizon=0.05, within=2))
    assert took is not None and took >= 0.29


def test_an_earlier_time_than_the_horizon_rearms_the_timer() -> None:
    def moves(d: Deadline) -> None:
        d.set(5.0)
        d.set(0.05)

    took = run(fired_after(moves, horizon=1.0, within=2))
    assert took is not None and took < 0.5


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_cancelled_deadline_never_fires(how: str) -> None:
    def moves(d: Deadline) -> None:
        d.set(0.05)
        getattr(d, how)()

    assert run(fired_after(moves, horizon=0.05, within=0.3)) is None


def test_it_can_be_set_again_after_firing() -> None:
    async def twice() -> float | None:
        loop = asyncio.get_running_loop()
        fired = asyncio.Event()
        deadline = Deadline(loop, fired.set, 0.05)
        deadline.set(0.05)
        await asyncio.wait_for(fired.wait(), 2)
        fired.clear()
        start = loop.time()
        deadline.set(0.1)
        await asyncio.wait_for(fired.wait(), 2)
        deadline.close()
        return loop.time() - start

    took = run(twice())
    assert took is not None and took >= 0.09
