"""It degrades and recovers: while the database cannot be written, requests get a 503 with
a clear detail and /readyz says not ready; when it is back, service resumes by itself."""

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import free_port
from tests.pgcluster import PgCluster, missing_reason


@asynccontextmanager
async def serving(url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            yield client


async def assert_unavailable(client: httpx.AsyncClient) -> None:
    refused = await client.post("/jobs", json={"name": "a", "payload": "p"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["detail"].startswith("database unavailable")
    assert refused.headers["retry-after"] == "1"
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503 and "database unavailable" in not_ready.json()["detail"]
    assert (await client.get("/healthz")).status_code == 200  # alive all the same


async def assert_recovers(client: httpx.AsyncClient, within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        response = await client.post("/jobs", json={"name": "a", "payload": "after"})
        if response.status_code == 201:
            break
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.2)
    assert response.status_code == 201, response.text
    assert (await client.get("/readyz")).status_code == 200
    leased = await client.post("/leases", json={"worker_id": "w", "names": ["a"], "max_jobs": 10})
    assert {lease["job"]["payload"] for lease in leased.json()["leases"]} == {"before", "after"}


def make_unwritable(files: list[Path]) -> Callable[[], None]:
    """Root ignores permissions, so as root the files are made immutable instead."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", *map(str, files)], check=True)
        return lambda: subprocess.run(["chattr", "-i", *map(str, files)], check=True)  # type: ignore[return-value]
    for file in files:
        file.chmod(0o444)
    return lambda: [file.chmod(0o644) for file in files]  # type: ignore[return-value]


async def test_sqlite_file_unwritable_then_writable_again(tmp_path: Path) -> None:
    db = tmp_path / "outage.db"
    async with serving(f"sqlite+aiosqlite:///{db}") as client:
        assert (
            await client.post("/jobs", json={"name": "a", "payload": "before"})
        ).status_code == 201
        # The database file and its write-ahead log (not the shared-memory index, which
        # SQLite maps into memory).
        restore = make_unwritable([db, db.with_name(db.name + "-wal")])
        try:
            await assert_unavailable(client)
        finally:
            restore()
        await assert_recovers(client)


async def test_postgresql_stopped_then_started_again() -> None:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests, but {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    cluster = PgCluster(free_port())  # its own server: stopping it must not hurt other tests
    try:
        cluster.start()
        database = cluster.create_database()
        async with serving(cluster.url(database)) as client:
            assert (
                await client.post("/jobs", json={"name": "a", "payload": "before"})
            ).status_code == 201
            await asyncio.to_thread(cluster.pause)
            try:
                await assert_unavailable(client)
            finally:
                await asyncio.to_thread(cluster.resume)
            await assert_recovers(client)
    finally:
        cluster.stop()
