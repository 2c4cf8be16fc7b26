"""Producers can retry safely: POST /jobs with an Idempotency-Key."""

import asyncio
from datetime import timedelta

import httpx

from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from tests.conftest import lease

BODY = {"name": "send_email", "payload": '{"to": "ada"}'}


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def pending_ids(client: httpx.AsyncClient) -> list[str]:
    return [job["id"] for job in (await client.get("/jobs")).json()["items"]]


async def test_a_retry_with_the_same_key_and_body_returns_the_original(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post("/jobs", json=BODY, headers=keyed("k-1"))
    assert first.status_code == 201
    again = await client.post("/jobs", json=BODY, headers=keyed("k-1"))
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert await pending_ids(client) == [first.json()["id"]]


async def test_the_same_key_with_another_body_is_a_422(client: httpx.AsyncClient) -> None:
    await client.post("/jobs", json=BODY, headers=keyed("k-2"))
    other = await client.post("/jobs", json={**BODY, "payload": "else"}, headers=keyed("k-2"))
    assert other.status_code == 422
    assert (
        "Idempotency-Key 'k-2' was already used for a different request" in other.json()["detail"]
    )
    assert other.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert len(await pending_ids(client)) == 1


async def test_different_keys_and_no_key_make_different_jobs(client: httpx.AsyncClient) -> None:
    ids = {
        (await client.post("/jobs", json=BODY, headers=headers)).json()["id"]
        for headers in (keyed("a"), keyed("b"), {}, {})
    }
    assert len(ids) == 4


async def test_the_replay_shows_the_job_as_it_is_now(client: httpx.AsyncClient) -> None:
    created = (await client.post("/jobs", json=BODY, headers=keyed("k-3"))).json()
    entry = (await lease(client))[0]
    await client.post(f"/leases/{entry['id']}/ack")
    again = await client.post("/jobs", json=BODY, headers=keyed("k-3"))
    assert again.status_code == 200
    assert again.json()["id"] == created["id"] and again.json()["state"] == "succeeded"
    await client.delete(f"/jobs/{created['id']}")
    gone = await client.post("/jobs", json=BODY, headers=keyed("k-3"))
    assert gone.status_code == 409 and "has since been deleted" in gone.json()["detail"]


async def test_keys_are_forgotten_after_the_window(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    first = (await client.post("/jobs", json=BODY, headers=keyed("k-4"))).json()
    clock.advance(timedelta(hours=23, minutes=59))
    assert (await client.post("/jobs", json=BODY, headers=keyed("k-4"))).status_code == 200
    clock.advance(timedelta(minutes=2))
    later = await client.post("/jobs", json=BODY, headers=keyed("k-4"))
    assert later.status_code == 201 and later.json()["id"] != first["id"]
    clock.advance(timedelta(hours=25))
    assert await service.prune_history() >= 1  # the expired key is pruned


async def test_concurrent_retries_with_one_key_make_one_job(client: httpx.AsyncClient) -> None:
    answers = await asyncio.gather(
        *(client.post("/jobs", json=BODY, headers=keyed("k-5")) for _ in range(20))
    )
    assert sorted(a.status_code for a in answers) == [200] * 19 + [201]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(await pending_ids(client)) == 1


async def test_bad_keys_are_refused(client: httpx.AsyncClient) -> None:
    for key in ("k" * 256, "has space", "tab\tkey"):
        response = await client.post("/jobs", json=BODY, headers=keyed(key))
        assert response.status_code == 422, key
        assert "Idempotency-Key" in response.json()["detail"]
    empty = await client.post("/jobs", json=BODY, headers={"Idempotency-Key": ""})
    assert empty.status_code == 422
    assert await pending_ids(client) == []
