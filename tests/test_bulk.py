"""Bulk retry and delete (POST /jobs/retry, POST /jobs/delete) on both backends: by ids
with a result per id, and by filter, which neither chases arrivals nor retries twice."""

import asyncio
import logging
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.queue.clock import OffsetClock
from app.queue.ports import WalkQuery
from app.queue.service import QueueService
from tests.conftest import enqueue, lease


async def failed_jobs(client: httpx.AsyncClient, name: str, n: int) -> list[str]:
    """`n` jobs of `name` in the failed jobs, enqueued in batches and failed in one call."""
    ids: list[str] = []
    for start in range(0, n, 1000):
        batch = [
            {"name": name, "payload": str(i), "max_retries": 0}
            for i in range(start, min(n, start + 1000))
        ]
        response = await client.post("/jobs/batch", json={"jobs": batch})
        assert response.status_code == 201, response.text
        ids += [job["id"] for job in response.json()["jobs"]]
        leases = await lease(client, [name], max_jobs=1000)
        items = [{"id": item["id"], "exception": "boom"} for item in leases]
        failed = await client.post("/leases/fail", json={"items": items})
        assert all(r["status"] == 200 for r in failed.json()["results"])
    return ids


async def states(client: httpx.AsyncClient, ids: list[str]) -> dict[str, str]:
    return {
        job_id: (await client.get(f"/jobs/{job_id}")).json().get("state", "gone") for job_id in ids
    }


async def test_retry_by_ids_answers_each(client: httpx.AsyncClient) -> None:
    (failed,) = await failed_jobs(client, "mail", 1)
    pending = await enqueue(client, "mail")
    response = await client.post("/jobs/retry", json={"ids": [failed, pending["id"], "nope"]})
    assert response.status_code == 200, response.text
    ok, not_failed, missing = response.json()["results"]
    assert ok["id"] == failed and ok["status"] == 200 and ok["job"]["state"] == "available"
    assert ok["job"]["attempts"] == 0
    assert not_failed["status"] == 409 and not_failed["code"] == "not_failed"
    assert "available, not failed" in not_failed["detail"]
    assert missing == {
        "id": "nope",
        "status": 404,
        "code": "not_found",
        "detail": "job 'nope' not found",
    }
    assert len(await lease(client, ["mail"], max_jobs=10)) == 2


async def test_delete_by_ids_answers_each(client: httpx.AsyncClient) -> None:
    available = await enqueue(client, "a")
    reserved = await enqueue(client, "b")
    await lease(client, ["b"])
    (failed,) = await failed_jobs(client, "c", 1)
    ids = [available["id"], reserved["id"], failed, "nope"]
    response = await client.post("/jobs/delete", json={"ids": ids})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["id"], r["status"], r.get("code")) for r in results] == [
        (available["id"], 200, None),
        (reserved["id"], 409, "reserved"),
        (failed, 200, None),
        ("nope", 404, "not_found"),
    ]
    assert await states(client, ids[:3]) == {
        available["id"]: "gone",
        reserved["id"]: "reserved",
        failed: "gone",
    }


async def test_retry_by_filter_takes_only_that_name(client: httpx.AsyncClient) -> None:
    mail = await failed_jobs(client, "mail", 30)
    other = await failed_jobs(client, "other", 5)
    response = await client.post(
        "/jobs/retry", json={"filter": {"state": "failed", "name": "mail"}}
    )
    assert response.json() == {"done": 30, "skipped": 0, "more": False}
    assert set((await states(client, mail)).values()) == {"available"}
    assert set((await states(client, other)).values()) == {"failed"}


async def test_a_filter_call_stops_at_10000_and_says_more(client: httpx.AsyncClient) -> None:
    ids = await failed_jobs(client, "many", 10_050)
    first = (await client.post("/jobs/delete", json={"filter": {"state": "failed"}})).json()
    assert first == {"done": 10_000, "skipped": 0, "more": True}
    second = (await client.post("/jobs/delete", json={"filter": {"state": "failed"}})).json()
    assert second == {"done": 50, "skipped": 0, "more": False}
    assert set((await states(client, ids[:3] + ids[-3:])).values()) == {"gone"}


