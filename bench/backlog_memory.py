"""Scenario *backlog memory*: a large backlog waits on the broker, then one replica drains it.

The topology is declared and the backlog published before the replica starts; the replica's
RSS is sampled every half second while it drains. Reported: RSS at start, peak and end, and
the growth over the drain; the samples go to the JSON and the plot.

    .venv/bin/python -m bench --only backlog_memory [--runs 1]
"""

from __future__ import annotations

import time
from typing import Any

import aio_pika

from bench.lib import Cost, fast_provider, fresh_world, price_changes, publish, wait_until
from worker.settings import load_settings
from worker.tooling.fleet import stop_replicas
from worker.topology import declare_topology

CHUNK = 20_000


async def measure(messages: int) -> dict[str, Any]:
    async with fast_provider() as provider:
        world = await fresh_world("backlog", provider.url)
        try:
            settings = load_settings(queue=world.names.queue, source_exchange=world.source_exchange)
            async with await aio_pika.connect(world.amqp_url) as connection:
                await declare_topology(await connection.channel(), settings)
            for start in range(0, messages, CHUNK):
                bodies = price_changes(min(CHUNK, messages - start), start=start)
                await publish(world.amqp_url, bodies, exchange=world.source_exchange)
            (replica,) = await world.start(1)
            try:
                cost = Cost([replica.pid])
                cost.sample()
                began = time.monotonic()

                async def drained() -> bool:
                    return await world.count_finished() >= messages

                await wait_until(
                    drained, 3600, "the backlog to drain", every=0.5, on_tick=cost.sample_tick
                )
                cost.sample()
                elapsed = time.monotonic() - began
            finally:
                await stop_replicas([replica])
        finally:
            await world.close()
    rss = [mb for _, mb in cost.rss_samples]
    return {
        "messages": messages,
        "drain_s": round(elapsed, 1),
        "msgs_per_s": round(messages / elapsed, 1),
        "rss_start_mb": round(rss[0], 1),
        "rss_peak_mb": round(max(rss), 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_growth_mb": round(rss[-1] - rss[0], 1),
        "rss_samples": [(round(t, 1), round(mb, 1)) for t, mb in cost.rss_samples],
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"backlog memory: {result['messages']} messages drained in {result['drain_s']:.0f} s "
        f"({result['msgs_per_s']:.0f}/s); RSS {result['rss_start_mb']:.1f} MB at start, "
        f"peak {result['rss_peak_mb']:.1f}, end {result['rss_end_mb']:.1f}: "
        f"growth {result['rss_growth_mb']:+.1f} MB"
    )
