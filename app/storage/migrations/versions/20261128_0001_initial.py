"""Pending, succeeded and failed jobs (bg_jobs' three tables) with their indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNRESERVED = sa.text("reserved_at IS NULL")
RESERVED = sa.text("reserved_at IS NOT NULL")


def _time(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _job_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "jobs",
        *_job_columns(),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        _time("created_at"),
        _time("available_at"),
        _time("reserved_at", nullable=True),
        sa.Column("reserved_by", sa.String(length=255), nullable=True),
        sa.Column("lease_id", sa.String(length=96), nullable=True),
        sa.Column("lease_seq", sa.Integer(), nullable=False),
        _time("lease_expires_at", nullable=True),
    )
    op.create_index(
        "ix_jobs_ready",
        "jobs",
        ["name", "available_at", "id"],
        sqlite_where=UNRESERVED,
        postgresql_where=UNRESERVED,
    )
    op.create_index(
        "ix_jobs_lease_expiry",
        "jobs",
        ["lease_expires_at"],
        sqlite_where=RESERVED,
        postgresql_where=RESERVED,
    )
    op.create_index("ix_jobs_available_at", "jobs", ["available_at", "id"])

    op.create_table(
        "succeeded_jobs",
        *_job_columns(),
        sa.Column("lease_seq", sa.Integer(), nullable=False),
        _time("created_at"),
        _time("available_at"),
        _time("succeeded_at"),
    )
    op.create_index("ix_succeeded_jobs_succeeded_at", "succeeded_jobs", ["succeeded_at", "id"])
    op.create_index(
        "ix_succeeded_jobs_name_succeeded_at", "succeeded_jobs", ["name", "succeeded_at", "id"]
    )

    op.create_table(
        "failed_jobs",
        *_job_columns(),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("lease_seq", sa.Integer(), nullable=False),
        sa.Column("exception", sa.Text(), nullable=False),
        _time("created_at"),
        _time("available_at"),
        _time("failed_at"),
    )
    op.create_index("ix_failed_jobs_failed_at", "failed_jobs", ["failed_at", "id"])
    op.create_index("ix_failed_jobs_name_failed_at", "failed_jobs", ["name", "failed_at", "id"])


def downgrade() -> None:
    op.drop_table("failed_jobs")
    op.drop_table("succeeded_jobs")
    op.drop_table("jobs")
