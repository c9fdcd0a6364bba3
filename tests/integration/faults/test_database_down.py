"""Scenario 4: the test's database refuses every connection for about 20 s mid-run.

The replicas stop taking messages instead of failing them (nothing is sent, the queues hold
their messages), say so on /readyz, never ack what they could not record, and resume by
themselves when the database is back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest

from ..test_database_outage import _set_reachable as set_database_reachable
from .conftest import Fleet, batch, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

OUTAGE_SECONDS = 20


async def ready(fleet: Fleet) -> list[int]:
    """Each replica's /readyz status."""
    async with aiohttp.ClientSession() as http:
        statuses = []
        for port in fleet.metrics_ports.values():
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                statuses.append(response.status)
        return statuses


async def waiting_on_broker(fleet: Fleet) -> int:
    """Messages ready on the ingress and work queues."""
    channel = await fleet.channel()
    total = 0
    for name in (fleet.names.ingress, fleet.names.queue):
        queue = await channel.declare_queue(name, passive=True)
        total += int(queue.declaration_result.message_count or 0)
    return total


async def test_database_outage_holds_messages_and_recovers(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 50
    await fleet.start(2, metrics=True)
    await fleet.publish(batch(600, "DB"))

    async def under_way() -> bool:
        return await fleet.finished_count() >= 100

    await wait_until(under_way, 30, "the run under way")
    await fleet.engine.dispose()  # the test's own sessions would be cut too
    await set_database_reachable(fleet.database_url, False)
    try:
        await asyncio.sleep(3)  # calls in flight at the cut come back, and meet the gate
        assert await ready(fleet) == [503, 503]
        requests, waiting = len(fleet.provider.requests), await waiting_on_broker(fleet)
        await asyncio.sleep(OUTAGE_SECONDS - 3)
        # nothing taken, nothing sent, nothing failed: the broker still holds every message
        assert len(fleet.provider.requests) == requests
        assert await waiting_on_broker(fleet) == waiting
        assert await ready(fleet) == [503, 503]
    finally:
        await set_database_reachable(fleet.database_url, True)
    back = datetime.now(UTC)
    await fleet.wait_finished(timeout=60)
    recovery = await fleet.finished_since(back)

    async def all_ready() -> bool:
        return await ready(fleet) == [200, 200]

    await wait_until(all_ready, 10, "/readyz 200 again")
    for replica in fleet.replicas:
        replica.check_alive()
    # An answer that came back while the database was away could not be recorded; its message
    # was held, returned, and its resend answered 409: at most one per message in flight.
    figures = await fleet.verify(allowed_duplicates=2 * 16)
    fleet.report(
        figures,
        outage_s=OUTAGE_SECONDS,
        waiting_on_broker_during_outage=waiting,
        first_finished_after_s=None if recovery is None else round(recovery, 1),
        database_unavailable_events=len(fleet.events("database_unavailable")),
    )
