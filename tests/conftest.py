"""Fixtures: the real app on a real database per test (a SQLite file, and a database on a
throwaway PostgreSQL server), and real server processes.

Every test that asks for `db_url` (or `app`, `client`, `service`) runs once per backend.
Without a PostgreSQL server the PostgreSQL half is skipped, saying why; under CI it fails.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.queue.clock import OffsetClock
from app.queue.service import QueueService
from app.settings import Settings
from tests.pgcluster import PgCluster, missing_reason

BACKENDS = ("sqlite", "postgres")


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests, but {reason}")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    cluster = PgCluster(free_port())
    try:
        cluster.start()
        template = cluster.create_database()
        migrate = [
            sys.executable,
            "-m",
            "app.cli",
            "migrate",
            "--database-url",
            cluster.url(template),
        ]
        subprocess.run(migrate, check=True, capture_output=True, timeout=60)
        cluster.template = template
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def fresh_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, *, migrated: bool
) -> Iterator[str]:
    """A database for one test: a new SQLite file (the app migrates it), or a new
    PostgreSQL database, copied from the migrated template or empty; dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / ('bgjobs.db' if migrated else 'empty.db')}"
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database(template=cluster.template if migrated else None)
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database of the backend under test."""
    yield from fresh_database(backend, tmp_path, request, migrated=True)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, reaper_interval_ms=50, poll_recheck_ms=1000)


@pytest.fixture
async def app(settings: Settings, clock: OffsetClock) -> AsyncIterator[FastAPI]:
    application = create_app(settings, clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bgjobs.test") as c:
        yield c


@pytest.fixture
def service(app: FastAPI) -> QueueService:
    svc: QueueService = app.state.service
    return svc


async def enqueue(
    client: httpx.AsyncClient, name: str = "send_email", payload: str = "{}", **fields: Any
) -> dict[str, Any]:
    response = await client.post("/jobs", json={"name": name, "payload": payload, **fields})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def lease(
    client: httpx.AsyncClient, names: list[str] | None = None, **fields: Any
) -> list[dict[str, Any]]:
    body = {"worker_id": "worker-1", "names": names or ["send_email"], **fields}
    response = await client.post("/leases", json=body)
    assert response.status_code == 200, response.text
    leases: list[dict[str, Any]] = response.json()["leases"]
    return leases


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """`bgjobs serve` in a child process, as a user would run it; its output goes to a file."""

    def __init__(
        self,
        database_url: str,
        port: int,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        launcher: str = "bgjobs",
    ) -> None:
        self.launcher = launcher
        self.database_url = database_url
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = log or Path(os.devnull)
        self.cwd: Path | None = None  # where the server runs (None: here)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not become ready in 20 s")

    def command(self) -> list[str]:
        """`bgjobs serve`, or the bare ASGI app under `uvicorn app.main:app`."""
        if self.launcher == "uvicorn":
            self.env["BGJOBS_DATABASE_URL"] = self.database_url
            return [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(self.port)]
        port, url = str(self.port), self.database_url
        return [sys.executable, "-m", "app.cli", "serve", "--port", port, "--database-url", url]

    def output(self) -> str:
        """Everything the server printed so far (logs included)."""
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def server_process(
    tmp_path: Path,
) -> Iterator[Callable[..., AbstractContextManager[ServerProcess]]]:
    """Start real servers; every one is stopped when the test ends, whatever happens."""
    started: list[ServerProcess] = []

    @contextmanager
    def run(
        database_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        launcher: str = "bgjobs",
    ) -> Iterator[ServerProcess]:
        port = port or free_port()
        server = ServerProcess(
            database_url or f"sqlite+aiosqlite:///{tmp_path / 'server.db'}",
            port,
            env,
            tmp_path / f"server-{port}.log",
            launcher,
        )
        started.append(server)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    yield run
    for server in started:
        server.stop(signal.SIGKILL)
