"""Schedules as the operator manages them, and the scheduler tick that every replica runs.

The tick reads the due schedules, decides per schedule which occurrence to enqueue
(`schedules.plan`), and hands each to the storage's writer, which inserts the run record
and the job in one transaction under the unique key (schedule id, occurrence): however
many replicas tick at once, and across restarts, each occurrence is enqueued at most once.
A schedule's job is announced, counted and published like any enqueued job.
"""

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from app.queue.errors import NotFound
from app.queue.models import Job, NewJob
from app.queue.ports import FireResult
from app.queue.schedules import Firing, Schedule, next_after, plan

if TYPE_CHECKING:
    from app.queue.service import QueueService


def new_job_id() -> str:
    from app.queue.service import new_job_id as new_id  # the service imports this module

    return new_id()


DUE_BATCH = 100  # schedules fired per read of the due ones


@dataclass(slots=True, frozen=True)
class ScheduleSpec:
    """A schedule as an operator PUTs it (validated by the API)."""

    name: str
    payload: str
    max_retries: int
    priority: int
    interval_ms: int | None
    cron: str | None
    timezone: str | None
    paused: bool
    skip_if_running: bool


class Scheduler:
    def __init__(self, service: "QueueService") -> None:
        self.service = service
        self.storage = service.storage

    async def put(self, schedule_id: str, spec: ScheduleSpec) -> tuple[Schedule, bool]:
        """Create or update; True if created. A change of timing (interval, cron or time
        zone) re-anchors it now; any other change keeps its rhythm and its next run. A
        resume goes on from the next occurrence after now (nothing missed while paused
        is caught up)."""
        self.service.check_size(spec.payload, "payload")
        now = self.service.clock.now()
        found = await self.storage.schedules(schedule_id)
        old = found[0] if found else None
        timing = (spec.interval_ms, spec.cron, spec.timezone)
        retimed = old is None or old.timing() != timing or (old.paused and not spec.paused)
        schedule = Schedule(
            schedule_id, spec.name, spec.payload, spec.max_retries, spec.priority,
            spec.interval_ms, spec.cron, spec.timezone, spec.paused, spec.skip_if_running,
            now if old is None or old.timing() != timing else old.anchor_at,
            None, None, None, now if old is None else old.created_at, now,
        )  # fmt: skip
        if retimed:
            schedule.next_run_at = next_after(schedule, now)
        await self.storage.put_schedule(schedule, retimed)
        return await self.get(schedule_id), old is None

    async def get(self, schedule_id: str) -> Schedule:
        found = await self.storage.schedules(schedule_id)
        if not found:
            raise NotFound(f"schedule {schedule_id!r} not found")
        return found[0]

    async def list(self) -> list[Schedule]:
        return await self.storage.schedules()

    async def delete(self, schedule_id: str) -> None:
        """Its jobs already enqueued stay."""
        if not await self.storage.delete_schedule(schedule_id):
            raise NotFound(f"schedule {schedule_id!r} not found")

    async def tick(self) -> int:
        """Enqueue what has come due; the number of jobs enqueued."""
        fired = 0
        while True:
            now = self.service.clock.now()
            due = await self.storage.due_schedules(now, DUE_BATCH)
            results = await asyncio.gather(*(self._fire(schedule, now) for schedule in due))
            fired += sum(1 for result in results if isinstance(result, Job))
            # Another batch only if this one moved schedules on: one changed meanwhile
            # ("stale") is read again at the next tick, never in a loop here.
            if len(due) < DUE_BATCH or all(result == "stale" for result in results):
                return fired

    async def _fire(self, schedule: Schedule, now: datetime) -> FireResult:
        decided = plan(schedule, now)
        if decided is None or schedule.next_run_at is None:
            return "stale"
        firing = Firing(
            schedule.id,
            schedule.next_run_at,
            decided.scheduled_for,
            decided.catch_up,
            decided.next_run_at,
            schedule.skip_if_running,
            now,
        )
        job = NewJob(
            new_job_id(), schedule.name, schedule.payload, schedule.max_retries,
            now, now, schedule.priority, schedule.id, decided.scheduled_for, decided.catch_up,
        )  # fmt: skip
        result = await self.storage.fire_schedule(firing, job)
        if isinstance(result, Job):
            self.service.record_enqueued(result, now)
        return result
