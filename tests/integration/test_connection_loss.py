"""A message in flight when the broker connection drops still finishes and is recorded."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from .conftest import Harness, price_change
from .test_outcomes import key_of

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to close connections"
)


async def close_replica_connections(queue: str) -> None:
    """Have the broker close the connections of the replicas serving ``queue`` (and only
    those: other test runs on this broker are left alone)."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "list_connections",
        "pid",
        "client_properties",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await listing.communicate()
    pids = [
        line.split("\t", 1)[0]
        for line in out.decode().splitlines()
        if f'"worker {queue} pid' in line
    ]
    assert pids, f"no replica connection for {queue}"
    for pid in pids:
        closing = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "close_connection", pid, "test: connection lost mid-send"
        )
        assert await closing.wait() == 0


async def test_in_flight_send_is_recorded_when_the_connection_drops(harness: Harness) -> None:
    harness.provider.latency_ms = 1500
    await harness.start()
    body = price_change()
    await harness.publish(body)

    await harness.wait_for_requests(1, what="the provider call")
    await close_replica_connections(harness.names.queue)
    await harness.wait_finished(1)

    row = await harness.delivery(key_of(body))
    # Recorded from the answer of the call in flight, not from a second request after the
    # lease expired (which the provider would have answered 409).
    assert (row.status, row.provider_status) == ("sent", 200)
    await asyncio.sleep(2)  # the redelivered copy, once the replica reconnects
    assert [r.status for r in harness.provider.requests] == [200]
