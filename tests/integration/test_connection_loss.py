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


async def test_in_flight_send_is_recorded_when_the_connection_drops(harness: Harness) -> None:
    harness.provider.latency_ms = 1500
    await harness.start()
    body = price_change()
    await harness.publish(body)

    async def provider_called() -> bool:
        return len(harness.provider.requests) == 1

    await harness.wait_for(provider_called, what="the provider call")
    closing = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "close_all_connections", "test: connection lost mid-send"
    )
    assert await closing.wait() == 0
    await harness.wait_finished(1)

    row = await harness.delivery(key_of(body))
    # Recorded from the answer of the call in flight, not from a second request after the
    # lease expired (which the provider would have answered 409).
    assert (row.status, row.provider_status) == ("sent", 200)
    await asyncio.sleep(2)  # the redelivered copy, once the replica reconnects
    assert [r.status for r in harness.provider.requests] == [200]
