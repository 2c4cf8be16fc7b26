"""Typed results: the API's JSON as dataclasses with attribute access and datetimes."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

State = Literal["available", "scheduled", "reserved", "succeeded", "failed", "deleted"]


def timestamp(value: str | None) -> datetime | None:
    """The server's `...Z` timestamps as aware datetimes."""
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Job:
    """A job in any state; the fields a state lacks are None (e.g. `exception` unless
    failed, `max_retries` once finished)."""

    id: str
    name: str
    state: State
    payload: str = ""
    attempts: int = 0
    max_retries: int | None = None
    created_at: datetime | None = None
    available_at: datetime | None = None
    reserved_at: datetime | None = None
    reserved_by: str | None = None
    lease_expires_at: datetime | None = None
    priority: int = 0
    succeeded_at: datetime | None = None
    failed_at: datetime | None = None
    exception: str | None = None
    # A job a schedule enqueued: the schedule, the occurrence, and whether it was the one
    # missed occurrence enqueued late. None for other jobs (and from older servers).
    schedule_id: str | None = None
    scheduled_for: datetime | None = None
    catch_up: bool | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        return cls(
            id=data["id"],
            name=data.get("name", ""),
            state=data["state"],
            payload=data.get("payload", ""),
            attempts=data.get("attempts", 0),
            max_retries=data.get("max_retries"),
            created_at=timestamp(data.get("created_at")),
            available_at=timestamp(data.get("available_at")),
            reserved_at=timestamp(data.get("reserved_at")),
            reserved_by=data.get("reserved_by"),
            lease_expires_at=timestamp(data.get("lease_expires_at")),
            priority=data.get("priority", 0),
            succeeded_at=timestamp(data.get("succeeded_at")),
            failed_at=timestamp(data.get("failed_at")),
            exception=data.get("exception"),
            schedule_id=data.get("schedule_id"),
            scheduled_for=timestamp(data.get("scheduled_for")),
            catch_up=data.get("catch_up"),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A reserved job: ack, fail, extend or release it by `id` before `expires_at`."""

    id: str
    expires_at: datetime
    job: Job

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Lease":
        expires = timestamp(data["expires_at"])
        assert expires is not None
        return cls(data["id"], expires, Job.from_json(data["job"]))


@dataclass(frozen=True, slots=True)
class FailOutcome:
    """What a fail did: `retrying` (the job is pending again) or `failed` (for good)."""

    outcome: Literal["retrying", "failed"]
    job: Job


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item of a batch ack, fail or extend: `ok`, or refused with `status` and `code`
    (`not_found`, `finished_by_this_lease`, `finished_by_another_lease`, ...)."""

    id: str
    status: int
    code: str | None = None
    detail: str | None = None
    job: Job | None = None
    outcome: Literal["retrying", "failed"] | None = None
    expires_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def done(self) -> bool:
        """The lease's work is recorded: this call did it, or an earlier try of it did."""
        return self.ok or self.code == "finished_by_this_lease"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ItemResult":
        job = data.get("job")
        return cls(
            id=data["id"],
            status=data["status"],
            code=data.get("code"),
            detail=data.get("detail"),
            job=Job.from_json(job) if job else None,
            outcome=data.get("outcome"),
            expires_at=timestamp(data.get("expires_at")),
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a job list; pass `next_cursor` back for the next (None at the end)."""

    items: list[Job]
    next_cursor: str | None
