"""Races: many workers leasing at once, history pages walked while rows arrive."""

import asyncio
from collections import Counter

import httpx

from tests.conftest import ServerProcess, enqueue, lease


async def test_50_concurrent_lease_requests_over_500_jobs_lease_each_once(
    client: httpx.AsyncClient,
) -> None:
    created = {(await enqueue(client, payload=str(i)))["id"] for i in range(500)}

    async def worker(n: int) -> list[str]:
        got: list[str] = []
        while True:
            leases = await lease(client, worker_id=f"w{n}", max_jobs=7)
            if not leases:
                return got
            got += [entry["job"]["id"] for entry in leases]

    results = await asyncio.gather(*(worker(n) for n in range(50)))
    counts = Counter(job_id for result in results for job_id in result)
    assert set(counts) == created
    assert max(counts.values()) == 1
    listed = (await client.get("/jobs", params={"state": "reserved", "limit": 500})).json()
    assert len(listed["items"]) == 500


async def test_concurrent_leases_through_a_real_server(server_process: object, db_url: str) -> None:
    """The same race through uvicorn and real sockets, with long polls and acks."""
    with server_process(database_url=db_url) as server:  # type: ignore[operator]
        assert isinstance(server, ServerProcess)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            jobs = await asyncio.gather(*(enqueue(http, payload=str(i)) for i in range(500)))
            created = {job["id"] for job in jobs}

            async def worker(n: int) -> list[str]:
                got: list[str] = []
                while True:
                    leases = await lease(http, worker_id=f"w{n}", max_jobs=3, wait_ms=200)
                    if not leases:
                        return got
                    for entry in leases:
                        ack = await http.post(f"/leases/{entry['id']}/ack")
                        assert ack.status_code == 200, ack.text
                        got.append(entry["job"]["id"])

            results = await asyncio.gather(*(worker(n) for n in range(50)))
            counts = Counter(job_id for result in results for job_id in result)
            assert set(counts) == created and max(counts.values()) == 1
            walked = await walk(http, "/jobs/succeeded", limit=100)
            assert sorted(walked) == sorted(created)


async def walk(http: httpx.AsyncClient, path: str, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        response = await http.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def test_cursor_walk_returns_every_row_once_while_rows_arrive(
    client: httpx.AsyncClient,
) -> None:
    async def finish(count: int, outcome: str) -> set[str]:
        ids = {(await enqueue(client, max_retries=0))["id"] for _ in range(count)}
        for entry in await lease(client, max_jobs=100):
            if outcome == "ack":
                await client.post(f"/leases/{entry['id']}/ack")
            else:
                await client.post(f"/leases/{entry['id']}/fail", json={"exception": "x"})
        return ids

    for path, outcome in (("/jobs/succeeded", "ack"), ("/jobs/failed", "fail")):
        existing = await finish(95, outcome)
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 10}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get(path, params=params)).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            await finish(3, outcome)  # new rows arrive between pages
        assert len(seen) == len(set(seen)) == 95
        assert set(seen) == existing
        stamps = [item for item in (await client.get(path, params={"limit": 500})).json()["items"]]
        key = "succeeded_at" if outcome == "ack" else "failed_at"
        assert [s[key] for s in stamps] == sorted((s[key] for s in stamps), reverse=True)


async def test_history_name_filter_and_cursor_kind(client: httpx.AsyncClient) -> None:
    for name in ("a", "b", "a"):
        await enqueue(client, name=name)
    for entry in await lease(client, ["a", "b"], max_jobs=3):
        await client.post(f"/leases/{entry['id']}/ack")
    page = (await client.get("/jobs/succeeded", params={"name": "a", "limit": 1})).json()
    assert len(page["items"]) == 1 and page["items"][0]["name"] == "a"
    assert page["next_cursor"]
    rest = (
        await client.get("/jobs/succeeded", params={"name": "a", "cursor": page["next_cursor"]})
    ).json()
    assert [item["name"] for item in rest["items"]] == ["a"] and rest["next_cursor"] is None
    wrong = await client.get("/jobs/failed", params={"cursor": page["next_cursor"]})
    assert wrong.status_code == 422 and "cursor" in wrong.json()["detail"]
