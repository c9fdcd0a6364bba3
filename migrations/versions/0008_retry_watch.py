"""retry_watch: a copy of each retry sent to the delay backend, until it is back

A retry the broker does not bring back (RabbitMQ 3.10.8 can stall a dead-letter hop between
quorum queues across a failover, docs/deploy.md) is republished from this copy once it is
overdue and the work queues are empty (worker.overdue).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retry_watch",
        sa.Column("idempotency_key", sa.Text(), primary_key=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text()),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("retry_watch_due_at_idx", "retry_watch", ["due_at"])


def downgrade() -> None:
    op.drop_table("retry_watch")
