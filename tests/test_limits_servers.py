"""Queue limits against real server processes: on PostgreSQL two replicas share one
database, on SQLite one server serves every poller. A sampler reads the database itself."""

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from tests.conftest import lease

RESERVED = "SELECT count(*) FROM jobs WHERE name = 'limited' AND reserved_at IS NOT NULL"


@asynccontextmanager
async def replicas(
    server_process: Any, db_url: str, backend: str
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Two clients: of two replicas on PostgreSQL, of the one server on SQLite."""
    env = {"BGJOBS_POLL_RECHECK_MS": "60000"}  # wakes must come from the rules, not rechecks
    count = 2 if backend == "postgres" else 1
    with ExitStack() as stack:
        servers = [
            stack.enter_context(server_process(database_url=db_url, env=env)) for _ in range(count)
        ]
        clients = [httpx.AsyncClient(base_url=servers[i % count].url, timeout=60) for i in (0, 1)]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()


def sampler(db_url: str, backend: str) -> Callable[[], Any]:
    """A coroutine function that returns how many jobs are reserved now, read directly."""
    if backend == "postgres":
        dsn = make_url(db_url).set(drivername="postgresql").render_as_string(False)
        conn: list[Any] = []

        async def read_pg() -> int:
            if not conn:
                conn.append(await asyncpg.connect(dsn))
            return int(await conn[0].fetchval(RESERVED))

        read_pg.close = lambda: conn[0].close() if conn else asyncio.sleep(0)  # type: ignore[attr-defined]
        return read_pg
    path = make_url(db_url).database
    assert path is not None
    lite = sqlite3.connect(path)

    async def read_lite() -> int:
        return int(lite.execute(RESERVED).fetchone()[0])

    async def close() -> None:
        lite.close()

    read_lite.close = close  # type: ignore[attr-defined]
    return read_lite


async def enqueue_many(client: httpx.AsyncClient, total: int) -> set[str]:
    ids: set[str] = set()
    for start in range(0, total, 500):
        jobs = [{"name": "limited", "payload": str(i)} for i in range(start, start + 500)][
            : total - start
        ]
        response = await client.post("/jobs/batch", json={"jobs": jobs})
        assert response.status_code == 201, response.text
        ids |= {job["id"] for job in response.json()["jobs"]}
    return ids


async def test_a_concurrency_limit_of_5_holds_for_50_pollers(
    server_process: Any, db_url: str, backend: str
) -> None:
    total = 300
    async with replicas(server_process, db_url, backend) as clients:
        patched = await clients[0].patch("/queues/limited", json={"concurrency_limit": 5})
        assert patched.status_code == 200, patched.text
        created = await enqueue_many(clients[1], total)
        done: list[str] = []
        seen: list[int] = []
        read = sampler(db_url, backend)

        async def sample() -> None:
            while len(done) < total:
                seen.append(await read())
                await asyncio.sleep(0.002)

        async def poller(n: int) -> None:
            http = clients[n % 2]
            while len(done) < total:
                got = await lease(http, ["limited"], worker_id=f"w{n}", max_jobs=3, wait_ms=1000)
                for entry in got:
                    await asyncio.sleep(random.uniform(0, 0.01))  # the work
                    ack = await http.post(f"/leases/{entry['id']}/ack")
                    assert ack.status_code == 200, ack.text
                    done.append(entry["job"]["id"])

        sampling = asyncio.create_task(sample())
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(poller(n) for n in range(50))), 240)
        elapsed = time.monotonic() - started
        await sampling
        await read.close()  # type: ignore[attr-defined]
    print(
        f"\n{total} jobs, limit 5, 50 pollers on {len({c.base_url for c in clients})} "
        f"server(s): {elapsed:.1f} s, {len(seen)} samples, most reserved seen {max(seen)}"
    )
    assert sorted(done) == sorted(created)
    assert max(seen) <= 5
    assert max(seen) == 5  # the limit was reached, not merely never approached


async def test_a_rate_limit_of_10_per_second_over_5_seconds(
    server_process: Any, db_url: str, backend: str
) -> None:
    async with replicas(server_process, db_url, backend) as clients:
        await enqueue_many(clients[0], 200)
        rate = {"count": 10, "per_ms": 1000}
        patched = await clients[1].patch("/queues/limited", json={"rate_limit": rate})
        assert patched.status_code == 200, patched.text
        times: list[float] = []
        started, started_at = time.monotonic(), datetime.now(UTC)

        async def poller(n: int) -> None:
            http = clients[n % 2]
            while (left := started + 5.0 - time.monotonic()) > 0:
                wait_ms = max(1, int(left * 1000))
                got = await lease(
                    http, ["limited"], worker_id=f"w{n}", max_jobs=10, wait_ms=wait_ms
                )
                # When the server granted each lease (its reserved_at), not when the
                # answer reached this busy test process: arrival jitter is not the pace.
                times.extend(
                    (
                        datetime.fromisoformat(entry["job"]["reserved_at"]) - started_at
                    ).total_seconds()
                    for entry in got
                )
                for entry in got:
                    assert (await http.post(f"/leases/{entry['id']}/ack")).status_code == 200

        await asyncio.gather(*(poller(n) for n in range(8)))
    within = sorted(t for t in times if t < 5.0)
    windows = [sum(1 for u in within if t <= u < t + 1.0) for t in within if t <= 4.0]
    print(
        f"\nrate limit 10 per 1000 ms, 8 pollers: {len(within)} leases in 5 s, "
        f"per 1 s window from {min(windows)} to {max(windows)}"
    )
    assert 48 <= len(within) <= 52, within
    # A window starting at a lease: at most 10, and at least 9 (the pace holds up).
    assert max(windows) <= 10 and min(windows) >= 9, within
