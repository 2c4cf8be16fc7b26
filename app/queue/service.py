"""The job lifecycle, written once.

    enqueue -> scheduled -> (available_at reached) -> available -> lease -> reserved
    reserved -> ack -> succeeded
    reserved -> fail or lease expired, retries left -> pending again after a backoff
    reserved -> fail or lease expired, no retries left -> failed
    reserved -> release -> available (the attempt is not counted)
    failed -> retry -> available, attempts 0

`attempts` counts runs started (it grows when a job is leased), so a job runs at most
1 + max_retries times. Every change to a reserved job names its lease; the storage applies
it only while the job still holds that lease, and this module explains a refusal.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, Literal, TypeVar

from app.queue.backoff import backoff_ms
from app.queue.bulk import BulkActions
from app.queue.clock import Clock
from app.queue.cursor import decode_cursor, encode_cursor
from app.queue.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QueueError,
    StorageUnavailable,
)
from app.queue.events import EventHub
from app.queue.models import (
    AnyJob,
    Enqueued,
    ExpiredLease,
    FailedJob,
    FailOutcome,
    IdempotencyKey,
    Job,
    Lease,
    NewJob,
    PendingState,
    QueueChange,
    QueueSettings,
    Retrying,
    SucceededJob,
    could_exist,
    parse_lease_id,
)
from app.queue.notifier import Notifier, Waiter
from app.queue.observer import NoObserver, Observer, Reason
from app.queue.ports import (
    FailItem,
    FailureGroup,
    Finished,
    HistoryQuery,
    NameCounts,
    PendingQuery,
    PruneKind,
    Storage,
)
from app.queue.scheduler import Scheduler

SEARCH_SCAN = 10_000  # rows a search (`q=`) reads per page at most
GROUP_SCAN = 10_000  # failed jobs GET /jobs/failed/groups reads, newest first
log = logging.getLogger("bgjobs.queue")
events = logging.getLogger("bgjobs.jobs")  # lifecycle events, one line each

COUNTS_TTL_S = 1.0  # job counts are read at most once a second, however many scrapers
FINISHED_COUNTS_HOURS = 25  # per-minute finished counts kept: /stats looks back 24 h
SCHEDULE_RUNS_HOURS = 48  # run records kept (a schedule's next run is always after them)


@dataclass(slots=True, frozen=True)
class Limits:
    max_payload_bytes: int = 1024 * 1024
    retry_base_ms: int = 1000
    retry_max_ms: int = 3_600_000
    max_waiting_polls: int = 1000
    max_event_streams: int = 100
    max_response_bytes: int = 8 * 1024 * 1024
    retain_succeeded_hours: int = 7 * 24  # 0: keep forever
    retain_failed_hours: int = 30 * 24
    idempotency_window_hours: int = 24


T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True, frozen=True)
class Page(Generic[T]):
    """One page of a list and the cursor of the next, None on the last page."""

    items: list[T]
    next_cursor: str | None


def _page(items: list[T], limit: int, key: Callable[[T], str]) -> Page[T]:
    """Storage is asked for limit + 1 rows: the extra one only tells that a next page exists."""
    if len(items) <= limit:
        return Page(items, None)
    items = items[:limit]
    return Page(items, key(items[-1]))


@dataclass(slots=True, frozen=True)
class NameStats:
    """One name's (or all names') jobs by state, oldest wait, and recent finishes."""

    name: str | None
    counts: NameCounts
    oldest_available_age_ms: int | None
    last_minute: Finished
    last_hour: Finished


@dataclass(slots=True, frozen=True)
class Stats:
    totals: NameStats
    names: list[NameStats]
    series: list[Finished] | None  # per minute, oldest first, when asked for


def _add(a: Finished, b: Finished) -> Finished:
    return Finished(a.key, a.succeeded + b.succeeded, a.failed + b.failed)


def _sum_counts(name: str, rows: Sequence[NameCounts]) -> NameCounts:
    oldest = [row.oldest_available_at for row in rows if row.oldest_available_at is not None]
    return NameCounts(
        name,
        sum(row.available for row in rows),
        sum(row.scheduled for row in rows),
        sum(row.reserved for row in rows),
        sum(row.succeeded for row in rows),
        sum(row.failed for row in rows),
        min(oldest) if oldest else None,
    )


@dataclass(slots=True, frozen=True)
class QueueInfo:
    """A job name as a queue: its settings and its jobs by state."""

    name: str
    settings: QueueSettings
    counts: NameCounts


@dataclass(slots=True)
class JobSpec:
    """One job as a producer asked for it (bg_jobs' JobEnqueueRequest)."""

    name: str
    payload: str
    max_retries: int
    available_at: datetime | None = None
    available_in_ms: int | None = None
    priority: int = 0  # 0-9, lower runs first


def new_job_ids(count: int) -> list[str]:
    """Time-ordered (48-bit milliseconds, then 80 random bits) so inserts land together;
    one read of the system's randomness for the whole batch."""
    millis = f"{time.time_ns() // 1_000_000:012x}"
    random = os.urandom(10 * count).hex()
    return [millis + random[20 * i : 20 * i + 20] for i in range(count)]


def new_job_id() -> str:
    return new_job_ids(1)[0]


async def repeat(interval_s: float, task: Callable[[], Awaitable[object]], what: str) -> None:
    """Run a maintenance task forever; a failure is logged and retried at the next tick."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await task()
        except StorageUnavailable as exc:  # an outage: say so once a tick, no traceback
            log.warning("%s failed: %s", what, exc.detail)
        except Exception:
            log.exception("%s failed", what)


def _or_raise(result: R | QueueError) -> R:
    if isinstance(result, QueueError):
        raise result
    return result


def _log_expiry(lease: ExpiredLease, outcome: FailOutcome) -> None:
    then = "retried later" if isinstance(outcome, Retrying) else "failed"
    events.warning(
        "job %s (%s): lease expired without ack or fail; %s",
        lease.job_id,
        lease.name,
        then,
        extra={"event": "lease_expired", "job_id": lease.job_id, "job_name": lease.name},
    )


class Client:
    """A long poll's client, as far as the poll cares: whether it has hung up. Watched
    only once the poll sleeps, so a poll that answers at once pays nothing for it; its
    hang-up ends the sleep."""

    def __init__(self, hangup: Callable[[], Awaitable[object]] | None) -> None:
        self._hangup = hangup
        self._watch: asyncio.Future[object] | None = None

    @property
    def gone(self) -> bool:
        watch = self._watch
        return watch is not None and watch.done() and not watch.cancelled()

    def watch(self, waiter: Waiter) -> None:
        if self._hangup is not None and self._watch is None:
            self._watch = asyncio.ensure_future(self._hangup())
            self._watch.add_done_callback(lambda watch: self._left(watch, waiter))

    @staticmethod
    def _left(watch: "asyncio.Future[object]", waiter: Waiter) -> None:
        if not watch.cancelled():
            if watch.exception() is not None:  # a broken link is a client gone, too
                log.debug("watching a long poll's client failed: %r", watch.exception())
            waiter.hang_up()

    def forget(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class QueueService:
    def __init__(
        self,
        storage: Storage,
        notifier: Notifier,
        clock: Clock,
        limits: Limits,
        rand: Callable[[], float] = random.random,
        observer: Observer | None = None,
    ) -> None:
        self.storage = storage
        self.notifier = notifier
        self.clock = clock
        self.limits = limits
        self._rand = rand
        self.observer: Observer = observer or NoObserver()
        self._waiting = 0
        self.stopping = False
        self.hub = EventHub(limits.max_event_streams)
        self.bulk = BulkActions(storage, notifier, clock, self.hub)
        self._counts: tuple[float, list[NameCounts]] | None = None
        self._counts_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.schedules = Scheduler(self)

    @property
    def waiting(self) -> int:
        """Long polls parked right now."""
        return self._waiting

    # -- producers ----------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        payload: str,
        max_retries: int,
        available_at: datetime | None = None,
        available_in_ms: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> tuple[AnyJob, bool]:
        """bg_jobs' JobAvailability: now (both None), at a time, or in N milliseconds.

        Returns the job and whether this call created it: with an idempotency key seen
        within the window, the first request's job comes back instead of a new one.
        """
        spec = JobSpec(name, payload, max_retries, available_at, available_in_ms, priority)
        self.check_size(spec.payload, "payload")
        now = self.clock.now()
        new = self._new_job(spec, now, new_job_id())
        if idempotency_key is None:
            waiter = self.notifier.hand_over(spec.name) if new.available_at <= now else None
            if waiter is not None:
                return await self._hand_over(new, now, waiter), True
            job = await self.storage.enqueue(new, now)
        else:
            key = self._key(idempotency_key, [spec], now)
            done = await self.storage.enqueue_once(new, now, key)
            if not done.created:
                return self._replayed(done, idempotency_key), False
            assert isinstance(done.job, Job)
            job = done.job
        self.record_enqueued(job, now)
        return job, True

    async def _hand_over(self, new: NewJob, now: datetime, waiter: Waiter) -> Job:
        """Enqueue a job already leased to a poll that sleeps waiting for one of its name:
        one write, and both answers leave at its commit, where enqueue-then-reserve
        costs a second write and a wake-up in between. The producer gets the job as it
        enqueued it; the events say it was enqueued, then leased. The write goes on if
        the producer hangs up, so the poll always gets what was committed for it."""
        handed = waiter.handed
        assert handed is not None
        write = asyncio.ensure_future(self._write_handed(new, now, waiter.claim, handed))
        waiter.wake()  # after the write is scheduled: the write runs first
        await asyncio.shield(write)
        return Job(
            new.id, new.name, new.payload, 0, new.max_retries, new.created_at, new.available_at,
            None, None, "available", None, new.priority,
        )  # fmt: skip

    async def _write_handed(
        self,
        new: NewJob,
        now: datetime,
        claim: tuple[str, int],
        handed: "asyncio.Future[list[Lease]]",
    ) -> None:
        """The hand-off's write, and the poll's answer settled as soon as it commits: in
        this task, before the producer's resumes, so the lease leaves first (pickup is the
        worker's latency; the producer's 201 can follow)."""
        worker_id, lease_ms = claim
        expires = now + timedelta(milliseconds=lease_ms)
        try:
            lease = await self.storage.enqueue_leased(new, now, worker_id, expires)
        except BaseException:
            handed.set_result([])  # nothing was written: the poll sleeps on
            raise
        handed.set_result([] if lease is None else [lease])
        self.observer.enqueued(new.name, 1)
        self.hub.publish(new.id, new.name, "enqueued", "available", now)
        if lease is None:  # paused or limited: only enqueued; polls look for it
            self.notifier.notify(new.name, 1)
            return
        self.observer.leased([lease], now)
        self.hub.publish(new.id, new.name, "leased", "reserved", now)

    async def enqueue_batch(
        self, specs: Sequence[JobSpec], idempotency_key: str | None = None
    ) -> tuple[list[tuple[str, AnyJob | None]], bool]:
        """All of them in one transaction, or none; (id, job) in request order. With an
        idempotency key seen within the window, the first batch's jobs come back in their
        current state (None where deleted since)."""
        for index, spec in enumerate(specs):
            self.check_size(spec.payload, f"jobs.{index}.payload")
        now = self.clock.now()
        news = [
            self._new_job(spec, now, job_id)
            for spec, job_id in zip(specs, new_job_ids(len(specs)), strict=True)
        ]
        if idempotency_key is None:
            jobs = await self.storage.enqueue_many(news, now)
            self._announce_all(news, now)
            return [(job.id, job) for job in jobs], True
        done = await self.storage.enqueue_many_once(
            news, now, self._key(idempotency_key, specs, now)
        )
        if not done.same_request:
            raise self._reused(idempotency_key)
        if done.created:
            self._announce_all(news, now)
        return list(zip(done.ids, done.jobs, strict=True)), done.created

    def record_enqueued(self, job: Job, now: datetime) -> None:
        """A job just enqueued, by a producer or by a schedule: announced to waiting
        polls, counted and published."""
        self._announce(job.name, job.available_at, now)
        self.observer.enqueued(job.name, 1)
        self.hub.publish(job.id, job.name, "enqueued", job.state, now)

    def check_size(self, payload: str, where: str) -> None:
        size = len(payload.encode())
        if size > self.limits.max_payload_bytes:
            raise PayloadTooLarge(
                f"{where} is {size} bytes of UTF-8; the limit is "
                f"{self.limits.max_payload_bytes} bytes"
            )

    @staticmethod
    def _new_job(spec: JobSpec, now: datetime, job_id: str) -> NewJob:
        at = spec.available_at or (
            now + timedelta(milliseconds=spec.available_in_ms) if spec.available_in_ms else now
        )
        return NewJob(job_id, spec.name, spec.payload, spec.max_retries, now, at, spec.priority)

    def _key(self, key: str, specs: Sequence[JobSpec], now: datetime) -> IdempotencyKey:
        """The key, a fingerprint of the request it was first used for, and its window."""
        request = [
            [
                s.name,
                s.payload,
                s.available_at and s.available_at.isoformat(),
                s.available_in_ms,
                s.max_retries,
            ]
            + ([s.priority] if s.priority else [])
            for s in specs
        ]  # fmt: skip  (priority only when set: keys from before it keep their fingerprint)
        body = json.dumps(request[0] if len(request) == 1 else request)
        return IdempotencyKey(
            key,
            hashlib.sha256(body.encode()).hexdigest(),
            now - timedelta(hours=self.limits.idempotency_window_hours),
        )

    def _announce_all(self, jobs: Sequence[NewJob], now: datetime) -> None:
        """Per name: wake one waiter per ready job, and a timer at the earliest later one."""
        ready: dict[str, int] = {}
        later: dict[str, datetime] = {}
        for job in jobs:
            if job.available_at <= now:
                ready[job.name] = ready.get(job.name, 0) + 1
            elif job.name not in later or job.available_at < later[job.name]:
                later[job.name] = job.available_at
        for name, count in ready.items():
            self.notifier.notify(name, count)
        for name, due in later.items():
            self.notifier.notify_at(name, due)
        for name, count in Counter(job.name for job in jobs).items():
            self.observer.enqueued(name, count)
        if self.hub.wanted:
            for job in jobs:
                state = "available" if job.available_at <= now else "scheduled"
                self.hub.publish(job.id, job.name, "enqueued", state, now)

    @staticmethod
    def _reused(key: str) -> IdempotencyKeyReused:
        return IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was already used for a different request; "
            "use a new key for a new job"
        )

    @staticmethod
    def _replayed(done: Enqueued, key: str) -> AnyJob:
        if not done.same_request:
            raise QueueService._reused(key)
        if done.job is None:
            raise Conflict(
                f"the job first enqueued with Idempotency-Key {key!r} has since been deleted"
            )
        return done.job

    def job_ready_elsewhere(self, name: str, available_at: datetime) -> None:
        """Another replica made jobs of `name` ready (one notification per transaction, so
        it does not say how many): wake one waiter here, who passes the wake on if it
        finds work. It may also say that what held the name ended there (a lease of a
        limited name, a resume, a changed limit)."""
        self.notifier.release(name)
        if available_at <= self.clock.now():
            self.notifier.notify(name, 1, chained=True)
        else:
            self.notifier.notify_at(name, available_at)

    def _announce(self, name: str, available_at: datetime, now: datetime) -> None:
        if available_at <= now:
            self.notifier.notify(name, 1)
        else:
            self.notifier.notify_at(name, available_at)

    # -- queues: settings per job name ---------------------------------------------------

    async def configure_queue(self, name: str, change: QueueChange) -> None:
        """Paused, no job of `name` is leased (enqueues go on); a concurrency limit caps
        its live leases, a rate limit paces them; all on every replica. A change wakes
        its waiting polls to look again, here and (through the database) elsewhere."""
        await self.storage.configure_queue(name, change, self.clock.now())
        self.notifier.release(name)
        self.notifier.notify(name, 1, chained=True)  # each finder wakes the next

    async def queues(self, name: str | None = None) -> list[QueueInfo]:
        """One entry per name with jobs or settings, by name."""
        counts = {c.name: c for c in await self.storage.job_counts(self.clock.now(), name)}
        settings = await self.storage.queue_settings(name)
        names = sorted(set(counts) | set(settings))
        empty = NameCounts("", 0, 0, 0, 0, 0, None)
        return [QueueInfo(n, settings.get(n, QueueSettings()), counts.get(n, empty)) for n in names]

    # -- workers ------------------------------------------------------------------------

    async def lease(
        self,
        worker_id: str,
        names: Sequence[str],
        max_jobs: int,
        wait_ms: int,
        lease_ms: int,
        hangup: Callable[[], Awaitable[object]] | None = None,
    ) -> list[Lease]:
        """Reserve now, or wait up to `wait_ms` for a job to be enqueued or come due.

        A waiting poll touches the database only when woken: while the notifier knows
        that none of its names has a ready job, it does not look at all (see notifier).
        `hangup` returns when the client hangs up: a poll whose client left stops waiting
        at once (it would hold a place among the bounded polls until `wait_ms`), and jobs
        reserved for it are given back instead of waiting for their lease to expire.
        """
        deadline = asyncio.get_running_loop().time() + wait_ms / 1000
        client = Client(hangup)
        with self.notifier.waiter(dict.fromkeys(names)) as waiter:
            waiter.claim = (worker_id, lease_ms)  # lets an enqueue hand its job over
            try:
                return await self._poll(waiter, max_jobs, lease_ms, deadline, client)
            finally:
                client.forget()
                if waiter.handed is not None:  # cancelled before it took its job
                    waiter.handed.add_done_callback(self._give_back_later)

    async def _poll(
        self,
        waiter: Waiter,
        max_jobs: int,
        lease_ms: int,
        deadline: float,
        client: Client,
    ) -> list[Lease]:
        """Look, sleep until woken or handed a job, look again: until leases or the end."""
        loop = asyncio.get_running_loop()
        notifier, names, (worker_id, _) = self.notifier, waiter.names, waiter.claim
        woken = False
        handed: list[Lease] = []
        while True:
            if client.gone and not handed:  # left while the poll slept: no reserve for it
                return []
            chained = waiter.chained
            waiter.arm()
            leases = handed
            if not leases and (woken or notifier.may_be_ready(names)):
                leases = await self._reserve(names, worker_id, max_jobs, lease_ms)
                if leases and chained:  # woken without a count: there may be more
                    notifier.chain(dict.fromkeys(lease.job.name for lease in leases))
            if client.gone and not handed:  # left during the reserve
                await self._give_back(leases)
                return []
            remaining = deadline - loop.time()
            if leases or remaining <= 0 or self.stopping:
                return leases
            client.watch(waiter)
            notifier.parked(waiter)
            woken = await self._wait(waiter, remaining)
            if waiter.handed is not None:
                taken = await self._handed_unless_gone(waiter, client)
                if taken is None:
                    return []
                handed = taken
                woken = False  # woken for a hand-off, not by news: if it failed, sleep on

    async def _reserve(
        self, names: tuple[str, ...], worker_id: str, max_jobs: int, lease_ms: int
    ) -> list[Lease]:
        marks = self.notifier.marks(names)
        releases = self.notifier.releases(names)
        now = self.clock.now()
        expires = now + timedelta(milliseconds=lease_ms)
        leases = await self.storage.reserve(
            names, worker_id, max_jobs, now, expires, self.limits.max_response_bytes
        )
        if not leases:
            self.notifier.found_empty(names, marks)
            await self._find_holds(names, now, releases)
        else:
            self.observer.leased(leases, now)
            for lease in leases:
                self.hub.publish(lease.job.id, lease.job.name, "leased", "reserved", now)
        return leases

    async def _find_holds(
        self, names: tuple[str, ...], now: datetime, releases: tuple[int, ...]
    ) -> None:
        """After an empty reserve: which names are paused or at a limit, so that news of
        their jobs does not wake polls that could not lease them (a read; if it fails,
        polls just wake more often)."""
        try:
            holds = await self.storage.queue_holds(names, now)
        except StorageUnavailable:
            return
        for name, mark in zip(names, releases, strict=True):
            hold = holds.get(name)
            if hold is not None:
                self.notifier.hold(name, hold.until, mark)
            else:
                self.notifier.unheld(name, mark)

    def _freed(self, name: str) -> None:
        """A lease of `name` ended: if the name was at its limit, one poll may take its
        place."""
        self.notifier.release(name)

    async def _handed_unless_gone(self, waiter: Waiter, client: Client) -> list[Lease] | None:
        """The job an enqueue handed to this poll while it slept, once committed (none if
        that enqueue failed); None if its client left meanwhile (the job is given back)."""
        assert waiter.handed is not None
        handed: list[Lease] = await asyncio.shield(waiter.handed)
        waiter.handed = None
        if client.gone:
            await self._give_back(handed)
            return None
        return handed

    def _give_back_later(self, future: "asyncio.Future[list[Lease]]") -> None:
        """A poll that ended before taking the job handed to it gives it back."""
        if not future.cancelled() and future.exception() is None and future.result():
            task = asyncio.get_running_loop().create_task(self._give_back(future.result()))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _wait(self, waiter: Waiter, seconds: float) -> bool:
        """Sleep in a long poll; True if woken. Waiters are bounded: past the cap a new poll
        is refused, while one already admitted keeps its place."""
        if not waiter.admitted and self._waiting >= self.limits.max_waiting_polls:
            raise Overloaded(
                f"{self._waiting} long polls are already waiting (the limit); retry shortly"
            )
        waiter.admitted = True
        self._waiting += 1
        try:
            return await waiter.wait(seconds)
        finally:
            self._waiting -= 1

    async def _give_back(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            released = await self.storage.release(lease.job.id, lease.id, self.clock.now())
            if released is not None:
                self._freed(released.name)
                self.notifier.notify(released.name, 1)

    def stop_waiting(self) -> None:
        """Shutting down: open long polls answer now (with no jobs), new ones do not wait,
        and event streams end."""
        self.stopping = True
        self.notifier.wake_all()
        self.hub.close()

    async def ack(self, lease_id: str) -> SucceededJob:
        return _or_raise((await self.ack_many([lease_id]))[0])

    async def ack_many(self, lease_ids: Sequence[str]) -> list[SucceededJob | QueueError]:
        """Each item by the single-ack rules, all in one transaction: the job or why not."""
        parsed = self._parse(lease_ids)
        held = [(job_id, lease_id) for lease_id, job_id in parsed if job_id is not None]
        now = self.clock.now()
        acked = await self.storage.ack_many(held, now) if held else []
        for job in acked:
            if job is not None:
                self._freed(job.name)
                self.observer.finished(job.name, "succeeded", "ok", job.leased_at, now)
                self.hub.publish(job.id, job.name, "succeeded", "succeeded", now)
        done = iter(acked)
        return [
            await self._result(lease_id, job_id, "ack", None if job_id is None else next(done))
            for lease_id, job_id in parsed
        ]

    async def fail(self, lease_id: str, exception: str, retry_in_ms: int | None) -> FailOutcome:
        outcome = (await self.fail_many([(lease_id, exception, retry_in_ms)]))[0]
        if isinstance(outcome, QueueError):
            raise outcome
        return outcome

    async def fail_many(
        self, items: Sequence[tuple[str, str, int | None]]
    ) -> list[FailOutcome | QueueError]:
        """(lease id, exception, retry_in_ms) each by the single-fail rules, in one
        transaction: the outcome or why not."""
        now = self.clock.now()
        parsed = self._parse([lease_id for lease_id, _, _ in items])
        held = [
            FailItem(job_id, lease_id, exception, self._retry_decision(now, retry_in_ms))
            for (lease_id, job_id), (_, exception, retry_in_ms) in zip(parsed, items, strict=True)
            if job_id is not None
        ]
        done = iter(await self.storage.fail_many(held, now) if held else [])
        results: list[FailOutcome | QueueError] = []
        for lease_id, job_id in parsed:
            outcome = None if job_id is None else next(done)
            if outcome is not None:
                self._after_fail(outcome, now, "error")
            results.append(await self._result(lease_id, job_id, "fail", outcome))
        return results

    def _retry_decision(
        self, now: datetime, retry_in_ms: int | None
    ) -> Callable[[int, int], datetime | None]:
        """Retry while runs started (`attempts`) have not used up 1 + max_retries."""

        def decide(attempts: int, max_retries: int) -> datetime | None:
            if attempts > max_retries:
                return None
            delay = retry_in_ms
            if delay is None:
                limits = self.limits
                delay = backoff_ms(attempts, limits.retry_base_ms, limits.retry_max_ms, self._rand)
            return now + timedelta(milliseconds=delay)

        return decide

    def _after_fail(self, outcome: FailOutcome, now: datetime, reason: Reason) -> None:
        job = outcome.job
        self._freed(job.name)
        change = "expired" if reason == "expired" else None
        if isinstance(outcome, Retrying):
            self._announce(job.name, job.available_at, now)
            self.observer.finished(job.name, "retrying", reason, outcome.leased_at, now)
            self.hub.publish(job.id, job.name, change or "retrying", outcome.job.state, now)
            return
        self.observer.finished(job.name, "failed", reason, outcome.leased_at, now)
        self.hub.publish(job.id, job.name, change or "failed", "failed", now)
        events.warning(
            "job %s (%s) moved to failed after %d attempts",
            job.id,
            job.name,
            job.attempts,
            extra={"event": "moved_to_failed", "job_id": job.id, "job_name": job.name},
        )

    async def extend(self, lease_id: str, lease_ms: int) -> datetime:
        """A heartbeat: the lease now ends `lease_ms` from now."""
        return _or_raise((await self.extend_many([lease_id], lease_ms))[0])

    async def extend_many(
        self, lease_ids: Sequence[str], lease_ms: int
    ) -> list[datetime | QueueError]:
        """Heartbeats for a worker holding many leases: each ends `lease_ms` from now."""
        expires = self.clock.now() + timedelta(milliseconds=lease_ms)
        parsed = self._parse(lease_ids)
        held = [(job_id, lease_id) for lease_id, job_id in parsed if job_id is not None]
        done = iter(await self.storage.extend_many(held, expires) if held else [])
        return [
            await self._result(
                lease_id, job_id, "extend", expires if job_id is not None and next(done) else None
            )
            for lease_id, job_id in parsed
        ]

    async def release(self, lease_id: str) -> Job:
        """Give a job back untouched, for a worker shutting down gracefully."""
        job_id = self._job_of(lease_id)
        job = await self.storage.release(job_id, lease_id, self.clock.now())
        if job is None:
            raise await self._refusal(lease_id, job_id, "release")
        self._freed(job.name)
        self.notifier.notify(job.name, 1)
        self.hub.publish(job.id, job.name, "released", job.state, self.clock.now())
        return job

    async def reap_expired(self, batch: int = 200) -> int:
        """Fail every lease past its expiry, by the same path as an explicit fail."""
        reaped = 0
        while True:
            now = self.clock.now()
            expired = await self.storage.expired_leases(now, batch)
            for lease in expired:
                exception = (
                    f"lease {lease.lease_id} expired at {lease.expires_at.isoformat()} "
                    f"without ack or fail (held by worker {lease.reserved_by!r})"
                )
                outcome = await self.storage.fail(
                    lease.job_id,
                    lease.lease_id,
                    now,
                    exception,
                    self._retry_decision(now, None),
                    expired_before=now,
                )
                if outcome is not None:
                    reaped += 1
                    _log_expiry(lease, outcome)
                    self._after_fail(outcome, now, "expired")
            if len(expired) < batch:
                return reaped

    async def prune_history(self, batch: int = 1000) -> int:
        """Delete succeeded and failed jobs past their retention, and expired idempotency
        keys, in bounded batches.

        Each batch is its own short transaction and the loop yields between batches, so
        leasing never waits behind a large delete.
        """
        pruned = 0
        now = self.clock.now()
        kinds: tuple[tuple[PruneKind, int], ...] = (
            ("succeeded", self.limits.retain_succeeded_hours),
            ("failed", self.limits.retain_failed_hours),
            ("idempotency_keys", self.limits.idempotency_window_hours),
        )
        for kind, hours in kinds:
            if hours > 0:
                pruned += await self._prune(kind, now - timedelta(hours=hours), batch)
        await self._prune("finished_counts", now - timedelta(hours=FINISHED_COUNTS_HOURS), batch)
        # Run records of occurrences long past guard nothing any more.
        await self._prune("schedule_runs", now - timedelta(hours=SCHEDULE_RUNS_HOURS), batch)
        # Due minutes gone by, by the system clock: the one that decides what is counted.
        await self._prune("due_counts", datetime.now(UTC) - timedelta(minutes=10), batch)
        return pruned

    async def _prune(self, kind: PruneKind, before: datetime, batch: int) -> int:
        pruned = 0
        while True:
            count = await self.storage.prune(kind, before, batch)
            pruned += count
            await asyncio.sleep(0)
            if count < batch:
                return pruned

    def _job_of(self, lease_id: str) -> str:
        parsed = parse_lease_id(lease_id)
        if parsed is None or not could_exist(lease_id):
            raise NotFound(f"lease {lease_id!r} not found")
        return parsed[0]

    @staticmethod
    def _parse(lease_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """Each lease id with its job id, None for an id the server cannot have issued."""
        parsed = []
        for lease_id in lease_ids:
            found = parse_lease_id(lease_id) if could_exist(lease_id) else None
            parsed.append((lease_id, None if found is None else found[0]))
        return parsed

    async def _result(
        self, lease_id: str, job_id: str | None, action: str, done: R | None
    ) -> R | QueueError:
        if done is not None:
            return done
        if job_id is None:
            return NotFound(f"lease {lease_id!r} not found")
        return await self._refusal(lease_id, job_id, action)

    async def _refusal(self, lease_id: str, job_id: str, action: str) -> QueueError:
        """Why a change under `lease_id` was refused: never issued (404) or stale (409,
        with a `code` a client can act on)."""
        parsed = parse_lease_id(lease_id)
        seq = parsed[1] if parsed else 0
        where = await self.storage.lease_position(job_id)
        if where is None or seq > where.lease_seq:
            return NotFound(f"lease {lease_id!r} not found")
        cannot = f"cannot {action} lease {lease_id!r}"
        if where.table != "pending":
            if seq == where.lease_seq:
                finished = await self.storage.get(job_id, self.clock.now())
                return Conflict(
                    f"{cannot}: job {job_id} has already {where.table}, under this lease",
                    "finished_by_this_lease",
                    finished,
                )
            return Conflict(
                f"{cannot}: job {job_id} has already {where.table}, under a later lease",
                "finished_by_another_lease",
            )
        if seq < where.lease_seq:
            return Conflict(f"{cannot}: job {job_id} has been leased again since", "leased_again")
        if where.lease_id is None:
            return Conflict(f"{cannot}: it was released", "released")
        return Conflict(
            f"{cannot}: it expired and job {job_id} was put back in the queue", "expired"
        )

    # -- dashboards and administration --------------------------------------------------

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers."""
        await self.storage.ping()

    async def get(self, job_id: str) -> AnyJob:
        job = await self.storage.get(job_id, self.clock.now()) if could_exist(job_id) else None
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def cancel(self, job_id: str) -> None:
        """Delete a pending job or a finished job's record; a reserved job belongs to its worker."""
        if not could_exist(job_id):
            raise NotFound(f"job {job_id!r} not found")
        names = await self.storage.names_of([job_id])
        result = await self.storage.cancel(job_id)
        if result == "reserved":
            raise Conflict(
                f"job {job_id} is reserved by a worker; wait for its lease to end, then delete it"
            )
        if result == "missing":
            raise NotFound(f"job {job_id!r} not found")
        self.hub.publish(job_id, names.get(job_id, ""), "deleted", "deleted", self.clock.now())

    async def retry(self, job_id: str) -> Job:
        now = self.clock.now()
        job = await self.storage.retry_failed(job_id, now) if could_exist(job_id) else None
        if job is None:
            current = await self.get(job_id)
            raise Conflict(f"job {job_id} is {current.state}, not failed; only failed jobs retry")
        self.notifier.notify(job.name, 1)
        self.hub.publish(job.id, job.name, "retried", job.state, now)
        events.info(
            "job %s (%s) retried from failed",
            job.id,
            job.name,
            extra={"event": "retried_from_failed", "job_id": job.id, "job_name": job.name},
        )
        return job

    async def list_pending(
        self,
        state: PendingState | None,
        name: str | None,
        limit: int,
        cursor: str | None,
        q: str | None = None,
    ) -> Page[Job]:
        after = decode_cursor("pending", cursor) if cursor else None
        query = PendingQuery(state, name, limit + 1, after, q, SEARCH_SCAN)
        now = self.clock.now()
        jobs = await self.storage.list_pending(query, now)
        page = _page(jobs, limit, lambda j: encode_cursor("pending", j.available_at, j.id))
        return await self._searched(page, "pending", query, now)

    async def list_succeeded(
        self, name: str | None, limit: int, cursor: str | None, q: str | None = None
    ) -> Page[SucceededJob]:
        before = decode_cursor("succeeded", cursor) if cursor else None
        query = HistoryQuery(name, limit + 1, before, q, SEARCH_SCAN)
        jobs = await self.storage.list_succeeded(query)
        page = _page(jobs, limit, lambda j: encode_cursor("succeeded", j.succeeded_at, j.id))
        return await self._searched(page, "succeeded", query, self.clock.now())

    async def list_failed(
        self, name: str | None, limit: int, cursor: str | None, q: str | None = None
    ) -> Page[FailedJob]:
        before = decode_cursor("failed", cursor) if cursor else None
        query = HistoryQuery(name, limit + 1, before, q, SEARCH_SCAN)
        jobs = await self.storage.list_failed(query)
        page = _page(jobs, limit, lambda j: encode_cursor("failed", j.failed_at, j.id))
        return await self._searched(page, "failed", query, self.clock.now())

    async def _searched(
        self,
        page: Page[T],
        kind: Literal["pending", "succeeded", "failed"],
        query: PendingQuery | HistoryQuery,
        now: datetime,
    ) -> Page[T]:
        """A search that found less than a page may have stopped at its scan budget: then
        the cursor points past the rows it read, so the next call goes on from there."""
        if query.q is None or page.next_cursor is not None:
            return page
        end = await self.storage.search_end(kind, query, now)
        return Page(page.items, None if end is None else encode_cursor(kind, *end))

    async def failure_groups(self, name: str | None) -> tuple[list[FailureGroup], int]:
        """The newest failed jobs by their exception's first line: "500 of these failed with
        SMTP 550" at a glance. A bounded scan, so it stays cheap at any backlog."""
        return await self.storage.failure_groups(name, GROUP_SCAN)

    # -- counts (for /metrics and /stats) -----------------------------------------------

    async def job_counts(self) -> list[NameCounts]:
        """Jobs per name and state, read at most once a second (concurrent scrapes share a
        read), so any number of scrapers and dashboards cost the database one small read."""
        async with self._counts_lock:
            now = asyncio.get_running_loop().time()
            if self._counts is None or now - self._counts[0] >= COUNTS_TTL_S:
                self._counts = (now, await self.storage.job_counts(self.clock.now()))
            return self._counts[1]

    async def stats(self, name: str | None, series_minutes: int | None) -> Stats:
        """Counts by state, oldest wait and recent finishes, per name and in total; with
        `series_minutes`, finishes per minute over that many minutes (oldest first)."""
        now = self.clock.now()
        counts = [c for c in await self.job_counts() if name is None or c.name == name]
        minute = await self.storage.finished_by_name(_minute_of(now - timedelta(minutes=1)), name)
        hour = await self.storage.finished_by_name(_minute_of(now - timedelta(hours=1)), name)
        names = sorted({c.name for c in counts if _any_jobs(c)} | {str(f.key) for f in hour})
        by_name = {c.name: c for c in counts}
        recent = ({str(f.key): f for f in minute}, {str(f.key): f for f in hour})
        per_name = [self._name_stats(n, by_name.get(n), recent, now) for n in names]
        totals = self._name_stats(None, _sum_counts("", counts), _totals(recent), now)
        series = None
        if series_minutes is not None:
            series = await self._series(name, series_minutes, now)
        return Stats(totals, per_name, series)

    @staticmethod
    def _name_stats(
        name: str | None,
        counts: NameCounts | None,
        recent: tuple[dict[str, Finished], dict[str, Finished]],
        now: datetime,
    ) -> NameStats:
        key = name or ""
        counts = counts or NameCounts(key, 0, 0, 0, 0, 0, None)
        oldest = counts.oldest_available_at
        age = None if oldest is None else max(0, (now - oldest) // timedelta(milliseconds=1))
        none = Finished(key, 0, 0)
        return NameStats(name, counts, age, recent[0].get(key, none), recent[1].get(key, none))

    async def _series(self, name: str | None, minutes: int, now: datetime) -> list[Finished]:
        last = _minute_of(now)
        first = last - timedelta(minutes=minutes - 1)
        found = {f.key: f for f in await self.storage.finished_by_minute(first, name)}
        span = (first + timedelta(minutes=i) for i in range(minutes))
        return [found.get(at, Finished(at, 0, 0)) for at in span]


def _minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _any_jobs(counts: NameCounts) -> bool:
    c = counts
    return any((c.available, c.scheduled, c.reserved, c.succeeded, c.failed))


def _totals(
    recent: tuple[dict[str, Finished], dict[str, Finished]],
) -> tuple[dict[str, Finished], dict[str, Finished]]:
    """Every name's recent finishes added up, under the key of the totals ("")."""
    summed = []
    for per_name in recent:
        total = Finished("", 0, 0)
        for finished in per_name.values():
            total = _add(total, finished)
        summed.append({"": total})
    return summed[0], summed[1]
