"""Benchmark bgjobs-server: prints figures, asserts nothing (it is not a test).

Run from the repository root:

    .venv/bin/python bench/run.py            # default sizes, a few minutes
    .venv/bin/python bench/run.py --quick    # small sizes, about half a minute

Sections 1-3 talk HTTP to a real `python -m app.cli serve` child process on a temporary
SQLite file and a free port of 127.0.0.1; section 4 calls the storage layer directly, so
the cost of one reserve can be compared across backlog sizes without HTTP noise. The
server is stopped in a `finally` (Ctrl-C and SIGTERM included) and, on Linux, also dies with
the benchmark if that is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, text

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from app.queue.models import NewJob  # noqa: E402
from app.queue.service import new_job_id  # noqa: E402
from app.storage import open_storage  # noqa: E402
from app.storage.base import Storage  # noqa: E402
from app.storage.common import jobs  # noqa: E402

JOB_NAME = "bench"
PAYLOAD = '{"to": "ada@example.com", "subject": "benchmark"}'


# -- configuration --------------------------------------------------------------------------


@dataclass(slots=True)
class Config:
    enqueue: int
    concurrency: int
    workers: int
    batch_backlog: int
    batch_size: int
    pickups: int
    small: int
    big: int
    reserves: int


DEFAULTS = Config(
    enqueue=5000,
    concurrency=16,
    workers=8,
    batch_backlog=5000,
    batch_size=50,
    pickups=200,
    small=1000,
    big=1_000_000,
    reserves=2000,
)
QUICK = Config(
    enqueue=1000,
    concurrency=16,
    workers=8,
    batch_backlog=1000,
    batch_size=50,
    pickups=40,
    small=1000,
    big=100_000,
    reserves=500,
)


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags override the chosen preset one by one, so a single count can be scaled."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 30 s)")
    help_text = {
        "enqueue": "POST /jobs requests in section 1 (the backlog drained with max_jobs=1)",
        "concurrency": "concurrent enqueue requests in section 1",
        "workers": "concurrent lease+ack workers in section 2",
        "batch_backlog": "jobs enqueued, then drained with --batch-size, in section 2",
        "batch_size": "max_jobs of the batched lease run in section 2 (1..100)",
        "pickups": "idle long-poll pickups measured in section 3",
        "small": "small backlog of section 4",
        "big": "big backlog of section 4",
        "reserves": "reserve+ack calls timed at each backlog in section 4",
    }
    for name, text_ in help_text.items():
        defaults = f"default {getattr(DEFAULTS, name)}, --quick {getattr(QUICK, name)}"
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{text_} ({defaults})")
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else DEFAULTS)
    for name in help_text:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if not 1 <= config.batch_size <= 100:
        parser.error("--batch-size must be within 1..100 (the API's max_jobs range)")
    return config


# -- figures ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    """Figures in the order they were measured, printed again together at the end."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))
        print(f"  {label:<52} {value}", flush=True)

    def print_summary(self) -> None:
        print("\n==== summary " + "=" * 60)
        for label, value in self.lines:
            print(f"{label:<54} {value}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, no interpolation."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- the server process ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server(database_url: str, log_path: Path) -> Iterator[str]:
    """`python -m app.cli serve` as a user runs it; always stopped (SIGTERM, then SIGKILL).

    Its output goes to a file rather than a pipe: a pipe nobody reads could fill up and
    stall the server in the middle of a measurement.
    """
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    command += ["--database-url", database_url]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # a Ctrl-C reaches us only; we stop it in order
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(process, url, log_path)
            yield url
        finally:
            stop(process)


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the benchmark dies without its `finally`
    (SIGKILL), so a server is never left behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not become ready in 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def http_client(url: str, connections: int) -> AsyncIterator[httpx.AsyncClient]:
    """Keep-alive pool as big as the concurrency; trust_env=False so no proxy is involved."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=60, trust_env=False
    ) as client:
        yield client


# -- HTTP helpers ----------------------------------------------------------------------------


async def enqueue_one(client: httpx.AsyncClient, name: str = JOB_NAME) -> None:
    response = await client.post("/jobs", json={"name": name, "payload": PAYLOAD})
    if response.status_code != 201:
        raise RuntimeError(f"enqueue: {response.status_code} {response.text}")


async def lease(
    client: httpx.AsyncClient, worker_id: str, max_jobs: int, wait_ms: int
) -> list[dict[str, Any]]:
    body = {"worker_id": worker_id, "names": [JOB_NAME], "max_jobs": max_jobs, "wait_ms": wait_ms}
    response = await client.post("/leases", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"lease: {response.status_code} {response.text}")
    leases: list[dict[str, Any]] = response.json()["leases"]
    return leases


async def ack(client: httpx.AsyncClient, lease_id: str) -> None:
    response = await client.post(f"/leases/{lease_id}/ack")
    if response.status_code != 200:
        raise RuntimeError(f"ack: {response.status_code} {response.text}")


async def run_concurrently(
    count: int, concurrency: int, task: Callable[[], Awaitable[None]]
) -> None:
    """Run `task` `count` times with at most `concurrency` in flight (a fixed pool of loops,
    so there is no backlog of waiting coroutines to skew latencies)."""
    remaining = count

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await task()

    await asyncio.gather(*(loop() for _ in range(min(concurrency, count))))


# -- 1. enqueue throughput --------------------------------------------------------------------


async def enqueue_backlog(client: httpx.AsyncClient, count: int, concurrency: int) -> list[float]:
    """Enqueue `count` jobs; returns each request's latency in seconds."""
    latencies: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        await enqueue_one(client)
        latencies.append(time.perf_counter() - start)

    await run_concurrently(count, concurrency, one)
    return latencies


async def bench_enqueue(url: str, config: Config, report: Report) -> None:
    print(f"\n1. enqueue: {config.enqueue} x POST /jobs, {config.concurrency} concurrent")
    async with http_client(url, config.concurrency) as client:
        await run_concurrently(50, config.concurrency, lambda: enqueue_one(client, "warmup"))
        start = time.perf_counter()
        latencies = await enqueue_backlog(client, config.enqueue, config.concurrency)
        elapsed = time.perf_counter() - start
    report.add(
        f"enqueue throughput (C={config.concurrency})", f"{config.enqueue / elapsed:,.0f} jobs/s"
    )
    report.add("enqueue latency p50", ms(percentile(latencies, 50)))
    report.add("enqueue latency p99", ms(percentile(latencies, 99)))


# -- 2. lease+ack cycles ---------------------------------------------------------------------


async def drain(client: httpx.AsyncClient, workers: int, max_jobs: int) -> int:
    """Workers lease (no wait) and ack one by one until a lease comes back empty.

    The backlog only shrinks during a drain, so the first empty answer means it is gone.
    """
    done = 0

    async def worker(index: int) -> None:
        nonlocal done
        while leases := await lease(client, f"worker-{index}", max_jobs, wait_ms=0):
            for held in leases:
                await ack(client, held["id"])
                done += 1

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return done


async def timed_drain(
    client: httpx.AsyncClient, expected: int, workers: int, max_jobs: int, report: Report
) -> None:
    start = time.perf_counter()
    done = await drain(client, workers, max_jobs)
    elapsed = time.perf_counter() - start
    if done != expected:
        raise RuntimeError(f"drained {done} jobs, expected {expected}")
    report.add(
        f"lease+ack throughput (max_jobs={max_jobs}, {workers} workers)",
        f"{done / elapsed:,.0f} jobs/s",
    )


async def bench_lease_ack(url: str, config: Config, report: Report) -> None:
    print(f"\n2. lease+ack: {config.workers} workers drain the backlog")
    connections = max(config.workers, config.concurrency)
    async with http_client(url, connections) as client:
        await timed_drain(client, config.enqueue, config.workers, 1, report)
        print(f"  (enqueueing {config.batch_backlog} more jobs, not timed)", flush=True)
        await enqueue_backlog(client, config.batch_backlog, config.concurrency)
        await timed_drain(client, config.batch_backlog, config.workers, config.batch_size, report)


# -- 3. idle long-poll pickup ----------------------------------------------------------------


async def one_pickup(worker: httpx.AsyncClient, producer: httpx.AsyncClient) -> tuple[float, float]:
    """Park a long poll on the empty queue, enqueue one job, and time enqueue-to-lease.

    The clock starts just before the enqueue request is sent, so the figure includes the
    enqueue's own commit: a job cannot be leased before it is durable. Also returns the
    enqueue's round trip, to tell the wake-up's share from the commit's.
    """
    arrived = 0.0

    async def wait_for_job() -> None:
        nonlocal arrived
        leases = await lease(worker, "poller", 1, wait_ms=10_000)
        arrived = time.perf_counter()
        if len(leases) != 1:
            raise RuntimeError(f"long poll returned {len(leases)} leases, expected 1")
        await ack(worker, leases[0]["id"])

    polling = asyncio.create_task(wait_for_job())
    await asyncio.sleep(0.05)  # let the request reach the server and park in its wait
    if polling.done():
        await polling  # surfaces the error: the queue was not empty
    sent = time.perf_counter()
    await enqueue_one(producer)
    enqueued = time.perf_counter()
    await polling
    return arrived - sent, enqueued - sent


async def bench_pickup(url: str, config: Config, report: Report) -> None:
    print(f"\n3. idle long-poll pickup: {config.pickups} times, wait_ms=10000")
    async with http_client(url, 2) as worker, http_client(url, 2) as producer:
        for _ in range(3):  # warm-up
            await one_pickup(worker, producer)
        samples = [await one_pickup(worker, producer) for _ in range(config.pickups)]
    latencies = [pickup for pickup, _ in samples]
    report.add("long-poll pickup p50", ms(percentile(latencies, 50)))
    report.add("long-poll pickup p99", ms(percentile(latencies, 99)))
    report.add("long-poll pickup max", ms(max(latencies)))
    enqueues = [enqueue for _, enqueue in samples]
    report.add("  (its enqueue round trip alone, p50)", ms(percentile(enqueues, 50)))


async def bench_http(config: Config, workdir: Path, report: Report) -> None:
    """Sections 1-3 share one server and one database file, in order: 2 drains 1's backlog."""
    database_url = f"sqlite+aiosqlite:///{workdir / 'http.db'}"
    with server(database_url, workdir / "server.log") as url:
        await bench_enqueue(url, config, report)
        await bench_lease_ack(url, config, report)
        await bench_pickup(url, config, report)


# -- 4. reserve cost vs backlog, no HTTP -----------------------------------------------------


async def fill(storage: Storage, count: int) -> None:
    """Bulk-insert `count` available jobs in 10k-row statements, bypassing the per-job
    transaction of `enqueue` (which would take minutes for a million rows).

    The rows carry the columns `SqlStorage.enqueue` writes; `available_at` rises by one
    microsecond per row, all in the past, so the oldest-first order is well defined.
    """
    engine = storage.engine  # type: ignore[attr-defined]
    base = datetime.now(UTC) - timedelta(days=1)
    batch = 10_000
    for first in range(0, count, batch):
        rows = [
            {
                "id": f"bench{i:012d}",
                "name": JOB_NAME,
                "payload": PAYLOAD,
                "attempts": 0,
                "max_retries": 3,
                "created_at": base + timedelta(microseconds=i),
                "available_at": base + timedelta(microseconds=i),
                "lease_seq": 0,
            }
            for i in range(first, min(first + batch, count))
        ]
        async with engine.begin() as conn:
            await conn.execute(insert(jobs), rows)
    async with engine.connect() as conn:
        await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


OPS = ("reserve", "ack", "enqueue")


@dataclass(slots=True)
class Backlog:
    """One SQLite file kept at a constant number of available jobs, and what each call cost."""

    size: int
    storage: Storage
    seconds: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})


