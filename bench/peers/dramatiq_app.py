"""Dramatiq's version of the delivery: the RabbitMQ broker, the ``Retries`` middleware.

Run as Dramatiq's docs say, ``dramatiq bench.peers.dramatiq_app --processes 2 --threads 16``.
``Retries`` (on by default) retries any exception with exponential backoff and jitter from
``min_backoff`` up to ``max_backoff``; the delayed copy goes to the queue's ``.DQ`` and is held
by a worker until due. ``max_retries`` is the worker's attempts less the first.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers import common

broker = RabbitmqBroker(url=common.AMQP_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(  # type: ignore[untyped-decorator, unused-ignore]
    actor_name="deliver",
    queue_name=common.QUEUE,
    max_retries=common.MAX_ATTEMPTS - 1,
    min_backoff=int(common.BACKOFF_BASE_SECONDS * 1000),
    max_backoff=int(common.BACKOFF_MAX_SECONDS * 1000),
)
def deliver(body: str) -> None:
    common.deliver(body)
