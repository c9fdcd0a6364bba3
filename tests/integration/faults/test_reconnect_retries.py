"""After a reconnect, messages of the closed channel publish no retry: the broker has requeued
them already, and a retry published for each would start a second retry chain for its key
(more provider calls than WORKER_MAX_ATTEMPTS, two chains racing for one key)."""

from __future__ import annotations

import pytest

from worker.tooling.demo_provider import Rule

from .conftest import Fleet, batch, per_key, rabbitmqctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MAX_ATTEMPTS = 3
MESSAGES = 48


async def test_no_second_retry_chain_after_a_reconnect(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 400  # calls in flight when the connection goes
    fleet.provider.set_rules([Rule(audience="down", status=503)])
    # partition health off: every message is to retry through the delay backend until exhausted
    await fleet.start(
        1,
        WORKER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        WORKER_CONCURRENCY="16",
        WORKER_BREAKER_FAILURES="0",
    )
    async with fleet.lock.exclusive():
        await fleet.publish(batch(MESSAGES, "RC", audience="down"))

        async def calls_in_flight() -> bool:
            return len(fleet.provider.requests) >= 16

        await wait_until(calls_in_flight, 30, "calls in flight")
        await rabbitmqctl("close_all_connections", "fault test: reconnect with calls in flight")
    await fleet.forget_connection()
    await fleet.wait_finished(timeout=120)
    fleet.replicas[0].check_alive()

    rows = await fleet.rows("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
    assert {row.reason: row.n for row in rows} == {"exhausted": MESSAGES}
    calls = per_key(fleet.provider.requests)
    # one attempt may be made again (its record committed, its ack lost with the channel);
    # a second chain would make up to twice the attempts
    assert max(len(records) for records in calls.values()) <= MAX_ATTEMPTS + 1
    figures = await fleet.verify()
    fleet.report(
        figures,
        most_calls_for_one_key=max(len(records) for records in calls.values()),
        skipped_from_closed_channel=len(fleet.events("skipped_from_closed_channel")),
        ack_lost=len(fleet.events("ack_lost")),
    )
