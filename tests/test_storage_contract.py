"""The storage contract: every Storage operation, called directly, behaves alike on every backend.

Each test runs once per backend (`db_url` is parametrized over SQLite and PostgreSQL) on a
fresh, migrated database. Time is never read from a clock: every call gets an explicit,
timezone-aware `now` built from the fixed instant T0, often with odd microseconds so that a
backend rounding or dropping them would show.
"""

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.queue.errors import StorageUnavailable
from app.queue.models import (
    AnyJob,
    Buried,
    Enqueued,
    EnqueuedBatch,
    FailedJob,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    PendingState,
    RetryDecision,
    Retrying,
    SucceededJob,
    pending_state,
)
from app.queue.ports import FailItem, HistoryQuery, LeasePosition, PendingQuery, Storage
from app.queue.schedules import Firing, Schedule
from app.storage import open_storage
from app.storage.migrate import head_revision

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)

_serial = itertools.count(1)


def at(seconds: float = 0, micros: int = 0) -> datetime:
    """T0 plus an offset: `at(5, 123)` is five seconds and 123 microseconds after T0."""
    return T0 + timedelta(seconds=seconds, microseconds=micros)


def new_job(
    name: str = "email",
    *,
    job_id: str | None = None,
    payload: str = '{"to": "a@example.com"}',
    max_retries: int = 3,
    created_at: datetime = T0,
    available_at: datetime = T0,
) -> NewJob:
    job_id = job_id or f"job-{next(_serial):06d}"
    return NewJob(job_id, name, payload, max_retries, created_at, available_at)


def assert_utc(*moments: datetime | None) -> None:
    for moment in moments:
        assert moment is not None
        assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0), moment


def retry_at(when: datetime, calls: list[tuple[int, int]] | None = None) -> RetryDecision:
    """A retry decision that always retries at `when`, recording what it was asked."""

    def decide(attempts: int, max_retries: int) -> datetime | None:
        if calls is not None:
            calls.append((attempts, max_retries))
        return when

    return decide


def give_up(calls: list[tuple[int, int]] | None = None) -> RetryDecision:
    """A retry decision that never retries, recording what it was asked."""

    def decide(attempts: int, max_retries: int) -> datetime | None:
        if calls is not None:
            calls.append((attempts, max_retries))
        return None

    return decide


def pending(
    *, state: PendingState | None = None, name: str | None = None, limit: int = 100
) -> PendingQuery:
    return PendingQuery(state, name, limit, None)


def history(name: str | None = None, limit: int = 100) -> HistoryQuery:
    return HistoryQuery(name, limit, None)


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    store = open_storage(db_url)
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


async def put(storage: Storage, job: NewJob | None = None, now: datetime = T0) -> Job:
    return await storage.enqueue(job or new_job(), now)


async def reserve(
    storage: Storage,
    names: Sequence[str] = ("email",),
    max_jobs: int = 100,
    now: datetime = T0,
    worker: str = "worker-1",
    lease: timedelta = LEASE,
) -> list[Lease]:
    return await storage.reserve(names, worker, max_jobs, now, now + lease)


async def lease_of(storage: Storage, job_id: str, now: datetime = T0) -> Lease:
    """Reserve the one available job `job_id` (the only one of its name that is available)."""
    job = await storage.get(job_id, now)
    assert isinstance(job, Job)
    leases = await reserve(storage, [job.name], max_jobs=1, now=now)
    assert [lease.job.id for lease in leases] == [job_id]
    return leases[0]


async def succeed(storage: Storage, name: str, finished_at: datetime, job_id: str = "") -> str:
    """A job of `name` enqueued, leased and acked at `finished_at`; its id."""
    job = await put(storage, new_job(name, job_id=job_id or None, available_at=T0))
    lease = await lease_of(storage, job.id, finished_at)
    assert await storage.ack(job.id, lease.id, finished_at) is not None
    return job.id


async def bury(storage: Storage, name: str, finished_at: datetime, job_id: str = "") -> str:
    """A job of `name` enqueued, leased and failed for good at `finished_at`; its id."""
    job = await put(storage, new_job(name, job_id=job_id or None, available_at=T0))
    lease = await lease_of(storage, job.id, finished_at)
    outcome = await storage.fail(job.id, lease.id, finished_at, "boom", give_up())
    assert isinstance(outcome, Buried)
    return job.id


# -- enqueue and get ----------------------------------------------------------------------


async def test_enqueue_returns_the_job_available_now(storage: Storage) -> None:
    spec = new_job(created_at=at(0, 123_456), available_at=at(0, 123_456))
    job = await storage.enqueue(spec, at(0, 123_456))
    assert job == Job(
        id=spec.id,
        name="email",
        payload='{"to": "a@example.com"}',
        attempts=0,
        max_retries=3,
        created_at=at(0, 123_456),
        available_at=at(0, 123_456),
        reserved_at=None,
        reserved_by=None,
        state="available",
    )
    assert await storage.get(spec.id, at(0, 123_456)) == job


async def test_enqueue_returns_a_future_job_scheduled_until_it_comes_due(storage: Storage) -> None:
    spec = new_job(created_at=at(0, 1), available_at=at(10, 999_999))
    job = await storage.enqueue(spec, at(0, 1))
    assert job.state == "scheduled"
    assert await storage.get(spec.id, at(0, 1)) == job
    assert await storage.get(spec.id, at(10, 999_998)) == job
    due = await storage.get(spec.id, at(10, 999_999))
    assert isinstance(due, Job) and due.state == "available"
    assert due.available_at == at(10, 999_999)


async def test_get_returns_none_for_an_unknown_job(storage: Storage) -> None:
    await put(storage)
    assert await storage.get("no-such-job", T0) is None


async def test_every_timestamp_keeps_microseconds_and_comes_back_in_utc(storage: Storage) -> None:
    created, available = at(0, 111_111), at(1, 222_222)
    reserved_at, expires = at(2, 333_333), at(3, 444_444)
    retry_time, acked = at(4, 555_555), at(5, 666_666)
    job = await put(storage, new_job(created_at=created, available_at=available), created)
    assert_utc(job.created_at, job.available_at)

    [lease] = await storage.reserve(["email"], "w", 1, reserved_at, expires)
    assert (lease.job.reserved_at, lease.expires_at) == (reserved_at, expires)
    fetched = await storage.get(job.id, reserved_at)
    assert isinstance(fetched, Job)
    assert (fetched.created_at, fetched.available_at) == (created, available)
    assert fetched.reserved_at == reserved_at
    assert_utc(fetched.created_at, fetched.available_at, fetched.reserved_at, lease.expires_at)
    [expired] = await storage.expired_leases(expires, 10)
    assert expired.expires_at == expires
    assert_utc(expired.expires_at)

    outcome = await storage.fail(job.id, lease.id, expires, "boom", retry_at(retry_time))
    assert isinstance(outcome, Retrying) and outcome.job.available_at == retry_time
    fetched = await storage.get(job.id, expires)
    assert isinstance(fetched, Job) and fetched.available_at == retry_time
    assert_utc(fetched.available_at)
    assert await storage.earliest("email") == retry_time

    done = await storage.ack(job.id, lease.id, acked)
    assert done is not None and done.succeeded_at == acked
    stored = await storage.get(job.id, acked)
    assert isinstance(stored, SucceededJob)
    assert (stored.created_at, stored.available_at, stored.succeeded_at) == (
        created,
        retry_time,
        acked,
    )
    assert_utc(stored.created_at, stored.available_at, stored.succeeded_at)
    [listed] = await storage.list_succeeded(history())
    assert listed == stored


async def test_failed_at_keeps_microseconds_and_comes_back_in_utc(storage: Storage) -> None:
    job_id = await bury(storage, "email", at(7, 777_777))
    failed = await storage.get(job_id, at(8))
    assert isinstance(failed, FailedJob)
    assert failed.failed_at == at(7, 777_777)
    assert_utc(failed.created_at, failed.available_at, failed.failed_at)
    assert await storage.list_failed(history()) == [failed]


async def test_times_given_in_another_zone_are_stored_as_the_same_instant(
    storage: Storage,
) -> None:
    plus5 = timezone(timedelta(hours=5))
    local = at(60, 42).astimezone(plus5)
    spec = new_job(created_at=local, available_at=local)
    await storage.enqueue(spec, local)
    fetched = await storage.get(spec.id, at(60, 42))
    assert isinstance(fetched, Job) and fetched.state == "available"
    assert fetched.available_at == at(60, 42) and fetched.created_at == at(60, 42)
    assert_utc(fetched.available_at, fetched.created_at)
    assert await reserve(storage, now=at(60, 41).astimezone(plus5)) == []
    [lease] = await reserve(storage, now=local)
    assert lease.job.id == spec.id


# -- reserve ------------------------------------------------------------------------------


async def test_reserve_takes_oldest_available_first_and_breaks_ties_by_id(
    storage: Storage,
) -> None:
    await put(storage, new_job(job_id="c", available_at=at(2)))
    await put(storage, new_job(job_id="b", available_at=at(1)))
    await put(storage, new_job(job_id="z", available_at=at(0, 1)))
    await put(storage, new_job(job_id="a", available_at=at(1)))
    await put(storage, new_job(job_id="y", available_at=at(0)))
    leases = await reserve(storage, now=at(5))
    assert [lease.job.id for lease in leases] == ["y", "z", "a", "b", "c"]


async def test_reserve_respects_max_jobs(storage: Storage) -> None:
    ids = [(await put(storage, new_job(available_at=at(i)))).id for i in range(5)]
    taken = []
    for expected in (2, 2, 1, 0):
        batch = await reserve(storage, max_jobs=2, now=at(10))
        assert len(batch) == expected
        taken += [lease.job.id for lease in batch]
    assert taken == ids


async def test_reserve_only_takes_the_given_names(storage: Storage) -> None:
    email = await put(storage, new_job("email"))
    await put(storage, new_job("sms"))
    await put(storage, new_job("email-digest"))
    assert [lease.job.id for lease in await reserve(storage, ["email", "push"])] == [email.id]
    assert await reserve(storage, ["push"]) == []
    remaining = await storage.list_pending(pending(state="available"), T0)
    assert sorted(job.name for job in remaining) == ["email-digest", "sms"]


async def test_reserve_never_takes_a_scheduled_job(storage: Storage) -> None:
    job = await put(storage, new_job(available_at=at(1)))
    assert await reserve(storage, now=at(0, 999_999)) == []
    fetched = await storage.get(job.id, at(0, 999_999))
    assert isinstance(fetched, Job) and fetched.state == "scheduled" and fetched.attempts == 0
    assert [lease.job.id for lease in await reserve(storage, now=at(1))] == [job.id]


