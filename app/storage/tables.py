"""SQLModel tables: pending jobs, succeeded jobs and failed jobs (bg_jobs' three tables).

A job moves between tables in one transaction. Besides bg_jobs' columns, each row keeps
`lease_seq`, the number of the last lease issued for it, so a lease id can be judged stale
("leased again", "already finished") rather than unknown.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    false,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; stored with time zone where the database has one.

    SQLite has no time zone type: values are stored as naive UTC text of fixed width, which
    sorts correctly, and microseconds are kept on every backend.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _time(nullable: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable))


def _schedule_id() -> Any:
    """The schedule a job came from (None: enqueued by a producer)."""
    return Field(default=None, sa_column=Column(String(255), nullable=True))


def _catch_up() -> Any:
    return Field(default=None, sa_column=Column(Boolean, nullable=True))


def _priority() -> Any:
    """0-9, lower runs first; the default keeps inserts of older releases working."""
    return Field(sa_column=Column(SmallInteger, nullable=False, server_default="0"))


class JobRow(SQLModel, table=True):
    """A pending job; `reserved_at IS NOT NULL` means a worker holds its lease `lease_id`.

    After a lease expires the job is pending again but keeps `lease_id`, so the late worker's
    ack or fail still lands until someone else leases the job.
    """

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int = 0
    max_retries: int = 3
    priority: int = _priority()
    created_at: datetime = _time()
    available_at: datetime = _time()
    reserved_at: datetime | None = _time(nullable=True)
    reserved_by: str | None = Field(default=None, max_length=255)
    lease_id: str | None = Field(default=None, max_length=96)
    lease_seq: int = 0
    lease_expires_at: datetime | None = _time(nullable=True)
    # Jobs made by a schedule: which one, the occurrence, and whether it was a catch-up.
    schedule_id: str | None = _schedule_id()
    scheduled_for: datetime | None = _time(nullable=True)
    catch_up: bool | None = _catch_up()

    __table_args__ = (
        # Reserve: per name, lowest priority then oldest available first; only unreserved
        # rows are in it, so in-flight jobs never slow the scan and its cost does not grow
        # with the backlog.
        Index(
            "ix_jobs_ready_priority",
            "name",
            "priority",
            "available_at",
            "id",
            sqlite_where=text("reserved_at IS NULL"),
            postgresql_where=text("reserved_at IS NULL"),
        ),
        # By due time, whatever the priority: the next due job of a name (the notifier),
        # its oldest available job and its scheduled count (/stats).
        Index(
            "ix_jobs_ready",
            "name",
            "available_at",
            "id",
            sqlite_where=text("reserved_at IS NULL"),
            postgresql_where=text("reserved_at IS NULL"),
        ),
        # Reaper: only reserved rows, by expiry.
        Index(
            "ix_jobs_lease_expiry",
            "lease_expires_at",
            sqlite_where=text("reserved_at IS NOT NULL"),
            postgresql_where=text("reserved_at IS NOT NULL"),
        ),
        # Listing pending jobs in (available_at, id) order with a keyset cursor.
        Index("ix_jobs_available_at", "available_at", "id"),
    )


class SucceededJobRow(SQLModel, table=True):
    __tablename__ = "succeeded_jobs"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int
    lease_seq: int = 0
    priority: int = _priority()
    created_at: datetime = _time()
    available_at: datetime = _time()
    succeeded_at: datetime = _time()
    schedule_id: str | None = _schedule_id()
    scheduled_for: datetime | None = _time(nullable=True)
    catch_up: bool | None = _catch_up()

    __table_args__ = (
        Index("ix_succeeded_jobs_succeeded_at", "succeeded_at", "id"),
        Index("ix_succeeded_jobs_name_succeeded_at", "name", "succeeded_at", "id"),
    )


class FailedJobRow(SQLModel, table=True):
    __tablename__ = "failed_jobs"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int
    max_retries: int = 3
    lease_seq: int = 0
    priority: int = _priority()
    exception: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _time()
    available_at: datetime = _time()
    failed_at: datetime = _time()
    schedule_id: str | None = _schedule_id()
    scheduled_for: datetime | None = _time(nullable=True)
    catch_up: bool | None = _catch_up()

    __table_args__ = (
        Index("ix_failed_jobs_failed_at", "failed_at", "id"),
        Index("ix_failed_jobs_name_failed_at", "name", "failed_at", "id"),
    )


class IdempotencyKeyRow(SQLModel, table=True):
    """A producer's Idempotency-Key: which job its first request created, and a fingerprint
    of that request, so a retry returns the same job and a reuse for another body is refused."""

    __tablename__ = "idempotency_keys"

    key: str = Field(primary_key=True, max_length=255)
    fingerprint: str = Field(max_length=64)
    job_id: str = Field(max_length=64)
    created_at: datetime = _time()

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


class BatchIdempotencyKeyRow(SQLModel, table=True):
    """An Idempotency-Key of POST /jobs/batch: its own key space, and the ids of every job
    the batch created (comma-separated, in request order)."""

    __tablename__ = "batch_idempotency_keys"

    key: str = Field(primary_key=True, max_length=255)
    fingerprint: str = Field(max_length=64)
    job_ids: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _time()

    __table_args__ = (Index("ix_batch_idempotency_keys_created_at", "created_at"),)


class FinishedPerMinuteRow(SQLModel, table=True):
    """Jobs that succeeded or finally failed, per job name and minute, counted by the
    writer in the ack or fail's own transaction: /stats reads a few rows instead of
    scanning history. `shard` spreads one (name, minute) over several rows, so replicas
    on PostgreSQL do not queue behind one row lock; readers sum the shards."""

    __tablename__ = "finished_per_minute"

    name: str = Field(primary_key=True, max_length=255)
    minute: datetime = Field(sa_column=Column(UTCDateTime(), primary_key=True))
    shard: int = Field(default=0, primary_key=True)
    succeeded: int = 0
    failed: int = 0

    __table_args__ = (Index("ix_finished_per_minute_minute", "minute"),)


class JobCountRow(SQLModel, table=True):
    """Jobs per name and state (pending = available or scheduled, reserved, succeeded,
    failed), so counting a million-job backlog is a read of a few rows. On PostgreSQL
    database triggers on the three job tables keep it, so every writer (an older replica
    in a rolling upgrade included) keeps it right; on SQLite, the only writer, the
    server's writer does. Sharded like `finished_per_minute`."""

    __tablename__ = "job_counts"

    name: str = Field(primary_key=True, max_length=255)
    shard: int = Field(default=0, primary_key=True)
    pending: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    reserved: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    succeeded: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    failed: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class DueCountRow(SQLModel, table=True):
    """Pending, unreserved jobs per name and the minute they come due (minutes since the
    Unix epoch), counted only while that minute is still ahead of the writer's clock.

    How many jobs of a name are scheduled is then a sum of these rows for the minutes from
    two after now on, plus a range scan of the ready index over the two minutes before
    them: a read of a few rows, however many jobs are scheduled. A row of a minute gone by
    is never read again, so moves out of it are not counted and it is pruned. Kept like
    `job_counts`, and sharded like it."""

    __tablename__ = "due_counts"

    name: str = Field(primary_key=True, max_length=255)
    minute: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    shard: int = Field(default=0, primary_key=True)
    jobs: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))

    __table_args__ = (Index("ix_due_counts_minute", "minute"),)


