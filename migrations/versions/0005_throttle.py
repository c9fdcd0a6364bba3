"""partition_health.throttled_until: a Retry-After holds even a first attempt's probe

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("partition_health", sa.Column("throttled_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("partition_health", "throttled_until")