async def test_retry_by_filter_neither_chases_arrivals_nor_retries_twice(
    client: httpx.AsyncClient,
) -> None:
    """While the call walks 3,000 failed jobs, a worker leases retried ones and fails them
    again, and new jobs fail: the call retries each of the 3,000 once and nothing else."""
    ids = set(await failed_jobs(client, "n", 3000))
    refailed: set[str] = set()
    arrivals: set[str] = set()
    stop = asyncio.Event()

    async def meddle() -> None:
        while not stop.is_set():
            await enqueue(client, "n", max_retries=0)
            for item in await lease(client, ["n"], max_jobs=1000):
                await client.post(f"/leases/{item['id']}/fail", json={"exception": "again"})
                job_id = item["job"]["id"]
                (refailed if job_id in ids else arrivals).add(job_id)

    meddler = asyncio.create_task(meddle())
    response = await client.post("/jobs/retry", json={"filter": {"state": "failed", "name": "n"}})
    stop.set()
    await meddler
    assert response.json() == {"done": 3000, "skipped": 0, "more": False}
    assert refailed and arrivals  # the meddling happened during the call
    now = await states(client, sorted(ids | arrivals))
    assert all(now[job_id] == "failed" for job_id in refailed)  # not retried a second time
    assert all(now[job_id] == "failed" for job_id in arrivals)  # never chased
    assert all(now[job_id] == "available" for job_id in ids - refailed)


async def test_delete_by_filter_skips_what_was_leased_meanwhile(
    client: httpx.AsyncClient, service: QueueService
) -> None:
    """The guard in SQL: a job the walk saw available but a worker leased before the
    delete stays; then the same race through the endpoint, with a worker leasing along."""
    job = await enqueue(client, "g")
    walked = await service.storage.walk(WalkQuery("available", "g", service.clock.now(), 10, None))
    assert [job_id for _, job_id in walked] == [job["id"]]
    await lease(client, ["g"])
    assert await service.storage.delete_many([(job["id"], "pending")]) == ["reserved"]

    response = await client.post(
        "/jobs/batch", json={"jobs": [{"name": "h", "payload": str(i)} for i in range(1000)]}
    )
    ids = [j["id"] for j in response.json()["jobs"]]
    for start in range(1000, 3000, 1000):
        more = [{"name": "h", "payload": str(i)} for i in range(start, start + 1000)]
        ids += [
            j["id"] for j in (await client.post("/jobs/batch", json={"jobs": more})).json()["jobs"]
        ]
    leased: set[str] = set()
    stop = asyncio.Event()

    async def work() -> None:
        while not stop.is_set():
            leased.update(item["job"]["id"] for item in await lease(client, ["h"], max_jobs=20))
            await asyncio.sleep(0)  # in-process, a poll that finds nothing never suspends

    worker = asyncio.create_task(work())
    answer = (
        await client.post("/jobs/delete", json={"filter": {"state": "available", "name": "h"}})
    ).json()
    stop.set()
    await worker
    now = await states(client, ids)
    assert all(now[job_id] == "reserved" for job_id in leased)  # never deleted
    assert {job_id for job_id, state in now.items() if state != "gone"} == leased
    assert answer["done"] == 3000 - len(leased) and answer["more"] is False


async def test_scheduled_and_succeeded_by_filter(
    client: httpx.AsyncClient, clock: OffsetClock
) -> None:
    later = await enqueue(client, "s", available_in_ms=60_000)
    now = await enqueue(client, "s")
    (item,) = await lease(client, ["s"])
    await client.post(f"/leases/{item['id']}/ack")
    answer = await client.post("/jobs/delete", json={"filter": {"state": "scheduled"}})
    assert answer.json() == {"done": 1, "skipped": 0, "more": False}
    answer = await client.post("/jobs/delete", json={"filter": {"state": "succeeded", "name": "s"}})
    assert answer.json() == {"done": 1, "skipped": 0, "more": False}
    assert await states(client, [later["id"], now["id"]]) == {
        later["id"]: "gone",
        now["id"]: "gone",
    }
    clock.advance(timedelta(seconds=1))


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/jobs/delete", {"filter": {"state": "reserved"}}, "reserved jobs belong to the workers"),
        ("/jobs/retry", {"filter": {"state": "available"}}, "body.filter.state"),
        ("/jobs/delete", {"ids": ["a"], "filter": {"state": "failed"}}, 'either "ids" or "filter"'),
        ("/jobs/retry", {}, 'either "ids" or "filter"'),
        ("/jobs/retry", {"ids": []}, "body.ids"),
        ("/jobs/delete", {"ids": ["a", "b", "a"]}, "job id 'a' is repeated"),
        ("/jobs/delete", {"ids": [str(i) for i in range(1001)]}, "body.ids"),
        ("/jobs/delete", {"filter": {"state": "failed", "name": "bad name"}}, "body.filter.name"),
        ("/jobs/retry", {"ids": ["a"], "extra": 1}, "body.extra"),
    ],
)
async def test_bad_bulk_requests_are_422(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], detail: str
) -> None:
    job = await enqueue(client, "keep")
    response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert detail in response.json()["detail"]
    assert (await client.get(f"/jobs/{job['id']}")).json()["state"] == "available"


