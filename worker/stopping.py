"""Waiting that a stop request cuts short: the one shape of "retry X until stopped"."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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


async def until_stopped(
    stop: asyncio.Event,
    attempt: Callable[[], Awaitable[T]],
    *,
    waits_for: Callable[[Exception], bool],
    on_failure: Callable[[Exception], None],
    pause: float,
) -> T | None:
    """``attempt()`` again every ``pause`` seconds while it fails with an error ``waits_for``
    accepts (the database or the broker not there yet), until it succeeds or ``stop`` is set
    (None). ``on_failure`` says so (a log line); any other error propagates."""
    while not stop.is_set():
        try:
            return await attempt()
        except Exception as exc:
            if not waits_for(exc):
                raise
            on_failure(exc)
        await pause_unless_stopped(stop, pause)
    return None
