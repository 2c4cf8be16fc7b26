"""History is pruned after its retention age, in bounded batches."""

import asyncio
from datetime import timedelta

import httpx

from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from tests.conftest import enqueue, lease


async def finish(client: httpx.AsyncClient, count: int, outcome: str) -> set[str]:
    ids = {(await enqueue(client, max_retries=0))["id"] for _ in range(count)}
    for entry in await lease(client, max_jobs=count):
        if outcome == "ack":
            await client.post(f"/leases/{entry['id']}/ack")
        else:
            await client.post(f"/leases/{entry['id']}/fail", json={"exception": "x"})
    return ids


async def history(client: httpx.AsyncClient, which: str) -> set[str]:
    return {item["id"] for item in (await client.get(f"/jobs/{which}?limit=500")).json()["items"]}


async def test_succeeded_after_7_days_failed_after_30_in_batches(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    old_ok, old_bad = await finish(client, 10, "ack"), await finish(client, 4, "fail")
    clock.advance(timedelta(days=6, hours=23))
    new_ok = await finish(client, 3, "ack")
    pending = await enqueue(client)
    assert await service.prune_history(batch=3) == 0  # nothing is old enough yet

    clock.advance(timedelta(hours=2))  # the first jobs are now 7 days and 1 hour old
    assert await service.prune_history(batch=3) == 10  # four batches of at most 3
    assert await history(client, "succeeded") == new_ok
    assert await history(client, "failed") == old_bad

    clock.advance(timedelta(days=24))
    assert await service.prune_history(batch=3) == 3 + 4
    assert await history(client, "succeeded") == set()
    assert await history(client, "failed") == set()
    assert (await client.get(f"/jobs/{pending['id']}")).json()["state"] == "available"
    assert old_ok.isdisjoint(await history(client, "succeeded"))


async def test_leasing_goes_on_while_history_is_pruned(
    client: httpx.AsyncClient, clock: OffsetClock, service: QueueService
) -> None:
    """Pruning 3,000 rows in batches of 200 lets a lease through between batches."""
    from sqlalchemy import func, insert, select

    from app.storage.common import succeeded

    old = clock.now() - timedelta(days=30)
    rows = [
        {
            "id": f"old-{i}",
            "name": "n",
            "payload": "",
            "attempts": 1,
            "lease_seq": 1,
            "created_at": old,
            "available_at": old,
            "succeeded_at": old,
        }
        for i in range(3000)
    ]
    async with service.storage.engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(insert(succeeded), rows)
    job = await enqueue(client)

    pruning = asyncio.create_task(service.prune_history(batch=200))
    await asyncio.sleep(0)  # the first batch is under way
    leased = await lease(client)
    assert [entry["job"]["id"] for entry in leased] == [job["id"]]
    async with service.storage.engine.connect() as conn:  # type: ignore[attr-defined]
        left = (await conn.execute(select(func.count()).select_from(succeeded))).scalar()
    assert left is not None and left >= 2000  # the lease came between the first batches
    assert await pruning == 3000
