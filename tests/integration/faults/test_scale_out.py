"""Scenario 1: 2 and 4 replicas share 5,000 messages while the provider drops 2 % of its
answers after accepting: every key is accepted exactly once, and the only repeated requests
are those that follow a dropped answer."""

from __future__ import annotations

from collections import Counter

import pytest

from worker.tooling.demo_provider import Rule

from .conftest import Fleet, batch

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MESSAGES = 5000


@pytest.mark.parametrize("replicas", [2, 4])
async def test_every_key_accepted_once_across_replicas(fleet: Fleet, replicas: int) -> None:
    fleet.provider.set_rules([Rule(drop=True, probability=0.02)])
    await fleet.start(replicas)
    await fleet.publish(batch(MESSAGES, "S"))
    seconds = await fleet.wait_finished(timeout=150)

    figures = await fleet.verify()
    assert figures.statuses == Counter(sent=MESSAGES)
    assert figures.drops > 0  # the fault was injected
    accepted = Counter(r.key for r in fleet.provider.requests if r.status < 300)
    assert len(accepted) == MESSAGES
    assert set(accepted.values()) == {1}
    by_replica = Counter(event["replica"] for event in fleet.events("sent"))
    assert sorted(by_replica) == list(range(1, replicas + 1))  # every replica took its share
    fleet.report(
        figures,
        replicas=replicas,
        seconds=round(seconds, 1),
        per_replica=dict(sorted(by_replica.items())),
    )
