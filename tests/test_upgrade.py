"""A rolling upgrade on PostgreSQL: a replica of the previous release keeps serving while a
replica of this one migrates the shared database (0002 to the head: new tables, and in
0004 triggers that count the old replica's writes too) and runs
beside it. Jobs, leases and wake-ups (NOTIFY `sender|available_at|name`) cross between the
two releases both ways.

The previous release is taken from git history (`git archive`), so this needs a clone with
history and git, as CI has: without them the test fails, saying so.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.storage.migrate import head_revision
from tests.conftest import ServerProcess, enqueue, free_port, lease
from tests.pgcluster import PgCluster

PREVIOUS = "b55c601"  # the previous release: schema head 0002
ROOT = Path(__file__).resolve().parents[1]
# A long poll re-checks the database only this rarely, so a prompt wake-up is a NOTIFY's.
NO_RECHECK = {"BGJOBS_POLL_RECHECK_MS": "60000"}
WAIT_MS = 20_000


@pytest.fixture
def backend() -> str:
    return "postgres"


class ReleaseServer(ServerProcess):
    """`bgjobs serve` of another release: run from its source tree, which comes first on
    the import path (before this checkout, installed in the venv in editable mode)."""

    def __init__(self, source: Path, database_url: str, port: int, log: Path) -> None:
        env = {"PYTHONPATH": str(source), "BGJOBS_AUTO_MIGRATE": "true", **NO_RECHECK}
        super().__init__(database_url, port, env, log)
        self.cwd = source


def previous_release(into: Path) -> Path:
    """The previous release's source tree, extracted from git history."""
    if shutil.which("git") is None:
        pytest.fail("git is needed to extract the previous release for the upgrade test")
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{PREVIOUS}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    if found.returncode != 0:
        pytest.fail(
            f"commit {PREVIOUS} (the previous release) is not in the history of {ROOT}: "
            f"run the tests from a clone with history ({found.stderr.decode().strip()})"
        )
    source = into / "old"
    source.mkdir()
    archive = subprocess.run(
        ["git", "archive", PREVIOUS], cwd=ROOT, capture_output=True, check=True, timeout=60
    )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    return source


