"""Scenario 7: SIGTERM to a replica full of work in flight: it exits 0 within its grace
period, and nothing is lost or sent twice."""

from __future__ import annotations

import time

import pytest

from .conftest import Fleet, batch, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

GRACE_SECONDS = 10
CONCURRENCY = 16


async def test_sigterm_under_load_drains_and_exits_zero(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 500
    await fleet.start(
        2,
        WORKER_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        WORKER_CONCURRENCY=str(CONCURRENCY),
    )
    await fleet.publish(batch(300, "SD"))

    async def both_full() -> bool:  # every slot of both replicas has a call open
        return len(fleet.provider.requests) >= 2 * CONCURRENCY

    await wait_until(both_full, 30, "both replicas full")
    replica = fleet.replicas[0]
    started = time.monotonic()
    code = await replica.stop(timeout=GRACE_SECONDS + 5)  # None: it had to be killed
    seconds = time.monotonic() - started
    assert code == 0
    stopping = [e for e in fleet.events("stopping") if e["replica"] == replica.number]
    assert stopping[0]["in_flight"] > 0
    assert fleet.events("returned_unfinished") == []  # all of it finished within the grace
    await fleet.restart(replica)
    await fleet.wait_finished()

    figures = await fleet.verify()
    assert figures.duplicates == 0  # nothing sent twice
    assert figures.requests == 300  # one request per message: none was redone
    codes = [await r.stop() for r in fleet.replicas]
    assert codes == [0, 0]
    fleet.report(
        figures,
        in_flight_at_sigterm=stopping[0]["in_flight"],
        exit_status=code,
        exit_after_s=round(seconds, 1),
        grace_s=GRACE_SECONDS,
    )
