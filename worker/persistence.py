"""The delivery record in PostgreSQL: claims, outcomes, dead letters.

Every call is one SQL statement on an autocommit connection: one round trip, atomic on its
own, with no transaction held open across the provider call. Concurrency between replicas is
settled by a *topic lease* on ``topic_watermarks`` taken by compare-and-set on its ``version``:
while one replica sends a message of a topic key, no other sends any message of that topic, so
an idempotency key is never sent twice at once and an older price never overtakes a newer one.
A delivery's claim (record the key, read its state, take the lease) is one statement; so are
its outcome's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import Boolean, DateTime, Integer, LargeBinary

from worker import db_errors
from worker.batch_connection import BatchConnection
from worker.batching import Batcher
from worker.decisions import ClaimState
from worker.message import PriceChange
from worker.schema import SCHEMA_REVISION
from worker.storable import MAX_TEXT_CHARS, dumps, storable_json, storable_text


class SchemaMismatch(RuntimeError):
    """The database is not at the schema revision this code expects."""


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    """One pooled engine per process, in autocommit: each statement commits by itself."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        # No pre-ping: it would cost a round trip per checkout, i.e. per statement. A dead
        # connection (database restarted) fails its statement, SQLAlchemy invalidates the
        # pool, and the replica's database gate holds messages until a fresh one answers.
        isolation_level="AUTOCOMMIT",
        json_serializer=dumps,
        # fail fast when PostgreSQL is away, instead of asyncpg's 60 s connect timeout
        connect_args={"timeout": 5, "command_timeout": 30},
    )


# The statements of every delivery take a batch of rows each (worker.batching): arrays bound
# once, unnest()ed, and every output row numbered by its input position. Input rows are sorted
# by topic, then key, so that concurrent batches lock rows in one order.

_CLAIM = """
    WITH input AS (
        SELECT * FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]),
                             CAST($3 AS int[]), CAST($4 AS timestamptz[]),
                             CAST($5 AS timestamptz[]), CAST($6 AS jsonb[]),
                             CAST($7 AS uuid[]))
            WITH ORDINALITY AS i (key, topic, attempts, first_seen_at, occurred_at, payload,
                                  token, n)
    ), new_delivery AS (
        INSERT INTO deliveries (idempotency_key, topic_key, status, attempts,
                                first_seen_at, occurred_at, payload)
        SELECT key, topic, 'pending', attempts, first_seen_at, occurred_at, payload
        FROM input ORDER BY n
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING idempotency_key, status
    ), state AS (
        -- rows inserted by this statement are not visible to its own reads: hence COALESCE
        SELECT i.n, i.topic, i.token, i.occurred_at, t.topic_key IS NOT NULL AS has_topic,
               COALESCE(nd.status, d.status, 'pending') AS status,
               GREATEST(i.attempts, COALESCE(d.attempts, 0)) AS attempts,
               t.occurred_at AS watermark, t.lease_until, t.lease_occurred_at, t.version
        FROM input AS i
        LEFT JOIN new_delivery AS nd ON nd.idempotency_key = i.key
        LEFT JOIN deliveries AS d ON d.idempotency_key = i.key
        LEFT JOIN topic_watermarks AS t ON t.topic_key = i.topic
    ), claimable AS (
        -- worker.decisions.decide_claim's CLAIM, for the newest such message of each topic
        SELECT DISTINCT ON (topic) topic, token, occurred_at, has_topic, version
        FROM state
        WHERE status = 'pending'
          AND (watermark IS NULL OR occurred_at >= watermark)
          AND (lease_until IS NULL
               OR (lease_until <= now()
                   AND (lease_occurred_at IS NULL OR occurred_at >= lease_occurred_at)))
        ORDER BY topic, occurred_at DESC, n
    ), new_topic AS (
        -- a topic seen for the first time is created leased; one created meanwhile by
        -- another statement is left alone, and this message reads its state again
        INSERT INTO topic_watermarks (topic_key, lease_token, lease_until, lease_occurred_at,
                                      version)
        SELECT topic, token, now() + make_interval(secs => $8), occurred_at, 1
        FROM claimable WHERE NOT has_topic ORDER BY topic
        ON CONFLICT (topic_key) DO NOTHING
        RETURNING lease_token
    ), leased AS (
        -- compare-and-set on the version read: a topic changed since is not leased
        UPDATE topic_watermarks AS t
        SET lease_token = c.token,
            lease_until = now() + make_interval(secs => $8),
            lease_occurred_at = c.occurred_at,
            -- taking over an expired lease: its holder may have delivered before it died
            occurred_at = CASE WHEN t.lease_until IS NULL THEN t.occurred_at
                               ELSE GREATEST(t.occurred_at, t.lease_occurred_at) END,
            version = t.version + 1
        FROM claimable AS c
        WHERE c.has_topic AND t.topic_key = c.topic AND t.version = c.version
        RETURNING t.lease_token
    ), won AS (
        SELECT lease_token FROM new_topic UNION ALL SELECT lease_token FROM leased
    )
    SELECT s.n, s.status, s.attempts, s.watermark, s.lease_until, s.lease_occurred_at,
           now() AS now, s.token IN (SELECT lease_token FROM won) AS won
    FROM state AS s
    ORDER BY s.n
"""

