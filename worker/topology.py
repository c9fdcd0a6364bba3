"""Broker topology (SPEC §3): names derived from the work queue, and their declaration.

Market data publishes to the source topic exchange without a priority, and a priority queue
treats an absent priority as 0, the lowest: new messages would wait behind every retry. So the
source is bound to an *ingress* queue of fresh messages only, served before the work queue
(see :mod:`worker.scheduler`). Retries come back through the delay machinery straight to the
work queue, never through the source exchange.

``WORKER_QUEUE_TYPE=classic`` (one node): the work queue is a classic priority queue.
``quorum`` (a cluster): every queue is a quorum queue, replicated over the cluster's nodes.
Quorum queues on RabbitMQ 3.x have no priorities, so the work queue's priorities become
*attempt queues*: ``<queue>`` holds first attempts (deferred messages and replays), and
``<queue>.a1`` … ``<queue>.aN`` the messages coming back after 1 … N failed attempts; the
scheduler serves them in that order. Each quorum queue has an explicit ``x-delivery-limit``
(RabbitMQ 4 would otherwise apply 20) and dead-letters a message returned that often,
at-least-once, to ``<queue>.limit``, which the scheduler serves after the attempt queues: such
a message runs to its outcome (sent, or a dead letter), counted and logged, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from worker.settings import ENV_PREFIX, ConfigError, QueueType, Settings


@dataclass(frozen=True, slots=True)
class Names:
    """Every broker object the worker owns is named from ``WORKER_QUEUE``."""

    queue: str

    @property
    def ingress(self) -> str:
        return f"{self.queue}.ingress"

    @property
    def retry(self) -> str:
        return f"{self.queue}.retry"

    @property
    def limit(self) -> str:
        """Quorum mode: where a message returned ``WORKER_DELIVERY_LIMIT`` times goes."""
        return f"{self.queue}.limit"

    @property
    def delay_exit(self) -> str:
        """Quorum mode: the cascade's last exchange, routing to the attempt queues."""
        return f"{self.queue}.delay.out"

    def delay_level(self, level: int) -> str:
        return f"{self.queue}.delay.{level:02d}"

    def attempt_queue(self, attempt: int, count: int) -> str:
        """The work queue a message with ``attempt`` failed attempts comes back to, out of
        ``count`` attempt queues (1 in classic mode: the work queue itself)."""
        band = min(max(attempt, 0), count - 1)
        return self.queue if band == 0 else f"{self.queue}.a{band}"

    def attempt_queues(self, count: int) -> list[str]:
        """The work queues in the order the scheduler serves them: fewest attempts first."""
        return [self.attempt_queue(band, count) for band in range(count)]

    def owned_queues(self, count: int) -> list[str]:
        """Every queue the worker may declare (to delete them all)."""
        delays = [self.delay_level(level) for level in range(28)]
        return [*self.attempt_queues(max(count, 1)), self.ingress, self.limit, *delays]

    def owned_exchanges(self) -> list[str]:
        delays = [self.delay_level(level) for level in range(28)]
        return [self.retry, self.delay_exit, *delays]


@dataclass(frozen=True, slots=True)
class Topology:
    names: Names
    work_queues: list[AbstractQueue]  # fewest attempts first; classic: the one work queue
    ingress_queue: AbstractQueue
    queue_type: QueueType = QueueType.CLASSIC

    @property
    def work_queue(self) -> AbstractQueue:
        """Where first attempts go (deferred messages, replays): ``<queue>``."""
        return self.work_queues[0]

    def queue_for(self, attempt: int) -> str:
        return self.names.attempt_queue(attempt, len(self.work_queues))


def quorum_arguments(settings: Settings, dead_letter: dict[str, Any]) -> dict[str, Any]:
    """A quorum queue's arguments: an explicit delivery limit, and at-least-once
    dead-lettering (which needs ``reject-publish``) to ``dead_letter``'s target."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-overflow": "reject-publish",
        "x-dead-letter-strategy": "at-least-once",
        **dead_letter,
    }


# What a PRECONDITION_FAILED about a queue argument means, and which setting to name.
_ARGUMENT_SETTINGS = {
    "x-queue-type": "QUEUE_TYPE",
    "x-max-priority": "MAX_PRIORITY",
    "x-delivery-limit": "DELIVERY_LIMIT",
}
_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)' for queue '([^']+)'.*received (\S+) but current is (\S+)"
)


async def declare_queue(
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    other_type: dict[str, Any] | None = None,
) -> AbstractQueue:
    """Declare a durable queue; a queue that exists with other arguments (a classic queue met
    in quorum mode, say) is refused with one line naming the setting, not a channel error.

    The broker names the first argument that differs, not necessarily the type: with
    ``other_type`` (the queue's arguments in the other WORKER_QUEUE_TYPE), a refused declare is
    tried again with those, and if they match, the line says the type is what differs."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        text = str(exc)
        if other_type is not None and await _matches(channel, name, other_type):
            current, wanted = other_type["x-queue-type"], arguments["x-queue-type"]
            raise ConfigError(
                f"{ENV_PREFIX}QUEUE_TYPE: queue {name!r} exists as a {current} queue, this "
                f"replica declares {wanted} queues; drain and delete the {current} queues, or "
                f"set {ENV_PREFIX}QUEUE_TYPE={current}"
            ) from None
        found = _INEQUIVALENT.search(text)
        if found is None:
            raise ConfigError(f"{ENV_PREFIX}QUEUE: queue {name!r} exists as: {text}") from None
        argument, queue, wanted, current = found.groups()
        setting = _ARGUMENT_SETTINGS.get(argument, "QUEUE")
        raise ConfigError(
            f"{ENV_PREFIX}{setting}: queue {queue!r} exists with {argument} {current}, this "
            f"replica declares {wanted}; drain and delete it, or set {ENV_PREFIX}{setting} back"
        ) from None


async def _matches(channel: AbstractChannel, name: str, arguments: dict[str, Any]) -> bool:
    """Would the queue's declaration with ``arguments`` be accepted? (on the reopened channel:
    the refused declaration closed it)"""
    try:
        await channel.reopen()
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed:
        return False
    return True


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare the source exchange, the ingress and work queues and the ingress binding."""
    names = Names(settings.queue)
    source = await channel.declare_exchange(
        settings.source_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    to_limit = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.limit}
    classic_ingress = {"x-queue-type": "classic"}
    quorum_ingress = quorum_arguments(settings, to_limit)
    # the ingress queue first in either mode: it tells a queue of the other type apart
    if settings.queue_type is QueueType.CLASSIC:
        ingress_queue = await declare_queue(
            channel, names.ingress, classic_ingress, other_type=quorum_ingress
        )
        work_queue = await declare_queue(
            channel,
            names.queue,
            {"x-queue-type": "classic", "x-max-priority": settings.max_priority},
        )
        work_queues = [work_queue]
    else:
        ingress_queue = await declare_queue(
            channel, names.ingress, quorum_ingress, other_type=classic_ingress
        )
        work_queues = [
            await declare_queue(channel, name, quorum_arguments(settings, to_limit))
            for name in names.attempt_queues(settings.attempt_queues)
        ]
        await declare_queue(
            channel,
            names.limit,
            {"x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit},
        )
    await ingress_queue.bind(source, routing_key=settings.source_binding)
    return Topology(
        names=names,
        work_queues=work_queues,
        ingress_queue=ingress_queue,
        queue_type=settings.queue_type,
    )
