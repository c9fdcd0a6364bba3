"""The end-to-end demo (``python -m worker.tooling.demo``): the worker at work on this
machine's broker.

It owns the demo's own world and nothing else: the database ``notifications_demo`` (dropped and
migrated anew), the queue ``demo.notifications.work`` with its delay machinery and the source
exchange ``demo.price-change`` (deleted first), an in-process flaky :class:`DemoProvider` and two
real ``worker run`` replicas. It publishes a batch that exercises every outcome, shows progress
read from PostgreSQL, then reports what became of each message and what the provider saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.exceptions import AMQPError
from sqlalchemy import Row, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.message import parse_message
from worker.settings import ENV_PREFIX, ConfigError, load_settings
from worker.tooling.demo_provider import DemoProvider, Rule
from worker.tooling.fleet import (
    ReplicaProcess,
    delete_broker_objects,
    migrate,
    recreate_database,
    start_replicas,
    stop_replicas,
)
from worker.topology import Names

DATABASE = "notifications_demo"
NAMES = Names("demo.notifications.work")
SOURCE_EXCHANGE = "demo.price-change"
REPLICAS = 2
WORKER_ENV = {
    "WORKER_QUEUE": NAMES.queue,
    "WORKER_SOURCE_EXCHANGE": SOURCE_EXCHANGE,
    "WORKER_DELAY_BACKEND": "auto",
    "WORKER_BACKOFF_BASE_SECONDS": "1",
    "WORKER_BACKOFF_MAX_SECONDS": "4",
    "WORKER_MAX_ATTEMPTS": "6",
    "WORKER_METRICS_PORT": "0",
    "WORKER_LOG_FORMAT": "json",
}
RULES = (  # like the real provider on a bad day
    Rule(channel="email", audience="b", status=500, times=6),  # flaky, then recovers
    Rule(audience="lapsed", status=403),  # permanent: dead letter `rejected`
    Rule(channel="sms", audience="c", status=429, retry_after=2, times=2),  # throttled
    Rule(channel="sms", audience="d", drop=True, times=1),  # accepted, but the answer is lost
    Rule(audience="broken", status=503),  # never recovers: dead letter `exhausted`
)
TICKERS = (
    "AAPL",
    "MSFT",
    "NVDA",
    "AMZN",
    "GOOG",
    "META",
    "TSLA",
    "AVGO",
    "JPM",
    "XOM",
    "LLY",
    "WMT",
)


@dataclass(frozen=True)
class Sample:
    label: str  # ticker/channel/audience
    note: str  # what it shows
    body: bytes
    key: str | None = None  # the idempotency key; None for the invalid body
    dead: bool = False  # expected to end as a dead letter


def sample(ticker: str, channel: str, audience: str, note: str, age: float = 3) -> Sample:
    now = datetime.now(UTC)
    occurred_at = (now - timedelta(seconds=age)).isoformat()
    fields = {"ticker": ticker, "price": f"{random.uniform(5, 900):.2f}", "channel": channel}
    body = json.dumps({**fields, "audience": audience, "occurred_at": occurred_at}).encode()
    key = parse_message(body, now).idempotency_key
    dead = audience in ("lapsed", "broken") or age > 86400
    return Sample(f"{ticker}/{channel}/{audience}", note, body, key, dead)


def build_batch(count: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Every message in report order, the main batch (shuffled), and what is published last."""
    special = [
        *(sample(t, "email", "b", "500s, then recovers") for t in ("IBM", "ORCL", "SAP", "ADBE")),
        *(sample(t, "sms", "c", "429 Retry-After 2") for t in ("KO", "PEP")),
        sample("INTC", "sms", "d", "answer lost once"),
        *(sample("CSCO", channel, "lapsed", "403 lapsed") for channel in ("email", "sms")),
        sample("AMD", "email", "broken", "503 every time"),
        sample("GE", "email", "a", "2 days old", age=2 * 86400),
        Sample("(not JSON)", "invalid body", b'{"ticker": "AAPL", price: oops', dead=True),
    ]
    newer = [sample(t, "sms", "a", "newer price", age=1) for t in ("GME", "AMC")]
    older = [sample(t, "sms", "a", "older, published after", age=60) for t in ("GME", "AMC")]
    duplicate = sample("BA", "email", "a", "published twice")
    n = len(TICKERS)
    healthy = [
        sample(
            f"{TICKERS[i // 2 % n]}{i // (2 * n) or ''}", ("email", "sms")[i % 2], "a", "healthy"
        )
        for i in range(max(count - len(special) - 2 * len(newer) - 1, 1))
    ]
    main = [*special, *newer, duplicate, *healthy]
    random.shuffle(main)
    return [*special, *newer, *older, duplicate, *healthy], main, [*older, duplicate]


