"""The Python SDK (`bgjobs_client`) against a real server process: the client's calls,
and the worker's leasing, heartbeats, retries, timeouts, shutdown and restarts."""

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bgjobs_client import (
    ApiError,
    AsyncClient,
    Client,
    HandlerTimeout,
    Job,
    RetryIn,
    Unreachable,
    Worker,
)

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(server_process: Any, db_url: str) -> Iterator[ServerProcess]:
    with server_process(db_url) as running:
        yield running


@pytest.fixture
async def aclient(server: ServerProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.url) as client:
        yield client


async def until(check: Callable[[], Any], seconds: float = 30, what: str = "") -> None:
    """Poll `check` (sync or async) until it is truthy; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached in {seconds} s: {what or check}")


async def all_jobs(client: AsyncClient, state: str) -> list[Job]:
    jobs: list[Job] = []
    cursor = None
    while True:
        page = await client.list_jobs(state, limit=200, cursor=cursor)
        jobs.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return jobs


@contextlib.asynccontextmanager
async def working(worker: Worker) -> AsyncIterator[asyncio.Task[bool]]:
    """The worker runs in this loop while the block runs; it is stopped and drained after."""
    task = asyncio.create_task(worker.run_async())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


# -- the client ----------------------------------------------------------------------------


async def test_client_calls_map_to_the_api(aclient: AsyncClient) -> None:
    job = await aclient.enqueue("mail", '{"to": "ada"}', max_retries=0)
    assert (job.name, job.payload, job.state, job.max_retries) == (
        "mail",
        '{"to": "ada"}',
        "available",
        0,
    )
    later = await aclient.enqueue("mail", "later", available_in_ms=60_000)
    assert later.state == "scheduled"
    batch = await aclient.enqueue_many([{"name": "mail", "payload": str(i)} for i in range(3)])
    assert [j.payload for j in batch] == ["0", "1", "2"]
    urgent = await aclient.enqueue("other", "now", priority=1)
    [urgent_too] = await aclient.enqueue_many([{"name": "other", "payload": "x", "priority": 2}])
    assert (urgent.priority, urgent_too.priority, job.priority) == (1, 2, 0)

    (lease,) = await aclient.lease(["mail"], worker_id="w", max_jobs=1)
    assert lease.job.id == job.id and lease.job.state == "reserved"
    assert (await aclient.extend(lease.id, 60_000)) > datetime.now(UTC)
    outcome = await aclient.fail(lease.id, "boom")
    assert outcome.outcome == "failed" and outcome.job.exception == "boom"
    assert [j.id for j in (await aclient.list_jobs("failed")).items] == [job.id]
    retried = await aclient.retry(job.id)
    assert retried.state == "available" and retried.attempts == 0

    leases = await aclient.lease(["mail"], worker_id="w", max_jobs=10)
    assert len(leases) == 4
    results = await aclient.ack_many([lease.id for lease in leases])
    assert all(r.ok and r.job is not None and r.job.state == "succeeded" for r in results)
    assert len((await aclient.list_jobs("succeeded")).items) == 4

    await aclient.cancel(later.id)
    with pytest.raises(ApiError) as missing:
        await aclient.get_job(later.id)
    assert missing.value.status == 404 and "not found" in missing.value.detail


async def test_a_retried_ack_returns_the_job(aclient: AsyncClient) -> None:
    """The first ack committed but its answer was lost: the retry gets a 409
    finished_by_this_lease, which the client reads as done."""
    await aclient.enqueue("n", "x")
    (lease,) = await aclient.lease(["n"], worker_id="w")
    first = await aclient.ack(lease.id)
    again = await aclient.ack(lease.id)
    assert again.id == first.id and again.state == "succeeded"
    (other,) = [await aclient.enqueue("n", "y")]
    (lease2,) = await aclient.lease(["n"], worker_id="w")
    await aclient.release(lease2.id)
    with pytest.raises(ApiError) as refused:
        await aclient.ack(lease2.id)
    assert refused.value.status == 409 and refused.value.code == "released"
    assert (await aclient.get_job(other.id)).state == "available"


async def test_enqueue_retries_are_safe(server: ServerProcess) -> None:
    """The same Idempotency-Key twice is one job: what the client's retries rely on."""
    async with AsyncClient(server.url) as client:
        one = await client.enqueue("n", "x", idempotency_key="k-1")
        two = await client.enqueue("n", "x", idempotency_key="k-1")
        assert one.id == two.id
        assert len((await client.list_jobs()).items) == 1


