"""The fault suite's world: real ``worker run`` processes on the real broker and database.

The ``fleet`` fixture gives each test its own queue and exchange names, a migrated database, an
in-process :class:`DemoProvider`, the environment for ``worker run``, helpers to publish
(publisher-confirmed) and to wait until every message is finished, and :meth:`Fleet.verify`,
which checks the delivery guarantees (SPEC §7) from the database and the provider's log. At the
end it kills every process it started and deletes its broker objects; the database goes with
the ``database_url`` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from worker.broker import connect_first
from worker.message import parse_message
from worker.tooling.demo_provider import DemoProvider, RequestRecord
from worker.tooling.fleet import ReplicaProcess, delete_broker_objects, free_port
from worker.topology import Names

from ..conftest import AMQP_URL

BROKER_LOCK = Path("/tmp/nw-broker.lock")
SUMMARY = Path("/tmp/nw-faults-summary.txt")
# Short enough that a lease left by a killed replica (2 × timeout + 5 s) expires within a test.
PROVIDER_TIMEOUT_SECONDS = 1


@dataclass(frozen=True)
class Published:
    """One message as the test published it."""

    body: bytes
    content_type: str | None = "application/json"
    key: str | None = None  # None: an invalid body
    topic: str | None = None


def price_change(
    ticker: str,
    *,
    channel: str = "email",
    audience: str = "a",
    age_seconds: float = 5,
    price: str = "10.5",
) -> Published:
    """A valid message ``age_seconds`` old, with its idempotency and topic keys."""
    now = datetime.now(UTC)
    fields = {
        "ticker": ticker,
        "price": price,
        "occurred_at": (now - timedelta(seconds=age_seconds)).isoformat(),
        "channel": channel,
        "audience": audience,
    }
    body = json.dumps(fields).encode()
    parsed = parse_message(body, now)
    return Published(body, key=parsed.idempotency_key, topic=parsed.topic_key)


def batch(count: int, prefix: str, **fields: Any) -> list[Published]:
    """``count`` messages, each of its own topic key (ticker ``<prefix><n>``)."""
    return [price_change(f"{prefix}{n}", **fields) for n in range(count)]


@dataclass
class Figures:
    """What one run did, as the invariants read it from the database and the provider."""

    messages: int
    lost: list[str]
    statuses: Counter[str]
    requests: int
    drops: int
    duplicates: int  # requests for an already-accepted key (answered 409)
    stale_sends: list[str]  # topics whose accepted order went back in occurred_at
    sent_unaccepted: list[str]  # recorded sent, never accepted by the provider
    accepted_unrecorded: list[str]  # accepted, not recorded sent (nor maybe-sent superseded)

    def line(self) -> str:
        statuses = " ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return (
            f"messages {self.messages} ({statuses}), lost {len(self.lost)}, "
            f"requests {self.requests}, drops {self.drops}, duplicate requests "
            f"{self.duplicates}, stale sends {len(self.stale_sends)}"
        )


class BrokerLock:
    """``/tmp/nw-broker.lock``: shared while a test uses the broker, exclusive around a fault
    that disturbs every user of it (closing all connections, restarting the broker).

    Under ``flock -s /tmp/nw-broker.lock pytest`` the process inherits the descriptor of that
    shared lock; a second one of its own could never become exclusive beside it, so the
    inherited one is used (a flock lock belongs to the open file, which both share) and is
    shared again after each fault.
    """

    def __init__(self) -> None:
        inherited = _inherited_descriptor(BROKER_LOCK)
        self._own = inherited is None
        if inherited is None:
            self._fd = os.open(BROKER_LOCK, os.O_RDWR | os.O_CREAT)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        else:
            self._fd = inherited  # held already, by the command this process runs under

    @contextlib.asynccontextmanager
    async def exclusive(self, timeout: float = 600) -> AsyncIterator[float]:
        """Hold the lock exclusively; yields the seconds spent waiting for it."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:  # converts our shared lock; other holders' shared locks make it wait
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no exclusive {BROKER_LOCK} in {timeout:.0f} s") from None
                await asyncio.sleep(0.2)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._own:
            os.close(self._fd)  # releases the lock; an inherited one stays with its owner


