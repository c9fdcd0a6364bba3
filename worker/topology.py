"""Broker topology (SPEC §3): names derived from the work queue, and their declaration.

Market data publishes to the source topic exchange without a priority, and a priority queue
treats an absent priority as 0, the lowest: new messages would wait behind every retry. So the
source is bound to an *ingress* queue of fresh messages only, served before the priority work
queue (see :mod:`worker.scheduler`). Retries come back through the delay machinery straight to
the work queue, never through the source exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue

from worker.settings import Settings


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

    def delay_level(self, level: int) -> str:
        return f"{self.queue}.delay.{level:02d}"


@dataclass(frozen=True, slots=True)
class Topology:
    names: Names
    work_queue: AbstractQueue
    ingress_queue: AbstractQueue


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare the source exchange, the ingress and work queues and the ingress binding."""
    names = Names(settings.queue)
    source = await channel.declare_exchange(
        settings.source_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    work_queue = await channel.declare_queue(
        names.queue,
        durable=True,
        arguments={"x-queue-type": "classic", "x-max-priority": settings.max_priority},
    )
    ingress_queue = await channel.declare_queue(
        names.ingress, durable=True, arguments={"x-queue-type": "classic"}
    )
    await ingress_queue.bind(source, routing_key=settings.source_binding)
    return Topology(names=names, work_queue=work_queue, ingress_queue=ingress_queue)