def message(item: Sample) -> aio_pika.Message:
    """As market data publishes: JSON, persistent, no priority."""
    return aio_pika.Message(
        item.body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


@dataclass
class Demo:
    engine: AsyncEngine
    provider: DemoProvider
    replicas: list[ReplicaProcess]
    samples: list[Sample]

    async def rows(self, sql: str, **params: Any) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(text(sql), params))

    async def publish(self, amqp_url: str, main: list[Sample], late: list[Sample]) -> None:
        """The main batch, then the older prices and the second copy once the newer are sent."""
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(SOURCE_EXCHANGE)
            for item in main:
                await exchange.publish(message(item), routing_key=f"prices.{item.label}")
            newer = [s.key for s in main if s.note == "newer price"]
            sql = "SELECT 1 FROM deliveries WHERE status = 'sent' AND idempotency_key = ANY(:k)"
            for _ in range(100):
                if len(await self.rows(sql, k=newer)) == len(newer):
                    break
                await asyncio.sleep(0.2)
            for item in late:
                await exchange.publish(message(item), routing_key=f"prices.{item.label}")

    async def watch(self, publisher: asyncio.Task[None], seconds: float) -> bool:
        """Show the progress until every message is finished; False after ``seconds``."""
        keys = len({s.key for s in self.samples if s.key})
        dead = sum(s.dead for s in self.samples)
        tty, start, printed = sys.stdout.isatty(), time.monotonic(), -1.0
        while True:
            for replica in self.replicas:
                replica.check_alive()
            if publisher.done():
                publisher.result()  # raise what went wrong
            statuses = Counter[str]()
            retries = 0
            for row in await self.rows(
                "SELECT status, count(*) AS n, sum(CASE WHEN status IN ('pending', 'superseded')"
                " THEN attempts ELSE greatest(attempts - 1, 0) END) AS retries"
                " FROM deliveries GROUP BY status"
            ):
                statuses[row.status], retries = row.n, retries + row.retries
            dead_letters = (await self.rows("SELECT count(*) AS n FROM dead_letters"))[0].n
            elapsed = time.monotonic() - start
            done = publisher.done() and sum(statuses.values()) == keys and dead_letters == dead
            done = done and not statuses["pending"]
            line = (
                f"[{elapsed:5.1f}s] pending {statuses['pending']:2}  sent {statuses['sent']:2}  "
                f"superseded {statuses['superseded']}  dead letters {dead_letters}/{dead}  "
                f"retries {retries:2}  provider requests {len(self.provider.requests):2}"
            )
            if tty:
                print(f"\r\033[K{line}", end="\n" if done else "", flush=True)
            elif done or elapsed - printed >= 1:
                print(line, flush=True)
                printed = elapsed
            if done or elapsed > seconds:
                if tty and not done:
                    print()
                return done
            await asyncio.sleep(0.5)

    async def report(self) -> bool:
        """One row per message, then the provider's view; True when the checks pass."""
        deliveries = {row.idempotency_key: row for row in await self.rows("TABLE deliveries")}
        letters = await self.rows("SELECT idempotency_key, reason, payload FROM dead_letters")
        reasons = {row.idempotency_key or bytes(row.payload): row.reason for row in letters}
        print(f"\n{'message':20} {'key':9} {'outcome':42} {'provider answered':24} what it shows")
        for item in self.samples:
            row, reason = deliveries.get(item.key), reasons.get(item.key or item.body)
            if reason is not None:
                outcome = f"dead: {reason}"
            elif row is None:
                outcome = "not seen"
            elif row.status == "sent" and row.provider_status == 409:
                outcome = "sent (duplicate: 409 after a lost answer)"
            elif row.status == "sent" and row.attempts > 1:
                outcome = f"retried {row.attempts - 1}× then sent"
            else:
                outcome = row.status
            answers = [
                f"{r.status}{' lost' if r.dropped else ''}"
                for r in self.provider.requests
                if r.key == item.key
            ]
            key = (item.key or "-")[:8]
            print(f"{item.label:20} {key:9} {outcome:42} {' '.join(answers) or '-':24} {item.note}")
        accepted = Counter(r.key for r in self.provider.requests if 200 <= r.status < 300)
        once = all(n == 1 for n in accepted.values())
        sent = {key for key, row in deliveries.items() if row.status == "sent"}
        same = sent == set(self.provider.accepted)
        print(f"\nprovider: {len(self.provider.requests)} requests received,", end=" ")
        print(f"{len(self.provider.accepted)} keys accepted")
        print(f"every key accepted at most once: {'yes' if once else 'no'}")
        print(f"keys accepted = keys recorded sent: {'yes' if same else 'no'}")
        return once and same


