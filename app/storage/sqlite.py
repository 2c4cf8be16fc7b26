"""The embedded default: one SQLite file in WAL mode, for one server process.

SQLite allows one writer at a time. Rather than let concurrent requests collide on the
file lock (SQLITE_BUSY), writers queue on an asyncio lock and each write transaction
starts with BEGIN IMMEDIATE; readers run concurrently on their own connections (WAL).
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from app.queue.models import Lease
from app.storage.common import SqlStorage, jobs, lease_update, leases_from, per_name


class SqliteStorage(SqlStorage):
    def __init__(self, url: str, synchronous: str = "NORMAL") -> None:
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_async_engine(url, pool_size=8, max_overflow=8)
        self._write_lock = asyncio.Lock()
        self._install_pragmas(synchronous)

    def _install_pragmas(self, synchronous: str) -> None:
        @event.listens_for(self.engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        @event.listens_for(self.engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("writer") else "BEGIN")

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._guard(writing=True), self._write_lock, self.engine.connect() as conn:
            conn.sync_connection.info["writer"] = True  # type: ignore[union-attr]
            try:
                async with conn.begin():
                    yield conn
            finally:
                conn.sync_connection.info["writer"] = False  # type: ignore[union-attr]

    async def _probe_write(self, conn: AsyncConnection) -> None:
        await conn.exec_driver_sql("PRAGMA user_version = 0")  # rewrites the header page

    async def reserve(
        self,
        names: Sequence[str],
        worker_id: str,
        max_jobs: int,
        now: datetime,
        expires_at: datetime,
    ) -> list[Lease]:
        """One UPDATE ... WHERE id IN (oldest ready ids) RETURNING.

        Safe without row locks: the statement runs inside a BEGIN IMMEDIATE transaction,
        so no other writer can reserve between the sub-select and the update, and the
        `reserved_at IS NULL` guard is re-checked on every row it changes.
        """

        def ready(name: str) -> Select[Any]:
            return (
                select(jobs.c.id, jobs.c.available_at)
                .where(
                    jobs.c.name == name, jobs.c.reserved_at.is_(None), jobs.c.available_at <= now
                )
                .order_by(jobs.c.available_at, jobs.c.id)
                .limit(max_jobs)
            )

        candidates = per_name(names, ready)
        oldest = (
            select(candidates.c.id)
            .order_by(candidates.c.available_at, candidates.c.id)
            .limit(max_jobs)
        )
        stmt = lease_update(oldest, worker_id, now, expires_at)
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return leases_from(rows, expires_at, now)