async def test_bulk_actions_are_logged_with_a_token_fingerprint(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(database_url=db_url, api_tokens="sekrit-admin=admin+enqueue+work"))
    headers = {"Authorization": "Bearer sekrit-admin"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=headers
        ) as c:
            await failed_jobs(c, "x", 3)
            with caplog.at_level(logging.INFO, logger="bgjobs.bulk"):
                answer = await c.post("/jobs/retry", json={"filter": {"state": "failed"}})
    assert answer.json()["done"] == 3
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bgjobs.bulk"]
    assert line.startswith("bulk retry of failed jobs by token sha256:") and "3 done" in line
    assert "sekrit" not in caplog.text


async def test_failed_jobs_grouped_by_the_first_line(client: httpx.AsyncClient) -> None:
    failures = [("mail", "SMTP 550: no such user\n  at send()")] * 3 + [
        ("mail", "timeout"),
        ("sms", "SMTP 550: no such user\nother trace"),
    ]
    for name, exception in failures:
        await enqueue(client, name, max_retries=0)
        (item,) = await lease(client, [name])
        await client.post(f"/leases/{item['id']}/fail", json={"exception": exception})
    answer = (await client.get("/jobs/failed/groups")).json()
    assert answer["scanned"] == 5 and answer["complete"] is True
    first, second = answer["groups"]
    assert (first["first_line"], first["count"], first["names"]) == (
        "SMTP 550: no such user", 4, {"mail": 3, "sms": 1}
    )  # fmt: skip
    assert (second["first_line"], second["count"]) == ("timeout", 1)
    only_sms = (await client.get("/jobs/failed/groups", params={"name": "sms"})).json()
    assert [(g["first_line"], g["count"]) for g in only_sms["groups"]] == [
        ("SMTP 550: no such user", 1)
    ]
    bad = await client.get("/jobs/failed/groups", params={"name": "no spaces"})
    assert bad.status_code == 422


async def test_search_by_payload_and_exception(client: httpx.AsyncClient) -> None:
    await enqueue(client, "mail", '{"to": "ada@example.com"}')
    bob = await enqueue(client, "mail", '{"to": "bob@example.com"}')
    found = (await client.get("/jobs", params={"q": "bob@"})).json()
    assert [j["id"] for j in found["items"]] == [bob["id"]] and found["next_cursor"] is None
    await enqueue(client, "sms", "plain", max_retries=0)
    (item,) = await lease(client, ["sms"])
    await client.post(f"/leases/{item['id']}/fail", json={"exception": "Gateway said 503"})
    by_exception = (await client.get("/jobs/failed", params={"q": "said 503"})).json()
    assert [j["id"] for j in by_exception["items"]] == [item["job"]["id"]]
    assert (await client.get("/jobs/failed", params={"q": "SAID 503"})).json()["items"] == []
    (ok,) = await lease(client, ["mail"])
    await client.post(f"/leases/{ok['id']}/ack")
    done = (await client.get("/jobs/succeeded", params={"q": "ada@"})).json()
    assert [j["id"] for j in done["items"]] == [ok["job"]["id"]]
    assert (await client.get("/jobs", params={"q": ""})).status_code == 422


async def test_a_search_stops_at_its_scan_budget_with_a_cursor(client: httpx.AsyncClient) -> None:
    """10,050 pending jobs, the only match last: the first call reads 10,000 and finds
    nothing, but its cursor leads the second call to the match."""
    for start in range(0, 10_050, 1000):
        jobs = [
            {"name": "n", "payload": f"job {i}"} for i in range(start, min(10_050, start + 1000))
        ]
        assert (await client.post("/jobs/batch", json={"jobs": jobs})).status_code == 201
    needle = await enqueue(client, "n", "the needle")
    first = (await client.get("/jobs", params={"q": "needle", "limit": 10})).json()
    assert first["items"] == [] and first["next_cursor"] is not None
    second = (
        await client.get("/jobs", params={"q": "needle", "cursor": first["next_cursor"]})
    ).json()
    assert [j["id"] for j in second["items"]] == [needle["id"]] and second["next_cursor"] is None
