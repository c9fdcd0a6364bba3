"""/metrics, /healthz and /readyz of a real ``worker run`` process, as Prometheus and a
Kubernetes probe see them: every metric is exposed, the values move as messages are processed,
and /readyz turns 503 while the broker is unreachable and 200 once it is back.

The process reaches the broker through :class:`BrokerProxy`, a TCP relay the test can cut, so
that the broker goes away for this replica only; the shared broker stays up. (Closing the
replica's connection with ``rabbitmqctl close_connection`` is not enough: the broker is still
there, and aio-pika reconnects within tens of milliseconds.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from worker.tooling.demo_provider import Rule
from worker.tooling.fleet import ReplicaProcess, start_replicas

from .conftest import AMQP_URL, Harness, price_change
from .test_health import Scrape, free_port, scrape

# Every family worker/metrics.py defines, by the name the text format gives it (a counter's
# family drops `_total`); the list plus the returned-messages counter.
FAMILIES = {
    "notifications_messages": "counter",
    "notifications_retries": "counter",
    "notifications_dead_letters": "counter",
    "notifications_returned": "counter",
    "notifications_delivery_latency_seconds": "histogram",
    "notifications_provider_request_duration_seconds": "histogram",
    "notifications_in_flight": "gauge",
    "notifications_delay_backend_info": "gauge",
    "notifications_build_info": "gauge",
}


@dataclass
class BrokerProxy:
    """Relays TCP from a local port to the broker; :meth:`cut` stops listening and drops every
    relayed connection (the broker is unreachable), :meth:`restore` listens again."""

    upstream_host: str
    upstream_port: int
    port: int = field(default_factory=free_port)
    _server: asyncio.Server | None = None
    _relays: set[asyncio.Task[None]] = field(default_factory=set)

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._relays.discard(relay)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def broker_proxy() -> AsyncIterator[BrokerProxy]:
    broker = urlsplit(AMQP_URL)
    proxy = BrokerProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    await proxy.restore()
    yield proxy
    await proxy.cut()


@dataclass
class RunningWorker:
    replica: ReplicaProcess
    base: str
    http: aiohttp.ClientSession

    async def status(self, path: str) -> int:
        async with self.http.get(f"{self.base}{path}") as response:
            return response.status

    async def scrape(self) -> Scrape:
        self.replica.check_alive()
        return await scrape(self.http, self.base)


@pytest.fixture
async def worker(
    harness: Harness, broker_proxy: BrokerProxy, tmp_path: Path
) -> AsyncIterator[RunningWorker]:
    """One ``worker run`` process on the harness's database, queue and provider, connected to
    the broker through the proxy."""
    port = free_port()
    broker = urlsplit(AMQP_URL)
    proxied = broker._replace(
        netloc=f"{broker.username}:{broker.password}@127.0.0.1:{broker_proxy.port}"
    )
    env = {
        **os.environ,
        "WORKER_AMQP_URL": proxied.geturl(),
        "WORKER_DATABASE_URL": harness.database_url,
        "WORKER_PROVIDER_URL": harness.provider.url,
        "WORKER_QUEUE": harness.names.queue,
        "WORKER_SOURCE_EXCHANGE": harness.source_exchange,
        "WORKER_DELAY_BACKEND": "ttl",
        "WORKER_BACKOFF": "constant",
        "WORKER_BACKOFF_BASE_SECONDS": "0",
        "WORKER_CONCURRENCY": "4",
        "WORKER_SHUTDOWN_GRACE_SECONDS": "5",
        "WORKER_METRICS_PORT": str(port),
        "WORKER_LOG_FORMAT": "json",
    }
    (replica,) = await start_replicas(1, env, tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            yield RunningWorker(replica, f"http://127.0.0.1:{port}", http)
    finally:
        assert await replica.stop() == 0, replica.log_since_start()[-3000:]


async def test_every_metric_is_exposed_and_moves_with_the_messages(
    harness: Harness, worker: RunningWorker
) -> None:
    harness.provider.set_rules(
        [Rule(audience="lapsed", status=403), Rule(audience="flaky", status=500, times=1)]
    )
    assert await worker.status("/healthz") == 200
    assert await worker.status("/readyz") == 200
    before = await worker.scrape()
    exposed = {name: family.type for name, family in before.families.items()}
    assert {name: exposed.get(name) for name in FAMILIES} == FAMILIES
    assert before.value("notifications_delay_backend_info", backend="ttl") == 1
    assert before.value("notifications_messages_total", outcome="sent") == 0

    await harness.publish(price_change())
    await harness.publish(price_change(audience="lapsed"))
    await harness.publish(price_change(audience="flaky"))  # 500, retried, then sent
    await harness.wait_finished(3)
    after = await worker.scrape()

    assert after.value("notifications_messages_total", outcome="sent") == 2
    assert after.value("notifications_messages_total", outcome="rejected") == 1
    assert after.value("notifications_messages_total", outcome="retry") == 1
    assert after.value("notifications_retries_total", attempt="1") == 1
    assert after.value("notifications_dead_letters_total", reason="rejected") == 1
    assert after.value("notifications_delivery_latency_seconds_count") == 2
    assert after.value("notifications_delivery_latency_seconds_sum") > 0
    requests = "notifications_provider_request_duration_seconds_count"
    assert after.value(requests, status_class="2xx") == 2
    assert after.value(requests, status_class="4xx") == 1
    assert after.value(requests, status_class="5xx") == 1
    assert after.value("notifications_in_flight") == 0


async def test_readyz_is_503_while_the_broker_is_away_and_200_when_it_is_back(
    harness: Harness, worker: RunningWorker, broker_proxy: BrokerProxy
) -> None:
    assert await worker.status("/readyz") == 200

    async def readyz_is(status: int) -> bool:
        worker.replica.check_alive()
        return await worker.status("/readyz") == status

    async def unready() -> bool:
        return await readyz_is(503)

    async def ready() -> bool:
        return await readyz_is(200)

    await broker_proxy.cut()
    await harness.wait_for(unready, timeout=10, what="/readyz 503 once the broker is away")
    await asyncio.sleep(3)  # longer than a reconnect attempt (2 s): it stays unready
    assert await worker.status("/readyz") == 503
    assert await worker.status("/healthz") == 200  # alive all along

    await broker_proxy.restore()
    await harness.wait_for(ready, timeout=30, what="/readyz 200 after reconnecting")

    # consuming again, not merely connected
    await harness.publish(price_change())
    await harness.wait_finished(1)
    after = await worker.scrape()
    assert after.value("notifications_messages_total", outcome="sent") == 1
