"""What every benchmark shares: the provider process, the publisher process, the message
stream, a fresh world per run and the reading of the provider's request log.

The provider (``python -m worker.tooling.demo_provider --quiet --uvloop``) and the publisher
(``python -m bench.publisher``) are processes of their own, so their CPU is counted apart from
the system under test (``bench.procs``). The provider's log is read once at the end of each
measurement: every request with its key, topic, ``occurred_at``, answer and the system-wide
monotonic time it arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.message import parse_message
from worker.settings import ENV_PREFIX, load_settings
from worker.tooling.fleet import (
    ReplicaProcess,
    delete_broker_objects,
    free_port,
    migrate,
    recreate_database,
    start_replicas,
)
from worker.topology import Names

RESULTS = Path(__file__).parent / "results"
PROVIDER_LATENCY_MS = 2  # the healthy provider: 200 in about 2 ms
CHANNELS = ("email", "sms")
AUDIENCES = ("a", "b", "c", "d")
GROUPS = tuple((c, a) for c in CHANNELS for a in AUDIENCES)  # eight (channel, audience)


def with_path(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


# --- the provider -------------------------------------------------------------------------


class Provider:
    """The demo provider as its own process, driven over its control API."""

    def __init__(self, latency_ms: int = PROVIDER_LATENCY_MS) -> None:
        self.latency_ms = latency_ms
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> Provider:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.tooling.demo_provider",
            "--port", str(self.port), "--latency-ms", str(self.latency_ms),
            "--quiet", "--uvloop",
        )  # fmt: skip
        self._session = aiohttp.ClientSession()
        await wait_until(self._up, 20, "the provider to listen", every=0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    async def _up(self) -> bool:
        try:
            await self.stats()
        except aiohttp.ClientError:
            return False
        return True

    async def stats(self) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(f"{self.url}/_control/stats") as response:
            result: dict[str, Any] = await response.json()
            return result

    async def set(
        self,
        rules: Sequence[dict[str, Any]] = (),
        *,
        latency_ms: int | None = None,
        capacity: int | None = None,
    ) -> None:
        """Rules, latency and capacity (None: no limit), all at once, from now on."""
        assert self._session is not None
        body = {
            "rules": list(rules),
            "latency_ms": self.latency_ms if latency_ms is None else latency_ms,
            "capacity": capacity,
        }
        async with self._session.put(f"{self.url}/_control/rules", json=body) as response:
            response.raise_for_status()

    async def reset(self) -> None:
        assert self._session is not None
        async with self._session.delete(f"{self.url}/_control/state") as response:
            response.raise_for_status()
        await self.set()

    async def requests(self) -> list[dict[str, Any]]:
        assert self._session is not None
        async with self._session.get(f"{self.url}/_control/requests") as response:
            result: list[dict[str, Any]] = await response.json()
            return result


# --- the message stream -------------------------------------------------------------------


def price_changes(count: int, *, start: int = 0, tickers: int | None = None) -> list[bytes]:
    """Bodies ``start`` … ``start + count - 1``, round-robin over the eight groups.

    Message ``n`` is of ticker ``n // 8`` (modulo ``tickers`` when given, so topics repeat),
    and ``occurred_at`` grows with ``n`` by a millisecond: a later message of a topic is a newer
    price. Every body has its own idempotency key.
    """
    base = datetime.now(UTC) - timedelta(seconds=600)
    bodies = []
    for n in range(start, start + count):
        channel, audience = GROUPS[n % len(GROUPS)]
        ticker = n // len(GROUPS)
        if tickers is not None:
            ticker %= tickers
        body = {
            "ticker": f"T{ticker}",
            "price": f"{100 + n % 997 / 100:.2f}",
            "occurred_at": (base + timedelta(milliseconds=n)).isoformat(),
            "channel": channel,
            "audience": audience,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


async def publish(
    amqp_url: str, fmt: str, target: str, bodies: Sequence[bytes], *, rate: float = 0
) -> Publisher:
    """Start the publisher process on ``bodies``; ``await`` the result's ``done()``."""
    publisher = Publisher(bodies)
    await publisher.start(amqp_url, fmt, target, rate)
    return publisher


