"""Workers: reserve (with long polls), ack, fail, extend, release, expiry and fencing."""

import asyncio
import time
from datetime import datetime, timedelta

import httpx

from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from tests.conftest import enqueue, lease


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


async def test_lease_reserves_oldest_first_and_counts_the_attempt(
    client: httpx.AsyncClient,
) -> None:
    late = await enqueue(client, available_at="2020-01-02T00:00:00Z")
    early = await enqueue(client, available_at="2020-01-01T00:00:00Z")
    other = await enqueue(client, name="other")
    leases = await lease(client, worker_id="w-7", max_jobs=5, lease_ms=10_000)
    assert [entry["job"]["id"] for entry in leases] == [early["id"], late["id"]]
    for entry in leases:
        job = entry["job"]
        assert job["state"] == "reserved" and job["attempts"] == 1
        assert job["reserved_by"] == "w-7" and job["reserved_at"] is not None
        expires = parse(entry["expires_at"]) - parse(job["reserved_at"])
        assert expires == timedelta(milliseconds=10_000)
        fetched = (await client.get(f"/jobs/{job['id']}")).json()
        assert fetched == job
    assert [e["job"]["id"] for e in await lease(client, ["other", "x"])] == [other["id"]]
    assert await lease(client, ["send_email", "other"]) == []


async def test_lease_respects_max_jobs_across_names(client: httpx.AsyncClient) -> None:
    for i in range(4):
        await enqueue(client, name="a", available_at=f"2020-01-01T00:00:0{2 * i}Z")
        await enqueue(client, name="b", available_at=f"2020-01-01T00:00:0{2 * i + 1}Z")
    leases = await lease(client, ["a", "b"], max_jobs=5)
    assert [e["job"]["name"] for e in leases] == ["a", "b", "a", "b", "a"]
    assert len({e["id"] for e in leases}) == 5


async def test_ack_moves_the_job_to_succeeded(client: httpx.AsyncClient) -> None:
    job = await enqueue(client, payload="hello")
    leased = (await lease(client))[0]
    response = await client.post(f"/leases/{leased['id']}/ack")
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["id"] == job["id"] and done["attempts"] == 1 and done["payload"] == "hello"
    assert done["state"] == "succeeded"
    assert (await client.get("/jobs")).json()["items"] == []
    history = (await client.get("/jobs/succeeded")).json()["items"]
    assert [item["id"] for item in history] == [job["id"]]
    again = await client.post(f"/leases/{leased['id']}/ack")
    assert again.status_code == 409 and "succeeded" in again.json()["detail"]


