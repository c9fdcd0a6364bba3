"""``worker-admin replay``: dead letters back onto the work queue as first attempts.

In batches, each batch one PostgreSQL transaction (READ COMMITTED):

1. ``SELECT … FROM dead_letters WHERE <selection> AND id > <last id> ORDER BY id
   FOR UPDATE SKIP LOCKED LIMIT <batch>``: the rows are ours until the commit, and a concurrent
   replay skips them, so two operators never publish the same row;
2. their ``deliveries`` rows go from ``dead`` back to ``pending`` (never a ``sent`` one), in
   a statement of its own that commits *before* the publish: the worker reads a key's status
   with committed data only, so a replayed message it consumed before our commit would still
   find ``dead`` and be dropped as already finished. A ``pending`` key without a message (we
   crash before publishing) is harmless: the dead letter is still unreplayed, and the next
   replay publishes it;
3. each row's exact payload is published to the work queue (default exchange, mandatory,
   persistent, publisher-confirmed; all of the batch concurrently) with its stored headers minus
   ``x-attempt`` and ``x-last-error``, plus ``x-replayed-from`` and a fresh ``x-first-seen-at``;
4. ``UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1`` and commit.

A failed publish raises and the batch's transaction rolls back: its rows stay unreplayed (keys
of messages the broker returned or refused go back to ``dead``).

Ctrl-C or SIGTERM (the task cancelled) lets the batch in progress finish, publishes confirmed
and rows committed, and then stops: every row is replayed, published once, or untouched. A
second one, a kill or a crash between a batch's publish and its commit leaves that batch's rows
unreplayed although their messages are on the queue; the next replay publishes them again,
which is harmless: the worker never sends an idempotency key twice. Batches are paced by
``--rate`` (:mod:`worker.admin.pacing`) between transactions, never within one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic
from sqlalchemy import ARRAY, BigInteger, Text, any_, bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from worker.admin.errors import Failure, describe
from worker.admin.pacing import Pacer
from worker.admin.queries import (
    Filters,
    count_rows,
    counts_by_reason,
    existing_ids,
    held_back,
    replayable,
    summary_select,
)
from worker.envelope import (
    ATTEMPT,
    FIRST_SEEN_AT,
    IGNORE_MAX_AGE,
    LAST_ERROR,
    REPLAYED_FROM,
    carried_headers,
)
from worker.schema import dead_letters, deliveries

# How long the broker may take to confirm one batch before the replay gives up on it.
CONFIRM_TIMEOUT_SECONDS = 60.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What to replay and how; ``filters.ids`` set means exactly those rows (``--id``)."""

    filters: Filters
    force: bool = False
    priority: int = 9
    batch: int = 500
    rate: float | None = None  # messages per second; None: as fast as the broker confirms

    @property
    def by_id(self) -> bool:
        return bool(self.filters.ids)


@dataclass(slots=True)
class ReplayReport:
    replayed: int = 0
    selected: int = 0  # rows the selection held when the replay began
    skipped: dict[str, int] = field(default_factory=dict)  # reason → rows held back
    busy: int = 0  # --id rows another replay held locked
    planned: list[Any] = field(default_factory=list)  # --dry-run: the first rows it would take

    def summary(self, dry_run: bool = False) -> str:
        """``replayed 120, skipped 3 (expired: use --force)``."""
        verb = "would replay" if dry_run else "replayed"
        count = self.selected if dry_run else self.replayed
        skipped = sum(self.skipped.values())
        line = f"{verb} {count}, {'would skip' if dry_run else 'skipped'} {skipped + self.busy}"
        reasons: list[str] = []
        if skipped:
            if len(self.skipped) == 1:
                reasons.append(f"{next(iter(self.skipped))}: use --force")
            else:
                parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
                reasons.append(f"{parts}: use --force")
        if self.busy:
            reasons.append(f"{self.busy} being replayed by another worker-admin")
        return f"{line} ({'; '.join(reasons)})" if reasons else line


