"""SIGTERM while the broker is down: the replica must not wait for the reconnect (cancelling
its consumer, a basic.get of the retry dispatcher) but exit 0 within its grace; once the broker
is back nothing is lost."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import Fleet, batch, rabbitmqctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GRACE_SECONDS = 5


async def test_sigterm_during_a_broker_outage_exits_zero_within_the_grace(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 200
    await fleet.start(1, WORKER_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS))
    async with fleet.lock.exclusive():
        await fleet.publish(batch(200, "SO"))

        async def under_way() -> bool:
            return len(fleet.provider.requests) >= 20

        await wait_until(under_way, 30, "the run under way")
        try:
            await rabbitmqctl("stop_app")
            await asyncio.sleep(1)  # the replica notices and starts reconnecting
            started = time.monotonic()
            code = await fleet.replicas[0].stop(timeout=GRACE_SECONDS + 10)
            seconds = time.monotonic() - started
        finally:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
    await fleet.forget_connection()
    assert code == 0, "killed: the shutdown waited for the broker"
    assert seconds < GRACE_SECONDS + 4  # the grace, the connection's close, the process's exit

    await fleet.restart(fleet.replicas[0])
    await fleet.wait_finished(timeout=90)
    figures = await fleet.verify(allowed_duplicates=16)  # answers in flight at the outage
    fleet.report(figures, exit_status=code, exit_after_s=round(seconds, 1), grace_s=GRACE_SECONDS)
