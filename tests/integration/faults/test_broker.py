"""Scenario 3: broker faults that hit every connection: `rabbitmqctl close_all_connections`
mid-run, and a full `stop_app` / `start_app`. The replicas recover by themselves, nothing is
lost, and retries waiting in the delay queues through the fault still arrive.

Both faults disturb every user of the broker, so they run under the exclusive broker lock,
and a stopped broker is started again in a `finally`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from worker.tooling.demo_provider import Rule

from .conftest import Fleet, batch, rabbitmqctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RETRIED = 200  # messages whose first attempt fails and waits 4 s in the delay queue


async def load(fleet: Fleet) -> None:
    """Two replicas busy with 1,000 messages, some of them waiting as delayed retries."""
    fleet.provider.latency_ms = 20
    fleet.provider.set_rules([Rule(audience="r", status=503, times=RETRIED)])
    # Partition health off: the retries are to wait in the delay queues through the fault (a
    # partition parked in PostgreSQL across a broker restart is test_partitions.py's).
    await fleet.start(2, WORKER_BACKOFF_BASE_SECONDS="4", WORKER_BREAKER_FAILURES="0")
    messages = [*batch(800, "B"), *batch(RETRIED, "BR", audience="r")]
    random.shuffle(messages)
    await fleet.publish(messages)

    async def under_way() -> bool:
        return await fleet.finished_count() >= 250

    await wait_until(under_way, 30, "the run under way")


@dataclass
class Fault:
    started: float = 0.0  # monotonic, as the provider's records
    ended: float = 0.0
    ended_at: datetime | None = None
    lock_wait: float = 0.0  # other users of the broker finishing first

    def begin(self) -> None:
        self.started = time.monotonic()

    def end(self) -> None:
        self.ended, self.ended_at = time.monotonic(), datetime.now(UTC)


@asynccontextmanager
async def broker_fault(fleet: Fleet) -> AsyncIterator[Fault]:
    fault = Fault()
    # taken before the load: waiting for it while the load ran would let the run end first
    async with fleet.lock.exclusive() as fault.lock_wait:
        try:
            yield fault
        finally:
            if fault.ended_at is None:  # the test failed mid-fault: start the broker again
                await rabbitmqctl("start_app")
                await rabbitmqctl("await_startup")
    await fleet.forget_connection()


async def finish_and_verify(fleet: Fleet, fault: Fault, name: str) -> None:
    unfinished = len(fleet.published) - await fleet.finished_count()
    probes = batch(20, "PROBE")
    await fleet.publish(probes)  # new work after the fault: the replicas consume again
    await fleet.wait_finished(timeout=60)
    for replica in fleet.replicas:
        replica.check_alive()  # recovered by themselves, never restarted
    rows = await fleet.rows(
        "SELECT min(updated_at) AS first FROM deliveries WHERE idempotency_key = ANY(:keys)",
        keys=[p.key for p in probes],
    )
    assert fault.ended_at is not None
    recovery = (rows[0].first - fault.ended_at).total_seconds()
    figures = await fleet.verify(allowed_duplicates=2 * 16)  # answers in flight at the fault
    # retries that waited in the delay queues through the fault, and were sent after it
    failed_before = {
        r.key for r in fleet.provider.requests if r.status == 503 and r.at < fault.started
    }
    crossed = {
        r.key for r in fleet.provider.requests if r.status == 200 and r.at > fault.ended
    } & failed_before
    assert crossed
    fleet.report(
        figures,
        fault=name,
        retries_across_the_fault=len(crossed),
        unfinished_at_fault_end=unfinished,
        first_new_message_finished_after_s=round(recovery, 1),
        waited_for_exclusive_broker_lock_s=round(fault.lock_wait, 1),
    )


async def test_close_all_connections_mid_run(fleet: Fleet) -> None:
    async with broker_fault(fleet) as fault:
        await load(fleet)
        fault.begin()
        await rabbitmqctl("close_all_connections", "fault test: all connections closed")
        fault.end()
    await finish_and_verify(fleet, fault, "close_all_connections")


async def test_broker_stop_and_start(fleet: Fleet) -> None:
    async with broker_fault(fleet) as fault:
        await load(fleet)
        fault.begin()
        await rabbitmqctl("stop_app")
        await asyncio.sleep(3)
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")
        fault.end()
    await finish_and_verify(fleet, fault, "stop_app 3 s, start_app")
