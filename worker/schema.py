"""The PostgreSQL tables (SPEC §5) as SQLAlchemy metadata; Alembic migrations own the DDL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
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
SCHEMA_REVISION = "0008"

DELIVERY_STATUSES = ("pending", "sent", "superseded", "dead")
DEAD_LETTER_REASONS = ("invalid", "rejected", "exhausted", "expired")

# A dead letter's *failure group*: its last_error with what varies between occurrences of one
# failure replaced by placeholders (URL paths, UUIDs, timestamps, e-mail and IP addresses, hex
# keys, long ids, numbers; the status after "HTTP " stays), so that one provider bug hitting
# 40,000 messages is one group, and "HTTP 500 …" and "HTTP 403: plan lapsed" are two.
# Each rule is (pattern, replacement), applied in order to every match, in PostgreSQL (the
# generated column below) and in Python (worker.admin.fingerprint), so the patterns keep to
# what both regex engines read alike: explicit ASCII classes, no flags, no alternation whose
# branches could both match at one place.
_SPACE = " \\t\\r\\n\\f\\v"  # the whitespace both engines agree on
_HEX = "[0-9a-fA-F]"
_ALONE = "(?<![A-Za-z0-9])"
FAILURE_GROUP_RULES: tuple[tuple[str, str], ...] = (
    # a URL keeps its scheme and host
    (f"([A-Za-z][A-Za-z0-9+.-]*://[^/?#\"'<>{_SPACE}]+)[/?#][^\"'<>{_SPACE}]*", "\\1/<path>"),
    # then the shapes of ids, times and addresses
    (f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}", "<uuid>"),
    (
        "[0-9]{4}-[0-9]{2}-[0-9]{2}"
        "([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?)?",
        "<time>",
    ),
    (
        "(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{1,2} [A-Z][a-z]{2} [0-9]{4}"
        " [0-9]{2}:[0-9]{2}:[0-9]{2}( GMT)?",
        "<time>",
    ),
    ("[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+([.][A-Za-z0-9-]+)+", "<email>"),
    ("[0-9]{1,3}([.][0-9]{1,3}){3}(:[0-9]+)?", "<ip>"),
    (f"0[xX]{_HEX}+", "<hex>"),
    # a hex key (a digit and a letter), then a long id of letters and digits, each a whole word
    (f"{_ALONE}(?={_HEX}*[0-9])(?={_HEX}*[a-fA-F]){_HEX}{{8,}}(?![A-Za-z0-9])", "<hex>"),
    (f"{_ALONE}(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{{16,}}", "<id>"),
    # any other number, but not the status after "HTTP "
    ("(?<![0-9])(?<!HTTP )[0-9]+([.][0-9]+)*", "<n>"),
    # runs of whitespace
    (f"[{_SPACE}]+", " "),
)
# The rules read at most this much of last_error; the group keeps at most FAILURE_GROUP_CHARS.
FAILURE_GROUP_INPUT_CHARS = 500
FAILURE_GROUP_CHARS = 200


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def failure_group_sql(column: str) -> str:
    """The SQL expression of the failure group of ``column`` (never NULL: '' for no error)."""
    expression = f"left(coalesce({column}, ''::text), {FAILURE_GROUP_INPUT_CHARS})"
    for pattern, replacement in FAILURE_GROUP_RULES:
        expression = (
            f"regexp_replace({expression}, {_sql_string(pattern)}::text,"
            f" {_sql_string(replacement)}::text, 'g'::text)"
        )
    return f"left(btrim({expression}, ' '::text), {FAILURE_GROUP_CHARS})"


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
    # computed once when the row is written; `worker-admin stats` groups by it
    Column("failure_group", Text, Computed(failure_group_sql("last_error"), persisted=True)),
    # which columns were made storable (NUL, surrogates, sizes): "headers,last_error"; NULL: none
    Column("sanitised", Text),
    # SHA-256 of the delivery (bytes, properties, headers): finds a redelivered invalid body's row
    Column("delivery_hash", LargeBinary),
    CheckConstraint(f"reason IN {DEAD_LETTER_REASONS}", name="dead_letters_reason_check"),
    Index("dead_letters_dead_at_idx", "dead_at"),
    Index("dead_letters_reason_dead_at_idx", "reason", "dead_at"),
    Index("dead_letters_idempotency_key_idx", "idempotency_key"),
    Index("dead_letters_delivery_hash_idx", "delivery_hash"),
)

PARTITION_STATES = ("closed", "open", "half_open")

# The provider's health per partition (worker.breaker), shared by every replica.
partition_health = Table(
    "partition_health",
    metadata,
    Column("partition_key", Text, primary_key=True),
    Column("state", Text, nullable=False, server_default=text("'closed'")),
    Column("held", Boolean, nullable=False, server_default=text("false")),
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    Column("trips", Integer, nullable=False, server_default=text("0")),
    Column("opened_at", DateTime(timezone=True)),
    Column("open_until", DateTime(timezone=True)),
    Column("probe_token", UUID(as_uuid=True)),
    Column("probe_until", DateTime(timezone=True)),
    Column("probed_at", DateTime(timezone=True)),
    Column("healed_at", DateTime(timezone=True)),
    Column("last_error", Text),
    # a Retry-After: no call of the partition before then, not even a first attempt's probe
    Column("throttled_until", DateTime(timezone=True)),
    Column("changed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"state IN {PARTITION_STATES}", name="partition_health_state_check"),
)

# Messages of an open partition, kept until it heals (or they expire): the message as it would
# be republished (body, AMQP headers in their wire encoding, content type), nothing held in a
# replica's memory and nothing moved while it waits.
parked_messages = Table(
    "parked_messages",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("partition_key", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", LargeBinary, nullable=False),
    Column("content_type", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    # a row is released only as its topic's newest parked price (older ones follow, to end
    # superseded without a call); NULL for rows parked before revision 0006
    Column("topic_key", Text),
    # the deliveries row's payload and first sighting, so that a row older than its topic's
    # newest sent price ends superseded in SQL at its release; NULL before revision 0007
    Column("payload", JSONB),
    Column("first_seen_at", DateTime(timezone=True)),
    # released when due (its backoff is over) and its partition admits sends, or at once when
    # the partition heals; when expired, released whatever the partition, to end `expired`
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("parked_messages_partition_idx", "partition_key", "due_at"),
    Index("parked_messages_expires_at_idx", "expires_at"),
    Index("parked_messages_topic_idx", "topic_key", "occurred_at"),
)

# Each retry sent to the delay backend, as it was published, until the broker brings it back
# (one row per key: its latest retry). A row overdue by WORKER_RETRY_OVERDUE_SECONDS while the
# work queues are empty and its key still pending is republished (worker.overdue); rows of
# finished keys are deleted once overdue.
retry_watch = Table(
    "retry_watch",
    metadata,
    Column("idempotency_key", Text, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", LargeBinary, nullable=False),
    Column("content_type", Text),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Index("retry_watch_due_at_idx", "due_at"),
)

# The PostgreSQL advisory lock `worker migrate` holds while it migrates (migrations/env.py):
# pods starting together, each migrating in its init container, take turns.
MIGRATION_LOCK = 0x6E775F6D