# Record the sends, raise each topic's watermark to its newest sent message and release the
# leases these sends held, atomically.
_MARK_SENT = """
    WITH input AS (
        SELECT * FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]),
                             CAST($3 AS timestamptz[]), CAST($4 AS uuid[]),
                             CAST($5 AS int[]), CAST($6 AS int[]),
                             CAST($7 AS text[]))
            AS i (key, topic, occurred_at, token, attempts, provider_status,
                  provider_message_id)
    ), delivery AS (
        UPDATE deliveries AS d
        SET status = 'sent', attempts = i.attempts, sent_at = now(), updated_at = now(),
            provider_message_id = i.provider_message_id, provider_status = i.provider_status,
            last_error = NULL
        FROM input AS i
        WHERE d.idempotency_key = i.key
    ), per_topic AS (
        SELECT topic, max(occurred_at) AS occurred_at,
               (array_agg(key ORDER BY occurred_at DESC))[1] AS key,
               array_agg(token) AS tokens
        FROM input GROUP BY topic
    )
    UPDATE topic_watermarks AS t
    SET idempotency_key = CASE WHEN t.occurred_at IS NULL OR t.occurred_at < p.occurred_at
                               THEN p.key ELSE t.idempotency_key END,
        occurred_at = GREATEST(t.occurred_at, p.occurred_at),
        lease_token = CASE WHEN t.lease_token = ANY(p.tokens) THEN NULL ELSE t.lease_token END,
        lease_until = CASE WHEN t.lease_token = ANY(p.tokens) THEN NULL ELSE t.lease_until END,
        lease_occurred_at = CASE WHEN t.lease_token = ANY(p.tokens) THEN NULL
                                 ELSE t.lease_occurred_at END,
        version = t.version + 1
    FROM per_topic AS p
    WHERE t.topic_key = p.topic
"""

# Releasing the lease after a failed send. An attempt that got no answer (timeout, cut
# connection) may have reached the provider: for ordering it counts as sent, so the watermark
# rises to its occurred_at and no older message of the topic is sent after it.
_RELEASE = """
    lease_token = NULL, lease_until = NULL, lease_occurred_at = NULL, version = version + 1,
    occurred_at = CASE WHEN {maybe_delivered} THEN GREATEST(occurred_at, lease_occurred_at)
                       ELSE occurred_at END
"""

