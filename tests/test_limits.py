"""Bounded everything: request bodies and the number of waiting long polls."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.queue.clock import OffsetClock
from app.settings import Settings
from tests.conftest import enqueue


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, max_request_bytes=4096, max_waiting_polls=2)


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    body = {"name": "a", "payload": "x" * 5000}
    response = await client.post("/jobs", json=body)
    assert response.status_code == 413
    assert "4096-byte limit" in response.json()["detail"]
    assert (await client.get("/jobs")).json()["items"] == []


async def test_streamed_body_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "a", "payload": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    response = await client.post(
        "/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


async def test_body_within_the_limit_is_taken(client: httpx.AsyncClient) -> None:
    assert (await enqueue(client, payload="x" * 3000))["payload"] == "x" * 3000


async def test_long_polls_past_the_cap_get_503_with_retry_after(client: httpx.AsyncClient) -> None:
    body = {"worker_id": "w", "names": ["a"], "wait_ms": 2000}
    waiting = [asyncio.create_task(client.post("/leases", json=body)) for _ in range(2)]
    await asyncio.sleep(0.2)
    refused = await client.post("/leases", json=body)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "long polls" in refused.json()["detail"]
    no_wait = await client.post("/leases", json={**body, "wait_ms": 0})
    assert no_wait.status_code == 200  # a poll that does not wait is always served
    await enqueue(client, name="a")
    answers = await asyncio.gather(*waiting)
    assert sorted(len(r.json()["leases"]) for r in answers) == [0, 1]


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    server_process: Any, db_url: str
) -> None:
    """A client announcing 100 MB gets its 413 without sending any of it."""
    with server_process(database_url=db_url, env={"BGJOBS_MAX_REQUEST_BYTES": "4096"}) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.startswith(b"HTTP/1.1 413"), status


async def test_app_from_import_path_has_the_limits(db_url: str, clock: OffsetClock) -> None:
    app: FastAPI = create_app(Settings(database_url=db_url), clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            big = {"name": "a", "payload": "x" * (1024 * 1024 + 1)}
            assert (await client.post("/jobs", json=big)).status_code == 413
