"""Parked messages: kept in PostgreSQL while their partition is open, released when it heals.

A message of an open partition is *parked*: the message as it would be republished (body, AMQP
headers in their wire encoding, content type) goes into ``parked_messages`` in a batched insert,
and the delivery is acked only after that commits. Nothing stays in a replica's memory, nothing
moves while it waits: a row is read once, when it is released.

Every replica runs :meth:`ParkingLot.run`: every ``REFRESH_SECONDS``, and at once when a
partition heals or the break of one with parked rows ends, it re-reads the partitions' health
(:class:`worker.partitions.PartitionBoard`), then releases, in transactions that lock the rows
they take (``FOR UPDATE SKIP LOCKED``, so replicas share the work and never take a row
twice), publish them publisher-confirmed to the work queue and delete them:

- the due rows of every partition that admits sends again (a healed partition has made all its
  rows due: :func:`worker.partitions.transition`), at their attempt's priority, so fresh
  messages still go first and fewer attempts before more, and the scheduler takes no more than
  its slots: no thundering herd. A row is released only as its topic's newest parked price;
  its older rows then wait until that one is sent (and all go, to end superseded without a
  call) or at most ``_HOLD_OLDER_SECONDS``: released together, an older
  one, at a higher priority for fewer attempts, would be sent first and the newest a whole
  backlog later. A row older than its topic's newest sent price ends ``superseded`` in the
  release's transaction, its deliveries row written from the row (``payload``,
  ``first_seen_at``): no publish, no replica's work. A healed partition's backlog is mostly such
  rows (every topic's older prices), and sent through the broker they took the CPU the newest
  prices needed (full_outage: the last backlog message sent 2.1-3.4 s after recovery, now
  1.6-1.7 s);
- every expired row, whatever its partition, so that it ends as a dead letter ``expired``
  within ``REFRESH_SECONDS`` of its due time;
- for each open partition whose break is over, one row as its *probe* (header ``x-probe``), after
  winning the probe for the fleet: a partition whose messages are all parked is still probed.

A crash between a release's publish and its commit leaves the rows to be released again: the
copies find their keys finished or leased, as any redelivered message does. For the same reason
a key may be parked twice (a released copy parked again before the release committed, a
redelivery): every row is kept, never merged, and the claim sends the key once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import structlog
from pamqp import decode, encode
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.batch_connection import BatchConnection
from worker.batching import Batcher
from worker.breaker import Admission
from worker.decisions import priority_for
from worker.envelope import NOT_BEFORE, PROBE, RELEASED, SCHEDULED_AT
from worker.errors import describe_error
from worker.metrics import MESSAGES, PARKED, RELEASED_MESSAGES
from worker.partitions import REFRESH_SECONDS, PartitionBoard
from worker.persistence import SUPERSEDE
from worker.storable import clean_text

log = structlog.get_logger("worker.parking")

# Rows released per transaction (published concurrently, then deleted); a tick goes on while
# batches come back full. Small enough that the first of a healed partition's messages are
# on the work queue within a few milliseconds, not after a whole backlog's publishes.
_RELEASE_BATCH = 100
_MAX_BATCHES_PER_TICK = 100
_COUNT_EVERY_TICKS = 10
# A tick for a break's end comes this much after it (the clock has passed it for sure), and
# ticks are at least _MIN_TICK_SECONDS apart, however many partitions' breaks end.
_PROBE_SLACK_SECONDS = 0.01
_MIN_TICK_SECONDS = 0.05
# A release's publishes are confirmed within this or the transaction rolls back (the rows go
# again next tick): a confirm lost with a killed node would hold the tick, and its rows'
# locks, forever (TimeoutError is an OSError: run() logs it and goes on).
_PUBLISH_TIMEOUT_SECONDS = 10.0

# A released row goes to the work queue of the attempt given with it (classic mode: the one).
Publish = Callable[[aio_pika.Message, int], Awaitable[None]]
# What a round of a replica's loop over stored messages (this release, worker.overdue's sweep)
# meets in an outage of the database or the broker, and outlives to try again next round; the
# channel while the connection is being restored raises a RuntimeError, not an AMQPError
# (without it the releaser died at a broker's or node's loss).
ROUND_ERRORS = (
    SQLAlchemyError,
    OSError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
)
# A row released to end superseded that SQL cannot end (parked before revision 0007, or as
# old as the newest sent price: the claim decides) goes after every message that may still be
# sent, at the lowest priority and to the last work queue: at its own attempt's, a topic's
# newest price with more attempts (a failed probe) waited behind the whole of the older rows
# of every topic (+1.4 s in partial_outage).
_LAST_IN_LINE = 1 << 20

_PARK = """
    INSERT INTO parked_messages (partition_key, idempotency_key, attempt, body, headers,
                                 content_type, occurred_at, due_at, expires_at, topic_key,
                                 payload, first_seen_at)
    SELECT * FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]), CAST($3 AS int[]),
                         CAST($4 AS bytea[]), CAST($5 AS bytea[]), CAST($6 AS text[]),
                         CAST($7 AS timestamptz[]), CAST($8 AS timestamptz[]),
                         CAST($9 AS timestamptz[]), CAST($10 AS text[]), CAST($11 AS jsonb[]),
                         CAST($12 AS timestamptz[]))