async def test_reserve_sets_the_lease_fields(storage: Storage) -> None:
    job = await put(storage, new_job(max_retries=4))
    now, expires = at(3, 250_000), at(33, 250_001)
    [lease] = await storage.reserve(["email"], "worker-7", 1, now, expires)
    assert lease.id == f"{job.id}.1"
    assert lease.expires_at == expires
    assert lease.job == Job(
        id=job.id,
        name="email",
        payload=job.payload,
        attempts=1,
        max_retries=4,
        created_at=job.created_at,
        available_at=job.available_at,
        reserved_at=now,
        reserved_by="worker-7",
        state="reserved",
        lease_expires_at=expires,
    )
    assert await storage.get(job.id, now) == lease.job
    assert await storage.lease_position(job.id) == LeasePosition(
        "pending", 1, f"{job.id}.1", reserved=True
    )


async def test_lease_ids_count_the_leases_of_each_job(storage: Storage) -> None:
    job = await put(storage)
    first = await lease_of(storage, job.id)
    assert first.id == f"{job.id}.1"
    assert await storage.release(job.id, first.id, at(1)) is not None
    second = await lease_of(storage, job.id, at(2))
    assert second.id == f"{job.id}.2" and second.job.attempts == 1
    retried = await storage.fail(job.id, second.id, at(3), "boom", retry_at(at(4)))
    assert isinstance(retried, Retrying)
    third = await lease_of(storage, job.id, at(4))
    assert third.id == f"{job.id}.3" and third.job.attempts == 2
    other = await put(storage, new_job("other"))
    assert (await lease_of(storage, other.id, at(5))).id == f"{other.id}.1"


async def test_a_reserved_job_is_not_reserved_again_even_after_its_lease_expired(
    storage: Storage,
) -> None:
    job = await put(storage)
    [lease] = await reserve(storage, now=at(0))
    assert await reserve(storage, now=at(1)) == []
    assert await reserve(storage, now=lease.expires_at + timedelta(hours=1)) == []
    fetched = await storage.get(job.id, at(1))
    assert isinstance(fetched, Job) and fetched.attempts == 1 and fetched.reserved_by == "worker-1"


