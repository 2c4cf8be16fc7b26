"""Operations both SQL backends share, in SQLAlchemy's dialect-neutral expression language.

A backend subclass supplies its engine set-up, how a write transaction begins, and its
reserve statement (the one place where SQLite and PostgreSQL differ in substance).
"""

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Executable,
    RowMapping,
    Select,
    delete,
    insert,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.queue.errors import StorageUnavailable
from app.queue.models import (
    AnyJob,
    Buried,
    Enqueued,
    ExpiredLease,
    FailedJob,
    FailOutcome,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    RetryDecision,
    Retrying,
    SucceededJob,
    pending_state,
)
from app.storage import migrate
from app.storage.base import CancelResult, HistoryQuery, LeasePosition, PendingQuery
from app.storage.tables import FailedJobRow, IdempotencyKeyRow, JobRow, SucceededJobRow

jobs = JobRow.__table__  # type: ignore[attr-defined]
succeeded = SucceededJobRow.__table__  # type: ignore[attr-defined]
failed = FailedJobRow.__table__  # type: ignore[attr-defined]
keys = IdempotencyKeyRow.__table__  # type: ignore[attr-defined]

_JOB_FIELDS = (
    "id",
    "name",
    "payload",
    "attempts",
    "max_retries",
    "created_at",
    "available_at",
    "reserved_at",
    "reserved_by",
)
_SUCCEEDED_FIELDS = (
    "id",
    "name",
    "payload",
    "attempts",
    "created_at",
    "available_at",
    "succeeded_at",
)
_FAILED_FIELDS = (
    "id",
    "name",
    "payload",
    "attempts",
    "exception",
    "created_at",
    "available_at",
    "failed_at",
)


def job_from(row: Mapping[Any, Any], now: datetime) -> Job:
    fields = {f: row[f] for f in _JOB_FIELDS}
    return Job(**fields, state=pending_state(row["available_at"], row["reserved_at"], now))


def succeeded_from(row: Mapping[Any, Any]) -> SucceededJob:
    return SucceededJob(**{f: row[f] for f in _SUCCEEDED_FIELDS})


def failed_from(row: Mapping[Any, Any]) -> FailedJob:
    return FailedJob(**{f: row[f] for f in _FAILED_FIELDS})


async def first(conn: AsyncConnection, stmt: Executable) -> RowMapping | None:
    """The first row of a statement as a mapping, or None."""
    return (await conn.execute(stmt)).mappings().first()


def per_name(names: Sequence[str], build: Callable[[str], Select[Any]]) -> Any:
    """One index range per job name, glued with UNION ALL.

    A single `name IN (...) ORDER BY available_at` would have to sort every ready job of
    those names; one bounded range scan per name keeps the cost independent of the backlog.
    """
    parts = [select(build(name).subquery()) for name in dict.fromkeys(names)]  # each name once
    return (parts[0] if len(parts) == 1 else union_all(*parts)).subquery()


def lease_update(picked: Any, worker_id: str, now: datetime, expires_at: datetime) -> Any:
    """The UPDATE that turns the picked rows into leases: one more attempt, the worker, the
    next lease number and the lease id `{job id}.{n}` built from it, all in one statement.
    `reserved_at IS NULL` is checked again on every row it changes."""
    next_seq = jobs.c.lease_seq + 1
    return (
        update(jobs)
        .where(jobs.c.id.in_(picked), jobs.c.reserved_at.is_(None))
        .values(
            attempts=jobs.c.attempts + 1,
            reserved_at=now,
            reserved_by=worker_id,
            lease_seq=next_seq,
            lease_id=jobs.c.id + "." + next_seq.cast(jobs.c.lease_id.type),
            lease_expires_at=expires_at,
        )
        .returning(*jobs.c)
    )


def leases_from(rows: Sequence[RowMapping], expires_at: datetime, now: datetime) -> list[Lease]:
    """RETURNING order is unspecified: hand leases out oldest first, as they were picked."""
    ordered = sorted(rows, key=lambda row: (row["available_at"], row["id"]))
    return [Lease(row["lease_id"], expires_at, job_from(row, now)) for row in ordered]