def _inherited_descriptor(path: Path) -> int | None:
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry)) == path:
                return int(entry.name)
    return None


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.decode()[-500:]}")
    return out.decode()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, pause: float = 0.05
) -> float:
    """Poll until true; the seconds it took. AssertionError after ``timeout``."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(pause)
    return time.monotonic() - started


@dataclass
class Fleet:
    """One test's replicas, names, database, provider and publisher."""

    scenario: str
    database_url: str
    provider: DemoProvider
    engine: AsyncEngine
    log_dir: Path
    lock: BrokerLock
    names: Names
    source_exchange: str
    env: dict[str, str]
    replicas: list[ReplicaProcess] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)
    amqp_url: str = AMQP_URL  # on the cluster: every node's URL, comma-separated
    metrics_ports: dict[int, int] = field(default_factory=dict)
    _connection: AbstractConnection | None = None
    _channel: AbstractChannel | None = None

    # ---- processes -------------------------------------------------------------------------

    async def start(self, count: int, *, metrics: bool = False, **env: str) -> None:
        """Start ``count`` more replicas (each with a /metrics port if ``metrics``)."""
        started = []
        for _ in range(count):
            number = len(self.replicas) + 1
            replica_env = self.env | env
            if metrics:
                self.metrics_ports[number] = free_port()
                replica_env["WORKER_METRICS_PORT"] = str(self.metrics_ports[number])
            replica = await ReplicaProcess.start_new(number, replica_env, self.log_dir)
            self.replicas.append(replica)
            started.append(replica)
        await asyncio.gather(*(replica.wait_started() for replica in started))

    async def restart(self, replica: ReplicaProcess) -> None:
        await replica.start()
        await replica.wait_started()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON log event ``name`` of every replica (all its runs), with ``replica``."""
        found = []
        for replica in self.replicas:
            for line in replica.log_path.read_text(errors="replace").splitlines():
                if f'"event": "{name}"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    found.append({**json.loads(line), "replica": replica.number})
        return found

    # ---- broker ----------------------------------------------------------------------------

    async def channel(self) -> AbstractChannel:
        """The test's own channel; a fresh connection after a broker fault closed the last."""
        if self._connection is None or self._connection.is_closed:
            self._connection = await connect_first(self.amqp_url.split(","))
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=True)
        return self._channel

    async def forget_connection(self) -> None:
        """Drop the test's connection (a broker fault took it); the next use opens another."""
        if self._connection is not None:
            with contextlib.suppress(AMQPError, OSError):
                await self._connection.close()
        self._connection = self._channel = None

    async def publish(self, messages: Iterable[Published], chunk: int = 500) -> None:
        """Publish as market data does (persistent, no priority), each confirmed."""
        items = list(messages)
        channel = await self.channel()
        exchange = await channel.get_exchange(self.source_exchange)
        for start in range(0, len(items), chunk):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            item.body,
                            content_type=item.content_type,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key="prices.fault",
                    )
                    for item in items[start : start + chunk]
                )
            )
        self.published.extend(items)

    async def queue_depth(self) -> int:
        """Messages ready on the work queue (not counting those delivered and unacked)."""
        channel = await self.channel()
        queue = await channel.declare_queue(self.names.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)

    # ---- database --------------------------------------------------------------------------

    async def rows(self, sql: str, **params: Any) -> list[Row[Any]]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).fetchall())

    async def finished_count(self) -> int:
        rows = await self.rows(
            "SELECT (SELECT count(*) FROM deliveries WHERE status <> 'pending')"
            " + (SELECT count(*) FROM dead_letters WHERE reason = 'invalid') AS n"
        )
        return int(rows[0].n)

    async def wait_finished(self, timeout: float = 60) -> float:
        """Until every published message is finished; the seconds it took."""
        keys = {item.key for item in self.published if item.key}
        invalid = sum(item.key is None for item in self.published)

        async def finished() -> bool:
            rows = await self.rows(
                "SELECT (SELECT count(*) FROM deliveries WHERE status <> 'pending'"
                " AND idempotency_key = ANY(:keys)) AS done,"
                " (SELECT count(*) FROM dead_letters WHERE reason = 'invalid') AS invalid",
                keys=list(keys),
            )
            return bool(rows[0].done == len(keys) and rows[0].invalid >= invalid)

        return await wait_until(finished, timeout, "every message finished", pause=0.2)

    async def finished_since(self, moment: datetime) -> float | None:
        """Seconds from ``moment`` (wall clock) to the first delivery finished after it."""
        rows = await self.rows(
            "SELECT min(updated_at) AS first FROM deliveries"
            " WHERE status <> 'pending' AND updated_at > :moment",
            moment=moment,
        )
        first = rows[0].first
        return None if first is None else (first - moment).total_seconds()

    # ---- the invariants --------------------------------------------------------------------

    async def verify(self, allowed_duplicates: int = 0) -> Figures:
        """Check SPEC §7 on every published message; return the figures for the report.

        ``allowed_duplicates`` is the number of answers the fault itself may have lost (kills,
        an outage between the answer and its record); each dropped answer allows one more.
        """
        keys = {item.key for item in self.published if item.key}
        rows = await self.rows(
            "SELECT idempotency_key, status, last_error FROM deliveries"
            " WHERE idempotency_key = ANY(:keys)",
            keys=list(keys),
        )
        status = {row.idempotency_key: row.status for row in rows}
        maybe_sent = {
            row.idempotency_key
            for row in rows
            if row.status == "superseded" and "may have been delivered" in (row.last_error or "")
        }
        requests = [r for r in self.provider.requests if r.key in keys]
        accepted = {r.key for r in requests if 200 <= r.status < 300}
        figures = Figures(
            messages=len(self.published),
            lost=sorted(k for k in keys if status.get(k, "pending") == "pending"),
            statuses=Counter(status.values()),
            requests=len(requests),
            drops=sum(r.dropped for r in requests),
            duplicates=sum(r.status == 409 for r in requests),
            stale_sends=stale_sends(requests),
            sent_unaccepted=sorted(
                k for k, s in status.items() if s == "sent" and k not in accepted
            ),
            accepted_unrecorded=sorted(
                k for k in accepted if status.get(k) != "sent" and k not in maybe_sent
            ),
        )
        invalid = sum(item.key is None for item in self.published)
        invalid_rows = await self.rows(
            "SELECT count(*) AS n FROM dead_letters WHERE reason = 'invalid'"
        )
        assert figures.lost == [], f"{len(figures.lost)} messages lost"
        assert invalid_rows[0].n >= invalid, "invalid bodies lost"
        assert figures.sent_unaccepted == [], "recorded sent but never accepted"
        assert figures.accepted_unrecorded == [], "accepted by the provider but not recorded sent"
        assert figures.stale_sends == [], "an older price sent after a newer one"
        twice = [k for k, n in Counter(r.key for r in requests if r.status < 300).items() if n > 1]
        assert twice == [], "a key accepted twice"  # the provider answers 409 instead
        assert figures.duplicates <= figures.drops + allowed_duplicates, figures.line()
        return figures

    def report(self, figures: Figures, **extra: object) -> str:
        """Print the scenario's figures and append them as one line to the summary file."""
        details = "".join(f", {name.replace('_', ' ')} {value}" for name, value in extra.items())
        line = f"{self.scenario}: {figures.line()}{details}"
        print(f"\n[faults] {line}")
        with SUMMARY.open("a") as summary:
            summary.write(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {line}\n")
        return line

    # ---- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.kill()
        await self.forget_connection()
        attempt_queues = int(self.env.get("WORKER_MAX_ATTEMPTS", "10"))
        await delete_broker_objects(self.amqp_url, self.names, self.source_exchange, attempt_queues)
        await self.engine.dispose()


def stale_sends(requests: list[RequestRecord]) -> list[str]:
    """Topics whose accepted requests, in arrival order, go back in ``occurred_at``."""
    newest: dict[str, str] = {}
    stale: list[str] = []
    for record in sorted(requests, key=lambda r: r.seq):
        if not 200 <= record.status < 300:
            continue
        topic = f"{record.ticker}|{record.channel}|{record.audience}"
        if record.occurred_at < newest.get(topic, ""):  # same fixed-width UTC form
            stale.append(topic)
        newest[topic] = max(record.occurred_at, newest.get(topic, ""))
    return stale


def per_key(requests: Iterable[RequestRecord]) -> dict[str, list[RequestRecord]]:
    found: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in requests:
        found[record.key].append(record)
    return found


@contextlib.asynccontextmanager
async def running_fleet(
    scenario: str, database_url: str, log_dir: Path, amqp_url: str = AMQP_URL, **env: str
) -> AsyncIterator[Fleet]:
    """A fleet on its own names (``env``: more ``WORKER_*`` settings); at the end its
    processes are killed and its broker objects deleted."""
    tag = uuid.uuid4().hex[:8]
    names = Names(f"faults.{tag}.work")
    source_exchange = f"faults.{tag}.price-change"
    lock = BrokerLock()
    async with DemoProvider() as provider:
        base = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
        running = Fleet(
            scenario=scenario,
            database_url=database_url,
            provider=provider,
            engine=create_async_engine(
                database_url.replace("postgresql://", "postgresql+asyncpg://")
            ),
            log_dir=log_dir,
            lock=lock,
            names=names,
            source_exchange=source_exchange,
            env=base
            | {
                "WORKER_AMQP_URL": amqp_url,
                "WORKER_DATABASE_URL": database_url,
                "WORKER_PROVIDER_URL": provider.url,
                "WORKER_QUEUE": names.queue,
                "WORKER_SOURCE_EXCHANGE": source_exchange,
                "WORKER_DELAY_BACKEND": "ttl",
                "WORKER_BACKOFF": "constant",
                "WORKER_BACKOFF_BASE_SECONDS": "1",
                "WORKER_MAX_ATTEMPTS": "50",
                "WORKER_CONCURRENCY": "16",
                "WORKER_PROVIDER_TIMEOUT_SECONDS": str(PROVIDER_TIMEOUT_SECONDS),
                "WORKER_SHUTDOWN_GRACE_SECONDS": "10",
                "WORKER_METRICS_PORT": "0",
                "WORKER_LOG_FORMAT": "json",
            }
            | env,
            amqp_url=amqp_url,
        )
        try:
            yield running
        finally:
            try:
                await running.close()
            finally:
                lock.close()


@pytest.fixture
async def fleet(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> AsyncIterator[Fleet]:
    async with running_fleet(request.node.name, database_url, tmp_path) as running:
        yield running