async def test_an_unreachable_server_is_an_error_after_retries() -> None:
    async with AsyncClient("http://127.0.0.1:9", retries=2) as client:
        with pytest.raises(Unreachable):
            await client.enqueue("n", "x")


def test_the_blocking_client_is_the_async_one(server: ServerProcess) -> None:
    with Client(server.url) as client:
        job = client.enqueue("send_email", '{"to": "ada@example.com"}', available_in_ms=5000)
        assert job.state == "scheduled" and job.available_at is not None
        assert client.get_job(job.id) == job
        assert client.list_jobs("scheduled").items == [job]
    assert Client.enqueue.__doc__ == AsyncClient.enqueue.__doc__


# -- the worker ----------------------------------------------------------------------------


async def test_a_worker_finishes_500_jobs_where_they_should_end(
    server: ServerProcess, aclient: AsyncClient
) -> None:
    """Concurrency 8; every tenth job fails for good, every tenth+1 retries once."""
    specs = [
        {"name": "calc", "payload": str(i), "max_retries": 0 if i % 10 == 0 else 3}
        for i in range(500)
    ]
    for start in range(0, 500, 100):
        await aclient.enqueue_many(specs[start : start + 100])
    runs: Counter[str] = Counter()
    running, most = 0, 0
    lock = threading.Lock()
    worker = Worker(AsyncClient(server.url), "w-500", concurrency=8)

    @worker.handler("calc")
    def calc(job: Job) -> None:
        nonlocal running, most
        with lock:
            runs[job.payload] += 1
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.002)
            number = int(job.payload)
            if number % 10 == 0:
                raise ValueError(f"cannot compute {number}")
            if number % 10 == 1 and job.attempts == 1:
                raise RetryIn(10)
        finally:
            with lock:
                running -= 1

    async def finished() -> bool:
        stats = [len(await all_jobs(aclient, s)) for s in ("succeeded", "failed")]
        return stats == [450, 50]

    async with working(worker):
        await until(finished, 120, "450 succeeded and 50 failed")
    failed = await all_jobs(aclient, "failed")
    assert {int(j.payload) for j in failed} == set(range(0, 500, 10))
    assert all(j.exception and j.exception.startswith("ValueError: cannot compute") for j in failed)
    assert all("Traceback" in (j.exception or "") and "calc" in (j.exception or "") for j in failed)
    succeeded = {int(j.payload): j for j in await all_jobs(aclient, "succeeded")}
    assert set(succeeded) == {i for i in range(500) if i % 10}
    assert all(succeeded[i].attempts == (2 if i % 10 == 1 else 1) for i in succeeded)
    assert runs == Counter({str(i): 2 if i % 10 == 1 else 1 for i in range(500)})
    assert 1 < most <= 8
    assert (await aclient.list_jobs()).items == []
    assert "POST /leases/ack" in server.output()  # acks that finished together went as one


async def test_a_long_job_outlives_its_lease_by_heartbeats(
    server: ServerProcess, aclient: AsyncClient
) -> None:
    """A 5 s job under lease_ms=1500 is extended every ~0.5 s and never expires."""
    job = await aclient.enqueue("long", "x", max_retries=0)
    runs: list[int] = []
    worker = Worker(AsyncClient(server.url), "w-long", concurrency=1, lease_ms=1500)

    @worker.handler("long")
    def long(job: Job) -> None:
        runs.append(job.attempts)
        time.sleep(5)

    async with working(worker):
        await until(lambda: aclient.get_job(job.id), 5)
        done = lambda: _state(aclient, job.id, "succeeded")  # noqa: E731
        await until(done, 30, "the long job succeeded")
    assert runs == [1]
    assert (await aclient.get_job(job.id)).attempts == 1
    assert "/leases/extend" in server.output()