def replay_message(
    row: Any, priority: int, first_seen_at: datetime, force: bool
) -> aio_pika.Message:
    """The dead letter as a first attempt: its exact bytes, its headers without the retry
    state, marked as replayed; ``x-ignore-max-age`` for an expired row replayed with --force
    (and kept if a forced replay set it before)."""
    headers: dict[str, Any] = carried_headers(_mapping(row.headers))
    headers.pop(ATTEMPT, None)
    headers.pop(LAST_ERROR, None)
    headers[REPLAYED_FROM] = int(row.id)
    headers[FIRST_SEEN_AT] = first_seen_at.isoformat()
    if force and row.reason == "expired":
        headers[IGNORE_MAX_AGE] = 1
    return aio_pika.Message(
        body=bytes(row.payload),
        headers=headers,
        content_type=row.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=priority,
    )


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


async def plan(engine: AsyncEngine, request: ReplayRequest, shown: int) -> ReplayReport:
    """What a replay would do (--dry-run), with its first ``shown`` rows: reads only, locks
    nothing, publishes nothing."""
    report = await prepare(engine, request)
    async with engine.connect() as conn:
        statement = summary_select(request.filters, replayable(request.force))
        report.planned = list(
            (await conn.execute(statement.order_by(dead_letters.c.id).limit(shown))).fetchall()
        )
    return report


async def _check_ids(conn: AsyncConnection, filters: Filters) -> None:
    if not filters.ids:
        return
    missing = sorted(set(filters.ids) - await existing_ids(conn, filters.ids))
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" …" if len(missing) > 10 else "")
        raise Failure(f"no dead letter with id {shown}; nothing replayed")


async def prepare(engine: AsyncEngine, request: ReplayRequest) -> ReplayReport:
    """Before a replay: unknown ids fail it; the rows selected and held back are counted."""
    async with engine.connect() as conn:
        await _check_ids(conn, request.filters)
        return ReplayReport(
            selected=await count_rows(conn, request.filters, replayable(request.force)),
            skipped=await counts_by_reason(conn, request.filters, held_back(request.force)),
        )


