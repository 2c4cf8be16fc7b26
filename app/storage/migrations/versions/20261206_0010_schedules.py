"""Recurring schedules: the `schedules` table, the run records that make each occurrence
enqueue at most once (`schedule_runs`, unique on schedule and occurrence time), and on
every job table the schedule a job came from (`schedule_id`, `scheduled_for`, `catch_up`).

Only adds a table and nullable columns: a replica of the previous release keeps working
during a rolling upgrade (it inserts jobs without those columns, and moves a scheduled
job between tables without them, so such a job loses its schedule fields; it never runs
schedules itself).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "succeeded_jobs", "failed_jobs")
JOB_COLUMNS = ("schedule_id", "scheduled_for", "catch_up")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("interval_ms", sa.BigInteger(), nullable=True),
        sa.Column("cron", sa.String(length=255), nullable=True),
        sa.Column("timezone", sa.String(length=255), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("skip_if_running", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("anchor_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_schedules_next_run_at", "schedules", ["next_run_at"])
    op.create_table(
        "schedule_runs",
        sa.Column("schedule_id", sa.String(length=255), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("catch_up", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("schedule_id", "scheduled_for"),
    )
    op.create_index("ix_schedule_runs_scheduled_for", "schedule_runs", ["scheduled_for"])
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("schedule_id", sa.String(length=255), nullable=True))
            batch.add_column(sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column("catch_up", sa.Boolean(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            for column in JOB_COLUMNS:
                batch.drop_column(column)
    op.drop_index("ix_schedule_runs_scheduled_for", table_name="schedule_runs")
    op.drop_table("schedule_runs")
    op.drop_index("ix_schedules_next_run_at", table_name="schedules")
    op.drop_table("schedules")
