"""Recurring schedules: when each occurrence is, and which one a late scheduler enqueues.

Two kinds of timing:

- **Fixed rate**: occurrences at `anchor_at + k * interval_ms` for k = 1, 2, ... The anchor
  is the time of the PUT that last changed the timing, so the first run is one interval
  after it, and a change of payload or priority keeps the rhythm.
- **Cron**: a 5-field expression in an IANA time zone, parsed and iterated by cronsim,
  which follows Debian's cron across daylight-saving changes. A job at a fixed time
  (neither minute nor hour a wildcard) runs once on the day the clocks go back (at the
  first of the two wall times), and on the day they go forward a time in the skipped
  hour runs right after the change (02:30 becomes 03:00). A job with a wildcard minute or
  hour runs by the real clock: `0 * * * *` runs once every real hour, so twice at
  "02:00" when that hour is repeated and not at all at the "02:00" that does not exist.
  Occurrences are turned into UTC instants and must keep increasing, so no instant is
  ever enqueued twice.

After downtime only the latest missed occurrence is enqueued (`catch_up` true), never a
flood; the next one is the first after now.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
# An occurrence enqueued later than this after its time counts as a catch-up.
CATCH_UP_AFTER = timedelta(seconds=60)
# Steps walked forward to find the latest missed occurrence before asking cronsim to walk
# backwards (a long outage under a frequent cron expression).
MAX_WALK = 1000
MIN_INTERVAL_MS = 1000
MAX_INTERVAL_MS = 31_536_000_000  # a year


@dataclass(slots=True)
class Schedule:
    """A schedule as stored; `next_run_at` is the first occurrence not handled yet (None:
    the cron expression never matches again)."""

    id: str
    name: str
    payload: str
    max_retries: int
    priority: int
    interval_ms: int | None
    cron: str | None
    timezone: str | None
    paused: bool
    skip_if_running: bool
    anchor_at: datetime
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    updated_at: datetime

    def timing(self) -> tuple[int | None, str | None, str | None]:
        return (self.interval_ms, self.cron, self.timezone)


@dataclass(slots=True, frozen=True)
class Firing:
    """One occurrence to enqueue, as the scheduler decided it from the schedule it read.
    The write applies only while the schedule's `next_run_at` is still `expected_next`
    (another replica, or a PUT, may have moved it since)."""

    schedule_id: str
    expected_next: datetime
    scheduled_for: datetime
    catch_up: bool
    next_run_at: datetime | None
    skip_if_running: bool
    now: datetime


def check_cron(expression: str) -> str:
    """The expression if cronsim accepts it as 5 fields; else a ValueError naming the field."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"{expression!r} has {len(fields)} fields; give 5: minute hour "
            "day-of-month month day-of-week (for example '30 2 * * *')"
        )
    try:
        CronSim(expression, datetime(2026, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        message = str(exc)
        for index, field in enumerate(CRON_FIELDS):
            if message.lower() == f"bad {field}":
                raise ValueError(
                    f"{field} field {fields[index]!r} is not valid in {expression!r}"
                ) from exc
        raise ValueError(f"{expression!r} is not valid ({message})") from exc
    return expression


def check_timezone(name: str) -> str:
    """An IANA zone name that zoneinfo (with the tzdata package) knows."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a name too long
        raise ValueError(
            f"unknown time zone {name[:64]!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from exc
    return name


def _interval(schedule: Schedule) -> timedelta:
    assert schedule.interval_ms is not None
    return timedelta(milliseconds=schedule.interval_ms)


def _cron_next(schedule: Schedule, moment: datetime) -> datetime | None:
    """The first cron occurrence strictly after `moment` (UTC). cronsim may answer a time
    before it when `moment` lies in a repeated hour (it walks wall-clock time): skip those."""
    assert schedule.cron is not None
    zone = ZoneInfo(schedule.timezone or "UTC")
    times = CronSim(schedule.cron, moment.astimezone(zone))
    for _ in range(10):
        try:
            found = next(times).astimezone(UTC)
        except StopIteration:  # no match within 50 years
            return None
        if found > moment:
            return found
    return None


def next_after(schedule: Schedule, moment: datetime) -> datetime | None:
    """The first occurrence strictly after `moment`."""
    if schedule.interval_ms is None:
        return _cron_next(schedule, moment)
    step = _interval(schedule)
    k = max(1, (moment - schedule.anchor_at) // step + 1)
    return schedule.anchor_at + k * step


def _latest(schedule: Schedule, now: datetime, start: datetime) -> datetime:
    """The latest occurrence at or before `now`, given that `start` is one."""
    if schedule.interval_ms is not None:
        step = _interval(schedule)
        return schedule.anchor_at + ((now - schedule.anchor_at) // step) * step
    latest = start
    for _ in range(MAX_WALK):
        following = _cron_next(schedule, latest)
        if following is None or following > now:
            return latest
        latest = following
    assert schedule.cron is not None  # a long outage: walk back from now instead
    zone = ZoneInfo(schedule.timezone or "UTC")
    from_ = now.replace(microsecond=0) + timedelta(seconds=1)
    try:
        found = next(CronSim(schedule.cron, from_.astimezone(zone), reverse=True)).astimezone(UTC)
    except StopIteration:
        return latest
    return found if latest <= found <= now else latest


@dataclass(slots=True, frozen=True)
class Plan:
    """What a scheduler tick does with one due schedule."""

    scheduled_for: datetime
    catch_up: bool
    next_run_at: datetime | None


def plan(schedule: Schedule, now: datetime) -> Plan | None:
    """The occurrence to enqueue now, if one is due: the only one due, or the latest of
    several (a catch-up: the earlier ones are dropped); and the next one after now."""
    first = schedule.next_run_at
    if first is None or first > now:
        return None
    second = next_after(schedule, first)
    if second is None or second > now:
        occurrence, skipped_some = first, False
    else:
        occurrence, skipped_some = _latest(schedule, now, second), True
    catch_up = skipped_some or now - occurrence > CATCH_UP_AFTER
    return Plan(occurrence, catch_up, next_after(schedule, max(occurrence, now)))
