"""parked_messages.payload, first_seen_at: a healed partition's superseded rows end in SQL

A parked row older than its topic's newest sent price ends ``superseded`` at its release in one
statement, its deliveries row written from these columns, instead of a trip through the broker
and a replica. Rows parked before this revision keep NULLs and go through the broker as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("parked_messages", sa.Column("payload", postgresql.JSONB()))
    op.add_column("parked_messages", sa.Column("first_seen_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("parked_messages", "first_seen_at")
    op.drop_column("parked_messages", "payload")
