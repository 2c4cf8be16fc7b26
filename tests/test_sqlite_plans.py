"""The hot queries use their indexes, so their cost does not grow with the backlog.

Each query is captured as the SQLite backend really sends it, then explained by SQLite.
"""

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from app.queue.service import QueueService
from app.storage.sqlite import reserve_sql, ts


@pytest.fixture
def backend() -> str:
    """These plans are SQLite's (tests/test_postgres.py explains PostgreSQL's)."""
    return "sqlite"


async def captured(
    service: QueueService, call: Callable[[], Awaitable[Any]]
) -> list[tuple[str, Any]]:
    statements: list[tuple[str, Any]] = []
    engine = service.storage.engine.sync_engine  # type: ignore[attr-defined]

    me = asyncio.current_task()

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if asyncio.current_task() is not me:  # the reaper's queries
            return
        if not statement.lstrip().upper().startswith(("BEGIN", "PRAGMA")):
            statements.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return statements


def plan(db: Path, statement: str, params: Any) -> str:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
    return "\n".join(row[-1] for row in rows)


def assert_no_table_scan(text: str) -> None:
    for line in text.splitlines():
        if (
            line.startswith("SCAN jobs")
            or line.startswith("SCAN succeeded")
            or line.startswith("SCAN failed")
        ):
            assert "INDEX" in line, text


async def test_reserve_uses_the_ready_index(service: QueueService, tmp_path: Path) -> None:
    """Reserve runs on the writer's own connection: explain the very text it prepares."""
    for name in ("a", "b"):
        for _ in range(3):
            await service.enqueue(name, "x", 3)
    now = ts(service.clock.now())
    params = {"n0": "a", "n1": "b", "now": now, "max_jobs": 2, "max_bytes": 1 << 20}
    params |= {"worker": "w", "expires": now}
    text = plan(tmp_path / "bgjobs.db", reserve_sql(2), params)
    # One bounded range per name, in (priority, available_at) order: no sort of the range.
    assert text.count("ix_jobs_ready_priority") == 2, text
    # Sorts only of bounded sets: each name's <= max_jobs rows for the merge, and the
    # <= max_jobs oldest for the running total of payload sizes; never of `jobs` itself.
    assert text.count("TEMP B-TREE") <= 2 + 1, text
    assert_no_table_scan(text)
    # Each name's room: its settings and kept count, each found by key, never scanned.
    assert text.count("SEARCH q USING INDEX sqlite_autoindex_queues_1") == 2, text
    assert text.count("SEARCH job_counts USING INDEX sqlite_autoindex_job_counts_1") == 2, text
    assert "SCAN q" not in text and "SCAN job_counts" not in text, text


async def test_due_lookup_and_reaper_use_indexes(service: QueueService, tmp_path: Path) -> None:
    now = service.clock.now()
    queries = await captured(service, lambda: service.storage.earliest("a"))
    queries += await captured(service, lambda: service.storage.expired_leases(now, 100))
    texts = [plan(tmp_path / "bgjobs.db", s, p) for s, p in queries]
    assert "ix_jobs_ready " in texts[0] and "ix_jobs_lease_expiry" in texts[1], texts
    for text in texts:
        assert_no_table_scan(text)


async def test_history_pages_use_their_index(service: QueueService, tmp_path: Path) -> None:
    page = await service.list_failed(None, 10, None)
    assert page.items == []
    queries = await captured(service, lambda: service.list_succeeded("a", 10, None))
    text = plan(tmp_path / "bgjobs.db", *queries[0])
    assert "ix_succeeded_jobs_name_succeeded_at" in text, text
    assert "TEMP B-TREE" not in text, text
