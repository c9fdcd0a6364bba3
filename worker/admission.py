"""Admission: move new messages from the ingress queue into the priority work queue.

Publishers do not set a priority, and RabbitMQ treats a missing priority as 0, the lowest, so a
new message published straight into the work queue would wait behind every retry. Admission
republishes each one at the priority of its attempt (the top for a new message) and stamps
``x-first-seen-at``; the ingress delivery is acked only after the broker confirmed the copy.
"""

from __future__ import annotations

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from worker.envelope import Delivery


class Admission:
    def __init__(self, default_exchange: AbstractExchange, work_queue: str, max_priority: int):
        self._exchange = default_exchange
        self._work_queue = work_queue
        self._max_priority = max_priority

    async def handle(self, incoming: AbstractIncomingMessage) -> None:
        delivery = Delivery.of(incoming)
        message = delivery.republish(delivery.attempt, None, self._max_priority)
        await self._exchange.publish(message, routing_key=self._work_queue, mandatory=True)
        await incoming.ack()
