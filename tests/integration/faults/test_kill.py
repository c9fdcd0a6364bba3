"""Scenario 2: kill -9 at the worst moments, and at random under load.

Each targeted kill is checked to have hit its window: during the provider call; after the
provider accepted but before the outcome was committed; after the retry was published but
before the original was acked. Nothing is lost, and a lost answer costs at most one more
request, answered 409 and recorded as a duplicate send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from worker.tooling.demo_provider import RequestRecord, Rule
from worker.tooling.fleet import ReplicaProcess

from .conftest import Fleet, Published, batch, per_key, price_change, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]


async def finished_at(fleet: Fleet, key: str, timeout: float = 30) -> datetime:
    """When the key's delivery left `pending` (its row's updated_at)."""

    async def finished() -> bool:
        rows = await fleet.rows(
            "SELECT 1 FROM deliveries WHERE idempotency_key = :k AND status <> 'pending'", k=key
        )
        return bool(rows)

    await wait_until(finished, timeout, f"{key[:12]} finished")
    rows = await fleet.rows("SELECT updated_at FROM deliveries WHERE idempotency_key = :k", k=key)
    moment: datetime = rows[0].updated_at
    return moment


def replica_events(replica: ReplicaProcess) -> list[dict[str, Any]]:
    """The JSON events of the replica's current run."""
    events = []
    for line in replica.log_since_start().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def on_victim(
    fleet: Fleet, victim: Published, action: Callable[[RequestRecord], Awaitable[None]]
) -> asyncio.Event:
    """Run ``action`` once, inside the provider's first request for the victim's key."""
    fired = asyncio.Event()

    async def hook(record: RequestRecord) -> None:
        if record.key == victim.key and not fired.is_set():
            await action(record)
            fired.set()

    fleet.provider.on_request = hook
    return fired


async def test_kill_during_the_provider_call(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 20
    await fleet.start(1)
    replica = fleet.replicas[0]
    victim = price_change("KILLCALL")
    killed_at: list[datetime] = []

    async def kill(record: RequestRecord) -> None:
        replica.send_signal(signal.SIGKILL)
        killed_at.append(datetime.now(UTC))

    fired = on_victim(fleet, victim, kill)
    await fleet.publish([*batch(100, "KA"), victim, *batch(100, "KB")])
    await asyncio.wait_for(fired.wait(), 30)
    await replica.kill()  # reaps it
    await fleet.restart(replica)
    recovered = (await finished_at(fleet, victim.key or "")) - killed_at[0]
    await fleet.wait_finished()

    # the kill cut the call: the provider accepted it, the worker never saw the answer
    calls = per_key(fleet.provider.requests)[victim.key or ""]
    assert [r.status for r in calls] == [200, 409]
    row = (
        await fleet.rows(
            "SELECT status, provider_status FROM deliveries WHERE idempotency_key = :k",
            k=victim.key,
        )
    )[0]
    assert (row.status, row.provider_status) == ("sent", 409)
    figures = await fleet.verify(allowed_duplicates=16)  # at most the replica's in-flight
    fleet.report(figures, victim_finished_after_kill_s=round(recovered.total_seconds(), 1))


async def test_kill_after_the_provider_accepted_before_the_commit(fleet: Fleet) -> None:
    await fleet.start(1)
    replica = fleet.replicas[0]
    victim = price_change("KILLCOMMIT")
    locker = await asyncpg.connect(fleet.database_url)  # holds the topic row
    observer = await asyncpg.connect(fleet.database_url)

    async def lock_topic(record: RequestRecord) -> None:
        # the lease is taken and committed; hold the topic row so the outcome cannot commit
        await locker.execute("BEGIN")
        await locker.execute(
            "SELECT 1 FROM topic_watermarks WHERE topic_key = $1 FOR UPDATE", victim.topic
        )

    fired = on_victim(fleet, victim, lock_topic)
    name = fleet.database_url.rsplit("/", 1)[1]

    async def blocked() -> list[int]:
        rows = await observer.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1"
            " AND wait_event_type = 'Lock' AND query LIKE '%SET status = ''sent''%'",
            name,
        )
        return [row["pid"] for row in rows]

    async def recording_blocked() -> bool:
        return bool(await blocked())

    try:
        await fleet.publish([*batch(50, "CA"), victim, *batch(50, "CB")])
        await asyncio.wait_for(fired.wait(), 30)
        await wait_until(recording_blocked, 15, "the worker's record of the send to block")
        await replica.kill()
        killed_at = datetime.now(UTC)
        # A killed host's database session dies with it; PostgreSQL would only notice at its
        # next write, after the statement had committed. End the orphan as the network would.
        for pid in await blocked():
            await observer.execute("SELECT pg_terminate_backend($1)", pid)
        status = await observer.fetchval(
            "SELECT status FROM deliveries WHERE idempotency_key = $1", victim.key
        )
        assert status == "pending"  # the window: accepted by the provider, nothing recorded
        assert [r.status for r in per_key(fleet.provider.requests)[victim.key or ""]] == [200]
    finally:
        await locker.close()  # rolls back, releasing the row
        await observer.close()
    await fleet.restart(replica)
    recovered = (await finished_at(fleet, victim.key or "")) - killed_at
    await fleet.wait_finished()

    calls = per_key(fleet.provider.requests)[victim.key or ""]
    assert [r.status for r in calls] == [200, 409]
    figures = await fleet.verify(allowed_duplicates=16)
    fleet.report(figures, victim_finished_after_kill_s=round(recovered.total_seconds(), 1))


