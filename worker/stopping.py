"""Waiting that a stop request cuts short: the one shape of "retry X until stopped"."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


async def pause_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def within(awaitable: Awaitable[object], seconds: float) -> bool:
    """Await ``awaitable`` for at most ``seconds`` (then it is cancelled); True if it ended.

    For the steps of a shutdown that a broker outage could hold up forever (cancelling a
    consumer, a ``basic.get`` waiting for the reconnect).
    """
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True