class SqlStorage:
    """The shared SQL implementation of the Storage protocol."""

    engine: AsyncEngine
    _write_failure: str | None = None  # why the last write failed, until one succeeds

    async def migrate(self) -> None:
        async with self._write() as conn:
            await conn.run_sync(migrate.upgrade)

    async def schema_revision(self) -> str | None:
        async with self._read() as conn:
            return await conn.run_sync(migrate.current_revision)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        """Ready means readable and, if the last write failed, writable again."""
        async with self._read() as conn:
            await conn.execute(select(1))
        if self._write_failure is not None:
            async with self._write() as conn:
                await self._probe_write(conn)

    async def _probe_write(self, conn: AsyncConnection) -> None:
        """A write that really reaches the database, for readiness after a failed write."""
        raise NotImplementedError

    async def listen(
        self, on_ready: Callable[[str, datetime], None], on_gap: Callable[[], None]
    ) -> None:
        """One process, one notifier: nothing to listen to (PostgreSQL overrides this)."""

    async def _announce(self, conn: AsyncConnection, name: str, available_at: datetime) -> None:
        """Tell other replicas that a job of `name` is ready at `available_at`."""

    # -- transactions -------------------------------------------------------------------

    @asynccontextmanager
    async def _guard(self, writing: bool = False) -> AsyncIterator[None]:
        """Turn driver errors into the one domain error callers can act on, and remember
        whether the last write failed (readiness then needs a successful write)."""
        try:
            yield
            if writing:
                self._write_failure = None
        except IntegrityError:
            raise  # a race on a unique key: the caller decides
        except (DBAPIError, OSError) as exc:
            detail = f"database unavailable: {getattr(exc, 'orig', None) or exc}"
            if writing:
                self._write_failure = detail
            raise StorageUnavailable(detail) from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self._guard(), self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction; backends may serialize writers here."""
        async with self._guard(writing=True), self.engine.begin() as conn:
            yield conn

    # -- hot path -----------------------------------------------------------------------

    async def enqueue(self, job: NewJob, now: datetime) -> Job:
        async with self._write() as conn:
            return await self._insert_job(conn, job, now)

    async def enqueue_once(self, job: NewJob, now: datetime, key: IdempotencyKey) -> Enqueued:
        """Claim the key and enqueue in one transaction, or report the key's earlier use.

        Two requests racing with one key on PostgreSQL: the loser's insert of the key hits
        the primary key, its transaction rolls back, and its second try finds the winner's.
        """
        for attempt in range(2):
            try:
                async with self._write() as conn:
                    used = await first(
                        conn, select(keys).where(keys.c.key == key.key).with_for_update()
                    )
                    if used is not None and used["created_at"] >= key.not_before:
                        return Enqueued(
                            await self._get(conn, used["job_id"], now),
                            created=False,
                            same_request=used["fingerprint"] == key.fingerprint,
                        )
                    if used is not None:  # expired: the key starts afresh
                        await conn.execute(delete(keys).where(keys.c.key == key.key))
                    claim = {"key": key.key, "fingerprint": key.fingerprint, "job_id": job.id}
                    await conn.execute(insert(keys), {**claim, "created_at": now})
                    return Enqueued(await self._insert_job(conn, job, now), created=True)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _insert_job(self, conn: AsyncConnection, job: NewJob, now: datetime) -> Job:
        values = {
            "id": job.id,
            "name": job.name,
            "payload": job.payload,
            "attempts": 0,
            "max_retries": job.max_retries,
            "created_at": job.created_at,
            "available_at": job.available_at,
            "lease_seq": 0,
        }
        await conn.execute(insert(jobs), values)
        await self._announce(conn, job.name, job.available_at)
        return job_from({**values, "reserved_at": None, "reserved_by": None}, now)

    async def next_due(self, names: Sequence[str], now: datetime) -> datetime | None:
        def soonest(name: str) -> Select[Any]:
            return (
                select(jobs.c.available_at)
                .where(jobs.c.name == name, jobs.c.reserved_at.is_(None), jobs.c.available_at > now)
                .order_by(jobs.c.available_at)
                .limit(1)
            )

        due = per_name(names, soonest)
        async with self._read() as conn:
            times = (await conn.execute(select(due.c.available_at))).scalars().all()
        return min(times, default=None)

    async def ack(self, job_id: str, lease_id: str, now: datetime) -> SucceededJob | None:
        async with self._write() as conn:
            taken = delete(jobs).where(jobs.c.id == job_id, jobs.c.lease_id == lease_id)
            row = await first(conn, taken.returning(*jobs.c))
            if row is None:
                return None
            values = {f: row[f] for f in _SUCCEEDED_FIELDS if f != "succeeded_at"}
            values.update(succeeded_at=now, lease_seq=row["lease_seq"])
            await conn.execute(insert(succeeded), values)
        return succeeded_from(values)

    async def fail(
        self,
        job_id: str,
        lease_id: str,
        now: datetime,
        exception: str,
        decide: RetryDecision,
        expired_before: datetime | None = None,
    ) -> FailOutcome | None:
        held = [jobs.c.id == job_id, jobs.c.lease_id == lease_id]
        if expired_before is not None:
            held += [jobs.c.reserved_at.is_not(None), jobs.c.lease_expires_at <= expired_before]
        async with self._write() as conn:
            row = await first(conn, select(jobs).where(*held).with_for_update())
            if row is None:
                return None
            retry_at = decide(row["attempts"], row["max_retries"])
            if retry_at is not None:
                return Retrying(await self._requeue(conn, job_id, retry_at, now))
            return Buried(await self._bury(conn, row, exception, now))

    async def _requeue(
        self, conn: AsyncConnection, job_id: str, available_at: datetime, now: datetime
    ) -> Job:
        """Pending again at `available_at`; the lease id stays so a late ack still counts."""
        stmt = (
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                available_at=available_at, reserved_at=None, reserved_by=None, lease_expires_at=None
            )
            .returning(*jobs.c)
        )
        row = await first(conn, stmt)
        assert row is not None  # the caller holds the row
        await self._announce(conn, row["name"], available_at)
        return job_from(row, now)

    async def _bury(
        self, conn: AsyncConnection, row: Mapping[Any, Any], exception: str, now: datetime
    ) -> FailedJob:
        await conn.execute(delete(jobs).where(jobs.c.id == row["id"]))
        values = {f: row[f] for f in _FAILED_FIELDS if f not in ("exception", "failed_at")}
        values.update(
            exception=exception,
            failed_at=now,
            max_retries=row["max_retries"],
            lease_seq=row["lease_seq"],
        )
        await conn.execute(insert(failed), values)
        return failed_from(values)

    async def extend(self, job_id: str, lease_id: str, expires_at: datetime) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.lease_id == lease_id,
                    jobs.c.reserved_at.is_not(None),
                )
                .values(lease_expires_at=expires_at)
            )
        return result.rowcount == 1

    async def release(self, job_id: str, lease_id: str, now: datetime) -> Job | None:
        stmt = (
            update(jobs)
            .where(
                jobs.c.id == job_id, jobs.c.lease_id == lease_id, jobs.c.reserved_at.is_not(None)
            )
            .values(
                reserved_at=None,
                reserved_by=None,
                lease_id=None,
                lease_expires_at=None,
                attempts=jobs.c.attempts - 1,
            )
            .returning(*jobs.c)
        )
        async with self._write() as conn:
            row = await first(conn, stmt)
            if row is None:
                return None
            await self._announce(conn, row["name"], row["available_at"])
        return job_from(row, now)

    # -- reaper and diagnosis -----------------------------------------------------------

    async def expired_leases(self, now: datetime, limit: int) -> list[ExpiredLease]:
        query = (
            select(
                jobs.c.id, jobs.c.lease_id, jobs.c.name, jobs.c.reserved_by, jobs.c.lease_expires_at
            )
            .where(jobs.c.reserved_at.is_not(None), jobs.c.lease_expires_at <= now)
            .order_by(jobs.c.lease_expires_at)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [ExpiredLease(*row) for row in rows]

    async def lease_position(self, job_id: str) -> LeasePosition | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(jobs.c.lease_seq, jobs.c.lease_id, jobs.c.reserved_at).where(
                        jobs.c.id == job_id
                    )
                )
            ).first()
            if row is not None:
                return LeasePosition("pending", row[0], row[1], row[2] is not None)
            for table, label in ((succeeded, "succeeded"), (failed, "failed")):
                seq = (
                    await conn.execute(select(table.c.lease_seq).where(table.c.id == job_id))
                ).scalar()
                if seq is not None:
                    return LeasePosition(label, seq)  # type: ignore[arg-type]
        return None

    # -- reading and administration -----------------------------------------------------

    async def get(self, job_id: str, now: datetime) -> AnyJob | None:
        async with self._read() as conn:
            return await self._get(conn, job_id, now)

    async def _get(self, conn: AsyncConnection, job_id: str, now: datetime) -> AnyJob | None:
        row = await first(conn, select(jobs).where(jobs.c.id == job_id))
        if row is not None:
            return job_from(row, now)
        row = await first(conn, select(succeeded).where(succeeded.c.id == job_id))
        if row is not None:
            return succeeded_from(row)
        row = await first(conn, select(failed).where(failed.c.id == job_id))
        return None if row is None else failed_from(row)

    async def cancel(self, job_id: str) -> CancelResult:
        async with self._write() as conn:
            gone = await conn.execute(
                delete(jobs).where(jobs.c.id == job_id, jobs.c.reserved_at.is_(None))
            )
            if gone.rowcount:
                return "deleted"
            held = await conn.execute(select(jobs.c.id).where(jobs.c.id == job_id))
            if held.first() is not None:
                return "reserved"
            for table in (succeeded, failed):
                if (await conn.execute(delete(table).where(table.c.id == job_id))).rowcount:
                    return "deleted"
        return "missing"

    async def retry_failed(self, job_id: str, now: datetime) -> Job | None:
        async with self._write() as conn:
            row = await first(
                conn, delete(failed).where(failed.c.id == job_id).returning(*failed.c)
            )
            if row is None:
                return None
            values = {
                "id": row["id"],
                "name": row["name"],
                "payload": row["payload"],
                "attempts": 0,
                "max_retries": row["max_retries"],
                "created_at": row["created_at"],
                "available_at": now,
                "lease_seq": row["lease_seq"],
            }
            await conn.execute(insert(jobs), values)
            await self._announce(conn, row["name"], now)
        return job_from({**values, "reserved_at": None, "reserved_by": None}, now)

    async def list_pending(self, query: PendingQuery, now: datetime) -> list[Job]:
        stmt = select(jobs).order_by(jobs.c.available_at, jobs.c.id).limit(query.limit)
        if query.state == "reserved":
            stmt = stmt.where(jobs.c.reserved_at.is_not(None))
        elif query.state == "available":
            stmt = stmt.where(jobs.c.reserved_at.is_(None), jobs.c.available_at <= now)
        elif query.state == "scheduled":
            stmt = stmt.where(jobs.c.reserved_at.is_(None), jobs.c.available_at > now)
        if query.name is not None:
            stmt = stmt.where(jobs.c.name == query.name)
        if query.after is not None:
            stmt = stmt.where(tuple_(jobs.c.available_at, jobs.c.id) > query.after)
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [job_from(row, now) for row in rows]

    async def prune(
        self, kind: Literal["succeeded", "failed", "idempotency_keys"], before: datetime, limit: int
    ) -> int:
        """One short transaction per batch, oldest first along the table's time index."""
        table, key, stamp = {
            "succeeded": (succeeded, succeeded.c.id, succeeded.c.succeeded_at),
            "failed": (failed, failed.c.id, failed.c.failed_at),
            "idempotency_keys": (keys, keys.c.key, keys.c.created_at),
        }[kind]
        oldest = select(key).where(stamp < before).order_by(stamp).limit(limit)
        async with self._write() as conn:
            result = await conn.execute(delete(table).where(key.in_(oldest)))
        return result.rowcount

    async def list_succeeded(self, query: HistoryQuery) -> list[SucceededJob]:
        rows = await self._history(succeeded, succeeded.c.succeeded_at, query)
        return [succeeded_from(row) for row in rows]

    async def list_failed(self, query: HistoryQuery) -> list[FailedJob]:
        rows = await self._history(failed, failed.c.failed_at, query)
        return [failed_from(row) for row in rows]

    async def _history(self, table: Any, finished: Any, query: HistoryQuery) -> Sequence[Any]:
        """Newest first with a (finished_at, id) keyset: rows arriving later sort before the
        cursor, so a walk returns every older row exactly once."""
        stmt = select(table).order_by(finished.desc(), table.c.id.desc()).limit(query.limit)
        if query.name is not None:
            stmt = stmt.where(table.c.name == query.name)
        if query.before is not None:
            stmt = stmt.where(tuple_(finished, table.c.id) < query.before)
        async with self._read() as conn:
            return (await conn.execute(stmt)).mappings().all()
