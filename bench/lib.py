"""What every benchmark shares: a fresh world per run, messages, publishing, waiting, and what
the measured processes cost.

A *world* is one run's own database (dropped and migrated anew), queue and exchange names,
log directory and the environment for ``worker run``. Costs are read from ``/proc`` through
psutil: CPU seconds (user + system) and resident memory, sampled while the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.message import parse_message
from worker.settings import ENV_PREFIX, load_settings
from worker.tooling.demo_provider import DemoProvider
from worker.tooling.fleet import (
    ReplicaProcess,
    delete_broker_objects,
    migrate,
    recreate_database,
    start_replicas,
)
from worker.topology import Names

RESULTS = Path(__file__).parent / "results"
PROVIDER_LATENCY_MS = 2  # the fast local provider: 200 in about 2 ms
CHANNELS = ("email", "sms")
AUDIENCES = ("a", "b", "c", "d")


def _with_path(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@dataclass
class World:
    """One benchmark run's database, broker names, logs and worker environment."""

    name: str
    amqp_url: str
    database_url: str
    names: Names
    source_exchange: str
    log_dir: Path
    env: dict[str, str]
    engine: AsyncEngine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = create_async_engine(self.database_url, pool_size=2)

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()

    async def count_finished(self) -> int:
        """Keys no longer pending: sent, superseded or dead."""
        return int(await self.scalar("SELECT count(*) FROM deliveries WHERE status <> 'pending'"))

    async def start(self, replicas: int, **env: str) -> list[ReplicaProcess]:
        return await start_replicas(replicas, {**self.env, **env}, self.log_dir)

    async def close(self) -> None:
        await self.engine.dispose()
        await delete_broker_objects(self.amqp_url, self.names, self.source_exchange)


async def fresh_world(name: str, provider_url: str, **worker_env: str) -> World:
    """Drop and migrate the database ``bench_<name>``; delete the queue's broker objects."""
    settings = load_settings()
    database = f"bench_{name}"
    names = Names(f"bench.{name}.work")
    source = f"bench.{name}.price-change"
    db_url = _with_path(settings.database_url, database)
    await recreate_database(_with_path(settings.database_url, "postgres"), database)
    await delete_broker_objects(settings.amqp_url, names, source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {
        "WORKER_AMQP_URL": settings.amqp_url,
        "WORKER_DATABASE_URL": db_url,
        "WORKER_PROVIDER_URL": provider_url,
        "WORKER_QUEUE": names.queue,
        "WORKER_SOURCE_EXCHANGE": source,
        "WORKER_DELAY_BACKEND": "ttl",
        "WORKER_METRICS_PORT": "0",
        "WORKER_LOG_FORMAT": "json",
        **worker_env,
    }
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    await migrate(env, log_dir / "migrate.log")
    return World(name, settings.amqp_url, db_url, names, source, log_dir, env)


def price_changes(
    count: int,
    *,
    audiences: Sequence[str] = AUDIENCES,
    start: int = 0,
    age_seconds: float = 0,
) -> list[bytes]:
    """``count`` valid bodies, each of its own topic (ticker × channel × audience)."""
    occurred_at = (datetime.now(UTC) - timedelta(seconds=age_seconds)).isoformat()
    per_ticker = len(CHANNELS) * len(audiences)
    bodies = []
    for n in range(start, start + count):
        ticker, rest = divmod(n, per_ticker)
        channel, audience = divmod(rest, len(audiences))
        body = {
            "ticker": f"T{ticker}",
            "price": f"{100 + n % 997 / 100:.2f}",
            "occurred_at": occurred_at,
            "channel": CHANNELS[channel],
            "audience": audiences[audience],
        }
        bodies.append(json.dumps(body).encode())
    return bodies


async def publish(
    amqp_url: str, bodies: Iterable[bytes], *, exchange: str = "", routing_key: str = "prices.x"
) -> list[float]:
    """Publish as market data does (JSON, persistent, no priority), confirmed, pipelined;
    the ``time.monotonic()`` at which each went out."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        pending: list[Awaitable[Any]] = []
        sent_at = []
        for body in bodies:
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            sent_at.append(time.monotonic())
            pending.append(target.publish(message, routing_key=routing_key))
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return sent_at


def key_of(body: bytes) -> str:
    return parse_message(body, datetime.now(UTC)).idempotency_key


def acceptance_latencies(
    provider: DemoProvider, bodies: Sequence[bytes], sent_at: Sequence[float]
) -> list[float]:
    """Seconds from each publish to the provider's first acceptance of its key."""
    accepted: dict[str, float] = {}
    for record in provider.requests:
        if 200 <= record.status < 300:
            accepted.setdefault(record.key, record.at)
    return [
        accepted[key] - at
        for key, at in zip(map(key_of, bodies), sent_at, strict=True)
        if key in accepted
    ]


async def wait_until(
    done: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    every: float = 0.2,
    on_tick: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Poll ``done`` until true; the seconds it took. RuntimeError after ``timeout``."""
    started = time.monotonic()
    while not await done():
        if on_tick is not None:
            await on_tick()
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


class Cost:
    """CPU seconds and resident memory of a set of processes, sampled over a run."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._processes = [psutil.Process(pid) for pid in pids]
        self._cpu_start = self._cpu()
        self.started = time.monotonic()
        self.rss_samples: list[tuple[float, float]] = []  # (seconds, MB summed)

    def _cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self._processes)

    def sample(self) -> None:
        rss = sum(p.memory_info().rss for p in self._processes) / 2**20
        self.rss_samples.append((time.monotonic() - self.started, rss))

    async def sample_tick(self) -> None:
        self.sample()

    def cpu_seconds(self) -> float:
        return self._cpu() - self._cpu_start

    def peak_rss_mb(self) -> float:
        """Peak of any one process's resident set (VmHWM), in MB."""
        peaks = []
        for process in self._processes:
            status = Path(f"/proc/{process.pid}/status").read_text()
            kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
            peaks.append(int(kb) / 1024)
        return max(peaks)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), inclusive method; nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(q), 1), 99) - 1]


def write_json(name: str, data: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def fast_provider() -> DemoProvider:
    """The benchmarks' provider, in this process, without a log line per request."""
    logging.getLogger("worker.tooling.demo_provider").setLevel(logging.WARNING)
    return DemoProvider(latency_ms=PROVIDER_LATENCY_MS)


def medians(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure; other fields from the first sample."""
    return {
        key: statistics.median(s[key] for s in samples) if isinstance(value, int | float) else value
        for key, value in samples[0].items()
    }


async def repeated(
    runs: int, measure: Callable[[DemoProvider], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``measure`` ``runs`` times against one fast provider; each run's figures and the medians."""
    samples = []
    async with fast_provider() as provider:
        for run in range(runs):
            provider.reset()
            figures = await measure(provider)
            samples.append(figures)
            print(f"  run {run + 1}: {figures}", flush=True)
    return {"median": medians(samples), "runs": samples}


def fast_retries(max_seconds: int) -> dict[str, str]:
    """Worker settings for the outage scenarios: backoff from 1 s, capped, never exhausted."""
    return {
        "WORKER_BACKOFF": "exponential_jitter",
        "WORKER_BACKOFF_BASE_SECONDS": "1",
        "WORKER_BACKOFF_MAX_SECONDS": str(max_seconds),
        "WORKER_MAX_ATTEMPTS": "100",
    }
