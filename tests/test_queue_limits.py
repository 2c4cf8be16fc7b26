"""Concurrency and rate limits per job name: PATCH /queues/{name}, enforced by the reserve
statement on both backends, and polls that a saturated name does not wake for nothing."""

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from tests.conftest import enqueue, lease


async def configure(client: httpx.AsyncClient, name: str, **body: Any) -> dict[str, Any]:
    response = await client.patch(f"/queues/{name}", json=body)
    assert response.status_code == 200, response.text
    queue: dict[str, Any] = response.json()
    return queue


async def test_limits_are_set_shown_kept_when_absent_and_removed_with_null(
    client: httpx.AsyncClient,
) -> None:
    rate = {"count": 10, "per_ms": 1000}
    queue = await configure(client, "mail", concurrency_limit=5, rate_limit=rate)
    assert (queue["concurrency_limit"], queue["rate_limit"], queue["paused"]) == (5, rate, False)
    queue = await configure(client, "mail", paused=True)  # absent keys are unchanged
    assert (queue["concurrency_limit"], queue["rate_limit"], queue["paused"]) == (5, rate, True)
    listed = (await client.get("/queues")).json()["queues"]
    assert [(q["name"], q["concurrency_limit"], q["rate_limit"]) for q in listed] == [
        ("mail", 5, rate)
    ]
    queue = await configure(client, "mail", concurrency_limit=None)
    assert (queue["concurrency_limit"], queue["rate_limit"]) == (None, rate)
    queue = await configure(client, "mail", concurrency_limit=7.0)  # JSON Schema's integer
    assert queue["concurrency_limit"] == 7
    queue = await configure(client, "mail", concurrency_limit=None)
    queue = await configure(client, "mail", rate_limit=None, paused=False)
    assert (queue["concurrency_limit"], queue["rate_limit"], queue["paused"]) == (None, None, False)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_limit": 100_001}, "concurrency_limit"),
        ({"concurrency_limit": "5"}, "concurrency_limit"),
        ({"concurrency_limit": 2.5}, "concurrency_limit"),
        ({"rate_limit": {"count": 0, "per_ms": 1000}}, "rate_limit.count"),
        ({"rate_limit": {"count": 10}}, "rate_limit.per_ms"),
        ({"rate_limit": {"count": 10, "per_ms": 0}}, "rate_limit.per_ms"),
        ({"rate_limit": {"count": 10, "per_ms": 1000, "burst": 3}}, "rate_limit.burst"),
        ({"rate_limit": 10}, "rate_limit"),
    ],
)
async def test_a_bad_limit_is_a_422_naming_it_and_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    await configure(client, "mail", concurrency_limit=3)
    response = await client.patch("/queues/mail", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    queue = (await client.get("/queues/mail")).json()
    assert (queue["concurrency_limit"], queue["rate_limit"]) == (3, None)


async def test_a_concurrency_limit_caps_live_leases_and_an_ack_frees_a_slot(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(5):
        await enqueue(client, name="mail")
    await configure(client, "mail", concurrency_limit=2)
    first = await lease(client, ["mail"], max_jobs=10)
    assert len(first) == 2
    assert await lease(client, ["mail"], max_jobs=10) == []
    assert (await client.post(f"/leases/{first[0]['id']}/ack")).status_code == 200
    assert len(await lease(client, ["mail"], max_jobs=10)) == 1
    fail = await client.post(f"/leases/{first[1]['id']}/fail", json={"exception": "x"})
    assert fail.status_code == 200, fail.text
    assert len(await lease(client, ["mail"], max_jobs=10)) == 1
    assert await lease(client, ["mail"], max_jobs=10) == []
    await configure(client, "mail", concurrency_limit=None)
    assert len(await lease(client, ["mail"], max_jobs=10)) >= 1


async def test_concurrent_leases_in_one_group_never_pass_the_limit(
    client: httpx.AsyncClient,
) -> None:
    """Many reserves answered by one write group: each sees the ones before it."""
    batch = [{"name": "mail", "payload": str(i)} for i in range(50)]
    assert (await client.post("/jobs/batch", json={"jobs": batch})).status_code == 201
    await configure(client, "mail", concurrency_limit=3)
    results = await asyncio.gather(
        *(lease(client, ["mail", "other"], worker_id=f"w{i}", max_jobs=2) for i in range(20))
    )
    assert sum(len(leases) for leases in results) == 3
    queue = (await client.get("/queues/mail")).json()
    assert queue["counts"]["reserved"] == 3


async def test_expired_leases_count_until_reaped(
    client: httpx.AsyncClient,
    clock: OffsetClock,
    service: QueueService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for _ in range(3):
        await enqueue(client, name="mail")
    await configure(client, "mail", concurrency_limit=1)
    assert len(await lease(client, ["mail"], lease_ms=1000)) == 1
    storage: Any = service.storage
    find_expired = storage.expired_leases

    async def none_yet(now: Any, limit: int) -> list[Any]:
        return []

    monkeypatch.setattr(storage, "expired_leases", none_yet)  # hold the reaper off
    clock.advance(timedelta(seconds=5))  # expired, not yet reaped
    assert await lease(client, ["mail"]) == []
    monkeypatch.setattr(storage, "expired_leases", find_expired)
    assert await service.reap_expired() in (0, 1)  # the background reaper may be first
    assert len(await lease(client, ["mail"])) == 1


async def test_a_limit_set_while_leases_are_out_counts_them(client: httpx.AsyncClient) -> None:
    for _ in range(4):
        await enqueue(client, name="mail")
    held = await lease(client, ["mail"], max_jobs=2)
    assert len(held) == 2
    await configure(client, "mail", concurrency_limit=2)
    assert await lease(client, ["mail"]) == []
    await configure(client, "mail", concurrency_limit=3)
    assert len(await lease(client, ["mail"], max_jobs=5)) == 1


async def test_a_saturated_name_wakes_a_waiting_poll_when_a_slot_frees(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    await enqueue(client, name="mail")
    await configure(client, "mail", concurrency_limit=1)
    held = await lease(client, ["mail"])
    assert len(held) == 1
    waiting = asyncio.create_task(lease(client, ["mail"], worker_id="w2", wait_ms=10_000))
    await asyncio.sleep(0.2)
    before = service.storage.writes["reserve"]  # type: ignore[attr-defined]
    for _ in range(20):  # news of jobs the waiting poll could not lease: no wake, no reserve
        await enqueue(client, name="mail")
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert service.storage.writes["reserve"] == before  # type: ignore[attr-defined]
    started = time.monotonic()
    assert (await client.post(f"/leases/{held[0]['id']}/ack")).status_code == 200
    got = await asyncio.wait_for(waiting, 5)
    assert len(got) == 1 and time.monotonic() - started < 1


async def test_an_enqueue_is_not_handed_past_the_limit_to_a_sleeping_poll(
    client: httpx.AsyncClient,
) -> None:
    await configure(client, "mail", concurrency_limit=1)
    await enqueue(client, name="mail")
    held = await lease(client, ["mail"])
    waiting = asyncio.create_task(lease(client, ["mail"], worker_id="w2", wait_ms=1500))
    await asyncio.sleep(0.2)
    await enqueue(client, name="mail")
    assert await waiting == []
    assert (await client.post(f"/leases/{held[0]['id']}/ack")).status_code == 200
    assert len(await lease(client, ["mail"])) == 1


async def test_a_limited_name_with_room_still_gets_a_new_job_at_once(
    client: httpx.AsyncClient,
) -> None:
    """No hand-off for limited names, but the poll still wakes and reserves."""
    await configure(client, "mail", concurrency_limit=5)
    waiting = asyncio.create_task(lease(client, ["mail"], wait_ms=10_000))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    job = await enqueue(client, name="mail")
    got = await asyncio.wait_for(waiting, 5)
    assert [entry["job"]["id"] for entry in got] == [job["id"]]
    assert time.monotonic() - started < 1


async def test_a_rate_limit_paces_leases_and_a_waiting_poll_wakes_when_a_token_is_due(
    client: httpx.AsyncClient,
) -> None:
    batch = [{"name": "api", "payload": str(i)} for i in range(40)]
    assert (await client.post("/jobs/batch", json={"jobs": batch})).status_code == 201
    await configure(client, "api", rate_limit={"count": 10, "per_ms": 1000})
    times: list[float] = []

    async def worker(n: int) -> None:
        deadline = time.monotonic() + 2.05
        while (left := deadline - time.monotonic()) > 0:
            wait_ms = max(1, int(left * 1000))
            got = await lease(client, ["api"], worker_id=f"w{n}", max_jobs=5, wait_ms=wait_ms)
            times.extend(time.monotonic() for _ in got)
            for entry in got:
                assert (await client.post(f"/leases/{entry['id']}/ack")).status_code == 200

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(4)))
    offsets = sorted(t - started for t in times)
    print(f"\n{len(offsets)} leases in 2 s at 10 per 1000 ms: {[round(t, 2) for t in offsets]}")
    assert 19 <= len(offsets) <= 22, offsets
    for t in offsets:  # no window of 1 s holds more than 10 (a little slack for the clock)
        assert sum(1 for u in offsets if t <= u < t + 0.98) <= 10, offsets


async def test_a_released_lease_gives_its_token_back(client: httpx.AsyncClient) -> None:
    await enqueue(client, name="api")
    await configure(client, "api", rate_limit={"count": 1, "per_ms": 3_600_000})
    got = await lease(client, ["api"])
    assert len(got) == 1
    assert (await client.delete(f"/leases/{got[0]['id']}")).status_code == 204
    again = await lease(client, ["api"])
    assert [entry["job"]["id"] for entry in again] == [got[0]["job"]["id"]]
    assert (await client.post(f"/leases/{again[0]['id']}/ack")).status_code == 200
    await enqueue(client, name="api")
    assert await lease(client, ["api"]) == []  # the hour's one token is spent


async def test_limits_of_one_name_leave_the_others_of_a_request_alone(
    client: httpx.AsyncClient,
) -> None:
    for name in ("a", "b"):
        for _ in range(3):
            await enqueue(client, name=name)
    await configure(client, "a", concurrency_limit=1)
    got = await lease(client, ["a", "b"], max_jobs=10)
    names = sorted(entry["job"]["name"] for entry in got)
    assert names == ["a", "b", "b", "b"]
