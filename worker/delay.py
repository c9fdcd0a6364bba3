"""Delay backends: how a retry waits before it returns to the work queue (SPEC §3).

Both publish to the exchange ``<queue>.retry`` and hand the message back to the work queue
with its priority and headers intact:

- :class:`TtlCascade` (``ttl``) works on a stock broker. It is the binary cascade of
  NServiceBus (and kombu 5.5): level L is a queue whose fixed TTL is 2^L seconds, dead-lettering
  to the exchange of level L-1. The routing key spells the delay in binary, one word per level,
  most significant first; each level's exchange sends the message into its queue when its bit is
  1 and passes it straight on when 0. Every queue has one TTL, so a short delay never waits
  behind a long one, and any delay up to 2^28-1 s (8.5 years) is exact to the second.
- :class:`PluginDelay` (``plugin``) uses RabbitMQ's ``x-delayed-message`` exchange.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.exceptions import ChannelPreconditionFailed, ConnectionCommandInvalid

from worker.envelope import read_attempt
from worker.settings import ENV_PREFIX, ConfigError, DelayBackendName, QueueType, Settings
from worker.topology import Names, Topology, declare_queue, quorum_arguments

log = structlog.get_logger("worker.delay")

LEVELS = 28
MAX_DELAY_SECONDS = 2**LEVELS - 1
# The plugin keeps delays in Erlang timers: at most 2^32-1 ms, about 49.7 days.
MAX_PLUGIN_DELAY_MS = 2**32 - 1


class DelayBackend(Protocol):
    @property
    def name(self) -> DelayBackendName:
        """Which backend this is, for logs and metrics."""

    async def publish(self, message: aio_pika.Message, delay_seconds: float) -> None:
        """Publish ``message`` to come back after the delay, confirmed, to the work queue of
        its ``x-attempt`` (quorum mode: one queue per attempt)."""


def delay_routing_key(seconds: int, destination: str) -> str:
    """``5`` → ``0.0.…0.1.0.1.<destination>``: 28 binary words, most significant first."""
    bits = format(seconds, f"0{LEVELS}b")
    return ".".join((*bits, destination))


def _whole(delay_seconds: float, per_second: int, most: int) -> int:
    """The delay in whole units, rounded up (never early), within 0 … ``most``."""
    units = delay_seconds * per_second
    if not math.isfinite(units) or units >= most:
        return most if units > 0 else 0
    return max(math.ceil(units), 0)


def _pattern(level: int, bit: str) -> str:
    """Match bit ``level`` of the routing key: ``*.`` for each higher level, then the bit."""
    return "*." * (LEVELS - 1 - level) + bit + ".#"


@dataclass(frozen=True, slots=True)
class TtlCascade:
    entry: AbstractExchange
    topology: Topology
    name: ClassVar[DelayBackendName] = DelayBackendName.TTL

    @classmethod
    async def declare(
        cls, channel: AbstractChannel, topology: Topology, settings: Settings
    ) -> TtlCascade:
        """Classic mode: the cascade ends in the work queue. Quorum mode: its levels are
        quorum queues dead-lettering at-least-once (a message moving down survives a node's
        death), and it ends in ``<queue>.delay.out``, which routes by the routing key's last
        words, the attempt queue the message is for."""
        names = topology.names
        quorum = topology.queue_type is QueueType.QUORUM
        entry = await channel.declare_exchange(
            names.retry, aio_pika.ExchangeType.TOPIC, durable=True
        )
        out: AbstractExchange | None = None
        if quorum:
            out = await channel.declare_exchange(
                names.delay_exit, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for queue in topology.work_queues:
                await queue.bind(out, routing_key="*." * LEVELS + queue.name)
            await out.bind(entry, routing_key="0." * LEVELS + "#")  # a zero delay
        else:
            # A zero delay goes straight to the work queue.
            await topology.work_queue.bind(entry, routing_key="0." * LEVELS + "#")
        lower: AbstractExchange | None = None
        for level in range(LEVELS):
            exchange = await channel.declare_exchange(
                names.delay_level(level), aio_pika.ExchangeType.TOPIC, durable=True
            )
            if lower is not None:
                dead_letter = {"x-dead-letter-exchange": lower.name}
            elif quorum:
                dead_letter = {"x-dead-letter-exchange": names.delay_exit}
            else:
                dead_letter = {
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.queue,
                }
            ttl = {"x-message-ttl": 2**level * 1000}
            arguments = (
                {**quorum_arguments(settings, dead_letter), **ttl}
                if quorum
                else {"x-queue-type": "classic", **ttl, **dead_letter}
            )
            queue = await declare_queue(channel, names.delay_level(level), arguments)
            await queue.bind(exchange, routing_key=_pattern(level, "1"))
            if lower is not None:
                await lower.bind(exchange, routing_key=_pattern(level, "0"))
            elif out is not None:
                await out.bind(exchange, routing_key=_pattern(level, "0"))
            else:
                await topology.work_queue.bind(exchange, routing_key=_pattern(level, "0"))
            # Enter the cascade at the level of the delay's highest set bit.
            await exchange.bind(entry, routing_key="0." * (LEVELS - 1 - level) + "1.#")
            lower = exchange
        return cls(entry, topology)

    async def publish(self, message: aio_pika.Message, delay_seconds: float) -> None:
        # rounded up: a Retry-After of 2.4 s is never retried after 2 s
        seconds = _whole(delay_seconds, 1, MAX_DELAY_SECONDS)
        destination = self.topology.queue_for(read_attempt(message.headers))
        # mandatory: a cascade that is missing must raise, not swallow the retry
        await self.entry.publish(
            message, routing_key=delay_routing_key(seconds, destination), mandatory=True
        )


@dataclass(frozen=True, slots=True)
class PluginDelay:
    exchange: AbstractExchange
    topology: Topology
    name: ClassVar[DelayBackendName] = DelayBackendName.PLUGIN

    @classmethod
    async def declare(cls, channel: AbstractChannel, topology: Topology) -> PluginDelay:
        exchange = await channel.declare_exchange(
            topology.names.retry,
            "x-delayed-message",
            durable=True,
            arguments={"x-delayed-type": "direct"},
        )
        for queue in topology.work_queues:  # each work queue under its own name
            await queue.bind(exchange, routing_key=queue.name)
        return cls(exchange, topology)

    async def publish(self, message: aio_pika.Message, delay_seconds: float) -> None:
        message.headers["x-delay"] = _whole(delay_seconds, 1000, MAX_PLUGIN_DELAY_MS)
        destination = self.topology.queue_for(read_attempt(message.headers))
        # Not mandatory: the plugin answers every delayed publish with a no-route return
        # although it delivers the message later.
        await self.exchange.publish(message, routing_key=destination, mandatory=False)


@contextlib.contextmanager
def _hushed_aiormq() -> Iterator[None]:
    """The broker answers an unknown exchange type by closing the connection, which aiormq
    logs as an error with a traceback: expected in a probe, so hushed for its lifetime."""
    aiormq_log = logging.getLogger("aiormq.connection")
    previous_level = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        aiormq_log.setLevel(previous_level)


async def broker_has_plugin(amqp_url: str, names: Names) -> bool:
    """Probe on a throwaway connection: can an ``x-delayed-message`` exchange be declared?

    An unknown exchange type is a connection-level error in AMQP 0-9-1, so the probe must not
    share the worker's connection.
    """
    with _hushed_aiormq():
        return await _declares_probe(amqp_url, names)


async def _declares_probe(amqp_url: str, names: Names) -> bool:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange(
            f"{names.retry}.probe",
            "x-delayed-message",
            auto_delete=True,
            arguments={"x-delayed-type": "direct"},
        )
        await exchange.delete()
        return True
    except ConnectionCommandInvalid:
        return False
    finally:
        await connection.close()


async def _retry_exchange_fits(amqp_url: str, names: Names, backend: DelayBackendName) -> bool:
    """Can ``<queue>.retry`` be declared as ``backend`` declares it (False: it exists with
    another type)? Asked on a
    throwaway connection: the broker answers a mismatch by closing the channel (406
    PRECONDITION_FAILED). An exchange that does not exist yet is declared, as it would be.
    A broker without the plugin cannot declare its type at all (a connection error): no fit."""
    with _hushed_aiormq():
        return await _fits_probe(amqp_url, names, backend)


async def _fits_probe(amqp_url: str, names: Names, backend: DelayBackendName) -> bool:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        if backend is DelayBackendName.PLUGIN:
            await channel.declare_exchange(
                names.retry,
                "x-delayed-message",
                durable=True,
                arguments={"x-delayed-type": "direct"},
            )
        else:
            await channel.declare_exchange(names.retry, aio_pika.ExchangeType.TOPIC, durable=True)
        return True
    except (ChannelPreconditionFailed, ConnectionCommandInvalid):
        return False
    finally:
        await connection.close()


async def declare_delay_backend(
    amqp_url: str,
    channel: AbstractChannel,
    topology: Topology,
    settings: Settings,
) -> DelayBackend:
    """Declare the chosen backend; ``auto`` takes the plugin when the broker has it, except
    in quorum mode: the plugin keeps its delayed messages on one node, unreplicated.

    ``auto`` keeps the backend the queue already has: a broker that gained the plugin since
    ``<queue>.retry`` was declared for ``ttl`` (or lost it, the other way round) would
    otherwise refuse the declaration on every start, and every replica would crash-loop.
    """
    wanted = settings.delay_backend
    quorum = topology.queue_type is QueueType.QUORUM
    if wanted is DelayBackendName.TTL or (quorum and wanted is DelayBackendName.AUTO):
        return await TtlCascade.declare(channel, topology, settings)
    has_plugin = await broker_has_plugin(amqp_url, topology.names)
    if wanted is DelayBackendName.PLUGIN:
        if not has_plugin:
            raise ConfigError(
                f"{ENV_PREFIX}DELAY_BACKEND: 'plugin' needs the broker's "
                "rabbitmq_delayed_message_exchange plugin, which it has not; use 'ttl' or 'auto'"
            )
        return await PluginDelay.declare(channel, topology)
    choice = DelayBackendName.PLUGIN if has_plugin else DelayBackendName.TTL
    if not await _retry_exchange_fits(amqp_url, topology.names, choice):
        other = DelayBackendName.TTL if has_plugin else DelayBackendName.PLUGIN
        if other is DelayBackendName.PLUGIN:
            raise ConfigError(
                f"{ENV_PREFIX}DELAY_BACKEND: {topology.names.retry} is an x-delayed-message "
                "exchange but the broker no longer has the plugin; enable it, or delete the "
                "exchange (retries waiting in it are lost) for the ttl backend"
            )
        log.warning(
            "delay_backend_kept",
            backend=other,
            reason=f"{topology.names.retry} was declared for {other.value}; the broker now "
            f"has the plugin, but auto keeps the existing exchange (delete it to switch)",
        )
        choice = other
    if choice is DelayBackendName.PLUGIN:
        return await PluginDelay.declare(channel, topology)
    return await TtlCascade.declare(channel, topology, settings)
