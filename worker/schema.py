"""The PostgreSQL tables (SPEC §5) as SQLAlchemy metadata; Alembic migrations own the DDL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

# The Alembic revision this code expects; `worker run` refuses to start on any other.
SCHEMA_REVISION = "0001"

DELIVERY_STATUSES = ("pending", "sent", "superseded", "dead")
DEAD_LETTER_REASONS = ("invalid", "rejected", "exhausted", "expired")

deliveries = Table(
    "deliveries",
    metadata,
    Column("idempotency_key", Text, primary_key=True),
    Column("topic_key", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("provider_message_id", Text),
    Column("provider_status", SmallInteger),
    Column("last_error", Text),
    Column("payload", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"status IN {DELIVERY_STATUSES}", name="deliveries_status_check"),
    Index("deliveries_topic_key_idx", "topic_key"),
)

topic_watermarks = Table(
    "topic_watermarks",
    metadata,
    Column("topic_key", Text, primary_key=True),
    # occurred_at of the newest message sent for the topic; NULL until one is sent
    Column("occurred_at", DateTime(timezone=True)),
    Column("idempotency_key", Text),
    # the topic lease: one send in flight per topic key, so an older price never overtakes
    Column("lease_token", UUID(as_uuid=True)),
    Column("lease_until", DateTime(timezone=True)),
    Column("lease_occurred_at", DateTime(timezone=True)),
    Column("version", BigInteger, nullable=False, server_default=text("0")),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("idempotency_key", Text),
    Column("reason", Text, nullable=False),
    # the body exactly as received: JSON for valid messages, any bytes for invalid ones
    Column("payload", LargeBinary, nullable=False),
    Column("content_type", Text),
    Column("routing_key", Text),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("ticker", Text),
    Column("channel", Text),
    Column("audience", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("dead_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True)),
    Column("replay_count", Integer, nullable=False, server_default=text("0")),
    CheckConstraint(f"reason IN {DEAD_LETTER_REASONS}", name="dead_letters_reason_check"),
    Index("dead_letters_dead_at_idx", "dead_at"),
    Index("dead_letters_reason_dead_at_idx", "reason", "dead_at"),
    Index("dead_letters_idempotency_key_idx", "idempotency_key"),
)