async def test_fail_with_retries_left_backs_off_exponentially(
    client: httpx.AsyncClient, clock: OffsetClock
) -> None:
    job = await enqueue(client, max_retries=3)
    for attempt in (1, 2, 3):
        leased = (await lease(client))[0]
        assert leased["job"]["attempts"] == attempt
        response = await client.post(f"/leases/{leased['id']}/fail", json={"exception": "e"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["outcome"] == "retrying" and body["job"]["id"] == job["id"]
        assert body["job"]["state"] == "scheduled" and body["job"]["reserved_by"] is None
        delay = parse(body["job"]["available_at"]) - clock.now()
        expected = 1000 * 2 ** (attempt - 1)  # retry_base_ms * 2^(attempts-1), ±10 % jitter
        assert timedelta(milliseconds=0.9 * expected - 50) <= delay
        assert delay <= timedelta(milliseconds=1.1 * expected)
        assert await lease(client) == []  # not before its backoff
        clock.advance(timedelta(milliseconds=1.1 * expected + 1))
    leased = (await lease(client))[0]
    assert leased["job"]["attempts"] == 4  # 1 + max_retries runs
    response = await client.post(f"/leases/{leased['id']}/fail", json={"exception": "final"})
    body = response.json()
    assert body["outcome"] == "failed"
    assert body["job"]["exception"] == "final" and body["job"]["attempts"] == 4
    failed = (await client.get("/jobs/failed")).json()["items"]
    assert [item["id"] for item in failed] == [job["id"]]


async def test_fail_with_retry_in_ms(client: httpx.AsyncClient, clock: OffsetClock) -> None:
    await enqueue(client)
    leased = (await lease(client))[0]
    body = (
        await client.post(
            f"/leases/{leased['id']}/fail", json={"exception": "later", "retry_in_ms": 120_000}
        )
    ).json()
    assert body["outcome"] == "retrying"
    assert parse(body["job"]["available_at"]) - parse(leased["job"]["reserved_at"]) >= timedelta(
        seconds=120
    )
    clock.advance(timedelta(seconds=121))
    assert len(await lease(client)) == 1


async def test_fail_with_retry_in_zero_is_available_at_once(client: httpx.AsyncClient) -> None:
    await enqueue(client)
    leased = (await lease(client))[0]
    await client.post(f"/leases/{leased['id']}/fail", json={"exception": "x", "retry_in_ms": 0})
    assert (await lease(client))[0]["job"]["attempts"] == 2


async def test_max_retries_zero_fails_at_once(client: httpx.AsyncClient) -> None:
    await enqueue(client, max_retries=0)
    leased = (await lease(client))[0]
    body = (
        await client.post(f"/leases/{leased['id']}/fail", json={"exception": "x", "retry_in_ms": 0})
    ).json()
    assert body["outcome"] == "failed"


async def test_extend_pushes_back_expiry(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    await enqueue(client)
    leased = (await lease(client, lease_ms=1000))[0]
    response = await client.post(f"/leases/{leased['id']}/extend", json={"lease_ms": 60_000})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == leased["id"]
    assert parse(body["expires_at"]) > parse(leased["expires_at"])
    clock.advance(timedelta(seconds=30))
    assert await service.reap_expired() == 0
    assert (await client.post(f"/leases/{leased['id']}/ack")).status_code == 200


async def test_release_gives_the_job_back_untouched(client: httpx.AsyncClient) -> None:
    job = await enqueue(client)
    leased = (await lease(client))[0]
    assert (await client.delete(f"/leases/{leased['id']}")).status_code == 204
    back = (await client.get(f"/jobs/{job['id']}")).json()
    assert back["state"] == "available" and back["attempts"] == 0
    assert back["reserved_by"] is None and back["available_at"] == job["available_at"]
    stale = await client.post(f"/leases/{leased['id']}/ack")
    assert stale.status_code == 409 and "released" in stale.json()["detail"]
    again = (await lease(client))[0]
    assert again["job"]["attempts"] == 1


async def test_expired_lease_is_a_failed_attempt(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    job = await enqueue(client, max_retries=1)
    first = (await lease(client, worker_id="crashy", lease_ms=1000))[0]
    clock.advance(timedelta(seconds=2))
    assert await service.reap_expired() == 1
    back = (await client.get(f"/jobs/{job['id']}")).json()
    assert back["state"] in ("scheduled", "available") and back["attempts"] == 1
    assert back["reserved_by"] is None
    clock.advance(timedelta(seconds=5))  # past the backoff
    second = (await lease(client, worker_id="crashy", lease_ms=1000))[0]
    assert second["job"]["attempts"] == 2 and second["id"] != first["id"]
    clock.advance(timedelta(seconds=2))
    assert await service.reap_expired() == 1
    dead = (await client.get(f"/jobs/{job['id']}")).json()
    assert dead["state"] == "failed" and dead["attempts"] == 2
    assert "expired" in dead["exception"] and "crashy" in dead["exception"]
    assert second["id"] in dead["exception"]


async def test_reaper_requeues_within_a_second_of_expiry(client: httpx.AsyncClient) -> None:
    """Real time, real reaper task: no job stays reserved after its lease ends."""
    job = await enqueue(client)
    leased = (await lease(client, lease_ms=1000))[0]
    expires = parse(leased["expires_at"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = (await client.get(f"/jobs/{job['id']}")).json()
        if state["state"] != "reserved":
            break
        await asyncio.sleep(0.02)
    seen_at = datetime.now(expires.tzinfo)
    assert state["state"] != "reserved"
    assert seen_at - expires < timedelta(seconds=1)


async def test_late_ack_after_expiry_still_lands_if_nobody_leased_since(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    job = await enqueue(client)
    leased = (await lease(client, lease_ms=1000))[0]
    clock.advance(timedelta(seconds=2))
    await service.reap_expired()
    extend = await client.post(f"/leases/{leased['id']}/extend", json={"lease_ms": 5000})
    assert extend.status_code == 409 and "expired" in extend.json()["detail"]
    response = await client.post(f"/leases/{leased['id']}/ack")
    assert response.status_code == 200, response.text
    assert (await client.get(f"/jobs/{job['id']}")).json()["state"] == "succeeded"


async def test_late_fail_after_expiry_still_lands(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    await enqueue(client)
    leased = (await lease(client, lease_ms=1000))[0]
    clock.advance(timedelta(seconds=2))
    await service.reap_expired()
    response = await client.post(
        f"/leases/{leased['id']}/fail", json={"exception": "slow", "retry_in_ms": 0}
    )
    assert response.status_code == 200 and response.json()["outcome"] == "retrying"
    assert response.json()["job"]["attempts"] == 1


async def test_fencing_stale_lease_changes_nothing(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    job = await enqueue(client)
    stale = (await lease(client, worker_id="slow", lease_ms=1000))[0]
    clock.advance(timedelta(seconds=2))
    await service.reap_expired()
    clock.advance(timedelta(seconds=5))
    fresh = (await lease(client, worker_id="fast"))[0]
    assert fresh["job"]["id"] == job["id"]
    before = (await client.get(f"/jobs/{job['id']}")).json()
    for method, path, body in (
        ("POST", "ack", None),
        ("POST", "fail", {"exception": "x"}),
        ("POST", "extend", {"lease_ms": 5000}),
        ("DELETE", "", None),
    ):
        url = f"/leases/{stale['id']}/{path}".rstrip("/")
        response = await client.request(method, url, json=body)
        assert response.status_code == 409, (url, response.text)
        assert "leased again" in response.json()["detail"]
    assert (await client.get(f"/jobs/{job['id']}")).json() == before
    assert (await client.post(f"/leases/{fresh['id']}/ack")).status_code == 200


async def test_lease_of_a_failed_job_is_409_failed(client: httpx.AsyncClient) -> None:
    await enqueue(client, max_retries=0)
    leased = (await lease(client))[0]
    await client.post(f"/leases/{leased['id']}/fail", json={"exception": "x"})
    response = await client.post(f"/leases/{leased['id']}/fail", json={"exception": "y"})
    assert response.status_code == 409 and "failed" in response.json()["detail"]


async def test_never_issued_lease_is_404(client: httpx.AsyncClient) -> None:
    job = await enqueue(client)
    await lease(client)
    for lease_id in ("nope", f"{job['id']}.2", f"{job['id']}.0", "x.1"):
        response = await client.post(f"/leases/{lease_id}/ack")
        assert response.status_code == 404, lease_id


async def test_long_poll_returns_empty_when_the_wait_ends(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    assert await lease(client, wait_ms=300) == []
    assert 0.29 <= time.monotonic() - started < 2


async def test_long_poll_is_woken_by_an_enqueue(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(lease(client, wait_ms=10_000))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    enqueued_at = time.monotonic()
    job = await enqueue(client)
    leases = await asyncio.wait_for(waiting, 5)
    latency = time.monotonic() - enqueued_at
    assert [entry["job"]["id"] for entry in leases] == [job["id"]]
    assert latency < 0.5  # event-driven, not the 1 s re-check


async def test_long_poll_is_woken_when_a_scheduled_job_comes_due(
    client: httpx.AsyncClient,
) -> None:
    job = await enqueue(client, available_in_ms=400)
    started = time.monotonic()
    leases = await lease(client, wait_ms=10_000)
    waited = time.monotonic() - started
    assert [entry["job"]["id"] for entry in leases] == [job["id"]]
    assert 0.3 <= waited < 0.9


async def test_long_poll_is_woken_by_a_job_scheduled_during_the_wait(
    client: httpx.AsyncClient,
) -> None:
    waiting = asyncio.create_task(lease(client, wait_ms=10_000))
    await asyncio.sleep(0.1)
    job = await enqueue(client, available_in_ms=300)
    started = time.monotonic()
    leases = await asyncio.wait_for(waiting, 5)
    assert [entry["job"]["id"] for entry in leases] == [job["id"]]
    assert time.monotonic() - started < 0.8


async def test_long_poll_only_wakes_for_its_names(client: httpx.AsyncClient) -> None:
    waiting = asyncio.create_task(lease(client, ["mine"], wait_ms=600))
    await asyncio.sleep(0.1)
    await enqueue(client, name="theirs")
    assert await waiting == []
    assert len(await lease(client, ["theirs"])) == 1


async def test_many_waiters_each_get_one_job(client: httpx.AsyncClient) -> None:
    waiters = [
        asyncio.create_task(lease(client, wait_ms=5000, worker_id=f"w{i}")) for i in range(10)
    ]
    await asyncio.sleep(0.2)
    ids = {(await enqueue(client))["id"] for _ in range(10)}
    enqueued_at = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert time.monotonic() - enqueued_at < 0.5  # woken, not found by the 1 s re-check
    got = [entry["job"]["id"] for result in results for entry in result]
    assert sorted(got) == sorted(ids)
