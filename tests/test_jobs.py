"""Producers and dashboards: enqueue with every availability, look up, cancel, retry."""

import re
from datetime import UTC, datetime, timedelta

import httpx

from app.queue.clock import OffsetClock
from tests.conftest import enqueue, lease

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


async def test_enqueue_now_returns_201_with_location_and_the_job(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"name": "send_email", "payload": '{"to": 1}'})
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["name"] == "send_email" and job["payload"] == '{"to": 1}'
    assert job["attempts"] == 0 and job["max_retries"] == 3
    assert job["state"] == "available"
    assert job["reserved_at"] is None and job["reserved_by"] is None
    assert job["available_at"] == job["created_at"]
    for field in ("created_at", "available_at"):
        assert TIMESTAMP.match(job[field]), job[field]
    fetched = await client.get(response.headers["location"])
    assert fetched.status_code == 200 and fetched.json() == job


async def test_job_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {(await enqueue(client))["id"] for _ in range(50)}
    assert len(ids) == 50


async def test_available_in_ms_schedules_the_job(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, available_in_ms=60_000)
    delay = parse(job["available_at"]) - parse(job["created_at"])
    assert delay == timedelta(milliseconds=60_000)
    assert job["state"] == "scheduled"


async def test_available_at_schedules_the_job_in_utc(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, available_at="2100-01-01T12:00:00.5+02:00")
    assert job["available_at"] == "2100-01-01T10:00:00.500000Z"
    assert job["state"] == "scheduled"


async def test_available_at_in_the_past_is_available_now(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, available_at="2001-02-03T04:05:06Z")
    assert job["state"] == "available"
    assert [lease_["job"]["id"] for lease_ in await lease(client)] == [job["id"]]


async def test_scheduled_job_is_not_leased_before_its_time(
    client: httpx.AsyncClient, clock: OffsetClock
) -> None:
    job = await enqueue(client, available_in_ms=60_000)
    assert await lease(client) == []
    clock.advance(timedelta(seconds=59))
    assert await lease(client) == []
    clock.advance(timedelta(seconds=1))
    leases = await lease(client)
    assert [lease_["job"]["id"] for lease_ in leases] == [job["id"]]


async def test_microseconds_survive_the_round_trip(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, available_at="2030-05-06T07:08:09.123456Z")
    fetched = (await client.get(f"/jobs/{job['id']}")).json()
    assert fetched["available_at"] == "2030-05-06T07:08:09.123456Z"


async def test_max_retries_bounds(client: httpx.AsyncClient) -> None:
    assert (await enqueue(client, max_retries=0))["max_retries"] == 0
    assert (await enqueue(client, max_retries=100))["max_retries"] == 100


async def test_get_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs/0000")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


async def test_list_pending_by_state_and_name(client: httpx.AsyncClient) -> None:
    later = await enqueue(client, name="a", available_in_ms=60_000)
    now_a = await enqueue(client, name="a")
    now_b = await enqueue(client, name="b")
    reserved = (await lease(client, ["b"]))[0]["job"]

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/jobs{query}")
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["items"]]

    assert await ids("") == [now_a["id"], now_b["id"], later["id"]]  # by available_at
    assert await ids("?state=available") == [now_a["id"]]
    assert await ids("?state=scheduled") == [later["id"]]
    assert await ids("?state=reserved") == [reserved["id"]]
    assert await ids("?name=a") == [now_a["id"], later["id"]]
    assert await ids("?name=b&state=available") == []


