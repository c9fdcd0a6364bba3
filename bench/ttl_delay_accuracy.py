"""How late do retries come back through the plugin-free ``ttl`` delay cascade?

Publishes a shuffled batch of delays (1–30 s) through :class:`worker.delay.TtlCascade` on the
local broker, consumes the work queue, and prints the lateness (arrival − due) per delay and
overall. Uses its own queue names and deletes them afterwards.

    .venv/bin/python bench/ttl_delay_accuracy.py [--per-delay 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.delay import LEVELS, TtlCascade
from worker.settings import load_settings
from worker.topology import declare_topology

DELAYS = (1, 2, 3, 5, 10, 30)


async def measure(per_delay: int) -> None:
    settings = load_settings(queue=f"bench.{uuid.uuid4().hex[:8]}.work")
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    topology = await declare_topology(channel, settings)
    cascade = await TtlCascade.declare(channel, topology, settings)
    plan = [d for d in DELAYS for _ in range(per_delay)]
    random.shuffle(plan)
    due: dict[str, tuple[int, float]] = {}
    lateness: dict[int, list[float]] = {d: [] for d in DELAYS}
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        delay, at = due[str(message.message_id)]
        lateness[delay].append(time.monotonic() - at)
        await message.ack()
        if sum(map(len, lateness.values())) == len(plan):
            done.set()

    await topology.work_queue.consume(on_message)
    try:
        for index, delay in enumerate(plan):
            due[str(index)] = (delay, time.monotonic() + delay)
            await cascade.publish(aio_pika.Message(b"{}", message_id=str(index)), delay)
        await asyncio.wait_for(done.wait(), timeout=max(DELAYS) + 30)
    finally:
        for queue in (topology.names.queue, topology.names.ingress):
            await channel.queue_delete(queue)
        for level in range(LEVELS):
            await channel.queue_delete(topology.names.delay_level(level))
            await channel.exchange_delete(topology.names.delay_level(level))
        await channel.exchange_delete(topology.names.retry)
        await connection.close()

    print(f"{'delay s':>8} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8} {'max ms':>8}")
    for delay in DELAYS:
        print(_row(str(delay), lateness[delay]))
    print(_row("all", [v for values in lateness.values() for v in values]))


def _row(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (
        f"{label:>8} {len(ms):>4} {statistics.median(ms):>8.1f} {p99:>8.1f} "
        f"{ms[0]:>8.1f} {ms[-1]:>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-delay", type=int, default=20)
    asyncio.run(measure(parser.parse_args().per_delay))


if __name__ == "__main__":
    main()
