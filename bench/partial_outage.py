"""Scenario *partial_outage*: the provider answers 500 for (email, b) and (sms, c) for a while.

Two replicas, a steady stream of messages over every channel and audience a–d. First a healthy
phase (the baseline), then the partial outage, then a healthy phase until the failed groups
have drained. Reported: provider requests per delivered message, and the acceptance latency
(publish → the provider's acceptance) of the healthy groups during the outage against the
baseline.

    .venv/bin/python -m bench --only partial_outage [--runs 1]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.lib import (
    World,
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
BASELINE_SECONDS = 20
FAILING = (("email", "b"), ("sms", "c"))
WORKER_ENV = fast_retries(max_seconds=30)


async def stream(
    world: World, rate: int, seconds: float, start: int
) -> tuple[list[bytes], list[float]]:
    """Publish ``rate`` messages a second for ``seconds``, one tick every 100 ms."""
    bodies: list[bytes] = []
    sent_at: list[float] = []
    per_tick = max(rate // 10, 1)
    began = time.monotonic()
    tick = 0
    while time.monotonic() - began < seconds:
        batch = price_changes(per_tick, start=start + len(bodies))
        sent_at += await publish(world.amqp_url, batch, exchange=world.source_exchange)
        bodies += batch
        tick += 1
        await asyncio.sleep(max(began + tick / 10 - time.monotonic(), 0))
    return bodies, sent_at


def healthy(body: bytes) -> bool:
    return not any(
        f'"channel": "{c}"'.encode() in body and f'"audience": "{a}"'.encode() in body
        for c, a in FAILING
    )


async def measure(provider: DemoProvider, rate: int, outage: float) -> dict[str, Any]:
    world = await fresh_world("partial", provider.url, **WORKER_ENV)
    try:
        replicas = await world.start(REPLICAS)
        try:
            base_bodies, base_at = await stream(world, rate, BASELINE_SECONDS, 0)
            provider.set_rules([Rule(channel=c, audience=a, status=500) for c, a in FAILING])
            out_bodies, out_at = await stream(world, rate, outage, len(base_bodies))
            provider.set_rules([])
            total = len(base_bodies) + len(out_bodies)

            async def drained() -> bool:
                sql = "SELECT count(*) FROM deliveries WHERE status = 'sent'"
                return int(await world.scalar(sql)) >= total

            drain = await wait_until(drained, 300, "every message to be sent")
        finally:
            await stop_replicas(replicas)
    finally:
        await world.close()
    baseline = acceptance_latencies(provider, base_bodies, base_at)
    pairs = [(b, t) for b, t in zip(out_bodies, out_at, strict=True) if healthy(b)]
    during = acceptance_latencies(provider, [b for b, _ in pairs], [t for _, t in pairs])
    failed_groups = len(out_bodies) - len(pairs)
    return {
        "messages": total,
        "failing_group_messages": failed_groups,
        "requests_per_delivered": round(len(provider.requests) / total, 3),
        "baseline_p50_ms": round(percentile(baseline, 50) * 1000, 1),
        "baseline_p99_ms": round(percentile(baseline, 99) * 1000, 1),
        "healthy_p50_ms": round(percentile(during, 50) * 1000, 1),
        "healthy_p99_ms": round(percentile(during, 99) * 1000, 1),
        "drain_after_outage_s": round(drain, 1),
    }


async def run_partial(rate: int, outage: float, runs: int) -> dict[str, Any]:
    result = await repeated(runs, lambda provider: measure(provider, rate, outage))
    return {**result, "rate": rate, "outage_s": outage}


def print_table(result: dict[str, Any]) -> None:
    m = result["median"]
    print(
        f"partial_outage ({result['rate']}/s, {result['outage_s']:.0f} s of 500 for email/b and "
        f"sms/c): {m['requests_per_delivered']:.3f} provider requests per delivered message; "
        f"healthy groups p50 {m['healthy_p50_ms']:.1f} ms / p99 {m['healthy_p99_ms']:.1f} ms "
        f"against steady p50 {m['baseline_p50_ms']:.1f} ms / p99 {m['baseline_p99_ms']:.1f} ms"
    )