async def cycle(backlog: Backlog, record: bool = True) -> None:
    """Reserve one job, ack it, enqueue a replacement: the backlog keeps its size, so every
    timed reserve sees the same number of available jobs."""
    storage, now = backlog.storage, datetime.now(UTC)
    start = time.perf_counter()
    leases = await storage.reserve([JOB_NAME], "w", 1, now, now + timedelta(seconds=30))
    reserved = time.perf_counter()
    if len(leases) != 1:
        raise RuntimeError(f"reserve returned {len(leases)} leases, expected 1")
    if await storage.ack(leases[0].job.id, leases[0].id, now) is None:
        raise RuntimeError("ack refused a fresh lease")
    acked = time.perf_counter()
    await storage.enqueue(NewJob(new_job_id(), JOB_NAME, PAYLOAD, 3, now, now), now)
    enqueued = time.perf_counter()
    if record:
        for op, seconds in zip(
            OPS, (reserved - start, acked - reserved, enqueued - acked), strict=True
        ):
            backlog.seconds[op].append(seconds)


async def create_schema(storage: Any) -> None:
    """`start()` created the schema until Alembic migrations replaced it with `migrate()`;
    accept either, so the benchmark runs on both sides of that change."""
    if hasattr(storage, "migrate"):
        await storage.migrate()
    else:
        await storage.start()


