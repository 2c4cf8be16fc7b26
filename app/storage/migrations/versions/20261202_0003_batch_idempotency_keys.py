"""Idempotency keys for POST /jobs/batch (a new table only: a replica of the previous
release keeps working on this schema during a rolling upgrade).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batch_idempotency_keys",
        sa.Column("key", sa.String(length=255), primary_key=True),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("job_ids", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_batch_idempotency_keys_created_at", "batch_idempotency_keys", ["created_at"]
    )


def downgrade() -> None:
    op.drop_table("batch_idempotency_keys")