async def test_reserve_merges_several_names_in_available_at_order(storage: Storage) -> None:
    for seconds, name in ((1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b"), (6, "a")):
        await put(storage, new_job(name, job_id=f"{name}{seconds}", available_at=at(seconds)))
    leases = await reserve(storage, ["b", "a"], max_jobs=4, now=at(10))
    assert [lease.job.id for lease in leases] == ["a1", "b2", "a3", "b5"]
    leases = await reserve(storage, ["a", "b", "c"], max_jobs=4, now=at(10))
    assert [lease.job.id for lease in leases] == ["c4", "a6"]


async def test_reserve_merges_names_with_ties_broken_by_id(storage: Storage) -> None:
    await put(storage, new_job("b", job_id="job-2", available_at=at(1)))
    await put(storage, new_job("a", job_id="job-3", available_at=at(1)))
    await put(storage, new_job("a", job_id="job-1", available_at=at(1)))
    leases = await reserve(storage, ["a", "b"], max_jobs=2, now=at(1))
    assert [lease.job.id for lease in leases] == ["job-1", "job-2"]


async def test_reserve_with_a_name_given_twice_still_fills_max_jobs(storage: Storage) -> None:
    """`names` is a set of names: repeating one must not make reserve take fewer jobs."""
    for i in range(3):
        await put(storage, new_job(job_id=f"job-{i}", available_at=at(i)))
    leases = await reserve(storage, ["email", "email"], max_jobs=2, now=at(5))
    assert [lease.job.id for lease in leases] == ["job-0", "job-1"]


async def test_concurrent_reserves_never_hand_out_a_job_twice(storage: Storage) -> None:
    names = ("email", "sms")
    ids = set()
    for i in range(100):
        job = await put(storage, new_job(names[i % 2], available_at=at(0, i)))
        ids.add(job.id)
    batches = await asyncio.gather(
        *(storage.reserve(list(names), f"worker-{w}", 7, at(1), at(31)) for w in range(20))
    )
    taken = [lease.job.id for batch in batches for lease in batch]
    assert len(taken) == len(set(taken)), "a job was reserved twice"
    assert set(taken) <= ids
    lease_ids = [lease.id for batch in batches for lease in batch]
    assert lease_ids == [f"{job_id}.1" for job_id in taken]
    for batch in batches:  # each batch is in order
        keys = [(lease.job.available_at, lease.job.id) for lease in batch]
        assert keys == sorted(keys)
    rest = await reserve(storage, names, max_jobs=100, now=at(1))
    assert sorted(taken + [lease.job.id for lease in rest]) == sorted(ids)
    reserved = await storage.list_pending(pending(state="reserved", limit=200), at(1))
    assert len(reserved) == 100 and all(job.attempts == 1 for job in reserved)


# -- earliest -----------------------------------------------------------------------------


async def test_earliest_is_none_without_unreserved_jobs_of_the_name(storage: Storage) -> None:
    assert await storage.earliest("email") is None
    await put(storage, new_job("sms", available_at=at(5)))
    job = await put(storage, new_job(available_at=at(-5)))
    await lease_of(storage, job.id, T0)
    assert await storage.earliest("email") is None


async def test_earliest_is_the_earliest_unreserved_job_of_the_name_ready_or_not(
    storage: Storage,
) -> None:
    early = await put(storage, new_job(available_at=at(2)))
    await put(storage, new_job(available_at=at(9, 5)))
    await put(storage, new_job(available_at=at(7, 5)))
    await put(storage, new_job("sms", available_at=at(4, 321)))
    await put(storage, new_job("push", available_at=at(-1)))
    assert await storage.earliest("email") == at(2)
    assert await storage.earliest("sms") == at(4, 321)
    assert await storage.earliest("push") == at(-1)  # ready now counts too: a poll takes it
    # Once the earliest job is reserved, it no longer counts.
    await lease_of(storage, early.id, at(2))
    assert await storage.earliest("email") == at(7, 5)


# -- ack ----------------------------------------------------------------------------------


async def test_ack_moves_the_job_to_succeeded(storage: Storage) -> None:
    job = await put(storage, new_job(created_at=at(0, 7), available_at=at(0, 8)))
    lease = await lease_of(storage, job.id, at(1))
    done = await storage.ack(job.id, lease.id, at(2, 345))
    expected = SucceededJob(
        id=job.id,
        name="email",
        payload=job.payload,
        attempts=1,
        created_at=at(0, 7),
        available_at=at(0, 8),
        succeeded_at=at(2, 345),
    )
    assert done == expected
    assert await storage.get(job.id, at(3)) == expected
    assert await storage.list_pending(pending(), at(3)) == []
    assert await storage.list_succeeded(history()) == [expected]
    assert await storage.lease_position(job.id) == LeasePosition("succeeded", 1)


async def test_ack_with_a_wrong_or_stale_lease_changes_nothing(storage: Storage) -> None:
    job = await put(storage)
    first = await lease_of(storage, job.id)
    assert await storage.release(job.id, first.id, at(1)) is not None
    second = await lease_of(storage, job.id, at(2))
    before = await storage.get(job.id, at(3))
    for lease_id in (first.id, f"{job.id}.3", "nonsense", f"{job.id}.2x"):
        assert await storage.ack(job.id, lease_id, at(3)) is None
    assert await storage.ack("other-job", second.id, at(3)) is None
    assert await storage.get(job.id, at(3)) == before
    assert await storage.list_succeeded(history()) == []
    assert await storage.ack(job.id, second.id, at(4)) is not None
    assert await storage.ack(job.id, second.id, at(5)) is None  # only once
    done = await storage.get(job.id, at(5))
    assert isinstance(done, SucceededJob) and done.succeeded_at == at(4)


# -- fail ---------------------------------------------------------------------------------


async def test_fail_with_a_retry_time_puts_the_job_back_pending(storage: Storage) -> None:
    job = await put(storage, new_job(max_retries=5))
    lease = await lease_of(storage, job.id, at(1))
    calls: list[tuple[int, int]] = []
    outcome = await storage.fail(job.id, lease.id, at(2), "boom", retry_at(at(60, 5), calls))
    assert calls == [(1, 5)]
    assert isinstance(outcome, Retrying)
    expected = Job(
        id=job.id,
        name="email",
        payload=job.payload,
        attempts=1,
        max_retries=5,
        created_at=job.created_at,
        available_at=at(60, 5),
        reserved_at=None,
        reserved_by=None,
        state="scheduled",
    )
    assert outcome.job == expected
    assert await storage.get(job.id, at(2)) == expected
    assert await storage.lease_position(job.id) == LeasePosition(
        "pending", 1, lease.id, reserved=False
    )
    assert await storage.expired_leases(at(1000), 10) == []
    assert await reserve(storage, now=at(60, 4)) == []
    assert await storage.earliest("email") == at(60, 5)


async def test_a_late_ack_with_the_kept_lease_still_succeeds_after_a_retry(
    storage: Storage,
) -> None:
    job = await put(storage)
    lease = await lease_of(storage, job.id, at(1))
    assert await storage.fail(job.id, lease.id, at(2), "timeout", retry_at(at(60))) is not None
    done = await storage.ack(job.id, lease.id, at(3))
    assert done is not None and done.attempts == 1 and done.succeeded_at == at(3)
    assert isinstance(await storage.get(job.id, at(3)), SucceededJob)


async def test_a_new_lease_fences_off_the_kept_one(storage: Storage) -> None:
    job = await put(storage)
    lease = await lease_of(storage, job.id, at(1))
    assert await storage.fail(job.id, lease.id, at(2), "timeout", retry_at(at(3))) is not None
    again = await lease_of(storage, job.id, at(3))
    assert await storage.ack(job.id, lease.id, at(4)) is None
    assert await storage.fail(job.id, lease.id, at(4), "late", give_up()) is None
    assert await storage.ack(job.id, again.id, at(5)) is not None


async def test_fail_without_a_retry_time_buries_the_job(storage: Storage) -> None:
    job = await put(storage, new_job(max_retries=0, created_at=at(0, 3), available_at=at(0, 4)))
    lease = await lease_of(storage, job.id, at(1))
    calls: list[tuple[int, int]] = []
    outcome = await storage.fail(job.id, lease.id, at(2, 99), "Traceback: boom", give_up(calls))
    assert calls == [(1, 0)]
    expected = FailedJob(
        id=job.id,
        name="email",
        payload=job.payload,
        attempts=1,
        exception="Traceback: boom",
        created_at=at(0, 3),
        available_at=at(0, 4),
        failed_at=at(2, 99),
    )
    assert outcome == Buried(expected)
    assert await storage.get(job.id, at(3)) == expected
    assert await storage.list_pending(pending(), at(3)) == []
    assert await storage.list_failed(history()) == [expected]
    assert await storage.lease_position(job.id) == LeasePosition("failed", 1)
    assert await storage.ack(job.id, lease.id, at(3)) is None


async def test_decide_sees_attempts_counted_across_leases(storage: Storage) -> None:
    job = await put(storage, new_job(max_retries=2))
    calls: list[tuple[int, int]] = []
    for attempt in range(3):
        lease = await lease_of(storage, job.id, at(attempt))
        decide = retry_at(at(attempt + 1), calls)
        outcome = await storage.fail(job.id, lease.id, at(attempt), "x", decide)
        assert isinstance(outcome, Retrying) and outcome.job.attempts == attempt + 1
    lease = await lease_of(storage, job.id, at(3))
    assert isinstance(await storage.fail(job.id, lease.id, at(3), "x", give_up(calls)), Buried)
    assert calls == [(1, 2), (2, 2), (3, 2), (4, 2)]


async def test_fail_with_a_wrong_or_stale_lease_changes_nothing(storage: Storage) -> None:
    job = await put(storage)
    first = await lease_of(storage, job.id)
    assert await storage.release(job.id, first.id, at(1)) is not None
    await lease_of(storage, job.id, at(2))
    before = await storage.get(job.id, at(3))
    calls: list[tuple[int, int]] = []
    for lease_id in (first.id, f"{job.id}.3", "nonsense"):
        assert await storage.fail(job.id, lease_id, at(3), "x", give_up(calls)) is None
    assert await storage.fail("unknown", first.id, at(3), "x", give_up(calls)) is None
    assert calls == []
    assert await storage.get(job.id, at(3)) == before
    assert await storage.list_failed(history()) == []


async def test_fail_expired_before_applies_only_once_the_lease_has_expired(
    storage: Storage,
) -> None:
    job = await put(storage)
    [lease] = await storage.reserve(["email"], "w", 1, at(0), at(30, 500))
    assert await storage.fail(job.id, lease.id, at(30, 499), "x", give_up(), at(30, 499)) is None
    still = await storage.get(job.id, at(30, 499))
    assert isinstance(still, Job) and still.state == "reserved"
    outcome = await storage.fail(job.id, lease.id, at(30, 500), "expired", give_up(), at(30, 500))
    assert isinstance(outcome, Buried) and outcome.job.exception == "expired"


async def test_fail_expired_before_loses_to_an_extend(storage: Storage) -> None:
    job = await put(storage)
    [lease] = await storage.reserve(["email"], "w", 1, at(0), at(30))
    [expired] = await storage.expired_leases(at(40), 10)
    assert expired.lease_id == lease.id
    assert await storage.extend(job.id, lease.id, at(90))
    assert (
        await storage.fail(job.id, lease.id, at(40), "x", give_up(), expired_before=at(40)) is None
    )
    still = await storage.get(job.id, at(40))
    assert isinstance(still, Job) and still.state == "reserved"
    outcome = await storage.fail(job.id, lease.id, at(90), "x", retry_at(at(95)), at(90))
    assert isinstance(outcome, Retrying)


async def test_fail_expired_before_ignores_a_job_that_is_not_reserved(storage: Storage) -> None:
    job = await put(storage)
    [lease] = await storage.reserve(["email"], "w", 1, at(0), at(30))
    assert await storage.fail(job.id, lease.id, at(40), "x", retry_at(at(50)), at(40)) is not None
    # Pending again, still holding the lease id, but no longer reserved: the reaper leaves it.
    assert await storage.fail(job.id, lease.id, at(60), "x", give_up(), at(60)) is None
    fetched = await storage.get(job.id, at(60))
    assert isinstance(fetched, Job) and fetched.state == "available"


# -- extend -------------------------------------------------------------------------------


async def test_extend_pushes_back_a_live_lease_only(storage: Storage) -> None:
    job = await put(storage)
    first = await lease_of(storage, job.id)
    assert await storage.extend(job.id, first.id, at(100, 1))
    assert await storage.extend(job.id, first.id, at(100, 1))  # the same expiry again
    assert [e.expires_at for e in await storage.expired_leases(at(1000), 10)] == [at(100, 1)]
    assert await storage.expired_leases(at(100), 10) == []
    assert not await storage.extend(job.id, f"{job.id}.2", at(200))
    assert not await storage.extend("unknown", first.id, at(200))
    assert await storage.release(job.id, first.id, at(1)) is not None
    assert not await storage.extend(job.id, first.id, at(200))  # released: not reserved
    second = await lease_of(storage, job.id, at(2))
    assert not await storage.extend(job.id, first.id, at(200))  # stale
    assert await storage.fail(job.id, second.id, at(3), "x", retry_at(at(4))) is not None
    assert not await storage.extend(job.id, second.id, at(200))  # kept, but not reserved
    assert await storage.expired_leases(at(1000), 10) == []


# -- release ------------------------------------------------------------------------------


async def test_release_gives_the_job_back_untouched(storage: Storage) -> None:
    job = await put(storage, new_job(available_at=at(0, 5)))
    lease = await lease_of(storage, job.id, at(1))
    released = await storage.release(job.id, lease.id, at(2))
    assert released == Job(
        id=job.id,
        name="email",
        payload=job.payload,
        attempts=0,
        max_retries=3,
        created_at=job.created_at,
        available_at=at(0, 5),
        reserved_at=None,
        reserved_by=None,
        state="available",
    )
    assert await storage.get(job.id, at(2)) == released
    assert await storage.lease_position(job.id) == LeasePosition("pending", 1, None, False)
    assert await storage.ack(job.id, lease.id, at(3)) is None
    assert await storage.fail(job.id, lease.id, at(3), "x", give_up()) is None
    assert await storage.release(job.id, lease.id, at(3)) is None
    again = await lease_of(storage, job.id, at(4))
    assert again.id == f"{job.id}.2" and again.job.attempts == 1


async def test_release_with_a_stale_lease_changes_nothing(storage: Storage) -> None:
    job = await put(storage)
    first = await lease_of(storage, job.id)
    assert await storage.release(job.id, first.id, at(1)) is not None
    second = await lease_of(storage, job.id, at(2))
    before = await storage.get(job.id, at(3))
    assert await storage.release(job.id, first.id, at(3)) is None
    assert await storage.release(job.id, "nonsense", at(3)) is None
    assert await storage.release("unknown", second.id, at(3)) is None
    assert await storage.get(job.id, at(3)) == before
    assert await storage.fail(job.id, second.id, at(4), "x", retry_at(at(5))) is not None
    assert await storage.release(job.id, second.id, at(5)) is None  # kept, but not reserved


# -- expired_leases -----------------------------------------------------------------------


async def test_expired_leases_lists_reserved_jobs_past_expiry_by_expiry(storage: Storage) -> None:
    expiries = {"j3": at(30), "j1": at(10), "j4": at(40, 1), "j2": at(20)}
    for job_id, expires in expiries.items():
        await put(storage, new_job(job_id=job_id))
        [lease] = await storage.reserve(["email"], f"w-{job_id}", 1, T0, expires)
        assert lease.job.id == job_id
    await put(storage, new_job(job_id="free"))  # not reserved
    expired = await storage.expired_leases(at(40), 10)
    assert [(e.job_id, e.lease_id, e.name, e.reserved_by, e.expires_at) for e in expired] == [
        ("j1", "j1.1", "email", "w-j1", at(10)),
        ("j2", "j2.1", "email", "w-j2", at(20)),
        ("j3", "j3.1", "email", "w-j3", at(30)),
    ]
    assert [e.job_id for e in await storage.expired_leases(at(40), 2)] == ["j1", "j2"]
    assert [e.job_id for e in await storage.expired_leases(at(20), 10)] == ["j1", "j2"]
    assert await storage.expired_leases(at(9, 999_999), 10) == []
    assert [e.job_id for e in await storage.expired_leases(at(40, 1), 10)] == [
        "j1",
        "j2",
        "j3",
        "j4",
    ]


# -- lease_position -----------------------------------------------------------------------


async def test_lease_position_tells_where_the_job_is(storage: Storage) -> None:
    assert await storage.lease_position("unknown") is None
    job = await put(storage)
    assert await storage.lease_position(job.id) == LeasePosition("pending", 0, None, False)
    first = await lease_of(storage, job.id)
    assert await storage.lease_position(job.id) == LeasePosition(
        "pending", 1, first.id, reserved=True
    )
    assert await storage.release(job.id, first.id, at(1)) is not None
    second = await lease_of(storage, job.id, at(2))
    assert await storage.lease_position(job.id) == LeasePosition("pending", 2, second.id, True)
    assert await storage.ack(job.id, second.id, at(3)) is not None
    assert await storage.lease_position(job.id) == LeasePosition("succeeded", 2)

    buried = await bury(storage, "sms", at(4))
    assert await storage.lease_position(buried) == LeasePosition("failed", 1)


# -- cancel -------------------------------------------------------------------------------


async def test_cancel_deletes_unreserved_pending_jobs(storage: Storage) -> None:
    available = await put(storage)
    scheduled = await put(storage, new_job(available_at=at(100)))
    assert await storage.cancel(available.id) == "deleted"
    assert await storage.cancel(scheduled.id) == "deleted"
    assert await storage.get(available.id, T0) is None
    assert await storage.get(scheduled.id, T0) is None
    assert await storage.cancel(available.id) == "missing"
    assert await storage.list_pending(pending(), T0) == []


async def test_cancel_refuses_a_reserved_job(storage: Storage) -> None:
    job = await put(storage)
    lease = await lease_of(storage, job.id)
    assert await storage.cancel(job.id) == "reserved"
    assert await storage.get(job.id, T0) == lease.job
    assert await storage.ack(job.id, lease.id, at(1)) is not None


async def test_cancel_deletes_a_job_pending_again_with_a_kept_lease(storage: Storage) -> None:
    job = await put(storage)
    lease = await lease_of(storage, job.id)
    assert await storage.fail(job.id, lease.id, at(1), "x", retry_at(at(2))) is not None
    assert await storage.cancel(job.id) == "deleted"
    assert await storage.get(job.id, at(2)) is None
    assert await storage.ack(job.id, lease.id, at(3)) is None
    assert await storage.lease_position(job.id) is None


async def test_cancel_deletes_finished_records(storage: Storage) -> None:
    done = await succeed(storage, "email", at(1))
    failed = await bury(storage, "email", at(2))
    assert await storage.cancel(done) == "deleted"
    assert await storage.cancel(failed) == "deleted"
    assert await storage.get(done, at(3)) is None
    assert await storage.get(failed, at(3)) is None
    assert await storage.list_succeeded(history()) == []
    assert await storage.list_failed(history()) == []
    assert await storage.cancel(done) == "missing"
    assert await storage.cancel("never-existed") == "missing"


# -- retry_failed -------------------------------------------------------------------------


async def test_retry_failed_puts_a_failed_job_back_available_now(storage: Storage) -> None:
    spec = new_job(payload="the payload", max_retries=1, created_at=at(0, 1), available_at=at(0, 1))
    await put(storage, spec)
    first = await lease_of(storage, spec.id, at(1))
    assert await storage.fail(spec.id, first.id, at(2), "x", retry_at(at(3))) is not None
    second = await lease_of(storage, spec.id, at(3))
    assert isinstance(await storage.fail(spec.id, second.id, at(4), "x", give_up()), Buried)

    job = await storage.retry_failed(spec.id, at(5, 55))
    expected = Job(
        id=spec.id,
        name="email",
        payload="the payload",
        attempts=0,
        max_retries=1,
        created_at=at(0, 1),
        available_at=at(5, 55),
        reserved_at=None,
        reserved_by=None,
        state="available",
    )
    assert job == expected
    assert await storage.get(spec.id, at(5, 55)) == expected
    assert await storage.list_failed(history()) == []
    assert await storage.lease_position(spec.id) == LeasePosition("pending", 2, None, False)
    assert await storage.ack(spec.id, second.id, at(6)) is None
    third = await lease_of(storage, spec.id, at(6))
    assert third.id == f"{spec.id}.3" and third.job.attempts == 1


async def test_retry_failed_refuses_jobs_that_are_not_failed(storage: Storage) -> None:
    available = await put(storage)
    reserved = await put(storage, new_job("sms"))
    await lease_of(storage, reserved.id)
    done = await succeed(storage, "push", at(1))
    for job_id in (available.id, reserved.id, done, "unknown"):
        assert await storage.retry_failed(job_id, at(2)) is None
    assert isinstance(await storage.get(done, at(2)), SucceededJob)
    failed = await bury(storage, "cron", at(3))
    assert await storage.retry_failed(failed, at(4)) is not None
    assert await storage.retry_failed(failed, at(5)) is None  # already back


# -- list_pending -------------------------------------------------------------------------


MIX_NOW = at(6)  # the time the pending-list tests look at their mix of jobs


async def _pending_mix(storage: Storage) -> None:
    """Available, scheduled and reserved jobs of two names, some sharing an available_at."""
    for job_id, name, seconds in (
        ("p5", "email", 5),
        ("p1", "email", 1),
        ("p3b", "sms", 3),
        ("p3a", "email", 3),
        ("p2", "sms", 2),
        ("p8", "email", 8),  # scheduled at MIX_NOW
        ("p7", "sms", 7),  # scheduled
        ("p0", "sms", 0),
    ):
        await put(storage, new_job(name, job_id=job_id, available_at=at(seconds)))
    [lease] = await reserve(storage, ["sms"], max_jobs=1, now=MIX_NOW)
    assert lease.job.id == "p0"
    [lease] = await reserve(storage, ["email"], max_jobs=1, now=MIX_NOW)
    assert lease.job.id == "p1"


async def _ids(storage: Storage, query: PendingQuery, now: datetime = MIX_NOW) -> list[str]:
    return [job.id for job in await storage.list_pending(query, now)]


async def test_list_pending_orders_by_available_at_then_id(storage: Storage) -> None:
    await _pending_mix(storage)
    jobs = await storage.list_pending(pending(), MIX_NOW)
    assert [job.id for job in jobs] == ["p0", "p1", "p2", "p3a", "p3b", "p5", "p7", "p8"]
    states = {job.id: job.state for job in jobs}
    assert states == {
        "p0": "reserved",
        "p1": "reserved",
        "p2": "available",
        "p3a": "available",
        "p3b": "available",
        "p5": "available",
        "p7": "scheduled",
        "p8": "scheduled",
    }
    assert [job for job in jobs if job.id == "p1"] == [await storage.get("p1", MIX_NOW)]


async def test_list_pending_filters_by_state_and_name(storage: Storage) -> None:
    await _pending_mix(storage)
    assert await _ids(storage, pending(state="reserved")) == ["p0", "p1"]
    assert await _ids(storage, pending(state="available")) == ["p2", "p3a", "p3b", "p5"]
    assert await _ids(storage, pending(state="scheduled")) == ["p7", "p8"]
    assert await _ids(storage, pending(name="email")) == ["p1", "p3a", "p5", "p8"]
    assert await _ids(storage, pending(name="sms", state="available")) == ["p2", "p3b"]
    assert await _ids(storage, pending(name="sms", state="scheduled")) == ["p7"]
    assert await _ids(storage, pending(name="push")) == []
    assert await _ids(storage, pending(state="scheduled"), now=at(7)) == ["p8"]
    assert await _ids(storage, pending(state="available", limit=2)) == ["p2", "p3a"]


async def walk_pending(storage: Storage, state: PendingState | None) -> list[str]:
    """Every pending job's id, two per page, following the keyset cursor."""
    seen: list[str] = []
    after: tuple[datetime, str] | None = None
    while page := await storage.list_pending(PendingQuery(state, None, 2, after), MIX_NOW):
        assert len(page) <= 2
        seen += [job.id for job in page]
        after = (page[-1].available_at, page[-1].id)
    return seen


async def test_list_pending_pages_with_a_keyset_cursor(storage: Storage) -> None:
    await _pending_mix(storage)
    assert await walk_pending(storage, None) == ["p0", "p1", "p2", "p3a", "p3b", "p5", "p7", "p8"]
    assert await walk_pending(storage, "available") == ["p2", "p3a", "p3b", "p5"]
    assert await walk_pending(storage, "reserved") == ["p0", "p1"]
    # A cursor between two jobs with the same available_at resumes at the second.
    resumed = PendingQuery(None, None, 3, (at(3), "p3a"))
    assert await _ids(storage, resumed) == ["p3b", "p5", "p7"]
    by_name = PendingQuery(None, "email", 10, (at(1), "p1"))
    assert await _ids(storage, by_name) == ["p3a", "p5", "p8"]


async def test_list_pending_cursor_with_microseconds(storage: Storage) -> None:
    for micros, job_id in ((1, "a"), (2, "b"), (2, "c"), (3, "d")):
        await put(storage, new_job(job_id=job_id, available_at=at(0, micros)))
    query = PendingQuery(None, None, 10, (at(0, 2), "b"))
    assert await _ids(storage, query, now=at(1)) == ["c", "d"]
    query = PendingQuery(None, None, 10, (at(0, 1), "zzz"))
    assert await _ids(storage, query, now=at(1)) == ["b", "c", "d"]


# -- list_succeeded and list_failed -------------------------------------------------------


async def test_list_succeeded_is_newest_first_with_filter_and_paging(storage: Storage) -> None:
    await succeed(storage, "email", at(1), "s1")
    await succeed(storage, "sms", at(3), "s3")
    await succeed(storage, "email", at(2, 5), "s2b")
    await succeed(storage, "email", at(2, 5), "s2a")
    await succeed(storage, "sms", at(4), "s4")
    listed = await storage.list_succeeded(history())
    assert [job.id for job in listed] == ["s4", "s3", "s2b", "s2a", "s1"]
    assert all(isinstance(job, SucceededJob) for job in listed)
    assert [job.id for job in await storage.list_succeeded(history("email"))] == [
        "s2b",
        "s2a",
        "s1",
    ]
    assert [job.id for job in await storage.list_succeeded(history(limit=2))] == ["s4", "s3"]
    assert await walk_succeeded(storage, None) == ["s4", "s3", "s2b", "s2a", "s1"]
    assert await walk_succeeded(storage, "email") == ["s2b", "s2a", "s1"]
    resumed = HistoryQuery(None, 10, (at(2, 5), "s2b"))
    assert [job.id for job in await storage.list_succeeded(resumed)] == ["s2a", "s1"]


async def walk_succeeded(storage: Storage, name: str | None) -> list[str]:
    seen: list[str] = []
    before: tuple[datetime, str] | None = None
    while page := await storage.list_succeeded(HistoryQuery(name, 2, before)):
        assert len(page) <= 2
        seen += [job.id for job in page]
        before = (page[-1].succeeded_at, page[-1].id)
    return seen


async def test_list_failed_is_newest_first_with_filter_and_paging(storage: Storage) -> None:
    await bury(storage, "email", at(1), "f1")
    await bury(storage, "sms", at(3), "f3")
    await bury(storage, "email", at(2, 5), "f2a")
    await bury(storage, "email", at(2, 5), "f2b")
    await bury(storage, "sms", at(4), "f4")
    await succeed(storage, "email", at(9), "ok")  # not in the failed list
    listed = await storage.list_failed(history())
    assert [job.id for job in listed] == ["f4", "f3", "f2b", "f2a", "f1"]
    assert all(isinstance(job, FailedJob) and job.exception == "boom" for job in listed)
    assert [job.id for job in await storage.list_failed(history("sms"))] == ["f4", "f3"]
    seen: list[str] = []
    before: tuple[datetime, str] | None = None
    while page := await storage.list_failed(HistoryQuery("email", 2, before)):
        seen += [job.id for job in page]
        before = (page[-1].failed_at, page[-1].id)
    assert seen == ["f2b", "f2a", "f1"]
    resumed = HistoryQuery(None, 2, (at(3), "f3"))
    assert [job.id for job in await storage.list_failed(resumed)] == ["f2b", "f2a"]


# -- prune --------------------------------------------------------------------------------


async def test_prune_deletes_the_oldest_succeeded_jobs_in_batches(storage: Storage) -> None:
    for i in (3, 1, 5, 2, 4):
        await succeed(storage, "email", at(i), f"s{i}")
    failed = await bury(storage, "email", at(0))
    assert await storage.prune("succeeded", at(4), 2) == 2
    assert [job.id for job in await storage.list_succeeded(history())] == ["s5", "s4", "s3"]
    assert await storage.prune("succeeded", at(4), 2) == 1
    assert await storage.prune("succeeded", at(4), 2) == 0  # s4 finished at, not before
    assert [job.id for job in await storage.list_succeeded(history())] == ["s5", "s4"]
    assert isinstance(await storage.get(failed, at(9)), FailedJob)


async def test_prune_deletes_the_oldest_failed_jobs_in_batches(storage: Storage) -> None:
    for i in (2, 4, 1, 3):
        await bury(storage, "email", at(i, 1), f"f{i}")
    done = await succeed(storage, "email", at(0))
    assert await storage.prune("failed", at(3, 2), 2) == 2
    assert [job.id for job in await storage.list_failed(history())] == ["f4", "f3"]
    assert await storage.prune("failed", at(3, 2), 2) == 1
    assert await storage.prune("failed", at(3, 2), 2) == 0
    assert await storage.prune("failed", at(100), 10) == 1
    assert await storage.list_failed(history()) == []
    assert isinstance(await storage.get(done, at(9)), SucceededJob)


# -- schema and health --------------------------------------------------------------------


async def test_migrate_is_idempotent_and_reports_the_head_revision(storage: Storage) -> None:
    head = head_revision()
    assert head is not None
    assert await storage.schema_revision() == head
    await storage.migrate()
    await storage.migrate()
    assert await storage.schema_revision() == head
    job = await put(storage)
    assert await storage.get(job.id, T0) == job


async def test_ping_succeeds(storage: Storage) -> None:
    await storage.ping()
    job = await put(storage)
    await storage.ping()
    assert await storage.get(job.id, T0) == job


# -- enqueue_once (idempotency keys) ------------------------------------------------------


KEYS_SINCE = at(-3600)  # the default `not_before`: every use in these tests still counts


def idem(
    key: str = "key-1", fingerprint: str = "fp-1", not_before: datetime = KEYS_SINCE
) -> IdempotencyKey:
    """An idempotency key whose earlier uses count back to `not_before`."""
    return IdempotencyKey(key, fingerprint, not_before)


def as_pending(spec: NewJob, now: datetime) -> Job:
    """The job an enqueue of `spec` at `now` makes."""
    return Job(
        spec.id, spec.name, spec.payload, 0, spec.max_retries, spec.created_at, spec.available_at,
        None, None, pending_state(spec.available_at, None, now),
    )  # fmt: skip


async def test_enqueue_once_claims_the_key_then_replays_the_job_in_its_current_state(
    storage: Storage,
) -> None:
    spec = new_job(created_at=at(0, 5), available_at=at(0, 5))
    created = await storage.enqueue_once(spec, at(0, 5), idem())
    assert created == Enqueued(as_pending(spec, at(0, 5)), created=True, same_request=True)
    assert await storage.get(spec.id, at(0, 5)) == created.job

    retry = new_job(created_at=at(1), available_at=at(1))  # a retry gets a new id: not used
    assert await storage.enqueue_once(retry, at(1), idem()) == Enqueued(
        as_pending(spec, at(1)), created=False, same_request=True
    )
    assert await storage.get(retry.id, at(1)) is None
    assert [job.id for job in await storage.list_pending(pending(), at(1))] == [spec.id]

    lease = await lease_of(storage, spec.id, at(2))
    assert await storage.enqueue_once(new_job(), at(3), idem()) == Enqueued(
        lease.job, created=False, same_request=True
    )
    done = await storage.ack(spec.id, lease.id, at(4))
    assert done is not None
    assert await storage.enqueue_once(new_job(), at(5), idem()) == Enqueued(
        done, created=False, same_request=True
    )
    assert await storage.list_pending(pending(), at(5)) == []
    assert await storage.list_succeeded(history()) == [done]


async def test_enqueue_once_with_another_fingerprint_is_not_the_same_request(
    storage: Storage,
) -> None:
    spec = new_job()
    assert (await storage.enqueue_once(spec, T0, idem("k", "fp-a"))).created
    other = new_job(payload="something else")
    outcome = await storage.enqueue_once(other, at(1), idem("k", "fp-b"))
    assert outcome == Enqueued(as_pending(spec, at(1)), created=False, same_request=False)
    assert await storage.get(other.id, at(1)) is None
    # The key keeps its first fingerprint: the first request still replays as itself.
    replay = await storage.enqueue_once(new_job(), at(2), idem("k", "fp-a"))
    assert replay == Enqueued(as_pending(spec, at(2)), created=False, same_request=True)
    # Another key is another request.
    fresh = await storage.enqueue_once(other, at(3), idem("k2", "fp-b"))
    assert fresh == Enqueued(as_pending(other, at(3)), created=True, same_request=True)
    assert sorted(job.id for job in await storage.list_pending(pending(), at(3))) == sorted(
        [spec.id, other.id]
    )


async def test_enqueue_once_starts_afresh_with_a_key_older_than_not_before(
    storage: Storage,
) -> None:
    first = new_job()
    assert (await storage.enqueue_once(first, at(10), idem("k", "fp-1", at(0)))).created
    # A use at exactly `not_before` still counts.
    same = await storage.enqueue_once(new_job(), at(20), idem("k", "fp-2", not_before=at(10)))
    assert same == Enqueued(as_pending(first, at(20)), created=False, same_request=False)
    # One microsecond later it has expired: the key is claimed afresh, with a new job.
    second = new_job(created_at=at(30), available_at=at(30))
    fresh = await storage.enqueue_once(second, at(30), idem("k", "fp-2", not_before=at(10, 1)))
    assert fresh == Enqueued(as_pending(second, at(30)), created=True, same_request=True)
    assert await storage.get(first.id, at(30)) == as_pending(first, at(30))
    assert await storage.get(second.id, at(30)) == as_pending(second, at(30))
    # The key now stands for the second use: its fingerprint and its time.
    replay = await storage.enqueue_once(new_job(), at(40), idem("k", "fp-2", not_before=at(30)))
    assert replay == Enqueued(as_pending(second, at(40)), created=False, same_request=True)
    late = await storage.enqueue_once(new_job(), at(40), idem("k", "fp-1", not_before=at(30)))
    assert late.created is False and late.same_request is False


async def test_enqueue_once_replays_none_once_the_job_is_deleted(storage: Storage) -> None:
    spec = new_job()
    assert (await storage.enqueue_once(spec, T0, idem())).created
    assert await storage.cancel(spec.id) == "deleted"
    retry = new_job()
    assert await storage.enqueue_once(retry, at(1), idem()) == Enqueued(
        None, created=False, same_request=True
    )
    assert await storage.enqueue_once(retry, at(1), idem(fingerprint="fp-2")) == Enqueued(
        None, created=False, same_request=False
    )
    assert await storage.list_pending(pending(), at(1)) == []
    # The same once the job finished and its record was deleted.
    done = new_job("sms")
    assert (await storage.enqueue_once(done, at(2), idem("k2"))).created
    lease = await lease_of(storage, done.id, at(2))
    assert await storage.ack(done.id, lease.id, at(3)) is not None
    assert await storage.cancel(done.id) == "deleted"
    assert await storage.enqueue_once(new_job(), at(4), idem("k2")) == Enqueued(
        None, created=False, same_request=True
    )


async def test_an_enqueue_once_that_raises_leaves_its_key_unclaimed(storage: Storage) -> None:
    taken = await put(storage)
    with pytest.raises(Exception) as raised:
        await storage.enqueue_once(new_job(job_id=taken.id), at(1), idem())
    assert not isinstance(raised.value, StorageUnavailable)  # a data error, not an outage
    spec = new_job()
    assert await storage.enqueue_once(spec, at(2), idem()) == Enqueued(
        as_pending(spec, at(2)), created=True, same_request=True
    )


async def test_prune_deletes_the_oldest_idempotency_keys_in_batches(storage: Storage) -> None:
    old = at(-100)
    for i in (3, 1, 5, 2, 4):
        assert (await storage.enqueue_once(new_job(job_id=f"j{i}"), at(i), idem(f"k{i}"))).created
    assert await storage.prune("idempotency_keys", at(4), 2) == 2
    # k1 and k2 (the oldest) are gone and can be claimed again; k3 is still there.
    for i in (1, 2):
        again = new_job(job_id=f"again{i}")
        outcome = await storage.enqueue_once(again, at(10), idem(f"k{i}", not_before=old))
        assert outcome == Enqueued(as_pending(again, at(10)), created=True)
    kept = await storage.enqueue_once(new_job(), at(10), idem("k3", not_before=old))
    assert kept.created is False and kept.job is not None and kept.job.id == "j3"
    assert await storage.prune("idempotency_keys", at(4), 2) == 1  # k3
    assert await storage.prune("idempotency_keys", at(4), 2) == 0  # k4 is from at(4), not before
    assert (await storage.enqueue_once(new_job(), at(11), idem("k3", not_before=old))).created
    for i in (4, 5):
        outcome = await storage.enqueue_once(new_job(), at(11), idem(f"k{i}", not_before=old))
        assert outcome.created is False and outcome.job is not None and outcome.job.id == f"j{i}"
    # Pruning keys leaves their jobs alone.
    listed = await storage.list_pending(pending(), at(11))
    assert {f"j{i}" for i in range(1, 6)} <= {job.id for job in listed}
    assert len(listed) == 8


# -- enqueue_many and enqueue_many_once ---------------------------------------------------


async def test_enqueue_many_writes_all_the_jobs_in_order(storage: Storage) -> None:
    specs = [
        new_job("email", job_id="m-c", available_at=at(0, 3)),
        new_job("sms", job_id="m-a", available_at=at(5, 1), max_retries=0),
        new_job("email", job_id="m-b", payload="", available_at=at(0, 1)),
    ]
    jobs = await storage.enqueue_many(specs, at(1))
    assert jobs == [as_pending(spec, at(1)) for spec in specs]
    assert [job.state for job in jobs] == ["available", "scheduled", "available"]
    for job in jobs:
        assert await storage.get(job.id, at(1)) == job
    assert [job.id for job in await storage.list_pending(pending(), at(1))] == [
        "m-b",
        "m-c",
        "m-a",
    ]
    assert [lease.job.id for lease in await reserve(storage, ["email", "sms"], now=at(6))] == [
        "m-b",
        "m-c",
        "m-a",
    ]


async def test_enqueue_many_with_a_duplicate_id_raises_and_writes_nothing(
    storage: Storage,
) -> None:
    existing = await put(storage, new_job(job_id="dup"))
    batches = [
        [new_job(job_id="b1"), new_job(job_id="dup"), new_job(job_id="b3")],  # a stored id
        [new_job(job_id="c1"), new_job(job_id="c2"), new_job(job_id="c1")],  # twice in itself
    ]
    for batch in batches:
        writes = storage.writes["enqueue_many"]
        with pytest.raises(Exception) as raised:
            await storage.enqueue_many(batch, at(1))
        assert not isinstance(raised.value, StorageUnavailable)  # a data error, not an outage
        assert "unique" in str(raised.value).lower(), raised.value
        assert storage.writes["enqueue_many"] == writes  # nothing committed
    for job_id in ("b1", "b3", "c1", "c2"):
        assert await storage.get(job_id, at(1)) is None
    assert await storage.list_pending(pending(), at(1)) == [existing]
    # The storage goes on: the same batch without the clash goes in whole.
    good = [new_job(job_id="b1"), new_job(job_id="b3")]
    assert await storage.enqueue_many(good, at(2)) == [as_pending(spec, at(2)) for spec in good]


async def test_enqueue_many_once_claims_the_key_then_replays_the_jobs(storage: Storage) -> None:
    specs = [new_job(), new_job("sms", available_at=at(9)), new_job("push")]
    ids = [spec.id for spec in specs]
    first = await storage.enqueue_many_once(specs, at(1), idem("batch-1"))
    assert first == EnqueuedBatch(ids, [as_pending(s, at(1)) for s in specs], created=True)
    # Replays give each job in its current state, None where deleted since.
    lease = await lease_of(storage, specs[0].id, at(2))
    assert await storage.cancel(specs[1].id) == "deleted"
    retry = [new_job(), new_job("sms"), new_job("push")]
    again = await storage.enqueue_many_once(retry, at(3), idem("batch-1"))
    expected: list[AnyJob | None] = [lease.job, None, as_pending(specs[2], at(3))]
    assert again == EnqueuedBatch(ids, expected, created=False, same_request=True)
    other = await storage.enqueue_many_once(retry[:1], at(3), idem("batch-1", "fp-2"))
    assert other == EnqueuedBatch(ids, expected, created=False, same_request=False)
    for spec in retry:
        assert await storage.get(spec.id, at(3)) is None
    # Older than not_before: claimed afresh.
    fresh = await storage.enqueue_many_once(retry, at(4), idem("batch-1", not_before=at(1, 1)))
    assert fresh == EnqueuedBatch(
        [spec.id for spec in retry], [as_pending(s, at(4)) for s in retry], created=True
    )


async def test_batch_keys_and_single_keys_are_separate(storage: Storage) -> None:
    single = new_job()
    assert (await storage.enqueue_once(single, T0, idem("shared"))).created
    batch = [new_job(), new_job()]
    outcome = await storage.enqueue_many_once(batch, T0, idem("shared"))
    assert outcome == EnqueuedBatch(
        [spec.id for spec in batch], [as_pending(s, T0) for s in batch], created=True
    )
    replay = await storage.enqueue_once(new_job(), at(1), idem("shared"))
    assert replay == Enqueued(as_pending(single, at(1)), created=False)
    replay_batch = await storage.enqueue_many_once([new_job()], at(1), idem("shared"))
    assert replay_batch.created is False and replay_batch.ids == [spec.id for spec in batch]


async def test_an_enqueue_many_once_that_raises_writes_nothing_and_leaves_its_key_unclaimed(
    storage: Storage,
) -> None:
    taken = await put(storage)
    batch = [new_job(job_id="x1"), new_job(job_id=taken.id)]
    with pytest.raises(Exception) as raised:
        await storage.enqueue_many_once(batch, at(1), idem("batch"))
    assert not isinstance(raised.value, StorageUnavailable)
    assert await storage.get("x1", at(1)) is None
    good = [new_job(job_id="x1"), new_job(job_id="x2")]
    outcome = await storage.enqueue_many_once(good, at(2), idem("batch"))
    assert outcome == EnqueuedBatch(["x1", "x2"], [as_pending(s, at(2)) for s in good], True)


async def test_prune_deletes_the_oldest_batch_keys_in_batches(storage: Storage) -> None:
    old = at(-100)
    assert (await storage.enqueue_once(new_job(job_id="s0"), at(0), idem("k0"))).created
    for i in (3, 1, 2):
        jobs = [new_job(job_id=f"b{i}a"), new_job(job_id=f"b{i}b")]
        assert (await storage.enqueue_many_once(jobs, at(i), idem(f"k{i}"))).created
    assert await storage.prune("batch_keys", at(3), 1) == 1  # k1, the oldest batch key
    again = await storage.enqueue_many_once([new_job(job_id="n1")], at(10), idem("k1", "f", old))
    assert again.created is True and again.ids == ["n1"]
    kept = await storage.enqueue_many_once([new_job()], at(10), idem("k2", not_before=old))
    assert kept.created is False and kept.ids == ["b2a", "b2b"]
    assert await storage.prune("batch_keys", at(3), 5) == 1  # k2
    assert await storage.prune("batch_keys", at(3), 5) == 0  # k3 is from at(3), not before
    kept = await storage.enqueue_many_once([new_job()], at(11), idem("k3", not_before=old))
    assert kept.created is False and kept.ids == ["b3a", "b3b"]
    # The single key k0, older than all, was not touched by pruning batch keys; and the
    # other way round.
    single = await storage.enqueue_once(new_job(), at(11), idem("k0", not_before=old))
    assert single.created is False and single.job is not None and single.job.id == "s0"
    assert await storage.prune("idempotency_keys", at(100), 10) == 1
    kept = await storage.enqueue_many_once([new_job()], at(12), idem("k3", not_before=old))
    assert kept.created is False and kept.ids == ["b3a", "b3b"]
    # Pruning keys leaves their jobs alone.
    assert len(await storage.list_pending(pending(), at(12))) == 8


# -- ack_many, fail_many, extend_many -----------------------------------------------------


async def reserved_jobs(storage: Storage, count: int, prefix: str = "r") -> list[Lease]:
    """`count` jobs of their own names, each leased at at(1): their leases, in order."""
    leases = []
    for i in range(count):
        job = await put(storage, new_job(f"{prefix}{i}", job_id=f"{prefix}{i}", max_retries=i))
        leases.append(await lease_of(storage, job.id, at(1)))
    return leases


def succeeded_from(lease: Lease, when: datetime) -> SucceededJob:
    job = lease.job
    return SucceededJob(
        job.id, job.name, job.payload, job.attempts, job.created_at, job.available_at, when
    )


async def test_ack_many_acks_each_item_by_the_single_ack_rules_in_order(
    storage: Storage,
) -> None:
    a0, a1, a2, a3 = await reserved_jobs(storage, 4)
    assert await storage.release(a2.job.id, a2.id, at(1)) is not None
    a2_again = await lease_of(storage, a2.job.id, at(1))  # a2's first lease is now stale
    items = [
        (a0.job.id, a0.id),  # good
        (a2.job.id, a2.id),  # stale
        ("unknown", "unknown.1"),  # unknown job
        (a1.job.id, a3.id),  # another job's lease
        (a3.job.id, a3.id),  # good
        (a0.job.id, a0.id),  # the same pair again: done already
        (a1.job.id, f"{a1.job.id}.2"),  # a lease never issued
    ]
    results = await storage.ack_many(items, at(2, 7))
    assert results == [
        succeeded_from(a0, at(2, 7)),
        None,
        None,
        None,
        succeeded_from(a3, at(2, 7)),
        None,
        None,
    ]
    assert [job.id for job in await storage.list_succeeded(history())] == sorted(
        [a0.job.id, a3.job.id], reverse=True
    )
    assert await storage.get(a1.job.id, at(3)) == a1.job  # untouched, still reserved
    assert await storage.get(a2.job.id, at(3)) == a2_again.job
    assert await storage.ack_many([(a1.job.id, a1.id), (a2.job.id, a2_again.id)], at(4)) == [
        succeeded_from(a1, at(4)),
        succeeded_from(a2_again, at(4)),
    ]
    assert await storage.ack_many([], at(5)) == []


async def test_fail_many_fails_each_item_with_its_own_decision(storage: Storage) -> None:
    f0, f1, f2, f3 = await reserved_jobs(storage, 4, prefix="f")
    assert await storage.release(f2.job.id, f2.id, at(1)) is not None
    f2_again = await lease_of(storage, f2.job.id, at(1))
    calls: list[list[tuple[int, int]]] = [[], [], [], [], []]
    items = [
        FailItem(f0.job.id, f0.id, "boom-0", give_up(calls[0])),  # max_retries 0: buried
        FailItem(f1.job.id, f1.id, "boom-1", retry_at(at(50, 1), calls[1])),
        FailItem(f2.job.id, f2.id, "late", give_up(calls[2])),  # stale
        FailItem(f3.job.id, f3.id, "boom-3", retry_at(at(60, 3), calls[3])),
        FailItem("unknown", "unknown.1", "who?", give_up(calls[4])),
    ]
    outcomes = await storage.fail_many(items, at(2, 2))
    assert outcomes == [
        Buried(
            FailedJob(
                "f0", "f0", f0.job.payload, 1, "boom-0", f0.job.created_at, f0.job.available_at,
                at(2, 2),
            )
        ),
        Retrying(
            Job(
                "f1", "f1", f1.job.payload, 1, 1, f1.job.created_at, at(50, 1), None, None,
                "scheduled",
            )
        ),
        None,
        Retrying(
            Job(
                "f3", "f3", f3.job.payload, 1, 3, f3.job.created_at, at(60, 3), None, None,
                "scheduled",
            )
        ),
        None,
    ]  # fmt: skip
    # Each decision was asked once, about its own job; none for a refused item.
    assert calls == [[(1, 0)], [(1, 1)], [], [(1, 3)], []]
    buried, retried1, _, retried3, _ = outcomes
    assert isinstance(buried, Buried) and isinstance(retried1, Retrying)
    assert isinstance(retried3, Retrying)
    assert await storage.list_failed(history()) == [buried.job]
    assert await storage.get("f1", at(3)) == retried1.job
    assert await storage.get("f3", at(3)) == retried3.job
    assert await storage.get("f2", at(3)) == f2_again.job  # untouched, still reserved
    assert await storage.fail_many([], at(4)) == []


async def test_extend_many_extends_each_live_lease(storage: Storage) -> None:
    e0, e1, e2 = await reserved_jobs(storage, 3, prefix="e")
    assert await storage.release(e2.job.id, e2.id, at(1)) is not None
    e2_again = await lease_of(storage, e2.job.id, at(2))
    items = [
        (e0.job.id, e0.id),
        (e1.job.id, f"{e1.job.id}.7"),  # never issued
        (e2.job.id, e2.id),  # stale
        ("unknown", "unknown.1"),
        (e1.job.id, e1.id),
        (e0.job.id, e0.id),  # again: still live, the same expiry
    ]
    assert await storage.extend_many(items, at(100, 1)) == [True, False, False, False, True, True]
    expiries = {e.job_id: e.expires_at for e in await storage.expired_leases(at(1000), 10)}
    assert expiries == {"e0": at(100, 1), "e1": at(100, 1), "e2": e2_again.expires_at}
    assert await storage.extend_many([], at(200)) == []


# -- reserve with max_bytes ---------------------------------------------------------------


async def test_reserve_with_max_bytes_stops_before_the_payloads_pass_it(storage: Storage) -> None:
    # Bytes of UTF-8, not characters: 10, 10, 20 and 1 bytes (5, 10, 10 and 1 characters).
    for i, payload in enumerate(["é" * 5, "a" * 10, "é" * 10, "x"]):
        await put(storage, new_job(job_id=f"m{i}", payload=payload, available_at=at(0, i)))
    leases = await storage.reserve(["email"], "w", 10, at(1), at(31), max_bytes=25)
    assert [lease.job.id for lease in leases] == ["m0", "m1"]  # m2 would make 40 bytes
    leases = await storage.reserve(["email"], "w", 10, at(1), at(31), max_bytes=20)
    assert [lease.job.id for lease in leases] == ["m2"]  # exactly 20; m3 would make 21
    assert [lease.job.id for lease in await reserve(storage, now=at(1))] == ["m3"]


async def test_reserve_with_max_bytes_leases_at_least_one_and_never_skips_ahead(
    storage: Storage,
) -> None:
    await put(storage, new_job(job_id="big", payload="b" * 100, available_at=at(1)))
    await put(storage, new_job(job_id="small", payload="s", available_at=at(2)))
    for job_id in ("big", "small"):
        leases = await storage.reserve(["email"], "w", 10, at(5), at(35), max_bytes=10)
        assert [lease.job.id for lease in leases] == [job_id]
    for i in range(3):
        await put(storage, new_job(job_id=f"tiny{i}", payload="t", available_at=at(3, i)))
    leases = await storage.reserve(["email"], "w", 2, at(5), at(35), max_bytes=1000)
    assert [lease.job.id for lease in leases] == ["tiny0", "tiny1"]  # max_jobs still counts
    leases = await storage.reserve(["email", "sms"], "w", 10, at(5), at(35), max_bytes=None)
    assert [lease.job.id for lease in leases] == ["tiny2"]


async def test_reserve_with_max_bytes_counts_empty_payloads_as_leased_already(
    storage: Storage,
) -> None:
    """Once a job is leased (even one with an empty payload), the next one goes only if it
    keeps the total within max_bytes."""
    await put(storage, new_job(job_id="empty", payload="", available_at=at(1)))
    await put(storage, new_job(job_id="big", payload="b" * 100, available_at=at(2)))
    leases = await storage.reserve(["email"], "w", 10, at(5), at(35), max_bytes=10)
    assert [lease.job.id for lease in leases] == ["empty"]  # "big" would make 100 bytes


# -- writes -------------------------------------------------------------------------------


async def test_writes_counts_committed_writes_by_kind(storage: Storage) -> None:
    assert isinstance(storage.writes, Counter)
    before = Counter(storage.writes)
    job = await put(storage)
    lease = await lease_of(storage, job.id)
    assert await storage.ack(job.id, lease.id, at(1)) is not None
    grown = Counter(storage.writes)
    grown.subtract(before)
    assert +grown == Counter({"enqueue": 1, "reserve": 1, "ack": 1})
    # Reads are not writes.
    snapshot = Counter(storage.writes)
    assert isinstance(await storage.get(job.id, at(1)), SucceededJob)
    await storage.list_succeeded(history())
    await storage.list_pending(pending(), at(1))
    await storage.earliest("email")
    await storage.lease_position(job.id)
    await storage.expired_leases(at(1), 10)
    assert storage.writes == snapshot


async def _truth(storage: Storage, now: datetime) -> dict[str, dict[str, int]]:
    """Jobs per name and state, by listing every row."""
    truth: dict[str, Counter[str]] = {}
    for job in await storage.list_pending(pending(limit=1000), now):
        truth.setdefault(job.name, Counter())[job.state] += 1
    for kind, rows in (
        ("succeeded", await storage.list_succeeded(history(limit=1000))),
        ("failed", await storage.list_failed(history(limit=1000))),
    ):
        for row in rows:
            truth.setdefault(row.name, Counter())[kind] += 1
    states = ("available", "scheduled", "reserved", "succeeded", "failed")
    return {name: {s: counts[s] for s in states} for name, counts in truth.items()}


async def _kept(storage: Storage, now: datetime) -> dict[str, dict[str, int]]:
    """What `job_counts` says, for the names that have any job."""
    states = ("available", "scheduled", "reserved", "succeeded", "failed")
    kept = {c.name: {s: getattr(c, s) for s in states} for c in await storage.job_counts(now)}
    return {name: counts for name, counts in kept.items() if any(counts.values())}


async def test_kept_counts_follow_every_kind_of_write(storage: Storage) -> None:
    """Every write that adds, moves or removes a job moves the kept counts with it: single
    and batch enqueues (with and without keys, replays included), reserve, ack, fail
    (retry, bury, expiry), release, extend, cancel and delete by scope, retry of failed
    jobs and history pruning."""
    key = IdempotencyKey("k1", "fp", at(-3600))
    batch_key = IdempotencyKey("b1", "fp", at(-3600))
    for name in ("alpha", "beta"):
        for _ in range(6):
            await put(storage, new_job(name))
    await storage.enqueue_many([new_job("alpha") for _ in range(4)], T0)
    await storage.enqueue(new_job("beta", available_at=at(3600)), T0)  # scheduled
    for _ in range(2):  # the second is a replay: nothing new
        await storage.enqueue_once(new_job("alpha", job_id="keyed"), T0, key)
        await storage.enqueue_many_once([new_job("beta", job_id="batched")], T0, batch_key)
    a = iter(await reserve(storage, ["alpha"], max_jobs=8, now=at(1)))
    b = iter(await reserve(storage, ["beta"], max_jobs=6, now=at(1)))
    for lease in (next(a), next(a), next(b)):
        assert await storage.ack(lease.job.id, lease.id, at(2)) is not None
    ack_many = [next(a), next(b)]
    await storage.ack_many([(x.job.id, x.id) for x in ack_many], at(2))
    buried = [next(a), next(b), next(b)]
    for lease in buried:
        assert isinstance(await storage.fail(lease.job.id, lease.id, at(2), "x", give_up()), Buried)
    retrying = next(a)
    outcome = await storage.fail(retrying.job.id, retrying.id, at(2), "x", retry_at(at(60)))
    assert isinstance(outcome, Retrying)
    released = next(b)
    assert await storage.release(released.job.id, released.id, at(2)) is not None
    extended = next(a)
    assert await storage.extend(extended.job.id, extended.id, at(300))
    expiring = next(a)  # its lease (30 s) runs out: the reaper fails it into a retry
    reaped = await storage.fail(
        expiring.job.id, expiring.id, at(40), "expired", retry_at(at(41)), at(40)
    )
    assert isinstance(reaped, Retrying)
    late = next(b)  # its lease ran out at 31 s, but nothing reaped it: a late ack lands
    assert await storage.ack(late.job.id, late.id, at(45)) is not None
    assert await _kept(storage, at(50)) == await _truth(storage, at(50))

    await storage.retry_failed(buried[0].job.id, at(50))
    await storage.retry_failed_many([buried[1].job.id, "unknown"], at(50))
    ready = await storage.list_pending(pending(state="available"), at(50))
    held = next(a)
    results = await storage.delete_many(
        [
            (ready[0].id, "pending"),
            (held.job.id, "any"),  # reserved: not deleted
            (ack_many[0].job.id, "succeeded"),
            (buried[2].job.id, "failed"),
            (ready[1].id, "succeeded"),  # wrong scope: missing
        ],
    )
    assert results == ["deleted", "reserved", "deleted", "deleted", "missing"]
    assert await storage.cancel(ready[2].id) == "deleted"
    assert await _kept(storage, at(51)) == await _truth(storage, at(51))

    assert await storage.prune("succeeded", at(3), 2) == 2
    assert await storage.prune("failed", at(3), 100) == 0  # every failed job is gone or retried
    assert await _kept(storage, at(52)) == await _truth(storage, at(52))


async def _scheduled(storage: Storage, name: str, now: datetime) -> tuple[int, int]:
    """(what `job_counts` says, the truth from listing) of `name`'s scheduled jobs."""
    kept = {c.name: c.scheduled for c in await storage.job_counts(now)}.get(name, 0)
    listed = await storage.list_pending(pending(state="scheduled", name=name, limit=1000), now)
    return kept, len(listed)


async def test_scheduled_counts_follow_jobs_into_and_out_of_their_due_minutes(
    storage: Storage,
) -> None:
    """Scheduled jobs are counted from `due_counts` beyond the next few minutes and along
    the ready index before them; both agree with the jobs themselves as jobs are
    enqueued, cancelled, come due and are leased, fail into a later retry, are released
    and pruned, with the database's own clock and a test clock years ahead of it."""
    real = datetime.now(UTC)
    offsets = (-90, 20, 70, 150, 600, 3600, 3600, 86_400)  # seconds from the real now
    jobs = [new_job("soon", available_at=real + timedelta(seconds=s)) for s in offsets]
    await storage.enqueue_many(jobs, real)
    assert await _scheduled(storage, "soon", real) == (7, 7)
    for later in (100, 700, 4000, 90_000):  # time passes: jobs come due
        moment = real + timedelta(seconds=later)
        kept, listed = await _scheduled(storage, "soon", moment)
        assert kept == listed, later
    assert await storage.cancel(jobs[5].id) == "deleted"  # due in an hour
    assert await _scheduled(storage, "soon", real) == (6, 6)

    # A test clock years ahead (every due minute is ahead of the database's clock).
    spread = [new_job("ahead", available_at=at(60 * m)) for m in range(0, 30)]
    await storage.enqueue_many(spread, T0)
    assert await _scheduled(storage, "ahead", T0) == (29, 29)
    leases = await reserve(storage, ["ahead"], max_jobs=5, now=at(60 * 4 + 1))
    assert len(leases) == 5
    assert await _scheduled(storage, "ahead", at(60 * 4 + 1)) == (25, 25)
    retried = await storage.fail(
        leases[0].job.id, leases[0].id, at(250), "x", retry_at(at(60 * 45))
    )
    assert isinstance(retried, Retrying)
    assert await storage.release(leases[1].job.id, leases[1].id, at(250)) is not None
    requeued = await storage.fail(
        leases[2].job.id, leases[2].id, at(400), "expired", retry_at(at(60 * 50)), at(400)
    )
    assert isinstance(requeued, Retrying)
    assert await storage.ack(leases[2].job.id, leases[2].id, at(401)) is not None  # late ack
    requeued = await storage.fail(
        leases[3].job.id, leases[3].id, at(400), "expired", retry_at(at(60 * 55)), at(400)
    )
    assert isinstance(requeued, Retrying)
    late = await storage.fail(leases[3].job.id, leases[3].id, at(402), "late", give_up())
    assert isinstance(late, Buried)  # its worker's own fail, after the expiry
    for moment in (at(250), at(60 * 20), at(60 * 44), at(60 * 46), at(60 * 60)):
        kept, listed = await _scheduled(storage, "ahead", moment)
        assert kept == listed, moment
    # Pruning minutes gone by (by the system clock) loses nothing that is read.
    await storage.prune("due_counts", datetime.now(UTC) + timedelta(minutes=1), 1000)
    kept, listed = await _scheduled(storage, "ahead", at(60 * 20))
    assert kept == listed
    kept, listed = await _scheduled(storage, "soon", real)
    assert kept == listed == 6


async def test_single_job_reserves_in_one_group_go_oldest_first_in_arrival_order(
    storage: Storage,
) -> None:
    """Busy workers each asking one job land in one writer group (PostgreSQL answers them
    with one statement): per name, the n-th request gets the n-th oldest ready job, each
    lease is its own worker's with its own expiry, and a request with no job left gets
    none."""
    for name, count in (("a", 5), ("b", 2)):
        for i in range(count):
            await put(storage, new_job(name, job_id=f"{name}{i}", available_at=at(i)))
    await put(storage, new_job("a", job_id="a-later", available_at=at(100)))
    asks = [("a", 1), ("b", 2), ("a", 3), ("b", 4), ("b", 5), ("a", 6)]
    results = await asyncio.gather(
        *(storage.reserve([name], f"w{n}", 1, at(10), at(10 + n)) for name, n in asks)
    )
    got = [
        [(lease.job.id, lease.job.reserved_by, lease.expires_at) for lease in r] for r in results
    ]
    assert got == [
        [("a0", "w1", at(11))],
        [("b0", "w2", at(12))],
        [("a1", "w3", at(13))],
        [("b1", "w4", at(14))],
        [],  # no b left
        [("a2", "w6", at(16))],
    ]
    assert all(lease.id == f"{lease.job.id}.1" for r in results for lease in r)
    left = await storage.list_pending(pending(state="available", name="a"), at(10))
    assert [job.id for job in left] == ["a3", "a4"]


async def test_names_of_finds_pending_and_finished_jobs(storage: Storage) -> None:
    pending_job = await put(storage, new_job("alpha"))
    acked = await put(storage, new_job("beta"))
    lease = await lease_of(storage, acked.id)
    assert await storage.ack(acked.id, lease.id, at(1)) is not None
    many = [new_job(f"n{i % 3}") for i in range(2500)]  # more ids than one query takes
    await storage.enqueue_many(many, T0)
    ids = [pending_job.id, acked.id, "never-existed", *(job.id for job in many)]
    names = await storage.names_of(ids)
    assert names[pending_job.id] == "alpha" and names[acked.id] == "beta"
    assert "never-existed" not in names
    assert all(names[job.id] == job.name for job in many)
    assert await storage.names_of([]) == {}


async def test_reserved_jobs_list_in_order_by_name_cursor_and_search(storage: Storage) -> None:
    """The reserved listing reads reserved rows only (its own index) yet keeps the same
    order, filters, cursor and bounded search as every other pending listing."""
    for i in range(6):
        name = "a" if i % 2 else "b"
        await put(storage, new_job(name, job_id=f"j{i}", payload=f"p{i}", available_at=at(i)))
    await reserve(storage, ["a", "b"], max_jobs=6, now=at(10))
    for job_id, moment in (("early", at(0.5)), ("late", at(3.5))):  # not reserved
        await put(storage, new_job("a", job_id=job_id, available_at=moment))

    async def ids(query: PendingQuery) -> list[str]:
        return [job.id for job in await storage.list_pending(query, at(20))]

    assert await ids(pending(state="reserved")) == ["j0", "j1", "j2", "j3", "j4", "j5"]
    assert await ids(pending(state="reserved", name="a")) == ["j1", "j3", "j5"]
    after = PendingQuery("reserved", None, 2, (at(1), "j1"))
    assert await ids(after) == ["j2", "j3"]
    named_after = PendingQuery("reserved", "b", 10, (at(0), "j0"))
    assert await ids(named_after) == ["j2", "j4"]
    searched = PendingQuery("reserved", None, 10, None, q="p3")
    assert await ids(searched) == ["j3"]
    bounded = PendingQuery("reserved", None, 10, None, q="p", scan=2)
    assert await ids(bounded) == ["j0", "j1"]
    assert await storage.search_end("pending", bounded, at(20)) == (at(1), "j1")


# -- schedules ----------------------------------------------------------------------------


def a_schedule(schedule_id: str = "s1", *, next_run_at: datetime | None = None) -> Schedule:
    return Schedule(
        schedule_id, "report", "{}", 2, 4, 60_000, None, None, False, True,
        at(0, 7), next_run_at or at(60, 7), None, None, at(0, 7), at(0, 7),
    )  # fmt: skip


def firing(
    expected: datetime, occurrence: datetime, then: datetime | None, skip: bool = False
) -> Firing:
    return Firing("s1", expected, occurrence, False, then, skip, occurrence)


def scheduled_job(occurrence: datetime, job_id: str, catch_up: bool = False) -> NewJob:
    return NewJob(job_id, "report", "{}", 0, occurrence, occurrence, 4, "s1", occurrence, catch_up)


async def test_schedules_are_created_replaced_read_and_deleted(storage: Storage) -> None:
    schedule = a_schedule()
    await storage.put_schedule(schedule, True)
    assert await storage.schedules("s1") == [schedule]
    assert await storage.schedules("nope") == []
    changed = a_schedule(next_run_at=at(999))
    changed.payload, changed.paused, changed.updated_at = "v2", True, at(5)
    await storage.put_schedule(changed, False)  # not retimed: next_run_at stays
    [found] = await storage.schedules()
    assert (found.payload, found.paused, found.updated_at) == ("v2", True, at(5))
    assert found.next_run_at == at(60, 7)
    await storage.put_schedule(changed, True)
    assert (await storage.schedules("s1"))[0].next_run_at == at(999)
    assert await storage.delete_schedule("s1") is True
    assert await storage.delete_schedule("s1") is False
    assert await storage.schedules() == []


async def test_due_schedules_are_the_unpaused_ones_whose_time_has_come(storage: Storage) -> None:
    for schedule_id, moment in (("late", at(30)), ("early", at(10)), ("future", at(100))):
        await storage.put_schedule(a_schedule(schedule_id, next_run_at=moment), True)
    paused = a_schedule("paused", next_run_at=at(1))
    paused.paused = True
    await storage.put_schedule(paused, True)
    due = await storage.due_schedules(at(30), 10)
    assert [s.id for s in due] == ["early", "late"]
    assert [s.id for s in await storage.due_schedules(at(30), 1)] == ["early"]


async def test_a_fired_occurrence_enqueues_one_job_that_keeps_its_schedule(
    storage: Storage,
) -> None:
    await storage.put_schedule(a_schedule(), True)
    job = await storage.fire_schedule(
        firing(at(60, 7), at(60, 7), at(120, 7)), scheduled_job(at(60, 7), "sj1")
    )
    assert isinstance(job, Job) and job.schedule_id == "s1" and job.catch_up is False
    [schedule] = await storage.schedules()
    assert (schedule.next_run_at, schedule.last_run_at) == (at(120, 7), at(60, 7))
    assert schedule.last_job_id == "sj1"
    got = await storage.get("sj1", at(61))
    assert isinstance(got, Job)
    assert (got.schedule_id, got.scheduled_for, got.catch_up) == ("s1", at(60, 7), False)
    # The occurrence again, however the guard is met: refused by the run record.
    again = firing(at(120, 7), at(60, 7), at(180, 7))
    assert await storage.fire_schedule(again, scheduled_job(at(60, 7), "sj2")) == "duplicate"
    assert await storage.get("sj2", at(61)) is None
    # A firing decided from an older read of the schedule changes nothing.
    stale = firing(at(60, 7), at(180, 7), at(240, 7))
    assert await storage.fire_schedule(stale, scheduled_job(at(180, 7), "sj3")) == "stale"
    # The schedule fields travel with the job: lease, release, fail, retry, ack.
    [lease] = await reserve(storage, ["report"], now=at(62))
    assert (lease.job.schedule_id, lease.job.scheduled_for) == ("s1", at(60, 7))
    released = await storage.release("sj1", lease.id, at(63))
    assert released is not None and released.catch_up is False
    [lease] = await reserve(storage, ["report"], now=at(64))
    buried = await storage.fail("sj1", lease.id, at(65), "boom", give_up())
    assert isinstance(buried, Buried) and buried.job.scheduled_for == at(60, 7)
    [dead] = await storage.list_failed(history())
    assert (dead.schedule_id, dead.scheduled_for, dead.catch_up) == ("s1", at(60, 7), False)
    retried = await storage.retry_failed("sj1", at(66))
    assert retried is not None and retried.schedule_id == "s1"
    [lease] = await reserve(storage, ["report"], now=at(67))
    retrying = await storage.fail("sj1", lease.id, at(68), "again", retry_at(at(69)))
    assert isinstance(retrying, Retrying) and retrying.job.schedule_id == "s1"
    [lease] = await reserve(storage, ["report"], now=at(70))
    done = await storage.ack("sj1", lease.id, at(71))
    assert done is not None and (done.schedule_id, done.scheduled_for) == ("s1", at(60, 7))
    [listed] = await storage.list_succeeded(history())
    assert (listed.schedule_id, listed.scheduled_for, listed.catch_up) == ("s1", at(60, 7), False)
    assert await storage.get("sj1", at(72)) == listed


async def test_an_occurrence_is_skipped_while_the_last_job_is_pending(storage: Storage) -> None:
    await storage.put_schedule(a_schedule(), True)
    first = firing(at(60, 7), at(60, 7), at(120, 7), skip=True)
    assert isinstance(await storage.fire_schedule(first, scheduled_job(at(60, 7), "a")), Job)
    second = firing(at(120, 7), at(120, 7), at(180, 7), skip=True)
    assert await storage.fire_schedule(second, scheduled_job(at(120, 7), "b")) == "skipped"
    [schedule] = await storage.schedules()
    assert (schedule.next_run_at, schedule.last_job_id) == (at(180, 7), "a")
    assert await storage.cancel("a") == "deleted"  # gone: the next one runs
    third = firing(at(180, 7), at(180, 7), at(240, 7), skip=True)
    assert isinstance(await storage.fire_schedule(third, scheduled_job(at(180, 7), "c")), Job)
    # Run records are pruned by occurrence time, oldest first.
    assert await storage.prune("schedule_runs", at(150), 10) == 2
    assert await storage.prune("schedule_runs", at(150), 10) == 0