@dataclass
class Publisher:
    bodies: Sequence[bytes]
    process: asyncio.subprocess.Process | None = None
    _dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-pub-")))

    async def start(self, amqp_url: str, fmt: str, target: str, rate: float) -> None:
        (self._dir / "bodies").write_bytes(b"\n".join(self.bodies))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.publisher", "--amqp", amqp_url, "--format", fmt,
            "--target", target, "--bodies", str(self._dir / "bodies"),
            "--out", str(self._dir / "sent"), "--rate", str(rate),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    cpu_s: float = 0.0  # what publishing cost the publisher (start-up excluded)

    async def done(self) -> list[float]:
        """Wait for it to finish; the monotonic time of each publish."""
        assert self.process is not None
        if await self.process.wait() != 0:
            raise RuntimeError(f"the publisher failed ({self.process.returncode})")
        result = json.loads((self._dir / "sent").read_text())
        self.cpu_s = float(result["cpu_s"])
        sent: list[float] = result["sent_at"]
        return sent


# --- a fresh world ------------------------------------------------------------------------


@dataclass
class World:
    """One run's database (for the worker), broker names, logs and worker environment."""

    name: str
    amqp_url: str
    database: str
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
    db_url = with_path(settings.database_url, database)
    await recreate_database(with_path(settings.database_url, "postgres"), database)
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
    return World(name, settings.amqp_url, database, db_url, names, source, log_dir, env)


# --- reading the provider's log -----------------------------------------------------------


@dataclass(frozen=True)
class Published:
    key: str
    topic: str
    occurred_at: str
    sent_at: float


def published(bodies: Sequence[bytes], sent_at: Sequence[float]) -> list[Published]:
    now = datetime.now(UTC)
    out = []
    for body, at in zip(bodies, sent_at, strict=True):
        message = parse_message(body, now)
        out.append(Published(message.idempotency_key, message.topic_key,
                             message.occurred_at_text, at))  # fmt: skip
    return out


def topic_of(record: dict[str, Any]) -> str:
    return f"{record['ticker']}|{record['channel']}|{record['audience']}"


@dataclass
class Outcome:
    """What the provider saw of one measurement's messages."""

    accepted_at: dict[str, float]  # key → when first accepted
    requests: int
    duplicates: int  # requests for a key already accepted (409)
    stale: int  # accepted with an older occurred_at than one already accepted for the topic
    newest: dict[str, str]  # topic → newest accepted occurred_at

    def lost(self, messages: Sequence[Published]) -> int:
        """Neither accepted nor superseded by a newer accepted price of its topic."""
        return sum(
            1
            for m in messages
            if m.key not in self.accepted_at and self.newest.get(m.topic, "") <= m.occurred_at
        )

    def latencies(self, messages: Sequence[Published]) -> list[float]:
        """Seconds from publish to acceptance, for those accepted."""
        return [self.accepted_at[m.key] - m.sent_at for m in messages if m.key in self.accepted_at]


def outcome(records: Sequence[dict[str, Any]]) -> Outcome:
    accepted: dict[str, float] = {}
    newest: dict[str, str] = {}
    duplicates = stale = 0
    for record in sorted(records, key=lambda r: int(r["seq"])):
        if record["status"] == 409:
            duplicates += 1
        if not 200 <= record["status"] < 300:
            continue
        accepted.setdefault(record["key"], record["at"])
        topic = topic_of(record)
        if record["occurred_at"] < newest.get(topic, ""):
            stale += 1
        else:
            newest[topic] = record["occurred_at"]
    return Outcome(accepted, len(records), duplicates, stale, newest)


# --- small things -------------------------------------------------------------------------


async def wait_until(
    done: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    every: float = 0.2,
    on_tick: Callable[[], None] | None = None,
    strict: bool = True,
) -> float:
    """Poll ``done`` until true; the seconds it took. After ``timeout``: RuntimeError, or
    (``strict=False``) the seconds so far."""
    started = time.monotonic()
    while not await done():
        if on_tick is not None:
            on_tick()
        if time.monotonic() - started > timeout:
            if not strict:
                print(f"  timed out after {timeout:.0f} s waiting for {what}", flush=True)
                return time.monotonic() - started
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


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


def medians(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure (NaN-free ones); other fields from the first sample."""
    out: dict[str, Any] = {}
    for key, value in samples[0].items():
        numbers = [s[key] for s in samples if isinstance(s.get(key), int | float)]
        if isinstance(value, int | float) and not isinstance(value, bool) and numbers:
            with contextlib.suppress(statistics.StatisticsError):
                out[key] = statistics.median(numbers)
                continue
        out[key] = value
    return out
