"""Recurring schedules on both backends: the API and its validation, occurrences under a
controlled clock (fixed rate, cron, daylight saving, catch-up after downtime,
skip_if_running, re-anchoring), the fields of the jobs they make, and at most one job per
occurrence when schedulers run at once (two apps, and two server processes)."""

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from bgjobs_client.models import Job as ClientJob
from fastapi import FastAPI

from app.main import create_app
from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from app.settings import Settings
from tests.conftest import lease
from tests.test_observability import scrape, value


@pytest.fixture
def settings(db_url: str) -> Settings:
    # The tests tick the scheduler themselves, after moving the clock.
    return Settings(database_url=db_url, scheduler_interval_ms=60_000)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def z(moment: datetime) -> str:
    """The API's rendering of a time."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def set_time(clock: OffsetClock, moment: datetime) -> None:
    clock.offset = moment - datetime.now(UTC)


async def put(client: httpx.AsyncClient, schedule_id: str, **body: Any) -> dict[str, Any]:
    body = {"name": "report", "payload": "{}", **body}
    response = await client.put(f"/schedules/{schedule_id}", json=body)
    assert response.status_code in (200, 201), response.text
    found: dict[str, Any] = response.json()
    return found


async def jobs_of(client: httpx.AsyncClient, schedule_id: str) -> list[dict[str, Any]]:
    """Every pending, succeeded and failed job the schedule made, by occurrence."""
    found = []
    for path in ("/jobs", "/jobs/succeeded", "/jobs/failed"):
        cursor = None
        while True:
            params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
            page = (await client.get(path, params=params)).json()
            found += [j for j in page["items"] if j["schedule_id"] == schedule_id]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    return sorted(found, key=lambda j: j["scheduled_for"])


async def walk(
    client: httpx.AsyncClient,
    service: QueueService,
    clock: OffsetClock,
    start: datetime,
    end: datetime,
    step: timedelta,
) -> None:
    """Move the clock from start to end, ticking the scheduler at every step."""
    moment = start
    while moment <= end:
        set_time(clock, moment)
        await service.schedules.tick()
        moment += step


# -- the API ---------------------------------------------------------------------------


async def test_create_read_update_delete(client: httpx.AsyncClient) -> None:
    body = {"name": "report", "payload": "{}", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    created = await client.put("/schedules/nightly", json=body)
    assert created.status_code == 201, created.text
    schedule = created.json()
    assert schedule["id"] == "nightly" and schedule["timezone"] == "Europe/Berlin"
    assert schedule["skip_if_running"] is True and schedule["paused"] is False
    assert schedule["max_retries"] == 3 and schedule["priority"] == 0
    assert schedule["interval_ms"] is None and schedule["cron"] == "30 2 * * *"
    assert schedule["last_run_at"] is None and schedule["last_job_id"] is None
    assert at(schedule["next_run_at"]) > at(schedule["created_at"])

    again = await client.put("/schedules/nightly", json={**body, "payload": "v2"})
    assert again.status_code == 200 and again.json()["payload"] == "v2"
    assert again.json()["created_at"] == schedule["created_at"]
    await put(client, "every-minute", interval_ms=60_000)
    assert (await client.get("/schedules/nightly")).json() == again.json()
    listed = (await client.get("/schedules")).json()["schedules"]
    assert [s["id"] for s in listed] == ["every-minute", "nightly"]
    assert listed[0]["timezone"] is None and listed[0]["cron"] is None

    assert (await client.delete("/schedules/nightly")).status_code == 204
    assert (await client.get("/schedules/nightly")).status_code == 404
    assert (await client.delete("/schedules/nightly")).status_code == 404
    missing = await client.get("/schedules/nope")
    assert missing.status_code == 404 and "schedule 'nope' not found" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("schedule_id", "body", "says"),
    [
        ("bad id!", {"interval_ms": 1000}, "a schedule id is 1..255 characters"),
        ("x" * 256, {"interval_ms": 1000}, "a schedule id is 1..255 characters"),
        ("s", {}, "give exactly one of interval_ms and cron"),
        ("s", {"interval_ms": 60000, "cron": "* * * * *"}, "exactly one of interval_ms and cron"),
        ("s", {"interval_ms": 999}, "body.interval_ms: Input should be greater than or equal"),
        ("s", {"interval_ms": "1000"}, "body.interval_ms"),
        ("s", {"cron": "0 0 32 * *"}, "body.cron: day-of-month field '32' is not valid"),
        ("s", {"cron": "61 * * * *"}, "body.cron: minute field '61' is not valid"),
        ("s", {"cron": "0 * * 13 *"}, "body.cron: month field '13' is not valid"),
        ("s", {"cron": "0 0 * * 9"}, "body.cron: day-of-week field '9' is not valid"),
        ("s", {"cron": "0 0 * *"}, "body.cron: '0 0 * *' has 4 fields; give 5"),
        ("s", {"cron": "0 0 0 * * *"}, "has 6 fields; give 5"),
        ("s", {"cron": "0 2 * *", "timezone": "UTC"}, "body.cron"),
        ("s", {"cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ("s", {"cron": "0 2 * * *", "timezone": "../../etc"}, "unknown time zone"),
        ("s", {"interval_ms": 60000, "timezone": "UTC"}, "timezone applies to cron only"),
        ("s", {"interval_ms": 60000, "name": "."}, "a job name cannot be '.'"),
        ("s", {"interval_ms": 60000, "name": "a b"}, "a job name is 1..255 characters"),
        ("s", {"interval_ms": 60000, "payload": {"a": 1}}, "payload must be a string"),
        ("s", {"interval_ms": 60000, "priority": 10}, "body.priority"),
        ("s", {"interval_ms": 60000, "paused": "yes"}, "body.paused"),
        ("s", {"interval_ms": 60000, "every": 5}, "body.every: unknown field"),
    ],
)
async def test_invalid_schedules_are_a_422_that_says_why(
    client: httpx.AsyncClient, schedule_id: str, body: dict[str, Any], says: str
) -> None:
    response = await client.put(
        f"/schedules/{schedule_id}", json={"name": "report", "payload": "{}", **body}
    )
    assert response.status_code == 422, response.text
    answer = response.json()
    assert says in answer["detail"], answer
    assert set(answer) == {"detail", "errors"} and answer["errors"]
    assert (await client.get("/schedules")).json() == {"schedules": []}


# -- occurrences under a controlled clock --------------------------------------------------


async def test_interval_occurrences_are_anchor_plus_k_intervals(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    schedule = await put(client, "minutely", interval_ms=60_000, skip_if_running=False)
    anchor = at(schedule["anchor_at"])
    assert at(schedule["next_run_at"]) == anchor + timedelta(minutes=1)
    assert await service.schedules.tick() == 0  # nothing due yet
    for k in (1, 2, 3):
        set_time(clock, anchor + timedelta(minutes=k, milliseconds=300))
        assert await service.schedules.tick() == 1
        assert await service.schedules.tick() == 0  # each occurrence once
    jobs = await jobs_of(client, "minutely")
    assert [j["scheduled_for"] for j in jobs] == [
        z(anchor + timedelta(minutes=k)) for k in (1, 2, 3)
    ]
    assert all(j["catch_up"] is False and j["name"] == "report" for j in jobs)
    now = (await client.get("/schedules/minutely")).json()
    assert now["last_run_at"] == z(anchor + timedelta(minutes=3))
    assert now["last_job_id"] == jobs[-1]["id"]
    assert now["next_run_at"] == z(anchor + timedelta(minutes=4))


async def test_cron_occurrences(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    set_time(clock, at("2026-06-01T10:07:00Z"))
    schedule = await put(client, "quarterly", cron="*/15 * * * *", skip_if_running=False)
    assert schedule["next_run_at"] == "2026-06-01T10:15:00.000000Z"
    start, end = at("2026-06-01T10:07:00Z"), at("2026-06-01T11:05:00Z")
    await walk(client, service, clock, start, end, timedelta(minutes=1))
    jobs = await jobs_of(client, "quarterly")
    assert [j["scheduled_for"] for j in jobs] == [
        "2026-06-01T10:15:00.000000Z",
        "2026-06-01T10:30:00.000000Z",
        "2026-06-01T10:45:00.000000Z",
        "2026-06-01T11:00:00.000000Z",
    ]
    assert not any(j["catch_up"] for j in jobs)


# Debian's cron: a fixed-time job runs once when an hour repeats and right after the change
# when its hour is skipped; a job with a wildcard hour runs once every real hour.
DST = [  # (zone, from, to, daily at 02:30 (01:30 in the repeated hour), every hour)
    (  # Europe/Berlin springs forward at 02:00 CET (01:00Z) to 03:00 CEST
        "Europe/Berlin",
        "2026-03-28T12:00:00Z",
        "2026-03-30T12:00:00Z",
        ["2026-03-29T01:00:00.000000Z", "2026-03-30T00:30:00.000000Z"],  # 03:00 CEST, then 02:30
        [f"2026-03-29T0{h}:00:00.000000Z" for h in range(5)],  # 01:00 CET, 03:00 CEST, ...
    ),
    (  # Europe/Berlin falls back at 03:00 CEST (01:00Z) to 02:00 CET
        "Europe/Berlin",
        "2026-10-24T12:00:00Z",
        "2026-10-26T12:00:00Z",
        ["2026-10-25T00:30:00.000000Z", "2026-10-26T01:30:00.000000Z"],  # 02:30 CEST only
        [f"2026-10-25T0{h}:00:00.000000Z" for h in range(5)],  # 02:00 CEST and 02:00 CET
    ),
    (  # America/New_York springs forward at 02:00 EST (07:00Z) to 03:00 EDT
        "America/New_York",
        "2026-03-07T12:00:00Z",
        "2026-03-09T12:00:00Z",
        ["2026-03-08T07:00:00.000000Z", "2026-03-09T06:30:00.000000Z"],
        [f"2026-03-08T0{h}:00:00.000000Z" for h in range(5, 10)],
    ),
    (  # America/New_York falls back at 02:00 EDT (06:00Z) to 01:00 EST
        "America/New_York",
        "2026-10-31T12:00:00Z",
        "2026-11-02T12:00:00Z",
        ["2026-11-01T05:30:00.000000Z", "2026-11-02T06:30:00.000000Z"],  # 01:30 EDT only
        [f"2026-11-01T0{h}:00:00.000000Z" for h in range(4, 9)],  # 01:00 EDT and 01:00 EST
    ),
]


@pytest.mark.parametrize(("zone", "start", "end", "expected_daily", "hourly"), DST)
async def test_daylight_saving_changes_follow_debian_cron(
    client: httpx.AsyncClient,
    service: QueueService,
    clock: OffsetClock,
    zone: str,
    start: str,
    end: str,
    expected_daily: list[str],
    hourly: list[str],
) -> None:
    set_time(clock, at(start))
    # The time in the hour that repeats: 02:xx in Berlin, 01:xx in New York.
    repeated = "30 1 * * *" if zone == "America/New_York" and start[5:7] == "10" else None
    daily = repeated or "30 2 * * *"
    await put(client, "daily", cron=daily, timezone=zone, skip_if_running=False)
    await put(client, "hourly", cron="0 * * * *", timezone=zone, skip_if_running=False)
    await walk(client, service, clock, at(start), at(end), timedelta(minutes=10))
    got = [j["scheduled_for"] for j in await jobs_of(client, "daily")]
    assert got == expected_daily
    hours = [j["scheduled_for"] for j in await jobs_of(client, "hourly")]
    assert len(hours) == len(set(hours)) == 48  # one per real hour: none twice, none lost
    first = hours.index(hourly[0])
    assert hours[first : first + len(hourly)] == hourly
    steps = {at(b) - at(a) for a, b in itertools.pairwise(hours)}
    assert steps == {timedelta(hours=1)}
    assert not any(j["catch_up"] for j in await jobs_of(client, "hourly"))


@asynccontextmanager
async def running(settings: Settings, clock: OffsetClock) -> AsyncIterator[FastAPI]:
    """A server's life: started, then stopped (the database stays)."""
    application = create_app(settings, clock)
    async with application.router.lifespan_context(application):
        yield application


