"""Quorum mode on the three-node cluster: the loss of a broker node, and the delivery limit.

Real ``worker run`` processes (two replicas, every node in ``WORKER_AMQP_URL``) on the
session's cluster; nodes are killed with SIGKILL (a crashed host) and booted again. Each test
checks the fault suite's invariants (:meth:`Fleet.verify`) and appends its figures to
``/tmp/nw-faults-summary.txt``.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime

import aiohttp
import pytest
from aio_pika.exceptions import AMQPError

from worker.tooling.cluster import LocalCluster
from worker.tooling.demo_provider import Rule

from ..faults.conftest import Fleet, Published, batch, wait_until
from ..test_database_outage import _set_reachable as set_database_reachable

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RETRIED = 200  # messages whose first attempt fails and waits 4 s in a delay level


async def ready(fleet: Fleet) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as http:
        for port in fleet.metrics_ports.values():
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                statuses.append(response.status)
    return statuses


async def consumers(fleet: Fleet, queue: str) -> int:
    channel = await fleet.channel()
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.consumer_count or 0)


async def depth(fleet: Fleet, queue: str) -> int:
    channel = await fleet.channel()
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def finish(fleet: Fleet, timeout: float) -> None:
    """Until every message is finished; on a timeout, say where the unfinished ones are."""
    try:
        await fleet.wait_finished(timeout=timeout)
    except AssertionError:
        queues = fleet.names.owned_queues(11)
        where = {q: await depth(fleet, q) for q in queues}
        pending = await fleet.rows(
            "SELECT idempotency_key, attempts, last_error FROM deliveries WHERE status = 'pending'"
        )
        parked = await fleet.rows("SELECT count(*) AS n FROM parked_messages")
        keys = {r.idempotency_key for r in pending[:5]}
        seen = [
            f"{replica.number}: {line}"
            for replica in fleet.replicas
            for line in replica.log_path.read_text(errors="replace").splitlines()
            if any(key in line for key in keys)
        ]
        raise AssertionError(
            f"unfinished: {len(pending)} pending {[tuple(r) for r in pending[:5]]}; "
            f"queues { ({q: n for q, n in where.items() if n}) }; parked {parked[0].n}; "
            f"their replicas' events: {seen[-10:]}"
        ) from None


async def publish_through_failover(fleet: Fleet, messages: list[Published]) -> None:
    """Publish as a publisher would through a node's loss: a publish the broker nacks or a
    connection it loses (a queue electing its new leader, the test's node gone) is sent again
    to the next node answering. A copy sent twice is one key: the worker sends it once."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await fleet.publish(messages)
            return
        except (AMQPError, OSError):
            if time.monotonic() > deadline:
                raise
            await fleet.forget_connection()
            await asyncio.sleep(0.5)


async def test_kill_the_node_leading_the_work_queues_mid_run(
    cluster: LocalCluster, cluster_fleet: Fleet
) -> None:
    fleet = cluster_fleet
    fleet.provider.latency_ms = 50  # about 10 s of work for two replicas: the kill lands mid-run
    fleet.provider.set_rules([Rule(audience="r", status=503, times=RETRIED)])
    # the retries go through the delay levels, not the partition breaker's parking lot
    await fleet.start(
        2, metrics=True, WORKER_BACKOFF_BASE_SECONDS="4", WORKER_BREAKER_FAILURES="1000"
    )
    messages = [*batch(800, "K"), *batch(RETRIED, "KR", audience="r")]
    random.shuffle(messages)
    await fleet.publish(messages)

    async def under_way() -> bool:
        return await fleet.finished_count() >= 250

    await wait_until(under_way, 60, "the run under way")
    leader = await cluster.leader(fleet.names.queue)
    assert leader == await cluster.leader(fleet.names.ingress)  # declared on one node
    killed_at, killed = datetime.now(UTC), time.monotonic()
    unfinished = len(fleet.published) - await fleet.finished_count()
    await cluster.kill(leader)
    await fleet.forget_connection()  # the test's own may have been on that node

    probes = batch(20, "PROBE")  # new work after the kill, published to a surviving node
    await publish_through_failover(fleet, probes)

    async def probes_done() -> bool:
        rows = await fleet.rows(
            "SELECT count(*) AS n FROM deliveries WHERE status = 'sent'"
            " AND idempotency_key = ANY(:keys)",
            keys=[p.key for p in probes],
        )
        return bool(rows[0].n == len(probes))

    await wait_until(probes_done, 90, "new messages sent after the kill", pause=0.2)
    rows = await fleet.rows(
        "SELECT min(updated_at) AS first FROM deliveries WHERE idempotency_key = ANY(:keys)",
        keys=[p.key for p in probes],
    )
    resumed = (rows[0].first - killed_at).total_seconds()

    async def both_ready() -> bool:
        return await ready(fleet) == [200, 200]

    # on another node, by themselves
    all_ready = await wait_until(both_ready, 30, "both replicas ready again") + resumed
    await finish(fleet, 120)
    for replica in fleet.replicas:
        replica.check_alive()  # never restarted
    # (the consumers of the dead node's connections are kept, "suspected down", until it
    # returns: the broker's count says more only after the restart, below)
    reconnected = len(fleet.events("broker_reconnected"))

    # the node comes back and rejoins; the replicas keep consuming where they are
    restarted = time.monotonic()
    await cluster.restart(leader)
    rejoin = time.monotonic() - restarted
    after = batch(20, "AFTER")
    await publish_through_failover(fleet, after)
    await finish(fleet, 60)
    assert await consumers(fleet, fleet.names.ingress) == 2  # both consuming, by themselves

    figures = await fleet.verify(allowed_duplicates=2 * 16)  # answers in flight at the kill
    failed_before = {r.key for r in fleet.provider.requests if r.status == 503 and r.at < killed}
    crossed = {r.key for r in fleet.provider.requests if r.status == 200 and r.at > killed}
    crossed &= failed_before
    assert crossed  # delayed retries waiting in the levels through the kill arrived
    fleet.report(
        figures,
        fault=f"kill -9 {leader} (leader of the work queues)",
        unfinished_at_kill=unfinished,
        retries_across_the_kill=len(crossed),
        first_new_message_sent_after_s=round(resumed, 1),
        both_ready_after_s=round(all_ready, 1),
        node_restart_and_rejoin_s=round(rejoin, 1),
        reconnections=reconnected,
    )


async def test_a_message_in_a_delay_level_survives_its_leader_killed(
    cluster: LocalCluster, cluster_fleet: Fleet
) -> None:
    fleet = cluster_fleet
    fleet.provider.set_rules([Rule(audience="d", status=503, times=1)])
    # 8 s: delay level 3 alone (no breaker: its first hop would stop at 5 maximal breaks)
    await fleet.start(1, WORKER_BACKOFF_BASE_SECONDS="8", WORKER_BREAKER_FAILURES="0")
    await fleet.publish(batch(1, "DL", audience="d"))
    level = fleet.names.delay_level(3)

    async def waiting_in_level() -> bool:
        return await depth(fleet, level) == 1

    await wait_until(waiting_in_level, 20, "the retry waiting in delay level 3")
    leader = await cluster.leader(level)
    await cluster.kill(leader)
    await fleet.forget_connection()
    await finish(fleet, 60)

    first, second = fleet.provider.requests
    assert (first.status, second.status) == (503, 200)
    late = second.at - first.at - 8
    assert late >= -0.5, "sent before its delay"
    await cluster.restart(leader)
    figures = await fleet.verify()
    fleet.report(figures, fault=f"kill -9 {leader} (leader of {level})", late_s=round(late, 2))


async def test_a_database_outage_beyond_the_delivery_limit_loses_nothing(
    cluster: LocalCluster, cluster_fleet: Fleet
) -> None:
    """During an outage, messages are returned more often than the delivery limit: the broker
    dead-letters them to ``<queue>.limit``, and once the database is back the replicas serve
    that queue too, so they are sent like the rest. The returns beyond the first (a replica
    killed) are made by a consumer of the test's own that takes and returns the messages, as
    replicas restarted during an outage would once they consume."""
    fleet = cluster_fleet
    limit = 2
    fleet.provider.latency_ms = 200
    await fleet.start(2, WORKER_DELIVERY_LIMIT=str(limit), WORKER_CONCURRENCY="4")
    await fleet.publish(batch(200, "LIM"))

    async def under_way() -> bool:
        return await fleet.finished_count() >= 10

    await wait_until(under_way, 60, "the run under way")
    await fleet.engine.dispose()
    await set_database_reachable(fleet.database_url, False)
    try:
        await asyncio.sleep(2)
        await fleet.replicas[0].kill()  # its prefetch goes back: one return each
        channel = await fleet.channel()
        ingress = await channel.get_queue(fleet.names.ingress)
        returned = 0
        for _ in range(limit + 1):  # more returns than the limit, for the first 40 waiting
            taken = []
            for _ in range(40):
                message = await ingress.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
            for message in taken:
                await message.nack(requeue=True)
            returned += len(taken)
        await asyncio.sleep(2)
        limited = await depth(fleet, fleet.names.limit)
        assert returned
        assert limited >= 1
    finally:
        await set_database_reachable(fleet.database_url, True)
    await fleet.restart(fleet.replicas[0])
    await finish(fleet, 120)
    assert await depth(fleet, fleet.names.limit) == 0
    reached = len(fleet.events("delivery_limit_reached"))
    figures = await fleet.verify(allowed_duplicates=2 * 4)
    fleet.report(
        figures,
        fault=f"database outage, returns beyond x-delivery-limit {limit}",
        returns_by_the_test=returned,
        waiting_in_limit_queue=limited,
        served_from_the_limit_queue=reached,
    )