# Count the failed attempts and release the leases they held (batched like the three above);
# keep a copy of each retry sent to the delay backend in retry_watch (worker.overdue), the
# latest of a key's retries if it has two in the batch.
_RECORD_FAILURES = f"""
    WITH input AS (
        SELECT * FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]), CAST($3 AS uuid[]),
                             CAST($4 AS int[]), CAST($5 AS int[]), CAST($6 AS text[]),
                             CAST($7 AS bool[]), CAST($8 AS bytea[]), CAST($9 AS bytea[]),
                             CAST($10 AS text[]), CAST($11 AS timestamptz[]))
            AS i (key, topic, token, attempts, provider_status, last_error, maybe_delivered,
                  body, headers, content_type, due_at)
    ), watched AS (
        INSERT INTO retry_watch (idempotency_key, attempt, body, headers, content_type, due_at)
        SELECT DISTINCT ON (key) key, attempts, body, headers, content_type, due_at
        FROM input WHERE due_at IS NOT NULL
        ORDER BY key, attempts DESC
        ON CONFLICT (idempotency_key) DO UPDATE
        SET attempt = excluded.attempt, body = excluded.body, headers = excluded.headers,
            content_type = excluded.content_type, due_at = excluded.due_at
    ), delivery AS (
        UPDATE deliveries AS d
        SET attempts = GREATEST(d.attempts, i.attempts), last_error = i.last_error,
            provider_status = i.provider_status, updated_at = now()
        FROM input AS i
        WHERE d.idempotency_key = i.key AND d.status = 'pending'
    )
    UPDATE topic_watermarks
    SET {_RELEASE.format(maybe_delivered="i.maybe_delivered")}
    FROM input AS i
    WHERE topic_key = i.topic AND lease_token = i.token
"""

# A pending delivery ending superseded; an earlier attempt that got no answer may have reached
# the provider: say so (also worker.parking's superseded rows)
SUPERSEDE = """status = 'superseded', updated_at = now(),
        last_error = CASE WHEN deliveries.attempts > 0 AND deliveries.provider_status IS NULL
                          THEN 'superseded; an earlier attempt got no answer and may have '
                               || 'been delivered (' || coalesce(deliveries.last_error, '')
                               || ')'
                          ELSE deliveries.last_error END"""
_MARK_SUPERSEDED = text(
    f"UPDATE deliveries SET {SUPERSEDE} WHERE idempotency_key = :key AND status = 'pending'"
)

_DEAD_LETTER_COLUMNS = """
    (idempotency_key, reason, payload, content_type, routing_key, headers,
     ticker, channel, audience, attempts, last_error, first_seen_at, sanitised, delivery_hash)
"""

_DEAD_LETTER_DELIVERY = text(
    f"""
    WITH delivery AS (
        INSERT INTO deliveries (idempotency_key, topic_key, status, attempts, first_seen_at,
                                occurred_at, payload, last_error, provider_status)
        VALUES (:key, :topic, 'dead', :attempts, :first_seen_at, :occurred_at, :payload,
                :last_error, :provider_status)
        ON CONFLICT (idempotency_key) DO UPDATE
        SET status = 'dead', attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
            provider_status = EXCLUDED.provider_status, updated_at = now()
        WHERE deliveries.status = 'pending'
        RETURNING idempotency_key
    ), released AS (
        UPDATE topic_watermarks
        SET {_RELEASE.format(maybe_delivered=":maybe_delivered")}
        WHERE topic_key = :topic AND lease_token = :token
    )
    INSERT INTO dead_letters {_DEAD_LETTER_COLUMNS}
    SELECT idempotency_key, :reason, :body, :content_type, :routing_key, :headers,
           :ticker, :channel, :audience, :attempts, :last_error, :first_seen_at,
           :sanitised, :delivery_hash
    FROM delivery
    RETURNING id
    """
).bindparams(
    bindparam("payload", type_=JSONB),
    bindparam("headers", type_=JSONB),
    bindparam("body", type_=LargeBinary),
    bindparam("delivery_hash", type_=LargeBinary),
    bindparam("first_seen_at", type_=DateTime(timezone=True)),
    bindparam("occurred_at", type_=DateTime(timezone=True)),
    bindparam("provider_status", type_=Integer),
    bindparam("maybe_delivered", type_=Boolean),
)

