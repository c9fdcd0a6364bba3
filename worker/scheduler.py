"""Who runs next: a replica's slots go to fresh messages first, to retries only when spare.

Fresh messages are consumed from the ingress queue (prefetch: two rounds of slots, so that
while fresh messages wait on the broker one is always at hand here). Retries, deferred
messages and replays wait in the priority work queue and are fetched one at a time
(``basic.get``) only for a slot that no fresh message wants; the work queue's priority then
hands out fewer attempts before more. So new messages are served before retries, and
fewer attempts before more, whenever both wait (SPEC §7), without moving every new message
through a second queue.

Quorum mode has no priority queue: the work queue's priorities are a list of queues, one per
attempt, and a spare slot takes the head of the first non-empty one, fewest attempts first
(classic mode: a list of one). With nothing anywhere the look-ups back off, up to one round
of the list per ``POLL_SECONDS`` per queue, so an idle replica asks the broker no more often
than with the one classic queue; and a round that found nothing stands until its poll is over,
whatever fresh messages come meanwhile (under a trickle of them, it was one round per message).
While look-ups find retries, up to ``FETCHES_AT_ONCE`` run at once, each for a slot of its own:
one at a time, a look-up's round trip capped a replica's retries at a few hundred a second (a
healed partition's released backlog waited on it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from worker.errors import describe_error

log = structlog.get_logger("worker.scheduler")

# With nothing to do, look for retries this often (a retry's delay is at least a second).
POLL_SECONDS = 0.05
# After the broker failed a fetch (e.g. while reconnecting), try again after this pause.
_FETCH_ERROR_PAUSE_SECONDS = 1.0
# Look-ups in flight at once while they find retries (with nothing found: one).
FETCHES_AT_ONCE = 4

Start = Callable[[AbstractIncomingMessage], None]


class Scheduler:
    def __init__(self, slots: int, retries: Sequence[AbstractQueue], start: Start) -> None:
        """``start`` runs a message in one slot and must call :meth:`release` when done;
        ``retries``: the work queues in the order to serve them (classic mode: one)."""
        self._free = asyncio.Semaphore(slots)
        self._retries = list(retries)
        # empty rounds wait POLL_SECONDS, doubling up to this (one queue: no backoff)
        self._max_poll = POLL_SECONDS * len(self._retries)
        self._start = start
        self._fresh: deque[AbstractIncomingMessage] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._found = False  # the last look-up found a retry: the next may run beside others
        self._poll = POLL_SECONDS  # the wait after an empty look-up: doubles, up to _max_poll
        self._empty_until = 0.0  # loop time until which the last empty look-up stands
        self._fetches: set[asyncio.Task[None]] = set()  # look-ups ahead, a slot each

    async def offer(self, incoming: AbstractIncomingMessage) -> None:
        """The ingress consumer's callback: a fresh message waits here for a slot."""
        self._fresh.append(incoming)
        self._arrived.set()

    def release(self) -> None:
        self._free.release()

    def take_waiting(self) -> list[AbstractIncomingMessage]:
        """The messages that never got a slot (to hand back at shutdown)."""
        waiting = list(self._fresh)
        self._fresh.clear()
        return waiting

    def close(self) -> None:
        """Hand out no more slots: :meth:`run` returns at its next step (not by cancelling it:
        a ``basic.get`` cancelled half-way may lose its cancellation or its channel)."""
        self._closed = True
        self._arrived.set()
        self._free.release()  # wakes a run() waiting for a slot

    async def run(self) -> None:
        """Hand out slots until closed (and the look-ups ahead are back)."""
        try:
            while True:
                await self._free.acquire()
                ahead = self._found and not (self._fresh or self._closed)
                if ahead and len(self._fetches) < FETCHES_AT_ONCE - 1:
                    fetch = asyncio.create_task(self._fetch_ahead())
                    self._fetches.add(fetch)
                    fetch.add_done_callback(self._fetched)
                    continue
                incoming = None if self._closed else await self._next()
                if incoming is None:
                    return
                self._hand_out(incoming)
        finally:
            if self._fetches:
                await asyncio.wait(set(self._fetches))

    def _hand_out(self, incoming: AbstractIncomingMessage) -> None:
        if self._closed:  # fetched as it closed: back with the waiting ones
            self._fresh.appendleft(incoming)
        else:
            self._start(incoming)

    async def _next(self) -> AbstractIncomingMessage | None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if self._fresh:
                return self._fresh.popleft()
            self._arrived.clear()
            # An empty look-up stands for its poll: a slot freed meanwhile (under a trickle of
            # fresh messages, after each one) waits for a fresh message or the poll, instead of
            # asking the broker again at once.
            if loop.time() >= self._empty_until:
                retry = await self._look_up()
                if retry is not None:
                    return retry
                self._empty_until = loop.time() + self._poll
                self._poll = min(self._poll * 2, self._max_poll)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), self._empty_until - loop.time())
        return None

    async def _fetch_ahead(self) -> None:
        """A look-up for the slot taken, beside others: start what it finds, else give the
        slot back (to a fresh message, or to the one look-up that polls)."""
        retry = None
        try:
            retry = await self._look_up()
        finally:
            if retry is None:
                self._free.release()
        if retry is not None:
            self._hand_out(retry)

    def _fetched(self, fetch: asyncio.Task[None]) -> None:
        # a broker error is handled in _fetch_retry; anything else is a bug, said so here
        # (its slot is back already) instead of a task exception nobody retrieves
        self._fetches.discard(fetch)
        if not fetch.cancelled() and (exc := fetch.exception()) is not None:
            log.error("retry_fetch_crashed", error=describe_error(exc))

    async def _look_up(self) -> AbstractIncomingMessage | None:
        """The head of the first non-empty work queue, fewest attempts first."""
        for queue in self._retries:
            retry = await self._fetch_retry(queue)
            if retry is not None:
                self._found = True
                self._poll, self._empty_until = POLL_SECONDS, 0.0
                return retry
        self._found = False
        return None

    async def _fetch_retry(self, queue: AbstractQueue) -> AbstractIncomingMessage | None:
        try:
            return await queue.get(no_ack=False, fail=False)
        except (AMQPError, ChannelInvalidStateError, OSError) as exc:
            log.warning("retry_fetch_failed", error=describe_error(exc))
            await asyncio.sleep(_FETCH_ERROR_PAUSE_SECONDS)
            return None
