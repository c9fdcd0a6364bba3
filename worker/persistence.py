"""The delivery record in PostgreSQL: claims, outcomes, dead letters.

Every call is one SQL statement on an autocommit connection: one round trip, atomic on its
own, with no transaction held open across the provider call. Concurrency between replicas is
settled by a *topic lease* on ``topic_watermarks`` taken by compare-and-set on its ``version``:
while one replica sends a message of a topic key, no other sends any message of that topic, so
an idempotency key is never sent twice at once and an older price never overtakes a newer one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import Boolean, DateTime, Integer, LargeBinary

from worker.decisions import ClaimState
from worker.message import PriceChange
from worker.schema import SCHEMA_REVISION

# Errors of a statement or of its data, not of the database's reachability.
STATEMENT_ERRORS = (ProgrammingError, IntegrityError, DataError)


class SchemaMismatch(RuntimeError):
    """The database is not at the schema revision this code expects."""


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: object) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


def create_engine(url: str, pool_size: int) -> AsyncEngine:
    """One pooled engine per process, in autocommit: each statement commits by itself."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it would cost a round trip per checkout, i.e. per statement. A dead
        # connection (database restarted) fails its statement, SQLAlchemy invalidates the
        # pool, and the replica's database gate holds messages until a fresh one answers.
        isolation_level="AUTOCOMMIT",
        json_serializer=dumps,
        # fail fast when PostgreSQL is away, instead of asyncpg's 60 s connect timeout
        connect_args={"timeout": 5, "command_timeout": 30},
    )


_READ_STATE = text(
    """
    WITH new_delivery AS (
        INSERT INTO deliveries (idempotency_key, topic_key, status, attempts,
                                first_seen_at, occurred_at, payload)
        VALUES (:key, :topic, 'pending', :attempts, :first_seen_at, :occurred_at, :payload)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING status
    ), new_topic AS (
        INSERT INTO topic_watermarks (topic_key) VALUES (:topic)
        ON CONFLICT (topic_key) DO NOTHING
        RETURNING version
    )
    SELECT COALESCE((SELECT status FROM new_delivery),
                    (SELECT status FROM deliveries WHERE idempotency_key = :key),
                    'pending') AS status,
           t.occurred_at AS watermark, t.lease_until, t.lease_occurred_at,
           COALESCE(t.version, 0) AS version, now() AS now
    FROM (VALUES (1)) AS one (x)
    LEFT JOIN topic_watermarks AS t ON t.topic_key = :topic
    """
).bindparams(
    bindparam("payload", type_=JSONB),
    bindparam("first_seen_at", type_=DateTime(timezone=True)),
    bindparam("occurred_at", type_=DateTime(timezone=True)),
)

_TAKE_LEASE = text(
    """
    UPDATE topic_watermarks
    SET lease_token = :token, lease_until = now() + make_interval(secs => :lease_seconds),
        lease_occurred_at = :occurred_at,
        -- taking over an expired lease: its holder may have delivered before it died
        occurred_at = CASE WHEN lease_until IS NULL THEN occurred_at
                           ELSE GREATEST(occurred_at, lease_occurred_at) END,
        version = version + 1
    WHERE topic_key = :topic AND version = :version
    RETURNING version
    """
).bindparams(bindparam("occurred_at", type_=DateTime(timezone=True)))

_MARK_SENT = text(
    """
    WITH delivery AS (
        UPDATE deliveries
        SET status = 'sent', attempts = :attempts, sent_at = now(), updated_at = now(),
            provider_message_id = :provider_message_id, provider_status = :provider_status,
            last_error = NULL
        WHERE idempotency_key = :key
    )
    UPDATE topic_watermarks
    SET idempotency_key = CASE WHEN occurred_at IS NULL OR occurred_at < :occurred_at
                               THEN :key ELSE idempotency_key END,
        occurred_at = GREATEST(occurred_at, :occurred_at),
        lease_token = CASE WHEN lease_token = :token THEN NULL ELSE lease_token END,
        lease_until = CASE WHEN lease_token = :token THEN NULL ELSE lease_until END,
        lease_occurred_at = CASE WHEN lease_token = :token THEN NULL ELSE lease_occurred_at END,
        version = version + 1
    WHERE topic_key = :topic
    """
).bindparams(bindparam("occurred_at", type_=DateTime(timezone=True)))

# Releasing the lease after a failed send. An attempt that got no answer (timeout, cut
# connection) may have reached the provider: for ordering it counts as sent, so the watermark
# rises to its occurred_at and no older message of the topic is sent after it.
_RELEASE = """
    lease_token = NULL, lease_until = NULL, lease_occurred_at = NULL, version = version + 1,
    occurred_at = CASE WHEN :maybe_delivered THEN GREATEST(occurred_at, lease_occurred_at)
                       ELSE occurred_at END
"""

_RECORD_FAILURE = text(
    f"""
    WITH delivery AS (
        UPDATE deliveries
        SET attempts = :attempts, last_error = :last_error, provider_status = :provider_status,
            updated_at = now()
        WHERE idempotency_key = :key AND status = 'pending'
    )
    UPDATE topic_watermarks
    SET {_RELEASE}
    WHERE topic_key = :topic AND lease_token = :token
    """
).bindparams(bindparam("maybe_delivered", type_=Boolean))