async def freeze_and_kill_after_retry(
    fleet: Fleet, replica: ReplicaProcess, spy: AbstractQueue, victim: Published
) -> tuple[bool, timedelta]:
    """Freeze the replica (SIGSTOP) as soon as the spy on the retry exchange sees the victim's
    copy, kill it, restart it. Whether its ack left before the freeze is a race, so the window
    counts as hit only if the data shows it: the restarted replica gets the original (attempt
    0) back beside the retry copy (attempt 1). Returns that and the time to finish the key."""
    frozen = asyncio.Event()

    async def freeze(message: AbstractIncomingMessage) -> None:
        if message.body == victim.body and not frozen.is_set():
            replica.send_signal(signal.SIGSTOP)
            frozen.set()
        await message.ack()

    tag = await spy.consume(freeze)
    await fleet.publish([victim])
    await asyncio.wait_for(frozen.wait(), 30)
    await spy.cancel(tag)
    await replica.kill()
    killed_at = datetime.now(UTC)
    await fleet.restart(replica)
    recovered = (await finished_at(fleet, victim.key or "")) - killed_at

    async def both_copies_seen() -> bool:
        events = replica_events(replica)
        return {0, 1} <= {e["attempt"] for e in events if e.get("idempotency_key") == victim.key}

    try:  # the retry copy is back within its 1 s delay, the original at once if unacked
        await wait_until(both_copies_seen, 3, "both copies")
    except AssertionError:
        return False, recovered
    return True, recovered


async def test_kill_after_the_retry_was_published_before_the_ack(fleet: Fleet) -> None:
    trials = 6  # each hits the window about two times in three
    fleet.provider.set_rules(
        [Rule(audience=f"retry{n}", status=500, times=1) for n in range(trials)]
    )
    await fleet.start(1)
    replica = fleet.replicas[0]
    channel = await fleet.channel()
    spy = await channel.declare_queue(exclusive=True)  # outlives its consumers
    await spy.bind(fleet.names.retry, routing_key="#")
    recoveries = []
    for trial in range(trials):
        victim = price_change(f"KILLACK{trial}", audience=f"retry{trial}")
        hit, recovered = await freeze_and_kill_after_retry(fleet, replica, spy, victim)
        recoveries.append(round(recovered.total_seconds(), 1))
        # one send in all: whichever copy comes second finds the key finished
        calls = per_key(fleet.provider.requests)[victim.key or ""]
        assert [r.status for r in calls] == [500, 200]
        if hit:
            break
    assert hit, f"the window was missed {trials} times"
    await fleet.wait_finished()
    figures = await fleet.verify()
    fleet.report(figures, trials=trial + 1, victim_finished_after_kill_s=recoveries)


