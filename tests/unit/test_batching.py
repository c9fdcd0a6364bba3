"""Group commit: calls made while a batch is in flight go together in the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker.batching import Batcher


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.lanes: list[int] = []
        self.fail_on = fail_on
        self.release = asyncio.Event()
        self.release.set()

    async def run(self, items: Sequence[int], lane: int) -> list[int]:
        self.lanes.append(lane)
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [item * 10 for item in items]


async def test_a_lone_call_runs_alone_and_gets_its_result() -> None:
    recorder = Recorder()
    assert await Batcher(recorder.run, 8).submit(3) == 30
    assert recorder.batches == [[3]]


async def test_calls_during_a_batch_go_together_in_the_next_one() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, 8)
    recorder.release.clear()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # the first batch is now at the "database"
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await first == 10
    assert [await task for task in rest] == [20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_batches_are_capped_at_max_size() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, 2)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1], [2, 3], [4]]


async def test_a_failed_batch_fails_each_of_its_callers_and_only_them() -> None:
    recorder = Recorder(fail_on=2)
    batcher = Batcher(recorder.run, 2)
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert outcomes[0] == 0
    assert isinstance(outcomes[2], ValueError)
    assert isinstance(outcomes[3], ValueError)
    assert outcomes[1] == 10


async def test_a_cancelled_caller_leaves_the_batch_to_the_others() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, 8)
    recorder.release.clear()
    doomed = asyncio.create_task(batcher.submit(1))
    kept = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    doomed.cancel()
    recorder.release.set()
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await doomed


async def test_with_two_lanes_a_second_batch_starts_while_the_first_is_in_flight() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, 8, lanes=2)
    recorder.release.clear()
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert recorder.batches == [[1], [2]]  # both at the "database" at once
    assert sorted(recorder.lanes) == [0, 1]
    third = [asyncio.create_task(batcher.submit(n)) for n in (3, 4)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert [await first, await second, *[await t for t in third]] == [10, 20, 30, 40]
    assert recorder.batches[2] == [3, 4]  # waited for a free lane, then went together


@pytest.mark.parametrize(("max_size", "lanes"), [(0, 1), (1, 0)])
def test_max_size_and_lanes_must_be_positive(max_size: int, lanes: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Recorder().run, max_size, lanes)


async def test_an_item_to_blame_is_isolated_and_fails_alone() -> None:
    """A failure ``isolate`` blames on an item splits the batch until that item runs alone:
    every other caller gets its result, only the offender's caller the error."""
    recorder = Recorder(fail_on=5)
    batcher = Batcher(recorder.run, 8, isolate=lambda exc: isinstance(exc, ValueError))
    recorder.release.clear()
    first = asyncio.create_task(batcher.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in range(1, 9)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert [r for r in results if isinstance(r, Exception)] != []
    for n, result in zip(range(1, 9), results, strict=True):
        if n == 5:
            assert isinstance(result, ValueError)
        else:
            assert result == n * 10
    assert [5] in recorder.batches


async def test_a_failure_not_to_blame_on_an_item_fails_the_whole_batch() -> None:
    recorder = Recorder(fail_on=2)
    batcher = Batcher(recorder.run, 8, isolate=lambda exc: False)
    recorder.release.clear()
    first = asyncio.create_task(batcher.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    recorder.release.set()
    await first
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert len(recorder.batches) == 2