async def run_demo(count: int, seconds: float) -> int:
    settings = load_settings()
    db_url = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{DATABASE}"))
    log_dir = Path(tempfile.mkdtemp(prefix="worker-demo-"))
    print(f"database {DATABASE}, queue {NAMES.queue}, exchange {SOURCE_EXCHANGE}, logs {log_dir}")
    await recreate_database(urlunsplit(urlsplit(db_url)._replace(path="/postgres")), DATABASE)
    await delete_broker_objects(settings.amqp_url, NAMES, SOURCE_EXCHANGE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {**WORKER_ENV, "WORKER_AMQP_URL": settings.amqp_url, "WORKER_DATABASE_URL": db_url}
    try:
        await migrate(env, log_dir / "migrate.log")
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    samples, main, late = build_batch(count)
    engine = create_async_engine(db_url, pool_size=2)
    async with DemoProvider(RULES, latency_ms=5) as provider:
        env["WORKER_PROVIDER_URL"] = provider.url
        demo = Demo(engine, provider, [], samples)
        publisher: asyncio.Task[None] | None = None
        try:
            print(f"migrated; provider on {provider.url}; starting {REPLICAS} replicas")
            demo.replicas = await start_replicas(REPLICAS, env, log_dir, quiet=False)
            print(f"publishing {len(main) + len(late)} messages to {SOURCE_EXCHANGE}\n")
            publisher = asyncio.create_task(demo.publish(settings.amqp_url, main, late))
            finished = await demo.watch(publisher, seconds)
            checks = await demo.report()
        finally:
            if publisher is not None:
                publisher.cancel()
            codes = await stop_replicas(demo.replicas)
            await engine.dispose()
    print(f"replicas stopped, exit statuses {codes}")
    if not finished:
        print(
            f"demo failed: messages still unfinished after {seconds:.0f} s (see above); "
            f"logs in {log_dir}",
            file=sys.stderr,
        )
    return 0 if finished and checks and codes == [0] * REPLICAS else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tooling.demo",
        description="Show the worker end to end on this machine's RabbitMQ and PostgreSQL.",
    )
    parser.add_argument("--count", type=int, default=40, help="about how many messages")
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the end")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args.count, args.timeout))
    except (ConfigError, RuntimeError, OSError, AMQPError, SQLAlchemyError) as exc:
        print(f"\ndemo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