"""
# A topic's rows go one at a time, newest first (a row of an older revision has no topic: on
# its own) ...
_NEWEST_PARKED = """NOT EXISTS (
    SELECT 1 FROM parked_messages AS newer
    WHERE newer.topic_key = p.topic_key AND newer.occurred_at > p.occurred_at)"""
# ... except that all rows no newer than the topic's newest sent price go at once: they end
# superseded without a call
_WATERMARK = "(SELECT t.occurred_at FROM topic_watermarks AS t WHERE t.topic_key = p.topic_key)"
_SUPERSEDED = f"p.occurred_at <= {_WATERMARK}"
# ... and of those, what the claim would end superseded (strictly older: worker.decisions.
# is_stale; not expired: that goes first, to end `expired`) ends so in SQL
_ENDS_HERE = f"p.payload IS NOT NULL AND p.expires_at > now() AND p.occurred_at < {_WATERMARK}"
# Once a topic's newest row is released, its older rows wait until that one is sent, or at most
# this long (it may end otherwise): released at once, an older one with fewer attempts would
# be served first at its higher priority, even by another replica, and the newest after it.
_HOLD_OLDER_SECONDS = 5.0
_HOLD_OLDER = text(
    """
    UPDATE parked_messages SET due_at = GREATEST(due_at, now() + make_interval(secs => :hold))
    WHERE id IN (SELECT id FROM parked_messages WHERE topic_key = ANY(:topics)
                 FOR UPDATE SKIP LOCKED)
    """
)
# The distinct partitions with parked rows, by a walk of the index (one probe per partition).
_PARKED_PARTITIONS = text(
    """
    WITH RECURSIVE walk AS (
        (SELECT partition_key FROM parked_messages ORDER BY partition_key LIMIT 1)
        UNION ALL
        SELECT (SELECT p.partition_key FROM parked_messages AS p
                WHERE p.partition_key > walk.partition_key
                ORDER BY p.partition_key LIMIT 1)
        FROM walk WHERE walk.partition_key IS NOT NULL
    )
    SELECT partition_key FROM walk WHERE partition_key IS NOT NULL
    """
)
_TAKE_RELEASABLE = text(
    f"""
    SELECT id, attempt, body, headers, content_type, topic_key,
           COALESCE({_SUPERSEDED}, false) AS stale, COALESCE({_ENDS_HERE}, false) AS ends_here
    FROM parked_messages AS p
    WHERE (p.partition_key = ANY(:keys)
           AND ((p.due_at <= now() AND {_NEWEST_PARKED}) OR {_SUPERSEDED}))
       OR p.expires_at <= now()
    ORDER BY stale, attempt, occurred_at DESC
    LIMIT :limit FOR UPDATE SKIP LOCKED
    """
)
# The probe: the newest price of the fewest attempts, the message most worth sending first.
_TAKE_PROBE = text(
    f"""
    SELECT id, attempt, body, headers, content_type, topic_key, false AS stale,
           false AS ends_here
    FROM parked_messages AS p
    WHERE p.partition_key = :key AND {_NEWEST_PARKED}
    ORDER BY attempt, occurred_at DESC
    LIMIT 1 FOR UPDATE SKIP LOCKED
    """
)
_DELETE = text("DELETE FROM parked_messages WHERE id = ANY(:ids)")
# The rows' deliveries end superseded (a key parked twice: once); a key no longer pending is
# left as it is, as by the claim. The keys ended.
_END_SUPERSEDED = text(
    f"""
    INSERT INTO deliveries (idempotency_key, topic_key, status, attempts, first_seen_at,
                            occurred_at, payload)
    SELECT DISTINCT ON (idempotency_key) idempotency_key, topic_key, 'superseded', attempt,
           first_seen_at, occurred_at, payload
    FROM parked_messages WHERE id = ANY(:ids)
    ORDER BY idempotency_key, attempt DESC
    ON CONFLICT (idempotency_key) DO UPDATE SET {SUPERSEDE}
    WHERE deliveries.status = 'pending'
    RETURNING idempotency_key
    """
)
_COUNTS = text("SELECT partition_key, count(*) AS parked FROM parked_messages GROUP BY 1")


def encode_headers(headers: dict[str, Any]) -> bytes:
    """AMQP headers in their wire form (pamqp), so that they come back exactly as they were."""
    return bytes(encode.field_table(_wire_values(headers)))


def stored_form(message: aio_pika.Message) -> tuple[bytes, bytes, str | None]:
    """A message as PostgreSQL keeps it to publish it again (here, and worker.overdue's
    copies): its body, its headers in their wire encoding, its content type made storable."""
    content_type = message.content_type
    return (
        message.body,
        encode_headers(dict(message.headers)),
        None if content_type is None else clean_text(content_type),
    )


def decode_headers(raw: bytes) -> dict[str, Any]:
    return dict(decode.field_table(raw)[1])


def _wire_values(value: Any) -> Any:
    """pamqp encodes ``bytearray`` as a byte array, not ``bytes``: convert, at any depth."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _wire_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire_values(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Parked:
    partition: str
    topic_key: str
    idempotency_key: str
    attempt: int
    message: aio_pika.Message
    occurred_at: datetime
    due_at: datetime
    expires_at: datetime
    payload_json: str  # the deliveries row's payload (PriceChange.stored_payload_json)
    first_seen_at: datetime


