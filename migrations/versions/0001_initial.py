"""deliveries, topic_watermarks and dead_letters

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("idempotency_key", sa.Text(), primary_key=True),
        sa.Column("topic_key", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.Column("provider_message_id", sa.Text()),
        sa.Column("provider_status", sa.SmallInteger()),
        sa.Column("last_error", sa.Text()),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'superseded', 'dead')", name="deliveries_status_check"
        ),
    )
    op.create_index("deliveries_topic_key_idx", "deliveries", ["topic_key"])

    op.create_table(
        "topic_watermarks",
        sa.Column("topic_key", sa.Text(), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True)),
        sa.Column("idempotency_key", sa.Text()),
        sa.Column("lease_token", postgresql.UUID(as_uuid=True)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("lease_occurred_at", sa.DateTime(timezone=True)),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.Text()),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text()),
        sa.Column("routing_key", sa.Text()),
        sa.Column(
            "headers",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("ticker", sa.Text()),
        sa.Column("channel", sa.Text()),
        sa.Column("audience", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text()),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "dead_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("replayed_at", sa.DateTime(timezone=True)),
        sa.Column("replay_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.CheckConstraint(
            "reason IN ('invalid', 'rejected', 'exhausted', 'expired')",
            name="dead_letters_reason_check",
        ),
    )
    op.create_index("dead_letters_dead_at_idx", "dead_letters", ["dead_at"])
    op.create_index("dead_letters_reason_dead_at_idx", "dead_letters", ["reason", "dead_at"])
    op.create_index("dead_letters_idempotency_key_idx", "dead_letters", ["idempotency_key"])


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("topic_watermarks")
    op.drop_table("deliveries")
