"""Idle long polls cost nothing: once parked they write nothing, and a job that comes due
wakes its waiter by the due timer, never by a late recheck (the missed-wake race)."""

import asyncio
import gc
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.queue.service import QueueService
from app.settings import Settings

MAINTENANCE = ("prune",)  # the pruner's writes do not count; the reaper has nothing to do


@pytest.fixture
def settings(db_url: str) -> Settings:
    # A recheck slower than every wait here: only a wake can answer a poll.
    return Settings(database_url=db_url, reaper_interval_ms=50, poll_recheck_ms=60_000)


def writes(service: QueueService) -> Counter[str]:
    counted = Counter(service.storage.writes)
    for kind in MAINTENANCE:
        counted.pop(kind, None)
    return counted


async def parked(service: QueueService, count: int) -> None:
    for _ in range(500):
        if service._waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {service._waiting} of {count} polls parked")


async def test_polls_whose_clients_leave_end_without_a_write_or_a_wake(
    service: QueueService,
) -> None:
    """Parked polls whose clients hang up end at once, and nothing follows: no reserve for
    a client that is gone, and no wake passed on to the polls still waiting (a hang-up is
    not news of a job)."""
    listening = getattr(service.storage, "listening", None)
    if listening is not None:
        await asyncio.wait_for(listening.wait(), 10)
    staying = asyncio.create_task(service.lease("stays", ["idle"], 1, 10_000, 60_000))
    left = [asyncio.Event() for _ in range(10)]
    leaving = [
        asyncio.create_task(service.lease(f"w{i}", ["idle"], 1, 10_000, 60_000, event.wait))
        for i, event in enumerate(left)
    ]
    await parked(service, 11)
    before = writes(service)
    for event in left:
        event.set()
    assert await asyncio.wait_for(asyncio.gather(*leaving), 5) == [[]] * 10
    await asyncio.sleep(0.2)
    assert service.waiting == 1 and not staying.done()  # not woken by the others leaving
    assert writes(service) == before
    service.stop_waiting()
    assert await staying == []


async def test_the_garbage_collector_is_tuned_while_the_app_runs(
    client: httpx.AsyncClient,
) -> None:
    """Parked polls are many live objects: the app freezes what it built at start and
    collects its first generation every 10,000 objects, not 700 (app.main)."""
    assert (await client.get("/healthz")).status_code == 200
    assert gc.get_freeze_count() > 10_000
    assert gc.get_threshold() == (10_000, 10, 10)


async def test_100_parked_polls_write_nothing_for_2_seconds(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    listening = getattr(service.storage, "listening", None)
    if listening is not None:  # PostgreSQL: its LISTEN coming up wakes every waiter once
        await asyncio.wait_for(listening.wait(), 10)
    body = {"worker_id": "w", "names": ["idle"], "wait_ms": 10_000}
    polls = [asyncio.create_task(client.post("/leases", json=body)) for _ in range(100)]
    await parked(service, 100)
    before = writes(service)
    await asyncio.sleep(2)
    assert writes(service) == before  # not one reserve, not one write of any kind
    assert before["reserve"] <= 100  # each poll looked once at most before it parked

    job = (await client.post("/jobs", json={"name": "idle", "payload": "x"})).json()
    done, _ = await asyncio.wait(polls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    [answer] = [task.result().json() for task in done]
    assert [lease["job"]["id"] for lease in answer["leases"]] == [job["id"]]
    service.stop_waiting()
    rest = [(await task).json() for task in polls if task not in done]
    assert rest == [{"leases": []}] * 99


async def wait_for_due_job(client: httpx.AsyncClient, name: str, delay_ms: int) -> None:
    """A poll waits on `name`; a job of it is enqueued to come due in `delay_ms`. The poll
    must get it when it comes due: a poll that missed its wake still gets the job, but
    only from its last look at its deadline, 3 s later."""
    wait_ms = delay_ms + 3000
    body = {"worker_id": "w", "names": [name], "wait_ms": wait_ms}
    poll = asyncio.create_task(client.post("/leases", json=body))
    await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    job = {"name": name, "payload": "x", "available_in_ms": delay_ms}
    enqueued = await client.post("/jobs", json=job)
    assert enqueued.status_code == 201, enqueued.text
    leases = (await poll).json()["leases"]
    waited_ms = (loop.time() - sent) * 1000
    assert [lease["job"]["id"] for lease in leases] == [enqueued.json()["id"]]
    assert waited_ms < delay_ms + 1500, (
        f"a job due in {delay_ms} ms reached its poll only after {waited_ms:.0f} ms: "
        "its wake was missed and the poll's last look at its deadline found it"
    )


async def test_due_jobs_wake_their_polls_in_process(client: httpx.AsyncClient) -> None:
    rand = random.Random(7)
    for round_ in range(3):
        names = [f"due-{round_}-{i}" for i in range(20)]
        await asyncio.gather(
            *(wait_for_due_job(client, name, rand.randint(20, 700)) for name in names)
        )


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_due_jobs_wake_their_polls_on_a_real_server(server_process: Any, db_url: str) -> None:
    """The missed wake: a loop timer may fire a hair before the job's due time by the wall
    clock; the poll then found nothing and slept until the next recheck. With the recheck
    at 60 s, a missed wake here is a poll that ends empty."""
    env = {"BGJOBS_POLL_RECHECK_MS": "60000"}
    rand = random.Random(11)
    with server_process(database_url=db_url, env=env) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for round_ in range(5):
                names = [f"due-{round_}-{i}" for i in range(20)]
                await asyncio.gather(
                    *(wait_for_due_job(client, name, rand.randint(20, 700)) for name in names)
                )


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_parked_polls_start_no_write_transaction_on_a_real_server(
    server_process: Any, db_url: str
) -> None:
    """Another connection holds the file's write lock for longer than the server's
    busy_timeout (5 s) while 100 polls are parked. A poll that started a write meanwhile
    (even one that changes nothing, as a recheck by reserve would) fails on the lock;
    reads go on in WAL mode. So every poll must still end normally."""
    path = Path(db_url.split("///", 1)[1])
    env = {"BGJOBS_PRUNE_INTERVAL_S": "3600", "BGJOBS_POLL_RECHECK_MS": "500"}
    with server_process(database_url=db_url, env=env) as server:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=200)
        ) as client:
            body = {"worker_id": "w", "names": ["idle"], "wait_ms": 10_000}
            polls = [asyncio.create_task(client.post("/leases", json=body)) for _ in range(100)]
            await asyncio.sleep(1.5)
            with sqlite3.connect(path, isolation_level=None) as conn:
                conn.execute("BEGIN IMMEDIATE")  # the write lock
                await asyncio.sleep(6)  # twelve rechecks of the name: reads only
                conn.execute("ROLLBACK")
            job = (await client.post("/jobs", json={"name": "idle", "payload": "x"})).json()
            answers = [await poll for poll in polls]
    assert [answer.status_code for answer in answers] == [200] * 100, [
        answer.text for answer in answers if answer.status_code != 200
    ][:3]
    got = [lease["job"]["id"] for answer in answers for lease in answer.json()["leases"]]
    assert got == [job["id"]]
