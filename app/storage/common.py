"""What both SQL backends share: the read side (SQLAlchemy Core, off the hot path), the
row-to-model conversions, and the write methods of the port, which all go through one
group-commit writer (`writer.py`) to the backend's own hand-written statements.
"""

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import RowMapping, Select, case, func, or_, select, tuple_, union_all
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.queue.errors import StorageUnavailable
from app.queue.models import (
    KEEP,
    AnyJob,
    Enqueued,
    EnqueuedBatch,
    ExpiredLease,
    FailedJob,
    FailOutcome,
    Hold,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    QueueChange,
    QueueSettings,
    RateLimit,
    RetryDecision,
    SucceededJob,
    pending_state,
)
from app.queue.ports import (
    CancelResult,
    DeleteScope,
    FailItem,
    FailureGroup,
    Finished,
    FireResult,
    HistoryQuery,
    LeasePosition,
    NameCounts,
    PendingQuery,
    PruneKind,
    WalkQuery,
)
from app.queue.schedules import Firing, Schedule
from app.storage import migrate
from app.storage.tables import (
    DueCountRow,
    FailedJobRow,
    FinishedPerMinuteRow,
    JobCountRow,
    JobRow,
    QueueRow,
    ScheduleRow,
    SucceededJobRow,
)
from app.storage.writer import Op, Writer

jobs = JobRow.__table__  # type: ignore[attr-defined]
succeeded = SucceededJobRow.__table__  # type: ignore[attr-defined]
failed = FailedJobRow.__table__  # type: ignore[attr-defined]
counts = JobCountRow.__table__  # type: ignore[attr-defined]
finished = FinishedPerMinuteRow.__table__  # type: ignore[attr-defined]
due = DueCountRow.__table__  # type: ignore[attr-defined]
queues = QueueRow.__table__  # type: ignore[attr-defined]
schedules_table = ScheduleRow.__table__  # type: ignore[attr-defined]
TABLES = (jobs, succeeded, failed)
NAMES_CHUNK = 1000  # ids per query in `names_of` (three IN lists: well under bind limits)

# How far the server's clock and the database's may drift apart before scheduled counts
# go wrong: `due_counts` is read only from this many minutes past the later of the two
# clocks' current minute on, and the minutes before are counted along the ready index.
CLOCK_SKEW_MINUTES = 2
SETTINGS_COLUMNS = (
    queues.c.name,
    queues.c.paused,
    queues.c.concurrency_limit,
    queues.c.rate_count,
    queues.c.rate_per_ms,
)


# A poll held for a token looks this long after it is due: the statement's clock (SQLite
# reads times to the millisecond; PostgreSQL's own clock) must see it whole.
TOKEN_MARGIN_MS = 2


def settings_from(row: Sequence[Any]) -> QueueSettings:
    """(paused, concurrency_limit, rate_count, rate_per_ms) as stored."""
    paused, limit, count, per_ms = row
    rate = None if count is None or per_ms is None else RateLimit(int(count), int(per_ms))
    return QueueSettings(bool(paused), None if limit is None else int(limit), rate)


def tokens_now(rate: RateLimit, tokens: float, tokens_at: datetime, now: datetime) -> float:
    """The bucket refilled from `tokens_at` to `now`, holding one token at most (a pace:
    no window of `per_ms` ever sees more than `count` leases)."""
    elapsed_ms = max(0.0, (now - tokens_at).total_seconds() * 1000)
    return min(1.0, tokens + elapsed_ms * rate.count / rate.per_ms)