# An invalid body has no idempotency key. A copy the broker redelivers (its first delivery
# died between this insert and the ack) finds the row of its first delivery by the delivery's
# hash (its bytes, properties and headers: see RawMessage.delivery_hash), through an index
# and only among the last day's rows, and adds none; a first delivery is always recorded.
_DEAD_LETTER_INVALID = text(
    f"""
    INSERT INTO dead_letters {_DEAD_LETTER_COLUMNS}
    SELECT NULL, 'invalid', :body, :content_type, :routing_key, :headers,
           NULL, NULL, NULL, :attempts, :last_error, :first_seen_at, :sanitised, :delivery_hash
    WHERE NOT (:redelivered AND EXISTS (
        SELECT 1 FROM dead_letters
        WHERE delivery_hash = :delivery_hash AND reason = 'invalid'
          AND dead_at > now() - interval '1 day'
    ))
    RETURNING id
    """
).bindparams(
    bindparam("headers", type_=JSONB),
    bindparam("body", type_=LargeBinary),
    bindparam("delivery_hash", type_=LargeBinary),
    bindparam("redelivered", type_=Boolean),
    bindparam("first_seen_at", type_=DateTime(timezone=True)),
)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as the broker delivered it, kept with its dead letter."""

    body: bytes
    content_type: str | None
    routing_key: str | None
    headers: dict[str, Any]
    first_seen_at: datetime
    redelivered: bool = False  # the broker delivered it before, unacked
    sanitised: tuple[str, ...] = ()  # what was made storable on the way (e.g. "headers")
    message_id: str | None = None
    timestamp: datetime | None = None

    def delivery_hash(self) -> bytes:
        """SHA-256 of what the broker delivered: bytes, properties and headers. Two copies of
        one publish (a redelivery) share it; two publishes of the same bytes differ whenever
        their publisher sets a message id or a timestamp, or their routing or headers differ."""
        digest = hashlib.sha256()
        for part in (
            self.body,
            str(self.content_type).encode("utf-8", "replace"),
            str(self.routing_key).encode("utf-8", "replace"),
            str(self.message_id).encode("utf-8", "replace"),
            str(self.timestamp).encode(),
            json.dumps(self.headers, sort_keys=True, default=str).encode("utf-8", "replace"),
        ):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.digest()


# a placeholder in a results list about to be filled
_NO_STATE = ClaimState(
    delivery_status="pending",
    attempts=0,
    watermark=None,
    lease_until=None,
    lease_occurred_at=None,
    now=datetime.min,
)


@dataclass(frozen=True, slots=True)
class _Claim:
    message: PriceChange
    attempts: int
    first_seen_at: datetime
    token: uuid.UUID


@dataclass(frozen=True, slots=True)
class RetryCopy:
    """A retry as it was published to the delay backend (headers in their wire encoding), and
    when it is due back: kept in ``retry_watch`` for :mod:`worker.overdue`."""

    body: bytes
    headers: bytes
    content_type: str | None
    due_at: datetime


@dataclass(frozen=True, slots=True)
class _Failure:
    message: PriceChange
    token: uuid.UUID
    attempts: int
    provider_status: int | None
    last_error: str
    copy: RetryCopy | None


@dataclass(frozen=True, slots=True)
class _Sent:
    message: PriceChange
    token: uuid.UUID
    attempts: int
    provider_status: int
    provider_message_id: str | None


class _Keyed(Protocol):
    @property
    def message(self) -> PriceChange: ...


def _by_topic(items: Sequence[_Keyed]) -> list[int]:
    """Positions of ``items`` sorted by topic, then key: the order rows are locked in."""
    return sorted(
        range(len(items)),
        key=lambda i: (items[i].message.topic_key, items[i].message.idempotency_key),
    )


class DeliveryStore:
    """The statements the pipeline needs. Those of every delivery (read the claim state, take
    the lease, mark sent, record a failure) are batched across the messages in flight; the
    rarer ones (supersession, dead letters) are one round trip each."""

    # Batches of one statement in flight at once: while one waits for its commit to reach the
    # disk, the next can start. Each lane keeps a pool connection (PINNED of them in all).
    LANES = 2
    PINNED = 3 * LANES

    def __init__(self, engine: AsyncEngine, lease_seconds: float, batch_size: int = 64) -> None:
        self.engine = engine
        self._lease_seconds = lease_seconds
        # A batch the database refused for one row's data is split until that row fails alone.
        isolate = db_errors.is_data_error
        self._claims = Batcher(self._claims_batch, batch_size, self.LANES, isolate)
        self._mark_sent = Batcher(self._mark_sent_batch, batch_size, self.LANES, isolate)
        self._record_failures = Batcher(
            self._record_failures_batch, batch_size, self.LANES, isolate
        )
        self._claims_lanes = self._pin()
        self._mark_sent_lanes = self._pin()
        self._record_failures_lanes = self._pin()

    def _pin(self) -> list[BatchConnection]:
        return [BatchConnection(self.engine) for _ in range(self.LANES)]

    async def close(self) -> None:
        """Give back the batchers' connections (before the engine is disposed)."""
        for lanes in (
            self._claims_lanes,
            self._mark_sent_lanes,
            self._record_failures_lanes,
        ):
            for connection in lanes:
                await connection.close()

    async def ping(self) -> bool:
        """Can a statement reach the database right now?"""
        try:
            async with asyncio.timeout(2):
                await self._execute(text("SELECT 1"), {})
        except (SQLAlchemyError, OSError, TimeoutError):
            return False
        return True

    async def check_schema(self) -> None:
        """Raise :class:`SchemaMismatch` unless the migrations are at ``SCHEMA_REVISION``."""
        try:
            rows = await self._execute(text("SELECT version_num FROM alembic_version"), {})
        except ProgrammingError:
            rows = []
        found = rows[0].version_num if rows else None
        if found != SCHEMA_REVISION:
            raise SchemaMismatch(
                f"database schema is at revision {found}, this worker needs {SCHEMA_REVISION}: "
                "run `worker migrate`"
            )

    async def _execute(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        """One statement on a pool connection; one that lost a race (a deadlock, a
        serialisation failure: it changed nothing) is run again, a few times."""
        return await db_errors.retrying(lambda: self._execute_once(statement, params))

    async def _execute_once(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, params)
            return list(result.fetchall()) if result.returns_rows else []

    async def claim(
        self, message: PriceChange, attempts: int, first_seen_at: datetime, token: uuid.UUID
    ) -> tuple[ClaimState, bool]:
        """Record the key as pending if new; return its state and its topic's, and whether
        the topic lease was taken under ``token`` (for the newest claimable message of its
        topic in the batch, by compare-and-set on the topic's version): one statement."""
        return await self._claims.submit(_Claim(message, attempts, first_seen_at, token))

    async def mark_sent(
        self,
        message: PriceChange,
        token: uuid.UUID,
        attempts: int,
        provider_status: int,
        provider_message_id: str | None,
    ) -> None:
        """Record the send, raise the topic watermark and release the lease, atomically."""
        await self._mark_sent.submit(
            _Sent(message, token, attempts, provider_status, provider_message_id)
        )

    async def _claims_batch(
        self, claims: Sequence[_Claim], lane: int
    ) -> list[tuple[ClaimState, bool]]:
        order = _by_topic(claims)
        rows = await self._claims_lanes[lane].fetch(
            _CLAIM,
            [claims[i].message.idempotency_key for i in order],
            [claims[i].message.topic_key for i in order],
            [claims[i].attempts for i in order],
            [claims[i].first_seen_at for i in order],
            [claims[i].message.occurred_at for i in order],
            [claims[i].message.stored_payload_json for i in order],
            [claims[i].token for i in order],
            self._lease_seconds,
        )
        results: list[tuple[ClaimState, bool]] = [(_NO_STATE, False)] * len(claims)
        for position, row in zip(order, rows, strict=True):
            state = ClaimState(
                delivery_status=row["status"],
                attempts=row["attempts"],
                watermark=row["watermark"],
                lease_until=row["lease_until"],
                lease_occurred_at=row["lease_occurred_at"],
                now=row["now"],
            )
            results[position] = (state, bool(row["won"]))
        return results

    async def _mark_sent_batch(self, sends: Sequence[_Sent], lane: int) -> list[None]:
        order = _by_topic(sends)
        await self._mark_sent_lanes[lane].fetch(
            _MARK_SENT,
            [sends[i].message.idempotency_key for i in order],
            [sends[i].message.topic_key for i in order],
            [sends[i].message.occurred_at for i in order],
            [sends[i].token for i in order],
            [sends[i].attempts for i in order],
            [sends[i].provider_status for i in order],
            [sends[i].provider_message_id for i in order],
        )
        return [None] * len(sends)

    async def record_failure(
        self,
        message: PriceChange,
        token: uuid.UUID,
        attempts: int,
        provider_status: int | None,
        last_error: str,
        copy: RetryCopy | None = None,
    ) -> None:
        """Count a failed attempt and release the lease so the retry can claim again; keep
        ``copy``, the retry sent to the delay backend, until it is back.

        ``provider_status`` None (no answer) may mean the provider accepted it: the topic's
        watermark then rises to this message, so no older one is sent after it.
        """
        await self._record_failures.submit(
            _Failure(message, token, attempts, provider_status, last_error, copy)
        )

    async def _record_failures_batch(self, failures: Sequence[_Failure], lane: int) -> list[None]:
        order = _by_topic(failures)
        await self._record_failures_lanes[lane].fetch(
            _RECORD_FAILURES,
            [failures[i].message.idempotency_key for i in order],
            [failures[i].message.topic_key for i in order],
            [failures[i].token for i in order],
            [failures[i].attempts for i in order],
            [failures[i].provider_status for i in order],
            [failures[i].last_error for i in order],
            [failures[i].provider_status is None for i in order],
            *_copies([failures[i].copy for i in order]),
        )
        return [None] * len(failures)

    async def mark_superseded(self, message: PriceChange) -> None:
        await self._execute(_MARK_SUPERSEDED, {"key": message.idempotency_key})

    async def dead_letter(
        self,
        reason: str,
        raw: RawMessage,
        message: PriceChange,
        last_error: str,
        attempts: int,
        token: uuid.UUID | None,
        provider_status: int | None,
    ) -> int | None:
        """End a valid message as dead. None: the key was already finished, nothing written."""
        last_error, error_changed = storable_text(last_error)
        payload, payload_changed = storable_json(message.stored_payload())
        raw = _with_sanitised(raw, error_changed, payload_changed)
        rows = await self._execute(
            _DEAD_LETTER_DELIVERY,
            {
                "reason": reason,
                "key": message.idempotency_key,
                "topic": message.topic_key,
                "occurred_at": message.occurred_at,
                "payload": payload,
                "token": token,
                "provider_status": provider_status,
                "maybe_delivered": provider_status is None,
                "ticker": message.ticker,
                "channel": message.channel,
                "audience": message.audience,
                "last_error": last_error,
                "attempts": attempts,
                **_raw_params(raw),
            },
        )
        return int(rows[0].id) if rows else None

    async def dead_letter_invalid(
        self, raw: RawMessage, last_error: str, attempts: int
    ) -> int | None:
        """Keep an invalid body's raw bytes with the reason it was refused. None: a
        redelivered copy of a body already recorded, nothing written."""
        last_error, error_changed = storable_text(last_error)
        raw = _with_sanitised(raw, error_changed, False)
        rows = await self._execute(
            _DEAD_LETTER_INVALID,
            {
                "last_error": last_error,
                "attempts": attempts,
                "redelivered": raw.redelivered,
                **_raw_params(raw),
            },
        )
        return int(rows[0].id) if rows else None


def _with_sanitised(raw: RawMessage, last_error: bool, payload: bool) -> RawMessage:
    extra = (("last_error",) if last_error else ()) + (("payload",) if payload else ())
    return dataclasses.replace(raw, sanitised=raw.sanitised + extra) if extra else raw


def _raw_params(raw: RawMessage) -> dict[str, Any]:
    """The raw message's columns: the body's bytes exact, its text made storable."""
    sanitised = list(raw.sanitised)
    columns: dict[str, str | None] = {}
    for name, value in (("content_type", raw.content_type), ("routing_key", raw.routing_key)):
        if value is None:
            columns[name] = None
            continue
        columns[name], changed = storable_text(value, MAX_TEXT_CHARS)
        if changed:
            sanitised.append(name)
    headers, changed = storable_json(raw.headers)  # idempotent when already storable
    if changed and "headers" not in sanitised:
        sanitised.append("headers")
    return {
        "body": raw.body,
        **columns,
        "headers": headers if isinstance(headers, dict) else {},
        "first_seen_at": raw.first_seen_at,
        "sanitised": ",".join(sanitised) or None,
        "delivery_hash": raw.delivery_hash(),
    }


def _copies(copies: Sequence[RetryCopy | None]) -> tuple[list[Any], ...]:
    """The retry copies' columns, NULL where a retry has none (parked, not delayed)."""
    return (
        [None if c is None else c.body for c in copies],
        [None if c is None else c.headers for c in copies],
        [None if c is None else c.content_type for c in copies],
        [None if c is None else c.due_at for c in copies],
    )
