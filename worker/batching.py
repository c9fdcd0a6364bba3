"""Group commit: concurrent calls of one statement coalesced into one multi-row round trip.

While a batch is at the database, the calls that arrive wait together and go as the next
batch. With one message in flight a call runs at once, alone; under load each round trip
carries as many rows as there are messages at that step, so the per-statement cost (a round
trip, a commit, the driver's and SQLAlchemy's work) is paid once per batch instead of once per
message. Each batch is one statement: it commits or fails as a whole. A failure that one item
may be to blame for (``isolate`` says which: for the store, the database refusing a row's
data) is not handed to the whole batch: the batch is split in halves and each half run again,
down to the one item that fails on its own, so that one message's bad data fails no other
message; any other failure reaches every caller of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Runs one batch on one lane (0 … lanes-1): a lane is what a batch in flight holds, such as a
# database connection of its own.
BatchRunner = Callable[[Sequence[Item], int], Awaitable[Sequence[Result]]]


class Batcher(Generic[Item, Result]):
    """Runs ``run`` on up to ``max_size`` items at a time, at most ``lanes`` batches in flight.

    ``run`` gets the items in arrival order and returns one result per item, in that order.
    More than one lane lets a batch start while another waits for its commit to be flushed,
    so that the statement's throughput is not one commit at a time.
    """

    def __init__(
        self,
        run: BatchRunner[Item, Result],
        max_size: int,
        lanes: int = 1,
        isolate: Callable[[Exception], bool] | None = None,
    ) -> None:
        if max_size < 1 or lanes < 1:
            raise ValueError("max_size and lanes must be at least 1")
        self._run = run
        self._isolate = isolate
        self._max_size = max_size
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._free_lanes = list(range(lanes))
        self._flushers: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._free_lanes:
            # a task, not a call: the calls made in this same turn of the loop join the batch
            flusher = asyncio.create_task(self._flush(self._free_lanes.pop()))
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return await future

    async def _flush(self, lane: int) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_size]
                del self._waiting[: self._max_size]
                await self._run_batch(batch, lane)
        finally:
            self._free_lanes.append(lane)

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]], lane: int) -> None:
        try:
            results = await self._run([item for item, _ in batch], lane)
        except asyncio.CancelledError:
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()
            raise
        except Exception as exc:  # noqa: BLE001 — handed to every caller, who handles it
            if len(batch) > 1 and self._isolate is not None and self._isolate(exc):
                middle = len(batch) // 2
                await self._run_batch(batch[:middle], lane)
                await self._run_batch(batch[middle:], lane)
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if len(results) != len(batch):
            error = RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(result)
