"""The port the queue needs from storage: operations named after what they do.

The queue package owns this protocol and the types it speaks; each backend in
`app/storage` implements all of it with the same behaviour (one contract suite checks
that). Operations that change a reserved job take the lease id and change the row only
while the job still holds that lease; they return None (or False) when it does not, and
the service explains why. Batch forms return one result per item, in request order.
"""

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from app.queue.models import (
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
    PendingState,
    QueueChange,
    QueueSettings,
    RetryDecision,
    SucceededJob,
)
from app.queue.schedules import Firing, Schedule

CancelResult = Literal["deleted", "reserved", "missing"]
# Where a delete may find its job: anywhere (a single DELETE /jobs/{id}), or only in one
# place (a bulk delete by state must not delete a job that has moved on since).
DeleteScope = Literal["any", "pending", "succeeded", "failed"]
BulkState = Literal["available", "scheduled", "succeeded", "failed"]
PruneKind = Literal[
    "succeeded",
    "failed",
    "idempotency_keys",
    "batch_keys",
    "finished_counts",
    "due_counts",
    "schedule_runs",
]
# What firing one occurrence of a schedule did: enqueued this job; skipped it (the
# previous job still pending, recorded with no job); found it handled already (another
# replica, or an earlier run of this one); or found the schedule changed since it was read.
FireResult = Job | Literal["skipped", "duplicate", "stale"]


@dataclass(slots=True, frozen=True)
class LeasePosition:
    """Where a job is now and which lease it last had: enough to explain a fenced-off request."""

    table: Literal["pending", "succeeded", "failed"]
    lease_seq: int
    lease_id: str | None = None
    reserved: bool = False


@dataclass(slots=True, frozen=True)
class PendingQuery:
    state: PendingState | None
    name: str | None
    limit: int
    after: tuple[datetime, str] | None  # keyset: (available_at, id) of the last row seen
    q: str | None = None  # only jobs whose payload holds this, among the next `scan` rows
    scan: int = 10_000


@dataclass(slots=True, frozen=True)
class FailureGroup:
    """Failed jobs that share the first line of their exception."""

    first_line: str
    count: int
    names: dict[str, int]  # how many of them per job name
    last_failed_at: datetime


@dataclass(slots=True, frozen=True)
class WalkQuery:
    """A bulk action's walk over the jobs that were in `state` at `t0`, oldest first."""

    state: BulkState
    name: str | None
    t0: datetime
    limit: int
    after: tuple[datetime, str] | None  # keyset: (time, id) of the last row seen


@dataclass(slots=True, frozen=True)
class HistoryQuery:
    name: str | None
    limit: int
    before: tuple[datetime, str] | None  # keyset: (finished_at, id) of the last row seen
    q: str | None = None  # only jobs whose payload or exception holds this, in `scan` rows
    scan: int = 10_000


@dataclass(slots=True, frozen=True)
class NameCounts:
    """Jobs of one name by state now, and when its oldest available job became available."""

    name: str
    available: int
    scheduled: int
    reserved: int
    succeeded: int
    failed: int
    oldest_available_at: datetime | None


@dataclass(slots=True, frozen=True)
class Finished:
    """Jobs that succeeded or finally failed in a span (per name, or per minute)."""

    key: str | datetime  # the job name, or the minute
    succeeded: int
    failed: int


@dataclass(slots=True, frozen=True)
class FailItem:
    """One fail of a batch: the lease, what went wrong, and when to run again."""

    job_id: str
    lease_id: str
    exception: str
    decide: RetryDecision


