"""The domain types of bg_jobs (Job, SucceededJob, FailedJob) plus the lease that fences workers."""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

PendingState = Literal["available", "scheduled", "reserved"]

# The records built once per job on the hot path (Job, SucceededJob, FailedJob, NewJob,
# Lease) are plain slotted dataclasses: treat them as values and never change one. A
# frozen dataclass sets each field through object.__setattr__, and building them that way
# was a sixth of a batch enqueue's CPU (py-spy).

# Given a failed attempt's `attempts` and `max_retries`, when to run again (None: give up).
RetryDecision = Callable[[int, int], datetime | None]


def pending_state(
    available_at: datetime, reserved_at: datetime | None, now: datetime
) -> PendingState:
    """`scheduled` and `available` are one row; which one is a matter of the clock."""
    if reserved_at is not None:
        return "reserved"
    return "scheduled" if available_at > now else "available"


@dataclass(slots=True)
class Job:
    """A pending job: available, scheduled for later, or reserved by a worker's lease."""

    id: str
    name: str
    payload: str
    attempts: int
    max_retries: int
    created_at: datetime
    available_at: datetime
    reserved_at: datetime | None
    reserved_by: str | None
    state: PendingState
    lease_expires_at: datetime | None = None  # while reserved: when the lease runs out
    priority: int = 0  # 0-9, lower runs first
    # A job a schedule made: the schedule, the occurrence it stands for, and whether it
    # was the one missed occurrence enqueued late (a catch-up). None for other jobs.
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    catch_up: bool | None = None


@dataclass(slots=True)
class SucceededJob:
    id: str
    name: str
    payload: str
    attempts: int
    created_at: datetime
    available_at: datetime
    succeeded_at: datetime
    priority: int = 0
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    catch_up: bool | None = None
    state: Literal["succeeded"] = "succeeded"
    # When the lease that acked it began: for metrics, not part of the job's value.
    leased_at: datetime | None = field(default=None, compare=False)


@dataclass(slots=True)
class FailedJob:
    id: str
    name: str
    payload: str
    attempts: int
    exception: str
    created_at: datetime
    available_at: datetime
    failed_at: datetime
    priority: int = 0
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    catch_up: bool | None = None
    state: Literal["failed"] = "failed"


AnyJob = Job | SucceededJob | FailedJob


@dataclass(slots=True)
class NewJob:
    """A validated enqueue request with its id and times already decided."""

    id: str
    name: str
    payload: str
    max_retries: int
    created_at: datetime
    available_at: datetime
    priority: int = 0
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    catch_up: bool | None = None


@dataclass(slots=True)
class Lease:
    """A worker's time-limited claim on a reserved job; its id fences every later change."""

    id: str
    expires_at: datetime
    job: Job


@dataclass(slots=True, frozen=True)
class ExpiredLease:
    """A reserved job whose lease ran out: the reaper fails it on behalf of the lost worker."""

    job_id: str
    lease_id: str
    name: str
    reserved_by: str | None
    expires_at: datetime


@dataclass(slots=True, frozen=True)
class Retrying:
    """A failed attempt with retries left: the job is pending again."""

    job: Job
    leased_at: datetime | None = field(default=None, compare=False)  # for metrics


@dataclass(slots=True, frozen=True)
class Buried:
    """A failed attempt with no retries left: the job moved to the failed jobs."""

    job: FailedJob
    leased_at: datetime | None = field(default=None, compare=False)


FailOutcome = Retrying | Buried


def parse_lease_id(lease_id: str) -> tuple[str, int] | None:
    """The (job id, lease number) inside a lease id, or None if the server cannot have issued it.

    Lease ids are `{job id}.{n}`, n counting the job's leases, so a stale lease can be told
    from one that was never issued.
    """
    job_id, dot, seq = lease_id.rpartition(".")
    if (
        not dot
        or not job_id
        or not (seq.isascii() and seq.isdigit())
        or len(seq) > 18
        or seq.startswith("0")
    ):
        return None
    return job_id, int(seq)


@dataclass(slots=True, frozen=True)
class IdempotencyKey:
    """A producer's key for one enqueue, the fingerprint of its request, and the oldest
    moment a stored use of the key still counts (older ones have expired)."""

    key: str
    fingerprint: str
    not_before: datetime


@dataclass(slots=True, frozen=True)
class Enqueued:
    """What an enqueue under an idempotency key did: created the job, or found the key's
    earlier use (`job` None if that job has been deleted since)."""

    job: AnyJob | None
    created: bool
    same_request: bool = True


@dataclass(slots=True, frozen=True)
class EnqueuedBatch:
    """What a batch enqueue under an idempotency key did: created the jobs, or found the
    key's earlier use (`ids` in request order; each job in its current state, None where
    deleted since)."""

    ids: list[str]
    jobs: list[AnyJob | None]
    created: bool
    same_request: bool = True


def could_exist(some_id: str) -> bool:
    """Ids never hold NUL, and PostgreSQL cannot even compare such a string: don't ask it."""
    return "\x00" not in some_id


@dataclass(slots=True, frozen=True)
class RateLimit:
    """At most `count` leases per `per_ms`, paced: one token every per_ms / count."""

    count: int
    per_ms: int


@dataclass(slots=True, frozen=True)
class QueueSettings:
    """A job name's settings; a name without any runs freely."""

    paused: bool = False
    concurrency_limit: int | None = None
    rate_limit: RateLimit | None = None

    @property
    def limited(self) -> bool:
        return self.concurrency_limit is not None or self.rate_limit is not None


KEEP: Literal["keep"] = "keep"  # a setting a change leaves as it is


@dataclass(slots=True, frozen=True)
class QueueChange:
    """The settings an admin changes: KEEP leaves one as it is, None removes a limit."""

    paused: bool | Literal["keep"] = KEEP
    concurrency_limit: int | Literal["keep"] | None = KEEP
    rate_limit: RateLimit | Literal["keep"] | None = KEEP


@dataclass(slots=True, frozen=True)
class Hold:
    """Why a name's ready jobs cannot be leased now, as the last read saw it: until
    `until` (the next token of its rate limit), or, if None, until a lease of it ends, a
    limit is raised or it is resumed."""

    until: datetime | None
