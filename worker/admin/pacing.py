"""``replay --rate N``: at most N messages per second, paced batch by batch.

A token bucket whose capacity is one batch: a batch of n messages that started at time t lets
the next batch start at t + n/N, or at once if the batch itself took longer. The replay never
sleeps inside a batch's transaction (the pause is before the next batch selects its rows), and
the command line keeps a batch no larger than N, so a burst is at most one second's worth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Pacer:
    """Paces batches to ``rate`` messages per second; ``None`` means as fast as possible."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._started = 0.0
        self._next = float("-inf")

    async def wait(self) -> None:
        """Before a batch: until the messages of the batches before it have been paid for."""
        if self._rate is None:
            return
        now = self._clock()
        if self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._started = now

    def spent(self, count: int) -> None:
        """After a batch of ``count`` messages."""
        if self._rate is not None:
            self._next = self._started + count / self._rate