async def _state(client: AsyncClient, job_id: str, state: str) -> bool:
    return (await client.get_job(job_id)).state == state


async def test_retry_in_sets_the_delay(server: ServerProcess, aclient: AsyncClient) -> None:
    job = await aclient.enqueue("later", "x")
    failed_at: list[datetime] = []
    worker = Worker(AsyncClient(server.url), "w-retry", concurrency=1)

    @worker.handler("later")
    def later(job: Job) -> None:
        failed_at.append(datetime.now(UTC))
        raise RetryIn(30_000, "the mail server asked to wait")

    async with working(worker):
        await until(lambda: _state(aclient, job.id, "scheduled"), 20, "the job is scheduled")
    again = await aclient.get_job(job.id)
    assert again.available_at is not None and again.attempts == 1
    delay = again.available_at - failed_at[0]
    assert timedelta(seconds=29) < delay < timedelta(seconds=40)


async def test_async_handlers_and_middleware(server: ServerProcess, aclient: AsyncClient) -> None:
    for i in range(6):
        await aclient.enqueue("async", str(i), max_retries=0)
    seen: list[tuple[str, str]] = []
    worker = Worker(AsyncClient(server.url), "w-async", concurrency=3)

    @worker.middleware
    @contextlib.contextmanager
    def record(job: Job) -> Iterator[None]:
        seen.append(("start", job.payload))
        try:
            yield
        except Exception as exc:
            seen.append(("error", f"{job.payload}:{exc}"))
            raise
        seen.append(("done", job.payload))

    @worker.handler("async")
    async def handle(job: Job) -> None:
        await asyncio.sleep(0.01)
        if job.payload == "5":
            raise RuntimeError("five")

    async with working(worker):
        await until(lambda: _count(aclient, "succeeded", 5), 30)
        await until(lambda: _count(aclient, "failed", 1), 30)
    assert sorted(p for kind, p in seen if kind == "done") == ["0", "1", "2", "3", "4"]
    assert ("error", "5:five") in seen
    (failed,) = await all_jobs(aclient, "failed")
    assert failed.exception is not None and failed.exception.startswith("RuntimeError: five")


async def _count(client: AsyncClient, state: str, n: int) -> bool:
    return len(await all_jobs(client, state)) == n


async def test_a_timed_out_handler_fails_its_job_and_keeps_its_slot(
    server: ServerProcess, aclient: AsyncClient
) -> None:
    slow = await aclient.enqueue("slow", "slow", max_retries=0)
    events: list[tuple[str, str, float]] = []
    worker = Worker(AsyncClient(server.url), "w-timeout", concurrency=1)

    @worker.handler("slow", timeout=0.5)
    def handle(job: Job) -> None:
        events.append(("start", job.payload, time.monotonic()))
        if job.payload == "slow":
            time.sleep(2)
        events.append(("end", job.payload, time.monotonic()))

    async with working(worker):
        await until(lambda: _state(aclient, slow.id, "failed"), 20, "the slow job failed")
        fast = await aclient.enqueue("slow", "fast")  # its slot is still taken
        await until(lambda: _state(aclient, fast.id, "succeeded"), 20, "the fast job ran")
    failed = await aclient.get_job(slow.id)
    assert failed.exception is not None and failed.exception.startswith("HandlerTimeout")
    assert HandlerTimeout.__name__ in failed.exception
    order = [(kind, payload) for kind, payload, _ in events]
    assert order == [("start", "slow"), ("end", "slow"), ("start", "fast"), ("end", "fast")]


# -- shutdown and restarts: the worker in its own process ------------------------------------

