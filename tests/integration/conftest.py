"""Fixtures on the real RabbitMQ and PostgreSQL: each test gets its own database (a copy of a
migrated template) and its own queue and exchange names; only the provider is fake, and it is
a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPError
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.cli import migrate
from worker.replica import Replica
from worker.settings import Settings, load_settings
from worker.tooling.demo_provider import DemoProvider
from worker.tooling.fleet import delete_broker_objects
from worker.topology import Names

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

pytestmark = pytest.mark.integration


def _db_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_db() -> AsyncIterator[str]:
    """A database migrated once per session (named per session, so that two test runs on one
    machine never share it); every test copies it."""
    name = f"nw_test_template_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    settings = load_settings(database_url=_db_url(name))
    await asyncio.to_thread(migrate, settings)
    yield name
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_database_url() -> AsyncIterator[str]:
    """A database with no schema at all."""
    name = f"nw_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    yield _db_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(template_db: str) -> AsyncIterator[str]:
    name = f"nw_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _db_url(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def provider() -> AsyncIterator[DemoProvider]:
    async with DemoProvider() as running:
        yield running


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    yield connection
    await connection.close()


def price_change(**fields: Any) -> dict[str, Any]:
    """A valid message, now, with any field overridden."""
    message: dict[str, Any] = {
        "ticker": "AAPL",
        "price": "189.10",
        "occurred_at": datetime.now(UTC).isoformat(),
        "channel": "email",
        "audience": "premium",
    }
    message.update(fields)
    return message


@dataclass
class Harness:
    """One test's worker, broker names, database and provider."""

    database_url: str
    provider: DemoProvider
    amqp: AbstractConnection
    names: Names
    source_exchange: str
    engine: AsyncEngine
    overrides: dict[str, Any] = field(default_factory=dict)
    amqp_url: str = AMQP_URL  # the cluster's tests: every node's URL, comma-separated
    _replicas: list[tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=list)
    _channel: AbstractChannel | None = None

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": self.amqp_url,
            "database_url": self.database_url,
            "provider_url": self.provider.url,
            "queue": self.names.queue,
            "source_exchange": self.source_exchange,
            "delay_backend": "ttl",
            "backoff": "constant",
            "backoff_base_seconds": 0,
            "metrics_port": 0,
            "concurrency": 4,
            "provider_timeout_seconds": 5,
            "shutdown_grace_seconds": 5,
        }
        values.update(self.overrides)
        values.update(overrides)
        return load_settings(**values)

    async def start(self, **overrides: Any) -> Settings:
        """Start one in-process replica; returns once its consumers are declared."""
        settings = self.settings(**overrides)
        stop = asyncio.Event()
        task = asyncio.create_task(Replica(settings).run(stop))
        self._replicas.append((task, stop))
        await self.wait_for(self._ingress_consumed, timeout=15, what="replica started")
        return settings

    async def _ingress_consumed(self) -> bool:
        for task, _ in self._replicas:
            if task.done():
                task.result()  # surface a crash at start
        channel = await self.channel()
        try:
            queue = await channel.declare_queue(self.names.ingress, passive=True)
        except AMQPError:
            self._channel = None
            return False
        return bool(queue.declaration_result.consumer_count)

    async def stop(self) -> None:
        for _, stop in self._replicas:
            stop.set()
        for task, _ in self._replicas:
            await asyncio.wait_for(task, timeout=30)
        self._replicas.clear()

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self.amqp.channel()
        return self._channel

    async def publish(self, body: dict[str, Any] | bytes, **properties: Any) -> None:
        """Publish as market data does: to the source exchange, persistent, no priority."""
        channel = await self.channel()
        exchange = await channel.declare_exchange(
            self.source_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties.setdefault("content_type", "application/json")
        message = aio_pika.Message(
            raw, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties
        )
        await exchange.publish(message, routing_key="prices.test")

    async def publish_to_work_queue(
        self, body: dict[str, Any], attempt: int, priority: int
    ) -> None:
        """Put a message on the work queue as a retry that came back from its delay."""
        channel = await self.channel()
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=priority,
            headers={"x-attempt": attempt},
        )
        await channel.default_exchange.publish(message, routing_key=self.names.queue)

    async def rows(self, sql: str, **params: Any) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).fetchall())

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_for_requests(self, count: int, what: str) -> None:
        """Until the provider has received at least ``count`` requests."""

        async def received() -> bool:
            return len(self.provider.requests) >= count

        await self.wait_for(received, what=what)

    async def wait_finished(self, count: int, timeout: float = 20) -> None:
        """Until ``count`` messages have ended: sent, superseded, or dead letters."""

        async def finished() -> bool:
            done = await self.rows(
                "SELECT (SELECT count(*) FROM deliveries WHERE status <> 'pending')"
                " + (SELECT count(*) FROM dead_letters WHERE reason = 'invalid') AS n"
            )
            return int(done[0].n) >= count

        await self.wait_for(finished, timeout, what=f"{count} finished messages")

    async def delivery(self, key: str) -> Row[Any]:
        rows = await self.rows("SELECT * FROM deliveries WHERE idempotency_key = :k", k=key)
        assert rows, f"no delivery row for {key}"
        return rows[0]

    async def cleanup_broker(self) -> None:
        # a connection of its own: a test may have had the broker close the shared one
        attempt_queues = self.settings().attempt_queues
        await delete_broker_objects(self.amqp_url, self.names, self.source_exchange, attempt_queues)


@asynccontextmanager
async def running_harness(
    database_url: str,
    provider: DemoProvider,
    amqp: AbstractConnection,
    amqp_url: str = AMQP_URL,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """A harness on its own names; its replicas stopped and its broker objects deleted after."""
    tag = uuid.uuid4().hex[:8]
    engine = create_async_engine(database_url.replace("postgresql://", "postgresql+asyncpg://"))
    running = Harness(
        database_url=database_url,
        provider=provider,
        amqp=amqp,
        names=Names(f"test.{tag}.work"),
        source_exchange=f"test.{tag}.price-change",
        engine=engine,
        overrides=overrides,
        amqp_url=amqp_url,
    )
    try:
        yield running
    finally:
        with suppress(TimeoutError):
            await running.stop()
        await running.cleanup_broker()
        await engine.dispose()


@pytest.fixture
async def harness(
    database_url: str, provider: DemoProvider, amqp: AbstractConnection
) -> AsyncIterator[Harness]:
    async with running_harness(database_url, provider, amqp) as running:
        yield running