async def test_list_pending_pages_with_cursor(client: httpx.AsyncClient) -> None:
    created = [(await enqueue(client))["id"] for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/jobs", params=params)).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created


async def test_cancel_pending_job(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, available_in_ms=5000)
    assert (await client.delete(f"/jobs/{job['id']}")).status_code == 204
    assert (await client.get(f"/jobs/{job['id']}")).status_code == 404
    assert (await client.delete(f"/jobs/{job['id']}")).status_code == 404
    assert await lease(client) == []


async def test_cancel_reserved_job_is_409_and_keeps_it(client: httpx.AsyncClient) -> None:
    job = await enqueue(client)
    leased = (await lease(client))[0]
    response = await client.delete(f"/jobs/{job['id']}")
    assert response.status_code == 409
    assert "reserved" in response.json()["detail"]
    assert (await client.get(f"/jobs/{job['id']}")).json()["state"] == "reserved"
    assert (await client.post(f"/leases/{leased['id']}/ack")).status_code == 200


async def test_delete_finished_job_records(client: httpx.AsyncClient) -> None:
    ok = await enqueue(client)
    bad = await enqueue(client, max_retries=0)
    first, second = await lease(client, max_jobs=2)
    await client.post(f"/leases/{first['id']}/ack")
    await client.post(f"/leases/{second['id']}/fail", json={"exception": "boom"})
    for job in (ok, bad):
        assert (await client.delete(f"/jobs/{job['id']}")).status_code == 204
        assert (await client.get(f"/jobs/{job['id']}")).status_code == 404
    assert (await client.get("/jobs/succeeded")).json()["items"] == []
    assert (await client.get("/jobs/failed")).json()["items"] == []


async def test_retry_failed_job(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, payload="p", max_retries=0)
    leased = (await lease(client))[0]
    await client.post(f"/leases/{leased['id']}/fail", json={"exception": "boom"})
    response = await client.post(f"/jobs/{job['id']}/retry")
    assert response.status_code == 200, response.text
    retried = response.json()
    assert (retried["id"], retried["name"], retried["payload"]) == (job["id"], "send_email", "p")
    assert retried["attempts"] == 0 and retried["state"] == "available"
    assert (await client.get("/jobs/failed")).json()["items"] == []
    again = (await lease(client))[0]
    assert again["job"]["id"] == job["id"] and again["job"]["attempts"] == 1
    assert again["id"] != leased["id"]
    # The old lease stays fenced off: the job has been leased again since.
    stale = await client.post(f"/leases/{leased['id']}/ack")
    assert stale.status_code == 409 and "leased again" in stale.json()["detail"]


async def test_retry_of_a_job_that_is_not_failed_is_409(client: httpx.AsyncClient) -> None:
    job = await enqueue(client)
    response = await client.post(f"/jobs/{job['id']}/retry")
    assert response.status_code == 409
    assert "not failed" in response.json()["detail"]
    assert (await client.post("/jobs/nope/retry")).status_code == 404


async def test_get_shows_succeeded_and_failed_jobs(client: httpx.AsyncClient) -> None:
    ok = await enqueue(client)
    bad = await enqueue(client, max_retries=0)
    first, second = await lease(client, max_jobs=2)
    await client.post(f"/leases/{first['id']}/ack")
    await client.post(f"/leases/{second['id']}/fail", json={"exception": "kaput"})
    done = (await client.get(f"/jobs/{ok['id']}")).json()
    assert done["state"] == "succeeded" and TIMESTAMP.match(done["succeeded_at"])
    assert set(done) == {
        "id",
        "name",
        "payload",
        "attempts",
        "created_at",
        "available_at",
        "succeeded_at",
        "priority",
        "schedule_id",
        "scheduled_for",
        "catch_up",
        "state",
    }
    dead = (await client.get(f"/jobs/{bad['id']}")).json()
    assert dead["state"] == "failed" and dead["exception"] == "kaput"
    assert set(dead) == {
        "id",
        "name",
        "payload",
        "attempts",
        "exception",
        "created_at",
        "available_at",
        "failed_at",
        "priority",
        "schedule_id",
        "scheduled_for",
        "catch_up",
        "state",
    }


async def test_timestamps_are_utc(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    job = await enqueue(client)
    assert (
        before - timedelta(seconds=5) <= parse(job["created_at"]) <= before + timedelta(seconds=5)
    )


async def test_a_reserved_job_shows_when_its_lease_runs_out_on_every_rendering(
    client: httpx.AsyncClient,
) -> None:
    """`lease_expires_at` follows the lease: granted, extended, given back; null unless
    reserved. The lease's own rendering of the job agrees with the job's."""
    job = await enqueue(client, name="a")
    assert job["lease_expires_at"] is None
    [granted] = await lease(client, ["a"], lease_ms=60_000)
    assert granted["job"]["lease_expires_at"] == granted["expires_at"]
    assert parse(granted["expires_at"]) - parse(granted["job"]["reserved_at"]) == timedelta(
        seconds=60
    )

    async def rendered() -> list[str | None]:
        one = (await client.get(f"/jobs/{job['id']}")).json()
        listed = (await client.get("/jobs?state=reserved&name=a")).json()["items"]
        return [one["lease_expires_at"], *(item["lease_expires_at"] for item in listed)]

    assert await rendered() == [granted["expires_at"]] * 2
    extended = await client.post(f"/leases/{granted['id']}/extend", json={"lease_ms": 120_000})
    assert extended.status_code == 200, extended.text
    later = extended.json()["expires_at"]
    assert parse(later) > parse(granted["expires_at"])
    assert await rendered() == [later] * 2
    released = await client.delete(f"/leases/{granted['id']}")
    assert released.status_code == 204, released.text
    assert (await client.get(f"/jobs/{job['id']}")).json()["lease_expires_at"] is None
    [again] = await lease(client, ["a"])
    failed = await client.post(
        f"/leases/{again['id']}/fail", json={"exception": "boom", "retry_in_ms": 60_000}
    )
    assert failed.status_code == 200, failed.text
    assert failed.json()["job"]["lease_expires_at"] is None  # retrying: pending again