def queue_upsert(change: QueueChange, now: Any, style: str) -> tuple[str, tuple[Any, ...]]:
    """The statement that applies `change` to a name's row (creating it), and its values
    after the name; `style` is the backend's placeholder ("?" or "$"). A new rate limit
    starts with a full bucket."""
    rate = None if change.rate_limit == KEEP else change.rate_limit
    limit = None if change.concurrency_limit == KEEP else change.concurrency_limit
    values = (
        False if change.paused == KEEP else change.paused,
        now,
        limit,
        None if rate is None else rate.count,
        None if rate is None else rate.per_ms,
        None if rate is None else 1.0,
        None if rate is None else now,
    )
    columns = "paused, updated_at, concurrency_limit, rate_count, rate_per_ms, tokens, tokens_at"
    changed = ["updated_at"]
    if change.paused != KEEP:
        changed.append("paused")
    if change.concurrency_limit != KEEP:
        changed.append("concurrency_limit")
    if change.rate_limit != KEEP:
        changed += ["rate_count", "rate_per_ms", "tokens", "tokens_at"]
    marks = ["?"] * 8 if style == "?" else [f"${i}" for i in range(1, 9)]
    sets = ", ".join(f"{column} = excluded.{column}" for column in changed)
    sql = (
        f"INSERT INTO queues (name, {columns}) VALUES ({', '.join(marks)}) "
        f"ON CONFLICT (name) DO UPDATE SET {sets}"
    )
    return sql, values


def hold_of(
    settings: QueueSettings,
    tokens: float | None,
    tokens_at: datetime | None,
    reserved: int,
    now: datetime,
) -> Hold | None:
    if settings.paused:
        return Hold(None)
    if settings.concurrency_limit is not None and reserved >= settings.concurrency_limit:
        return Hold(None)
    rate = settings.rate_limit
    if rate is not None and tokens is not None and tokens_at is not None:
        if tokens_at.tzinfo is None:
            tokens_at = tokens_at.replace(tzinfo=UTC)
        have = tokens_now(rate, tokens, tokens_at, now)
        if have < 1:
            wait_ms = (1 - have) * rate.per_ms / rate.count + TOKEN_MARGIN_MS
            return Hold(now + timedelta(milliseconds=wait_ms))
    return None