WORKER_SCRIPT = r"""
import sys, time, logging
from bgjobs_client import Client, Worker
logging.basicConfig(level=logging.INFO)
url, seconds, shutdown = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
worker = Worker(Client(url), "w-proc", concurrency=2, lease_ms=3000, shutdown_timeout=shutdown)

def say(line):  # one write: lines from handler threads must not interleave
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

@worker.handler("sleepy")
def sleepy(job):
    say(f"start {job.payload}")
    time.sleep(seconds)
    say(f"end {job.payload}")

worker.run()
say("drained")
"""


def start_worker(
    tmp_path: Path, url: str, seconds: float, shutdown: float
) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT))
    return subprocess.Popen(
        [sys.executable, str(script), url, str(seconds), str(shutdown)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Output:
    """The worker's stdout lines, read on a thread as they come (none lost to buffering)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.strip())

    def of(self, kind: str) -> set[str]:
        return {line.split(" ", 1)[1] for line in self.lines if line.startswith(kind + " ")}

    def join(self) -> None:
        self._thread.join(timeout=30)


async def stop_after_starts(
    process: subprocess.Popen[str], output: Output, n: int
) -> tuple[int, str]:
    """SIGTERM once `n` jobs have started; the exit status and stderr."""
    await until(lambda: len(output.of("start")) >= n, 30, f"{n} jobs started")
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    err = await asyncio.to_thread(process.stderr.read)
    status = await asyncio.to_thread(process.wait, 30)
    output.join()
    return status, err


async def test_sigterm_lets_running_jobs_finish_and_leaves_the_rest(
    server: ServerProcess, aclient: AsyncClient, tmp_path: Path
) -> None:
    jobs = [await aclient.enqueue("sleepy", str(i)) for i in range(6)]
    process = start_worker(tmp_path, server.url, 1.5, 25)
    output = Output(process)
    try:
        status, err = await stop_after_starts(process, output, 2)
    finally:
        process.kill()
    assert status == 0, err
    started = output.of("start")
    assert 2 <= len(started) < 6 and output.of("end") == started  # the running ones finished
    assert output.lines[-1] == "drained"
    now = {j.payload: await aclient.get_job(j.id) for j in jobs}
    assert {p for p, j in now.items() if j.state == "succeeded"} == started
    rest = [j for p, j in now.items() if p not in started]
    assert all(j.state == "available" and j.attempts == 0 for j in rest)  # never leased


async def test_past_the_shutdown_timeout_leases_are_released_and_the_process_exits(
    server: ServerProcess, aclient: AsyncClient, tmp_path: Path
) -> None:
    jobs = [await aclient.enqueue("sleepy", str(i)) for i in range(2)]
    process = start_worker(tmp_path, server.url, 60, 1)
    output = Output(process)
    try:
        status, err = await stop_after_starts(process, output, 2)
    finally:
        process.kill()
    assert status == 1, err
    assert output.of("end") == set() and "releasing their leases" in err
    for job in jobs:
        now = await aclient.get_job(job.id)
        assert now.state == "available" and now.attempts == 0  # released, not expired


async def test_a_server_restart_mid_run_loses_nothing(
    server: ServerProcess, aclient: AsyncClient
) -> None:
    """300 jobs; the server is stopped and started again while the worker runs. Every job
    succeeds; a job runs twice only if its lease expired while the server was down."""
    for start in range(0, 300, 100):
        await aclient.enqueue_many(
            [{"name": "r", "payload": str(i)} for i in range(start, start + 100)]
        )
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    worker = Worker(AsyncClient(server.url, timeout=5), "w-restart", concurrency=4, wait_ms=1000)

    @worker.handler("r")
    def handle(job: Job) -> None:
        with lock:
            runs[job.payload] += 1
        time.sleep(0.02)

    async with working(worker):
        await until(lambda: len(runs) >= 60, 60, "60 jobs ran")
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1)
        await asyncio.to_thread(server.start)
        await until(lambda: _count(aclient, "succeeded", 300), 120, "all 300 succeeded")
    assert set(runs) == {str(i) for i in range(300)}
    twice = [payload for payload, n in runs.items() if n > 1]
    assert len(twice) <= 4  # at most the jobs in flight at the restart
    assert (await aclient.list_jobs()).items == []
    assert (await aclient.list_jobs("failed")).items == []
