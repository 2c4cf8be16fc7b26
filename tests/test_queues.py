"""Queues, one per job name: pause and resume (enforced in the reserve statement, on
every replica), and GET /queues with each name's settings and counts."""

import asyncio
import time
from typing import Any

import httpx
import pytest

from app.queue.service import QueueService
from app.settings import Settings
from tests.conftest import enqueue, lease
from tests.test_idle_polls import parked


@pytest.fixture
def settings(db_url: str) -> Settings:
    # No recheck while these tests run: only a wake or a hand-off can answer a poll.
    return Settings(database_url=db_url, poll_recheck_ms=60_000)


async def pause(client: httpx.AsyncClient, name: str, paused: bool) -> dict[str, Any]:
    response = await client.patch(f"/queues/{name}", json={"paused": paused})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_paused_name_is_not_leased_and_a_resume_wakes_its_poll(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    first = await enqueue(client, name="mail")
    paused = await pause(client, "mail", True)
    assert paused == {
        "name": "mail",
        "paused": True,
        "concurrency_limit": None,
        "rate_limit": None,
        "counts": {"available": 1, "scheduled": 0, "reserved": 0, "succeeded": 0, "failed": 0},
    }
    assert await lease(client, ["mail", "other"], max_jobs=10) == []
    # A poll sleeps on the name; an enqueue meanwhile is kept, not handed to it.
    poll = asyncio.create_task(
        client.post("/leases", json={"worker_id": "w", "names": ["mail"], "wait_ms": 10_000})
    )
    await parked(service, 1)
    second = await enqueue(client, name="mail")
    await asyncio.sleep(0.3)
    assert not poll.done()
    assert (await client.get(f"/jobs/{second['id']}")).json()["state"] == "available"
    await parked(service, 1)

    started = time.monotonic()
    resumed = await pause(client, "mail", False)
    counts = resumed["counts"]
    assert resumed["paused"] is False and counts["available"] + counts["reserved"] == 2
    [got] = (await asyncio.wait_for(poll, 5)).json()["leases"]
    assert time.monotonic() - started < 1  # woken by the resume, not by a recheck
    assert got["job"]["id"] == first["id"]  # the oldest
    assert [entry["job"]["id"] for entry in await lease(client, ["mail"])] == [second["id"]]


async def test_get_queues_lists_names_with_jobs_or_settings(client: httpx.AsyncClient) -> None:
    await enqueue(client, name="b")
    await enqueue(client, name="b", available_in_ms=60_000)
    await pause(client, "a", True)  # settings, no jobs
    await pause(client, "c", False)
    listed = (await client.get("/queues")).json()["queues"]
    assert [(q["name"], q["paused"]) for q in listed] == [("a", True), ("b", False), ("c", False)]
    b = (await client.get("/queues/b")).json()
    assert b["counts"]["available"] == 1 and b["counts"]["scheduled"] == 1
    missing = await client.get("/queues/nothing-here")
    assert missing.status_code == 404 and "nothing-here" in missing.json()["detail"]
    assert (await client.patch("/queues/nothing-here", json={})).status_code == 404


@pytest.mark.parametrize(
    "body", [{"paused": None}, {"paused": "yes"}, {"paused": True, "extra": 1}, [True]]
)
async def test_a_bad_queue_patch_is_a_422_and_changes_nothing(
    client: httpx.AsyncClient, body: Any
) -> None:
    await enqueue(client, name="mail")
    response = await client.patch("/queues/mail", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert (await client.get("/queues/mail")).json()["paused"] is False


@pytest.mark.parametrize("name", [".", ".."])
async def test_names_a_url_cannot_carry_are_refused_at_enqueue(
    client: httpx.AsyncClient, name: str
) -> None:
    response = await client.post("/jobs", json={"name": name, "payload": "p"})
    assert response.status_code == 422, response.text
    assert "URL" in response.json()["detail"]
    batch = await client.post("/jobs/batch", json={"jobs": [{"name": name, "payload": "p"}]})
    assert batch.status_code == 422, batch.text
