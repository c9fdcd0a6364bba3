"""The scheduler's slots: fresh messages first, a retry only for a slot no fresh one wants."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from worker.scheduler import FETCHES_AT_ONCE, Scheduler


class FakeRetries:
    """The work queue as basic.get sees it: highest priority first, None when empty."""

    def __init__(self, *messages: str) -> None:
        self.waiting = deque(messages)
        self.gets = 0

    async def get(self, *, no_ack: bool, fail: bool) -> str | None:
        assert not no_ack
        assert not fail
        self.gets += 1
        return self.waiting.popleft() if self.waiting else None


class Harness:
    def __init__(self, slots: int, *retries: str) -> None:
        self.retries = FakeRetries(*retries)
        self.started: list[str] = []
        self.scheduler = Scheduler(slots, [cast(AbstractQueue, self.retries)], self._start)
        self.task: asyncio.Task[None] | None = None

    def _start(self, incoming: AbstractIncomingMessage) -> None:
        self.started.append(cast(Any, incoming))

    async def offer(self, *fresh: str) -> None:
        for name in fresh:
            await self.scheduler.offer(cast(AbstractIncomingMessage, name))

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.scheduler.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.scheduler.close()
        await asyncio.wait_for(self.task, timeout=1)  # returns by itself, not cancelled


async def test_fresh_messages_take_the_slots_before_any_retry() -> None:
    harness = Harness(2, "retry-1", "retry-2")
    await harness.offer("fresh-1", "fresh-2", "fresh-3")
    async with harness:
        await harness.settle()
        assert harness.started == ["fresh-1", "fresh-2"]  # two slots, both fresh
        harness.scheduler.release()
        await harness.settle()
        assert harness.started[2] == "fresh-3"
        assert harness.retries.gets == 0  # no retry fetched while fresh ones waited


async def test_a_spare_slot_fetches_a_retry() -> None:
    harness = Harness(2, "retry-1", "retry-2", "retry-3")
    await harness.offer("fresh-1")
    async with harness:
        await harness.settle()
        assert harness.started == ["fresh-1", "retry-1"]
        harness.scheduler.release()
        await harness.offer("fresh-2")  # arrives while a retry is still waiting
        await harness.settle()
        assert harness.started[2] == "fresh-2"
        assert list(harness.retries.waiting) == ["retry-2", "retry-3"]


async def test_an_idle_slot_wakes_for_a_fresh_message_without_waiting_for_the_poll() -> None:
    harness = Harness(1)
    async with harness:
        await harness.settle()
        assert harness.started == []
        await harness.offer("fresh-1")
        await harness.settle()  # turns of the loop, no time: not the 50 ms poll
        assert harness.started == ["fresh-1"]


async def test_waiting_fresh_messages_are_handed_back_at_shutdown() -> None:
    harness = Harness(1)
    await harness.offer("fresh-1", "fresh-2")
    async with harness:
        await harness.settle()
    assert harness.started == ["fresh-1"]
    assert cast(list[Any], harness.scheduler.take_waiting()) == ["fresh-2"]
    assert harness.scheduler.take_waiting() == []


async def test_close_returns_a_dispatcher_that_waits_for_a_slot_or_for_work() -> None:
    busy = Harness(1)
    await busy.offer("fresh-1", "fresh-2")
    async with busy:  # its one slot is taken: run() waits for it when closed
        await busy.settle()
    idle = Harness(1)
    async with idle:  # nothing to do: run() waits for work when closed
        await idle.settle()
    assert busy.started == ["fresh-1"]
    assert idle.started == []


async def test_several_work_queues_are_served_fewest_attempts_first() -> None:
    first, second, third = FakeRetries("a0-1"), FakeRetries("a1-1", "a1-2"), FakeRetries("a2-1")
    started: list[str] = []
    scheduler = Scheduler(
        1,
        [cast(AbstractQueue, q) for q in (first, second, third)],
        lambda incoming: started.append(cast(Any, incoming)),
    )
    task = asyncio.create_task(scheduler.run())
    await scheduler.offer(cast(AbstractIncomingMessage, "fresh"))
    for _ in range(4):
        for _ in range(20):
            await asyncio.sleep(0)
        scheduler.release()
    for _ in range(20):
        await asyncio.sleep(0)
    scheduler.close()
    await asyncio.wait_for(task, timeout=1)
    assert started == ["fresh", "a0-1", "a1-1", "a1-2", "a2-1"][: len(started)]
    assert started[:4] == ["fresh", "a0-1", "a1-1", "a1-2"]


async def test_idle_look_ups_back_off_to_one_round_per_poll_per_queue() -> None:
    queues = [FakeRetries() for _ in range(5)]
    scheduler = Scheduler(1, [cast(AbstractQueue, q) for q in queues], lambda _: None)
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(2.0)
    scheduler.close()
    await asyncio.wait_for(task, timeout=2)
    rounds = queues[0].gets
    # classic polls one queue every 50 ms (40 gets in 2 s); five queues back off to 250 ms
    assert all(q.gets == rounds for q in queues)
    assert rounds * len(queues) <= 2.0 / 0.05 + len(queues) * 3


async def test_a_trickle_of_fresh_messages_does_not_make_a_look_up_each() -> None:
    retries = FakeRetries()
    scheduler = Scheduler(4, [cast(AbstractQueue, retries)], lambda _: scheduler.release())
    task = asyncio.create_task(scheduler.run())
    for n in range(200):  # one every 5 ms, each done at once: the slots are mostly idle
        await scheduler.offer(cast(AbstractIncomingMessage, f"fresh-{n}"))
        await asyncio.sleep(0.005)
    scheduler.close()
    await asyncio.wait_for(task, timeout=2)
    # about a second of it: a look-up per 50 ms poll, not one per fresh message
    assert retries.gets <= 1.5 / 0.05


class SlowRetries(FakeRetries):
    """Each look-up takes a round trip; how many were in flight at once, at most."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.in_flight = 0
        self.most_in_flight = 0

    async def get(self, *, no_ack: bool, fail: bool) -> str | None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.005)
        self.in_flight -= 1
        return await super().get(no_ack=no_ack, fail=fail)


async def test_look_ups_run_side_by_side_while_they_find_retries_and_one_at_a_time_idle() -> None:
    names = [f"retry-{n}" for n in range(40)]
    backlog = SlowRetries(*names)
    started: list[str] = []
    scheduler = Scheduler(
        16, [cast(AbstractQueue, backlog)], lambda m: started.append(cast(Any, m))
    )
    task = asyncio.create_task(scheduler.run())
    done = 0
    while len(started) < len(names):  # each retry handed out is done at once, its slot back
        await asyncio.sleep(0.001)
        for _ in range(len(started) - done):
            scheduler.release()
        done = len(started)
    assert sorted(started) == sorted(names)  # each once
    assert backlog.most_in_flight == FETCHES_AT_ONCE  # side by side, never more
    backlog.most_in_flight = 0
    await asyncio.sleep(0.3)  # nothing left: the look-ups poll
    assert backlog.most_in_flight == 1
    scheduler.close()
    await asyncio.wait_for(task, timeout=1)
