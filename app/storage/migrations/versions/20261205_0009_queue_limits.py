"""Queue limits: a concurrency limit and a rate limit (a token bucket) per job name, kept
in the name's `queues` row.

Only adds nullable columns: a replica of the previous release keeps working during a
rolling upgrade (it does not know about limits, so it leases past them until it is
replaced).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("concurrency_limit", "rate_count", "rate_per_ms", "tokens", "tokens_at")


def upgrade() -> None:
    with op.batch_alter_table("queues") as batch:
        batch.add_column(sa.Column("concurrency_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rate_count", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("rate_per_ms", sa.BigInteger(), nullable=True))
        # The bucket: tokens left at `tokens_at` (refilled on read, up to `rate_count`).
        batch.add_column(sa.Column("tokens", sa.Float(), nullable=True))
        batch.add_column(sa.Column("tokens_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queues") as batch:
        for column in COLUMNS:
            batch.drop_column(column)
