"""Quorum mode: the messages the broker gave up on after ``WORKER_DELIVERY_LIMIT`` returns.

A quorum queue counts every return of a message (a nack at a database outage, a channel that
closed at shutdown or when a node died) and, at its ``x-delivery-limit``, dead-letters it.
Ours dead-letter, at-least-once, to ``<queue>.limit``; the replica consumes that queue and ends
each message as a dead letter ``exhausted`` with the reason in ``last_error`` (so
``worker-admin stats`` groups them and ``replay --group`` sends them again), never nowhere. A
key already finished (sent, say, before its ack was lost) gets no dead letter.
"""

from __future__ import annotations

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker.envelope import Delivery
from worker.message import InvalidMessage, parse_message
from worker.metrics import DEAD_LETTERS
from worker.persistence import DeliveryStore

log = structlog.get_logger("worker.limit")

REASON = "exhausted"


def limit_error(limit: int) -> str:
    return (
        f"returned to the broker {limit} times without an outcome "
        "(x-delivery-limit, WORKER_DELIVERY_LIMIT)"
    )


async def record_limit(
    store: DeliveryStore, incoming: AbstractIncomingMessage, limit: int, max_body_bytes: int
) -> int | None:
    """Record one message of the limit queue as a dead letter and ack it; returns its id
    (None: already finished). Database errors propagate: the message is then not acked."""
    delivery = Delivery.of(incoming)
    error = limit_error(limit)
    try:
        message = parse_message(
            incoming.body,
            delivery.received_at,
            content_type=incoming.content_type,
            max_bytes=max_body_bytes,
        )
    except InvalidMessage as exc:
        dead_id = await store.dead_letter_invalid(
            delivery.raw(), f"{error}; {exc}", delivery.attempt
        )
    else:
        dead_id = await store.dead_letter(
            REASON,
            delivery.raw(),
            message,
            error,
            attempts=delivery.attempt,
            token=None,
            provider_status=None,
        )
    await incoming.ack()
    if dead_id is not None:
        DEAD_LETTERS.labels(REASON).inc()
    log.warning("delivery_limit_reached", dead_letter=dead_id, limit=limit, error=error)
    return dead_id