def http(application: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application)
    return httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test")


async def test_a_restart_after_a_missed_window_enqueues_one_catch_up(
    settings: Settings, clock: OffsetClock
) -> None:
    set_time(clock, at("2026-06-01T10:00:30Z"))
    async with running(settings, clock) as before, http(before) as client:
        minutely = await put(client, "minutely", interval_ms=60_000, skip_if_running=False)
        await put(client, "nightly", cron="30 2 * * *", skip_if_running=False)
    anchor = at(minutely["anchor_at"])
    # Down for hours: 400-odd minutely occurrences and one nightly one are missed.
    set_time(clock, at("2026-06-02T05:00:20Z"))
    async with running(settings, clock) as after, http(after) as client:
        service: QueueService = after.state.service
        assert await service.schedules.tick() == 2
        assert await service.schedules.tick() == 0
        [minute_job] = await jobs_of(client, "minutely")
        [night_job] = await jobs_of(client, "nightly")
        latest = anchor + ((clock.now() - anchor) // timedelta(minutes=1)) * timedelta(minutes=1)
        assert minute_job["scheduled_for"] == z(latest) and minute_job["catch_up"] is True
        assert night_job["scheduled_for"] == "2026-06-02T02:30:00.000000Z"
        assert night_job["catch_up"] is True
        nightly = (await client.get("/schedules/nightly")).json()
        assert nightly["next_run_at"] == "2026-06-03T02:30:00.000000Z"
        # Then on time again, at the next occurrence.
        set_time(clock, latest + timedelta(minutes=1, seconds=1))
        assert await service.schedules.tick() == 1
        jobs = await jobs_of(client, "minutely")
        assert [j["catch_up"] for j in jobs] == [True, False]
        assert jobs[1]["scheduled_for"] == z(latest + timedelta(minutes=1))


async def test_skip_if_running_skips_while_the_previous_job_is_pending(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    skipping = await put(client, "skipping", interval_ms=60_000, name="a")
    await put(client, "regardless", interval_ms=60_000, name="b", skip_if_running=False)
    anchor = at(skipping["anchor_at"])

    async def minute(k: int) -> None:
        set_time(clock, anchor + timedelta(minutes=k, seconds=1))
        await service.schedules.tick()

    await minute(1)  # both enqueue
    await minute(2)  # "a"'s first job is still available: skipped
    [first] = await jobs_of(client, "skipping")
    assert first["scheduled_for"] == z(anchor + timedelta(minutes=1))
    skipped = (await client.get("/schedules/skipping")).json()
    assert skipped["last_job_id"] == first["id"]
    assert skipped["next_run_at"] == z(anchor + timedelta(minutes=3))  # moved on all the same
    [held] = await lease(client, ["a"])
    await minute(3)  # reserved is still running: skipped
    assert len(await jobs_of(client, "skipping")) == 1
    assert (await client.post(f"/leases/{held['id']}/ack")).status_code == 200
    await minute(4)  # the previous job is done: enqueued
    jobs = await jobs_of(client, "skipping")
    assert [j["scheduled_for"] for j in jobs] == [
        z(anchor + timedelta(minutes=1)),
        z(anchor + timedelta(minutes=4)),
    ]
    assert len(await jobs_of(client, "regardless")) == 4  # never skipped


async def test_a_timing_change_re_anchors_and_other_changes_keep_the_rhythm(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    first = await put(client, "s", interval_ms=60_000)
    anchor = at(first["anchor_at"])
    set_time(clock, anchor + timedelta(seconds=30))
    kept = await put(client, "s", interval_ms=60_000, payload="new", priority=3, max_retries=1)
    assert kept["anchor_at"] == first["anchor_at"]
    assert kept["next_run_at"] == first["next_run_at"]
    assert kept["updated_at"] != first["updated_at"]
    set_time(clock, anchor + timedelta(seconds=61))
    assert await service.schedules.tick() == 1
    [job] = await jobs_of(client, "s")
    assert (job["payload"], job["priority"], job["max_retries"]) == ("new", 3, 1)

    set_time(clock, anchor + timedelta(seconds=70))
    moved = await put(client, "s", interval_ms=120_000, payload="new", priority=3, max_retries=1)
    new_anchor = at(moved["anchor_at"])
    assert new_anchor >= anchor + timedelta(seconds=70)
    assert moved["next_run_at"] == z(new_anchor + timedelta(minutes=2))
    assert moved["last_job_id"] == job["id"]  # the history stays
    to_cron = await put(client, "s", cron="0 * * * *")
    assert at(to_cron["anchor_at"]) > new_anchor and to_cron["timezone"] == "UTC"


async def test_paused_schedules_enqueue_nothing_and_resume_from_now(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    schedule = await put(client, "p", interval_ms=60_000, paused=True)
    anchor = at(schedule["anchor_at"])
    set_time(clock, anchor + timedelta(minutes=5, seconds=1))
    assert await service.schedules.tick() == 0
    resumed = await put(client, "p", interval_ms=60_000)
    assert resumed["anchor_at"] == schedule["anchor_at"]
    assert resumed["next_run_at"] == z(anchor + timedelta(minutes=6))  # no catch-up
    assert await service.schedules.tick() == 0


async def test_schedule_jobs_carry_their_occurrence_through_ack_and_fail(
    app: FastAPI, client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    stream = service.hub.subscribe(None, None)
    ok = await put(client, "ok", interval_ms=60_000, name="mail")
    await put(client, "bad", interval_ms=60_000, name="boom", max_retries=0)
    occurrence = at(ok["anchor_at"]) + timedelta(minutes=1)
    set_time(clock, occurrence + timedelta(seconds=2))
    assert await service.schedules.tick() == 2
    [job] = await jobs_of(client, "ok")
    shown = (await client.get(f"/jobs/{job['id']}")).json()
    assert shown["state"] == "available"
    assert shown["schedule_id"] == "ok" and shown["catch_up"] is False
    assert abs(at(shown["scheduled_for"]) - occurrence) < timedelta(seconds=1)
    typed = ClientJob.from_json(shown)  # the SDK reads the new fields
    assert (typed.schedule_id, typed.catch_up) == ("ok", False) and typed.scheduled_for
    changes = [(e.data["id"], e.data["change"]) for e in stream.take() if e.kind == "job"]
    assert (job["id"], "enqueued") in changes  # published like any enqueue
    samples = await scrape(client)
    assert value(samples, "bgjobs_jobs_enqueued_total", name="mail") == 1

    [held] = await lease(client, ["mail"])
    assert held["job"]["schedule_id"] == "ok" and held["job"]["catch_up"] is False
    acked = (await client.post(f"/leases/{held['id']}/ack")).json()
    assert acked["schedule_id"] == "ok" and acked["scheduled_for"] == shown["scheduled_for"]
    [done] = (await client.get("/jobs/succeeded")).json()["items"]
    assert (done["schedule_id"], done["scheduled_for"], done["catch_up"]) == (
        "ok",
        shown["scheduled_for"],
        False,
    )
    [failing] = await lease(client, ["boom"])
    await client.post(f"/leases/{failing['id']}/fail", json={"exception": "kaput"})
    [dead] = (await client.get("/jobs/failed")).json()["items"]
    assert dead["schedule_id"] == "bad" and dead["catch_up"] is False
    retried = (await client.post(f"/jobs/{dead['id']}/retry")).json()
    assert retried["schedule_id"] == "bad" and retried["scheduled_for"] == dead["scheduled_for"]
    producer = await client.post("/jobs", json={"name": "mail", "payload": "x"})
    assert producer.json()["schedule_id"] is None and producer.json()["catch_up"] is None


async def test_two_schedulers_ticking_at_once_enqueue_each_occurrence_once(
    settings: Settings, clock: OffsetClock, client: httpx.AsyncClient, service: QueueService
) -> None:
    """The at-most-once guard itself: a second app on the same database (its own writer,
    its own connection) ticks at the same moment as the first, over and over."""
    schedule = await put(client, "twice", interval_ms=1000, skip_if_running=False)
    anchor = at(schedule["anchor_at"])
    async with running(settings, clock) as other:
        second: QueueService = other.state.service
        for k in range(1, 21):
            set_time(clock, anchor + timedelta(milliseconds=1000 * k + 100))
            fired = await asyncio.gather(service.schedules.tick(), second.schedules.tick())
            assert sorted(fired) == [0, 1], (k, fired)
    jobs = await jobs_of(client, "twice")
    occurrences = [j["scheduled_for"] for j in jobs]
    assert occurrences == [z(anchor + timedelta(seconds=k)) for k in range(1, 21)]


async def test_run_records_refuse_a_second_enqueue_of_an_occurrence(
    client: httpx.AsyncClient, service: QueueService, clock: OffsetClock
) -> None:
    """Even a scheduler that read the schedule before a PUT put the same occurrence back
    in front of it cannot enqueue that occurrence twice."""
    schedule = await put(client, "r", cron="*/5 * * * *", skip_if_running=False)
    due = at(schedule["next_run_at"])
    set_time(clock, due + timedelta(seconds=1))
    [read] = await service.storage.due_schedules(clock.now(), 10)
    assert await service.schedules.tick() == 1
    await put(client, "r", cron="*/5 * * * *", timezone="Europe/Berlin", skip_if_running=False)
    # The PUT re-timed it; put the guard back on the occurrence already handled.
    await put(client, "r", cron="*/5 * * * *", skip_if_running=False)
    again = (await service.storage.schedules("r"))[0]
    assert again.next_run_at is not None and again.next_run_at > due
    from app.queue.models import NewJob
    from app.queue.schedules import Firing

    stale = Firing("r", read.next_run_at or due, due, False, again.next_run_at, False, clock.now())
    job = NewJob("x" * 32, "report", "{}", 3, clock.now(), clock.now(), 0, "r", due, False)
    assert await service.storage.fire_schedule(stale, job) == "stale"
    replay = Firing("r", again.next_run_at, due, False, again.next_run_at, False, clock.now())
    assert await service.storage.fire_schedule(replay, job) == "duplicate"
    assert len(await jobs_of(client, "r")) == 1


# -- real server processes ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres"])
async def test_two_replicas_enqueue_each_second_once(
    server_process: Any, db_url: str, backend: str
) -> None:
    with server_process(database_url=db_url) as one, server_process(database_url=db_url) as two:
        async with (
            httpx.AsyncClient(base_url=one.url, timeout=30) as a,
            httpx.AsyncClient(base_url=two.url, timeout=30) as b,
        ):
            started = time.monotonic()
            await put(a, "tick", interval_ms=1000, skip_if_running=False)
            await asyncio.sleep(20 - (time.monotonic() - started))
            assert (await b.delete("/schedules/tick")).status_code == 204
            jobs = await jobs_of(b, "tick")
    occurrences = [j["scheduled_for"] for j in jobs]
    assert 19 <= len(jobs) <= 21, occurrences
    assert len(set(occurrences)) == len(occurrences)
    assert not any(j["catch_up"] for j in jobs)
