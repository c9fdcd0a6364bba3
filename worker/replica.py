"""The long-lived replica: connections, the scheduler's slots, and a graceful stop.

One robust AMQP connection (it reconnects by itself, to the next of a cluster's nodes, and
restores channels, QoS and consumers), one pooled database engine and one provider session
per process.
``WORKER_CONCURRENCY`` messages run at once, each in a slot of :mod:`worker.scheduler`:
fresh messages from the ingress queue first, retries from the work queue only for a spare
slot, so that no buffer of old retries is hoarded while fresh messages wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from functools import partial

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError
from aiormq.exceptions import ProbableAuthenticationError

from worker import db_errors
from worker.acks import Acks
from worker.breaker import BreakerConfig
from worker.broker import connect_cluster, node_of
from worker.db_errors import DbErrorKind
from worker.delay import declare_delay_backend
from worker.envelope import channel_closed
from worker.errors import describe_error
from worker.health import HealthServer
from worker.metrics import DELAY_BACKEND, DELIVERY_LIMIT_REACHED, IN_FLIGHT, RETURNED
from worker.overdue import OverdueRetries
from worker.parking import ParkingLot
from worker.partitions import PartitionBoard
from worker.persistence import DeliveryStore, create_engine
from worker.pipeline import Pipeline
from worker.provider import ProviderClient
from worker.scheduler import Scheduler
from worker.settings import QueueType, Settings
from worker.stopping import until_stopped, within
from worker.topology import declare_topology

log = structlog.get_logger("worker.replica")

# After a broker error the message goes back to the queue after this pause, so a failing
# broker slows consumption down instead of spinning through redeliveries.
_ERROR_PAUSE_SECONDS = 1.0
_RECONNECT_SECONDS = 2.0
# A message that met a database error is held this long for the database to come back, then
# returned to the queue: well inside RabbitMQ's 30 min consumer timeout.
_HOLD_SECONDS = 60.0
_PROBE_SECONDS = 1.0
# The channel the message came on is gone: it cannot be acked or returned, and the broker
# has already put it back on the queue. (AMQPConnectionError is an OSError: test it first.)
_CONNECTION_LOST = (ChannelInvalidStateError, AMQPConnectionError)
# Steps of a shutdown that a broker outage could otherwise hold up until the reconnect: each
# waits at most this long, and all of them together no longer than the grace.
_SHUTDOWN_STEP_SECONDS = 5.0
_CLOSE_SECONDS = 2.0

# The hot path's statements are batched (one connection per batcher); the others (failures,
# dead letters, supersessions) take one connection each, and beyond this many wait their turn.
_POOL_CAP = 10


def pool_size(concurrency: int) -> int:
    """Database connections per replica: no more than its statements can use at once (the
    batchers' own, the parking lot's and its release loop's, the overdue sweep's, and the rest
    shared)."""
    return (
        min(concurrency, _POOL_CAP)
        + DeliveryStore.PINNED
        + ParkingLot.CONNECTIONS
        + OverdueRetries.CONNECTIONS
    )


_Handler = Callable[[AbstractIncomingMessage], Awaitable[object]]


class DatabaseGate:
    """Closed while PostgreSQL is unreachable: no message starts, none is failed.

    The first database error closes it; one probe task pings until the database answers and
    opens it again. Messages wait at the gate, so an outage stops consumption (the prefetch
    stays full) instead of cycling messages through the queue.
    """

    def __init__(self, ping: Callable[[], Awaitable[bool]]) -> None:
        self._ping = ping
        self._open = asyncio.Event()
        self._open.set()
        self._probe: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait_open(self) -> None:
        await self._open.wait()

    def close(self, error: BaseException) -> None:
        if not self.is_open:
            return
        self._open.clear()
        log.error("database_unavailable", error=describe_error(error))
        self._probe = asyncio.create_task(self._reopen())

    async def _reopen(self) -> None:
        started = asyncio.get_running_loop().time()
        while True:
            if await self._ping():
                break
            await asyncio.sleep(_PROBE_SECONDS)
        self._open.set()
        down = asyncio.get_running_loop().time() - started
        log.info("database_available", unavailable_seconds=round(down, 1))

    def cancel(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


class Replica:
    """One ``worker run`` process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._in_flight: set[asyncio.Task[None]] = set()
        self._consuming = False
        self._stopping = False
        self._engine = create_engine(
            settings.database_url, pool_size=pool_size(settings.concurrency)
        )
        self._store = DeliveryStore(self._engine, settings.lease_seconds)
        self._board = PartitionBoard(
            self._engine,
            settings.partition_fields,
            BreakerConfig(
                failures=settings.breaker_failures,
                break_seconds=settings.breaker_break_seconds,
                max_break_seconds=settings.breaker_max_break_seconds,
                fresh_probe_seconds=settings.breaker_fresh_probe_seconds,
                max_throttle_seconds=settings.backoff_max_seconds,
            ),
            settings.lease_seconds,
        )
        self._parking = ParkingLot(self._engine, self._board, settings.max_priority)
        self._overdue = OverdueRetries(
            self._engine, settings.max_priority, settings.retry_overdue_seconds
        )
        self._gate = DatabaseGate(self._store.ping)
        self._connection: AbstractRobustConnection | None = None
        self._scheduler: Scheduler | None = None
        self._acks = Acks()  # of the ingress consumer's deliveries

    async def run(self, stop: asyncio.Event) -> None:
        health = HealthServer(self.settings.metrics_port, self._ready)
        try:
            if self.settings.metrics_port:
                await health.start()
            await self._wait_for_schema(stop)
            if not stop.is_set():
                await self._connect_and_serve(stop)
        finally:
            self._gate.cancel()
            await health.stop()
            await self._store.close()
            await self._parking.close()
            await self._engine.dispose()
        log.info("stopped")

    async def _ready(self) -> bool:
        """Connected to the broker and the database, and consuming."""
        return (
            self._consuming
            and self._gate.is_open
            and self._connection is not None
            and self._connection.connected.is_set()
            and await self._store.ping()
        )

    async def _connect(self, stop: asyncio.Event) -> AbstractRobustConnection | None:
        """The broker connection; while the broker is unreachable, wait for it (None: stopped).

        Refused credentials are not waited for: they will not fix themselves.
        """
        settings = self.settings

        def unreachable(exc: Exception) -> bool:
            auth = isinstance(exc, ProbableAuthenticationError)
            return isinstance(exc, (AMQPConnectionError, OSError)) and not auth

        connection = await until_stopped(
            stop,
            partial(
                connect_cluster,
                settings.amqp_urls,
                reconnect_interval=_RECONNECT_SECONDS,
                # names the replica in the management UI and `rabbitmqctl list_connections`
                client_properties={"connection_name": f"worker {settings.queue} pid {os.getpid()}"},
            ),
            waits_for=unreachable,
            on_failure=lambda exc: log.warning("broker_unreachable", error=describe_error(exc)),
            pause=_RECONNECT_SECONDS,
        )
        if connection is not None:
            log.info("broker_connected", node=node_of(connection))
            connection.reconnect_callbacks.add(_log_reconnected)
        return connection

    async def _connect_and_serve(self, stop: asyncio.Event) -> None:
        settings = self.settings
        connection = await self._connect(stop)
        if connection is None:
            return
        self._connection = connection
        provider = ProviderClient(
            settings.require_provider_url(),
            settings.provider_timeout_seconds,
            settings.concurrency,
        )
        try:
            await self._serve(connection, provider, stop)
        finally:
            self._consuming = False
            await within(connection.close(), _CLOSE_SECONDS)
            await provider.close()

    async def _wait_for_schema(self, stop: asyncio.Event) -> None:
        """Check the schema revision; while the database is unreachable, wait for it."""
        await until_stopped(
            stop,
            self._store.check_schema,
            waits_for=db_errors.is_database_error,
            on_failure=lambda exc: log.warning("database_unreachable", error=describe_error(exc)),
            pause=_RECONNECT_SECONDS,
        )

    async def _serve(
        self,
        connection: AbstractRobustConnection,
        provider: ProviderClient,
        stop: asyncio.Event,
    ) -> None:
        settings = self.settings
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(channel, settings)
        delay = await declare_delay_backend(
            str(getattr(connection, "url", settings.amqp_urls[0])), channel, topology, settings
        )
        pipeline = Pipeline(
            settings, self._store, provider, delay, self._board, self._parking, self._acks
        )

        async def release(message: aio_pika.Message, attempt: int) -> None:
            destination = topology.queue_for(attempt)
            await channel.default_exchange.publish(message, routing_key=destination, mandatory=True)

        releaser = asyncio.create_task(self._parking.run(release, stop))

        # Fresh messages: consumed from the ingress queue, two rounds of slots ahead. Retries:
        # fetched from the work queues (fewest attempts first) on a channel of their own, only
        # for a spare slot.
        await channel.set_qos(prefetch_count=2 * settings.concurrency)
        ingress = await channel.get_queue(topology.names.ingress)
        retry_channel = await connection.channel()
        retries = [await retry_channel.get_queue(queue.name) for queue in topology.work_queues]
        if settings.queue_type is QueueType.QUORUM:
            # what the broker dead-lettered at the delivery limit: served last, to its outcome
            retries.append(await retry_channel.get_queue(topology.names.limit))
        scheduler = Scheduler(settings.concurrency, retries, partial(self._start, pipeline.handle))

        async def work_queues_empty() -> bool:
            # a passive declare each: no retry anywhere waiting its turn
            for queue in retries:
                if (await queue.declare()).message_count:
                    return False
            return True

        recoverer = asyncio.create_task(self._overdue.run(release, work_queues_empty, stop))
        self._scheduler = scheduler
        ingress_tag = await ingress.consume(self._offer)
        dispatcher = asyncio.create_task(scheduler.run())
        self._consuming = True
        DELAY_BACKEND.labels(delay.name.value).set(1)
        log.info(
            "started",
            queue=topology.names.queue,
            queue_type=settings.queue_type,
            work_queues=len(topology.work_queues),
            node=node_of(connection),
            delay_backend=delay.name,
            concurrency=settings.concurrency,
            settings=settings.safe_dump(),  # every setting, secrets masked
        )
        await stop.wait()

        log.info("stopping", in_flight=len(self._in_flight))
        self._consuming = False  # not ready from here on
        self._stopping = True
        # First no more deliveries (a message handed back while the consumer is still on
        # would come straight back), then no more slots handed out. A channel that is
        # reconnecting has no consumer to cancel; if it comes back during the drain, _offer
        # hands its deliveries straight back. No step waits for a reconnect: a broker outage
        # must not keep SIGTERM from ending the process within the grace, which all share.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.shutdown_grace_seconds

        def step() -> float:
            return max(min(deadline - loop.time(), _SHUTDOWN_STEP_SECONDS), 0.1)

        with contextlib.suppress(*_CONNECTION_LOST, AMQPError):
            await within(ingress.cancel(ingress_tag), step())
        scheduler.close()
        if not await within(asyncio.shield(dispatcher), step()):
            # a basic.get waiting for the broker: its message, if any, the broker requeues
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
        for incoming in scheduler.take_waiting():
            await within(self._return(incoming, "shutdown"), step())
        await self._drain(max(deadline - loop.time(), 0.0))
        await within(self._acks.close(), step())
        # the releaser ends its release in progress, published and committed; a broker outage
        # must not hold it up past the grace (an unfinished release is released again later)
        await within(releaser, step())
        await within(recoverer, step())

    async def _offer(self, incoming: AbstractIncomingMessage) -> None:
        if self._stopping or self._scheduler is None:
            await self._return(incoming, "shutdown")
            return
        self._acks.delivered(incoming)
        await self._scheduler.offer(incoming)

    def _start(self, handler: _Handler, incoming: AbstractIncomingMessage) -> None:
        """Run the handler in a task of our own, one slot of the scheduler.

        The task is the replica's, not the AMQP channel's: aiormq cancels a channel's tasks
        when the connection drops, and a message half-way through the pipeline would then stop
        after the provider accepted it and before the outcome is recorded. In a task of ours
        it finishes and records; only its ack is lost, the broker redelivers it, and the copy
        finds the key finished.
        """
        task = asyncio.create_task(self._handle(handler, incoming))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._scheduler is not None:
            self._scheduler.release()

    async def _handle(self, handler: _Handler, incoming: AbstractIncomingMessage) -> None:
        IN_FLIGHT.inc()
        if _limit_reached(incoming):
            DELIVERY_LIMIT_REACHED.inc()
            log.warning("delivery_limit_reached", limit=self.settings.delivery_limit)
        try:
            await self._gate.wait_open()
            if channel_closed(incoming):
                # it waited here while the connection was replaced: the broker has requeued it
                # already, and a retry published for it would start a second chain
                log.info("skipped_from_closed_channel")
                self._acks.forget(incoming)
                return
            await handler(incoming)
        except _CONNECTION_LOST as exc:
            log.warning("ack_lost", error=describe_error(exc))
        except AMQPError as exc:
            log.error("returned_to_queue", error=describe_error(exc))
            await asyncio.sleep(_ERROR_PAUSE_SECONDS)
            await self._return(incoming, "broker")
        except Exception as exc:
            if not db_errors.is_database_error(exc):
                log.exception("returned_to_queue", cause="unexpected error")
                await asyncio.sleep(_ERROR_PAUSE_SECONDS)
                await self._return(incoming, "unexpected")
                return
            kind = db_errors.classify(exc)
            if kind is DbErrorKind.OUTAGE:
                self._gate.close(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate.wait_open(), _HOLD_SECONDS)
            else:
                # the database answered, but refused a statement (a bug, a race lost again
                # and again, data the pipeline could not finish): not an outage; the message
                # goes back after a pause rather than being failed
                cause = getattr(exc, "orig", None) or exc
                log.error("returned_to_queue", kind=kind, error=describe_error(cause))
                await asyncio.sleep(_ERROR_PAUSE_SECONDS)
            await self._return(incoming, "database")
        finally:
            IN_FLIGHT.dec()

    async def _return(self, incoming: AbstractIncomingMessage, cause: str) -> None:
        """Requeue; if the channel is gone, the broker requeues the message by itself."""
        RETURNED.labels(cause).inc()
        try:
            with contextlib.suppress(ChannelInvalidStateError, AMQPError):
                await incoming.nack(requeue=True)
        finally:
            # only now: an ack with `multiple` sent before the nack would cover it
            self._acks.forget(incoming)

    async def _drain(self, grace_seconds: float) -> None:
        """Let in-flight messages finish; after the grace period cancel the rest unacked."""
        if not self._in_flight:
            return
        _, pending = await asyncio.wait(set(self._in_flight), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            RETURNED.labels("shutdown").inc(len(pending))
            log.warning("returned_unfinished", count=len(pending))


def _limit_reached(incoming: AbstractIncomingMessage) -> bool:
    """Dead-lettered by the broker for being returned ``WORKER_DELIVERY_LIMIT`` times."""
    deaths = (incoming.headers or {}).get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return False
    reason = deaths[0].get("reason")
    return (reason.decode() if isinstance(reason, bytes) else reason) == "delivery_limit"


def _log_reconnected(connection: object, *_: object) -> None:
    log.info("broker_reconnected", node=node_of(connection))  # type: ignore[arg-type]