@contextmanager
def database_at_0002(cluster: PgCluster, source: Path) -> Iterator[tuple[str, str]]:
    """A new database migrated by the previous release (to its head, 0002): (name, url)."""
    name = cluster.create_database()
    try:
        url = cluster.url(name)
        migrate = [sys.executable, "-m", "app.cli", "migrate", "--database-url", url]
        env = {**os.environ, "PYTHONPATH": str(source)}
        done = subprocess.run(migrate, cwd=source, env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        yield name, url
    finally:
        cluster.drop_database(name)


@contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """The server, started, and stopped however the block ends (even if it never got ready)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


def revision(cluster: PgCluster, database: str) -> str:
    return cluster.sql("SELECT version_num FROM alembic_version", database).strip()


async def job_state(client: httpx.AsyncClient, job_id: str) -> str:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    state: str = response.json()["state"]
    return state


async def ack(client: httpx.AsyncClient, lease_id: str) -> dict[str, Any]:
    response = await client.post(f"/leases/{lease_id}/ack")
    assert response.status_code == 200, response.text
    done: dict[str, Any] = response.json()
    assert done["state"] == "succeeded"
    return done


async def long_poll_woken_by(
    waiter: httpx.AsyncClient, producer: Callable[[], Any], name: str
) -> list[dict[str, Any]]:
    """Start a long poll on `waiter` for `name`, then make a job with `producer`; the
    poll's leases once it answers. With re-checks a minute apart, an answer well before
    WAIT_MS can only come from the producer's NOTIFY."""
    body = {"worker_id": "waiter", "names": [name], "wait_ms": WAIT_MS}
    waiting = asyncio.create_task(waiter.post("/leases", json=body))
    await asyncio.sleep(0.5)  # the poll has found nothing and sleeps
    assert not waiting.done(), waiting.result().text
    started = time.monotonic()
    await producer()
    response = await asyncio.wait_for(waiting, WAIT_MS / 1000 + 10)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    leases: list[dict[str, Any]] = response.json()["leases"]
    # Not the last look at its deadline: a look that the NOTIFY set off.
    assert elapsed < WAIT_MS / 1000 / 2, f"answered after {elapsed:.1f} s: no wake-up"
    return leases


async def test_rolling_upgrade_from_the_previous_release_on_postgresql(
    pg_cluster: PgCluster,
    server_process: Callable[..., AbstractContextManager[ServerProcess]],
    tmp_path: Path,
) -> None:
    source = previous_release(tmp_path)
    with database_at_0002(pg_cluster, source) as (database, url):
        assert revision(pg_cluster, database) == "0002"
        old_server = ReleaseServer(source, url, free_port(), tmp_path / "old.log")
        with running(old_server) as old_replica:
            async with httpx.AsyncClient(base_url=old_replica.url, timeout=30) as old:
                # It is the previous release: it has no batch endpoint.
                paths = (await old.get("/openapi.json")).json()["paths"]
                assert "/jobs" in paths and "/jobs/batch" not in paths

                # Before the upgrade: the old release alone.
                first = await enqueue(old, "before")
                [held] = await lease(old, ["before"])
                assert held["job"]["id"] == first["id"]
                await ack(old, held["id"])
                waiting_over = await enqueue(old, "across", payload="from before the upgrade")

                # The new release starts on the same database and migrates it.
                with server_process(database_url=url, env=NO_RECHECK) as new_replica:
                    assert revision(pg_cluster, database) == head_revision()
                    async with httpx.AsyncClient(base_url=new_replica.url, timeout=30) as new:
                        await both_serve(old, new, first, waiting_over)
        assert revision(pg_cluster, database) == head_revision()


async def both_serve(
    old: httpx.AsyncClient,
    new: httpx.AsyncClient,
    first: dict[str, Any],
    waiting_over: dict[str, Any],
) -> None:
    """With both releases running on the migrated database."""
    # The old replica still does everything it did, one call at a time.
    job = await enqueue(old, "old-only")
    [held] = await lease(old, ["old-only"], wait_ms=1000)
    assert held["job"]["id"] == job["id"]
    await ack(old, held["id"])
    job = await enqueue(old, "old-only", max_retries=0)
    [held] = await lease(old, ["old-only"], wait_ms=1000)
    failed = await old.post(f"/leases/{held['id']}/fail", json={"exception": "boom"})
    assert failed.status_code == 200, failed.text
    assert failed.json()["outcome"] == "failed" and failed.json()["job"]["id"] == job["id"]
    job = await enqueue(old, "old-only")
    [held] = await lease(old, ["old-only"], wait_ms=1000)
    body = {"exception": "again", "retry_in_ms": 0}
    retried = await old.post(f"/leases/{held['id']}/fail", json=body)
    assert retried.status_code == 200, retried.text
    assert retried.json()["outcome"] == "retrying" and retried.json()["job"]["id"] == job["id"]
    extended = await old.post(f"/leases/{held['id']}/extend", json={"lease_ms": 60_000})
    assert extended.status_code == 409, extended.text  # no longer reserved
    keyed = {"Idempotency-Key": "rolling-1"}
    created = await old.post("/jobs", json={"name": "keyed", "payload": "k"}, headers=keyed)
    assert created.status_code == 201, created.text
    replayed = await new.post("/jobs", json={"name": "keyed", "payload": "k"}, headers=keyed)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["id"] == created.json()["id"]

    # What each release wrote, the other reads: the job acked before the upgrade, and one
    # enqueued before it, leased now through the new replica.
    assert await job_state(new, first["id"]) == "succeeded"
    [held] = await lease(new, ["across"], wait_ms=5000)
    assert held["job"]["id"] == waiting_over["id"]
    assert held["job"]["payload"] == "from before the upgrade"
    await ack(old, held["id"])  # a lease of the new release, acked on the old one

    # Old to new and new to old, through long polls.
    job = await enqueue(old, "old-to-new")
    [held] = await lease(new, ["old-to-new"], wait_ms=5000)
    assert held["job"]["id"] == job["id"]
    await ack(new, held["id"])
    assert await job_state(old, job["id"]) == "succeeded"
    job = await enqueue(new, "new-to-old")
    [held] = await lease(old, ["new-to-old"], wait_ms=5000)
    assert held["job"]["id"] == job["id"]
    await ack(old, held["id"])
    assert await job_state(new, job["id"]) == "succeeded"

    # A long poll on the old replica is woken by a batch enqueue on the new one...
    batch: list[dict[str, Any]] = []

    async def enqueue_batch_on_new() -> None:
        response = await new.post("/jobs/batch", json={"jobs": [{"name": "wake", "payload": "w"}]})
        assert response.status_code == 201, response.text
        batch.extend(response.json()["jobs"])

    leases = await long_poll_woken_by(old, enqueue_batch_on_new, "wake")
    assert [entry["job"]["id"] for entry in leases] == [job["id"] for job in batch]
    await ack(old, leases[0]["id"])

    # ...and one on the new replica by an enqueue on the old one.
    single: list[dict[str, Any]] = []

    async def enqueue_on_old() -> None:
        single.append(await enqueue(old, "wake-new"))

    leases = await long_poll_woken_by(new, enqueue_on_old, "wake-new")
    assert [entry["job"]["id"] for entry in leases] == [single[0]["id"]]
    await ack(new, leases[0]["id"])

    # Nothing left behind.
    for client in (old, new):
        pending = await client.get("/jobs", params={"state": "reserved"})
        assert pending.json()["items"] == [], pending.text