class ParkingLot:
    # Lanes of the batched park (a connection each), and the release loop's one.
    LANES = 2
    CONNECTIONS = LANES + 2  # the lanes, the release loop's, the partitions' listener

    def __init__(
        self, engine: AsyncEngine, board: PartitionBoard, max_priority: int, batch_size: int = 64
    ) -> None:
        self._engine = engine
        self._transactions = engine.execution_options(isolation_level="READ COMMITTED")
        self._board = board
        self._max_priority = max_priority
        self._connections = [BatchConnection(engine) for _ in range(self.LANES)]
        self._parker = Batcher(self._park_batch, batch_size, len(self._connections))
        self._counted: set[str] = set()  # partitions whose parked count is exported
        self._parked_partitions: list[str] = []  # partitions with parked rows, at the last tick

    async def close(self) -> None:
        for connection in self._connections:
            await connection.close()

    async def park(self, parked: Parked) -> None:
        """Keep the message until its partition heals (committed when this returns)."""
        await self._parker.submit(parked)

    async def _park_batch(self, rows: Sequence[Parked], lane: int) -> list[None]:
        stored = [stored_form(r.message) for r in rows]
        await self._connections[lane].fetch(
            _PARK,
            [r.partition for r in rows],
            [r.idempotency_key for r in rows],
            [r.attempt for r in rows],
            [body for body, _, _ in stored],
            [headers for _, headers, _ in stored],
            [content_type for _, _, content_type in stored],
            [r.occurred_at for r in rows],
            [r.due_at for r in rows],
            [r.expires_at for r in rows],
            [r.topic_key for r in rows],
            [r.payload_json for r in rows],
            [r.first_seen_at for r in rows],
        )
        return [None] * len(rows)

    async def run(self, publish: Publish, stop: asyncio.Event) -> None:
        """Refresh the partitions' health and release what is due, until stopped."""
        tick = 0
        healed = self._board.healed
        listener = asyncio.create_task(self._board.listen(stop))
        while not stop.is_set():
            healed.clear()  # a heal from here on wakes the wait below
            try:
                await self.tick(publish, count=tick % _COUNT_EVERY_TICKS == 0)
            except ROUND_ERRORS as exc:
                # the replica's gate and reconnects deal with outages; try again next tick
                log.warning("release_failed", error=describe_error(exc))
            tick += 1
            # the next tick at the latest when the break of a partition with parked rows ends:
            # its probe is not a tick late
            timeout = REFRESH_SECONDS
            probe_in = self._board.seconds_to_next_probe(self._parked_partitions)
            if probe_in is not None:
                timeout = min(timeout, max(probe_in + _PROBE_SLACK_SECONDS, _MIN_TICK_SECONDS))
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(healed.wait())]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        await listener

    async def tick(self, publish: Publish, count: bool = False) -> int:
        """One round: refresh, release what is due or expired, release probes. Rows released."""
        board = self._board
        await board.refresh()
        async with self._engine.connect() as conn:
            parked = [row.partition_key for row in await conn.execute(_PARKED_PARTITIONS)]
            self._parked_partitions = parked
            if count:
                counts = {row.partition_key: row.parked for row in await conn.execute(_COUNTS)}
                for key in self._counted | counts.keys():
                    PARKED.labels(key).set(counts.get(key, 0))
                self._counted = set(counts)
        sendable = [key for key in parked if board.admit(key, None) is Admission.SEND]
        released = 0
        for _ in range(_MAX_BATCHES_PER_TICK):
            batch = await self._release(
                _TAKE_RELEASABLE, {"keys": sendable, "limit": _RELEASE_BATCH}, publish, None
            )
            released += batch
            if batch < _RELEASE_BATCH:
                break
        for key in parked:
            if board.admit(key, None) is not Admission.PROBE:
                continue
            token = await board.take_probe(key)
            if token is not None and not await self._release(
                _TAKE_PROBE, {"key": key}, publish, token
            ):
                await board.abandon_probe(key, token)  # its rows were taken meanwhile
        if released:
            RELEASED_MESSAGES.inc(released)
            log.info("released", count=released, partitions=len(sendable))
        return released

    async def _release(
        self, take: Any, params: dict[str, Any], publish: Publish, probe: uuid.UUID | None
    ) -> int:
        """Publish (or end superseded) and delete the rows ``take`` locks; hold back their
        topics' older rows."""
        async with self._transactions.begin() as conn:
            rows = (await conn.execute(take, params)).all()
            if not rows:
                return 0
            ending = [row.id for row in rows if row.ends_here]
            await asyncio.wait_for(
                asyncio.gather(
                    *(self._publish(publish, row, probe) for row in rows if not row.ends_here)
                ),
                _PUBLISH_TIMEOUT_SECONDS,
            )
            ended = []
            if ending:
                ended = list((await conn.execute(_END_SUPERSEDED, {"ids": ending})).scalars())
            await conn.execute(_DELETE, {"ids": [row.id for row in rows]})
            topics = list(
                {row.topic_key for row in rows if row.topic_key is not None and not row.ends_here}
            )
            if topics:
                await conn.execute(_HOLD_OLDER, {"topics": topics, "hold": _HOLD_OLDER_SECONDS})
        for key in ended:
            log.info("superseded", idempotency_key=key, outcome="superseded", via="parking")
        MESSAGES.labels("superseded").inc(len(ended))
        return len(rows)

    async def _publish(self, publish: Publish, row: Any, probe: uuid.UUID | None) -> None:
        place = _LAST_IN_LINE if row.stale else row.attempt
        await publish(self._message(row, probe, priority_for(place, self._max_priority)), place)

    def _message(self, row: Any, probe: uuid.UUID | None, priority: int) -> aio_pika.Message:
        headers = decode_headers(row.headers)
        headers.pop(PROBE, None)
        headers[RELEASED] = True
        if probe is not None:
            headers[PROBE] = str(probe)
        return stored_message(row, headers, priority)


def stored_message(row: Any, headers: dict[str, Any], priority: int) -> aio_pika.Message:
    """A message kept in PostgreSQL (``row``: its body and content type) published again, due
    now whatever is left of its backoff."""
    for name in (NOT_BEFORE, SCHEDULED_AT):
        headers.pop(name, None)
    return aio_pika.Message(
        body=row.body,
        headers=headers,
        content_type=row.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        priority=priority,
    )