_MARK_SUPERSEDED = text(
    """
    UPDATE deliveries
    SET status = 'superseded', updated_at = now(),
        -- an earlier attempt that got no answer may have reached the provider: say so
        last_error = CASE WHEN attempts > 0 AND provider_status IS NULL
                          THEN 'superseded; an earlier attempt got no answer and may have '
                               || 'been delivered (' || coalesce(last_error, '') || ')'
                          ELSE last_error END
    WHERE idempotency_key = :key AND status = 'pending'
    """
)

_DEAD_LETTER_COLUMNS = """
    (idempotency_key, reason, payload, content_type, routing_key, headers,
     ticker, channel, audience, attempts, last_error, first_seen_at)
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
        SET {_RELEASE}
        WHERE topic_key = :topic AND lease_token = :token
    )
    INSERT INTO dead_letters {_DEAD_LETTER_COLUMNS}
    SELECT idempotency_key, :reason, :body, :content_type, :routing_key, :headers,
           :ticker, :channel, :audience, :attempts, :last_error, :first_seen_at
    FROM delivery
    RETURNING id
    """
).bindparams(
    bindparam("payload", type_=JSONB),
    bindparam("headers", type_=JSONB),
    bindparam("body", type_=LargeBinary),
    bindparam("first_seen_at", type_=DateTime(timezone=True)),
    bindparam("occurred_at", type_=DateTime(timezone=True)),
    bindparam("provider_status", type_=Integer),
    bindparam("maybe_delivered", type_=Boolean),
)

_DEAD_LETTER_INVALID = text(
    f"""
    INSERT INTO dead_letters {_DEAD_LETTER_COLUMNS}
    VALUES (NULL, 'invalid', :body, :content_type, :routing_key, :headers,
            NULL, NULL, NULL, :attempts, :last_error, :first_seen_at)
    RETURNING id
    """
).bindparams(
    bindparam("headers", type_=JSONB),
    bindparam("body", type_=LargeBinary),
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


class DeliveryStore:
    """The statements the pipeline needs, each one round trip."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

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
        async with self.engine.connect() as conn:
            result = await conn.execute(statement, params)
            return list(result.fetchall()) if result.returns_rows else []

    async def read_claim_state(
        self, message: PriceChange, attempts: int, first_seen_at: datetime
    ) -> tuple[ClaimState, int]:
        """Record the key as pending if new; return its state, its topic's and the version."""
        rows = await self._execute(
            _READ_STATE,
            {
                "key": message.idempotency_key,
                "topic": message.topic_key,
                "attempts": attempts,
                "first_seen_at": first_seen_at,
                "occurred_at": message.occurred_at,
                "payload": message.stored_payload(),
            },
        )
        row = rows[0]
        state = ClaimState(
            delivery_status=row.status,
            watermark=row.watermark,
            lease_until=row.lease_until,
            lease_occurred_at=row.lease_occurred_at,
            now=row.now,
        )
        return state, int(row.version)

    async def take_lease(
        self, message: PriceChange, version: int, token: uuid.UUID, lease_seconds: float
    ) -> bool:
        """Compare-and-set: succeeds only if the topic row is still at ``version``."""
        rows = await self._execute(
            _TAKE_LEASE,
            {
                "topic": message.topic_key,
                "occurred_at": message.occurred_at,
                "version": version,
                "token": token,
                "lease_seconds": lease_seconds,
            },
        )
        return bool(rows)

    async def mark_sent(
        self,
        message: PriceChange,
        token: uuid.UUID,
        attempts: int,
        provider_status: int,
        provider_message_id: str | None,
    ) -> None:
        """Record the send, raise the topic watermark and release the lease, atomically."""
        await self._execute(
            _MARK_SENT,
            {
                "key": message.idempotency_key,
                "topic": message.topic_key,
                "occurred_at": message.occurred_at,
                "token": token,
                "attempts": attempts,
                "provider_status": provider_status,
                "provider_message_id": provider_message_id,
            },
        )

    async def record_failure(
        self,
        message: PriceChange,
        token: uuid.UUID,
        attempts: int,
        provider_status: int | None,
        last_error: str,
    ) -> None:
        """Count a failed attempt and release the lease so the retry can claim again.

        ``provider_status`` None (no answer) may mean the provider accepted it: the topic's
        watermark then rises to this message, so no older one is sent after it.
        """
        await self._execute(
            _RECORD_FAILURE,
            {
                "key": message.idempotency_key,
                "topic": message.topic_key,
                "token": token,
                "attempts": attempts,
                "provider_status": provider_status,
                "last_error": last_error,
                "maybe_delivered": provider_status is None,
            },
        )

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
        rows = await self._execute(
            _DEAD_LETTER_DELIVERY,
            {
                "reason": reason,
                "key": message.idempotency_key,
                "topic": message.topic_key,
                "occurred_at": message.occurred_at,
                "payload": message.stored_payload(),
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

    async def dead_letter_invalid(self, raw: RawMessage, last_error: str, attempts: int) -> int:
        """Keep an invalid body's raw bytes with the reason it was refused."""
        rows = await self._execute(
            _DEAD_LETTER_INVALID,
            {"last_error": last_error, "attempts": attempts, **_raw_params(raw)},
        )
        return int(rows[0].id)


def _raw_params(raw: RawMessage) -> dict[str, Any]:
    return {
        "body": raw.body,
        "content_type": raw.content_type,
        "routing_key": raw.routing_key,
        "headers": raw.headers,
        "first_seen_at": raw.first_seen_at,
    }
