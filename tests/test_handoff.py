"""A job enqueued while a poll of its name sleeps is handed straight to that poll: one write
(the job inserted already leased), where enqueue-then-reserve costs two and a wake-up in
between. The hand-off must be indistinguishable from a reserve, except in its cost: the
lease acks, the job reads as reserved, the counts and the event stream agree, and a poll
that ends before it takes its job gives the job back."""

import asyncio
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from app.queue.service import JobSpec, QueueService, new_job_id
from app.settings import Settings
from tests.conftest import ServerProcess
from tests.test_idle_polls import parked
from tests.test_outage import make_unwritable, serving


@pytest.fixture
def settings(db_url: str) -> Settings:
    # No recheck while these tests run: only a wake or a hand-off can answer a poll.
    return Settings(database_url=db_url, poll_recheck_ms=60_000, reaper_interval_ms=50)


def writes(service: QueueService) -> Counter[str]:
    counted = Counter(service.storage.writes)
    counted.pop("prune", None)
    return counted


async def counts(service: QueueService, name: str) -> dict[str, int]:
    """Straight from the kept counts (/stats caches them for a second)."""
    [found] = [c for c in await service.storage.job_counts(service.clock.now()) if c.name == name]
    return {"reserved": found.reserved, "succeeded": found.succeeded}


async def settle_listener(service: QueueService) -> None:
    listening = getattr(service.storage, "listening", None)
    if listening is not None:  # PostgreSQL: its LISTEN coming up wakes every waiter once
        await asyncio.wait_for(listening.wait(), 10)


