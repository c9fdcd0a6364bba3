"""dead_letters.sanitised and dead_letters.delivery_hash: poison input ends once, alone

``sanitised`` names the columns of a dead letter whose text was made storable (NUL and lone
surrogates replaced, sizes bounded); the body's bytes in ``payload`` are always exact.
``delivery_hash`` (SHA-256 of the delivery's bytes, properties and headers, indexed) is what a
redelivered invalid body is matched by, instead of a scan for the same bytes. Both are new,
nullable, without defaults: adding them rewrites nothing; the index is built under a SHARE
lock (writes to dead_letters wait for it: seconds for a million rows).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("sanitised", sa.Text(), nullable=True))
    op.add_column("dead_letters", sa.Column("delivery_hash", sa.LargeBinary(), nullable=True))
    op.create_index("dead_letters_delivery_hash_idx", "dead_letters", ["delivery_hash"])


def downgrade() -> None:
    op.drop_index("dead_letters_delivery_hash_idx", table_name="dead_letters")
    op.drop_column("dead_letters", "delivery_hash")
    op.drop_column("dead_letters", "sanitised")
