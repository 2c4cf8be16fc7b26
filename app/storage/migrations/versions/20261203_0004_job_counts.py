"""Counts for /metrics and /stats: jobs finished per name and minute (written by the
server's writer), and jobs per name and state (kept by triggers on the job tables).

Only adds tables and triggers, so a replica of the previous release keeps working during
a rolling upgrade, and its writes are counted too: the triggers live in the database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = ("pending", "reserved", "succeeded", "failed")
# What one row of a table adds to (pending, reserved, succeeded, failed).
EFFECT = {
    "jobs": (
        "CASE WHEN {row}.reserved_at IS NULL THEN 1 ELSE 0 END",
        "CASE WHEN {row}.reserved_at IS NULL THEN 0 ELSE 1 END",
        "0",
        "0",
    ),
    "succeeded_jobs": ("0", "0", "1", "0"),
    "failed_jobs": ("0", "0", "0", "1"),
}
ADD = ", ".join(f"{c} = job_counts.{c} + excluded.{c}" for c in COUNTS)
UPSERT = (
    "INSERT INTO job_counts (name, shard, pending, reserved, succeeded, failed) "
    "{rows} ON CONFLICT (name, shard) DO UPDATE SET " + ADD
)


def _effect(table: str, row: str, sign: str) -> str:
    """The four deltas of one row, named d0..d3 (SQLite has no `AS t (columns)`)."""
    terms = EFFECT[table]
    return ", ".join(f"{sign}({term.format(row=row)}) AS d{i}" for i, term in enumerate(terms))


def upgrade() -> None:
    op.create_table(
        "finished_per_minute",
        sa.Column("name", sa.String(length=255), primary_key=True),
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("shard", sa.Integer(), primary_key=True),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
    )
    op.create_index("ix_finished_per_minute_minute", "finished_per_minute", ["minute"])
    op.create_table(
        "job_counts",
        sa.Column("name", sa.String(length=255), primary_key=True),
        sa.Column("shard", sa.Integer(), primary_key=True),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in COUNTS),
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgres_triggers()
    else:
        _sqlite_triggers()
    _backfill()


def _sqlite_triggers() -> None:
    """Row triggers (SQLite has no others); one writer, so one shard. `WHERE true` tells
    SQLite's parser that ON CONFLICT belongs to the INSERT."""
    for table in EFFECT:
        for event, row, sign in (("INSERT", "NEW", "+"), ("DELETE", "OLD", "-")):
            values = f"SELECT {row}.name, 0, {_effect(table, row, sign)} WHERE true"
            op.execute(
                f"CREATE TRIGGER {table}_count_{event.lower()} AFTER {event} ON {table} "
                f"BEGIN {UPSERT.format(rows=values)}; END"
            )
    # Only a change between reserved and not reserved moves a count (a job keeps its name).
    values = f"SELECT NEW.name, 0, {_effect('jobs', 'NEW', '+')} WHERE true"
    undo = f"SELECT OLD.name, 0, {_effect('jobs', 'OLD', '-')} WHERE true"
    op.execute(
        "CREATE TRIGGER jobs_count_update AFTER UPDATE OF reserved_at ON jobs "
        "WHEN (OLD.reserved_at IS NULL) <> (NEW.reserved_at IS NULL) "
        f"BEGIN {UPSERT.format(rows=values)}; {UPSERT.format(rows=undo)}; END"
    )


def _postgres_triggers() -> None:
    """Statement triggers: one upsert per name per statement, however many rows it
    touched. Each backend (a replica's writer connection) adds to its own shard, so
    replicas never wait on each other's count rows; names are locked in order."""
    for table in EFFECT:
        for event in ("INSERT", "UPDATE", "DELETE"):
            if event == "UPDATE" and table != "jobs":
                continue
            parts = []
            if event != "DELETE":
                parts.append(f"SELECT name, {_effect(table, 'n', '+')} FROM new_rows AS n")
            if event != "INSERT":
                parts.append(f"SELECT name, {_effect(table, 'o', '-')} FROM old_rows AS o")
            sums = ", ".join(f"sum(d{i}) AS {c}" for i, c in enumerate(COUNTS))
            rows = (
                f"SELECT name, pg_backend_pid() % 16, {sums} FROM ("
                + " UNION ALL ".join(parts)
                + ") AS d GROUP BY name HAVING "
                + " OR ".join(f"sum(d{i}) <> 0" for i in range(4))
                + " ORDER BY name"
            )
            function = f"bgjobs_count_{table}_{event.lower()}"
            op.execute(
                f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN {UPSERT.format(rows=rows)}; RETURN NULL; END $$"
            )
            referencing = " ".join(
                f"{age} TABLE AS {alias}"
                for age, alias in (("OLD", "old_rows"), ("NEW", "new_rows"))
                if (alias == "new_rows" and event != "DELETE")
                or (alias == "old_rows" and event != "INSERT")
            )
            op.execute(
                f"CREATE TRIGGER {function} AFTER {event} ON {table} "
                f"REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )


def _backfill() -> None:
    """Count what is already there (in the migration's transaction: on PostgreSQL the
    triggers just created hold writers off until it commits)."""
    parts = " UNION ALL ".join(
        f"SELECT name, {_effect(table, table, '+')} FROM {table}" for table in EFFECT
    )
    sums = ", ".join(f"sum(d{i})" for i in range(4))
    op.execute(
        "INSERT INTO job_counts (name, shard, pending, reserved, succeeded, failed) "
        f"SELECT name, 0, {sums} FROM ({parts}) AS d GROUP BY name"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, events in (
            ("jobs", ("insert", "update", "delete")),
            ("succeeded_jobs", ("insert", "delete")),
            ("failed_jobs", ("insert", "delete")),
        ):
            for event in events:
                op.execute(f"DROP TRIGGER bgjobs_count_{table}_{event} ON {table}")
                op.execute(f"DROP FUNCTION bgjobs_count_{table}_{event}()")
    else:
        for name in ("insert", "delete"):
            for table in EFFECT:
                op.execute(f"DROP TRIGGER {table}_count_{name}")
        op.execute("DROP TRIGGER jobs_count_update")
    op.drop_table("job_counts")
    op.drop_table("finished_per_minute")
