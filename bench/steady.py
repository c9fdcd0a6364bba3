"""Scenario *steady*: a healthy provider (200 in about 2 ms) and a batch of messages.

For the floor (``bench.floor``) and for the worker with 1 and 2 replicas: end-to-end messages
per second (first publish → last key finished), CPU seconds per 1,000 messages of the measured
processes, and their peak RSS; then worker/floor as a ratio.

    .venv/bin/python -m bench --only steady [--runs 1]
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from bench.lib import Cost, fast_provider, fresh_world, medians, price_changes, publish, wait_until
from worker.tooling.demo_provider import DemoProvider
from worker.tooling.fleet import stop_replicas

CONCURRENCY = 16


async def measure_worker(provider: DemoProvider, messages: int, replicas: int) -> dict[str, Any]:
    world = await fresh_world("steady", provider.url, WORKER_CONCURRENCY=str(CONCURRENCY))
    try:
        processes = await world.start(replicas)
        try:
            cost = Cost(process.pid for process in processes)
            started = time.monotonic()
            await publish(world.amqp_url, price_changes(messages), exchange=world.source_exchange)

            async def finished() -> bool:
                return await world.count_finished() >= messages

            await wait_until(finished, 600, f"{messages} messages", on_tick=cost.sample_tick)
            elapsed = time.monotonic() - started
            return _figures(f"worker ×{replicas}", messages, elapsed, cost)
        finally:
            await stop_replicas(processes)
    finally:
        await world.close()


async def measure_floor(provider: DemoProvider, messages: int) -> dict[str, Any]:
    world = await fresh_world("floor", provider.url)
    queue = world.names.queue
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floor",
        "--dsn", world.database_url.replace("+asyncpg", ""),
        "--amqp", world.amqp_url,
        "--queue", queue,
        "--provider", provider.url,
        "--prefetch", str(CONCURRENCY),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        if (await asyncio.wait_for(process.stdout.readline(), 30)).strip() != b"started":
            raise RuntimeError("the floor did not start")
        cost = Cost([process.pid])
        started = time.monotonic()
        await publish(world.amqp_url, price_changes(messages), routing_key=queue)
        sql = "SELECT count(*) FROM floor_deliveries WHERE status = 'sent'"

        async def finished() -> bool:
            return int(await world.scalar(sql)) >= messages

        await wait_until(finished, 600, f"{messages} floor messages", on_tick=cost.sample_tick)
        return _figures("floor", messages, time.monotonic() - started, cost)
    finally:
        process.terminate()
        await process.wait()
        await world.close()


def _figures(name: str, messages: int, elapsed: float, cost: Cost) -> dict[str, Any]:
    return {
        "name": name,
        "messages": messages,
        "seconds": round(elapsed, 2),
        "msgs_per_s": round(messages / elapsed, 1),
        "cpu_s_per_1000": round(cost.cpu_seconds() / messages * 1000, 3),
        "peak_rss_mb": round(cost.peak_rss_mb(), 1),
    }


CONTENDERS = ("floor", "1", "2")


async def run_steady(
    messages: int, runs: int, contenders: tuple[str, ...] = CONTENDERS
) -> dict[str, Any]:
    """Each contender ``runs`` times, interleaved; the median of each figure."""
    samples: dict[str, list[dict[str, Any]]] = {}
    async with fast_provider() as provider:
        for run in range(runs):
            for contender in contenders:
                if contender == "floor":
                    figures = await measure_floor(provider, messages)
                else:
                    figures = await measure_worker(provider, messages, int(contender))
                provider.reset()
                samples.setdefault(figures["name"], []).append(figures)
                print(f"  run {run + 1}: {_line(figures)}", flush=True)
    by_name = {name: medians(runs_) for name, runs_ in samples.items()}
    floor = by_name.get("floor", {}).get("msgs_per_s")
    for figures in by_name.values():
        figures["vs_floor"] = round(figures["msgs_per_s"] / floor, 2) if floor else None
    return {"medians": by_name, "runs": samples}


def _line(figures: dict[str, Any]) -> str:
    return (
        f"{figures['name']:11} {figures['msgs_per_s']:8.1f} msgs/s  "
        f"{figures['cpu_s_per_1000']:6.3f} CPU s/1000  peak RSS {figures['peak_rss_mb']:6.1f} MB"
    )


def print_table(result: dict[str, Any]) -> None:
    print(f"{'steady':11} {'msgs/s':>8} {'CPU s/1000':>11} {'peak RSS MB':>12} {'vs floor':>9}")
    for f in result["medians"].values():
        print(
            f"{f['name']:11} {f['msgs_per_s']:8.1f} {f['cpu_s_per_1000']:11.3f} "
            f"{f['peak_rss_mb']:12.1f} {f['vs_floor'] or float('nan'):9.2f}"
        )
