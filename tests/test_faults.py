"""Nothing acknowledged is lost, nothing finished is run again: real load against a real
server process that is killed with SIGKILL several times and restarted on its database."""

import asyncio
import itertools
import random
import signal
from collections import defaultdict
from typing import Any

import httpx

JOBS, PRODUCERS, WORKERS, KILLS = 400, 4, 6, 3


class Load:
    """Producers and workers that ride out a dying server by retrying, and a log of what
    each job went through as the clients saw it."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=5)
        self.enqueued: set[str] = set()
        self.acked: set[str] = set()
        self.failed_ok: set[str] = set()
        # job id -> what its clients saw, in order: "leased", "acked", "failed"
        self.events: dict[str, list[str]] = defaultdict(list)
        self.done_at_kills: list[int] = []
        self.producing = True
        self.rng = random.Random(7)

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request, retried through connection errors for a while; None if it never
        got an answer (the server may or may not have acted on it)."""
        for _ in range(100):
            try:
                return await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        return None

    async def produce(self, part: int) -> None:
        for i in range(JOBS // PRODUCERS):
            key = {"Idempotency-Key": f"fault-{part}-{i}"}  # retries make one job, not two
            body = {"name": "fault", "payload": f"{part}-{i}", "max_retries": 5}
            response = await self.call("POST", "/jobs", json=body, headers=key)
            assert response is not None and response.status_code in (200, 201), response
            self.enqueued.add(response.json()["id"])
            await asyncio.sleep(self.rng.random() * 0.04)

    async def work(self, n: int) -> None:
        body = {
            "worker_id": f"w{n}",
            "names": ["fault"],
            "max_jobs": 3,
            "wait_ms": 300,
            "lease_ms": 1000,
        }
        while self.producing or not await self.drained():
            response = await self.call("POST", "/leases", json=body)
            if response is None or response.status_code != 200:
                continue
            for entry in response.json()["leases"]:
                job_id = entry["job"]["id"]
                self.events[job_id].append("leased")
                await asyncio.sleep(self.rng.random() * 0.05)  # running it
                if self.rng.random() < 0.85:
                    done = await self.call("POST", f"/leases/{entry['id']}/ack")
                    if done is not None and done.status_code == 200:
                        self.acked.add(job_id)
                        self.events[job_id].append("acked")
                else:
                    failed = await self.call(
                        "POST",
                        f"/leases/{entry['id']}/fail",
                        json={"exception": "flaky", "retry_in_ms": 0},
                    )
                    if failed is not None and failed.status_code == 200:
                        self.failed_ok.add(job_id)
                        self.events[job_id].append("failed")

    async def drained(self) -> bool:
        response = await self.call("GET", "/jobs", params={"limit": 1})
        return response is not None and response.status_code == 200 and not response.json()["items"]


async def test_sigkill_under_load_loses_nothing_and_finishes_nothing_twice(
    server_process: Any, db_url: str
) -> None:
    env = {
        "BGJOBS_RETRY_BASE_MS": "100",
        "BGJOBS_RETRY_MAX_MS": "500",
        "BGJOBS_REAPER_INTERVAL_MS": "100",
    }
    with server_process(database_url=db_url, env=env) as server:
        load = Load(server.url)
        workers = [asyncio.create_task(load.work(n)) for n in range(WORKERS)]
        producers = asyncio.gather(*(load.produce(p) for p in range(PRODUCERS)))
        for _ in range(KILLS):
            await asyncio.sleep(0.7)
            load.done_at_kills.append(len(load.enqueued))
            server.stop(signal.SIGKILL)  # mid-load, no warning
            await asyncio.sleep(0.2)
            await asyncio.to_thread(server.start)
        await asyncio.wait_for(producers, 120)
        load.producing = False
        await asyncio.wait_for(asyncio.gather(*workers), 120)
        await asyncio.sleep(1.5)  # any lease still out has expired and been reaped by now

        states: dict[str, str] = {}
        for job_id in load.enqueued:
            response = await load.call("GET", f"/jobs/{job_id}")
            assert response is not None
            states[job_id] = response.json().get("state", f"missing ({response.status_code})")
        reserved = (await load.http.get("/jobs", params={"state": "reserved"})).json()["items"]
        await load.http.aclose()

    ran_after_ack = [j for j, ev in load.events.items() if "acked" in ev[:-1]]
    # Leased again with no fail in between: its lease was lost in a crash and expired.
    redelivered = sum(
        1
        for ev in load.events.values()
        if any(a == b == "leased" for a, b in itertools.pairwise(ev))
    )
    lost = [j for j, state in states.items() if state not in ("succeeded", "failed")]
    print(
        f"\nfault test: {KILLS} SIGKILLs (after {load.done_at_kills} enqueues), "
        f"{len(load.enqueued)} jobs enqueued, "
        f"{len(load.acked)} acks answered 200, {len(load.failed_ok)} fails answered 200, "
        f"{redelivered} redelivered after a lost lease expired, "
        f"{sum(s == 'succeeded' for s in states.values())} succeeded, "
        f"{sum(s == 'failed' for s in states.values())} failed, lost {len(lost)}"
    )
    assert len(load.enqueued) == JOBS  # every producer request got its 201 (or replay 200)
    assert lost == [], {j: states[j] for j in lost}
    assert ran_after_ack == []  # an acked job never came back
    assert all(states[j] == "succeeded" for j in load.acked)
    assert reserved == []
