"""SQLite: the server's writer keeps `job_counts`, not row triggers.

A trigger per row (five upserts per job from enqueue to ack) cost a third of the batched
cycle. On SQLite the server's writer is the only writer (one process, one connection),
so it tallies what each statement did and writes one upsert per name and transaction
(`Tally` in app/storage/sqlite.py). The counts are right at this revision, so they carry
over. PostgreSQL keeps its statement triggers: there, replicas of other releases write
too. Nothing changes on PostgreSQL.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRIGGERS = (
    "jobs_count_insert",
    "jobs_count_delete",
    "jobs_count_update",
    "succeeded_jobs_count_insert",
    "succeeded_jobs_count_delete",
    "failed_jobs_count_insert",
    "failed_jobs_count_delete",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")


def downgrade() -> None:
    """Back to 0004's triggers (the counts are right now, so no recount)."""
    if op.get_bind().dialect.name == "sqlite":
        path = next(Path(__file__).parent.glob("*_0004_job_counts.py"))
        spec = importlib.util.spec_from_file_location("job_counts_0004", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module._sqlite_triggers()
