"""dead_letters.failure_group: the normalised last_error that `worker-admin stats` groups by

A generated column, computed once when the worker writes the dead letter, so that grouping and
`--group` selection run no regular expression at read time. Adding it rewrites dead_letters
(ACCESS EXCLUSIVE for the rewrite: seconds for a million rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# worker.schema.failure_group_sql("last_error") as of this revision, frozen here: a later change
# of the rules is a new migration that replaces the column.
FAILURE_GROUP = (
    "left(btrim(regexp_replace(regexp_replace(regexp_replace(regexp_replace(r"
    "egexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replac"
    "e(regexp_replace(regexp_replace(left(coalesce(last_error, ''::text), 500"
    "), '([A-Za-z][A-Za-z0-9+.-]*://[^/?#\"''<> \\t\\r\\n\\f\\v]+)[/?#][^\"''<> \\t\\r"
    "\\n\\f\\v]*'::text, '\\1/<path>'::text, 'g'::text), '[0-9a-fA-F]{8}-[0-9a-fA"
    "-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}'::text, '<uuid>'::t"
    "ext, 'g'::text), '[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9]{2}:[0-9]{2}(:[0-"
    "9]{2}([.,][0-9]+)?)?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?)?'::text, '<time>'"
    "::text, 'g'::text), '(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{1,2} [A-Z][a-z"
    "]{2} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2}( GMT)?'::text, '<time>'::text, "
    "'g'::text), '[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+([.][A-Za-z0-9-]+)+'::text, "
    "'<email>'::text, 'g'::text), '[0-9]{1,3}([.][0-9]{1,3}){3}(:[0-9]+)?'::t"
    "ext, '<ip>'::text, 'g'::text), '0[xX][0-9a-fA-F]+'::text, '<hex>'::text,"
    " 'g'::text), '(?<![A-Za-z0-9])(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-"
    "F])[0-9a-fA-F]{8,}(?![A-Za-z0-9])'::text, '<hex>'::text, 'g'::text), '(?"
    "<![A-Za-z0-9])(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{1"
    "6,}'::text, '<id>'::text, 'g'::text), '(?<![0-9])(?<!HTTP )[0-9]+([.][0-"
    "9]+)*'::text, '<n>'::text, 'g'::text), '[ \\t\\r\\n\\f\\v]+'::text, ' '::text"
    ", 'g'::text), ' '::text), 200)"
)


def upgrade() -> None:
    op.add_column(
        "dead_letters",
        sa.Column("failure_group", sa.Text(), sa.Computed(FAILURE_GROUP, persisted=True)),
    )


def downgrade() -> None:
    op.drop_column("dead_letters", "failure_group")