async def replay(
    engine: AsyncEngine,
    channel: AbstractChannel,
    queue: str,
    request: ReplayRequest,
    report: ReplayReport,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Replay batch after batch until no selected row is left; counts into ``report`` and
    calls ``progress`` with each batch's count.

    ``engine`` is the autocommit engine; batches run on a READ COMMITTED view of it.
    """
    transactional = engine.execution_options(isolation_level="READ COMMITTED")
    pacer = Pacer(request.rate)
    cursor = 0
    while True:
        await pacer.wait()
        async with transactional.connect() as conn:
            taken = await _uninterrupted(
                _batch(engine, conn, channel, queue, request, report, cursor)
            )
        if taken is None:
            break
        cursor, count = taken
        pacer.spent(count)
        if progress is not None:
            progress(count)
    if request.by_id:
        report.busy = max(
            len(request.filters.ids) - report.replayed - sum(report.skipped.values()), 0
        )


async def _uninterrupted(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile, then pass the
    cancellation on; a second cancellation cancels ``work`` too."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _batch(
    engine: AsyncEngine,
    conn: AsyncConnection,
    channel: AbstractChannel,
    queue: str,
    request: ReplayRequest,
    report: ReplayReport,
    cursor: int,
) -> tuple[int, int] | None:
    """One transaction; returns the last id taken and the count, or None when none was left."""
    tx = await conn.begin()
    try:
        c = dead_letters.c
        rows = (
            await conn.execute(
                select(dead_letters)
                .where(*request.filters.clauses(), replayable(request.force), c.id > cursor)
                .order_by(c.id)
                .limit(request.batch)
                .with_for_update(skip_locked=True)
            )
        ).fetchall()
        if not rows:
            await tx.rollback()
            return None
        ids = [int(row.id) for row in rows]
        reopened = await _reopen_deliveries(engine, rows)
        await _publish(engine, channel, queue, rows, request, reopened)
        await conn.execute(
            update(dead_letters)
            .where(c.id == any_(bindparam("ids", ids, type_=ARRAY(BigInteger))))
            .values(replayed_at=func.now(), replay_count=c.replay_count + 1)
        )
    except BaseException:
        if tx.is_active:
            await _rollback_quietly(tx)
        raise
    await _commit(tx, report, len(rows))
    return ids[-1], len(rows)


async def _rollback_quietly(tx: AsyncTransaction) -> None:
    """Roll back if the connection still can; if not, closing it rolls back on the server."""
    # the original error is the one to report
    with contextlib.suppress(SQLAlchemyError, OSError):
        await tx.rollback()


async def _commit(tx: AsyncTransaction, report: ReplayReport, count: int) -> None:
    """Commit; a cancellation meanwhile waits for the answer, so the count stays exact."""
    commit = asyncio.ensure_future(tx.commit())
    try:
        await _uninterrupted(commit)
    finally:
        if commit.done() and not commit.cancelled() and commit.exception() is None:
            report.replayed += count


def _keys(rows: Sequence[Any]) -> list[str]:
    return sorted({str(row.idempotency_key) for row in rows if row.idempotency_key})


async def _reopen_deliveries(engine: AsyncEngine, rows: Sequence[Any]) -> set[str]:
    """``dead`` → ``pending`` for the rows' keys, committed now; returns the keys changed."""
    keys = _keys(rows)
    if not keys:
        return set()
    key = deliveries.c.idempotency_key
    async with engine.connect() as conn:
        result = await conn.execute(
            update(deliveries)
            .where(key == any_(bindparam("keys", keys, type_=ARRAY(Text))))
            .where(deliveries.c.status == "dead")
            # first attempts again: the pipeline continues a key from its recorded attempts
            .values(status="pending", attempts=0, updated_at=func.now())
            .returning(key)
        )
        return {str(k) for k in result.scalars()}


async def _publish(
    engine: AsyncEngine,
    channel: AbstractChannel,
    queue: str,
    rows: Sequence[Any],
    request: ReplayRequest,
    reopened: set[str],
) -> None:
    """Publish the batch concurrently and wait for every confirm; raise if any failed."""
    now = datetime.now(UTC)
    exchange = channel.default_exchange
    messages = [replay_message(row, request.priority, now, request.force) for row in rows]
    try:
        async with asyncio.timeout(CONFIRM_TIMEOUT_SECONDS):
            results = await asyncio.gather(
                *(exchange.publish(m, routing_key=queue, mandatory=True) for m in messages),
                return_exceptions=True,
            )
    except TimeoutError:
        raise Failure(
            f"the broker did not confirm the batch within {CONFIRM_TIMEOUT_SECONDS:.0f} s"
        ) from None
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return
    # Messages the broker returned or refused are not on any queue: their keys, unless another
    # row of the batch with the same key did get through, go back to dead.
    refused = {
        str(row.idempotency_key)
        for row, result in zip(rows, results, strict=True)
        if isinstance(result, DeliveryError) and row.idempotency_key
    }
    through = {
        str(row.idempotency_key)
        for row, result in zip(rows, results, strict=True)
        if not isinstance(result, BaseException) and row.idempotency_key
    }
    await _close_again(engine, (refused - through) & reopened)
    raise Failure(_publish_failure(errors[0], queue, len(errors), len(rows)))


async def _close_again(engine: AsyncEngine, keys: set[str]) -> None:
    if not keys:
        return
    key = deliveries.c.idempotency_key
    async with engine.connect() as conn:
        await conn.execute(
            update(deliveries)
            .where(key == any_(bindparam("keys", sorted(keys), type_=ARRAY(Text))))
            .where(deliveries.c.status == "pending")
            .values(status="dead", updated_at=func.now())
        )


def _publish_failure(error: BaseException, queue: str, failed: int, total: int) -> str:
    what = f"{failed} of {total} messages of the batch"
    if isinstance(error, DeliveryError) and isinstance(error.frame, Basic.Return):
        return (
            f"the broker returned {what} as unroutable ({error.frame.reply_text}): "
            f"is there a work queue {queue!r}? (WORKER_QUEUE; `worker run` declares it)"
        )
    if isinstance(error, DeliveryError):
        return f"the broker refused {what} (nack)"
    return f"publishing {what} failed: {describe(error)}"