def epoch_minute(moment: datetime) -> int:
    """Minutes since the Unix epoch (the key of `due_counts`)."""
    return int(moment.timestamp() // 60)


# Column lists of the hand-written statements, in the order the builders below read them.
# The schedule columns come last, so the indexes of the others stay as they were.
SCHEDULE_COLUMNS = "schedule_id, scheduled_for, catch_up"
JOB_COLUMNS = (
    "id, name, payload, attempts, max_retries, created_at, available_at, reserved_at, "
    f"reserved_by, lease_expires_at, priority, {SCHEDULE_COLUMNS}"
)
SUCCEEDED_COLUMNS = (
    "id, name, payload, attempts, created_at, available_at, succeeded_at, priority, "
    f"{SCHEDULE_COLUMNS}"
)
FAILED_COLUMNS = (
    "id, name, payload, attempts, exception, created_at, available_at, failed_at, priority, "
    f"{SCHEDULE_COLUMNS}"
)

# The tables a prune kind deletes from: (table, key column, time column).
PRUNED: dict[str, tuple[str, str, str]] = {
    "succeeded": ("succeeded_jobs", "id", "succeeded_at"),
    "failed": ("failed_jobs", "id", "failed_at"),
    "idempotency_keys": ("idempotency_keys", "key", "created_at"),
    "batch_keys": ("batch_idempotency_keys", "key", "created_at"),
    # Whole minutes go at once: a minute's rows (one per name and shard) share the key.
    "finished_counts": ("finished_per_minute", "minute", "minute"),
    # Minutes gone by are never read again (see DueCountRow); the bound is an epoch minute.
    "due_counts": ("due_counts", "minute", "minute"),
    # Run records only guard against a second enqueue of an occurrence while it is recent;
    # the rows of one occurrence time go together.
    "schedule_runs": ("schedule_runs", "scheduled_for", "scheduled_for"),
}
SCHEDULE_FIELDS = (
    "id, name, payload, max_retries, priority, interval_ms, cron, timezone, paused, "
    "skip_if_running, anchor_at, next_run_at, last_run_at, last_job_id, created_at, updated_at"
)


KEPT_COUNTS = ("pending", "reserved", "succeeded", "failed")


def minute_of(moment: datetime) -> datetime:
    """The start of the minute `moment` falls in: the bucket of finished-job counts."""
    return moment.replace(second=0, microsecond=0)


def per_minute(finished: Iterable[tuple[str, datetime]]) -> Counter[tuple[str, datetime]]:
    """How many jobs of each name finished in each minute: one upsert per pair, however
    many jobs a group finished."""
    return Counter((name, minute_of(at)) for name, at in finished)


def job_from(row: Sequence[Any], now: datetime) -> Job:
    """A Job from the JOB_COLUMNS of a row (times already converted)."""
    id_, name, payload, attempts, max_retries, created, available, reserved, by = row[:9]
    state = pending_state(available, reserved, now)
    schedule = (row[11], row[12], flag(row[13])) if len(row) > 11 else (None, None, None)
    return Job(
        id_, name, payload, attempts, max_retries, created, available, reserved, by, state,
        row[9], row[10], *schedule,
    )  # fmt: skip


def flag(value: Any) -> bool | None:
    """A nullable boolean as stored (SQLite keeps 0 and 1)."""
    return None if value is None else bool(value)


def new_job(job: NewJob, now: datetime) -> Job:
    """The row an insert of `job` makes, without reading it back."""
    state = pending_state(job.available_at, None, now)
    return Job(
        job.id, job.name, job.payload, 0, job.max_retries, job.created_at, job.available_at,
        None, None, state, None, job.priority, job.schedule_id, job.scheduled_for, job.catch_up,
    )  # fmt: skip


Order = tuple[Any, Any]  # a listing's (time, id) keyset columns


def handed_lease(job: NewJob, now: datetime, worker_id: str, expires_at: datetime) -> Lease:
    """The lease an insert of `job` already reserved at `now` makes (its first: attempt
    and lease sequence 1), without reading it back."""
    reserved = Job(
        job.id, job.name, job.payload, 1, job.max_retries, job.created_at, job.available_at,
        now, worker_id, "reserved", expires_at, job.priority,
    )  # fmt: skip
    return Lease(f"{job.id}.1", expires_at, reserved)


def leases_from(rows: Sequence[Sequence[Any]], expires_at: datetime) -> list[Lease]:
    """Leases from reserve's RETURNING rows (JOB_COLUMNS then lease_id, the last). RETURNING
    order is unspecified: hand leases out in the order they were picked (priority, then
    oldest)."""
    ordered = sorted(rows, key=lambda row: (row[10], row[6], row[0]))
    return [Lease(row[-1], expires_at, job_from(row, expires_at)) for row in ordered]


def is_outage(exc: BaseException) -> bool:
    """Only a lost or refused connection or an operational failure is an outage (503); a
    programming or data error is a bug (500) and must not look like one."""
    if isinstance(exc, OSError | TimeoutError | OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class SqlStorage:
    """The shared part of both SQL backends; subclasses supply `_apply` (one group of writes
    in one transaction) and the `reserve` picking rules live in their statements."""

    engine: AsyncEngine
    _writer: Writer
    _write_failure: str | None = None  # why the last write failed, until one succeeds

    @property
    def writes(self) -> Counter[str]:
        return self._writer.writes

    async def migrate(self) -> None:
        async with self._read() as conn, conn.begin():
            await conn.run_sync(migrate.upgrade)

    async def schema_revision(self) -> str | None:
        async with self._read() as conn:
            return await conn.run_sync(migrate.current_revision)

    async def close(self) -> None:
        await self._writer.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        """Ready means readable and, if the last write failed, writable again."""
        async with self._read() as conn:
            await conn.execute(select(1))
        if self._write_failure is not None:
            await self._writer.submit("probe", None)

    # Whether several server processes may share this database (replicas on PostgreSQL).
    shared = False

    async def listen(
        self,
        on_ready: Callable[[str, datetime], None],
        on_gap: Callable[[], None],
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """One process, one notifier: nothing to listen to (PostgreSQL overrides this)."""

    async def broadcast(self, payloads: list[str]) -> None:
        """Send messages to every process on this database: none but this one here."""

    # -- the writer ---------------------------------------------------------------------

    async def _apply(self, group: list[Op]) -> list[Any]:
        """Remember whether the last write failed: readiness then needs a write to pass."""
        try:
            results = await self._apply_group(group)
        except StorageUnavailable as exc:
            self._write_failure = exc.detail
            raise
        self._write_failure = None
        return results

    async def _apply_group(self, group: list[Op]) -> list[Any]:
        raise NotImplementedError

    def _is_outage(self, exc: BaseException) -> bool:
        return is_outage(exc)

    async def enqueue(self, job: NewJob, now: datetime) -> Job:
        result: Job = await self._writer.submit("enqueue", (job, now))
        return result

    async def enqueue_leased(
        self, job: NewJob, now: datetime, worker_id: str, expires_at: datetime
    ) -> Lease | None:
        arg = (job, now, worker_id, expires_at)
        result: Lease | None = await self._writer.submit("enqueue_leased", arg)
        return result

    async def configure_queue(self, name: str, change: QueueChange, now: datetime) -> None:
        await self._writer.submit("configure_queue", (name, change, now))

    async def put_schedule(self, schedule: Schedule, retimed: bool) -> None:
        await self._writer.submit("put_schedule", (schedule, retimed))

    async def delete_schedule(self, schedule_id: str) -> bool:
        result: bool = await self._writer.submit("delete_schedule", schedule_id)
        return result

    async def fire_schedule(self, firing: Firing, job: NewJob) -> FireResult:
        result: FireResult = await self._writer.submit("fire_schedule", (firing, job))
        return result

    async def schedules(self, schedule_id: str | None = None) -> list[Schedule]:
        query = select(*(schedules_table.c[c] for c in SCHEDULE_FIELDS.split(", ")))
        if schedule_id is not None:
            query = query.where(schedules_table.c.id == schedule_id)
        async with self._read() as conn:
            rows = (await conn.execute(query.order_by(schedules_table.c.id))).all()
        return [Schedule(*row) for row in rows]

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        table = schedules_table
        query = (
            select(*(table.c[c] for c in SCHEDULE_FIELDS.split(", ")))
            .where(table.c.next_run_at <= now, table.c.paused.is_(False))
            .order_by(table.c.next_run_at)
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [Schedule(*row) for row in rows]

    async def queue_settings(self, name: str | None = None) -> dict[str, QueueSettings]:
        query = select(*SETTINGS_COLUMNS)
        if name is not None:
            query = query.where(queues.c.name == name)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return {row[0]: settings_from(row[1:]) for row in rows}

    async def queue_holds(self, names: Sequence[str], now: datetime) -> dict[str, Hold]:
        """Of `names`, those whose ready jobs cannot be leased now, and until when (a
        read: a hint for waking polls; the reserve statement is what enforces)."""
        reserved = (
            select(func.coalesce(func.sum(counts.c.reserved), 0))
            .where(counts.c.name == queues.c.name)
            .scalar_subquery()
        )
        query = select(*SETTINGS_COLUMNS, queues.c.tokens, queues.c.tokens_at, reserved).where(
            queues.c.name.in_(list(names))
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        self._saw_settings(names, {row[0]: settings_from(row[1:5]) for row in rows})
        holds = {}
        for row in rows:
            hold = hold_of(settings_from(row[1:5]), row[5], row[6], int(row[7]), now)
            if hold is not None:
                holds[row[0]] = hold
        return holds

    def _saw_settings(self, names: Sequence[str], settings: dict[str, QueueSettings]) -> None:
        """What a read found of names' settings (PostgreSQL keeps which are limited)."""

    async def enqueue_once(self, job: NewJob, now: datetime, key: IdempotencyKey) -> Enqueued:
        result: Enqueued = await self._writer.submit("enqueue_once", (job, now, key))
        return result

    async def enqueue_many(self, jobs: Sequence[NewJob], now: datetime) -> list[Job]:
        result: list[Job] = await self._writer.submit("enqueue_many", (list(jobs), now))
        return result

    async def enqueue_many_once(
        self, jobs: Sequence[NewJob], now: datetime, key: IdempotencyKey
    ) -> EnqueuedBatch:
        result: EnqueuedBatch = await self._writer.submit(
            "enqueue_many_once", (list(jobs), now, key)
        )
        return result

    async def reserve(
        self,
        names: Sequence[str],
        worker_id: str,
        max_jobs: int,
        now: datetime,
        expires_at: datetime,
        max_bytes: int | None = None,
    ) -> list[Lease]:
        arg = (tuple(dict.fromkeys(names)), worker_id, max_jobs, now, expires_at, max_bytes)
        result: list[Lease] = await self._writer.submit("reserve", arg)
        return result

    async def ack(self, job_id: str, lease_id: str, now: datetime) -> SucceededJob | None:
        result: SucceededJob | None = await self._writer.submit("ack", (job_id, lease_id, now))
        return result

    async def ack_many(
        self, items: Sequence[tuple[str, str]], now: datetime
    ) -> list[SucceededJob | None]:
        args = [(job_id, lease_id, now) for job_id, lease_id in items]
        return await self._writer.submit_many("ack", args)

    async def fail(
        self,
        job_id: str,
        lease_id: str,
        now: datetime,
        exception: str,
        decide: RetryDecision,
        expired_before: datetime | None = None,
    ) -> FailOutcome | None:
        arg = (job_id, lease_id, now, exception, decide, expired_before)
        result: FailOutcome | None = await self._writer.submit("fail", arg)
        return result

    async def fail_many(self, items: Sequence[FailItem], now: datetime) -> list[FailOutcome | None]:
        args = [(i.job_id, i.lease_id, now, i.exception, i.decide, None) for i in items]
        return await self._writer.submit_many("fail", args)

    async def extend(self, job_id: str, lease_id: str, expires_at: datetime) -> bool:
        result: bool = await self._writer.submit("extend", (job_id, lease_id, expires_at))
        return result

    async def extend_many(
        self, items: Sequence[tuple[str, str]], expires_at: datetime
    ) -> list[bool]:
        args = [(job_id, lease_id, expires_at) for job_id, lease_id in items]
        return await self._writer.submit_many("extend", args)

    async def release(self, job_id: str, lease_id: str, now: datetime) -> Job | None:
        result: Job | None = await self._writer.submit("release", (job_id, lease_id, now))
        return result

    async def cancel(self, job_id: str) -> CancelResult:
        result: CancelResult = await self._writer.submit("cancel", (job_id, "any"))
        return result

    async def delete_many(self, items: Sequence[tuple[str, DeleteScope]]) -> list[CancelResult]:
        return await self._writer.submit_many("cancel", list(items))

    async def retry_failed_many(self, job_ids: Sequence[str], now: datetime) -> list[Job | None]:
        return await self._writer.submit_many("retry_failed", [(i, now) for i in job_ids])

    async def retry_failed(self, job_id: str, now: datetime) -> Job | None:
        result: Job | None = await self._writer.submit("retry_failed", (job_id, now))
        return result

    async def prune(self, kind: PruneKind, before: datetime, limit: int) -> int:
        """One short transaction per batch, oldest first along the table's time index."""
        result: int = await self._writer.submit("prune", (kind, before, limit))
        return result

    # -- reads (SQLAlchemy Core: not on the hot path) -----------------------------------

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                yield conn
        except Exception as exc:
            if self._is_outage(exc):
                raise StorageUnavailable(
                    f"database unavailable: {getattr(exc, 'orig', None) or exc}"
                ) from exc
            raise

    async def earliest(self, name: str) -> datetime | None:
        query = (
            select(jobs.c.available_at)
            .where(jobs.c.name == name, jobs.c.reserved_at.is_(None))
            .order_by(jobs.c.name, jobs.c.available_at)  # the order of ix_jobs_ready
            .limit(1)
        )
        async with self._read() as conn:
            found: datetime | None = (await conn.execute(query)).scalar()
        return found

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

    async def get(self, job_id: str, now: datetime) -> AnyJob | None:
        async with self._read() as conn:
            row = await _first(conn, select(jobs).where(jobs.c.id == job_id))
            if row is not None:
                return job_from([row[c] for c in JOB_COLUMNS.split(", ")], now)
            row = await _first(conn, select(succeeded).where(succeeded.c.id == job_id))
            if row is not None:
                return SucceededJob(*[row[c] for c in SUCCEEDED_COLUMNS.split(", ")])
            row = await _first(conn, select(failed).where(failed.c.id == job_id))
        return None if row is None else FailedJob(*[row[c] for c in FAILED_COLUMNS.split(", ")])

    async def names_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        names: dict[str, str] = {}
        async with self._read() as conn:
            for start in range(0, len(job_ids), NAMES_CHUNK):
                chunk = list(job_ids[start : start + NAMES_CHUNK])
                query = union_all(
                    *(select(t.c.id, t.c.name).where(t.c.id.in_(chunk)) for t in TABLES)
                )
                names.update((row[0], row[1]) for row in await conn.execute(query))
        return names

    async def list_pending(self, query: PendingQuery, now: datetime) -> list[Job]:
        stmt, order = self._pending(query, now)
        async with self._read() as conn:
            rows = (await conn.execute(self._page_of(stmt, order, False, query))).mappings().all()
        columns = JOB_COLUMNS.split(", ")
        return [job_from([row[c] for c in columns], now) for row in rows]

    def _pending(self, query: PendingQuery, now: datetime) -> tuple[Select[Any], Order]:
        """Pending jobs of the query's state and name after its cursor, and the listing
        order, (available_at, id). Reserved jobs are read through their own small partial
        index (ix_jobs_lease_expiry) and sorted after: walking the listing order instead
        reads past every unreserved job first (330 ms at 1,000,000 jobs on SQLite)."""
        source: Any = jobs
        if query.state == "reserved":
            held = select(jobs).where(jobs.c.reserved_at.is_not(None))
            if query.name is not None:
                held = held.where(jobs.c.name == query.name)
            source = held.cte("held").prefix_with("MATERIALIZED")
        stmt = select(source)
        if query.state == "available":
            stmt = stmt.where(jobs.c.reserved_at.is_(None), jobs.c.available_at <= now)
        elif query.state == "scheduled":
            stmt = stmt.where(jobs.c.reserved_at.is_(None), jobs.c.available_at > now)
        if query.name is not None and query.state != "reserved":
            stmt = stmt.where(jobs.c.name == query.name)
        order = (source.c.available_at, source.c.id)
        if query.after is not None:
            stmt = stmt.where(tuple_(*order) > query.after)
        return stmt, order

    async def list_succeeded(self, query: HistoryQuery) -> list[SucceededJob]:
        rows = await self._history(succeeded, succeeded.c.succeeded_at, query)
        columns = SUCCEEDED_COLUMNS.split(", ")
        return [SucceededJob(*[row[c] for c in columns]) for row in rows]

    async def list_failed(self, query: HistoryQuery) -> list[FailedJob]:
        rows = await self._history(failed, failed.c.failed_at, query)
        columns = FAILED_COLUMNS.split(", ")
        return [FailedJob(*[row[c] for c in columns]) for row in rows]

    async def _history(
        self, table: Any, finished: Any, query: HistoryQuery
    ) -> Sequence[RowMapping]:
        """Newest first with a (finished_at, id) keyset: rows arriving later sort before the
        cursor, so a walk returns every older row exactly once."""
        stmt = self._history_select(table, finished, query, table)
        page = self._page_of(stmt, (finished, table.c.id), True, query)
        async with self._read() as conn:
            rows: Sequence[RowMapping] = (await conn.execute(page)).mappings().all()
        return rows

    @staticmethod
    def _history_select(
        table: Any, finished: Any, query: HistoryQuery, *columns: Any
    ) -> Select[Any]:
        stmt = select(*columns)
        if query.name is not None:
            stmt = stmt.where(table.c.name == query.name)
        if query.before is not None:
            stmt = stmt.where(tuple_(finished, table.c.id) < query.before)
        return stmt

    def _page_of(
        self, stmt: Select[Any], order: tuple[Any, Any], newest_first: bool, query: Any
    ) -> Select[Any]:
        """One page along `order`; with `q`, only the next `scan` rows are read and the
        ones whose payload (or exception) holds `q` kept: a bounded scan at any backlog."""
        if query.q is None:
            return stmt.order_by(*_ordered(order, newest_first)).limit(query.limit)
        window = stmt.order_by(*_ordered(order, newest_first)).limit(query.scan).subquery()
        fields = [c for c in ("payload", "exception") if c in window.c]
        match = or_(*(self._contains(window.c[f], query.q) for f in fields))
        keys = (window.c[order[0].name], window.c[order[1].name])
        return (
            select(window).where(match).order_by(*_ordered(keys, newest_first)).limit(query.limit)
        )

    def _contains(self, column: Any, text: str) -> Any:
        """Case-sensitive substring on both backends (LIKE differs between them)."""
        position = func.strpos if self.engine.dialect.name == "postgresql" else func.instr
        return position(column, text) > 0

    async def search_end(
        self, kind: Literal["pending", "succeeded", "failed"], query: Any, now: datetime
    ) -> tuple[datetime, str] | None:
        """The key of the last row a search's scan read, when it read a full `scan`: where
        the next page's scan starts. None when the scan reached the end."""
        if kind == "pending":
            rows, order = self._pending(query, now)
            stmt = rows.with_only_columns(*order)
        else:
            table = succeeded if kind == "succeeded" else failed
            order = (table.c[f"{kind}_at"], table.c.id)
            stmt = self._history_select(table, order[0], query, *order)
        last = stmt.order_by(*_ordered(order, kind != "pending")).offset(query.scan - 1).limit(1)
        async with self._read() as conn:
            row = (await conn.execute(last)).first()
        return None if row is None else (row[0], row[1])

    async def failure_groups(self, name: str | None, scan: int) -> tuple[list[FailureGroup], int]:
        """A bounded read: the newest `scan` rows along the failed_at index, the first line
        cut in SQL so whole tracebacks never leave the database."""
        stmt = (
            select(failed.c.name, self._first_line(failed.c.exception), failed.c.failed_at)
            .order_by(failed.c.failed_at.desc(), failed.c.id.desc())
            .limit(scan)
        )
        if name is not None:
            stmt = stmt.where(failed.c.name == name)
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        groups: dict[str, tuple[Counter[str], datetime]] = {}
        for job_name, line, failed_at in rows:
            names, _ = groups.setdefault(line, (Counter(), failed_at))  # newest first
            names[job_name] += 1
        ordered = sorted(groups.items(), key=lambda g: (-g[1][0].total(), g[0]))
        return [
            FailureGroup(line, names.total(), dict(names.most_common()), last)
            for line, (names, last) in ordered
        ], len(rows)

    def _first_line(self, column: Any) -> Any:
        if self.engine.dialect.name == "postgresql":
            return func.split_part(column, "\n", 1)
        cut = func.instr(column, "\n")
        return case((cut == 0, column), else_=func.substr(column, 1, cut - 1))

    async def walk(self, query: WalkQuery) -> list[tuple[datetime, str]]:
        """Along each table's (time, id) index; `t0` bounds it, so rows that arrive during
        a bulk action are never reached."""
        if query.state in ("succeeded", "failed"):
            table = succeeded if query.state == "succeeded" else failed
            moment = table.c[f"{query.state}_at"]
            stmt = select(moment, table.c.id).where(moment <= query.t0)
        else:
            table, moment = jobs, jobs.c.available_at
            stmt = select(moment, jobs.c.id).where(
                jobs.c.reserved_at.is_(None),
                jobs.c.created_at <= query.t0,
                moment <= query.t0 if query.state == "available" else moment > query.t0,
            )
        if query.name is not None:
            stmt = stmt.where(table.c.name == query.name)
        if query.after is not None:
            stmt = stmt.where(tuple_(moment, table.c.id) > query.after)
        stmt = stmt.order_by(moment, table.c.id).limit(query.limit)
        async with self._read() as conn:
            return [(row[0], row[1]) for row in (await conn.execute(stmt)).all()]

    # -- counts (for /metrics and /stats) -------------------------------------------------

    async def job_counts(self, now: datetime, name: str | None = None) -> list[NameCounts]:
        """The kept counts summed over shards; per name, its scheduled jobs (see
        `_scheduled`) and its oldest ready job, found at the start of the ready index:
        cheap with any number of available or scheduled jobs."""
        kept = select(
            counts.c.name,
            *(func.sum(counts.c[c]).label(c) for c in KEPT_COUNTS),
        ).group_by(counts.c.name)
        if name is not None:
            kept = kept.where(counts.c.name == name)
        sums = kept.subquery()
        unreserved = (jobs.c.name == sums.c.name, jobs.c.reserved_at.is_(None))
        oldest = select(func.min(jobs.c.available_at)).where(*unreserved).scalar_subquery()
        query = select(
            sums, _scheduled(sums.c.name, now).label("scheduled"), oldest.label("oldest")
        ).order_by(sums.c.name)
        async with self._read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_name_counts(row, now) for row in rows]

    async def finished_by_name(self, since: datetime, name: str | None = None) -> list[Finished]:
        return await self._finished(finished.c.name, since, name)

    async def finished_by_minute(self, since: datetime, name: str | None = None) -> list[Finished]:
        return await self._finished(finished.c.minute, since, name)

    async def _finished(self, key: Any, since: datetime, name: str | None) -> list[Finished]:
        query = (
            select(key, func.sum(finished.c.succeeded), func.sum(finished.c.failed))
            .where(finished.c.minute >= since)
            .group_by(key)
            .order_by(key)
        )
        if name is not None:
            query = query.where(finished.c.name == name)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [Finished(row[0], int(row[1]), int(row[2])) for row in rows]


def _name_counts(row: RowMapping, now: datetime) -> NameCounts:
    oldest: datetime | None = row["oldest"]
    pending, scheduled = int(row["pending"]), int(row["scheduled"])
    return NameCounts(
        row["name"],
        available=pending - scheduled,
        scheduled=scheduled,
        reserved=int(row["reserved"]),
        succeeded=int(row["succeeded"]),
        failed=int(row["failed"]),
        oldest_available_at=oldest if oldest is not None and oldest <= now else None,
    )


def _ordered(order: tuple[Any, Any], newest_first: bool) -> tuple[Any, Any]:
    return (order[0].desc(), order[1].desc()) if newest_first else order


def _scheduled(name: Any, now: datetime) -> Any:
    """Jobs of `name` due after `now`: along the ready index up to a bound a few minutes
    past the later of `now` and the system clock, and from `due_counts` after it. The
    rows from the bound on were all written while their minute lay ahead, so they are
    whole; the range before it holds at most a few minutes of due jobs."""
    bound = max(epoch_minute(now), epoch_minute(datetime.now(UTC))) + CLOCK_SKEW_MINUTES
    bound_at = datetime.fromtimestamp(bound * 60, UTC)
    near = (
        select(func.count())
        .select_from(jobs)
        .where(
            jobs.c.name == name,
            jobs.c.reserved_at.is_(None),
            jobs.c.available_at > now,
            jobs.c.available_at < bound_at,
        )
        .scalar_subquery()
    )
    later = (
        select(func.coalesce(func.sum(due.c.jobs), 0))
        .where(due.c.name == name, due.c.minute >= bound)
        .scalar_subquery()
    )
    return near + later


def prune_bound(kind: str, before: datetime) -> Any:
    """`before` as the pruned table's time column holds it."""
    return epoch_minute(before) if kind == "due_counts" else before


async def _first(conn: AsyncConnection, stmt: Select[Any]) -> RowMapping | None:
    row: RowMapping | None = (await conn.execute(stmt)).mappings().first()
    return row
