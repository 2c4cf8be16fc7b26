"""A bug is not an outage: a programming or data error in a write is a 500 with its
traceback in the log, not a 503 "database unavailable"; it changes nothing, harms no other
request of the same moment, and does not fail readiness.

The error is made real by dropping the `succeeded_jobs` table behind the app's back, so
that an ack (which moves the job into that table) fails inside the database.
"""

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, closing

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.queue.service import QueueService
from tests.conftest import ServerProcess, enqueue, lease

ROUNDS = 20  # at most this many tries to get the failing ack into a group with others


@pytest.fixture
async def lenient(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that gets the 500 response, where the default ASGI transport would raise
    the app's exception in the test instead."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test") as c:
        yield c


async def drop_succeeded_jobs(db_url: str, engine: AsyncEngine | None = None) -> None:
    """DROP TABLE succeeded_jobs behind the app's back: with sqlite3 on the file, or on
    PostgreSQL through `engine` (a new one when not given)."""
    if db_url.startswith("sqlite"):
        path = make_url(db_url).database
        assert path
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("DROP TABLE succeeded_jobs")
            conn.commit()
        return
    own = engine is None
    engine = engine or create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP TABLE succeeded_jobs")
    finally:
        if own:
            await engine.dispose()


def engine_of(service: QueueService) -> AsyncEngine:
    engine: AsyncEngine = service.storage.engine  # type: ignore[attr-defined]
    return engine


async def assert_still_reserved(client: httpx.AsyncClient, job_id: str) -> None:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["state"], job["attempts"], job["reserved_by"]) == ("reserved", 1, "worker-1")


async def test_a_database_error_is_a_500_that_changes_nothing_and_leaves_readiness(
    lenient: httpx.AsyncClient, service: QueueService, db_url: str
) -> None:
    job = await enqueue(lenient)
    [held] = await lease(lenient)
    await drop_succeeded_jobs(db_url, engine_of(service))

    response = await lenient.post(f"/leases/{held['id']}/ack")
    assert response.status_code == 500, response.text
    assert "database unavailable" not in response.text
    assert "retry-after" not in response.headers
    # (In process nothing logs the traceback: Starlette re-raises it to the ASGI server,
    # here the transport; the next test checks that uvicorn logs it.)

    # The failed write was rolled back: the job is still reserved under the same lease,
    # which is still live (it can be extended and failed).
    await assert_still_reserved(lenient, job["id"])
    ready = await lenient.get("/readyz")
    assert ready.status_code == 200, ready.text
    extended = await lenient.post(f"/leases/{held['id']}/extend", json={"lease_ms": 60_000})
    assert extended.status_code == 200, extended.text
    again = await lenient.post(f"/leases/{held['id']}/ack")
    assert again.status_code == 500, again.text  # the same bug again, not a 409
    await assert_still_reserved(lenient, job["id"])
    body = {"exception": "x", "retry_in_ms": 0}
    failed = await lenient.post(f"/leases/{held['id']}/fail", json=body)
    assert failed.status_code == 200, failed.text
    assert failed.json()["job"]["state"] == "available"  # retried: no succeeded_jobs needed
    assert (await lenient.get("/readyz")).status_code == 200


async def test_only_the_culprit_errs_among_concurrent_writes(
    lenient: httpx.AsyncClient,
    service: QueueService,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer commits concurrent requests as one group; when the group raises, it is
    rolled back and its items re-run one by one, so only the failing ack gets a 500."""
    caplog.set_level(logging.DEBUG, logger="bgjobs.storage.writer")
    job = await enqueue(lenient, name="victim")
    [held] = await lease(lenient, ["victim"])
    await drop_succeeded_jobs(db_url, engine_of(service))

    enqueued: list[str] = []
    for round_ in range(ROUNDS):
        ack, *responses = await asyncio.gather(
            lenient.post(f"/leases/{held['id']}/ack"),
            *(
                lenient.post("/jobs", json={"name": "bystander", "payload": f"{round_}-{i}"})
                for i in range(20)
            ),
        )
        assert ack.status_code == 500, ack.text
        assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
        enqueued += [r.json()["id"] for r in responses]
        if any("re-running one by one" in r.getMessage() for r in caplog.records):
            break
    else:
        pytest.fail(f"in {ROUNDS} rounds the failing ack never shared a group with an enqueue")

    # Every 201 is committed once; the lease is still held; the app is ready.
    listed = await lenient.get("/jobs", params={"name": "bystander", "limit": 500})
    assert listed.status_code == 200, listed.text
    assert sorted(item["id"] for item in listed.json()["items"]) == sorted(enqueued)
    await assert_still_reserved(lenient, job["id"])
    assert (await lenient.get("/readyz")).status_code == 200


async def test_the_server_logs_the_traceback_of_a_500(
    server_process: Callable[..., AbstractContextManager[ServerProcess]], db_url: str
) -> None:
    with server_process(database_url=db_url) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            job = await enqueue(client)
            [held] = await lease(client)
            await drop_succeeded_jobs(db_url)
            response = await client.post(f"/leases/{held['id']}/ack")
            assert response.status_code == 500, response.text
            assert "database unavailable" not in response.text
        # uvicorn closes the connection after an exception: look on a new one.
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            await assert_still_reserved(client, job["id"])
            assert (await client.get("/readyz")).status_code == 200
        output = server.output()
    assert "Exception in ASGI application" in output, output
    assert "Traceback (most recent call last)" in output, output
    assert "succeeded_jobs" in output, output  # the traceback names what went wrong
    assert "database unavailable" not in output, output