async def test_a_job_enqueued_for_a_sleeping_poll_is_handed_over_in_one_write(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    await settle_listener(service)
    body = {"worker_id": "w-7", "names": ["other", "mail"], "wait_ms": 10_000, "lease_ms": 4000}
    poll = asyncio.create_task(client.post("/leases", json=body))
    await parked(service, 1)
    before = writes(service)

    enqueued = await client.post("/jobs", json={"name": "mail", "payload": "hi", "max_retries": 2})
    assert enqueued.status_code == 201, enqueued.text
    job = enqueued.json()
    [lease] = (await poll).json()["leases"]

    assert writes(service) - before == Counter({"enqueue_leased": 1})  # no enqueue, no reserve
    # The producer sees its job as it enqueued it; the worker gets it as reserve would.
    assert (job["state"], job["attempts"]) == ("available", 0)
    assert lease["id"] == f"{job['id']}.1"
    assert lease["job"]["id"] == job["id"]
    assert lease["job"]["payload"] == "hi"
    assert (lease["job"]["state"], lease["job"]["attempts"]) == ("reserved", 1)
    assert lease["job"]["reserved_by"] == "w-7"
    stored = (await client.get(f"/jobs/{job['id']}")).json()
    assert (stored["state"], stored["attempts"], stored["reserved_by"]) == ("reserved", 1, "w-7")
    assert stored["reserved_at"] == lease["job"]["reserved_at"]
    assert (await counts(service, "mail"))["reserved"] == 1

    # The lease is a lease like any other: it extends, and its ack finishes the job.
    extended = await client.post(f"/leases/{lease['id']}/extend", json={"lease_ms": 9000})
    assert extended.status_code == 200, extended.text
    acked = await client.post(f"/leases/{lease['id']}/ack")
    assert acked.status_code == 200, acked.text
    assert acked.json()["attempts"] == 1
    after = await counts(service, "mail")
    assert (after["reserved"], after["succeeded"]) == (0, 1)


async def test_a_handed_lease_expires_and_retries_like_any_other(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    await settle_listener(service)
    body = {"worker_id": "w", "names": ["mail"], "wait_ms": 10_000, "lease_ms": 1000}
    poll = asyncio.create_task(client.post("/leases", json=body))
    await parked(service, 1)
    job = (await client.post("/jobs", json={"name": "mail", "payload": "p"})).json()
    [first] = (await poll).json()["leases"]
    # The worker is lost: when the lease runs out, the reaper puts the job back.
    body["wait_ms"] = 5000  # the reaper requeues it after the lease's second
    [second] = (await client.post("/leases", json=body)).json()["leases"]
    assert second["job"]["id"] == job["id"]
    assert second["id"] == f"{job['id']}.2"
    assert second["job"]["attempts"] == 2
    refused = await client.post(f"/leases/{first['id']}/ack")
    assert refused.status_code == 409, refused.text


async def test_events_say_enqueued_then_leased(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    await settle_listener(service)
    subscriber = service.hub.subscribe("mail", None)
    try:
        body = {"worker_id": "w", "names": ["mail"], "wait_ms": 10_000}
        poll = asyncio.create_task(client.post("/leases", json=body))
        await parked(service, 1)
        job = (await client.post("/jobs", json={"name": "mail", "payload": "p"})).json()
        await poll
        seen = [(e.data["id"], e.data["change"], e.data["state"]) for e in subscriber.take()]
    finally:
        service.hub.unsubscribe(subscriber)
    assert seen == [(job["id"], "enqueued", "available"), (job["id"], "leased", "reserved")]


async def test_only_a_sleeping_poll_is_handed_a_job_and_only_one(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    """Two polls sleep, two jobs come: the longest-waiting poll gets the first, the other
    the second; a scheduled job is never handed over (it is not due)."""
    await settle_listener(service)
    body = {"worker_id": "w", "names": ["mail"], "wait_ms": 10_000}
    first = asyncio.create_task(client.post("/leases", json=body))
    await parked(service, 1)
    second = asyncio.create_task(client.post("/leases", json=body))
    await parked(service, 2)
    before = writes(service)
    later = await client.post(
        "/jobs", json={"name": "mail", "payload": "later", "available_in_ms": 60_000}
    )
    assert later.json()["state"] == "scheduled"
    one = (await client.post("/jobs", json={"name": "mail", "payload": "one"})).json()
    two = (await client.post("/jobs", json={"name": "mail", "payload": "two"})).json()
    assert [lease["job"]["id"] for lease in (await first).json()["leases"]] == [one["id"]]
    assert [lease["job"]["id"] for lease in (await second).json()["leases"]] == [two["id"]]
    assert writes(service) - before == Counter({"enqueue": 1, "enqueue_leased": 2})


async def comes_back(service: QueueService, job_id: str) -> None:
    """The job is soon available again, its attempt not counted, and the next poll takes
    it."""
    for _ in range(200):
        back = await service.get(job_id)
        if back.state == "available":
            break
        await asyncio.sleep(0.01)
    assert (back.state, back.attempts) == ("available", 0)
    [lease] = await service.lease("w2", ["mail"], 1, 0, 1000)
    assert lease.job.id == job_id


async def test_a_poll_cancelled_before_it_takes_its_job_gives_it_back(
    service: QueueService,
) -> None:
    """A poll is picked for a hand-off and its task is cancelled (its request ended)
    before the job's write commits: the job must come back at once, not after its lease
    runs out. The two halves of the hand-off are driven one at a time to hit that gap."""
    await settle_listener(service)
    polling = asyncio.create_task(service.lease("w", ["mail"], 1, 10_000, 600_000))
    await parked(service, 1)
    waiter = service.notifier.hand_over("mail")
    assert waiter is not None and service.notifier._waiting == {}  # out of the queue
    for _ in range(5):
        await asyncio.sleep(0)  # the poll wakes and waits for its job's commit
    polling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await polling
    now = service.clock.now()
    new = service._new_job(JobSpec("mail", "p", 0), now, new_job_id())
    job = await service._hand_over(new, now, waiter)
    assert (job.state, job.attempts) == ("available", 0)
    await comes_back(service, job.id)


async def test_a_job_handed_to_a_poll_whose_client_leaves_during_its_write_comes_back(
    service: QueueService,
) -> None:
    """The client hangs up after its poll was picked for a hand-off, while the job's
    write is under way: the poll answers nothing, and the job is available again at once
    with the attempt not counted (not leased to nobody until its lease runs out)."""
    await settle_listener(service)
    left = asyncio.Event()
    polling = asyncio.create_task(
        service.lease("w", ["mail"], 1, 10_000, 600_000, hangup=left.wait)
    )
    await parked(service, 1)
    enqueuing = asyncio.create_task(service.enqueue("mail", "p", 0))
    await asyncio.sleep(0)  # the enqueue has picked the poll and started the write
    assert service.notifier._waiting == {}
    left.set()
    job, created = await enqueuing
    assert created
    assert await polling == []
    await comes_back(service, job.id)


async def test_a_failed_hand_over_leaves_the_poll_asleep_for_the_next_job(
    tmp_path: Path,
) -> None:
    """The hand-off's write fails (the file cannot be written): the producer gets a 503,
    and the poll neither answers nor errs; it sleeps on and gets the next job."""
    db = tmp_path / "handoff.db"
    async with serving(f"sqlite+aiosqlite:///{db}") as client:
        assert (
            await client.post("/jobs", json={"name": "warm", "payload": "p"})
        ).status_code == 201
        service: QueueService = client._transport.app.state.service  # type: ignore[attr-defined]
        body = {"worker_id": "w", "names": ["mail"], "wait_ms": 10_000}
        poll = asyncio.create_task(client.post("/leases", json=body))
        await parked(service, 1)
        restore = make_unwritable([db, db.with_name(db.name + "-wal")])
        try:
            refused = await client.post("/jobs", json={"name": "mail", "payload": "lost"})
        finally:
            restore()
        assert refused.status_code == 503, refused.text
        await parked(service, 1)  # asleep again, not answered
        assert not poll.done()
        job = (await client.post("/jobs", json={"name": "mail", "payload": "next"})).json()
        [lease] = (await poll).json()["leases"]
        assert lease["job"]["id"] == job["id"]


def test_hand_offs_through_a_real_server_lose_nothing(
    server_process: Callable[..., AbstractContextManager[ServerProcess]], db_url: str
) -> None:
    """Against `bgjobs serve`: 200 rounds of a poll parked, a job enqueued on another
    connection, the lease arriving and its ack. Every fifth poll's client hangs up while
    parked: the job handed to it must come back at once (leases here last 10 minutes),
    and no job may be leased to two live workers or lost."""
    with server_process(db_url) as server:
        asyncio.run(_rounds(server, 200))


async def _rounds(server: ServerProcess, rounds: int) -> None:
    body = {"worker_id": "w", "names": ["rt"], "wait_ms": 10_000, "lease_ms": 600_000}
    acked: list[str] = []

    async def ack_all(response: httpx.Response) -> None:
        assert response.status_code == 200, response.text
        for lease in response.json()["leases"]:
            done = await worker.post(f"/leases/{lease['id']}/ack")
            assert done.status_code == 200, done.text
            acked.append(lease["job"]["id"])

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=20) as producer,
        httpx.AsyncClient(base_url=server.url, timeout=20) as worker,
    ):
        for i in range(rounds):
            hang_up = i % 5 == 4
            client = httpx.AsyncClient(base_url=server.url, timeout=20) if hang_up else worker
            poll = asyncio.create_task(client.post("/leases", json=body))
            await asyncio.sleep(0.03)  # parked by now (if not, it simply reserves)
            if hang_up:
                poll.cancel()
                await client.aclose()
                await asyncio.sleep(0.03)  # the server has seen the connection close
            enqueued = await producer.post("/jobs", json={"name": "rt", "payload": str(i)})
            assert enqueued.status_code == 201, enqueued.text
            if hang_up:  # handed to a poll whose client left: it must come back at once
                await ack_all(await worker.post("/leases", json={**body, "wait_ms": 5000}))
            else:
                await ack_all(await poll)
            assert acked[-1:] == [enqueued.json()["id"]], i
        assert len(acked) == len(set(acked)) == rounds
        counts = (await worker.get("/stats")).json()["names"]
        [rt] = [entry["counts"] for entry in counts if entry["name"] == "rt"]
        assert (rt["succeeded"], rt["reserved"], rt["available"]) == (rounds, 0, 0)
