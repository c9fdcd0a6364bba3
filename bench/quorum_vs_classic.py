"""Quorum mode on a local three-node cluster against classic mode on one node, in one run.

For each mode, one ``worker run`` replica (concurrency 16) against the fast local provider:

* idle: CPU seconds per minute of the replica with nothing to do (its scheduler polling one
  work queue, or the eleven attempt queues and the limit queue of quorum mode);
* steady: a batch of messages published at once; messages per second from the first publish
  to the last key finished, and the replica's CPU milliseconds per message.

Then quorum / classic for each figure. Classic runs on the machine's broker
(``WORKER_AMQP_URL``, default 127.0.0.1:5672); quorum on three new nodes this script boots and
removes (:mod:`worker.tooling.cluster`; needs root or the ``rabbitmq`` user).

    .venv/bin/python -m bench.quorum_vs_classic [--messages 3000] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from worker.broker import connect_first
from worker.settings import ENV_PREFIX, load_settings
from worker.tooling.cluster import LocalCluster, available
from worker.tooling.demo_provider import DemoProvider
from worker.tooling.fleet import (
    delete_broker_objects,
    migrate,
    recreate_database,
    start_replicas,
    stop_replicas,
)
from worker.topology import Names

RESULTS = Path(__file__).parent / "results" / "quorum_vs_classic.json"
CONCURRENCY = 16


def _with_path(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _bodies(count: int) -> list[bytes]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return [
        json.dumps(
            {
                "ticker": f"Q{n}",
                "price": "10.00",
                "occurred_at": now,
                "channel": ("email", "sms")[n % 2],
                "audience": "abcd"[n % 4],
            }
        ).encode()
        for n in range(count)
    ]


async def _publish(amqp_url: str, exchange: str, bodies: list[bytes]) -> None:
    async with await connect_first(amqp_url.split(",")) as connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        for start in range(0, len(bodies), 500):
            await asyncio.gather(
                *(
                    target.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key="prices.bench",
                    )
                    for body in bodies[start : start + 500]
                )
            )


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(
    mode: str, amqp_url: str, provider: DemoProvider, messages: int, idle_seconds: float
) -> dict[str, Any]:
    settings = load_settings()
    database = f"bench_qvc_{mode}"
    names = Names(f"bench.qvc.{mode}.work")
    source = f"bench.qvc.{mode}.price-change"
    db_url = _with_path(settings.database_url, database)
    await recreate_database(_with_path(settings.database_url, "postgres"), database)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
        "WORKER_AMQP_URL": amqp_url,
        "WORKER_DATABASE_URL": db_url,
        "WORKER_PROVIDER_URL": provider.url,
        "WORKER_QUEUE": names.queue,
        "WORKER_SOURCE_EXCHANGE": source,
        "WORKER_QUEUE_TYPE": mode,
        "WORKER_DELAY_BACKEND": "ttl",
        "WORKER_CONCURRENCY": str(CONCURRENCY),
        "WORKER_METRICS_PORT": "0",
        "WORKER_LOG_FORMAT": "json",
    }
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-qvc-{mode}-"))
    await migrate(env, log_dir / "migrate.log")
    attempt_queues = load_settings(queue_type=mode).attempt_queues
    await delete_broker_objects(amqp_url, names, source, attempt_queues)
    engine = create_async_engine(db_url, pool_size=2)
    replicas = await start_replicas(1, env, log_dir)
    try:
        process = psutil.Process(replicas[0].pid)
        await asyncio.sleep(2)  # past the start's declarations
        idle_from = _cpu(process)
        await asyncio.sleep(idle_seconds)
        idle = (_cpu(process) - idle_from) / idle_seconds * 60

        busy_from, started = _cpu(process), time.monotonic()
        await _publish(amqp_url, source, _bodies(messages))
        while True:
            async with engine.connect() as conn:
                done = (
                    await conn.execute(
                        text("SELECT count(*) FROM deliveries WHERE status <> 'pending'")
                    )
                ).scalar()
            if int(done or 0) >= messages:
                break
            if time.monotonic() - started > 600:
                raise RuntimeError(f"{mode}: {done} of {messages} finished in 600 s")
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        busy = _cpu(process) - busy_from
    finally:
        await stop_replicas(replicas)
        await engine.dispose()
        await delete_broker_objects(amqp_url, names, source, attempt_queues)
    return {
        "mode": mode,
        "messages": messages,
        "messages_per_s": round(messages / elapsed, 1),
        "cpu_ms_per_message": round(busy / messages * 1000, 3),
        "idle_cpu_s_per_minute": round(idle, 3),
    }


async def main(messages: int, idle_seconds: float) -> dict[str, Any]:
    reason = available()
    if reason is not None:
        raise SystemExit(f"quorum_vs_classic: no local cluster: {reason}")
    logging.getLogger("worker.tooling.demo_provider").setLevel(logging.WARNING)
    cluster = LocalCluster(prefix="nwbench")
    async with DemoProvider(latency_ms=2) as provider:
        classic = await measure(
            "classic", load_settings().amqp_url, provider, messages, idle_seconds
        )
        try:
            await cluster.start()
            quorum = await measure("quorum", cluster.amqp_url, provider, messages, idle_seconds)
        finally:
            await cluster.close()
    ratio = {
        key: round(quorum[key] / classic[key], 2) if classic[key] else None
        for key in ("messages_per_s", "cpu_ms_per_message", "idle_cpu_s_per_minute")
    }
    result = {
        "classic": classic,
        "quorum": quorum,
        "quorum_over_classic": ratio,
        "cluster_start_s": round(cluster.start_seconds, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':8} {'msg/s':>8} {'CPU ms/msg':>11} {'idle CPU s/min':>15}")
    for row in (classic, quorum):
        print(
            f"{row['mode']:8} {row['messages_per_s']:>8} {row['cpu_ms_per_message']:>11} "
            f"{row['idle_cpu_s_per_minute']:>15}"
        )
    print(f"quorum/classic: {ratio}  (written to {RESULTS})")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.idle_seconds))
