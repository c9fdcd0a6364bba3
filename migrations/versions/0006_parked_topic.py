"""parked_messages.topic_key: a healed partition releases each topic's newest price first

Rows parked before this revision keep a NULL topic key and are released as before, each on
its own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("parked_messages", sa.Column("topic_key", sa.Text()))
    op.create_index("parked_messages_topic_idx", "parked_messages", ["topic_key", "occurred_at"])


def downgrade() -> None:
    op.drop_index("parked_messages_topic_idx", table_name="parked_messages")
    op.drop_column("parked_messages", "topic_key")
