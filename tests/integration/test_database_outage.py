"""While PostgreSQL is unreachable the replica takes no message, fails none, is not ready,
and resumes by itself when the database is back."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
from structlog.testing import capture_logs

from .conftest import PG_ADMIN_DSN, Harness, price_change
from .test_health import free_port, sample

RETURNED = 'notifications_returned_total{cause="database"}'


async def _set_reachable(database_url: str, reachable: bool) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
        if not reachable:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await admin.close()


async def test_outage_holds_messages_and_recovers(harness: Harness) -> None:
    port = free_port()
    await harness.start(metrics_port=port, concurrency=4)
    async with aiohttp.ClientSession() as http:
        before = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
    await harness.engine.dispose()  # the test's own connections would be cut too
    await _set_reachable(harness.database_url, False)
    with capture_logs() as events:
        await _hold_during_outage(harness, port, before)
    await harness.wait_finished(10, timeout=30)
    assert sorted(r.status for r in harness.provider.requests) == [200] * 10
    rows = await harness.rows("SELECT count(*) AS n FROM dead_letters")
    assert rows[0].n == 0
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status == 200
    names = [event["event"] for event in events]
    assert names.count("database_unavailable") == 1
    assert "returned_to_queue" not in names


async def _hold_during_outage(harness: Harness, port: int, before: str) -> None:
    try:
        for index in range(10):
            await harness.publish(price_change(ticker=f"DB{index}"))
        await asyncio.sleep(3)
        async with aiohttp.ClientSession() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status == 503
            metrics = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        assert harness.provider.requests == []
        # held at the gate, not cycled through the queue
        assert sample(metrics, RETURNED) == sample(before, RETURNED)
        channel = await harness.channel()
        ingress = await channel.declare_queue(harness.names.ingress, passive=True)
        work = await channel.declare_queue(harness.names.queue, passive=True)
        # The replica holds its prefetch of fresh messages (two rounds of its 4 slots) unacked
        # and takes no more: the other two still wait in the queue. Nothing was acked or failed.
        assert ingress.declaration_result.message_count == 10 - 2 * 4
        assert work.declaration_result.message_count == 0
    finally:
        await _set_reachable(harness.database_url, True)
