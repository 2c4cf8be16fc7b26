"""Priorities: `priority` (0-9, lower runs first, default 0) on every job table, and a
ready index ordered by it for reserve.

Only adds: the column has a default, so a replica of the previous release keeps
inserting (its jobs get priority 0) during a rolling upgrade, and `ix_jobs_ready`
(name, available_at) stays, for that replica's reserve and for the lookups by due time
(the notifier's next due job, the oldest available job, the scheduled count), which a
priority between name and time would turn from one range into ten.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "succeeded_jobs", "failed_jobs")
READY = "reserved_at IS NULL"


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0")
            )
    op.create_index(
        "ix_jobs_ready_priority",
        "jobs",
        ["name", "priority", "available_at", "id"],
        sqlite_where=sa.text(READY),
        postgresql_where=sa.text(READY),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_ready_priority", table_name="jobs")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("priority")