async def test_random_kills_under_load(fleet: Fleet) -> None:
    fleet.provider.latency_ms = 10
    fleet.provider.set_rules([Rule(audience="r", status=503, probability=0.5)])
    await fleet.start(2)
    invalid = [Published(f"not json {n}".encode()) for n in range(20)]
    messages = [*batch(2000, "R"), *batch(400, "RR", audience="r"), *invalid]
    random.shuffle(messages)
    publishing = asyncio.create_task(fleet.publish(messages, chunk=100))
    kills = 0
    rng = random.Random(7)
    for _ in range(8):
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        replica = rng.choice(fleet.replicas)
        await replica.kill()
        kills += 1
        await fleet.restart(replica)
    await publishing
    unfinished = len(messages) - await fleet.finished_count()
    seconds = await fleet.wait_finished(timeout=60)

    figures = await fleet.verify(allowed_duplicates=kills * 16)
    per = per_key(fleet.provider.requests)
    assert all(sum(r.status == 409 for r in calls) <= kills for calls in per.values())
    rows = await fleet.rows("SELECT count(*) AS n FROM dead_letters WHERE reason = 'invalid'")
    fleet.report(
        figures,
        kills=kills,
        invalid_bodies=len(invalid),
        invalid_rows=rows[0].n,
        unfinished_at_last_kill=unfinished,
        finished_after_last_kill_s=round(seconds, 1),
    )


async def test_kill_after_an_invalid_body_was_dead_lettered_before_its_ack(fleet: Fleet) -> None:
    """Hold the dead-letter insert on a table lock, freeze the worker, let the insert commit,
    kill: the body is recorded and its delivery unacked, so the broker redelivers it."""
    await fleet.start(1)
    replica = fleet.replicas[0]
    # Parsing an INSERT takes its table lock too: prepare the statement on the replica's
    # connections first, so that the held one is already executing, not being prepared.
    for n in range(3):
        await fleet.publish([Published(f"not json: warm-up {n}".encode())])
        await fleet.wait_finished()
    invalid = Published(b"not json: killed before its ack")
    locker = await asyncpg.connect(fleet.database_url)
    observer = await asyncpg.connect(fleet.database_url)
    name = fleet.database_url.rsplit("/", 1)[1]

    async def insert_blocked() -> bool:
        return bool(
            await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO dead_letters%'",
                name,
            )
        )

    async def recorded() -> bool:
        return bool(await observer.fetchval("SELECT count(*) FROM dead_letters") == 4)

    try:
        await locker.execute("BEGIN; LOCK TABLE dead_letters IN SHARE MODE")
        await fleet.publish([invalid])
        await wait_until(insert_blocked, 15, "the dead-letter insert to block")
        replica.send_signal(signal.SIGSTOP)
        await locker.execute("COMMIT")  # the insert commits; its worker is frozen before the ack
        await wait_until(recorded, 5, "the dead letter committed")
        await replica.kill()
    finally:
        await locker.close()
        await observer.close()
    await fleet.restart(replica)

    async def redelivered() -> bool:
        handled = ("dead_lettered", "already_finished")
        return any(e.get("event") in handled for e in replica_events(replica))

    await wait_until(redelivered, 15, "the redelivered copy handled")
    rows = await fleet.rows(
        "SELECT id FROM dead_letters WHERE reason = 'invalid' AND payload = :body",
        body=invalid.body,
    )
    assert len(rows) == 1, f"one invalid body, {len(rows)} dead letters"