class QueueRow(SQLModel, table=True):
    """A job name's settings, where any were made (a name without a row runs freely):
    whether it is paused, its concurrency limit, and its rate limit as a token bucket
    (`rate_count` tokens per `rate_per_ms`; `tokens` were left at `tokens_at`)."""

    __tablename__ = "queues"

    name: str = Field(primary_key=True, max_length=255)
    paused: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    updated_at: datetime = _time()
    concurrency_limit: int | None = Field(default=None, sa_column=Column(Integer))
    rate_count: int | None = Field(default=None, sa_column=Column(Integer))
    rate_per_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    tokens: float | None = Field(default=None, sa_column=Column(Float))
    tokens_at: datetime | None = _time(nullable=True)


class ScheduleRow(SQLModel, table=True):
    """A recurring schedule: every `interval_ms` from `anchor_at` (fixed rate), or at the
    times of a 5-field `cron` expression in `timezone`. `next_run_at` is the first
    occurrence not handled yet; the scheduler of any replica fires it when it comes due."""

    __tablename__ = "schedules"

    id: str = Field(primary_key=True, max_length=255)
    name: str = Field(max_length=255)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    max_retries: int = 3
    priority: int = _priority()
    interval_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    cron: str | None = Field(default=None, max_length=255)
    timezone: str | None = Field(default=None, max_length=255)
    paused: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    skip_if_running: bool = Field(
        default=True, sa_column=Column(Boolean, nullable=False, server_default=true())
    )
    anchor_at: datetime = _time()
    next_run_at: datetime | None = _time(nullable=True)
    last_run_at: datetime | None = _time(nullable=True)
    last_job_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = _time()
    updated_at: datetime = _time()

    __table_args__ = (Index("ix_schedules_next_run_at", "next_run_at"),)


class ScheduleRunRow(SQLModel, table=True):
    """One occurrence of a schedule that was handled: the unique key makes each occurrence
    enqueue at most once, across replicas and restarts. `job_id` is None for an
    occurrence skipped because the schedule's previous job was still pending."""

    __tablename__ = "schedule_runs"

    schedule_id: str = Field(primary_key=True, max_length=255)
    scheduled_for: datetime = Field(sa_column=Column(UTCDateTime(), primary_key=True))
    job_id: str | None = Field(default=None, max_length=64)
    catch_up: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    created_at: datetime = _time()

    __table_args__ = (Index("ix_schedule_runs_scheduled_for", "scheduled_for"),)
