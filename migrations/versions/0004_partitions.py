"""partition_health and parked_messages: the provider's health per partition, and the
messages parked while their partition is open

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partition_health",
        sa.Column("partition_key", sa.Text(), primary_key=True),
        sa.Column("state", sa.Text(), nullable=False, server_default=sa.text("'closed'")),
        sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column(
            "consecutive_failures", sa.Integer(), nullable=False, server_default=sa.text("0")
        ),
        sa.Column("trips", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("opened_at", sa.DateTime(timezone=True)),
        sa.Column("open_until", sa.DateTime(timezone=True)),
        sa.Column("probe_token", postgresql.UUID(as_uuid=True)),
        sa.Column("probe_until", sa.DateTime(timezone=True)),
        sa.Column("probed_at", sa.DateTime(timezone=True)),
        sa.Column("healed_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.Text()),
        sa.Column(
            "changed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(
            "state IN ('closed', 'open', 'half_open')", name="partition_health_state_check"
        ),
    )
    op.create_table(
        "parked_messages",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("partition_key", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text()),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("parked_messages_partition_idx", "parked_messages", ["partition_key", "due_at"])
    op.create_index("parked_messages_expires_at_idx", "parked_messages", ["expires_at"])


def downgrade() -> None:
    op.drop_table("parked_messages")
    op.drop_table("partition_health")
