"""Provider health per partition, on real replicas: two broken partitions among eight are parked,
not hammered, while the six others go on as before; the parked messages go out as soon as a probe
finds their partition healed, whatever their backoff; an operator can hold one open and close it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from worker.tooling.demo_provider import Rule

from .conftest import Fleet, Published, price_change, rabbitmqctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]

AUDIENCES = ("a", "b", "c", "d")
BROKEN = {("email", "b"), ("sms", "c")}
CONCURRENCY = 4
FAILURES = 5
# A backoff far longer than the test: a parked message sent on time was released by the probe.
ENV = {
    "WORKER_CONCURRENCY": str(CONCURRENCY),
    "WORKER_BACKOFF_BASE_SECONDS": "600",
    "WORKER_BREAKER_FAILURES": str(FAILURES),
    "WORKER_BREAKER_BREAK_SECONDS": "0.5",
    "WORKER_BREAKER_MAX_BREAK_SECONDS": "1",
}


def wave(tag: str, per_partition: int) -> list[Published]:
    """``per_partition`` messages for each of the eight (channel, audience), each its own topic."""
    return [
        price_change(
            f"{tag}{channel[0].upper()}{audience.upper()}{n}", channel=channel, audience=audience
        )
        for channel in ("email", "sms")
        for audience in AUDIENCES
        for n in range(per_partition)
    ]


def partition_of(record: Any) -> tuple[str, str]:
    return (record.channel, record.audience)


def topic_partition(message: Published) -> tuple[str, str]:
    assert message.topic is not None
    _, channel, audience = message.topic.split("|")
    return (channel, audience)


def all_sent(fleet: Fleet, keys: set[str | None]) -> Callable[[], Awaitable[bool]]:
    async def sent() -> bool:
        rows = await fleet.rows(
            "SELECT count(*) AS n FROM deliveries WHERE status = 'sent'"
            " AND idempotency_key = ANY(:keys)",
            keys=list(keys),
        )
        return bool(rows[0].n == len(keys))

    return sent


async def wait_nothing_parked(fleet: Fleet) -> None:
    """Every parked row gone. A release deletes its rows only once the broker has confirmed
    their publish, so a released message may be finished before that delete commits."""

    async def empty() -> bool:
        return not await fleet.rows("SELECT 1 FROM parked_messages")

    await wait_until(empty, 10, "the released rows deleted")


async def test_broken_partitions_are_parked_and_released_on_recovery(fleet: Fleet) -> None:
    fleet.provider.set_rules([Rule(channel=c, audience=a, status=500) for c, a in BROKEN])
    fleet.env.update(ENV)
    await fleet.start(2)
    outage_started = time.monotonic()
    for n in range(5):  # 5 waves, 1 s apart: 40 messages per partition
        await fleet.publish(wave(f"W{n}", 8))
        await asyncio.sleep(1)
    healthy_keys = {m.key for m in fleet.published if topic_partition(m) not in BROKEN}

    await wait_until(all_sent(fleet, healthy_keys), 60, "the healthy partitions' messages sent")
    parked = await fleet.rows("SELECT partition_key, count(*) AS n FROM parked_messages GROUP BY 1")
    outage_seconds = time.monotonic() - outage_started

    # the six healthy partitions: one request per message, nothing parked
    requests = fleet.provider.requests
    healthy = [r for r in requests if partition_of(r) not in BROKEN]
    assert Counter(r.status for r in healthy) == Counter({200: len(healthy_keys)})
    assert {row.partition_key for row in parked} == {"email|b", "sms|c"}
    # the broken ones: the failures that opened them, what was in flight then, and the probes
    opened = [e for e in fleet.events("partition_open")]
    probes = sum(1 for e in opened if e["cause"] == "probe failed")
    failed = [r for r in requests if partition_of(r) in BROKEN]
    in_flight = 2 * CONCURRENCY
    assert len(failed) <= len(BROKEN) * (FAILURES + in_flight) + probes
    assert probes <= len(BROKEN) * (outage_seconds / 0.25 + 2)  # break ≥ 0.25 s, jittered
    parked_count = sum(row.n for row in parked)
    assert parked_count >= 60  # most of the 80 broken-partition messages wait in PostgreSQL

    # recovery: every parked message is sent within 2 s of the probe that closed its partition
    fleet.provider.set_rules([])
    recovered = time.monotonic()
    await fleet.wait_finished(timeout=30)
    figures = await fleet.verify()
    assert figures.statuses == Counter(sent=len(fleet.published))
    accepted = [
        r.at for r in fleet.provider.requests if partition_of(r) in BROKEN and r.status < 300
    ]
    closed = [e for e in fleet.events("partition_closed")]
    assert {e["partition"] for e in closed} >= {"email|b", "sms|c"}
    last_sent = max(accepted) - recovered
    # the break is at most 1 s: a probe within it, then the release
    assert last_sent <= 1.0 + 2.0, f"last parked message sent {last_sent:.2f} s after recovery"
    await wait_nothing_parked(fleet)
    fleet.report(
        figures,
        outage_seconds=round(outage_seconds, 1),
        failed_requests=len(failed),
        probes_failed=probes,
        parked=parked_count,
        last_parked_sent_after_recovery=round(last_sent, 2),
        requests_per_message=round(len(fleet.provider.requests) / len(fleet.published), 3),
    )


async def test_an_operator_holds_a_partition_open_and_closes_it(fleet: Fleet) -> None:
    fleet.env.update(ENV)
    await fleet.start(1)
    assert await run_admin_env(fleet, "partitions", "hold", "email|b") == 0
    await asyncio.sleep(1)  # the replica sees it at its next refresh (every 0.5 s)
    await fleet.publish(wave("H", 3))

    async def others_sent() -> bool:
        return len([r for r in fleet.provider.requests if r.status < 300]) == 21

    await wait_until(others_sent, 30, "the other partitions' messages sent")
    await asyncio.sleep(1.5)  # a probe would have come by now
    assert all(partition_of(r) != ("email", "b") for r in fleet.provider.requests)
    rows = await fleet.rows(
        "SELECT count(*) AS n FROM parked_messages WHERE partition_key = 'email|b'"
    )
    assert rows[0].n == 3

    closed_at = time.monotonic()
    assert await run_admin_env(fleet, "partitions", "close", "email|b") == 0
    await fleet.wait_finished(timeout=10)
    accepted = [r.at for r in fleet.provider.requests if partition_of(r) == ("email", "b")]
    assert len(accepted) == 3
    assert max(accepted) - closed_at <= 2.0
    figures = await fleet.verify()
    assert figures.statuses == Counter(sent=24)


async def open_partition(
    fleet: Fleet, channel: str, audience: str, count: int, parked_at_least: int | None = None
) -> None:
    """Break (channel, audience), publish ``count`` of its messages, wait until the partition is
    open and all are parked or retried (or ``parked_at_least`` of them are parked)."""
    least = count - 2 * CONCURRENCY if parked_at_least is None else parked_at_least
    fleet.provider.set_rules([Rule(channel=channel, audience=audience, status=500)])
    await fleet.publish(
        price_change(f"P{audience}{n}".upper(), channel=channel, audience=audience)
        for n in range(count)
    )

    async def parked() -> bool:
        rows = await fleet.rows(
            "SELECT (SELECT count(*) FROM parked_messages) AS parked,"
            " (SELECT state FROM partition_health WHERE partition_key = :key) AS state",
            key=f"{channel}|{audience}",
        )
        return bool(rows[0].parked >= least and rows[0].state == "open")

    await wait_until(parked, 30, "the partition open and its messages parked")


async def test_a_fresh_message_probes_before_a_long_break_and_releases_the_parked(
    fleet: Fleet,
) -> None:
    """A break of a minute holds the parked messages' own probe back, not a fresh alert's: the
    fresh message probes the recovered partition at once, and its success releases the parked
    messages on both replicas. (The retries on their first hop in the delay backend come back
    later: that hop is 5 × the break cap.)"""
    fleet.env.update(
        ENV | {"WORKER_BREAKER_BREAK_SECONDS": "60", "WORKER_BREAKER_MAX_BREAK_SECONDS": "60"}
    )
    await fleet.start(2)
    await open_partition(fleet, "email", "b", 20, parked_at_least=5)
    parked = {row.idempotency_key for row in await fleet.rows("SELECT * FROM parked_messages")}
    fleet.provider.set_rules([])
    await asyncio.sleep(0.5)  # past the first attempts' probe spacing since the opening
    fresh = price_change("FRESH", channel="email", audience="b")
    await fleet.publish([fresh])
    expected = parked | {fresh.key}
    await wait_until(all_sent(fleet, expected), 20, "the fresh and the parked messages sent")
    await wait_nothing_parked(fleet)
    probes = [e for e in fleet.events("partition_half_open") if e["cause"] == "first attempt"]
    assert probes
    sent = [r for r in fleet.provider.requests if r.status < 300]
    assert len({r.key for r in sent}) == len(sent)  # nothing sent twice


async def test_a_probing_replica_killed_does_not_keep_the_partition_open(fleet: Fleet) -> None:
    fleet.env.update(ENV)
    await fleet.start(1)
    await open_partition(fleet, "email", "b", 30)
    victim = fleet.replicas[0]
    killed = asyncio.Event()

    async def kill_the_prober(record: Any) -> None:
        if partition_of(record) == ("email", "b") and not killed.is_set():
            victim.send_signal(signal.SIGKILL)
            killed.set()

    fleet.provider.set_rules([])  # healed, but the probe's replica dies inside the probe
    fleet.provider.on_request = kill_the_prober
    await asyncio.wait_for(killed.wait(), 10)
    killed_at = time.monotonic()
    fleet.provider.on_request = None
    await fleet.start(1)  # another replica; the dead one's probe lease runs out
    await fleet.wait_finished(timeout=60)
    figures = await fleet.verify(allowed_duplicates=1)  # the probe the victim sent
    recovered = max(r.at for r in fleet.provider.requests) - killed_at
    # lease: 2 × provider timeout + 5 s, then one break and a release
    assert recovered <= 2 * 1 + 5 + 1 + 3
    fleet.report(figures, all_sent_after_kill_s=round(recovered, 1))


async def test_broker_restart_while_messages_are_parked(fleet: Fleet) -> None:
    fleet.env.update(ENV)
    async with fleet.lock.exclusive():
        try:
            await fleet.start(2)
            await open_partition(fleet, "sms", "c", 40)
            await rabbitmqctl("stop_app")
            await asyncio.sleep(2)
        finally:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
    await fleet.forget_connection()
    fleet.provider.set_rules([])
    healed = time.monotonic()
    await fleet.wait_finished(timeout=60)
    for replica in fleet.replicas:
        replica.check_alive()
    figures = await fleet.verify(allowed_duplicates=2 * CONCURRENCY)
    assert figures.statuses == Counter(sent=40)
    last = max(r.at for r in fleet.provider.requests) - healed
    fleet.report(figures, last_sent_after_heal_s=round(last, 1))


async def test_a_parked_message_past_max_age_ends_expired(fleet: Fleet) -> None:
    fleet.env.update(ENV | {"WORKER_MAX_AGE_SECONDS": "8"})
    await fleet.start(1)
    assert await run_admin_env(fleet, "partitions", "hold", "email|b") == 0
    await asyncio.sleep(1)
    await fleet.publish([price_change("OLD", channel="email", audience="b")])  # 5 s old
    await fleet.wait_finished(timeout=20)
    (dead,) = await fleet.rows("SELECT reason, dead_at FROM dead_letters")
    assert dead.reason == "expired"
    assert not fleet.provider.requests
    await wait_nothing_parked(fleet)


async def run_admin_env(fleet: Fleet, *argv: str) -> int:
    """``worker-admin`` as its own process, on the fleet's database."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("worker-admin")),
        *argv,
        env=fleet.env,
        stdout=asyncio.subprocess.DEVNULL,
    )
    return await process.wait()
