"""Scenario *recovery_drain*: the provider is down while messages arrive and cycle through
retries; then it recovers and fresh messages arrive at the same moment.

Two replicas. During the outage every request is answered 500 and the backlog messages come
back again and again through the delay backend (backoff 1 s, at most 8 s). At recovery, the
fresh messages' latency (publish → the provider's acceptance) shows whether they overtake the
backlog; then how long the backlog takes to drain.

    .venv/bin/python -m bench --only recovery_drain [--runs 1]
"""

from __future__ import annotations

import time
from typing import Any

from bench.lib import (
    acceptance_latencies,
    fast_retries,
    fresh_world,
    percentile,
    price_changes,
    publish,
    repeated,
    wait_until,
)
from worker.tooling.demo_provider import DemoProvider, Rule
from worker.tooling.fleet import stop_replicas

REPLICAS = 2
WORKER_ENV = fast_retries(max_seconds=8)


async def measure(provider: DemoProvider, backlog: int, fresh: int) -> dict[str, Any]:
    provider.set_rules([Rule(status=500)])
    world = await fresh_world("recovery", provider.url, **WORKER_ENV)
    try:
        replicas = await world.start(REPLICAS)
        try:
            await publish(world.amqp_url, price_changes(backlog), exchange=world.source_exchange)

            async def cycled() -> bool:  # every backlog message failed at least twice
                sql = "SELECT count(*) FROM deliveries WHERE attempts >= 2"
                return int(await world.scalar(sql)) >= backlog

            outage = await wait_until(cycled, 300, "the backlog to cycle through retries")
            failed = len(provider.requests)
            provider.set_rules([])
            recovered = time.monotonic()
            bodies = price_changes(fresh, start=backlog)
            sent_at = await publish(world.amqp_url, bodies, exchange=world.source_exchange)

            async def drained() -> bool:
                sql = "SELECT count(*) FROM deliveries WHERE status = 'sent'"
                return int(await world.scalar(sql)) >= backlog + fresh

            await wait_until(drained, 300, "the backlog to drain")
            drain = time.monotonic() - recovered
            latencies = acceptance_latencies(provider, bodies, sent_at)
        finally:
            await stop_replicas(replicas)
    finally:
        await world.close()
    if len(latencies) != fresh:
        raise RuntimeError(f"only {len(latencies)} of {fresh} fresh messages were accepted")
    return {
        "backlog": backlog,
        "fresh": fresh,
        "outage_s": round(outage, 1),
        "requests_during_outage": failed,
        "fresh_p50_s": round(percentile(latencies, 50), 3),
        "fresh_p99_s": round(percentile(latencies, 99), 3),
        "fresh_max_s": round(max(latencies), 3),
        "drain_s": round(drain, 1),
    }


async def run_recovery(backlog: int, fresh: int, runs: int) -> dict[str, Any]:
    return await repeated(runs, lambda provider: measure(provider, backlog, fresh))


def print_table(result: dict[str, Any]) -> None:
    m = result["median"]
    print(
        f"recovery_drain: backlog {m['backlog']:.0f} (outage {m['outage_s']:.1f} s, "
        f"{m['requests_during_outage']:.0f} failed requests), fresh {m['fresh']:.0f}: "
        f"p50 {m['fresh_p50_s']:.3f} s, p99 {m['fresh_p99_s']:.3f} s; "
        f"backlog drained in {m['drain_s']:.1f} s"
    )
