"""A retry the broker does not bring back is republished from PostgreSQL (worker.overdue).

The broker's loss is made real: the retry's delay level is purged while the retry waits in it,
as RabbitMQ 3.10.8 leaves a dead-letter hop unsent across a failover; the lost retry carries
headers PostgreSQL could not hold as text or int4 (a NUL, 2^40, raw bytes). A retry that comes
back in time is never republished, and its copy is deleted once its key is finished.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest

from worker.tooling.demo_provider import Rule

from .conftest import Fleet, batch, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# constant backoff of 4 s: the delay level of bit 2 alone (worker.delay's cascade)
ENV = {"WORKER_BACKOFF_BASE_SECONDS": "4", "WORKER_RETRY_OVERDUE_SECONDS": "2"}
LEVEL = 2


async def test_a_retry_the_broker_lost_is_republished_and_sent(fleet: Fleet) -> None:
    fleet.provider.set_rules([Rule(audience="x", status=503, times=1)])
    fleet.env.update(ENV)
    await fleet.start(1)
    (message,) = batch(1, "LOST", audience="x")
    channel = await fleet.channel()
    # headers PostgreSQL could not hold as text or int4, carried with the retry and its copy
    exchange = await channel.get_exchange(fleet.source_exchange)
    headers: dict[str, Any] = {
        "x-note": "a\x00b",
        "x-big": 2**40,
        "x-raw": bytearray(b"\xff\xfe\x00"),
    }
    await exchange.publish(
        aio_pika.Message(message.body, content_type=message.content_type, headers=headers),
        routing_key="prices.fault",
    )
    fleet.published.append(message)
    level = await channel.get_queue(fleet.names.delay_level(LEVEL))

    async def waiting_in_level() -> bool:
        return bool((await level.declare()).message_count == 1)

    await wait_until(waiting_in_level, 20, "the retry waiting in its delay level")
    assert await level.purge()  # the broker loses it
    await fleet.wait_finished(timeout=30)

    first, second = fleet.provider.requests
    assert (first.status, second.status) == (503, 200)
    # due 4 s after the failure, overdue 2 s later, found by a sweep (every 0.5 s)
    assert second.at - first.at >= 4 + 2
    (recovered,) = fleet.events("retry_recovered")
    assert recovered["idempotency_key"] == message.key
    assert recovered["attempt"] == 1
    figures = await fleet.verify()
    fleet.report(figures, recovered_after_s=round(second.at - first.at, 1))


async def test_a_retry_back_in_time_is_not_republished_and_its_copy_is_deleted(
    fleet: Fleet,
) -> None:
    messages = batch(5, "BACK", audience="x")
    fleet.provider.set_rules([Rule(audience="x", status=503, times=len(messages))])
    fleet.env.update(ENV)
    await fleet.start(1)
    await fleet.publish(messages)
    await fleet.wait_finished(timeout=30)
    assert await fleet.rows("SELECT 1 FROM retry_watch")  # kept until overdue

    async def copies_deleted() -> bool:
        return not await fleet.rows("SELECT 1 FROM retry_watch")

    await wait_until(copies_deleted, 20, "the finished keys' copies deleted")
    assert not fleet.events("retry_recovered")
    assert len(fleet.provider.requests) == 2 * len(messages)
    figures = await fleet.verify()
    fleet.report(figures)
