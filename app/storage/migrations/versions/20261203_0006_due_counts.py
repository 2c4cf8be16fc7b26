"""Scheduled jobs counted per name and due minute, so /stats and /metrics need not scan
every scheduled job (a 100,000-job range took over 100 ms on PostgreSQL).

Only adds a table, and on PostgreSQL statement triggers that keep it: a replica of the
previous release keeps working during a rolling upgrade, and its writes are counted too.
On SQLite the server's writer keeps it (`Tally` in app/storage/sqlite.py).

A row counts the pending, unreserved jobs of a name due in a minute (minutes since the
Unix epoch) while that minute is ahead of the writer's clock; see `DueCountRow`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MINUTE = "floor(extract(epoch FROM {row}.available_at) / 60)::bigint"
NOW_MINUTE = "floor(extract(epoch FROM statement_timestamp()) / 60)::bigint"
EVENTS = {"insert": ("new_rows",), "update": ("new_rows", "old_rows"), "delete": ("old_rows",)}


def upgrade() -> None:
    op.create_table(
        "due_counts",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("minute", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", "minute", "shard"),
    )
    op.create_index("ix_due_counts_minute", "due_counts", ["minute"])
    if op.get_bind().dialect.name == "postgresql":
        _postgres_triggers()
        op.execute(
            "INSERT INTO due_counts (name, minute, shard, jobs) "
            f"SELECT name, {MINUTE.format(row='jobs')}, 0, count(*) FROM jobs "
            f"WHERE reserved_at IS NULL AND {MINUTE.format(row='jobs')} > {NOW_MINUTE} "
            "GROUP BY 1, 2"
        )
    else:
        minute = "CAST(strftime('%s', available_at) AS INTEGER) / 60"
        op.execute(
            "INSERT INTO due_counts (name, minute, shard, jobs) "
            f"SELECT name, {minute}, 0, count(*) FROM jobs WHERE reserved_at IS NULL "
            f"AND {minute} > CAST(strftime('%s', 'now') AS INTEGER) / 60 GROUP BY 1, 2"
        )


def _postgres_triggers() -> None:
    """One upsert per (name, minute) per statement, of only the rows due in a minute still
    ahead of the database's clock: enqueues of ready jobs, reserves and acks pass by."""
    for event, tables in EVENTS.items():
        parts = " UNION ALL ".join(
            f"SELECT name, {MINUTE.format(row=t)} AS minute, "
            f"{1 if t == 'new_rows' else -1} AS d FROM {t} WHERE reserved_at IS NULL"
            for t in tables
        )
        rows = (
            f"SELECT name, minute, pg_backend_pid() % 16, sum(d) FROM ({parts}) AS x "
            f"WHERE minute > {NOW_MINUTE} GROUP BY name, minute HAVING sum(d) <> 0 "
            "ORDER BY name, minute"
        )
        function = f"bgjobs_due_jobs_{event}"
        op.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO due_counts AS c (name, minute, shard, jobs) {rows} "
            "ON CONFLICT (name, minute, shard) DO UPDATE SET jobs = c.jobs + excluded.jobs; "
            "RETURN NULL; END $$"
        )
        referencing = " ".join(
            f"{'NEW' if t == 'new_rows' else 'OLD'} TABLE AS {t}" for t in tables
        )
        op.execute(
            f"CREATE TRIGGER {function} AFTER {event.upper()} ON jobs "
            f"REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event in EVENTS:
            op.execute(f"DROP TRIGGER bgjobs_due_jobs_{event} ON jobs")
            op.execute(f"DROP FUNCTION bgjobs_due_jobs_{event}()")
    op.drop_index("ix_due_counts_minute", table_name="due_counts")
    op.drop_table("due_counts")
