"""Priorities: 0 to 9, lower runs first. Among the ready jobs of the names one lease asks
for, the lowest priority goes first, then the oldest; every rendering of a job shows it."""

import asyncio
import random
from typing import Any

import httpx

from app.queue.service import QueueService
from tests.conftest import enqueue, lease
from tests.test_idle_polls import parked


def order(job: dict[str, Any]) -> tuple[int, str, str]:
    return job["priority"], job["available_at"], job["id"]


async def test_1000_jobs_across_10_priorities_come_out_in_order(
    client: httpx.AsyncClient,
) -> None:
    rng = random.Random(7)
    enqueued: list[dict[str, Any]] = []
    for batch in range(10):  # ten enqueue times; ties within one broken by id
        jobs = [
            {
                "name": rng.choice(["a", "b"]),
                "payload": f"{batch}.{i}",
                "priority": rng.randrange(10),
            }
            for i in range(100)
        ]
        response = await client.post("/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 201, response.text
        enqueued += response.json()["jobs"]
    assert {job["priority"] for job in enqueued} == set(range(10))

    leased: list[dict[str, Any]] = []
    while len(leased) < len(enqueued):
        got = await lease(client, ["a", "b"], max_jobs=37)
        assert got, f"{len(leased)} of {len(enqueued)} leased, then nothing"
        leased += [entry["job"] for entry in got]
        acked = await client.post("/leases/ack", json={"ids": [entry["id"] for entry in got]})
        assert acked.status_code == 200, acked.text
    expected = sorted(enqueued, key=order)
    assert [job["id"] for job in leased] == [job["id"] for job in expected]
    assert [job["priority"] for job in leased] == sorted(job["priority"] for job in leased)


async def test_one_job_at_a_time_takes_the_lowest_priority_then_the_oldest(
    client: httpx.AsyncClient,
) -> None:
    """The single-job reserve (its own statement on PostgreSQL) and a newer urgent job."""
    jobs = [await enqueue(client, name="a", priority=p) for p in (5, 0, 9, 0, 3)]
    first = await lease(client, ["a"])
    urgent = await enqueue(client, name="a", priority=0)
    rest = [(await lease(client, ["a"]))[0] for _ in range(5)]
    taken = [entry["job"]["id"] for entry in first + rest]
    by = {job["id"]: job for job in [*jobs, urgent]}
    assert [by[i]["priority"] for i in taken] == [0, 0, 0, 3, 5, 9]
    assert taken[:3] == [jobs[1]["id"], jobs[3]["id"], urgent["id"]]  # then by age


async def test_priority_shows_on_every_rendering_of_a_job(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    created = await enqueue(client, name="a", priority=4, max_retries=0)
    assert created["priority"] == 4
    assert (await client.get(f"/jobs/{created['id']}")).json()["priority"] == 4
    [held] = await lease(client, ["a"])
    assert held["job"]["priority"] == 4
    failed = await client.post(f"/leases/{held['id']}/fail", json={"exception": "boom"})
    assert failed.json()["job"]["priority"] == 4
    assert (await client.get("/jobs/failed?name=a")).json()["items"][0]["priority"] == 4
    retried = await client.post(f"/jobs/{created['id']}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["priority"] == 4
    [again] = await lease(client, ["a"])
    done = await client.post(f"/leases/{again['id']}/ack")
    assert done.json()["priority"] == 4
    assert (await client.get(f"/jobs/{created['id']}")).json()["priority"] == 4
    assert (await client.get("/jobs/succeeded?name=a")).json()["items"][0]["priority"] == 4

    # A job handed straight to a sleeping poll keeps it too.
    poll = asyncio.create_task(
        client.post("/leases", json={"worker_id": "w", "names": ["h"], "wait_ms": 10_000})
    )
    await parked(service, 1)
    handed = await enqueue(client, name="h", priority=7)
    [lease_out] = (await poll).json()["leases"]
    assert lease_out["job"]["id"] == handed["id"] and lease_out["job"]["priority"] == 7


async def test_priority_is_bounded_and_part_of_an_idempotent_request(
    client: httpx.AsyncClient,
) -> None:
    for bad in (-1, 10, "1", 1.5):
        response = await client.post("/jobs", json={"name": "a", "payload": "p", "priority": bad})
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["loc"] == ["body", "priority"]
        assert "priority" in response.json()["detail"]
    key = {"Idempotency-Key": "k-1"}
    body = {"name": "a", "payload": "p", "priority": 2}
    first = await client.post("/jobs", json=body, headers=key)
    again = await client.post("/jobs", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    other = await client.post("/jobs", json={**body, "priority": 3}, headers=key)
    assert other.status_code == 422, other.text
