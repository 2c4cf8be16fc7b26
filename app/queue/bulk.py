"""Bulk retry and delete: by ids (a result per id), or by filter (every job of a state).

A filter action fixes an instant t0 when it starts and walks, along a keyset, only the
jobs that were in that state by t0: it never chases new arrivals, and a job it retried
that fails again (after t0) is never retried twice by the same call. Each step is one
transaction of up to STEP jobs; a call stops after MAX_PER_CALL and says `more`.
Deletes are guarded in SQL: a job leased in the meantime is skipped, never deleted.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from app.queue.clock import Clock
from app.queue.errors import Conflict, NotFound, QueueError
from app.queue.events import EventHub
from app.queue.models import Job, could_exist
from app.queue.notifier import Notifier
from app.queue.ports import BulkState, DeleteScope, Storage, WalkQuery

STEP = 1000  # jobs per transaction: bounds how long one step keeps other writes waiting
MAX_PER_CALL = 10_000
Action = Literal["retry", "delete"]
SCOPE: dict[BulkState, DeleteScope] = {
    "available": "pending",
    "scheduled": "pending",
    "succeeded": "succeeded",
    "failed": "failed",
}


@dataclass(slots=True, frozen=True)
class BulkOutcome:
    done: int  # retried or deleted
    skipped: int  # gone or changed since the walk saw them (e.g. leased meanwhile)
    more: bool  # the cap was reached: call again for the rest


class BulkActions:
    def __init__(self, storage: Storage, notifier: Notifier, clock: Clock, hub: EventHub) -> None:
        self.storage = storage
        self.notifier = notifier
        self.clock = clock
        self.hub = hub

    async def retry_ids(self, job_ids: Sequence[str]) -> list[Job | QueueError]:
        """Each failed job back in the queue; a refusal per id that is not failed."""
        known = [i for i in job_ids if could_exist(i)]
        retried = dict(
            zip(known, await self.storage.retry_failed_many(known, self.clock.now()), strict=True)
        )
        self._wake([job for job in retried.values() if job is not None])
        results: list[Job | QueueError] = []
        for job_id in job_ids:
            job = retried.get(job_id)
            results.append(job if job is not None else await self._not_failed(job_id))
        return results

    async def delete_ids(self, job_ids: Sequence[str]) -> list[QueueError | None]:
        """Each job deleted (pending unreserved or finished); a refusal per id otherwise."""
        known = [i for i in job_ids if could_exist(i)]
        names = await self.storage.names_of(known)
        outcome = dict(
            zip(known, await self.storage.delete_many([(i, "any") for i in known]), strict=True)
        )
        results: list[QueueError | None] = []
        for job_id in job_ids:
            result = outcome.get(job_id, "missing")
            if result == "deleted":
                results.append(None)
                self._deleted([job_id], names)
            elif result == "reserved":
                results.append(Conflict(f"job {job_id} is reserved by a worker", "reserved"))
            else:
                results.append(NotFound(f"job {job_id!r} not found"))
        return results

    async def by_filter(self, action: Action, state: BulkState, name: str | None) -> BulkOutcome:
        t0 = self.clock.now()
        after = None
        done = skipped = 0
        while done + skipped < MAX_PER_CALL:
            want = min(STEP, MAX_PER_CALL - done - skipped)
            page = await self.storage.walk(WalkQuery(state, name, t0, want, after))
            if not page:
                return BulkOutcome(done, skipped, more=False)
            ids = [job_id for _, job_id in page]
            changed = await self._apply(action, state, ids)
            done, skipped = done + changed, skipped + len(ids) - changed
            after = page[-1]
            if len(page) < want:
                return BulkOutcome(done, skipped, more=False)
        rest = await self.storage.walk(WalkQuery(state, name, t0, 1, after))
        return BulkOutcome(done, skipped, more=bool(rest))

    async def _apply(self, action: Action, state: BulkState, ids: list[str]) -> int:
        if action == "retry":
            jobs = [j for j in await self.storage.retry_failed_many(ids, self.clock.now()) if j]
            self._wake(jobs)
            return len(jobs)
        names = await self.storage.names_of(ids)
        results = await self.storage.delete_many([(i, SCOPE[state]) for i in ids])
        deleted = [i for i, result in zip(ids, results, strict=True) if result == "deleted"]
        self._deleted(deleted, names)
        return results.count("deleted")

    def _wake(self, jobs: list[Job]) -> None:
        for name, count in Counter(job.name for job in jobs).items():
            self.notifier.notify(name, count)
        now = self.clock.now()
        for job in jobs:
            self.hub.publish(job.id, job.name, "retried", job.state, now)

    def _deleted(self, job_ids: Sequence[str], names: dict[str, str]) -> None:
        """Delete events carry the name, read before the delete (see `Storage.names_of`)."""
        now = self.clock.now()
        for job_id in job_ids:
            self.hub.publish(job_id, names.get(job_id, ""), "deleted", "deleted", now)

    async def _not_failed(self, job_id: str) -> QueueError:
        job = await self.storage.get(job_id, self.clock.now()) if could_exist(job_id) else None
        if job is None:
            return NotFound(f"job {job_id!r} not found")
        return Conflict(
            f"job {job_id} is {job.state}, not failed; only failed jobs retry", "not_failed"
        )
