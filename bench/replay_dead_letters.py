"""How long does ``worker-admin replay --all`` take on 10,000 dead letters, end to end, and does
the provider get each key exactly once?

The night's story on this machine's RabbitMQ and PostgreSQL: real ``worker run`` replicas (2)
against a demo provider that answers 500 to everything, with ``WORKER_MAX_ATTEMPTS=1``, turn
10,000 published alerts into 10,000 dead letters (reason ``exhausted``), exactly as in
production. Then the provider is fixed, and ``worker-admin replay --all`` runs as a process of
its own, unpaced, while the replicas keep running. Printed: the failure groups ``stats`` shows,
the replay command's duration, the time until the provider had accepted all 10,000, and the
provider's requests per key. Database ``notifications_bench_replay`` and queue
``bench.replay.work`` are made anew each run.

    .venv/bin/python bench/replay_dead_letters.py [--count 10000] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.settings import load_settings
from worker.tooling.demo_provider import DemoProvider, Rule
from worker.tooling.fleet import (
    delete_broker_objects,
    migrate,
    recreate_database,
    start_replicas,
    stop_replicas,
)
from worker.topology import Names

DATABASE = "notifications_bench_replay"
NAMES = Names("bench.replay.work")
SOURCE_EXCHANGE = "bench.replay.price-change"
AUDIENCES = 20  # × count/AUDIENCES tickers: every alert its own topic


def alert(index: int, now: datetime) -> bytes:
    body = {
        "ticker": f"T{index // AUDIENCES:05d}",
        "price": f"{100 + index % 997}.{index % 100:02d}",
        "occurred_at": now.isoformat(),
        "channel": "sms" if index % 4 == 0 else "email",
        "audience": f"group-{index % AUDIENCES:02d}",
    }
    return json.dumps(body).encode()


async def publish(amqp_url: str, count: int) -> None:
    """``count`` alerts to the source exchange, as market data publishes them, confirmed."""
    now = datetime.now(UTC)
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            SOURCE_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            alert(i, now),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key="prices.bench",
                    )
                    for i in range(start, min(start + 500, count))
                )
            )


async def scalar(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll ``check`` every 50 ms; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def admin(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """``worker-admin`` as its own process: exit status, stdout, stderr."""
    script = Path(sys.executable).with_name("worker-admin")
    pipe = asyncio.subprocess.PIPE
    process = await asyncio.create_subprocess_exec(script, *argv, env=env, stdout=pipe, stderr=pipe)
    out, err = await process.communicate()
    return await process.wait(), out.decode(), err.decode()


async def bench(count: int, replicas: int) -> int:
    settings = load_settings()
    db_url = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{DATABASE}"))
    log_dir = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    await recreate_database(urlunsplit(urlsplit(db_url)._replace(path="/postgres")), DATABASE)
    await delete_broker_objects(settings.amqp_url, NAMES, SOURCE_EXCHANGE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {
        "WORKER_AMQP_URL": settings.amqp_url,
        "WORKER_DATABASE_URL": db_url,
        "WORKER_QUEUE": NAMES.queue,
        "WORKER_SOURCE_EXCHANGE": SOURCE_EXCHANGE,
        "WORKER_MAX_ATTEMPTS": "1",
        "WORKER_DELAY_BACKEND": "ttl",
        "WORKER_METRICS_PORT": "0",
    }
    await migrate(env, log_dir / "migrate.log")
    engine = create_async_engine(db_url, pool_size=2)
    async with DemoProvider([Rule(status=500)]) as provider:
        env["WORKER_PROVIDER_URL"] = provider.url
        fleet = await start_replicas(replicas, env, log_dir)
        try:
            print(f"{replicas} replicas, provider answering 500 to all; logs in {log_dir}")
            started = time.monotonic()
            await publish(settings.amqp_url, count)

            async def all_dead() -> bool:
                return await scalar(engine, "SELECT count(*) FROM dead_letters") >= count

            dead = await wait_until(all_dead, 600, f"{count} dead letters")
            print(f"{count} dead letters in {dead - started:.1f} s\n")
            code, out, err = await admin(env, "stats")
            print(out if code == 0 else err)

            provider.set_rules(())  # the provider fixed its bug
            before = len(provider.requests)
            started = time.monotonic()
            code, out, err = await admin(env, "replay", "--all")
            replayed = time.monotonic()
            if code != 0:
                raise RuntimeError(f"worker-admin replay failed: {err.strip()}")

            async def all_accepted() -> bool:
                return len(provider.accepted) >= count

            accepted = await wait_until(all_accepted, 600, f"{count} keys accepted")
        finally:
            codes = await stop_replicas(fleet)  # lets every message taken finish
    async with engine.connect() as conn:
        keys = set((await conn.execute(text("SELECT idempotency_key FROM dead_letters"))).scalars())
    await engine.dispose()
    requests = provider.requests[before:]
    per_key = Counter(Counter(r.key for r in requests).values())
    once = set(provider.accepted) == keys and per_key == Counter({1: count})
    statuses = Counter(r.status for r in requests)
    rows = [
        ("dead letters replayed", f"{count}"),
        ("worker-admin replay --all", f"{replayed - started:.2f} s ({out.strip()})"),
        ("  publish rate", f"{count / (replayed - started):,.0f} msg/s"),
        ("until the provider accepted all", f"{accepted - started:.2f} s"),
        ("  end-to-end rate", f"{count / (accepted - started):,.0f} msg/s"),
        ("provider requests after the fix", f"{len(requests)} ({dict(statuses)})"),
        ("requests per key", ", ".join(f"{n}× {k}" for k, n in sorted(per_key.items()))),
        ("each key accepted exactly once", "yes" if once else "NO"),
        ("replica exit statuses", f"{codes}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if once else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=10_000, help="dead letters (10000)")
    parser.add_argument("--replicas", type=int, default=2, help="worker run processes (2)")
    args = parser.parse_args()
    return asyncio.run(bench(args.count, args.replicas))


if __name__ == "__main__":
    raise SystemExit(main())
