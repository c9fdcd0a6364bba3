"""New messages are served before retries, and fewer attempts before more (SPEC §7)."""

from __future__ import annotations

from worker.decisions import priority_for

from .conftest import Harness, price_change
from .test_outcomes import key_of


async def test_new_messages_overtake_a_backlog_of_retries(harness: Harness) -> None:
    harness.provider.latency_ms = 30
    settings = harness.settings()
    # A backlog of retries that came back from their delays while the provider was down:
    # older ones (5 failed attempts) first, then younger ones (2 failed attempts).
    many = [price_change(ticker=f"OLD{i}") for i in range(10)]
    few = [price_change(ticker=f"YOUNG{i}") for i in range(10)]
    settings = await harness.start(concurrency=1)
    await harness.stop()  # declare the topology, then let the backlog build up
    for body in many:
        await harness.publish_to_work_queue(body, 5, priority_for(5, settings.max_priority))
    for body in few:
        await harness.publish_to_work_queue(body, 2, priority_for(2, settings.max_priority))

    await harness.start(concurrency=1)

    await harness.wait_for_requests(2, what="the backlog to start draining")
    fresh = [price_change(ticker=f"NEW{i}") for i in range(5)]
    for body in fresh:
        await harness.publish(body)
    served_before_fresh = len(harness.provider.requests)
    await harness.wait_finished(len(many) + len(few) + len(fresh), timeout=30)

    order = [r.key for r in harness.provider.requests]
    position = {key: index for index, key in enumerate(order)}
    fresh_positions = sorted(position[key_of(b)] for b in fresh)
    # At most the message in flight when they arrived (plus one handed over meanwhile) goes
    # before them; then all five run back to back, ahead of the rest of the backlog.
    assert fresh_positions[0] <= served_before_fresh + 1
    assert fresh_positions == list(range(fresh_positions[0], fresh_positions[0] + 5))
    assert fresh_positions[-1] < len(order) - 5
    # Fewer attempts before more: every 2-attempt retry before every 5-attempt retry.
    assert max(position[key_of(b)] for b in few) < min(position[key_of(b)] for b in many)