async def open_backlog(stack: contextlib.AsyncExitStack, path: Path, size: int) -> Backlog:
    storage = open_storage(f"sqlite+aiosqlite:///{path}")
    stack.push_async_callback(storage.close)
    await create_schema(storage)
    started = time.perf_counter()
    await fill(storage, size)
    print(f"  filled {size:,} jobs in {time.perf_counter() - started:.1f} s", flush=True)
    backlog = Backlog(size, storage)
    for _ in range(100):  # warm-up: pooled connections, statement cache, hot pages
        await cycle(backlog, record=False)
    return backlog


async def alternate(backlogs: list[Backlog], calls: int, block: int = 50) -> None:
    """Time the backlogs in alternating blocks, so that load from anything else on the
    machine falls on both alike instead of on whichever ran second."""
    done = 0
    while done < calls:
        count = min(block, calls - done)
        for backlog in backlogs:
            for _ in range(count):
                await cycle(backlog)
        done += count


def mean_us(values: list[float]) -> float:
    return sum(values) / len(values) * 1e6


async def bench_storage(config: Config, workdir: Path, report: Report) -> None:
    print(
        f"\n4. storage, no HTTP: {config.reserves} x (reserve 1, ack it, enqueue 1) "
        f"at backlogs {config.small:,} and {config.big:,}"
    )
    async with contextlib.AsyncExitStack() as stack:
        small = await open_backlog(stack, workdir / "small.db", config.small)
        big = await open_backlog(stack, workdir / "big.db", config.big)
        await alternate([small, big], config.reserves)
    for op in OPS:
        for backlog in (small, big):
            values = backlog.seconds[op]
            report.add(
                f"storage.{op} at backlog {backlog.size:,}",
                f"{mean_us(values):,.0f} us/call (p50 {percentile(values, 50) * 1e6:,.0f})",
            )
        ratio = mean_us(big.seconds[op]) / mean_us(small.seconds[op])
        report.add(f"storage.{op} ratio big/small (means)", f"{ratio:.2f}x")


# -- main ------------------------------------------------------------------------------------


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"nproc {cores}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.system()} {platform.machine()}"
    )


def load_average() -> str:
    """The 1-minute load: anything else running on the machine shows up in every figure."""
    return f"{os.getloadavg()[0]:.2f}"


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) cancels the run like Ctrl-C does, so every `finally`
    runs and the server is stopped; Python's default would exit on the spot."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


async def main(config: Config) -> None:
    stop_on_sigterm()
    report = Report()
    print(f"machine: {machine()}")
    print(f"config: {config}")
    load_start = load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bgjobs-bench-") as tmp:
        workdir = Path(tmp)
        await bench_http(config, workdir, report)
        await bench_storage(config, workdir, report)
    report.add("machine", machine())
    report.add("load average at start / end", f"{load_start} / {load_average()}")
    report.add("wall time of the whole run", f"{time.perf_counter() - started:.0f} s")
    report.print_summary()


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("bench: interrupted (the server was stopped)")
