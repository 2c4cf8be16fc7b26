"""History is pruned after its retention age, in bounded batches."""

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
