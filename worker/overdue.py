"""Retries the broker did not bring back, republished from PostgreSQL.

A retry goes to the delay backend with a copy in ``retry_watch`` (written by the statement that
records its failure: no extra round trip). Normally it comes back when its backoff ends, and
its copy is deleted once its key is finished. But a broker can stall a hop: RabbitMQ 3.10.8
leaves an at-least-once dead-letter hop between quorum queues unsent when the target's leader
dies at that moment (docs/deploy.md), and the retry would wait in its delay level forever.

Every replica runs :meth:`OverdueRetries.run`. Every few seconds it deletes the copies of
finished keys that are overdue, and, when every work queue is empty (so the retry is not merely
waiting its turn), it republishes, publisher-confirmed, the copies overdue by
``WORKER_RETRY_OVERDUE_SECONDS`` whose key is still pending and not parked, to the work queue
of their attempt, and sets them due again: each at most once per that time. The rows are
locked (``FOR UPDATE SKIP LOCKED``), so two replicas never republish one. A copy that was not
lost after all is harmless: the key's claim ends the later one ``already_finished``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aio_pika
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.decisions import priority_for
from worker.errors import describe_error
from worker.metrics import RECOVERED_RETRIES
from worker.parking import ROUND_ERRORS, Publish, decode_headers, stored_form, stored_message
from worker.persistence import RetryCopy

log = structlog.get_logger("worker.overdue")

_BATCH = 100
# A republish is confirmed within this or the transaction rolls back (tried again next sweep).
_PUBLISH_TIMEOUT_SECONDS = 10.0

_DELETE_FINISHED = text(
    """
    DELETE FROM retry_watch AS w USING deliveries AS d
    WHERE d.idempotency_key = w.idempotency_key AND d.status <> 'pending'
      AND w.due_at < now() - make_interval(secs => :overdue)
    """
)
_TAKE_OVERDUE = text(
    """
    SELECT w.idempotency_key, w.attempt, w.body, w.headers, w.content_type
    FROM retry_watch AS w JOIN deliveries AS d ON d.idempotency_key = w.idempotency_key
    WHERE w.due_at < now() - make_interval(secs => :overdue) AND d.status = 'pending'
      AND NOT EXISTS (SELECT 1 FROM parked_messages AS p
                      WHERE p.idempotency_key = w.idempotency_key)
    ORDER BY w.due_at
    LIMIT :limit FOR UPDATE OF w SKIP LOCKED
    """
)
_DUE_AGAIN = text("UPDATE retry_watch SET due_at = now() WHERE idempotency_key = ANY(:keys)")


def copy_of(message: aio_pika.Message, due_at: datetime) -> RetryCopy:
    """The retry as published, kept as a parked message is, until it is back."""
    body, headers, content_type = stored_form(message)
    return RetryCopy(body=body, headers=headers, content_type=content_type, due_at=due_at)


def sweep_seconds(overdue_seconds: float) -> float:
    """How often a replica looks: a quarter of the overdue time, between 0.5 and 10 s."""
    return min(max(overdue_seconds / 4, 0.5), 10.0)


class OverdueRetries:
    CONNECTIONS = 1  # the sweep's, one statement or transaction at a time

    def __init__(self, engine: AsyncEngine, max_priority: int, overdue_seconds: float) -> None:
        self._engine = engine  # autocommit
        self._transactions = engine.execution_options(isolation_level="READ COMMITTED")
        self._max_priority = max_priority
        self._overdue = overdue_seconds

    async def run(
        self,
        publish: Publish,
        queues_empty: Callable[[], Awaitable[bool]],
        stop: asyncio.Event,
    ) -> None:
        """Sweep every :func:`sweep_seconds` until stopped."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), sweep_seconds(self._overdue))
            if stop.is_set():
                return
            try:
                await self.sweep(publish, queues_empty)
            except ROUND_ERRORS as exc:
                # outages are the replica's gate's and reconnects' to deal with; next sweep
                log.warning("overdue_sweep_failed", error=describe_error(exc))

    async def sweep(self, publish: Publish, queues_empty: Callable[[], Awaitable[bool]]) -> int:
        """Delete the finished keys' copies; republish the lost ones. How many republished."""
        params = {"overdue": self._overdue, "limit": _BATCH}
        async with self._engine.begin() as conn:
            await conn.execute(_DELETE_FINISHED, params)
        if not await queues_empty():
            return 0
        async with self._transactions.begin() as conn:
            rows = (await conn.execute(_TAKE_OVERDUE, params)).all()
            if not rows:
                return 0
            await asyncio.wait_for(
                asyncio.gather(*(publish(self._message(row), row.attempt) for row in rows)),
                _PUBLISH_TIMEOUT_SECONDS,
            )
            await conn.execute(_DUE_AGAIN, {"keys": [row.idempotency_key for row in rows]})
        for row in rows:
            log.warning(
                "retry_recovered",
                idempotency_key=row.idempotency_key,
                attempt=row.attempt,
                overdue_seconds=self._overdue,
            )
        RECOVERED_RETRIES.inc(len(rows))
        return len(rows)

    def _message(self, row: Any) -> aio_pika.Message:
        priority = priority_for(row.attempt, self._max_priority)
        return stored_message(row, decode_headers(row.headers), priority)
