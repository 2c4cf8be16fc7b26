"""PostgreSQL: the scale-out backend, for several replicas of the server on one database.

Replicas never hand out the same job and never wait on each other's rows: reserve locks
the rows it takes with FOR UPDATE SKIP LOCKED. A change that makes a job ready is
announced with NOTIFY in its own transaction (delivered at commit), and every replica
LISTENs on one dedicated connection, so a long poll on any replica wakes within
milliseconds of an enqueue on another.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg
from sqlalchemy import Select, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from app.queue.models import Lease
from app.storage import migrate
from app.storage.common import SqlStorage, jobs, lease_update, leases_from, per_name

log = logging.getLogger("bgjobs.storage.postgres")

CHANNEL = "bgjobs_ready"
MIGRATION_LOCK = 0x6267_6A6F_6273  # "bgjobs": one replica migrates, the others wait for it
KEEPALIVE_S = 5.0


class PostgresStorage(SqlStorage):
    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        self._dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
        self._sender = os.urandom(6).hex()  # to skip this replica's own notifications
        self._listener: asyncio.Task[None] | None = None

    async def migrate(self) -> None:
        async with self._write() as conn:
            await conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            await conn.run_sync(migrate.upgrade)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await super().close()

    async def _probe_write(self, conn: AsyncConnection) -> None:
        await conn.execute(text("SET TRANSACTION READ WRITE"))  # fails on a read-only standby

    async def reserve(
        self,
        names: Sequence[str],
        worker_id: str,
        max_jobs: int,
        now: datetime,
        expires_at: datetime,
    ) -> list[Lease]:
        """UPDATE ... WHERE id IN (a MATERIALIZED CTE of rows locked FOR UPDATE SKIP LOCKED).

        SKIP LOCKED lets concurrent reserves on any replica pass over each other's rows
        instead of waiting or double-booking them. The CTE is an optimization fence: as a
        plain IN (sub-select), the planner may run the LIMITed sub-select more than once
        and lock more rows than it returns. With several names, each name's range locks up
        to `max_jobs` rows and the oldest `max_jobs` of them are kept; the rest are
        unlocked at commit, a moment later.
        """

        def ready(name: str) -> Select[tuple[str, datetime]]:
            return (
                select(jobs.c.id, jobs.c.available_at)
                .where(
                    jobs.c.name == name, jobs.c.reserved_at.is_(None), jobs.c.available_at <= now
                )
                .order_by(jobs.c.available_at, jobs.c.id)
                .limit(max_jobs)
                .with_for_update(skip_locked=True)
            )

        candidates = per_name(names, ready)
        picked = (
            select(candidates.c.id)
            .order_by(candidates.c.available_at, candidates.c.id)
            .limit(max_jobs)
            .cte("picked")
            .prefix_with("MATERIALIZED")
        )
        stmt = lease_update(select(picked.c.id), worker_id, now, expires_at)
        async with self._write() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return leases_from(rows, expires_at, now)

    # -- cross-replica wake-ups ---------------------------------------------------------

    async def _announce(self, conn: AsyncConnection, name: str, available_at: datetime) -> None:
        payload = f"{self._sender}|{available_at.isoformat()}|{name}"
        await conn.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
        )

    async def listen(
        self, on_ready: Callable[[str, datetime], None], on_gap: Callable[[], None]
    ) -> None:
        self._listener = asyncio.create_task(self._listen_forever(on_ready, on_gap))

    async def _listen_forever(
        self, on_ready: Callable[[str, datetime], None], on_gap: Callable[[], None]
    ) -> None:
        """Hold one LISTEN connection; reconnect when it drops.

        Notifications sent while it was down are lost, so after every reconnect all
        waiters are woken to look at the database themselves (`on_gap`).
        """
        delay = 0.1
        while True:
            try:
                async with self._listening(on_ready) as (conn, lost):
                    delay = 0.1
                    on_gap()
                    while not lost.is_set():
                        try:
                            await asyncio.wait_for(lost.wait(), KEEPALIVE_S)
                        except TimeoutError:  # quiet: make sure the link is still alive
                            await asyncio.wait_for(conn.fetchval("SELECT 1"), KEEPALIVE_S)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    @asynccontextmanager
    async def _listening(
        self, on_ready: Callable[[str, datetime], None]
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncio.Event]]:
        def received(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            sender, at, name = payload.split("|", 2)
            if sender != self._sender:
                on_ready(name, datetime.fromisoformat(at))

        conn = await asyncpg.connect(self._dsn)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(CHANNEL, received)
            yield conn, lost
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