class Storage(Protocol):
    @property
    def writes(self) -> Counter[str]:
        """Writes committed so far, by kind: every write goes through one writer, so this
        is what each kind of request cost the database (tests watch idle polls with it)."""

    async def migrate(self) -> None:
        """Bring the schema up to date (Alembic), safely even with replicas starting at once."""

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at; None for an empty database."""

    async def close(self) -> None: ...

    shared: bool  # several server processes may use this database at once

    async def listen(
        self,
        on_ready: Callable[[str, datetime], None],
        on_gap: Callable[[], None],
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """Call `on_ready(name, available_at)` when another process makes a job ready,
        `on_event(message)` for each message `broadcast` by any process, and `on_gap()`
        when either may have been missed (so every waiter should look)."""

    async def broadcast(self, payloads: list[str]) -> None:
        """Deliver each message to `on_event` in every process listening on this database,
        in order (the event relay's link between replicas)."""

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers."""

    async def enqueue(self, job: NewJob, now: datetime) -> Job: ...

    async def enqueue_leased(
        self, job: NewJob, now: datetime, worker_id: str, expires_at: datetime
    ) -> Lease | None:
        """Enqueue `job` (due now) already reserved for `worker_id`: a hand-off to a poll
        that is waiting for it, in one write instead of an enqueue and then a reserve.
        None if its name is paused or has a limit: then it is only enqueued."""

    async def configure_queue(self, name: str, change: QueueChange, now: datetime) -> None:
        """Change `name`'s settings, for every replica from the commit on; a resume or a
        loosened limit wakes the waiting polls of other replicas too."""

    async def queue_settings(self, name: str | None = None) -> dict[str, QueueSettings]:
        """Names with settings of their own (or just `name`), and those settings."""

    async def queue_holds(self, names: Sequence[str], now: datetime) -> dict[str, Hold]:
        """Of `names`, those paused or at a limit now, and until when (a read, a hint
        for waking polls: the reserve statement itself enforces every rule)."""

    async def enqueue_once(self, job: NewJob, now: datetime, key: IdempotencyKey) -> Enqueued:
        """Enqueue unless `key` was used since `key.not_before`; then report that use."""

    async def enqueue_many(self, jobs: Sequence[NewJob], now: datetime) -> list[Job]:
        """All of them in one transaction, or none."""

    async def enqueue_many_once(
        self, jobs: Sequence[NewJob], now: datetime, key: IdempotencyKey
    ) -> EnqueuedBatch:
        """`enqueue_many` unless the batch key was used since `key.not_before`."""

    async def reserve(
        self,
        names: Sequence[str],
        worker_id: str,
        max_jobs: int,
        now: datetime,
        expires_at: datetime,
        max_bytes: int | None = None,
    ) -> list[Lease]:
        """Atomically lease up to `max_jobs` available jobs, oldest `available_at` first;
        with `max_bytes`, stop before the payloads add up past it (but lease at least one)."""

    async def earliest(self, name: str) -> datetime | None:
        """The earliest `available_at` of an unreserved job of `name` (ready or not): a read."""

    async def ack(self, job_id: str, lease_id: str, now: datetime) -> SucceededJob | None:
        """Move the job to the succeeded jobs if `lease_id` is still its lease."""

    async def ack_many(
        self, items: Sequence[tuple[str, str]], now: datetime
    ) -> list[SucceededJob | None]:
        """`ack` for each (job id, lease id), in one transaction."""

    async def fail(
        self,
        job_id: str,
        lease_id: str,
        now: datetime,
        exception: str,
        decide: RetryDecision,
        expired_before: datetime | None = None,
    ) -> FailOutcome | None:
        """Retry at `decide(...)` or move to the failed jobs; with `expired_before`, only a
        reserved job whose lease expired by then (so a racing extend wins over the reaper)."""

    async def fail_many(self, items: Sequence[FailItem], now: datetime) -> list[FailOutcome | None]:
        """`fail` for each item, in one transaction."""

    async def extend(self, job_id: str, lease_id: str, expires_at: datetime) -> bool:
        """Push back the expiry of a live lease."""

    async def extend_many(
        self, items: Sequence[tuple[str, str]], expires_at: datetime
    ) -> list[bool]: ...

    async def release(self, job_id: str, lease_id: str, now: datetime) -> Job | None:
        """Give a reserved job back untouched: available again, this attempt not counted."""

    async def expired_leases(self, now: datetime, limit: int) -> list[ExpiredLease]: ...

    async def lease_position(self, job_id: str) -> LeasePosition | None: ...

    async def get(self, job_id: str, now: datetime) -> AnyJob | None: ...

    async def names_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The job name of each id that exists, pending or finished (a job never changes
        its name): read before a delete, which leaves no row to tell it."""

    async def cancel(self, job_id: str) -> CancelResult:
        """Delete a pending unreserved job, or a succeeded or failed job's record."""

    async def retry_failed(self, job_id: str, now: datetime) -> Job | None:
        """Move a failed job back to pending, available now, with attempts 0."""

    async def retry_failed_many(self, job_ids: Sequence[str], now: datetime) -> list[Job | None]:
        """`retry_failed` for each, in one transaction."""

    async def delete_many(self, items: Sequence[tuple[str, DeleteScope]]) -> list[CancelResult]:
        """Delete each job where its scope allows (a reserved job never), in one transaction."""

    async def search_end(
        self,
        kind: Literal["pending", "succeeded", "failed"],
        query: PendingQuery | HistoryQuery,
        now: datetime,
    ) -> tuple[datetime, str] | None:
        """Where a search that read a full `scan` of rows stopped: the next page's start."""

    async def failure_groups(self, name: str | None, scan: int) -> tuple[list[FailureGroup], int]:
        """The newest `scan` failed jobs grouped by their exception's first line, most
        frequent first, and how many rows were read."""

    async def walk(self, query: WalkQuery) -> list[tuple[datetime, str]]:
        """(time, id) of the next jobs that were in `query.state` at `query.t0`: failed or
        succeeded by then, or pending, unreserved and created by then, in (time, id) order."""

    async def list_pending(self, query: PendingQuery, now: datetime) -> list[Job]: ...

    async def list_succeeded(self, query: HistoryQuery) -> list[SucceededJob]: ...

    async def list_failed(self, query: HistoryQuery) -> list[FailedJob]: ...

    async def job_counts(self, now: datetime, name: str | None = None) -> list[NameCounts]:
        """Jobs per name and state, from counts the database keeps as jobs move: a read of
        a few rows per name, whatever the backlog (scheduled jobs are counted by range)."""

    async def finished_by_name(self, since: datetime, name: str | None = None) -> list[Finished]:
        """Per name, jobs finished in the minutes from `since` on (minute buckets)."""

    async def finished_by_minute(self, since: datetime, name: str | None = None) -> list[Finished]:
        """Per minute from `since` on, jobs finished (of every name, or of `name`)."""

    async def prune(self, kind: PruneKind, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the oldest rows of `kind` older than `before`."""

    # -- schedules ------------------------------------------------------------------------

    async def put_schedule(self, schedule: Schedule, retimed: bool) -> None:
        """Create or replace the schedule `schedule.id`. Unless `retimed`, an existing
        schedule keeps its `next_run_at` (the scheduler may have moved it since it was
        read); its `last_run_at`, `last_job_id` and `created_at` are always kept."""

    async def delete_schedule(self, schedule_id: str) -> bool:
        """False if there was no such schedule."""

    async def schedules(self, schedule_id: str | None = None) -> list[Schedule]:
        """Every schedule by id (or the one asked for): a read."""

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        """Unpaused schedules whose `next_run_at` has come, earliest first: a read."""

    async def fire_schedule(self, firing: Firing, job: NewJob) -> FireResult:
        """In one transaction: move the schedule's `next_run_at` on (only if it is still
        `firing.expected_next`), insert the run record (schedule id, occurrence) unless it
        exists, and only if it was inserted enqueue `job` and record it as the schedule's
        last job. While the previous job is pending and `skip_if_running` holds, record
        the run with no job instead."""
